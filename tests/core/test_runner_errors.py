"""tools/train.py, tools/test.py, tools/convert_checkpoint.py and tools/dist_train.sh on bad input: one
``error:`` line naming the file or key, exit status 2, nothing written; a checkpoint that does not fit the
config's model is an error (issue 9)."""
import importlib.util
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

import internvit
from internvit import CheckpointError
from internvit.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLS_TOY = os.path.join(ROOT, "configs", "classification", "toy", "digits_linear_probe.py")
SEG_TOY = os.path.join(ROOT, "configs", "toy", "linear_internvit_tiny_toy.py")


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _fails(name: str, argv: list, capsys, *must: str) -> str:
    """Run a tool in-process the way its ``__main__`` does; expect exit 2 and one ``error:`` line with ``must``."""
    from internvit.cli import UsageError

    capsys.readouterr()
    try:
        user_errors = (UsageError, OSError, ValueError, KeyError) if name == "convert_checkpoint" else (UsageError,)
        rc = run(_tool(name).main, argv, user_errors=user_errors)
    except SystemExit as e:  # argparse
        rc = e.code
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    for text in must:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture
def configs(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("model = dict(type='X'\nx = 1\n")
    no_model = tmp_path / "no_model.py"
    no_model.write_text("x = 1\n")
    no_optim = tmp_path / "no_optim.py"
    no_optim.write_text(f"_base_ = [{CLS_TOY!r}]\noptim_wrapper = None\n")
    return dict(broken=str(broken), no_model=str(no_model), no_optim=str(no_optim))


@pytest.mark.parametrize("tool", ["train", "test"])
def test_config_errors(tool, configs, tmp_path, capsys):
    work = str(tmp_path / "work")
    extra = [str(tmp_path / "x.pth")] if tool == "test" else []
    if tool == "test":
        torch.save({"state_dict": {"w": torch.zeros(1)}}, extra[0])
    common = ["--work-dir", work]
    _fails(tool, [configs["broken"], *extra, *common], capsys, configs["broken"], "syntax error", "line 1")
    _fails(tool, [configs["no_model"], *extra, *common], capsys, configs["no_model"], "'model'")
    missing = str(tmp_path / "nope.py")
    _fails(tool, [missing, *extra, *common], capsys, missing)
    _fails(tool, [CLS_TOY, *extra, "--launcher", "foo"], capsys, "--launcher")
    _fails(tool, [CLS_TOY, *extra, "--local_rank", "-1"], capsys, "--local_rank")
    _fails(tool, [CLS_TOY, *extra, "--cfg-options", "foo"], capsys, "--cfg-options", "'foo'")
    if tool == "train":
        _fails(tool, [configs["no_optim"], *common], capsys, "optim_wrapper")
        _fails(tool, [CLS_TOY, "--resume", str(tmp_path / "none.pth"), *common], capsys, "none.pth")
        _fails(tool, [CLS_TOY, *common, "--cfg-options", f"load_from={tmp_path / 'none.pth'}"], capsys, "none.pth")
    else:
        _fails(tool, [CLS_TOY, str(tmp_path / "none.pth"), *common], capsys, "none.pth")
        _fails(tool, [CLS_TOY, *extra, *common, "--out", str(tmp_path / "preds.json")], capsys, "preds.json")
    assert not os.path.exists(work)


def _probe_state_dict(**head) -> dict:
    """The linear-probe toy model's own state dict (what its training run saves)."""
    from mmengine.registry import DefaultScope

    from classification import MODELS
    from internvit.runner import load_config

    cfg = load_config(CLS_TOY)
    cfg.model.update(head)
    # the config's own scope: whatever scope an earlier Runner in this process left current (mmengine's, after
    # some tests) would send the build to that scope's registry
    with DefaultScope.overwrite_default_scope(cfg.default_scope):
        return MODELS.build(cfg.model).state_dict()


@pytest.fixture(scope="module")
def toy_digits_root(tmp_path_factory) -> str:
    """A folder holding ``data/toy_digits`` (the toy configs' relative data_root), generated once."""
    from classification.datasets import make_toy_digits

    root = tmp_path_factory.mktemp("runner_errors")
    make_toy_digits(str(root / "data" / "toy_digits"))
    return str(root)


def _two_class_data(root: str, dest, per_class: int = 4) -> None:
    """Classes 0 and 1 of the toy digits, ``per_class`` images of each split."""
    for split in ("train", "val"):
        for c in ("0", "1"):
            (dest / split / c).mkdir(parents=True)
            src = os.path.join(root, "data", "toy_digits", split, c)
            for name in sorted(os.listdir(src))[:per_class]:
                shutil.copy(os.path.join(src, name), dest / split / c / name)


def test_checkpoint_of_another_model_is_an_error(tmp_path, capsys, monkeypatch, toy_digits_root):
    monkeypatch.chdir(toy_digits_root)  # the toy config reads data/toy_digits relative to the working folder
    """tools/test.py and load_from with a checkpoint that does not fit: one line naming the keys, nothing left
    in a work dir the tool created; a fitting one builds."""
    from internvit.runner import build_test_runner

    work = str(tmp_path / "runs" / "work")  # its parent does not exist either: the Runner makes both
    good = str(tmp_path / "good.pth")
    torch.save({"meta": {"epoch": 10}, "state_dict": _probe_state_dict()}, good)
    other = str(tmp_path / "other.pth")  # a segmentor's keys
    torch.save({"state_dict": {"backbone.embeddings.class_embedding": torch.zeros(1, 1, 64),
                               "decode_head.conv_seg.weight": torch.zeros(4, 64, 1, 1)}}, other)
    fewer_classes = str(tmp_path / "five_classes.pth")
    torch.save({"state_dict": _probe_state_dict(head=dict(type="ClsPatchConcatHead", num_classes=5))},
               fewer_classes)

    line = _fails("test", [CLS_TOY, other, "--work-dir", work], capsys, other, "does not fit",
                  "missing keys: ", "unexpected keys: decode_head.conv_seg.weight")
    assert "head." in line
    _fails("test", [CLS_TOY, fewer_classes, "--work-dir", work], capsys, "mis-shaped keys: head.",
           "checkpoint [5")
    _fails("train", [CLS_TOY, "--work-dir", work, "--cfg-options", f"load_from={other}"], capsys, "does not fit")
    _fails("train", [CLS_TOY, "--work-dir", work, "--resume", fewer_classes], capsys, "mis-shaped keys")
    # the runner's log folder, the work dir it created and the parent it created are gone again
    assert not os.path.exists(tmp_path / "runs")

    runner = build_test_runner(CLS_TOY, good, work_dir=work)  # a fitting checkpoint builds
    assert runner.model is not None
    with pytest.raises(CheckpointError, match="does not fit"):
        build_test_runner(CLS_TOY, other, work_dir=work)
    assert sorted(os.listdir(work)) == sorted([runner.timestamp, "digits_linear_probe.py"])  # the first runner's


def _corrupt_inputs(tmp_path, vit_fixture) -> dict:
    st = open(os.path.join(vit_fixture, "model.safetensors"), "rb").read()
    pth = open(os.path.join(vit_fixture, "original_format.pth"), "rb").read()
    files = {
        "random.pth": os.urandom(2000),
        "empty.pth": b"",
        "truncated.pth": pth[: len(pth) // 2],
        "truncated.safetensors": st[: len(st) - 100],
        "header.safetensors": b"\xff" * 8 + b"{}",
    }
    out = {}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
        out[name] = str(tmp_path / name)
    head = tmp_path / "head.pth"  # wrong family: a probe head, not an InternViT
    torch.save({"model": {"head.weight": torch.zeros(10, 64), "head.bias": torch.zeros(10)}}, head)
    out["head.pth"] = str(head)
    out["missing.pth"] = str(tmp_path / "missing.pth")
    return out


@pytest.mark.parametrize("command", ["to-hf", "to-original", "mmseg0x"])
def test_convert_bad_inputs(command, tmp_path, capsys, vit_fixture):
    inputs = _corrupt_inputs(tmp_path, vit_fixture)
    for name, src in inputs.items():
        dst = str(tmp_path / f"out-{command}-{name}" / ("dst" if command == "to-hf" else "dst.pth"))
        extra = ["--config", "internvit-6b-tiny"] if command != "mmseg0x" and "head" not in name else []
        _fails("convert_checkpoint", [command, src, dst, *extra], capsys, src)
        assert not os.path.exists(os.path.dirname(dst)), name  # nothing written, not even the folder


def test_convert_does_not_overwrite(tmp_path, capsys, vit_fixture):
    dst = tmp_path / "existing.pth"
    dst.write_bytes(b"mine")
    _fails("convert_checkpoint", ["to-original", vit_fixture, str(dst)], capsys, str(dst), "--overwrite")
    assert dst.read_bytes() == b"mine"
    assert run(_tool("convert_checkpoint").main, ["to-original", vit_fixture, str(dst), "--overwrite"]) == 0
    sd = torch.load(dst, weights_only=True)["module"]
    assert "cls_token" in sd and not any(f.name.startswith(".existing") for f in tmp_path.iterdir())
    model = internvit.load_model(str(dst), "internvit-6b-tiny")
    assert model.load_report.family == "original"


@pytest.mark.skipif(not os.path.isfile(os.path.join(ROOT, ".venv", "bin", "python")), reason="no .venv")
def test_dist_train_finds_the_venv_python(tmp_path):
    """With no python on PATH and PYTHON unset, tools/dist_train.sh uses the repository's .venv."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHON", "VIRTUAL_ENV")}
    env.update(PATH=os.pathsep.join(p for p in ("/usr/bin", "/bin") if os.path.isdir(p)), PORT=str(port),
               OMP_NUM_THREADS="1")
    assert shutil.which("python", path=env["PATH"]) is None or subprocess.run(
        ["python", "-c", "import torch"], env=env, capture_output=True).returncode != 0  # no usable python on PATH
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "dist_train.sh"), CLS_TOY, "1", "--help"], env=env,
                          cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "--resume" in proc.stdout
    bad = subprocess.run(["bash", os.path.join(ROOT, "tools", "dist_train.sh")], env=env, capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("error: usage")


def test_more_dataset_classes_than_the_head_is_an_error(tmp_path, capsys, toy_digits_root):
    """A test set with classes the head cannot predict used to be scored (accuracy against a model that
    cannot be right; training failed mid-epoch): a set-up error naming both counts, for test and train."""
    data = tmp_path / "digits12"
    shutil.copytree(os.path.join(toy_digits_root, "data", "toy_digits"), data)
    for split in ("train", "val"):
        some = sorted((data / split / "0").iterdir())[0]
        for extra in ("x_extra", "y_extra"):
            (data / split / extra).mkdir()
            shutil.copy(some, data / split / extra / some.name)
    good = str(tmp_path / "good.pth")
    torch.save({"state_dict": _probe_state_dict()}, good)
    work = str(tmp_path / "work")
    roots = [f"{s}_dataloader.dataset.data_root={data}" for s in ("train", "val", "test")]
    must = ("the dataset has 12 classes but model.head.num_classes is 10",)
    _fails("test", [CLS_TOY, good, "--work-dir", work, "--cfg-options", *roots], capsys, "test_dataloader", *must)
    _fails("train", [CLS_TOY, "--work-dir", work, "--cfg-options", *roots], capsys, "train_dataloader", *must)
    assert not os.path.exists(work)


def test_a_split_without_a_class_folder_is_an_error(tmp_path, capsys, toy_digits_root):
    """Each split numbers its classes from its own folders: a val/test split without folder '0' labelled '1'
    as 0 (accuracy 0.93 % instead of 86.9 %, silently). Its class list must be the other splits' and the
    checkpoint's (meta.dataset_meta, written by tools/train.py)."""
    data = tmp_path / "digits"
    shutil.copytree(os.path.join(toy_digits_root, "data", "toy_digits"), data)
    shutil.rmtree(data / "val" / "0")
    full = os.path.join(toy_digits_root, "data", "toy_digits")
    classes = tuple(str(c) for c in range(10))
    ckpt = str(tmp_path / "probe.pth")
    torch.save({"meta": {"dataset_meta": {"classes": classes}}, "state_dict": _probe_state_dict()}, ckpt)
    work = str(tmp_path / "work")
    test_root = [f"test_dataloader.dataset.data_root={data}"]
    _fails("test", [CLS_TOY, ckpt, "--work-dir", work, "--cfg-options", *test_root], capsys,
           f"checkpoint {ckpt} (its dataset_meta): its classes differ from those of test_dataloader",
           "10 vs 9 classes, label 0 is '0' here and '1' there")
    roots = [f"train_dataloader.dataset.data_root={full}", f"val_dataloader.dataset.data_root={data}"]
    _fails("train", [CLS_TOY, "--work-dir", work, "--cfg-options", *roots], capsys,
           "val_dataloader: its classes differ from those of train_dataloader", "9 vs 10 classes",
           "label 0 is '1' here and '0' there (no '0' here)")
    assert not os.path.exists(work)
    from internvit.runner import build_test_runner  # the same classes: builds

    assert build_test_runner(CLS_TOY, ckpt, work_dir=work, cfg_options={
        "test_dataloader.dataset.data_root": full}).model is not None


def test_an_unreadable_image_met_while_training_is_one_line(tmp_path, capsys, toy_digits_root):
    """Bad input data found mid-run (a file that is not an image) is one error line naming the file, exit 2,
    also when a DataLoader worker met it (its message arrives wrapped in the worker's traceback)."""
    from torch.utils.data import DataLoader

    from classification.datasets import ImageFolderDataset
    from internvit.cli import one_line
    from internvit.data import DataError

    data = tmp_path / "two"
    _two_class_data(toy_digits_root, data, per_class=2)
    bad = data / "train" / "1" / "zz_bad.png"
    bad.write_bytes(b"garbage\n")
    ds = ImageFolderDataset(str(data), split="train", transform=dict(image_size=28))
    for workers in (0, 1):
        with pytest.raises(DataError) as e:
            list(DataLoader(ds, batch_size=2, num_workers=workers))
        assert one_line(e.value).startswith(f"{bad}: cannot read image (UnidentifiedImageError"), one_line(e.value)
    roots = [f"{s}_dataloader.dataset.data_root={data}" for s in ("train", "val", "test")]
    # a fresh process, as a user runs it (a training run in this process would log through the handlers that
    # earlier tests' runners bound to their captured, now closed, streams)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), CLS_TOY, "--work-dir",
                           str(tmp_path / "work"), "--cfg-options", *roots, "train_cfg.max_epochs=1",
                           "train_dataloader.batch_size=2", "model.head.num_classes=2"],
                          capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and errors == [f"error: {bad}: cannot read image (UnidentifiedImageError: cannot "
                                               f"identify image file {str(bad)!r})"], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_safetensors_file_as_the_checkpoint_is_named_as_such(tmp_path, capsys, vit_fixture):
    st = os.path.join(vit_fixture, "model.safetensors")
    _fails("test", [CLS_TOY, st, "--work-dir", str(tmp_path / "w")], capsys,
           f"{st}: a safetensors file, not a torch checkpoint")  # was: "opcode b'\\xe0' unknown"


def test_a_work_dir_holding_the_config_itself_is_refused(tmp_path, capsys):
    """--work-dir the config's own folder: the Runner's flattened dump replaced the user's config."""
    mine = tmp_path / "cfgs"
    mine.mkdir()
    shutil.copy(CLS_TOY, mine / "probe.py")
    text = (mine / "probe.py").read_text()
    (tmp_path / "ckpt.pth").write_bytes(b"")
    for tool, extra in (("train", []), ("test", [str(tmp_path / "ckpt.pth")])):
        _fails(tool, [str(mine / "probe.py"), *extra, "--work-dir", str(mine)], capsys,
               "holds the config", "itself")
    assert (mine / "probe.py").read_text() == text and sorted(os.listdir(mine)) == ["probe.py"]


def test_a_test_mode_mmseg_does_not_know_is_a_setup_error(tmp_path, capsys):
    """model.test_cfg.mode=sliding was an AssertionError traceback at the first test batch."""
    _fails("train", [SEG_TOY, "--work-dir", str(tmp_path / "w"), "--cfg-options", "model.test_cfg.mode=sliding"],
           capsys, "model.test_cfg.mode must be 'whole' or 'slide', got 'sliding'")
    folder = tmp_path / "ckpt_dir"
    folder.mkdir()
    _fails("test", [SEG_TOY, str(folder), "--work-dir", str(tmp_path / "w")], capsys,
           f"{folder}: a folder, not a checkpoint file")
    assert not (tmp_path / "w").exists()


def test_an_empty_work_dir_or_a_folder_as_the_checkpoint_is_refused(tmp_path, capsys, monkeypatch):
    """--cfg-options work_dir= trained into the current folder; --resume FOLDER said 'no such checkpoint'."""
    monkeypatch.chdir(tmp_path)
    for value in ("", " "):
        _fails("train", [CLS_TOY, "--cfg-options", f"work_dir={value}"], capsys, "work_dir must be a folder path")
    assert os.listdir(tmp_path) == []
    folder = tmp_path / "ckpts"
    folder.mkdir()
    _fails("train", [CLS_TOY, "--work-dir", str(tmp_path / "w"), "--resume", str(folder)], capsys,
           f"--resume {folder}: a folder, not a checkpoint file")
    _fails("train", [CLS_TOY, "--work-dir", str(tmp_path / "w"), "--cfg-options", f"load_from={folder}"], capsys,
           f"{folder}: a folder, not a checkpoint file")
    assert sorted(os.listdir(tmp_path)) == ["ckpts"]


@pytest.mark.parametrize("option,must", [
    ("train_cfgs.max_epochs=1", "no key 'train_cfgs' and the runner reads none (did you mean 'train_cfg'?)"),
    ("val_evalutor.topk=1", "did you mean 'val_evaluator'?"),
    ("train_cfg.max_epoch=1", "unexpected keyword argument 'max_epoch'"),
    ("train_cfg.max_epochs=0", "train_cfg.max_epochs=0: nothing to train"),
    ("train_cfg.max_epochs=-1", "train_cfg.max_epochs=-1: nothing to train"),
    ("train_cfg.max_epochs=1.5", "train_cfg.max_epochs=1.5: must be an integer"),
    ("train_dataloader.batch_size=5000", "is the batch larger than the dataset with drop_last?): nothing to train"),
    ("train_cfg.val_interval=0", "train_cfg.val_interval=0: must be 1 or more"),
    ("model.head.num_classes=0", "the dataset has 10 classes but model.head.num_classes is 0"),
    ("train_cfg.val_interval=1.5", "train_cfg.val_interval=1.5: must be an integer"),
    ("train_cfg.val_interval=nan", "train_cfg.val_interval=nan: must be an integer"),
    ("train_cfg.max_epochs=True", "train_cfg.max_epochs=True: must be an integer"),
    ("randomness.seed=abc", "randomness.seed must be an integer from 0 to 2**32 - 1 (or None), got 'abc'"),
    ("randomness.seed=-1", "randomness.seed must be an integer"),
    ("data_root=elsewhere", "'data_root' is a variable of the config file, already substituted where the file uses "
                            "it, so setting it here would change nothing; set the keys that use it instead: "
                            "train_dataloader.dataset.data_root, val_dataloader.dataset.data_root, "
                            "test_dataloader.dataset.data_root"),
    ("backbone.arch.image_size=112", "'backbone' is a variable of the config file, already substituted where the "
                                     "file uses it, so setting it here would change nothing; set the keys that "
                                     "use it instead: model.backbone"),
    ("train_images.split=val", "set the keys that use it instead (keys holding the same value: "
                               "train_dataloader.dataset)"),
])
def test_training_settings_that_fail_later_or_train_nothing_are_setup_errors(option, must, tmp_path, capsys,
                                                                           monkeypatch, toy_digits_root):
    """A misspelt top-level --cfg-options key was added silently (the full schedule trained); loop arguments
    failed with tracebacks when training started (a typo, a float epoch count, an empty epoch), after an epoch
    (val_interval=0: ZeroDivisionError) or mid-epoch (num_classes=0); max_epochs=0 exited 0 having done
    nothing. Now each is one error line at set-up, and the work dir is not created."""
    monkeypatch.chdir(toy_digits_root)
    work = str(tmp_path / "work")
    _fails("train", [CLS_TOY, "--work-dir", work, "--cfg-options", option], capsys, must)
    assert not os.path.exists(work)


def test_resuming_a_finished_run_is_refused_and_a_refused_run_keeps_the_config_copy(tmp_path, capsys, monkeypatch,
                                                                                  toy_digits_root):
    """--resume from a checkpoint past the config's last epoch exited 0 having trained nothing (one at the last
    epoch exactly is a run killed after its last checkpoint: resumed to finish, see test_faults_training); a
    refused run rewrote the config copy of the earlier run in the work dir (it then described the refused settings)."""
    monkeypatch.chdir(toy_digits_root)
    classes = tuple(str(c) for c in range(10))
    done = str(tmp_path / "epoch_2.pth")
    torch.save({"meta": {"epoch": 2, "iter": 90, "dataset_meta": {"classes": classes}},
                "state_dict": _probe_state_dict()}, done)
    work = tmp_path / "work"
    work.mkdir()
    (work / "digits_linear_probe.py").write_text("# the copy an earlier run left\n")
    _fails("train", [CLS_TOY, "--work-dir", str(work), "--resume", done, "--cfg-options", "train_cfg.max_epochs=1"],
           capsys, "the checkpoint to resume is at epoch 2 and the config trains to epoch 1: nothing left to train")
    assert sorted(os.listdir(work)) == ["digits_linear_probe.py"]
    assert (work / "digits_linear_probe.py").read_text() == "# the copy an earlier run left\n"
    other = str(tmp_path / "other.pth")  # refused for another reason (does not fit): the copy is kept too
    torch.save({"state_dict": {"decode_head.conv_seg.weight": torch.zeros(4, 64, 1, 1)}}, other)
    _fails("train", [CLS_TOY, "--work-dir", str(work), "--resume", other], capsys, "does not fit")
    assert (work / "digits_linear_probe.py").read_text() == "# the copy an earlier run left\n"




def test_a_nan_loss_or_output_stops_the_run_with_one_line(tmp_path, toy_digits_root):
    """A NaN learning rate trained on (loss: nan), saved NaN checkpoints and printed an accuracy, exit 0; a
    checkpoint with NaN weights was tested to an accuracy (a NaN score argmaxes to class 0). Now the run
    stops at the first NaN loss before a checkpoint of it is saved, and testing refuses non-finite outputs.
    (A NaN lr is refused at set-up now, trial8b F8: a finite lr of 1e30 diverges the same way.)"""
    data = tmp_path / "two"
    _two_class_data(toy_digits_root, data)
    roots = [f"{s}_dataloader.dataset.data_root={data}" for s in ("train", "val", "test")]
    small = [*roots, "train_dataloader.batch_size=2", "model.head.num_classes=2"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    work = tmp_path / "work"
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "train.py"), CLS_TOY, "--work-dir", str(work),
                           "--cfg-options", *small, "train_cfg.max_epochs=2", "optim_wrapper.optimizer.lr=1e30",
                           "default_hooks.checkpoint.interval=1"],
                          capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "training diverged: loss is nan at iteration 2" in errors[0], \
        proc.stderr[-2000:]
    assert not [n for n in os.listdir(work) if n.endswith(".pth")]  # no checkpoint of NaN weights
    sd = _probe_state_dict(head=dict(type="ClsPatchConcatHead", num_classes=2))
    sd = {k: torch.full_like(v, float("nan")) if k.startswith("head.") and v.is_floating_point() else v
          for k, v in sd.items()}
    nan_ckpt = str(tmp_path / "nan.pth")
    torch.save({"meta": {"dataset_meta": {"classes": ("0", "1")}}, "state_dict": sd}, nan_ckpt)
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "test.py"), CLS_TOY, nan_ckpt, "--work-dir",
                           str(tmp_path / "w2"), "--cfg-options", *small],
                          capture_output=True, text=True, env=env, timeout=600)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-2000:]
    assert "test: the model's output pred_score is not finite (NaN/inf) for " in errors[0], errors
    assert "accuracy" not in proc.stdout


