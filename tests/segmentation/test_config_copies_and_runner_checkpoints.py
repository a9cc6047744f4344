"""A refused run writes none of its config copies (trial 6a C1), and tools/train.py's own checkpoints given to
tools/convert_checkpoint.py (or wherever plain weights are expected) are named for what they are (C4)."""
import glob
import os
import runpy
import shutil
import sys

import numpy as np
import pytest
import torch

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import ROOT, TOY_LINEAR, TOY_UPER, toy_options


@pytest.fixture(scope="module")
def linear_run(toy_data, tmp_path_factory):
    """A 2-iteration linear-head run: its work dir, options and iter_2.pth (an mmengine runner checkpoint)."""
    from internvit.runner import train

    work_dir = str(tmp_path_factory.mktemp("linear"))
    # a visualizer name of its own: an earlier test's runner in this process left one of the default name, which
    # mmengine reuses as it is (with that run's save_dir)
    opts = toy_options(toy_data, work_dir, **{"train_cfg.max_iters": 2, "train_cfg.val_interval": 2,
                                              "default_hooks.checkpoint.interval": 2,
                                              "visualizer.name": f"linear_run_{id(work_dir)}"})
    train(TOY_LINEAR, work_dir=work_dir, cfg_options=opts)
    return work_dir, opts, os.path.join(work_dir, "iter_2.pth")


def _snapshot(folder) -> dict:
    """Every entry under ``folder``: a file's bytes, or 'dir'."""
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for n in dirs:
            out[os.path.relpath(os.path.join(dirpath, n), folder)] = "dir"
        for n in files:
            with open(os.path.join(dirpath, n), "rb") as f:
                out[os.path.relpath(os.path.join(dirpath, n), folder)] = f.read()
    return out


def run_tool(name: str, argv: list) -> int:
    """``python tools/<name>.py argv`` in this process (its own error handling included): the exit status."""
    saved = sys.argv
    sys.argv = [os.path.join(ROOT, "tools", f"{name}.py"), *map(str, argv)]
    try:
        runpy.run_path(sys.argv[0], run_name="__main__")
        return 0
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = saved


def _one_error_line(capfd) -> str:
    lines = [ln for ln in capfd.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines[-5:]
    return lines[0]


def _options(opts: dict) -> list:
    return ["--cfg-options", *[f"{k}={v}" for k, v in opts.items()]]


def test_refused_test_run_leaves_an_existing_show_dir_byte_identical(linear_run, tmp_path, capfd):
    """The visualizer wrote ``<show-dir>/vis_data/config.py`` while the runner was built, before the checks that
    refused the run (here: a linear-head checkpoint for the UperNet config), replacing an earlier run's copy in a
    reused show-dir. It is written (atomically) only by a run whose set-up passed, as before."""
    work_dir, opts, ckpt = linear_run
    show = tmp_path / "show"
    (show / "vis_data").mkdir(parents=True)
    (show / "vis_data" / "config.py").write_text("# an earlier run's copy\n")
    (show / "notes.txt").write_text("mine")
    before = _snapshot(show)
    capfd.readouterr()
    rc = run_tool("test", [TOY_UPER, ckpt, "--work-dir", tmp_path / "w", "--show-dir", show, "--overwrite",
                           *_options(opts)])
    line = _one_error_line(capfd)
    assert rc == 2 and "does not fit the config's model" in line, line
    assert _snapshot(show) == before
    assert not os.path.exists(tmp_path / "w")
    # the same show-dir for a run that passes its set-up: the config copy is there, as the work dir's copy
    assert run_tool("test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "w", "--show-dir", show, "--overwrite",
                             *_options(opts)]) == 0
    copy = (show / "vis_data" / "config.py").read_text()
    assert copy == (tmp_path / "w" / os.path.basename(TOY_LINEAR)).read_text() and "InternViT" in copy
    assert len(glob.glob(str(show / "vis_data" / "vis_image" / "*.png"))) == 8
    assert (show / "notes.txt").read_text() == "mine"
    assert not glob.glob(str(show / "**" / ".*"), recursive=True)  # no temporary files left


