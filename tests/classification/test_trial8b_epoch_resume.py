"""trial8b F3: an epoch-based loop (probes, retrieval fine-tuning) resumed from a checkpoint saved inside an
epoch replayed that epoch from its first batch (extra steps, the schedule run past its end, the last checkpoint
not the final weights). Such a resume is refused at set-up, and so is a checkpoint hook that saves by iteration
in an epoch-based loop (its checkpoints would be such checkpoints). F8: SGD takes lr=nan (torch checks lr < 0):
refused at set-up."""
import os

import pytest
import torch

from .conftest import TOY_CONFIGS

CONFIG = os.path.join(TOY_CONFIGS, "digits_linear_probe.py")


def _options(data: str, **extra) -> dict:
    opts = {f"{s}_dataloader.dataset.data_root": data for s in ("train", "val", "test")}
    opts.update(extra)
    return opts


def test_a_checkpoint_hook_saving_inside_epochs_is_refused(toy_digits, tmp_path):
    from internvit.runner import build_train_runner

    work = str(tmp_path / "w")
    with pytest.raises(ValueError, match=r"^default_hooks.checkpoint.by_epoch=False: checkpoints saved every 5 "
                                         r"iterations of an epoch-based loop cannot be resumed exactly"):
        build_train_runner(CONFIG, work_dir=work, cfg_options=_options(toy_digits, **{
            "default_hooks.checkpoint.by_epoch": False, "default_hooks.checkpoint.interval": 5}))
    assert not os.path.exists(work)


def test_resume_from_inside_an_epoch_is_refused(toy_digits, tmp_path):
    from internvit.runner import build_train_runner

    work = str(tmp_path / "w")
    runner = build_train_runner(CONFIG, work_dir=work, cfg_options=_options(toy_digits))
    n = len(runner.train_dataloader)
    ckpt = str(tmp_path / "iter_mid.pth")  # as mmengine saves by iteration: the epoch being trained, the step
    torch.save({"state_dict": runner.model.state_dict(), "meta": {"epoch": 1, "iter": n + 3}}, ckpt)
    with pytest.raises(ValueError, match=rf"^the checkpoint to resume stands at iteration {n + 3}, not at the end of "
                                         rf"epoch 1 with this config's {n} iterations per epoch: it was saved inside "
                                         rf"an epoch \(step 3 of epoch 2\), and an epoch-based loop resumes only"):
        build_train_runner(CONFIG, work_dir=str(tmp_path / "r"), resume=ckpt, cfg_options=_options(toy_digits))
    # an epoch boundary is accepted
    torch.save({"state_dict": runner.model.state_dict(), "meta": {"epoch": 1, "iter": n}}, ckpt)
    build_train_runner(CONFIG, work_dir=str(tmp_path / "r"), resume=ckpt, cfg_options=_options(toy_digits))


def test_a_nan_learning_rate_is_refused_at_set_up(toy_digits, tmp_path):
    from internvit.runner import build_train_runner

    with pytest.raises(ValueError, match=r"^optim_wrapper.optimizer.lr=nan: the learning rate must be a finite"):
        build_train_runner(CONFIG, work_dir=str(tmp_path / "w"), cfg_options=_options(toy_digits, **{
            "optim_wrapper.optimizer.lr": float("nan")}))
