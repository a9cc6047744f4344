"""Findings of newcomer trial 10a (segmentation train / test workflows).

A1: ``tools/test.py CONFIG CKPT --cfg-options val_dataloader.dataset.data_root=X`` (or ``val_evaluator...``) on a
config whose ``test_dataloader = val_dataloader`` scored the config's own data set (the test reads only
``test_*``), printed its metrics and exited 0; ``tools/train.py ... test_dataloader.dataset.data_root=X`` validated
on the config's data the same way. Both are now refused at set-up, naming the key to set.
"""
import os

import pytest

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import TOY_LINEAR, toy_options
from .test_trial7b_fixes import _run


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-iteration toy linear run (its checkpoint) and two data sets: the one it trained on and another."""
    from internvit.runner import train
    from segmentation.toy_data import make_toy_seg_dataset

    base = tmp_path_factory.mktemp("toy10a")
    data = make_toy_seg_dataset(str(base / "toy_seg"), num_train=4, num_val=3)
    other = make_toy_seg_dataset(str(base / "other"), num_train=4, num_val=2, seed=1)
    work_dir = str(tmp_path_factory.mktemp("lin10a"))
    train(TOY_LINEAR, work_dir=work_dir, cfg_options=toy_options(data, work_dir, **{
        "train_cfg.max_iters": 2, "train_cfg.val_interval": 1000, "default_hooks.checkpoint.interval": 2}))
    return data, other, os.path.join(work_dir, "iter_2.pth")


def _opts(**options) -> list:
    return ["--cfg-options", "default_hooks.visualization.draw=False", *[f"{k}={v}" for k, v in options.items()]]


def test_a_val_option_of_a_test_is_refused(trained, tmp_path, capsys):
    data, other, ckpt = trained
    work = tmp_path / "t"
    base = {"train_dataloader.dataset.data_root": data}  # the config's test data (data/toy_seg) is not needed
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", work,
                                       *_opts(**base, **{"val_dataloader.dataset.data_root": other})])
    assert rc == 2 and errors == [
        "error: --cfg-options val_dataloader.dataset.data_root: a test evaluates test_dataloader, which this option "
        "leaves as it is (the config gives test_dataloader.dataset.data_root the same value as "
        "val_dataloader.dataset.data_root): set test_dataloader.dataset.data_root instead, or as well"]
    assert not os.path.exists(work)
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", work,
                                       *_opts(**base, **{"val_evaluator.iou_metrics": "[mDice]"})])
    assert rc == 2 and errors and "set test_evaluator.iou_metrics instead" in errors[0]


def test_the_same_option_for_both_splits_tests_the_data_asked_for(trained, tmp_path, capsys):
    data, other, ckpt = trained
    rc, errors = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "t",
                                       *_opts(**{f"{s}_dataloader.dataset.data_root": other for s in ("val", "test")})])
    assert rc == 0 and not errors


def test_a_test_option_of_a_training_run_is_refused(trained, tmp_path, capsys):
    data, other, _ = trained
    work = tmp_path / "w"
    rc, errors = _run(capsys, "train", [TOY_LINEAR, "--work-dir", work, *_opts(**{
        "train_dataloader.dataset.data_root": data, "test_dataloader.dataset.data_root": other,
        "train_cfg.max_iters": 1})])
    assert rc == 2 and errors == [
        "error: --cfg-options test_dataloader.dataset.data_root: training validates on val_dataloader, which this "
        "option leaves as it is (the config gives val_dataloader.dataset.data_root the same value as "
        "test_dataloader.dataset.data_root): set val_dataloader.dataset.data_root instead, or as well"]
    assert not os.path.exists(work)


def test_splits_the_config_sets_apart_take_their_own_options(tmp_path):
    """Where the config gives the two splits different values, an option of the other split is the user's own
    business (it is kept in the run's config copy): not refused."""
    from mmengine.config import Config

    from internvit.run_checks import check_split_options

    cfg = Config(dict(val_dataloader=dict(dataset=dict(data_root="a", split="val")),
                      test_dataloader=dict(dataset=dict(data_root="a", split="test"))))
    check_split_options(cfg, {"val_dataloader.dataset.split": "val2"}, "test")
    with pytest.raises(ValueError, match="set test_dataloader.dataset.data_root instead"):
        check_split_options(cfg, {"val_dataloader.dataset.data_root": "b"}, "test")
    check_split_options(cfg, {"val_dataloader.dataset": dict(data_root="b"), "test_dataloader": {}}, "test")


# ------------------------------------------------------------------------------------------------ A2
def test_show_dir_under_torchrun_is_refused(trained, tmp_path):
    """``torchrun --nproc_per_node 2 tools/test.py ... --show-dir D`` wrote the overlays of rank 0's images only
    (2 of 3), exit 0: mmengine's visualizer draws on rank 0 alone. Refused now, nothing written; ``--out`` alone
    still runs on every rank."""
    import subprocess
    import sys

    from .conftest import ROOT
    from .test_train_reproducible import _free_port

    data, _, ckpt = trained
    tool = os.path.join(ROOT, "tools", "test.py")

    def torchrun(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                               "--master_port", str(_free_port()), tool, TOY_LINEAR, ckpt, "--launcher", "pytorch",
                               *extra, "--cfg-options", f"test_dataloader.dataset.data_root={data}"],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)

    show, work = tmp_path / "show", tmp_path / "w"
    run = torchrun("--work-dir", str(work), "--show-dir", str(show))
    assert run.returncode != 0
    errors = sorted({line for line in run.stderr.splitlines() if line.startswith("error: ")})
    assert errors == [f"error: --show-dir {show}: overlays are drawn by rank 0 only, so the images of the other 1 "
                      f"of 2 processes would get none; run the test with --show-dir in one process (--launcher "
                      f"none), or leave --show-dir out"], run.stderr[-3000:]
    assert not os.path.exists(show)
    out = tmp_path / "out"
    run = torchrun("--work-dir", str(tmp_path / "w2"), "--out", str(out))
    assert run.returncode == 0, run.stderr[-3000:]
    assert sorted(os.listdir(out)) == sorted(os.listdir(os.path.join(data, "images", "validation")))


