"""Hooks every training runner of ``internvit.runner`` gets, so that what a run saves is what it reports and a
resumed run ends where an uninterrupted one does.

* :class:`RunningStatsSyncHook` — distributed runs: BatchNorm running statistics averaged over the ranks after
  every training iteration. mmengine wraps models with ``broadcast_buffers=False`` and no hook syncs them, so
  each rank kept its own statistics: a validation under ``dist_train.sh`` scored every rank's share of the
  images with that rank's statistics, a mix that belongs to no saved checkpoint (rank 0 saves its own), and
  ``save_best`` chose by it. (mmengine's ``SyncBuffersHook`` syncs before validation only, after the
  checkpoint of that iteration is saved.)
* :class:`StepRandomnessHook` — the random numbers a training step draws (dropout, drop path, random
  augmentations of a data preprocessor) come from generators seeded by ``(seed, iteration)``, and those of an
  epoch's data loading by ``(seed, epoch)``. A checkpoint does not hold the generators' states, so a run
  resumed from ``iter_6.pth`` drew other dropout masks than the uninterrupted run from iteration 7 on and ended
  with other weights (mIoU 14.16 instead of 11.48 on the toy UperNet). Derived seeds make every step's
  randomness a function of where it is in the schedule: a resumed run repeats the uninterrupted one exactly.
"""
from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from mmengine.hooks import Hook

__all__ = ["RunningStatsSyncHook", "StepRandomnessHook", "step_seed"]


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _running_stats(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The running mean / variance of the model's BatchNorm-style layers that track them (SyncBatchNorm's are
    computed over all ranks already and left out)."""
    from torch.nn.modules.batchnorm import _NormBase

    for module in model.modules():
        if isinstance(module, _NormBase) and not isinstance(module, torch.nn.SyncBatchNorm) \
                and module.track_running_stats and module.running_mean is not None:
            yield module.running_mean
            yield module.running_var


def average_running_stats(stats: list) -> int:
    """All-reduce (mean over ranks) ``stats``, the running statistics of a model's BatchNorm-style layers
    (:func:`_running_stats`), in one collective per dtype and device; returns how many tensors were averaged (0
    outside a distributed run)."""
    import torch.distributed as dist

    world = _world_size()
    if world == 1 or not stats:
        return 0
    by_kind: dict = {}
    for t in stats:
        by_kind.setdefault((t.dtype, t.device), []).append(t)
    for tensors in by_kind.values():
        flat = torch.cat([t.reshape(-1) for t in tensors]).to(torch.float64 if tensors[0].dtype == torch.float64
                                                               else torch.float32)
        dist.all_reduce(flat)
        flat /= world
        offset = 0
        for t in tensors:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()
    return len(stats)


class RunningStatsSyncHook(Hook):
    """Average BatchNorm running statistics over the ranks after every training iteration, before the
    checkpoint hook saves and before a validation runs (see the module docstring). Nothing happens in a
    single process or for SyncBatchNorm layers."""

    priority = "ABOVE_NORMAL"

    def __init__(self) -> None:
        self._stats: list = []

    def before_train(self, runner) -> None:  # the layers are found once, not on every step
        self._stats = list(_running_stats(runner.model)) if _world_size() > 1 else []

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        average_running_stats(self._stats)


def step_seed(seed: int, *where: int) -> int:
    """A 63-bit seed of its own for each ``where`` (``(iteration,)`` or ``(rank, iteration)``), derived from the
    run's ``seed`` with :class:`numpy.random.SeedSequence` (independent streams for nearby integers)."""
    return int(np.random.SeedSequence([int(seed) % 2 ** 64, *where]).generate_state(1, np.uint64)[0] >> 1)


def _seed_all(seed: int) -> None:
    torch.manual_seed(seed)  # every device's generator too
    np.random.seed(seed % 2 ** 32)
    random.seed(seed)


class StepRandomnessHook(Hook):
    """Seed the random generators (torch on every device, numpy, ``random``) from ``(seed, iteration)`` for
    each training step and give the data loading its generators back afterwards; at the start of each epoch
    of an epoch-based loop, seed them from ``(seed, epoch)``. With ``randomness.diff_rank_seed`` the rank is
    part of the seed, as it is of mmengine's own seeding. See the module docstring for why."""

    priority = "VERY_HIGH"  # before any other hook of the step draws a number

    def __init__(self) -> None:
        self._saved = None

    def _where(self, runner, *where: int) -> tuple:
        cfg = getattr(runner, "_randomness_cfg", None) or {}
        if cfg.get("diff_rank_seed"):
            from mmengine.dist import get_rank

            return (get_rank(), *where)
        return where

    def before_train_epoch(self, runner) -> None:
        from mmengine.runner import EpochBasedTrainLoop

        if isinstance(runner.train_loop, EpochBasedTrainLoop):
            _seed_all(step_seed(runner.seed, 1, *self._where(runner, runner.epoch)))

    def before_train_iter(self, runner, batch_idx, data_batch=None) -> None:
        cuda = torch.cuda.is_available() and torch.cuda.is_initialized()
        self._saved = (torch.get_rng_state(), torch.cuda.get_rng_state_all() if cuda else None,
                       np.random.get_state(), random.getstate())
        _seed_all(step_seed(runner.seed, 2, *self._where(runner, runner.iter)))

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        if self._saved is None:
            return
        cpu, cuda, np_state, py_state = self._saved
        torch.set_rng_state(cpu)
        if cuda is not None:
            torch.cuda.set_rng_state_all(cuda)
        np.random.set_state(np_state)
        random.setstate(py_state)
        self._saved = None
