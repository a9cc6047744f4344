"""trial8b F3: an epoch-based loop (probes, retrieval fine-tuning) resumed from a checkpoint saved inside an
epoch replayed that epoch from its first batch (extra steps, the schedule run past its end, the last checkpoint
not the final weights). It now continues after the batches it trained; a checkpoint its epoch length cannot
place is refused at set-up. F8: SGD takes lr=nan (torch checks lr < 0):
refused at set-up."""
import os
import re

import pytest
import torch

from .conftest import TOY_CONFIGS

CONFIG = os.path.join(TOY_CONFIGS, "digits_linear_probe.py")


def _options(data: str, **extra) -> dict:
    opts = {f"{s}_dataloader.dataset.data_root": data for s in ("train", "val", "test")}
    opts.update(extra)
    return opts


def _state(path):
    from internvit.compat import load_runner_checkpoint

    return load_runner_checkpoint(str(path), "cpu")["state_dict"]


#: 2 epochs of 5 steps (1,438 toy images, 256 a batch), random crops, EMA, a checkpoint after every step
RESUME_OPTS = {"train_cfg.max_epochs": 2, "train_cfg.val_interval": 2, "train_dataloader.batch_size": 256,
               "train_dataloader.dataset.transform.train": True, "default_hooks.checkpoint.by_epoch": False,
               "default_hooks.checkpoint.interval": 1, "default_hooks.checkpoint.max_keep_ckpts": -1}


@pytest.fixture(scope="module")
def uninterrupted(toy_digits, tmp_path_factory):
    from internvit.runner import train

    whole = tmp_path_factory.mktemp("whole")
    runner = train(CONFIG, work_dir=str(whole), cfg_options=_options(toy_digits, **RESUME_OPTS))
    return whole, len(runner.train_dataloader)


@pytest.mark.parametrize("where", ["inside", "last_step"])
def test_a_run_resumed_inside_an_epoch_ends_with_the_uninterrupted_weights(toy_digits, uninterrupted, tmp_path,
                                                                           where):
    """Checkpoints saved by iteration in an epoch-based loop (the published retrieval recipes save every 100
    steps): mmengine's EpochBasedTrainLoop restarted the epoch of such a checkpoint. Resumed from one inside
    epoch 2, or from the one at epoch 1's last step (which records epoch 1 as unfinished), the run continues
    after the batches it trained and ends with the uninterrupted run's weights, without a step past the end."""
    import shutil

    from internvit.runner import train

    whole, n = uninterrupted
    assert n >= 4
    step = n + 2 if where == "inside" else n
    shutil.copy(whole / f"iter_{step}.pth", tmp_path / f"iter_{step}.pth")  # a run killed right after this save
    train(CONFIG, work_dir=str(tmp_path), cfg_options=_options(toy_digits, **RESUME_OPTS,
                                                              **{"default_hooks.logger.interval": 1}),
          resume=str(tmp_path / f"iter_{step}.pth"))
    # the resumed epoch's batches are logged with their numbers in the epoch (they restarted at 1)
    log = "".join(open(p).read() for p in tmp_path.glob("*/*.log"))
    logged = re.findall(r"Epoch\(train\)\s*\[(\d+)\]\[\s*(\d+)/(\d+)\]", log)
    assert [(int(e), int(b), int(t)) for e, b, t in logged] == [(2, b, n) for b in range(step - n + 1, n + 1)]
    last = f"iter_{2 * n}.pth"
    assert not (tmp_path / f"iter_{2 * n + 1}.pth").exists()
    a, b = _state(whole / last), _state(tmp_path / last)
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"


def test_a_checkpoint_outside_its_epoch_with_this_config_is_refused(toy_digits, tmp_path):
    """A checkpoint whose iteration this config's epoch length does not put inside its recorded epoch was
    saved with another batch size, data or number of processes: refused at set-up, naming the range."""
    from internvit.runner import build_train_runner

    runner = build_train_runner(CONFIG, work_dir=str(tmp_path / "w"), cfg_options=_options(toy_digits))
    n = len(runner.train_dataloader)
    ckpt = str(tmp_path / "iter_far.pth")
    torch.save({"state_dict": runner.model.state_dict(), "meta": {"epoch": 1, "iter": 2 * n + 3}}, ckpt)
    with pytest.raises(ValueError, match=rf"^the checkpoint to resume stands at iteration {2 * n + 3} in epoch 2, "
                                         rf"which this config's {n} iterations per epoch do not reach"):
        build_train_runner(CONFIG, work_dir=str(tmp_path / "r"), resume=ckpt, cfg_options=_options(toy_digits))
    # inside an epoch past the schedule's end (saved by iteration): nothing left to train
    torch.save({"state_dict": runner.model.state_dict(), "meta": {"epoch": 10, "iter": 10 * n + 3}}, ckpt)
    with pytest.raises(ValueError, match=rf"^the checkpoint to resume is at iteration {10 * n + 3} and the config "
                                         rf"trains {10 * n} iterations \(10 epochs of {n}\): nothing left"):
        build_train_runner(CONFIG, work_dir=str(tmp_path / "r"), resume=ckpt, cfg_options=_options(toy_digits))
    # inside its epoch, or at an epoch boundary: accepted
    for it in (n + 3, n):
        torch.save({"state_dict": runner.model.state_dict(), "meta": {"epoch": 1, "iter": it}}, ckpt)
        build_train_runner(CONFIG, work_dir=str(tmp_path / "r"), resume=ckpt, cfg_options=_options(toy_digits))


def test_a_nan_learning_rate_is_refused_at_set_up(toy_digits, tmp_path):
    from internvit.runner import build_train_runner

    with pytest.raises(ValueError, match=r"^optim_wrapper.optimizer.lr=nan: the learning rate must be a finite"):
        build_train_runner(CONFIG, work_dir=str(tmp_path / "w"), cfg_options=_options(toy_digits, **{
            "optim_wrapper.optimizer.lr": float("nan")}))
