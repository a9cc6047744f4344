"""Findings of newcomer trial 8b (training and its crash-safe resume), toy segmentation: the validation a run
owed when it was killed after a checkpoint (F6), NaN weights from a finite loss (F8), the few-shot subset on a
resume (F7) and a subset that rounds to no image (F13)."""
import glob
import os
import shutil

import pytest
import torch
from mmengine.hooks import Hook

import segmentation  # noqa: F401  (applies internvit.compat and registers the plugin)

from .conftest import TOY_LINEAR, toy_options


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    from segmentation.toy_data import make_toy_seg_dataset

    return make_toy_seg_dataset(str(tmp_path_factory.mktemp("toy8b") / "toy_seg"), num_train=8, num_val=2)


def _opts(data: str, work_dir: str, **extra) -> dict:
    return toy_options(data, work_dir, **{"train_dataloader.batch_size": 2, "train_cfg.max_iters": 4,
                                          "train_cfg.val_interval": 2, "default_hooks.checkpoint.interval": 2,
                                          "default_hooks.checkpoint.save_best": "mIoU",
                                          "default_hooks.checkpoint.rule": "greater", **extra})


def _validated(work_dir: str) -> list:
    """The mIoU lines of the newest run log of ``work_dir``."""
    log = sorted(glob.glob(os.path.join(work_dir, "2*", "2*.log")))[-1]
    with open(log) as f:
        return [line.split("mIoU:")[1].split()[0] for line in f if "Iter(val)" in line and "mIoU:" in line]


class _KeepCheckpointsAsSaved(Hook):
    """Copies each ``iter_N.pth`` as the checkpoint hook first writes it (before that step's validation, after
    which mmengine rewrites it when the validation found a new best): what a run killed then leaves."""

    priority = "LOWEST"

    def __init__(self, dest: str) -> None:
        self.dest = dest

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        path = os.path.join(runner.work_dir, f"iter_{runner.iter + 1}.pth")
        if os.path.isfile(path):
            shutil.copy(path, self.dest)


@pytest.fixture(scope="module")
def full_run(small_data, tmp_path_factory):
    from internvit.runner import build_train_runner

    work, saved = str(tmp_path_factory.mktemp("full8b")), str(tmp_path_factory.mktemp("saved8b"))
    runner = build_train_runner(TOY_LINEAR, work_dir=work, cfg_options=_opts(small_data, work))
    runner.register_hook(_KeepCheckpointsAsSaved(saved))
    runner.train()
    return work, saved


def _killed_after(saved: str, step: int, dest: str) -> str:
    """A work dir as a run killed once ``iter_<step>.pth`` was saved, before that step's validation, leaves it."""
    os.makedirs(dest)
    shutil.copy(os.path.join(saved, f"iter_{step}.pth"), dest)
    with open(os.path.join(dest, "last_checkpoint"), "w") as f:
        f.write(os.path.join(dest, f"iter_{step}.pth"))
    return dest


