"""Loader workers read a batch together (units of >= MIN_WORKER_UNIT images), joined back into the same batch.

A worker used to read a whole batch: the first batch waited for one worker to decode all its images. Split
into units, the model still sees the same batches, so features, ids and skipped files do not change.
"""
import os

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

from internvit.data import MIN_WORKER_UNIT, join_units, worker_units
from internvit.features import FeatureExtractor

from .images import make_bad_files, make_images


def test_worker_units_split_each_batch_in_order():
    batches = [list(range(0, 64)), list(range(64, 100))]
    units, counts = worker_units(batches, 4)
    assert counts == [4, 4] and [len(u) for u in units] == [16] * 4 + [9] * 4
    assert [i for u in units for i in u] == list(range(100))
    units, counts = worker_units(batches, 14)  # never fewer than MIN_WORKER_UNIT images per unit
    assert min(len(u) for u in units[:-1]) >= MIN_WORKER_UNIT and counts == [8, 5]
    for n in (0, 1):  # one reader: the batches themselves
        assert worker_units(batches, n) == (batches, [1, 1])


def test_join_units_keeps_ids_errors_and_names_mixed_sizes():
    a, b = torch.zeros(2, 3, 4, 4), torch.ones(1, 3, 4, 4)
    x, ids, errors = join_units([(a, [0, 1], [(2, "bad")]), (None, [], [(3, "worse")]), (b, [4], [])])
    assert torch.equal(x, torch.cat([a, b])) and ids == [0, 1, 4] and errors == [(2, "bad"), (3, "worse")]
    assert join_units([(None, [], [(5, "e")]), (None, [], [(6, "f")])]) == (None, [], [(5, "e"), (6, "f")])
    with pytest.raises(ValueError, match=r"input rows 0 and 4 give pixels of shapes \(3, 4, 4\) and \(3, 5, 5\)"):
        join_units([(a, [0, 1], []), (torch.zeros(1, 3, 5, 5), [4], [])])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = str(tmp_path_factory.mktemp("units"))
    make_images(d, 21)
    make_bad_files(d)  # two unreadable files inside the batches
    return d


def test_workers_give_the_features_of_one_reader(tiny_model, folder):
    want = FeatureExtractor(tiny_model, batch_size=20).extract(folder)
    fx = FeatureExtractor(tiny_model, batch_size=20, num_workers=2)
    assert worker_units(fx._batches(0, 23), 2)[1] == [2, 1]  # the first batch is read as two units
    got = fx.extract(folder)
    assert len(got.ids) == 21 and len(got.errors) == 2
    assert got.ids == want.ids and got.errors == want.errors and got.paths == want.paths
    assert np.array_equal(got.features, want.features)  # the same batches reached the model


class _Sizes(Dataset):
    """Rows 8-11 (the batch's second unit) have their own size."""

    def __init__(self, size):
        self.size, self.paths = size, [f"row{i}" for i in range(12)]

    def __len__(self):
        return 12

    def __getitem__(self, i):
        s = self.size + (self.size if i >= 8 else 0)
        return torch.zeros(3, s, s), i, None


def test_mixed_sizes_across_units_are_named(tiny_model):
    fx = FeatureExtractor(tiny_model, batch_size=12, num_workers=2)
    with pytest.raises(ValueError, match=r"input rows 0 and 8 give pixels of shapes"):
        fx.extract(_Sizes(fx.preprocessing["image_size"]))


def test_write_with_workers_equals_one_reader(tiny_model, folder, tmp_path):
    one = FeatureExtractor(tiny_model, batch_size=20).write(folder, str(tmp_path / "one"))
    two = FeatureExtractor(tiny_model, batch_size=20, num_workers=2).write(folder, str(tmp_path / "two"))
    for name in sorted(os.listdir(tmp_path / "one")):
        if name.endswith(".npy"):
            assert np.array_equal(np.load(tmp_path / "one" / name), np.load(tmp_path / "two" / name)), name
    assert one is not None and two is not None


class _WhoReads(Dataset):
    """Notes which loader worker read each row (a file per row)."""

    def __init__(self, size, folder):
        self.size, self.folder, self.paths = size, folder, [f"row{i}" for i in range(32)]

    def __len__(self):
        return 32

    def __getitem__(self, i):
        worker = torch.utils.data.get_worker_info()
        with open(os.path.join(self.folder, f"{i}-{worker.id if worker else 'main'}"), "w"):
            pass
        return torch.full((3, self.size, self.size), float(i)), i, None


def test_the_first_batch_is_read_by_every_worker(tiny_model, tmp_path):
    fx = FeatureExtractor(tiny_model, batch_size=16, num_workers=2)
    fx.extract(_WhoReads(fx.preprocessing["image_size"], str(tmp_path)))
    readers = {int(name.split("-")[0]): name.split("-")[1] for name in os.listdir(tmp_path)}
    assert sorted(readers) == list(range(32))
    assert {readers[i] for i in range(16)} == {"0", "1"}  # one worker per unit of 8, not one per batch
