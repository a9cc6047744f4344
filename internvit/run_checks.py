"""The set-up checks of a runner the tools build (:mod:`internvit.runner`), each raising before anything is
trained, tested or written: a checkpoint that does not fit the model, class lists that disagree or outnumber
a head, test outputs that would replace files the run did not write.

Split out of :mod:`internvit.runner` (which builds and scopes runners): these functions only look at a built
runner, its model and its datasets, and at paths.
"""
from __future__ import annotations

import os
import os.path as osp
import re
from typing import Any, Optional

__all__ = ["check_fits", "check_classes", "check_same_classes", "class_list", "dataset_class_names",
           "check_output_path", "check_unique_names", "check_data_files", "name_data_errors", "NamedLoadErrors"]

#: the keys of an mmengine dataset entry that name a file the pipeline reads (image, label map)
DATA_FILE_KEYS = ("img_path", "seg_map_path")


def check_fits(model, ckpt, path: str) -> None:
    """Raise :class:`internvit.CheckpointError` unless the checkpoint's state dict fits ``model``.

    As mmengine loads it: the ``state_dict`` entry (or the whole dict), ``module.`` prefixes removed. Missing
    keys are those the model's own ``state_dict()`` has (a model may leave out parts it rebuilds itself, such
    as a frozen pretrained backbone); unexpected keys are those that name no parameter or persistent buffer;
    mis-shaped keys differ in shape. A model that is not built yet (``FlexibleRunner`` builds it when training
    starts) is not checked.
    """
    import torch
    from mmengine.model import is_model_wrapper

    from internvit.checkpoints import CheckpointError, _fmt_keys

    if is_model_wrapper(model):
        model = model.module
    if not isinstance(model, torch.nn.Module):
        return
    sd = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(sd, dict) or not any(isinstance(v, torch.Tensor) for v in sd.values()):
        top = ", ".join(map(str, list(ckpt)[:8])) if isinstance(ckpt, dict) else type(ckpt).__name__
        nested = [k for k, v in ckpt.items() if isinstance(v, dict) and any(isinstance(t, torch.Tensor)
                                                                           for t in v.values())] \
            if isinstance(ckpt, dict) else []
        hint = (f"; its tensors are under {nested[0]!r} (a backbone or DeepSpeed checkpoint?): mmengine reads "
                f"'state_dict' or the top level; give the checkpoint tools/train.py saved, or convert a released "
                f"mmseg 0.x segmentor with tools/convert_checkpoint.py mmseg0x") if nested else ""
        raise CheckpointError(f"{path}: no state dict of tensors (top-level keys: {top}){hint}")
    sd = {re.sub(r"^module\.", "", k): v for k, v in sd.items()}
    required = model.state_dict()
    accepted = dict(model.named_parameters(remove_duplicate=False))
    for prefix, mod in model.named_modules(remove_duplicate=False):
        for name, buf in mod._buffers.items():
            if buf is not None and name not in mod._non_persistent_buffers_set:
                accepted[f"{prefix}.{name}" if prefix else name] = buf
    accepted.update(required)
    missing = sorted(k for k in required if k not in sd)
    unexpected = sorted(k for k in sd if k not in accepted)
    mis_shaped = sorted(f"{k} (checkpoint {list(v.shape)} vs model {list(accepted[k].shape)})"
                        for k, v in sd.items() if k in accepted and isinstance(v, torch.Tensor)
                        and isinstance(accepted[k], torch.Tensor) and tuple(v.shape) != tuple(accepted[k].shape))
    problems = [f"{what}: {_fmt_keys(keys, 6)}" for what, keys in (("missing keys", missing),
                                                                     ("unexpected keys", unexpected),
                                                                     ("mis-shaped keys", mis_shaped)) if keys]
    if problems:
        raise CheckpointError(f"{path} does not fit the config's model: " + "; ".join(problems))


def class_list(classes: Any) -> Optional[tuple]:
    """``classes`` as a tuple of names, or None when it is not a non-empty list of them."""
    return tuple(str(c) for c in classes) if isinstance(classes, (list, tuple)) and classes else None


def dataset_class_names(loader) -> Optional[tuple]:
    """The class names a built dataloader's dataset declares (``metainfo['classes']``), or None."""
    ds = getattr(loader, "dataset", None)
    try:
        return class_list((getattr(ds, "metainfo", None) or {}).get("classes"))
    except Exception:  # noqa: BLE001 - a dataset without metainfo
        return None


