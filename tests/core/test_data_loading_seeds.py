"""trial8b F1 / F2: the random numbers a training sample's loading draws come from ``(seed, epoch, position,
index)`` (:func:`internvit.train_hooks.seed_data_loading`), in DataLoader workers too: mmengine seeds a worker
once with ``seed + worker_id``, so persistent workers carried epoch 1's stream into epoch 2 (a resumed run, with a
fresh worker there, drew other crops) and non-persistent ones repeated epoch 1's numbers in every epoch."""
import random
from functools import partial

import numpy as np
import pytest
import torch
from mmengine.dataset import DefaultSampler, worker_init_fn
from torch.utils.data import DataLoader, Dataset

from internvit.train_hooks import seed_data_loading


class RandomDraws(Dataset):
    """Each sample: its index and one number from each generator an augmentation or a negative draws from."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return (int(i), float(torch.rand(1)), float(np.random.rand()), random.random())


def loader(workers: int, persistent: bool, seed: int = 7, shuffle: bool = True) -> DataLoader:
    """As mmengine's Runner.build_dataloader builds it (DefaultSampler, its worker_init_fn), seeded."""
    ds = RandomDraws()
    dl = DataLoader(ds, batch_size=2, sampler=DefaultSampler(ds, shuffle=shuffle, seed=seed), num_workers=workers,
                    persistent_workers=persistent, collate_fn=list,
                    worker_init_fn=partial(worker_init_fn, num_workers=max(workers, 1), rank=0, seed=seed)
                    if workers else None)
    assert seed_data_loading(dl, seed)
    return dl


def epoch(dl: DataLoader, n: int) -> list:
    dl.sampler.set_epoch(n)  # mmengine's DistSamplerSeedHook, before the epoch
    return [s for batch in dl for s in batch]


@pytest.mark.parametrize("persistent", [True, False])
def test_each_epoch_draws_its_own_numbers_and_a_fresh_worker_the_same_ones(persistent):
    dl = loader(1, persistent)
    first, second = epoch(dl, 0), epoch(dl, 1)
    by_index = [{s[0]: s[1:] for s in e} for e in (first, second)]
    assert all(by_index[0][i] != by_index[1][i] for i in range(8))  # F2: epoch 2 did repeat epoch 1's numbers
    # F1: a resumed run starts a fresh worker at epoch 2; it must draw what the long-lived worker drew
    assert epoch(loader(1, persistent), 1) == second
    # and the number of workers does not change what is drawn
    assert epoch(loader(0, False), 1) == second
    assert epoch(loader(2, False), 1) == second


def test_non_persistent_workers_do_not_repeat_the_first_epoch():
    dl = loader(1, False, shuffle=False)  # the same samples in the same order every epoch
    first, second = epoch(dl, 0), epoch(dl, 1)
    assert [s[0] for s in first] == [s[0] for s in second]
    assert all(a[1:] != b[1:] for a, b in zip(first, second))  # other crops / negatives each epoch


def test_main_process_generators_are_given_back():
    dl = loader(0, False)
    torch.manual_seed(3)
    expected = torch.rand(1)
    batches = iter(dl)  # the DataLoader itself draws a base seed here
    torch.manual_seed(3)
    list(batches)
    assert torch.equal(torch.rand(1), expected)
