"""End to end on the toy dataset through internvit.runner (the code behind tools/train.py and tools/test.py):
real learning, overlays, resume, frozen backbone, few-shot list, MMSegInferencer."""
import glob
import os
import shutil

import pytest
import torch
from mmengine.hooks import Hook
from mmengine.registry import HOOKS

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import TOY_LINEAR, TOY_UPER, toy_options

ITERS = 40


@HOOKS.register_module(force=True)
class RecordTrainItersHook(Hook):
    """Records the iteration index each training step starts at (to check where a resumed run continues)."""

    seen: list = []

    def before_train_iter(self, runner, batch_idx, data_batch=None):
        RecordTrainItersHook.seen.append(runner.iter)


@HOOKS.register_module(force=True)
class SnapshotBeforeTrainHook(Hook):
    """Keeps a copy of the model's weights as training starts (after init_weights / loading)."""

    state: dict = {}

    def before_train(self, runner):
        SnapshotBeforeTrainHook.state = {k: v.clone() for k, v in runner.model.state_dict().items()}


@pytest.fixture(scope="module")
def uper_run(toy_data, tmp_path_factory):
    from internvit.runner import train

    work_dir = str(tmp_path_factory.mktemp("uper"))
    opts = toy_options(toy_data, work_dir, **{"train_cfg.max_iters": ITERS, "train_cfg.val_interval": 1000,
                                              "default_hooks.checkpoint.interval": ITERS})
    train(TOY_UPER, work_dir=work_dir, cfg_options=opts)
    return work_dir, opts


def test_toy_upernet_learns_and_writes_overlays(uper_run, toy_data):
    from internvit.runner import test

    work_dir, opts = uper_run
    ckpt = os.path.join(work_dir, f"iter_{ITERS}.pth")
    show = os.path.join(work_dir, "show")
    metrics = test(TOY_UPER, ckpt, work_dir=work_dir, show_dir=show, out=os.path.join(work_dir, "preds"),
                   cfg_options=opts)
    # 4 classes, background-heavy: predicting background everywhere scores mIoU ~ 20 (percent)
    assert metrics["mIoU"] >= 60.0, metrics
    assert len(glob.glob(os.path.join(show, "**", "*.png"), recursive=True)) == 8
    assert len(glob.glob(os.path.join(work_dir, "preds", "*.png"))) == 8


def test_test_outputs_never_replace_files_they_did_not_write(uper_run, toy_data, tmp_path):
    """--out pointed at the annotation folder replaced the ground truth with the predictions (the next test
    scored mIoU 100); a user's file in --out / --show-dir, an existing --out file, and two test images of one
    name (one prediction file) are refused at set-up; --overwrite lets an output folder be reused."""
    from internvit.runner import test

    work_dir, opts = uper_run
    ckpt = os.path.join(work_dir, f"iter_{ITERS}.pth")
    ann = os.path.join(toy_data, "annotations", "validation")
    before = {n: open(os.path.join(ann, n), "rb").read() for n in os.listdir(ann)}
    for kw in (dict(out=ann), dict(show_dir=ann), dict(out=os.path.join(ann, sorted(before)[0]))):
        with pytest.raises(ValueError, match="not empty|not a folder"):
            test(TOY_UPER, ckpt, work_dir=str(tmp_path / "w"), cfg_options=opts, **kw)
    # with --overwrite as well: the test set's own folders are never an output (the next test scored mIoU 100;
    # overlays written among the images became test images)
    for kw in (dict(out=ann), dict(show_dir=os.path.join(toy_data, "images", "validation", "vis"))):
        with pytest.raises(ValueError, match="inside the test set's data folder"):
            test(TOY_UPER, ckpt, work_dir=str(tmp_path / "w"), cfg_options=opts, overwrite=True, **kw)
    assert not os.path.exists(os.path.join(toy_data, "images", "validation", "vis"))
    assert {n: open(os.path.join(ann, n), "rb").read() for n in os.listdir(ann)} == before
    assert not os.path.exists(tmp_path / "w")
    mine = tmp_path / "preds"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        test(TOY_UPER, ckpt, work_dir=str(tmp_path / "w"), cfg_options=opts, out=str(mine))
    test(TOY_UPER, ckpt, work_dir=str(tmp_path / "w"), cfg_options=opts, out=str(mine), overwrite=True)
    assert len(os.listdir(mine)) == 9 and (mine / "notes.txt").read_text() == "mine"
    # a/x.png and b/x.png: one prediction file for two images
    twin = tmp_path / "twin"
    for kind in ("images", "annotations"):
        src = os.path.join(toy_data, kind, "validation")
        name = sorted(os.listdir(src))[0]
        for sub in ("a", "b"):
            os.makedirs(twin / kind / "validation" / sub)
            shutil.copy(os.path.join(src, name), twin / kind / "validation" / sub / name)
    twin_opts = dict(opts, **{"test_dataloader.dataset.data_root": str(twin)})
    with pytest.raises(ValueError, match=f"have the same name {os.path.splitext(name)[0]!r}"):
        test(TOY_UPER, ckpt, work_dir=str(tmp_path / "w2"), cfg_options=twin_opts, out=str(tmp_path / "o2"),
             show_dir=str(tmp_path / "s2" / "sub"))
    assert not os.path.exists(tmp_path / "o2") and not os.path.exists(tmp_path / "s2")  # the visualizer made s2


