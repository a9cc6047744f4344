"""The background reader of FeatureExtractor (no workers): order, bounded look-ahead, errors, early stop."""
import threading
import time

import pytest
import torch
from torch.utils.data import Dataset

from internvit.features import FeatureExtractor, prefetch


def _prefetch_threads():
    return [t for t in threading.enumerate() if t.name == "internvit-prefetch"]


def test_order_and_bounded_look_ahead():
    produced = []

    def source():
        for i in range(20):
            produced.append(i)
            yield i

    got = []
    for x in prefetch(source(), depth=2):
        time.sleep(0.01)  # let the producer run ahead as far as it may
        assert len(produced) - len(got) <= 2 + 2  # queue (2) + the item handed over + the one being produced
        got.append(x)
    assert got == list(range(20))
    assert not _prefetch_threads()


def test_errors_are_raised_at_their_item():
    def source():
        yield 1
        yield 2
        raise KeyError("item 3")

    got = []
    with pytest.raises(KeyError, match="item 3"):
        for x in prefetch(source()):
            got.append(x)
    assert got == [1, 2]
    assert not _prefetch_threads()


def test_leaving_early_stops_the_thread():
    def endless():
        i = 0
        while True:
            yield i
            i += 1

    gen = prefetch(endless(), depth=3)
    assert [next(gen) for _ in range(5)] == [0, 1, 2, 3, 4]
    gen.close()
    assert not _prefetch_threads()


class _BadItems(Dataset):
    """Item 5 is not a tensor: a programming error that must surface, not be swallowed by the thread."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        return "oops" if i == 5 else torch.zeros(3, 28, 28)


def test_extract_raises_dataset_errors_from_the_reader(tiny_model):
    fe = FeatureExtractor(tiny_model, batch_size=2, num_workers=0, progress=False)
    with pytest.raises(TypeError, match="item 5"):
        fe.extract(_BadItems())
    assert not _prefetch_threads()


def test_extract_reports_input_wait(tiny_model, image_dir):
    fe = FeatureExtractor(tiny_model, batch_size=4, num_workers=0, progress=False)
    res = fe.extract(image_dir["folder"])
    assert len(res.ids) > 0 and 0 <= fe.last_stats["input_wait_seconds"] <= fe.last_stats["seconds"]