@pytest.mark.parametrize("step", [4, 2])
def test_resume_runs_the_validation_the_killed_run_owed(full_run, small_data, tmp_path, step):
    from internvit.runner import train

    full_run, saved = full_run
    work = _killed_after(saved, step, str(tmp_path / "w"))
    train(TOY_LINEAR, work_dir=work, resume="auto", cfg_options=_opts(small_data, work))
    expected = _validated(full_run)  # steps 2 and 4
    assert _validated(work) == expected[-(4 - step) // 2 - 1:]  # the owed validation, then the later ones
    end = " (the end of training)" if step == 4 else ""
    assert f"resumed at iteration {step}{end}: its checkpoint is written before that step's validation" in \
        "".join(open(p).read() for p in glob.glob(os.path.join(work, "*", "*.log")))
    best = [os.path.basename(p) for p in glob.glob(os.path.join(full_run, "best_mIoU_*.pth"))]
    assert [os.path.basename(p) for p in glob.glob(os.path.join(work, "best_mIoU_*.pth"))] == best
    # the validation draws none of the training's random numbers: the resumed run ends with the same weights
    from internvit.compat import load_runner_checkpoint

    a, b = (load_runner_checkpoint(os.path.join(d, "iter_4.pth"), "cpu")["state_dict"] for d in (full_run, work))
    assert all(torch.equal(a[k], b[k]) for k in a)


class _OverflowingUpdate(Hook):
    """Turns a weight non-finite after the first step, as an overflowing update does (an infinite gradient or
    learning rate): the loss that step was computed from was finite."""

    priority = "VERY_HIGH"

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        import torch

        with torch.no_grad():
            next(runner.model.parameters()).fill_(float("inf"))


def test_non_finite_weights_are_never_checkpointed(small_data, tmp_path):
    from internvit.run_checks import NonFiniteError
    from internvit.runner import build_train_runner

    work = str(tmp_path / "nan")
    runner = build_train_runner(TOY_LINEAR, work_dir=work, cfg_options=_opts(small_data, work, **{
        "default_hooks.checkpoint.interval": 1, "default_hooks.checkpoint.save_best": None}))
    runner.register_hook(_OverflowingUpdate())
    with pytest.raises(NonFiniteError, match=r"weights are not finite .* after iteration 1 .*stopped before saving"):
        runner.train()
    assert not glob.glob(os.path.join(work, "*.pth")) and not os.path.exists(os.path.join(work, "last_checkpoint"))


def test_a_non_finite_learning_rate_is_refused_at_set_up(small_data, tmp_path):
    from internvit.runner import build_train_runner

    work = str(tmp_path / "lr")  # (lr=nan: torch's own 'Invalid learning rate: nan')
    with pytest.raises(ValueError, match=r"^optim_wrapper.optimizer.lr=inf: the learning rate must be a finite"):
        build_train_runner(TOY_LINEAR, work_dir=work, cfg_options=_opts(small_data, work, **{
            "optim_wrapper.optimizer.lr": float("inf")}))


def _few_shot(data: str, work: str, **extra) -> dict:
    return _opts(data, work, **{"train_dataloader.dataset.type": "FewShotSegDataset",
                                "train_dataloader.dataset.subset_divisor": 2,
                                "custom_hooks": [dict(type="SaveSubsetListHook")], "train_cfg.max_iters": 2,
                                "default_hooks.checkpoint.save_best": None, **extra})


def test_resume_keeps_the_recorded_few_shot_subset(small_data, tmp_path):
    from internvit.runner import build_train_runner, train
    from segmentation.toy_data import make_toy_seg_dataset

    data = str(tmp_path / "data")
    shutil.copytree(small_data, data)
    work = str(tmp_path / "fs")
    train(TOY_LINEAR, work_dir=work, cfg_options=_few_shot(data, work))
    listed = os.path.join(work, "few_shot_subset.txt")
    with open(listed) as f:
        recorded = f.read()
    assert len(recorded.split()) == 4
    # unchanged data: the resume is accepted and the list stays
    build_train_runner(TOY_LINEAR, work_dir=work, resume="auto", cfg_options=_few_shot(data, work))
    # more images arrive: the re-drawn subset would be another one
    more = make_toy_seg_dataset(str(tmp_path / "more"), num_train=12, num_val=2)
    for sub in ("images/training", "annotations/training"):
        for name in os.listdir(os.path.join(more, sub)):
            if not os.path.exists(os.path.join(data, sub, name)):
                shutil.copy(os.path.join(more, sub, name), os.path.join(data, sub, name))
    with pytest.raises(ValueError, match=r"few-shot subset differs from the one this run started with, recorded "
                                         r"in .*few_shot_subset.txt \(4 vs 6 images, first difference"):
        build_train_runner(TOY_LINEAR, work_dir=work, resume="auto", cfg_options=_few_shot(data, work))
    with open(listed) as f:
        assert f.read() == recorded
    # the way out the message names: the recorded list as the subset
    runner = build_train_runner(TOY_LINEAR, work_dir=work, resume="auto", cfg_options=_few_shot(
        data, work, **{"train_dataloader.dataset.subset_file": listed}))
    assert runner.train_dataloader.dataset.subset_files == recorded.split()


def test_a_subset_of_no_image_names_the_divisor(small_data, tmp_path):
    from internvit.runner import build_train_runner

    work = str(tmp_path / "zero")
    with pytest.raises(ValueError, match=r"subset_divisor=100 keeps 8 // 100 = 0 of the 8 images"):
        build_train_runner(TOY_LINEAR, work_dir=work, cfg_options=_few_shot(small_data, work, **{
            "train_dataloader.dataset.subset_divisor": 100}))
