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
* :func:`seed_data_loading` — the random numbers a training sample's loading draws (random crops, flips, a
  retrieval dataset's ITM negative), in a DataLoader worker or not, come from generators seeded by
  ``(seed, epoch, position in the epoch, index)`` for each sample. mmengine seeds a worker once, when it starts,
  with ``seed + worker_id``: a persistent worker carried epoch 1's generator state into epoch 2 while a resumed
  run started a fresh one there with epoch 1's seed (another model after ``--resume``), and non-persistent
  workers repeated epoch 1's random stream in every epoch. Per-sample seeds also make the result independent
  of ``num_workers``.
* :class:`OwedValidationHook` — a run killed after a step's checkpoint was saved but before that step's
  validation ran (mmengine saves first) runs the validation when it is resumed, so the metric is reported and
  ``save_best`` sees it, as in the uninterrupted run.
"""
from __future__ import annotations

import random
from typing import Iterator, Optional

import numpy as np
import torch
from mmengine.hooks import Hook

__all__ = ["RunningStatsSyncHook", "StepRandomnessHook", "OwedValidationHook", "step_seed", "seed_data_loading"]


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


class SampleIndex(int):
    """A dataset index that carries where the sampler yielded it: ``key`` is ``(epoch, position)``, the
    epoch of the sampler (0 without one) and the index's position in that epoch's order. Behaves as the int."""

    key: tuple = ()

    def __new__(cls, index: int, key: tuple) -> "SampleIndex":
        obj = super().__new__(cls, index)
        obj.key = key
        return obj

    def __reduce__(self):  # sent to the workers with its key
        return SampleIndex, (int(self), self.key)


class KeyedSampler:
    """Wraps a sampler (a batch sampler's ``sampler``): yields its indices as :class:`SampleIndex` keyed by the
    wrapped sampler's ``epoch`` (set by mmengine's ``DistSamplerSeedHook`` before the epoch starts) and the
    position in the epoch. Everything else is the wrapped sampler's."""

    def __init__(self, sampler) -> None:
        self.sampler = sampler
        #: positions the next pass leaves out (a run resumed inside an epoch: the batches already trained); the
        #: other positions keep their numbers, so their samples draw what they drew in the uninterrupted run
        self.skip = 0

    def __iter__(self):
        epoch = getattr(self.sampler, "epoch", 0)
        epoch = epoch if isinstance(epoch, int) else 0
        skip, self.skip = self.skip, 0
        for position, index in enumerate(self.sampler):
            if position >= skip:
                yield SampleIndex(index, (epoch, position)) if isinstance(index, int) else index

    def __len__(self) -> int:
        return len(self.sampler)

    def __getattr__(self, name: str):
        if name == "sampler":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.sampler, name)


class SeededFetch:
    """The ``__getitems__`` torch's fetcher calls on a dataset (in the worker, or in the main process): loads
    each sample with the generators (torch, numpy, ``random``) seeded from ``(seed, *index.key, index)``, and
    gives the process its generators back afterwards."""

    def __init__(self, dataset, seed: int, inner=None) -> None:
        self.dataset, self.seed, self.inner = dataset, int(seed), inner

    def _load(self, index):
        return self.inner([index])[0] if self.inner is not None else self.dataset[index]

    def __call__(self, indices):
        state = (torch.get_rng_state(), np.random.get_state(), random.getstate())
        try:
            out = []
            for index in indices:
                key = getattr(index, "key", None)
                if key is not None:
                    _seed_all(step_seed(self.seed, 3, *key, int(index)))
                out.append(self._load(int(index) if isinstance(index, int) else index))
            return out
        finally:
            torch.set_rng_state(state[0])
            np.random.set_state(state[1])
            random.setstate(state[2])


def seed_data_loading(loader, seed: Optional[int]) -> bool:
    """Make the random numbers each sample's loading draws a function of ``(seed, epoch, position, index)``
    (see the module docstring): the loader's batch sampler draws from a :class:`KeyedSampler` and its dataset
    loads through :class:`SeededFetch`. Call it before the loader is first iterated (workers copy the dataset
    when they start). Returns False (nothing changed) for a loader without a batch sampler of its own
    sampler, a dataset that takes no attribute, ``seed`` None, or one done already."""
    from torch.utils.data import DataLoader

    batch_sampler = getattr(loader, "batch_sampler", None)
    dataset = getattr(loader, "dataset", None)
    if seed is None or not isinstance(loader, DataLoader) or batch_sampler is None \
            or not hasattr(batch_sampler, "sampler") or isinstance(batch_sampler.sampler, KeyedSampler):
        return False
    inner = getattr(type(dataset), "__getitems__", None)
    try:
        dataset.__getitems__ = SeededFetch(dataset, seed, inner.__get__(dataset) if inner is not None else None)
    except AttributeError:  # a dataset that takes no attributes (__slots__): left as it is
        return False
    batch_sampler.sampler = KeyedSampler(batch_sampler.sampler)
    return True


def trained_batches(loop) -> int:
    """How many batches of its current epoch an epoch-based ``loop`` has trained (``iter - epoch x length``): 0
    at an epoch boundary, more for a run resumed from a checkpoint saved inside an epoch (by iteration), the
    epoch's length at its last step (an iteration checkpoint records the epoch as unfinished). -1 when the
    loader has no length."""
    try:
        n = len(loop.dataloader)
    except TypeError:
        return -1
    return int(getattr(loop, "_iter", 0)) - int(getattr(loop, "_epoch", 0)) * n


