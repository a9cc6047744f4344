"""Training checkpoints killed at every write point of every save: the work dir holds complete checkpoints only,
``last_checkpoint`` names a complete one, and ``tools/train.py --resume`` ends with the weights of an uninterrupted
run (``save_best='mIoU'`` rewrites ``iter_N.pth`` after the best one; ``max_keep_ckpts=1`` removes the previous
checkpoint and the previous best)."""
import os
import shutil
import sys

import pytest

from internvit.store import FAULT_EXIT_CODE
from tests.faults import REPO, run, write_points

from .zygote import Zygote

CONFIG = str(REPO / "configs" / "toy" / "linear_internvit_tiny_toy.py")
TRAIN = str(REPO / "tools" / "train.py")
ITERS = 4


def _options(root: str) -> list:
    opts = [f"{split}_dataloader.dataset.data_root={root}" for split in ("train", "val", "test")]
    return [*opts, f"train_cfg.max_iters={ITERS}", "train_cfg.val_interval=2",
            "default_hooks.checkpoint.interval=2", "default_hooks.checkpoint.save_best=mIoU",
            "default_hooks.checkpoint.max_keep_ckpts=1", "train_dataloader.batch_size=2",
            # random flips and dropout: a resumed run must draw the numbers the uninterrupted one drew
            "model.decode_head.dropout_ratio=0.3",
            "default_hooks.logger.interval=10", "default_hooks.visualization.draw=False"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    from segmentation.toy_data import make_toy_seg_dataset

    return make_toy_seg_dataset(str(tmp_path_factory.mktemp("toy") / "toy_seg"), num_train=8, num_val=2)


@pytest.fixture(scope="module")
def zygote():
    # matplotlib: imported by the visualizer of every run (1 s)
    with Zygote(["torch", "mmengine.runner", "segmentation", "internvit.runner", "matplotlib.figure",
                 "matplotlib.backends.backend_agg"]) as z:
        yield z


def _checkpoints(work_dir) -> list:
    return sorted(n for n in os.listdir(work_dir) if n.endswith(".pth"))


def _load(path):
    from internvit.compat import load_runner_checkpoint

    return load_runner_checkpoint(str(path), "cpu")


def _same_weights(a, b) -> bool:
    import torch

    sa, sb = _load(a)["state_dict"], _load(b)["state_dict"]
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _listing(folder) -> dict:
    """Every file under ``folder`` with its size and modification time (ns)."""
    return {os.path.relpath(os.path.join(r, f), folder): (os.stat(os.path.join(r, f)).st_size,
                                                         os.stat(os.path.join(r, f)).st_mtime_ns)
            for r, _, files in os.walk(folder) for f in files}


def _latest(work_dir):
    from mmengine.config import Config

    from internvit.runner import latest_complete_checkpoint

    return latest_complete_checkpoint(Config(dict(work_dir=str(work_dir), default_hooks=dict(checkpoint=dict()))))


def test_every_kill_during_training_saves_leaves_a_resumable_work_dir(tmp_path, toy, zygote):
    def command(work_dir, *extra):
        return zygote.cmd([TRAIN, CONFIG, "--work-dir", str(work_dir), *extra, "--cfg-options", *_options(toy)])

    ref = tmp_path / "reference"
    names = write_points(command(ref), tmp_path)
    assert names.count("checkpoint:removed") == 2, names  # iter_2.pth and the previous best, after the new ones
    assert _checkpoints(ref) == ["best_mIoU_iter_4.pth", "iter_4.pth"]
    # the run's config copies (work dir, then the visualizer's vis_data/config.py) are written first (atomically,
    # once the set-up passed), then iter_2.pth
    assert names[:6] == ["file:written", "file:renamed"] * 3, names[:6]
    for n in range(1, len(names) + 1):
        d = tmp_path / f"kill-{n}"
        r = run(command(d), fault_at=n)
        assert r.returncode == FAULT_EXIT_CODE, f"point {n} ({names[n - 1]}): {r.returncode}\n{r.stderr[-2000:]}"
        for name in _checkpoints(d):  # complete checkpoints only, at every instant
            _load(d / name)
        last = d / "last_checkpoint"
        if last.exists():  # names a complete checkpoint
            _load(last.read_text().strip())
        latest = _latest(d)
        assert latest is not None or n <= 6, f"point {n} ({names[n - 1]}): no checkpoint to resume from"
        if latest is not None:  # another operation first: a fresh run (no --resume) is refused, nothing touched
            before = _listing(d)
            r = run(command(d))
            assert r.returncode == 2 and "that this run would replace: --resume to continue" in r.stderr, \
                f"point {n} ({names[n - 1]}): a fresh run over the killed one: {r.returncode}\n{r.stderr[-2000:]}"
            assert _listing(d) == before, f"point {n} ({names[n - 1]}): the refused run changed the work dir"
        r = run(command(d, "--resume"))
        assert r.returncode == 0, f"point {n} ({names[n - 1]}): resume failed:\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
        assert _same_weights(d / f"iter_{ITERS}.pth", ref / f"iter_{ITERS}.pth"), f"point {n} ({names[n - 1]})"
        # a kill after iter_4.pth is complete but before its validation resumes at the end (mmengine does not
        # repeat that validation): the best checkpoint stays the previous one
        kept = _checkpoints(d)
        assert "iter_4.pth" in kept and any(k.startswith("best_mIoU_") for k in kept), f"point {n}: {kept}"
        shutil.rmtree(d)


def test_resume_skips_a_broken_last_checkpoint(tmp_path, toy, zygote):
    """A work dir written in place by an earlier version (or damaged): ``last_checkpoint`` names a 0-byte file, or
    a missing one; ``--resume`` continues from the newest complete checkpoint and says so."""
    def command(work_dir, *extra):
        return zygote.cmd([TRAIN, CONFIG, "--work-dir", str(work_dir), *extra, "--cfg-options", *_options(toy)])

    ref = tmp_path / "reference"
    assert run(command(ref)).returncode == 0
    for case in ("empty", "missing"):
        d = tmp_path / case
        d.mkdir()
        shutil.copy(ref / "iter_4.pth", d / "iter_2.pth")  # stands for an older complete checkpoint
        (d / "iter_3.pth").write_bytes(b"")  # a half-written one below the one named: skipped too
        if case == "empty":
            (d / "iter_6.pth").write_bytes(b"")
        (d / "last_checkpoint").write_text(str(d / "iter_6.pth"))
        r = run(command(d, "--resume"))
        assert r.returncode == 0, r.stderr[-2000:]
        out = r.stdout + r.stderr
        assert "cannot be used" in out and f"resuming from {d / 'iter_2.pth'}" in out, out[-2000:]
        assert _latest(d) == str(d / "iter_2.pth")


def test_no_checkpoint_at_all_starts_from_scratch(tmp_path):
    assert _latest(tmp_path) is None
    (tmp_path / "iter_2.pth").write_bytes(b"")  # nothing loads: the named / newest one is returned to report it
    assert _latest(tmp_path) == str(tmp_path / "iter_2.pth")


def test_a_copied_work_dir_resumes_from_its_own_checkpoint(tmp_path):
    """mmengine's last_checkpoint holds an absolute path: a copied work dir resumed from the original folder's
    checkpoint (another run's, which may since have changed). Its own file of that name is used."""
    import torch

    orig, copy = tmp_path / "orig", tmp_path / "copy"
    for d, step in ((orig, 7), (copy, 4)):
        d.mkdir()
        torch.save({"meta": {"iter": step}, "state_dict": {"w": torch.zeros(1)}}, d / "iter_4.pth")
        (d / "last_checkpoint").write_text(str(orig / "iter_4.pth"))
    assert _latest(orig) == str(orig / "iter_4.pth")
    assert _latest(copy) == str(copy / "iter_4.pth")


def test_durable_saving_is_scoped():
    from mmengine.fileio.backends import LocalBackend
    from mmengine.hooks import CheckpointHook, checkpoint_hook

    from internvit import compat

    before = (LocalBackend.put, CheckpointHook._save_checkpoint_with_step, CheckpointHook._save_best_checkpoint)
    with compat.durable_checkpoint_saving():
        assert LocalBackend.put is not before[0] and checkpoint_hook.open is not open
        with compat.durable_checkpoint_saving():  # nested (a runner's val inside train): still one wrapping
            assert not hasattr(CheckpointHook._save_best_checkpoint._internvit_original, "_internvit_original")
    assert (LocalBackend.put, CheckpointHook._save_checkpoint_with_step,
            CheckpointHook._save_best_checkpoint) == before
    assert not hasattr(checkpoint_hook, "open")


if __name__ == "__main__":
    sys.exit(pytest.main([__file__, "-q"]))
