"""Train probe heads on cached features: extract the frozen backbone's features once, then reuse them.

:class:`CachedFeatureDataset` wraps an image dataset (e.g. :class:`~classification.datasets.ImageFolderDataset`
with its eval transform). On first use it runs :class:`internvit.FeatureExtractor` over the images and
writes the features with :meth:`~internvit.features.FeatureExtractor.write`, which commits through the durable
store (:mod:`internvit.store`): the cache key (:func:`cache_key`) is part of the committed manifest, so the cache
is valid exactly when its manifest is committed with this key; a run killed at any point is finished by the
next run, never refused. A cache made for other inputs is replaced whole: the new one is extracted beside it
and swapped in once complete, so a re-extraction that fails leaves the earlier valid cache in place. Later runs
memory-map the features (:func:`internvit.features.open_features`): every
rank shares the page cache instead of holding its own copy. What is cached is exactly what the probe head
consumes from the frozen backbone:

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
from typing import Optional, Union

import numpy as np
import torch
from torch.utils.data import Dataset

from .datasets import ImageFolderDataset
from .probes import backbone_config, backbone_spec, build_backbone
from .registry import DATASETS

CACHE_FEATURES = ("cls_mean", "tokens")
#: the manifest field that holds the cache key
CACHE_KEY = "probe_cache"


def _file_stamp(path: str) -> list:
    """``[size, mtime_ns]`` of a file: one ``os.stat``, no reading (rsync's quick check). Rewriting the file
    changes them; a copy that keeps modification times (``rsync -a``, ``cp -p``: per-node copies of a dataset)
    keeps them. The status-change time is left out on purpose: no copy can keep it."""
    st = os.stat(path)
    return [st.st_size, st.st_mtime_ns]


def _weights_stamp(path: Optional[str]) -> Optional[list]:
    """Names, sizes and modification times (ns) of the pretrained weight files."""
    if path is None:
        return None
    files = [os.path.join(path, f) for f in sorted(os.listdir(path))] if os.path.isdir(path) else [path]
    return [[os.path.basename(f), *_file_stamp(f)] for f in files if os.path.isfile(f)]


def cache_key(spec: dict, feature: str, dataset: ImageFolderDataset) -> dict:
    """What the cached features depend on: backbone spec and weight files, feature kind, preprocessing, images.

    The images enter through a checksum over each one's path, label, size and modification time in ns (one
    ``os.stat`` per image, no reading): an image rewritten under the same path gives another key, so its
    features are extracted again. Raises ``FileNotFoundError`` naming an image that does not exist.
    """
    h = hashlib.sha256()
    for p, y in dataset.samples:  # streamed: memory does not grow with the number of images
        try:
            size, mtime = _file_stamp(p)
        except FileNotFoundError:
            raise FileNotFoundError(f"{p}: image listed in the dataset not found") from None
        h.update(f"{p}\t{y}\t{size}\t{mtime}\n".encode("utf-8", "surrogateescape"))
    images = h.hexdigest()
    return json.loads(json.dumps(dict(
        backbone=spec, weights=_weights_stamp(spec["pretrained"]), feature=feature,
        transform=dataset.transform_cfg, num_images=len(dataset), images_checksum=images), default=str))


def extract_features(spec: Union[dict, str], dataset: ImageFolderDataset, out_dir: str, feature: str = "cls_mean",
                     *, batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                     progress: bool = True, key: Optional[dict] = None, replace: bool = False) -> dict:
    """Write the probe features of ``dataset``'s images to ``out_dir`` (FeatureExtractor layout + labels).

    Returns the FeatureExtractor manifest (``probe_feature`` and, when given, the cache ``key`` under
    ``probe_cache`` are part of it and of the job identity). ``replace=True`` lets a stale committed cache or an
    interrupted job of other arguments be replaced (only for folders known to be caches). Raises if an image
    cannot be read or gives non-finite features (naming it): a probe trained on silently fewer images would not
    be comparable.
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
    extra = {"probe_feature": feature}
    if key is not None:
        extra[CACHE_KEY] = key
    with torch.random.fork_rng(devices=[]):  # the DataLoader draws a seed: leave the training RNG untouched
        manifest = extractor.write(dataset.paths, out_dir, extra_columns={"label": dataset.labels},
                                   manifest_extra=extra, overwrite=replace, discard_pending=replace)
    _check_errors(out_dir, manifest)
    return manifest


def _check_errors(out_dir: str, manifest: dict) -> None:
    if manifest.get("num_errors"):
        with open(os.path.join(out_dir, manifest.get("errors_file", "errors.jsonl")), encoding="utf-8") as f:
            first = json.loads(f.readline())
        from internvit.data import DataError

        raise DataError(f"{manifest['num_errors']} images could not be read or gave non-finite features "
                           f"(first: {first['path']}: {first['error']}); fix or remove them, then rerun")


def _pending_job(cache_dir: str) -> Optional[dict]:
    """The job of an interrupted write in ``cache_dir`` (the store journal's first record), if any."""
    from internvit.store import JOURNAL

    try:
        with open(os.path.join(cache_dir, JOURNAL), encoding="utf-8") as f:
            rec = json.loads(f.readline())
    except (OSError, ValueError):
        return None
    return rec.get("job") if isinstance(rec, dict) and rec.get("op") == "begin" else None