# ------------------------------------------------------------------------------------------------ A3
def test_a_test_that_fails_midway_removes_the_outputs_it_created(trained, tmp_path, capsys):
    """A label map refused at the 2nd of 3 test images left ``--out`` with the 1st image's prediction and
    ``--show-dir`` with the visualizer's config copy: a partial result, and the rerun on fixed data was refused
    (folder not empty) without ``--overwrite``. The folders the run created are removed now; the work dir's log
    stays, and a folder that existed before the run is left alone."""
    import shutil

    import numpy as np
    from PIL import Image

    data, _, ckpt = trained
    bad = str(tmp_path / "bad")
    shutil.copytree(data, bad)
    folder = os.path.join(bad, "annotations", "validation")
    second = os.path.join(folder, sorted(os.listdir(folder))[1])
    label = np.array(Image.open(second))
    label[0, 0] = 7
    Image.fromarray(label).save(second)
    work = tmp_path / "w"
    argv = [TOY_LINEAR, ckpt, "--work-dir", work, "--out", work / "out", "--show-dir", tmp_path / "show",
            *_opts(**{"test_dataloader.dataset.data_root": bad})]
    rc, errors = _run(capsys, "test", argv)
    assert rc == 2 and errors == [f"error: {second}: label values [7] are neither classes 0..3 nor the ignore "
                                  f"index 255"]
    assert not os.path.exists(work / "out") and not os.path.exists(tmp_path / "show")
    assert [n for n in os.listdir(work) if os.path.isdir(work / n)]  # the run's log folder
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "note.txt").write_text("keep")
    rc, _ = _run(capsys, "test", [TOY_LINEAR, ckpt, "--work-dir", tmp_path / "w2", "--out", mine, "--overwrite",
                                  *_opts(**{"test_dataloader.dataset.data_root": bad})])
    assert rc == 2 and (mine / "note.txt").read_text() == "keep"