def _dataset_classes(loader) -> Optional[int]:
    """The number of classes a built dataloader's dataset declares (``metainfo['classes']``), or None."""
    names = dataset_class_names(loader)
    return len(names) if names else None


def check_same_classes(lists: dict) -> None:
    """Raise ``ValueError`` when two of the class lists ``{what: names or None}`` differ (``None``: unknown,
    not compared). Label ``i`` means class ``names[i]``: a split whose folders lack a class numbers the
    others one lower, and its accuracy would be computed against the wrong classes."""
    known = [(what, names) for what, names in lists.items() if names]
    for what, names in known[1:]:
        ref_what, ref = known[0]
        if names != ref:
            i = next((i for i, (a, b) in enumerate(zip(names, ref)) if a != b), min(len(names), len(ref)))
            here = repr(names[i]) if i < len(names) else "missing"
            there = repr(ref[i]) if i < len(ref) else "missing"
            extra = sorted(set(ref) - set(names))[:3]
            hint = f" (no {', '.join(map(repr, extra))} here)" if extra else ""
            raise ValueError(f"{what}: its classes differ from those of {ref_what}: {len(names)} vs {len(ref)} "
                             f"classes, label {i} is {here} here and {there} there{hint}; labels would be scored "
                             f"against the wrong classes: give every split the same class list (classes=...)")


def check_classes(model, loader, what: str) -> None:
    """Raise ``ValueError`` when a dataset declares more classes than a head of ``model`` predicts
    (``num_classes`` of its ``head`` / ``decode_head`` / ``auxiliary_head`` modules): those labels could never be
    predicted, so accuracy / mIoU would be computed against a model that cannot be right (and training fails
    mid-epoch on the first such label)."""
    from mmengine.model import is_model_wrapper

    n = _dataset_classes(loader)
    if n is None or model is None:
        return
    if is_model_wrapper(model):
        model = model.module
    for name, mod in getattr(model, "named_modules", lambda: [])():
        k = getattr(mod, "num_classes", None)
        if name.rsplit(".", 1)[-1] in ("head", "decode_head", "auxiliary_head") and isinstance(k, int) and 0 < k < n:
            raise ValueError(f"{what}: the dataset has {n} classes but model.{name}.num_classes is {k} "
                             f"(labels {k}..{n - 1} could never be predicted); set num_classes to {n} or use "
                             f"the data the model was made for")


def check_output_path(flag: str, path: str, folder: bool, overwrite: bool) -> None:
    """A test output path: a folder (``folder``) or a file; an existing file, or a folder that is not empty,
    only with ``overwrite`` (their same-named files would be replaced)."""
    if os.path.lexists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{flag} {path}: exists and is {'not ' if folder else ''}a folder (give "
                         f"{'a folder' if folder else 'a file path'})")
    if overwrite:
        return
    if folder and os.path.isdir(path) and os.listdir(path):
        raise ValueError(f"{flag} {path}: a folder that is not empty; its same-named files would be replaced "
                         f"(give a new or empty folder, or pass --overwrite)")
    if not folder and os.path.lexists(path):
        raise ValueError(f"{flag} {path}: already exists (pass --overwrite to replace it)")


def check_unique_names(runner, outputs: dict) -> None:
    """The test outputs ``{flag: path}`` against the test set. mmseg names each prediction / overlay after its
    image's file name: two test images of one name (in different folders) would write one file, the first
    silently replaced. And an output folder may not be, or lie inside, a folder of the test set's images or
    label maps (the predictions replaced the ground truth even with ``--overwrite``; overlays became test
    images)."""
    ds = getattr(getattr(runner, "_test_dataloader", None), "dataset", None)
    if not callable(getattr(ds, "get_data_info", None)):  # mmengine's BaseDataset (its data_list may be serialised)
        return
    seen: dict[str, str] = {}
    data_dirs: set = set()
    for i in range(len(ds)):
        item = ds.get_data_info(i)
        if not isinstance(item, dict):
            continue
        data_dirs.update(osp.dirname(osp.abspath(p)) for p in (item.get("img_path"), item.get("seg_map_path"))
                         if isinstance(p, str))
        path = item.get("img_path")
        if not isinstance(path, str):
            continue
        stem = osp.splitext(osp.basename(path))[0]
        if stem in seen:
            flag = next(iter(outputs))
            raise ValueError(f"{flag}: test images {seen[stem]} and {path} have the same name {stem!r}: their "
                             f"predictions would be written to one file (rename one, or leave {flag} out)")
        seen[stem] = path
    for flag, out in outputs.items():
        target = osp.abspath(out)
        for d in sorted(data_dirs):
            if target == d or target.startswith(d + os.sep):
                raise ValueError(f"{flag} {out}: inside the test set's data folder {d}: the outputs would mix with "
                                 f"(or replace) its images and label maps; give a folder outside the dataset")