def skip_trained_batches(loop) -> int:
    """Make the next pass of an epoch-based ``loop``'s loader leave out the batches of the current epoch that
    were trained before the checkpoint it resumed from (mmengine's ``EpochBasedTrainLoop`` restarts the epoch:
    its first batches trained twice, the schedule run past its end). The samples left out are those the
    uninterrupted run drew at those positions (the sampler's order is a function of ``(seed, epoch)``; each
    sample's randomness of ``(seed, epoch, position, index)``, :func:`seed_data_loading`), so the rest of the
    epoch is the uninterrupted run's; at the epoch's last step nothing is left and the epoch's end (its
    validation, scheduler step, epoch checkpoint) follows. Returns the number of batches left out.
    ``ValueError`` when there is something to leave out but the loader cannot (not seeded: no
    :class:`KeyedSampler`); the set-up checks (:func:`internvit.run_checks.check_train_loop`) refuse a count
    outside ``[0, epoch length]`` (another batch size, data or number of processes)."""
    done = trained_batches(loop)
    if done <= 0:
        return 0
    batch_sampler = getattr(loop.dataloader, "batch_sampler", None)
    sampler = getattr(batch_sampler, "sampler", None)
    if not isinstance(sampler, KeyedSampler) or not isinstance(getattr(batch_sampler, "batch_size", None), int):
        raise ValueError(f"resumed inside epoch {loop._epoch + 1} (after {done} of its batches), and the train "
                         f"loader cannot leave the trained batches out (no seeded batch sampler): resume from an "
                         f"epoch checkpoint (epoch_N.pth)")
    sampler.skip = done * batch_sampler.batch_size
    epoch, run_iter = loop._epoch, loop.run_iter

    def resumed_run_iter(idx: int, data_batch) -> None:
        """The resumed epoch's batches keep their numbers (``batch_idx`` of the hooks: the log's
        ``[epoch][batch/len]``, the logger's end-of-epoch test), as in the uninterrupted run."""
        return run_iter(idx + done if loop._epoch == epoch else idx, data_batch)

    loop.run_iter = resumed_run_iter
    return done


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

    def before_train(self, runner) -> None:
        """A runner whose train loader was not seeded when it was built (``internvit.runner`` does it then): an
        epoch-based loop's loader is first iterated after this, so it is seeded here. A run resumed inside an
        epoch (a checkpoint saved by iteration) continues that epoch after the batches it trained
        (:func:`skip_trained_batches`)."""
        from mmengine.runner import EpochBasedTrainLoop

        loop = getattr(runner, "_train_loop", None)
        if isinstance(loop, EpochBasedTrainLoop):
            seed_data_loading(loop.dataloader, runner.seed)
            skip_trained_batches(loop)

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


def owed_validation(loop, val_loop) -> Optional[str]:
    """``'iteration N'`` / ``'epoch N'`` when the training ``loop``, just resumed at a step that is not its
    first, stands where the uninterrupted run validated (the loop's own rule: ``val_begin``, ``val_interval``,
    the last step) and ``val_loop`` exists: the checkpoint was saved before that validation ran (mmengine's
    checkpoint hook saves first), so the resumed run owes it. None otherwise."""
    if val_loop is None or loop is None:
        return None
    by_epoch = "Epoch" in type(loop).__name__
    done = getattr(loop, "_epoch" if by_epoch else "_iter", 0)
    end = getattr(loop, "_max_epochs" if by_epoch else "_max_iters", None)
    interval, begin = getattr(loop, "val_interval", None), getattr(loop, "val_begin", 1)
    if not isinstance(done, int) or done < 1 or not isinstance(interval, int) or interval < 1:
        return None
    if by_epoch and getattr(loop, "_iter", 0) != done * _epoch_length(loop):
        return None  # inside an epoch: no validation was due there
    if done >= begin and (done % interval == 0 or done == end):
        return f"{'epoch' if by_epoch else 'iteration'} {done}"
    return None


def _epoch_length(loop) -> int:
    try:
        return len(loop.dataloader)
    except TypeError:
        return -1


class OwedValidationHook(Hook):
    """Run, when a resumed run starts, the validation that the interrupted run owed at its checkpoint's step
    (:func:`owed_validation`): the checkpoint of a validation step is written before that validation runs, so
    a kill in between (the final validation over the whole val set is the slowest part of a run) left no metric
    and ``save_best`` kept an older best; the resumed run continued (or finished) without it. When the killed
    run had validated already, the validation runs again on the same weights (the same metric)."""

    priority = "LOWEST"  # after every other hook's before_train (the resume is done: runner.iter is restored)

    def before_train(self, runner) -> None:
        if not getattr(runner, "_resume", False):
            return
        where = owed_validation(getattr(runner, "_train_loop", None), getattr(runner, "val_loop", None))
        if where is None:
            return
        loop = runner.train_loop
        done = getattr(loop, "_iter", 0) >= getattr(loop, "_max_iters", float("inf"))  # both loops count iterations
        runner.logger.info(f"resumed at {where}{' (the end of training)' if done else ''}: its checkpoint is written "
                           f"before that step's validation, which the earlier run may not have finished: validating "
                           f"now (the same weights give the same metric)")
        runner.val_loop.run()
        runner.model.train()