@pytest.mark.parametrize("argv,must", [
    (["to-hf", "orig.pth", ""], "argument dst: empty value ''"),
    (["to-hf", "", "x"], "argument src: empty value ''"),
    (["mmseg0x", "orig.pth", " "], "argument dst: empty value ' '"),
])
def test_convert_empty_paths_name_the_argument(argv, must, tmp_path, capsys, monkeypatch):
    """An empty path after a sub-command was blamed on the sub-command ("argument command: empty value")."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "orig.pth").write_bytes(b"")
    _fails("convert_checkpoint", argv, capsys, must)
    assert os.listdir(tmp_path) == ["orig.pth"]


def test_a_checkpoint_tensor_of_another_dtype_kind_is_named(tmp_path, capsys):
    """An integer or bool tensor where the model has a float weight reached nn.Parameter ("Only Tensors of
    floating point and complex dtype can require gradients": a traceback from convert_checkpoint, a bare
    RuntimeError from load_model): a CheckpointError naming the file, the key and both dtypes."""
    from safetensors.torch import save_file

    model = internvit.load_model("internvit-6b-tiny")
    sd = {k: v.contiguous() for k, v in model.state_dict().items()}
    pth = str(tmp_path / "v_int.pth")
    torch.save(dict(sd, **{"embeddings.class_embedding": sd["embeddings.class_embedding"].long()}), pth)
    st = str(tmp_path / "v_bool.safetensors")
    save_file(dict(sd, **{"encoder.layers.0.ls1": sd["encoder.layers.0.ls1"].bool()}), st)
    with pytest.raises(CheckpointError, match=r"v_int.pth: embeddings.class_embedding has dtype int64, the model "
                                              r"expects floating point"):
        internvit.load_model(pth, "internvit-6b-tiny")
    with pytest.raises(CheckpointError, match=r"encoder.layers.0.ls1 has dtype bool"):
        internvit.load_model(st, "internvit-6b-tiny", dtype=torch.bfloat16)
    dst = str(tmp_path / "hf")
    _fails("convert_checkpoint", ["to-hf", pth, dst, "--config", "internvit-6b-tiny"], capsys,
           "embeddings.class_embedding has dtype int64")
    assert not os.path.exists(dst)


def test_model_inputs_off_the_patch_grid_and_absurd_float_config_values_are_refused():
    """model(x) with 50x56 px dropped the last 8 pixel rows silently (13x13: a raw conv error); a NaN
    layer_norm_eps was accepted and made every feature NaN."""
    from internvit.config import InternViTConfig

    model = internvit.load_model("internvit-6b-tiny")
    for shape in ((1, 3, 50, 56), (1, 3, 13, 13), (3, 56, 56), (1, 4, 56, 56)):
        with pytest.raises(ValueError, match=rf"pixel_values of shape \({', '.join(map(str, shape))}\): expected "
                                             r"\(B, 3, H, W\) with H and W positive multiples of the patch size 14"):
            model(torch.zeros(shape))
    assert model(torch.zeros(1, 3, 28, 42)).last_hidden_state.shape == (1, 7, 64)
    for field, value, must in (("layer_norm_eps", float("nan"), r"in \(0.0, 1.0\), got nan"),
                               ("layer_norm_eps", 0.0, "got 0.0"), ("drop_path_rate", 1.0, r"in \[0.0, 1.0\)"),
                               ("initializer_range", float("inf"), ", got inf"),
                               ("layer_norm_eps", True, "got True")):
        with pytest.raises(ValueError, match=rf"config: {field} must be a finite number.*{must}"):
            InternViTConfig(**{field: value})


def test_special_files_and_suffixless_destinations_are_named(tmp_path, capsys, vit_fixture):
    """A fifo or a device symlinked as a weight file was "no such weight file" (it exists); a folder given to
    mmseg0x was "no such checkpoint file"; to-original wrote a file without a weight suffix that load_model
    then refused."""
    fifo = str(tmp_path / "fifo.pth")
    os.mkfifo(fifo)
    dev = str(tmp_path / "zero.safetensors")
    os.symlink("/dev/zero", dev)
    for path in (fifo, dev):
        with pytest.raises(CheckpointError, match="not a regular file"):
            internvit.load_model(path, "internvit-6b-tiny")
    _fails("convert_checkpoint", ["mmseg0x", str(tmp_path), str(tmp_path / "x.pth")], capsys,
           f"{tmp_path}: a folder, not a checkpoint file")
    _fails("convert_checkpoint", ["mmseg0x", fifo, str(tmp_path / "x.pth")], capsys, "not a regular file")
    _fails("convert_checkpoint", ["to-original", vit_fixture, str(tmp_path / "noext")], capsys,
           "noext: the destination needs a weight-file suffix")
    assert not os.path.exists(tmp_path / "noext") and not os.path.exists(tmp_path / "x.pth")


@pytest.mark.parametrize("option,must", [
    ("test_evaluator.topk=0", "Accuracy: topk must be a positive integer"),
    ("test_cfg.fp17=True", "unexpected keyword argument 'fp17'"),
])
def test_test_loop_arguments_are_setup_errors(option, must, tmp_path, capsys, monkeypatch, toy_digits_root):
    """The test loop and its evaluator were built when testing started: a bad argument was a traceback."""
    monkeypatch.chdir(toy_digits_root)
    good = str(tmp_path / "good.pth")
    torch.save({"meta": {"dataset_meta": {"classes": tuple(str(c) for c in range(10))}},
                "state_dict": _probe_state_dict()}, good)
    work = str(tmp_path / "work")
    _fails("test", [CLS_TOY, good, "--work-dir", work, "--cfg-options", option], capsys, must)
    assert not os.path.exists(work)


@pytest.mark.parametrize("to", ["to-hf", "to-original"])
def test_converting_nan_or_inf_weights_is_refused(to, tmp_path, capsys):
    """convert_checkpoint wrote NaN / inf weights into the converted copy, exit 0."""
    model = internvit.load_model("internvit-6b-tiny")
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    sd["encoder.layers.0.mlp.fc1.weight"][0, 0] = float("nan")
    sd["embeddings.position_embedding"][0, 0, 0] = float("inf")
    src = str(tmp_path / "damaged.pth")
    torch.save(sd, src)
    dst = str(tmp_path / ("hf" if to == "to-hf" else "o.pth"))
    _fails("convert_checkpoint", [to, src, dst, "--config", "internvit-6b-tiny"], capsys,
           "holds NaN or infinite values")
    assert not os.path.exists(dst)