def _leaf_datasets(ds) -> list:
    """The datasets inside mmengine's wrappers (``ConcatDataset.datasets``, ``RepeatDataset.dataset``, ...)."""
    if ds is None:
        return []
    if isinstance(getattr(ds, "datasets", None), (list, tuple)):
        return [leaf for d in ds.datasets for leaf in _leaf_datasets(d)]
    inner = getattr(ds, "dataset", None)
    return _leaf_datasets(inner) if inner is not None and hasattr(inner, "__getitem__") else [ds]


def check_data_files(loader, what: str) -> None:
    """Every local file a built dataloader's dataset lists exists (the ``img_path`` and ``seg_map_path`` of each
    entry of an mmengine ``BaseDataset``): mmseg lists a label map for every image by name without looking, so a
    missing annotation surfaced as a ``FileNotFoundError`` traceback when the loop reached it (for a validation
    set, after the first training interval). Raises :class:`internvit.data.DataError` naming the first missing
    file and how many are missing. One ``stat`` per file; datasets that are not fully initialised (``lazy_init``)
    are skipped."""
    from internvit.data import DataError

    for ds in _leaf_datasets(getattr(loader, "dataset", None)):
        if not callable(getattr(ds, "get_data_info", None)) or not getattr(ds, "_fully_initialized", True):
            continue
        missing: list[tuple[str, str]] = []
        n = len(ds)
        for i in range(n):
            item = ds.get_data_info(i)
            if not isinstance(item, dict):
                continue
            for key in DATA_FILE_KEYS:
                path = item.get(key)
                if isinstance(path, str) and "://" not in path and not osp.isfile(path):
                    missing.append((key, path))
        if missing:
            key, path = missing[0]
            kind = "label map" if key == "seg_map_path" else "image"
            raise DataError(f"{what}: {path}: no such {kind} file ({len(missing)} of the files its {n} entries "
                            f"list are missing; {key} is built from data_root, data_prefix and the suffixes)")


class NamedLoadErrors:
    """A loading transform (``LoadImageFromFile``, ``LoadAnnotations``, ...) whose failure names the file it
    was reading: any exception it raises becomes :class:`internvit.data.DataError` ``"<file>: cannot read the
    image / label map (<type>: <message>)"`` (mmcv raised ``AssertionError: failed to load image`` for a garbage
    image and ``OSError: image file is truncated`` for a truncated label PNG, naming no file), which the tools
    report as one ``error:`` line. Everything else is the wrapped transform's (attributes, ``repr``)."""

    def __init__(self, transform) -> None:
        self.transform = transform

    def __call__(self, results):
        from internvit.data import DataError

        try:
            return self.transform(results)
        except DataError:
            raise
        except Exception as e:  # noqa: BLE001 - a loader's failure is about its file, whatever the type
            annotation = "annotation" in type(self.transform).__name__.lower()
            key = "seg_map_path" if annotation else "img_path"
            path = results.get(key) if isinstance(results, dict) else None
            if not isinstance(path, str):
                raise
            message = next((line.strip() for line in str(e).splitlines() if line.strip()), "")
            raise DataError(f"{path}: cannot read the {'label map' if annotation else 'image'} "
                            f"({type(self.transform).__name__}: {type(e).__name__}"
                            f"{': ' + message if message else ''})") from e

    def __getattr__(self, name: str):
        if name == "transform":  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.transform, name)

    def __repr__(self) -> str:
        return repr(self.transform)


def name_data_errors(loader) -> None:
    """Wrap the loading transforms (class name ``Load...``) of a built dataloader's datasets' pipelines in
    :class:`NamedLoadErrors`, so that an unreadable file met while the loop runs is reported by name."""
    for ds in _leaf_datasets(getattr(loader, "dataset", None)):
        transforms = getattr(getattr(ds, "pipeline", None), "transforms", None)
        if not isinstance(transforms, list):
            continue
        for i, t in enumerate(transforms):
            if type(t).__name__.startswith("Load") and not isinstance(t, NamedLoadErrors):
                transforms[i] = NamedLoadErrors(t)