def _is_cache(cache_dir: str, manifest: Optional[dict]) -> bool:
    """Whether ``cache_dir`` is missing/empty or holds (committed or pending) probe feature caches only."""
    if not os.path.exists(cache_dir):
        return True
    if manifest is not None:
        return CACHE_KEY in manifest
    pending = _pending_job(cache_dir)
    if pending is not None:
        return CACHE_KEY in (pending.get("extra") or {})
    return not [e for e in os.listdir(cache_dir) if e != ".store"]


def _replace_cache(spec: dict, dataset: ImageFolderDataset, cache_dir: str, feature: str, kwargs: dict) -> dict:
    """Extract a new cache into a temporary folder beside ``cache_dir`` and swap it in whole
    (:func:`internvit.store.replace_folder`) once it is complete and every image was read; returns its manifest.

    Until then ``cache_dir`` keeps its committed cache: an extraction that fails part way (an unreadable image,
    non-finite features, a crash, a kill) leaves the earlier valid cache usable, and the data it was made for
    finds it again, instead of a folder committed with the failure. A killed replacement starts over (its
    temporary folder is removed by the next one)."""
    from internvit.store import read_manifest, replace_folder

    cache_dir = os.path.realpath(cache_dir)  # a link to a cache on another disk: replaced there, the link kept
    with replace_folder(cache_dir, description="probe feature cache") as tmp:
        extract_features(spec, dataset, tmp, feature, **kwargs)  # raises (naming the image) before the swap
    return read_manifest(cache_dir)


@DATASETS.register_module()
class CachedFeatureDataset(Dataset):
    """Cached frozen-backbone features of an image dataset, extracted on first use.

    Args:
        dataset: the image dataset (config dict or instance), with an eval (``train=False``) transform.
        backbone: the backbone spec of the model (same dict as ``model.backbone``).
        cache_dir: where the features live; a cache made for other inputs (see :func:`cache_key`) is
            re-extracted beside it and swapped in only once complete (a failed re-extraction leaves it as it
            was), a folder that is not a cache is never touched (``FileExistsError``).
        feature: ``'cls_mean'`` (linear probe) or ``'tokens'`` (attention pooling).
        batch_size, num_workers, device: for the extraction.

    ``features`` is a memory-mapped :class:`internvit.features.MappedFeatures` (``len``, ``shape``, row
    indexing; ``np.asarray`` copies it into RAM), ``labels`` an int64 array.
    """

    #: its items are backbone features, not images: only a ``from_features=True`` model takes them
    #: (:func:`internvit.run_checks.check_input_kind`)
    gives_features = True

    def __init__(self, dataset: Union[dict, ImageFolderDataset], backbone: Union[dict, str], cache_dir: str,
                 feature: str = "cls_mean", batch_size: int = 64, num_workers: int = 0, device: str = "auto",
                 progress: bool = True) -> None:
        from mmengine.dist import get_world_size

        from internvit.store import read_manifest

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
        manifest = read_manifest(cache_dir) if os.path.isdir(cache_dir) else None
        if manifest is None or manifest.get(CACHE_KEY) != key:
            if not _is_cache(cache_dir, manifest):
                raise FileExistsError(f"{cache_dir}: exists and is not a probe feature cache; choose another "
                                      f"cache_dir")
            if get_world_size() > 1:  # rank 0 alone would extract while the other ranks time out at a barrier
                raise RuntimeError(f"CachedFeatureDataset: {cache_dir} is missing or stale; distributed runs do not "
                                   f"extract features: fill the cache with one single-process run of the same "
                                   f"config first (python tools/train.py CONFIG), then relaunch")
            kwargs = dict(batch_size=batch_size, num_workers=num_workers, device=device, progress=progress, key=key)
            if manifest is not None:  # a committed cache of other inputs: kept until the new one is complete
                manifest = _replace_cache(spec, dataset, cache_dir, feature, kwargs)
            else:  # nothing valid to keep: extracted in place (a killed run is resumed by the next one)
                manifest = extract_features(spec, dataset, cache_dir, feature, replace=True, **kwargs)
            self.extracted = True
        _check_errors(cache_dir, manifest)
        self.features, self.labels = self._read(cache_dir, spec, feature)
        if len(self.labels) != len(dataset):
            raise RuntimeError(f"{cache_dir}: {len(self.labels)} cached rows for {len(dataset)} images")
        self.cache_dir = cache_dir

    @staticmethod
    def precheck(cfg: dict) -> None:
        """The cheap checks of a config of this dataset (the runner calls them for every split before any
        split is built, see :func:`internvit.runner.precheck_datasets`): ``feature``, and the source image
        dataset (its folder / CSV scan and file checks). Raises what building them raises."""
        if cfg.get("feature", "cls_mean") not in CACHE_FEATURES:
            raise ValueError(f"feature must be one of {CACHE_FEATURES}, got {cfg.get('feature')!r}")
        if isinstance(cfg.get("dataset"), dict):
            DATASETS.build(cfg["dataset"])

    @staticmethod
    def _read(cache_dir: str, spec: dict, feature: str):
        from internvit.features import open_features

        feats, rows = open_features(cache_dir, columns=["label"])
        labels = np.asarray([r["label"] for r in rows], dtype=np.int64)
        if feature == "tokens":
            feats.reshape_rows((-1, backbone_config(spec).hidden_size))
        return feats, labels

    @property
    def metainfo(self) -> dict:
        return self.source.metainfo

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, idx: int) -> dict:
        row = self.features[idx]  # a view of the mapped file: copied into a tensor
        return dict(inputs=torch.from_numpy(np.array(row, dtype=np.float32)),
                    data_samples=dict(gt_label=int(self.labels[idx]), index=idx))