# ------------------------------------------------------------------------------------------------ A4
@pytest.mark.parametrize("launcher,variable,how", [
    ("slurm", "SLURM_PROCID", "start the tool with srun"),
    ("mpi", "OMPI_COMM_WORLD_LOCAL_RANK", "start the tool with Open MPI's mpirun, MASTER_ADDR set"),
    ("pytorch", "RANK", "start the tool with torchrun (or tools/dist_train.sh)"),
])
def test_a_launcher_that_did_not_start_the_process_is_named(launcher, variable, how, tmp_path, capsys,
                                                            monkeypatch):
    """``tools/train.py CONFIG --launcher slurm`` outside srun printed ``error: missing key 'SLURM_PROCID'``."""
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "SLURM_PROCID", "OMPI_COMM_WORLD_LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    work = tmp_path / "w"
    rc, errors = _run(capsys, "train", [TOY_LINEAR, "--work-dir", work, "--launcher", launcher])
    assert rc == 2 and errors == [f"error: --launcher {launcher}: the environment variable {variable} is not set: "
                                  f"{how}, or use --launcher none for one process"]
    assert not os.path.exists(work)


# ------------------------------------------------------------------------------------------------ A5
def test_a_test_batch_of_images_of_several_sizes_scores_as_one_image_at_a_time(trained, tmp_path):
    """``test_dataloader.batch_size=3`` on a test set whose images differ in size (ADE20K's do) stopped with
    mmseg's ``AssertionError: The image size in a batch should be the same.`` (a traceback, after the batches
    before). Mixed batches now run one image at a time: the metrics and predictions of ``batch_size=1``."""
    import shutil

    from PIL import Image

    from internvit.runner import test

    data, _, ckpt = trained
    mixed = str(tmp_path / "mixed")
    shutil.copytree(data, mixed)
    for kind, resample in (("images", Image.BILINEAR), ("annotations", Image.NEAREST)):
        folder = os.path.join(mixed, kind, "validation")
        path = os.path.join(folder, sorted(os.listdir(folder))[1])
        Image.open(path).resize((230, 130), resample).save(path)
    results = {}
    for batch in (1, 3):
        out = tmp_path / f"out{batch}"
        results[batch] = test(TOY_LINEAR, ckpt, work_dir=str(tmp_path / f"w{batch}"), out=str(out), cfg_options={
            "test_dataloader.dataset.data_root": mixed, "test_dataloader.batch_size": batch,
            "default_hooks.visualization.draw": False})
        results[batch]["files"] = {n: (out / n).read_bytes() for n in sorted(os.listdir(out))}
    assert len(results[3]["files"]) == 3
    assert results[3] == results[1]


# ------------------------------------------------------------------------------------------------ A6
def test_overwriting_another_test_sets_predictions_names_the_ones_that_stay(trained, tmp_path, capsys):
    """``--out P --overwrite`` on a folder of another test set's predictions replaced the same-named files and
    kept the rest: the folder mixed two runs, silently. A log warning names the files that stay."""
    from .test_trial7b_fixes import _tool

    data, other, ckpt = trained
    out = tmp_path / "preds"
    out.mkdir()
    for name in ("toy_0000.png", "stale_a.png", "stale_b.png"):
        (out / name).write_bytes(b"")
    capsys.readouterr()
    assert _tool("test").main([TOY_LINEAR, ckpt, "--work-dir", str(tmp_path / "w"), "--out", str(out),
                               "--overwrite", *_opts(**{"test_dataloader.dataset.data_root": data})]) == 0
    captured = capsys.readouterr()
    lines = [line for line in (captured.out + captured.err).splitlines() if "not of this test set" in line]
    assert len(lines) == 1 and lines[0].endswith(
        f"--out {out}: 2 prediction file(s) there are not of this test set and stay beside its predictions "
        f"(stale_a.png, stale_b.png): the folder will mix two runs; give an empty folder to keep one run's "
        f"predictions"), lines
