"""Reproducible few-shot subsets (the reference's 1/16 … 1/2 ADE20K splits) and the hook that records them.

The reference shuffles the training list with an unseeded ``random.shuffle`` and keeps ``len // k`` images,
so its subsets cannot be reproduced. Here the shuffle is seeded (``subset_seed``) over the sorted list, the
chosen files are written to ``<work_dir>/few_shot_subset.txt`` by :class:`SaveSubsetListHook`, and passing that
file back as ``subset_file=`` reproduces the run exactly.
"""
from __future__ import annotations

import os
import random
from typing import Optional

from mmengine.hooks import Hook
from mmseg.datasets import ADE20KDataset, BaseSegDataset
from mmseg.registry import DATASETS, HOOKS

from internvit.fileio import atomic_write

SUBSET_LIST_NAME = "few_shot_subset.txt"


def choose_subset(n: int, divisor: int, seed: int) -> list[int]:
    """Indices of a seeded ``n // divisor`` subset of ``range(n)`` (sorted)."""
    if divisor < 1:
        raise ValueError(f"subset_divisor must be >= 1, got {divisor}")
    idx = list(range(n))
    if divisor == 1:
        return idx
    if n and n // divisor == 0:
        raise ValueError(f"subset_divisor={divisor} keeps {n} // {divisor} = 0 of the {n} images (give a "
                         f"subset_divisor of at most {n})")
    random.Random(seed).shuffle(idx)
    return sorted(idx[: n // divisor])


class FewShotMixin:
    """Keeps a seeded ``1/subset_divisor`` of the data list, or exactly the files listed in ``subset_file``."""

    def __init__(self, *args, subset_divisor: int = 1, subset_seed: int = 0, subset_file: Optional[str] = None,
                 **kwargs) -> None:
        self.subset_divisor = int(subset_divisor)
        self.subset_seed = int(subset_seed)
        self.subset_file = subset_file
        self.subset_files: list[str] = []
        super().__init__(*args, **kwargs)

    def _rel(self, info: dict) -> str:
        return os.path.relpath(info["img_path"], self.data_prefix.get("img_path", ""))

    def load_data_list(self) -> list[dict]:
        data_list = sorted(super().load_data_list(), key=lambda d: d["img_path"])
        if self.subset_file:
            wanted = read_subset_list(self.subset_file)
            by_name = {self._rel(d): d for d in data_list}
            missing = [w for w in wanted if w not in by_name]
            if missing:
                raise FileNotFoundError(f"{self.subset_file}: {len(missing)} listed images are not in the dataset "
                                        f"(first: {missing[0]})")
            data_list = [by_name[w] for w in wanted]
        else:
            data_list = [data_list[i] for i in choose_subset(len(data_list), self.subset_divisor, self.subset_seed)]
        self.subset_files = [self._rel(d) for d in data_list]
        return data_list


@DATASETS.register_module()
class FewShotADE20KDataset(FewShotMixin, ADE20KDataset):
    """ADE20K (150 classes, ``reduce_zero_label``) restricted to a reproducible few-shot subset."""


@DATASETS.register_module()
class FewShotSegDataset(FewShotMixin, BaseSegDataset):
    """Any :class:`BaseSegDataset` layout (give ``metainfo``) restricted to a reproducible few-shot subset."""


def _find_subset_dataset(dataset):
    while dataset is not None:
        if isinstance(dataset, FewShotMixin):
            return dataset
        dataset = getattr(dataset, "dataset", None)
    return None


def read_subset_list(path: str) -> list[str]:
    """The image names a subset list (``few_shot_subset.txt``, a ``subset_file``) holds, in order."""
    with open(path, encoding="utf-8-sig") as f:
        return [line.strip() for line in f if line.strip()]


@HOOKS.register_module()
class SaveSubsetListHook(Hook):
    """Writes the training subset's file list to ``<work_dir>/few_shot_subset.txt`` (atomically) before training.

    A resumed run keeps the file of the run it continues: its subset must be that list (the data folder may have
    changed since, and a re-drawn subset would train the rest of the run on other images), else the run is
    refused at set-up (:meth:`check_setup`), naming the first difference; the file is never rewritten then."""

    priority = "VERY_LOW"

    @staticmethod
    def _recorded(runner) -> Optional[str]:
        path = os.path.join(runner.work_dir, SUBSET_LIST_NAME)
        return path if getattr(runner, "_resume", False) and os.path.isfile(path) else None

    def check_setup(self, runner) -> None:
        loader = getattr(runner, "_train_dataloader", None)
        ds = _find_subset_dataset(getattr(loader, "dataset", None))
        path = self._recorded(runner)
        if ds is None or path is None:
            return
        recorded, now = read_subset_list(path), list(ds.subset_files)
        if recorded == now:
            return
        i = next((i for i, (a, b) in enumerate(zip(recorded, now)) if a != b), min(len(recorded), len(now)))
        if i < len(recorded) and i < len(now):
            first = f"{recorded[i]} there, {now[i]} now"
        else:
            first = f"{recorded[i]} only there" if i < len(recorded) else f"{now[i]} only now"
        raise ValueError(f"train_dataloader.dataset: the few-shot subset differs from the one this run started "
                         f"with, recorded in {path} ({len(recorded)} vs {len(now)} images, first difference at "
                         f"line {i + 1}: {first}): the data folder changed since; resuming would train the rest "
                         f"of the run on other images. Restore the data, or resume on the recorded subset with "
                         f"train_dataloader.dataset.subset_file={path} if all its images are still there")

    def before_train(self, runner) -> None:
        ds = _find_subset_dataset(getattr(runner.train_dataloader, "dataset", None))
        if ds is None or runner.rank != 0:
            return
        path = os.path.join(runner.work_dir, SUBSET_LIST_NAME)
        if self._recorded(runner):  # the same list (check_setup): the record of the run's start stays
            runner.logger.info(f"few-shot subset: {len(ds.subset_files)} images, as recorded in {path}")
            return
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
            f.write("\n".join(ds.subset_files) + "\n")
        runner.logger.info(f"few-shot subset: {len(ds.subset_files)} images (divisor {ds.subset_divisor}, "
                           f"seed {ds.subset_seed}) listed in {path}")