def test_resume_continues_iteration_count(uper_run):
    from internvit.runner import train

    work_dir, opts = uper_run
    RecordTrainItersHook.seen.clear()
    opts = dict(opts, **{"train_cfg.max_iters": ITERS + 2, "custom_hooks": [dict(type="RecordTrainItersHook")]})
    runner = train(TOY_UPER, work_dir=work_dir, cfg_options=opts, resume="auto")
    assert RecordTrainItersHook.seen == [ITERS, ITERS + 1]
    assert runner.iter == ITERS + 2 and os.path.isfile(os.path.join(work_dir, f"iter_{ITERS + 2}.pth"))


def test_frozen_backbone_unchanged_and_few_shot_list(toy_data, tmp_path):
    from internvit.runner import train
    from segmentation.few_shot import SUBSET_LIST_NAME

    opts = toy_options(toy_data, str(tmp_path), **{
        "train_cfg.max_iters": 3, "train_cfg.val_interval": 1000, "default_hooks.checkpoint.interval": 1000,
        "model.backbone.freeze_vit": True, "train_dataloader.dataset.type": "FewShotSegDataset",
        "train_dataloader.dataset.subset_divisor": 4, "train_dataloader.dataset.subset_seed": 3,
        "custom_hooks": [dict(type="SaveSubsetListHook"), dict(type="SnapshotBeforeTrainHook")]})
    runner = train(TOY_LINEAR, work_dir=str(tmp_path), cfg_options=opts)
    model, before = runner.model, SnapshotBeforeTrainHook.state
    assert all(not p.requires_grad and p.grad is None for p in model.backbone.parameters())
    for k, v in model.backbone.state_dict().items():
        assert torch.equal(v, before[f"backbone.{k}"]), k
    for k in ("decode_head.conv_seg.weight", "decode_head.norm.weight"):  # the head did train
        assert not torch.equal(model.state_dict()[k], before[k]), k
    listed = (tmp_path / SUBSET_LIST_NAME).read_text().split()
    assert len(listed) == 48 // 4 and listed == runner.train_dataloader.dataset.subset_files


def test_mmseg_inferencer_with_our_config_and_checkpoint(uper_run, toy_data, tmp_path):
    from mmseg.apis import MMSegInferencer

    from internvit import compat

    work_dir, _ = uper_run
    with compat.safe_checkpoint_loading():  # a Runner checkpoint (message hub, numpy values): read without code
        inferencer = MMSegInferencer(model=TOY_UPER, weights=os.path.join(work_dir, f"iter_{ITERS}.pth"),
                                     device="cpu")
    image = os.path.join(toy_data, "images", "validation", "toy_0000.png")
    result = inferencer(image, out_dir=str(tmp_path / "vis"), return_datasamples=True)
    assert result.pred_sem_seg.data.shape[-2:] == (120, 150)
    pngs = glob.glob(str(tmp_path / "vis" / "**" / "*.png"), recursive=True)
    assert pngs, "no overlay written"


def test_fsdp_config_tests_in_one_process_with_launcher_none(uper_run):
    """tools/test.py --launcher none on a FlexibleRunner + FSDPStrategy config: a plain Runner evaluates."""
    from mmengine.config import Config
    from mmengine.runner import FlexibleRunner

    from internvit.runner import build_test_runner

    from .conftest import ROOT

    work_dir, opts = uper_run
    fsdp = Config.fromfile(os.path.join(ROOT, "configs", "segmentation", "_base_", "fsdp_bf16.py"))
    opts = dict(opts, runner_type=fsdp.runner_type, strategy=fsdp.strategy.to_dict())
    runner = build_test_runner(TOY_UPER, os.path.join(work_dir, f"iter_{ITERS}.pth"), work_dir=work_dir,
                               cfg_options=opts)
    assert not isinstance(runner, FlexibleRunner)
    assert runner.test()["mIoU"] >= 60.0