def test_show_dir_inside_the_test_images_is_refused_without_writing_there(linear_run, toy_data, tmp_path, capfd):
    """--show-dir inside the test images (with --overwrite) is refused, and left ``vis_data/config.py`` among
    the images it had just said it would not write to."""
    _, opts, ckpt = linear_run
    data = tmp_path / "data"
    shutil.copytree(toy_data, data)
    opts = dict(opts, **{f"{s}_dataloader.dataset.data_root": str(data) for s in ("train", "val", "test")})
    images = data / "images" / "validation"
    before = _snapshot(data)
    capfd.readouterr()
    rc = run_tool("test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "w", "--show-dir", images, "--overwrite",
                           *_options(opts)])
    line = _one_error_line(capfd)
    assert rc == 2 and "inside the test set's data folder" in line, line
    assert _snapshot(data) == before
    assert not os.path.exists(tmp_path / "w")


def test_refused_train_run_writes_no_visualizer_config(linear_run, tmp_path, capfd):
    """tools/train.py builds its runner the same way: a run refused after the runner was built (a missing
    training folder) wrote the visualizer's config copy into a ``visualizer.save_dir`` that existed."""
    work_dir, opts, _ = linear_run
    # the run that passed: its visualizer's copy is in its log folder, as mmengine writes it
    copies = glob.glob(os.path.join(work_dir, "*", "vis_data", "config.py"))
    assert len(copies) == 1 and open(copies[0]).read() == open(os.path.join(work_dir, os.path.basename(
        TOY_LINEAR))).read()
    vis = tmp_path / "vis"
    vis.mkdir()
    (vis / "notes.txt").write_text("mine")
    # a visualizer name of its own: visualizers are per-process singletons, one of the same name is reused as it is
    opts = dict(opts, **{"visualizer.save_dir": str(vis), "visualizer.name": f"refused_train_{id(vis)}",
                         "train_dataloader.dataset.data_root": str(tmp_path / "no"), "train_cfg.max_iters": 1})
    capfd.readouterr()
    rc = run_tool("train", [TOY_LINEAR, "--work-dir", tmp_path / "w", *_options(opts)])
    line = _one_error_line(capfd)
    assert rc == 2 and str(tmp_path / "no") in line, line
    assert _snapshot(vis) == {"notes.txt": b"mine"}
    assert not os.path.exists(tmp_path / "w")


RUNNER_CKPT = "an mmengine runner checkpoint (what tools/train.py saves: meta, state_dict, message_hub"
READERS = "tools/test.py, and tools/train.py's --resume and load_from, read it directly"


@pytest.mark.parametrize("command,dst", [("mmseg0x", "out.pth"), ("to-hf", "out_hf"), ("to-original", "out.pth")])
def test_convert_checkpoint_names_a_runner_checkpoint(linear_run, tmp_path, capfd, command, dst):
    """A checkpoint tools/train.py wrote was refused as "it references builtins.getattr, mmengine...HistoryBuffer,
    ... (unpickling it could run code)": the project's own file called unsafe. It is still refused (mmseg0x: it
    is mmseg 1.x already; to-hf / to-original: not InternViT weights), saying what it is and what reads it."""
    _, _, ckpt = linear_run
    capfd.readouterr()
    rc = run_tool("convert_checkpoint", [command, ckpt, tmp_path / dst])
    line = _one_error_line(capfd)
    assert rc == 2, line
    assert line.startswith(f"error: {ckpt}: ") and RUNNER_CKPT in line and READERS in line, line
    assert "could run code" not in line and "refusing" not in line, line
    if command == "mmseg0x":
        assert "already an mmseg 1.x checkpoint, nothing to convert" in line, line
    else:
        assert f"not InternViT weights (a Hugging Face folder or a weight file of either key family) as {command} " \
               f"converts" in line, line
    assert os.listdir(tmp_path) == []


def test_weights_reader_names_a_runner_checkpoint_and_still_refuses_other_files(linear_run, tmp_path):
    """Wherever plain weights are read (load_model, pretrained=...), a runner checkpoint is named as one; a file
    that pickles the same globals but is no runner checkpoint keeps the refusal."""
    import internvit
    from internvit.file_reads import CheckpointError, RunnerCheckpointError

    _, _, ckpt = linear_run
    with pytest.raises(RunnerCheckpointError) as e:
        internvit.load_model(ckpt, "internvit-6b-tiny")
    assert str(e.value).startswith(f"{ckpt}: {RUNNER_CKPT}") and "not a plain weight file" in str(e.value)
    other = str(tmp_path / "numpy_meta.pth")
    torch.save({"state_dict": {"w": torch.zeros(2)}, "meta": {"seed": np.int64(0)}}, other)  # no message hub
    with pytest.raises(CheckpointError, match=r"numpy_meta.pth: refusing to load: it references numpy") as e:
        internvit.load_model(other, "internvit-6b-tiny")
    assert not isinstance(e.value, RunnerCheckpointError)
