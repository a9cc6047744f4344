"""Train probe heads on cached features: extract the frozen backbone's features once, then reuse them.

:class:`CachedFeatureDataset` wraps an image dataset (e.g. :class:`~classification.datasets.ImageFolderDataset`
with its eval transform). On first use it runs :class:`internvit.FeatureExtractor` over the images and
writes the features with :meth:`~internvit.features.FeatureExtractor.write` (sharded, atomic, resumable);
later runs read them back with :func:`internvit.features.read_features`. What is cached is exactly what
the probe head consumes from the frozen backbone:

* ``feature='cls_mean'`` (linear probe): ``concat(class token, mean patch token)`` of the last block,
  ``(2C,)`` per image — the FeatureExtractor's ``pool='cls_mean'``, the same float32 op as
  :meth:`ClsPatchConcatHead.pool`.
* ``feature='tokens'`` (attention pooling): the last block's full token sequence ``(1 + h*w, C)`` (class
  token first), written flattened by an ``embed_fn`` and reshaped on read.

Caching fixes the images' preprocessing, so the train split uses the eval transform (no random crops,
flips, Mixup / CutMix); document this when comparing with on-the-fly training.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import ImageFolderDataset
from .probes import backbone_config, backbone_spec, build_backbone
from .registry import DATASETS

CACHE_FEATURES = ("cls_mean", "tokens")
CACHE_INFO = "probe_cache.json"


def _weights_stamp(path: Optional[str]) -> Optional[list]:
    """Names, sizes and modification times of the pretrained weight files (cheap change detection)."""
    if path is None:
        return None
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    return [[os.path.basename(f), os.path.getsize(f), int(os.path.getmtime(f))] for f in files if os.path.isfile(f)]


def cache_key(spec: dict, feature: str, dataset: ImageFolderDataset) -> dict:
    """What the cached features depend on: backbone spec and weight files, feature kind, preprocessing, images."""
    paths = hashlib.sha256("\n".join(f"{p}\t{y}" for p, y in dataset.samples).encode()).hexdigest()
    return json.loads(json.dumps(dict(
        backbone=spec, weights=_weights_stamp(spec["pretrained"]), feature=feature,
        transform=dataset.transform_cfg, num_images=len(dataset), images_checksum=paths), default=str))


def extract_features(spec: Union[dict, str], dataset: ImageFolderDataset, out_dir: str, feature: str = "cls_mean",
                     *, batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                     progress: bool = True) -> dict:
    """Write the probe features of ``dataset``'s images to ``out_dir`` (FeatureExtractor layout + labels).

    Returns the FeatureExtractor manifest. Raises if an image cannot be read (naming it): a probe trained
    on silently fewer images would not be comparable.
    """
    from internvit.features import FeatureExtractor

    if feature not in CACHE_FEATURES:
        raise ValueError(f"feature must be one of {CACHE_FEATURES}, got {feature!r}")
    spec = backbone_spec(spec)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model = build_backbone(spec)
    if (dataset.transform_cfg or {}).get("train", False):
        raise ValueError("feature caching needs a deterministic transform: set transform=dict(train=False, ...)")
    preprocess = dataset.transform  # the very transform the on-the-fly path uses
    kwargs = dict(batch_size=batch_size, num_workers=num_workers, device=device, dtype=model.dtype,
                  progress=progress)
    if feature == "cls_mean":
        extractor = FeatureExtractor(model, preprocess, pool="cls_mean", **kwargs)
    else:
        def tokens_flat(x: torch.Tensor) -> torch.Tensor:
            return model.forward_features(x).flatten(1)

        extractor = FeatureExtractor(model, preprocess, embed_fn=tokens_flat, **kwargs)
    with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed: leave the training RNG untouched
        manifest = extractor.write(dataset.paths, out_dir, extra_columns={"label": dataset.labels},
                                   manifest_extra={"probe_feature": feature})
    if manifest["num_errors"]:
        with open(os.path.join(out_dir, "errors.jsonl"), encoding="utf-8") as f:
            first = json.loads(f.readline())
        raise RuntimeError(f"{manifest['num_errors']} images could not be read (first: {first['path']}: "
                           f"{first['error']}); fix or remove them, then delete {out_dir}")
    return manifest


@DATASETS.register_module()
class CachedFeatureDataset(Dataset):
    """Cached frozen-backbone features of an image dataset, extracted on first use.

    Args:
        dataset: the image dataset (config dict or instance), with an eval (``train=False``) transform.
        backbone: the backbone spec of the model (same dict as ``model.backbone``).
        cache_dir: where the features live; a folder made for other inputs (see :func:`cache_key`) is
            re-extracted, a non-cache folder is never touched.
        feature: ``'cls_mean'`` (linear probe) or ``'tokens'`` (attention pooling).
        batch_size, num_workers, device: for the extraction.
    """

    def __init__(self, dataset: Union[dict, ImageFolderDataset], backbone: Union[dict, str], cache_dir: str,
                 feature: str = "cls_mean", batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                 progress: bool = True) -> None:
        from mmengine.dist import get_world_size

        if feature not in CACHE_FEATURES:
            raise ValueError(f"feature must be one of {CACHE_FEATURES}, got {feature!r}")
        if isinstance(dataset, dict):
            dataset = DATASETS.build(dataset)
        if not isinstance(dataset, ImageFolderDataset):
            raise TypeError(f"CachedFeatureDataset needs an ImageFolderDataset, got {type(dataset).__name__}")
        self.source, self.feature = dataset, feature
        spec = backbone_spec(backbone)
        cache_dir = os.path.expanduser(os.fspath(cache_dir))
        key = cache_key(spec, feature, dataset)
        self.extracted = False
        if not self._is_valid(cache_dir, key):
            if get_world_size() > 1:  # rank 0 alone would extract while the other ranks time out at a barrier
                raise RuntimeError(f"CachedFeatureDataset: {cache_dir} is missing or stale; distributed runs do not "
                                   f"extract features: fill the cache with one single-process run of the same "
                                   f"config first (python tools/train.py CONFIG), then relaunch")
            self._prepare(cache_dir)
            extract_features(spec, dataset, cache_dir, feature, batch_size=batch_size, num_workers=num_workers,
                             device=device, progress=progress)
            with open(os.path.join(cache_dir, CACHE_INFO), "w", encoding="utf-8") as f:
                json.dump(key, f, indent=2)
            self.extracted = True
        self.features, self.labels = self._read(cache_dir, feature)
        if len(self.labels) != len(dataset):
            raise RuntimeError(f"{cache_dir}: {len(self.labels)} cached rows for {len(dataset)} images")
        self.cache_dir = cache_dir

    @staticmethod
    def _is_valid(cache_dir: str, key: dict) -> bool:
        info = os.path.join(cache_dir, CACHE_INFO)
        if not (os.path.isfile(info) and os.path.isfile(os.path.join(cache_dir, "manifest.json"))):
            return False
        with open(info, encoding="utf-8") as f:
            try:
                return json.load(f) == key
            except json.JSONDecodeError:
                return False

    @staticmethod
    def _prepare(cache_dir: str) -> None:
        """Remove a stale cache (only a folder this class made); refuse to touch anything else."""
        if not os.path.exists(cache_dir):
            return
        ours = os.path.isfile(os.path.join(cache_dir, CACHE_INFO))
        if ours:
            shutil.rmtree(cache_dir)
        elif os.listdir(cache_dir) and not os.path.isfile(os.path.join(cache_dir, "progress.json")):
            raise FileExistsError(f"{cache_dir}: exists and is not a probe feature cache; choose another cache_dir")

    @staticmethod
    def _read(cache_dir: str, feature: str) -> tuple[np.ndarray, np.ndarray]:
        from internvit.features import read_features

        feats, rows = read_features(cache_dir)
        labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
        if feature == "tokens":
            with open(os.path.join(cache_dir, CACHE_INFO), encoding="utf-8") as f:
                c = backbone_config(json.load(f)["backbone"]).hidden_size
            feats = feats.reshape(len(feats), -1, c)
        return feats, labels

    @property
    def metainfo(self) -> dict:
        return self.source.metainfo

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        return dict(inputs=torch.from_numpy(np.ascontiguousarray(self.features[idx])),
                    data_samples=dict(gt_label=int(self.labels[idx]), index=idx))