def test_tools_train_reports_config_errors_but_not_runtime_errors(uper_run, monkeypatch, capsys):
    import importlib.util

    from mmengine.runner import Runner

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location("tools_train", os.path.join(ROOT, "tools", "train.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main(["no/such/config.py"]) == 2 and "no such config" in capsys.readouterr().err

    def boom(self):
        raise ValueError("mid-training failure")

    monkeypatch.setattr(Runner, "train", boom)
    work_dir, opts = uper_run
    with pytest.raises(ValueError, match="mid-training"):
        tool.main([TOY_UPER, "--work-dir", work_dir + "_boom", "--cfg-options",
                   *[f"{k}={v}" for k, v in opts.items()]])


def test_show_dir_needs_no_training_data(uper_run, tmp_path):
    """tools/test.py --show-dir with only the test split on disk: mmseg's visualization hook asks for
    runner.iter, which used to build the train loop and its (absent) dataset."""
    from internvit.runner import test

    work_dir, opts = uper_run
    opts = dict(opts, **{"train_dataloader.dataset.data_root": str(tmp_path / "absent")})
    show = str(tmp_path / "show")
    metrics = test(TOY_UPER, os.path.join(work_dir, f"iter_{ITERS}.pth"), work_dir=str(tmp_path / "w"),
                   show_dir=show, cfg_options=opts)
    assert metrics["mIoU"] >= 60.0
    assert len(glob.glob(os.path.join(show, "**", "*.png"), recursive=True)) == 8


@pytest.mark.parametrize("tool,extra,must", [
    ("test", ["model.decode_head.type=NoSuchHead"], "NoSuchHead is not in the"),
    ("test", ["model.backbone.arch.num_hidden_layers=3"], "out of range for a model with 3 blocks"),
    ("train", ["optim_wrapper.paramwise_cfg.num_layers=3"], "num_layers=3"),
    ("train", ["--amp"], "optim_wrapper"),
])
def test_setup_errors_leave_nothing_and_print_one_line(uper_run, tmp_path, capsys, tool, extra, must):
    """Errors raised while the runner is built (registry, model arguments) or while its optimizer is built:
    one error line, no mmengine banner on stdout, no work dir left behind."""
    import importlib.util

    from .conftest import ROOT

    if tool == "train" and extra == ["--amp"] and torch.cuda.is_available():
        pytest.skip("AMP builds on a GPU machine")
    spec = importlib.util.spec_from_file_location(f"tools_{tool}", os.path.join(ROOT, "tools", f"{tool}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    work_dir, opts = uper_run
    new_work = str(tmp_path / "work")
    flags = [e for e in extra if e.startswith("--")]
    options = [*[f"{k}={v}" for k, v in opts.items()], *[e for e in extra if not e.startswith("--")]]
    argv = [TOY_UPER, *([os.path.join(work_dir, f"iter_{ITERS}.pth")] if tool == "test" else []),
            "--work-dir", new_work, *flags, "--cfg-options", *options]
    capsys.readouterr()
    assert module.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "", out[:300]
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and must in lines[0], err
    assert not os.path.exists(new_work)


def _load_tool(name: str):
    import importlib.util

    from .conftest import ROOT

    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("fault,workers,where,must", [
    ("garbage image", 0, "images", "cannot read the image (LoadImageFromFile: AssertionError"),
    ("garbage image", 2, "images", "cannot read the image (LoadImageFromFile: AssertionError"),
    ("zero-byte image", 0, "images", "an empty image file (0 bytes) (1 of the files"),
    ("zero-byte label map", 0, "annotations", "an empty label map file (0 bytes)"),
    ("truncated label map", 0, "annotations", "cannot read the label map (LoadAnnotations: OSError"),
    ("label value out of range", 2, "annotations", "label values [9] are neither classes 0..3"),
    ("missing label map", 0, "annotations", "no such label map file (1 of the files"),
])
def test_bad_data_files_are_one_error_line_naming_the_file(uper_run, toy_data, tmp_path, capsys, fault, workers,
                                                          where, must):
    """A file of the test set that cannot be read (mmcv's ``AssertionError: failed to load image``, PIL's
    ``OSError: image file is truncated`` naming no file, a missing annotation's ``FileNotFoundError``) was a
    traceback from deep in the loop (for validation, after the first training interval); now one ``error:``
    line naming the file, exit 2 — also through DataLoader workers. A missing annotation is found at set-up."""
    import numpy as np
    from PIL import Image

    data = str(tmp_path / "data")
    shutil.copytree(toy_data, data)
    name = sorted(os.listdir(os.path.join(data, "annotations", "validation")))[1]
    path = os.path.join(data, where, "validation", name)
    if fault == "garbage image":
        with open(path, "wb") as f:
            f.write(b"not an image at all")
    elif fault.startswith("zero-byte"):
        open(path, "wb").close()
    elif fault == "truncated label map":
        with open(path, "rb") as f:
            head = f.read(120)
        with open(path, "wb") as f:
            f.write(head)
    elif fault == "label value out of range":
        label = np.array(Image.open(path))
        label[0, 0] = 9
        Image.fromarray(label).save(path)
    else:  # missing label map
        os.remove(path)
    work_dir, opts = uper_run
    opts = dict(opts, **{f"{s}_dataloader.dataset.data_root": data for s in ("train", "val", "test")},
                **{"test_dataloader.num_workers": workers, "test_dataloader.persistent_workers": False})
    new_work = str(tmp_path / "work")
    argv = [TOY_UPER, os.path.join(work_dir, f"iter_{ITERS}.pth"), "--work-dir", new_work, "--cfg-options",
            *[f"{k}={v}" for k, v in opts.items()]]
    if workers:  # DataLoader worker processes: the real CLI (forked workers would inherit pytest's captured streams)
        import subprocess
        import sys

        from .conftest import ROOT

        proc = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "test.py"), *argv], capture_output=True,
                              text=True, timeout=600, env=dict(os.environ, PYTHONPATH=ROOT))
        rc, err = proc.returncode, proc.stderr
    else:
        capsys.readouterr()
        rc = _load_tool("test").main(argv)
        err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert rc == 2 and len(lines) == 1 and must in lines[0] and path in lines[0], err[-800:]
    assert "Traceback" not in err, err[-800:]
    if fault in ("missing label map", "zero-byte image", "zero-byte label map"):  # refused at set-up: nothing written
        assert not os.path.exists(new_work)


def test_backbone_checkpoint_given_to_test_is_named(uper_run, tmp_path, capsys):
    """An original-family ``{'module': state_dict}`` file (a backbone, not a segmentor) was refused as "no state
    dict of tensors (top-level keys: module)": the message now says where its tensors are and what to give."""
    work_dir, opts = uper_run
    from internvit.runner import _read_checkpoint

    sd = _read_checkpoint(os.path.join(work_dir, f"iter_{ITERS}.pth"))["state_dict"]
    ckpt = str(tmp_path / "backbone.pth")
    torch.save({"module": sd}, ckpt)
    capsys.readouterr()
    rc = _load_tool("test").main([TOY_UPER, ckpt, "--work-dir", str(tmp_path / "w"), "--cfg-options",
                                  *[f"{k}={v}" for k, v in opts.items()]])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "its tensors are under 'module'" in err[0], err


def test_nan_segmentation_outputs_are_refused_not_scored(uper_run, tmp_path):
    """A checkpoint with NaN head weights was scored (NaN logits argmax to class 0: mIoU of "all background"):
    the test stops at the first non-finite output, naming the image."""
    from internvit.run_checks import NonFiniteError
    from internvit.runner import _read_checkpoint, test

    work_dir, opts = uper_run
    ckpt = _read_checkpoint(os.path.join(work_dir, f"iter_{ITERS}.pth"))
    ckpt = dict(ckpt, state_dict={k: torch.full_like(v, float("nan")) if k == "decode_head.conv_seg.weight" else v
                                  for k, v in ckpt["state_dict"].items()})
    path = str(tmp_path / "nan.pth")
    torch.save(ckpt, path)
    with pytest.raises(NonFiniteError, match=r"test: the model's output seg_logits\.data is not finite \(NaN/inf\) "
                                             r"for .*toy_0000\.png \(batch 0\)"):
        test(TOY_UPER, path, work_dir=str(tmp_path / "w"), cfg_options=opts)
