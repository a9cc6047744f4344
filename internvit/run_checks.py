"""The set-up checks of a runner the tools build (:mod:`internvit.runner`), each raising before anything is
trained, tested or written: a checkpoint that does not fit the model, class lists that disagree or outnumber
a head, test outputs that would replace files the run did not write.

Split out of :mod:`internvit.runner` (which builds and scopes runners): these functions only look at a built
runner, its model and its datasets, and at paths.
"""
from __future__ import annotations

import logging
import math
import os
import os.path as osp
import re
from typing import Any, Iterator, Optional

import numpy as np
from mmengine.hooks import Hook

__all__ = ["check_fits", "check_classes", "check_input_kind", "check_same_classes", "class_list", "dataset_class_names",
           "check_output_path", "check_unique_names", "check_data_files", "name_data_errors", "NamedLoadErrors",
           "check_option_keys", "check_train_loop", "check_learning_rates", "check_evaluator", "NonFiniteError",
           "NonFiniteCheckHook", "check_split_options", "check_one_process_draws", "check_launcher_env"]

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
        if name.rsplit(".", 1)[-1] in ("head", "decode_head", "auxiliary_head") and isinstance(k, int) and k < n:
            raise ValueError(f"{what}: the dataset has {n} classes but model.{name}.num_classes is {k} "
                             f"(labels {max(k, 0)}..{n - 1} could never be predicted); set num_classes to {n} or "
                             f"use the data the model was made for")


def check_input_kind(model, loader, what: str) -> None:
    """Raise ``ValueError`` naming both sides when a model that takes cached backbone features
    (``model.from_features=True``, :class:`classification.InternViTClassifier`) is given a dataset of images, or a
    model that runs its backbone is given cached features (a dataset whose ``gives_features`` is true, such as
    :class:`classification.CachedFeatureDataset`): either way the head met inputs of the wrong shape only once
    training started, as a traceback. Models without a ``from_features`` flag are not checked."""
    from mmengine.model import is_model_wrapper

    if model is None:
        return
    if is_model_wrapper(model):
        model = model.module
    wants = getattr(model, "from_features", None)
    if not isinstance(wants, bool):
        return
    for ds in _leaf_datasets(getattr(loader, "dataset", None)):
        gives = bool(getattr(ds, "gives_features", False))
        if wants and not gives:
            raise ValueError(f"{what}: model.from_features=True takes cached backbone features, but its dataset "
                             f"({type(ds).__name__}) gives images: wrap it in a CachedFeatureDataset (as "
                             f"configs/classification/toy/digits_linear_probe_cached.py does) or set "
                             f"model.from_features=False")
        if gives and not wants:
            raise ValueError(f"{what}: its dataset ({type(ds).__name__}) gives cached backbone features, but "
                             f"model.from_features=False runs the backbone on its inputs, which must be images: "
                             f"set model.from_features=True or give the image dataset itself")


def check_output_path(flag: str, path: str, folder: bool, overwrite: bool) -> None:
    """A test output path: a folder (``folder``) or a file; an existing file, or a folder that is not empty,
    only with ``overwrite`` (their same-named files would be replaced)."""
    if os.path.lexists(path) and os.path.isdir(path) != folder:
        raise ValueError(f"{flag} {path}: exists and is {'not ' if folder else ''}a folder (give "
                         f"{'a folder' if folder else 'a file path'})")
    from internvit.store import check_outside_managed

    check_outside_managed(flag, os.path.join(path, "x") if folder else path)
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
    images). PNGs already in an ``--out`` folder (``--overwrite``) that no test image will replace are named in
    a log warning: the folder mixed two test sets' predictions silently."""
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
    out = outputs.get("--out")
    stale = sorted(n for n in (os.listdir(out) if out and osp.isdir(out) else ())
                   if n.endswith(".png") and n[:-4] not in seen)
    if stale:  # --overwrite of a folder of another test set's predictions: they stay beside this run's
        from mmengine.logging import print_log

        print_log(f"--out {out}: {len(stale)} prediction file(s) there are not of this test set and stay beside "
                  f"its predictions ({', '.join(stale[:3])}{', ...' if len(stale) > 3 else ''}): the folder will "
                  f"mix two runs; give an empty folder to keep one run's predictions", logger="current",
                  level=logging.WARNING)


#: the environment variables mmengine's ``init_dist`` reads for each ``--launcher``, and what sets them
LAUNCHER_ENV = {
    "pytorch": (("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"),
                "start the tool with torchrun (or tools/dist_train.sh)"),
    "slurm": (("SLURM_PROCID", "SLURM_NTASKS", "SLURM_NODELIST"), "start the tool with srun"),
    "mpi": (("OMPI_COMM_WORLD_LOCAL_RANK", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MASTER_ADDR"),
            "start the tool with Open MPI's mpirun, MASTER_ADDR set"),
}


def check_launcher_env(launcher: str) -> None:
    """Refuse a ``--launcher`` whose launcher did not start the process (``ValueError`` naming the first
    missing environment variable and what sets it): mmengine's ``KeyError`` read ``missing key
    'SLURM_PROCID'``, naming neither the flag nor the way out."""
    needed, how = LAUNCHER_ENV.get(launcher, ((), ""))
    missing = next((v for v in needed if not os.environ.get(v, "").strip()), None)
    if missing is not None:
        raise ValueError(f"--launcher {launcher}: the environment variable {missing} is not set: {how}, or use "
                         f"--launcher none for one process")


#: the environment variable that holds the number of processes, for each ``--launcher``
LAUNCHER_WORLD_SIZE = {"pytorch": "WORLD_SIZE", "slurm": "SLURM_NTASKS", "mpi": "OMPI_COMM_WORLD_SIZE"}


def check_one_process_draws(outputs: dict, launcher: str) -> None:
    """Refuse ``--show-dir`` (a key of the test outputs ``{flag: path}``) in a run of more than one process
    (``launcher``'s world size, read from its environment before any process group is joined, so every rank
    refuses at once): mmengine's visualizer draws and saves on rank 0 only, so each other rank's share of the
    test images got no overlay (2 of 3 toy images under ``torchrun --nproc_per_node 2``), silently. Raises
    ``ValueError``."""
    size = os.environ.get(LAUNCHER_WORLD_SIZE.get(launcher, ""), "1").strip()
    world = int(size) if size.isdigit() else 1
    if "--show-dir" in outputs and world > 1:
        raise ValueError(f"--show-dir {outputs['--show-dir']}: overlays are drawn by rank 0 only, so the "
                         f"images of the other {world - 1} of {world} processes would get none; run the test "
                         f"with --show-dir in one process (--launcher none), or leave --show-dir out")


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
    set, after the first training interval), and so is an empty (0-byte) file, the mark of an interrupted copy.
    Raises :class:`internvit.data.DataError` naming the first such file and how many there are. One ``stat`` per
    file (other unreadable files are named when the loop reaches them, :class:`NamedLoadErrors`); datasets that
    are not fully initialised (``lazy_init``) are skipped."""
    import stat

    from internvit.data import DataError

    for ds in _leaf_datasets(getattr(loader, "dataset", None)):
        if not callable(getattr(ds, "get_data_info", None)) or not getattr(ds, "_fully_initialized", True):
            continue
        bad: list[tuple[str, str, str]] = []
        n = len(ds)
        for i in range(n):
            item = ds.get_data_info(i)
            if not isinstance(item, dict):
                continue
            for key in DATA_FILE_KEYS:
                path = item.get(key)
                if not isinstance(path, str) or "://" in path:
                    continue
                try:
                    st = os.stat(path)
                except OSError:
                    st = None
                if st is None or not stat.S_ISREG(st.st_mode):
                    bad.append((key, path, "no such {} file"))
                elif st.st_size == 0:
                    bad.append((key, path, "an empty {} file (0 bytes)"))
        if bad:
            key, path, why = bad[0]
            kind = "label map" if key == "seg_map_path" else "image"
            raise DataError(f"{what}: {path}: {why.format(kind)} ({len(bad)} of the files its {n} entries list are "
                            f"missing or empty; {key} is built from data_root, data_prefix and the suffixes)")


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
        from internvit.file_reads import first_line

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
            message = first_line(e)
            raise DataError(f"{path}: cannot read the {'label map' if annotation else 'image'} "
                            f"({type(self.transform).__name__}: {type(e).__name__}"
                            f"{': ' + message if message != type(e).__name__ else ''})") from e

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


#: top-level config keys an mmengine ``Runner`` / ``FlexibleRunner`` reads besides the config's own
RUNNER_KEYS = frozenset((
    "model", "work_dir", "train_dataloader", "val_dataloader", "test_dataloader", "train_cfg", "val_cfg",
    "test_cfg", "auto_scale_lr", "optim_wrapper", "param_scheduler", "val_evaluator", "test_evaluator",
    "default_hooks", "custom_hooks", "data_preprocessor", "load_from", "resume", "launcher", "env_cfg",
    "log_processor", "log_level", "visualizer", "default_scope", "randomness", "experiment_name", "strategy",
    "compile", "runner_type", "custom_imports", "activation_checkpointing", "efficient_conv_bn_eval",
    "model_wrapper_cfg", "find_unused_parameters", "cfg", "tta_model", "tta_pipeline"))


def check_option_keys(cfg, options: dict) -> None:
    """Refuse a ``--cfg-options`` key whose first part is neither a key of the config nor one the runner reads
    (``ValueError`` naming the closest key): mmengine adds unknown keys silently, so ``train_cfgs.max_epochs=1``
    trained the config's full schedule. A key of the config file's own variables (``data_root``,
    ``crop_size``: not one the runner reads) is refused too, naming the keys that hold the variable's value: the
    file substituted it where it is used when it was read, so mmengine ignored such an override silently.
    Deeper parts are checked where they are used (a misspelt loop or dataloader argument is a ``TypeError``
    while the runner is set up)."""
    import difflib

    known = set(cfg.keys()) | RUNNER_KEYS
    for key in options:
        top = str(key).split(".", 1)[0]
        if top not in known:
            close = difflib.get_close_matches(top, sorted(known), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ValueError(f"--cfg-options {key}: the config has no key {top!r} and the runner reads none"
                             f"{hint}")
        shadowed = top == "data_preprocessor" and "data_preprocessor" in (cfg.get("model") or {})
        if top not in RUNNER_KEYS or shadowed:  # the runner reads data_preprocessor only for a model without one
            raise ValueError(_variable_message(cfg, key, top))


_MISSING = object()
#: the split-specific top-level keys (``val_dataloader`` / ``test_dataloader`` ...), by their suffix
_SPLIT_SUFFIXES = ("dataloader", "evaluator", "cfg")


def _value_at(obj: Any, path: str) -> Any:
    """The value under the dotted ``path`` of ``obj`` (dicts, and lists by ``.N``), or ``_MISSING``."""
    for part in path.split(".") if path else ():
        if isinstance(obj, dict) and part in obj:
            obj = obj[part]
        elif isinstance(obj, (list, tuple)) and part.isdigit() and int(part) < len(obj):
            obj = obj[int(part)]
        else:
            return _MISSING
    return obj


def check_split_options(cfg, options: dict, evaluates: str) -> None:
    """Refuse a ``--cfg-options`` key of the split the run does not evaluate (``val_*`` for a test, ``test_*``
    for training, which validates on ``val_*``) that leaves the same setting of the evaluated split as the
    config has it while the config gives both splits the same value there (``test_dataloader = val_dataloader``,
    as the toy and published configs do): ``tools/test.py ... val_dataloader.dataset.data_root=X`` scored the
    config's data, not ``X``, and exited 0. ``evaluates`` is ``'test'`` or ``'val'``. Call it before the
    options are merged. Raises ``ValueError`` naming the option and the key to set."""
    other = {"test": "val", "val": "test"}[evaluates]
    plain = cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg)
    for key in options:
        top, _, rest = str(key).partition(".")
        if top not in {f"{other}_{s}" for s in _SPLIT_SUFFIXES}:
            continue
        twin_top = f"{evaluates}_{top.split('_', 1)[1]}"
        twin = f"{twin_top}.{rest}" if rest else twin_top
        if any(k == twin or twin.startswith(f"{k}.") or str(k).startswith(f"{twin}.") for k in options):
            continue
        if not isinstance(plain.get(twin_top), (dict, list)):
            continue  # the run has no such split to evaluate
        mine, theirs = _value_at(plain.get(top), rest), _value_at(plain.get(twin_top), rest)
        if _plain(mine) == _plain(theirs):  # both _MISSING: a key neither split has, added to one
            run = "a test evaluates" if evaluates == "test" else "training validates on"
            raise ValueError(f"--cfg-options {key}: {run} {twin_top}, which this option leaves as it is (the "
                             f"config gives {twin} the same value as {top}{'.' + rest if rest else ''}): set "
                             f"{twin} instead, or as well")


def _variable_message(cfg, key: str, top: str) -> str:
    """Why an override of the config file's own variable ``top`` (``data_root``, ``crop_size``, ``max_iters``)
    is refused, naming the keys that hold its value (mmengine substituted it there when it read the file, so
    setting the variable afterwards changed nothing: a test scored the config's data set instead of the one
    asked for)."""
    value = cfg[top].to_dict() if hasattr(cfg[top], "to_dict") else cfg[top]
    holders = [p for p in _paths_of(cfg.to_dict() if hasattr(cfg, "to_dict") else dict(cfg), value)
               if p.split(".", 1)[0] in RUNNER_KEYS and p != top]
    named = [p for p in holders if p.rsplit(".", 1)[-1] == top]  # data_root=data_root: the likely uses
    others = [p for p in holders if p not in named]

    def listed(paths: list) -> str:
        return ", ".join(paths[:6]) + (f", ... ({len(paths)} in all)" if len(paths) > 6 else "")

    also = f" (also holding the same value: {listed(others)})" if named and others else ""
    where = (f"set the keys that use it instead: {listed(named)}{also}" if named else
             f"set the keys that use it instead (keys holding the same value: {listed(others)})" if holders else
             "no key the runner reads holds its value as it is (it may be part of others, such as paths built "
             "from it): set those keys")
    return (f"--cfg-options {key}: {top!r} is a variable of the config file, already substituted where the file "
            f"uses it, so setting it here would change nothing; {where}")


def _plain(obj):
    """``obj`` with tuples as lists, recursively (to compare a config's values however they were parsed)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    return [_plain(v) for v in obj] if isinstance(obj, (list, tuple)) else obj


def _paths_of(obj, value, prefix: str = "", depth: int = 0) -> Iterator[str]:
    """Dotted keys (list items as ``.N``) under ``obj`` whose value equals ``value``, outermost first."""
    if depth > 12:
        return
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    for k, v in items:
        path = f"{prefix}{k}"
        try:  # a (1, 2) tuple the file wrote is a [1, 2] list after mmengine's parsing; 1 is not True or 1.0
            same = _plain(v) == _plain(value) and (isinstance(value, (dict, list, tuple)) or type(v) is type(value))
        except Exception:  # noqa: BLE001 - values that cannot be compared (arrays) are not the variable
            same = False
        if same:
            yield path
        elif isinstance(v, (dict, list, tuple)):
            yield from _paths_of(v, value, path + ".", depth + 1)


def check_train_loop(loop, ckpt: Any = None, train_cfg: Optional[dict] = None) -> None:
    """Refuse a built training loop with nothing to train (``max_epochs`` / ``max_iters`` < 1: mmengine exited
    0 without a step, checkpoint or metric), a ``val_interval`` < 1 (a ``ZeroDivisionError`` after the first
    epoch), or a resumed checkpoint ``ckpt`` beyond the loop's end (its ``meta`` epoch / iteration; one at the
    end exactly is a run killed after its last checkpoint, resumed to finish); ``train_cfg`` (the config's)
    values of ``max_epochs``, ``max_iters``, ``val_interval`` and ``val_begin`` that are not integers (mmengine
    cast ``True`` to 1 epoch and ran ``val_interval=1.5`` at epochs 3, 6, 9). Raises ``ValueError``."""
    for key in ("max_epochs", "max_iters", "val_interval", "val_begin"):  # mmengine casts 1.5 / True / nan
        v = (train_cfg or {}).get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise ValueError(f"train_cfg.{key}={v!r}: must be an integer")
    if loop is None or isinstance(loop, dict):
        return
    epochs, iters = getattr(loop, "max_epochs", None), getattr(loop, "max_iters", None)
    by_epoch = "Epoch" in type(loop).__name__ and isinstance(epochs, int)
    if by_epoch and epochs < 1:
        raise ValueError(f"train_cfg.max_epochs={epochs}: nothing to train (give 1 or more)")
    if isinstance(iters, int) and iters < 1:
        what = f"{iters} iterations (max_epochs={epochs} x an empty epoch: is the batch larger than the " \
               f"dataset with drop_last?)" if by_epoch else f"train_cfg.max_iters={iters}"
        raise ValueError(f"{what}: nothing to train")
    interval = getattr(loop, "val_interval", 1)
    if isinstance(interval, (int, float)) and not isinstance(interval, bool) and interval < 1:
        raise ValueError(f"train_cfg.val_interval={interval}: must be 1 or more")
    check_learning_rates(getattr(getattr(loop, "runner", None), "optim_wrapper", None), ckpt)
    meta = ckpt.get("meta") if isinstance(ckpt, dict) and isinstance(ckpt.get("meta"), dict) else {}
    done, end, unit = (meta.get("epoch"), epochs, "epoch") if by_epoch else (meta.get("iter"), iters, "iteration")
    # at the end exactly: a run killed after its last checkpoint (before its best checkpoint or clean-up) is
    # resumed to finish; beyond it, the config was changed and nothing would be trained
    if isinstance(done, int) and isinstance(end, int) and done > end:
        raise ValueError(f"the checkpoint to resume is at {unit} {done} and the config trains to {unit} {end}: "
                         f"nothing left to train (raise train_cfg.max_{unit.replace('iteration', 'iter')}s)")
    if by_epoch:
        it = meta.get("iter")
        if isinstance(it, int) and isinstance(iters, int) and it > iters:  # a checkpoint saved by iteration
            raise ValueError(f"the checkpoint to resume is at iteration {it} and the config trains {iters} "
                             f"iterations ({epochs} epochs of {iters // max(epochs, 1)}): nothing left to train "
                             f"(raise train_cfg.max_epochs)")
        _check_epoch_boundaries(loop, meta)


def _check_epoch_boundaries(loop, meta: dict) -> None:
    """A checkpoint to resume an epoch-based loop from must stand inside or at the end of its recorded epoch
    with this config's epoch length: ``0 <= iter - epoch x length <= length``. A checkpoint saved inside an
    epoch (by iteration) resumes there, after the batches it trained
    (:func:`internvit.train_hooks.skip_trained_batches`); one outside that range was saved with another batch
    size, data or number of processes. Raises ``ValueError``."""
    try:
        n = len(loop.dataloader)
    except TypeError:
        return
    if n < 1:
        return
    epoch, it = meta.get("epoch"), meta.get("iter")
    if isinstance(epoch, int) and isinstance(it, int) and not 0 <= it - epoch * n <= n:
        raise ValueError(f"the checkpoint to resume stands at iteration {it} in epoch {epoch + 1}, which this "
                         f"config's {n} iterations per epoch do not reach ({epoch * n}..{epoch * n + n}): the "
                         f"batch size, the data or the number of processes changed since it was saved; resume "
                         f"with the configuration it was trained with, or start anew from its weights with "
                         f"load_from=")


def _param_groups(optim_wrapper) -> Iterator[tuple[str, dict]]:
    """``(name, param group)`` of a built optimizer wrapper (or ``OptimWrapperDict``)."""
    wrappers = getattr(optim_wrapper, "optim_wrappers", None)
    items = wrappers.items() if isinstance(wrappers, dict) else [("", optim_wrapper)]
    for name, wrapper in items:
        for group in getattr(getattr(wrapper, "optimizer", None), "param_groups", None) or ():
            yield name, group


#: the largest float32 (an lr above it overflowed at the first update: "value cannot be converted ... overflow")
FLOAT32_MAX = 3.4028234663852886e38


def check_learning_rates(optim_wrapper, ckpt: Any = None) -> None:
    """Refuse a non-finite learning rate (``lr=inf`` / ``nan``: the first update turns every weight NaN), or one
    beyond :data:`FLOAT32_MAX` (finite in Python, an overflow at the first update), in the built optimizer
    wrapper, or a non-finite one in the optimizer state of a checkpoint to resume (mmengine restores its
    learning rates over the config's). Raises ``ValueError``."""
    for name, group in _param_groups(optim_wrapper):
        lr = group.get("lr")
        if isinstance(lr, (int, float)) and not (math.isfinite(lr) and abs(lr) <= FLOAT32_MAX):
            where = f"optim_wrapper.{name}.optimizer" if name else "optim_wrapper.optimizer"
            raise ValueError(f"{where}.lr={lr}: the learning rate must be a finite number (at most "
                             f"{FLOAT32_MAX:.3g}: the update is computed in float32)")
    state = ckpt.get("optimizer") if isinstance(ckpt, dict) else None
    groups = state.get("param_groups") if isinstance(state, dict) else None
    for group in groups if isinstance(groups, list) else ():
        lr = group.get("lr") if isinstance(group, dict) else None
        if isinstance(lr, (int, float)) and not math.isfinite(lr):
            raise ValueError(f"the checkpoint to resume holds lr={lr} in its optimizer state (which a resume "
                             f"restores over the config's): it was saved by a diverging run; resume from an "
                             f"earlier checkpoint, or start anew with load_from= and a finite lr")


class NonFiniteError(FloatingPointError):
    """Training or evaluation met a NaN or infinite loss or model output: the run stops, naming where, rather
    than saving NaN weights or computing a metric over NaN scores (the tools report one ``error:`` line)."""


def _numbers(obj, name: str = "", depth: int = 0) -> Iterator[tuple[str, Any]]:
    """``(name, value)`` of every floating tensor and float in ``obj`` (a tensor, dict, list or mmengine data
    element, nested up to 4 levels)."""
    import torch

    if isinstance(obj, torch.Tensor):
        if obj.is_floating_point():
            yield name or "output", obj
        return
    if isinstance(obj, float):
        yield name or "output", obj
        return
    if depth > 3:
        return
    if isinstance(obj, dict):
        items = obj.items()
    elif isinstance(obj, (list, tuple)):
        items = ((str(i), v) for i, v in enumerate(obj))
    elif callable(getattr(obj, "items", None)) and callable(getattr(obj, "all_keys", None)):  # BaseDataElement
        items = obj.items()
    elif isinstance(getattr(obj, "data", None), torch.Tensor):  # PixelData without items()
        items = (("data", obj.data),)
    else:
        return
    for key, value in items:
        yield from _numbers(value, f"{name}.{key}" if name else str(key), depth + 1)


def _non_finite(obj) -> Optional[str]:
    """The name of the first floating tensor / float in ``obj`` (see :func:`_numbers`) that holds a NaN or
    infinity, else None. One device synchronisation for the whole of ``obj`` when everything is finite."""
    import torch

    found = list(_numbers(obj))
    tensors = [v for _, v in found if isinstance(v, torch.Tensor)]
    floats_ok = all(math.isfinite(v) for _, v in found if isinstance(v, float))
    if floats_ok and (not tensors or bool(torch.stack([torch.isfinite(t).all().to(tensors[0].device)
                                                      for t in tensors]).all())):
        return None
    for key, v in found:  # name the first one (only when something is wrong)
        if not (math.isfinite(v) if isinstance(v, float) else bool(torch.isfinite(v).all())):
            return key
    return None


def _sample_file(data_batch, index: int, dataset=None) -> str:
    """`` for <image file>`` of sample ``index`` of a batch: mmseg / mmpretrain data samples carry it
    (``img_path``); our probes' collated ``data_samples`` carry the dataset ``index`` of ``dataset.samples``."""
    samples = data_batch.get("data_samples") if isinstance(data_batch, dict) else None
    path = None
    try:
        if isinstance(samples, dict) and "index" in samples:
            path = dataset.samples[int(samples["index"][index])][0]
        else:
            path = samples[index].metainfo.get("img_path")
    except Exception:  # noqa: BLE001 - no per-sample record
        return ""
    return f" for {path}" if isinstance(path, str) else ""


class NonFiniteCheckHook(Hook):
    """Stops a run at the first non-finite value a metric or checkpoint would take in: the training losses
    (the outputs whose name holds ``loss``, every iteration, before the checkpoint hook runs: no checkpoint
    of NaN weights is written), the weights of every checkpoint before it is written (an update can overflow
    while the loss before it was finite) and every floating output of a validation / test step (``seg_logits``,
    ``pred_score``: a NaN score argmaxes to class 0 and was scored as a prediction). Raises
    :class:`NonFiniteError`. mmengine's ``CheckInvalidLossHook`` checks only the loss, every 50 iterations,
    with an ``AssertionError``."""

    def after_train_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        losses = {k: v for k, v in outputs.items() if "loss" in str(k)} if isinstance(outputs, dict) else {}
        bad = _non_finite(losses)
        if bad:
            value = losses[bad]
            value = float(value.detach()) if hasattr(value, "detach") else value
            raise NonFiniteError(f"training diverged: {bad} is {value} at iteration {runner.iter + 1} (learning "
                                 f"rate too high, or the data or initial weights hold NaN/inf); the run stopped "
                                 f"before saving a checkpoint of it")

    def before_save_checkpoint(self, runner, checkpoint: dict) -> None:
        """The weights a checkpoint would hold: an update can turn them non-finite while the loss it was
        computed from was finite (an infinite gradient or learning rate, an overflow); such a checkpoint would
        become ``last_checkpoint``, the one ``--resume`` continues from. One check per saved checkpoint."""
        sd = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
        bad = _non_finite(dict(sd)) if isinstance(sd, dict) else None
        if bad:
            meta = checkpoint.get("meta") if isinstance(checkpoint.get("meta"), dict) else {}
            step = meta.get("iter", runner.iter)
            raise NonFiniteError(f"training diverged: the weights are not finite (NaN/inf; first: {bad}) after "
                                 f"iteration {step} (an update overflowed: learning rate too high, or an "
                                 f"infinite gradient); the run stopped before saving a checkpoint of them: the "
                                 f"work dir's last checkpoint is the previous one")

    def _check_outputs(self, what: str, loop, batch_idx: int, data_batch, outputs) -> None:
        if not isinstance(outputs, (list, tuple)) or _non_finite(outputs) is None:  # one check per batch
            return
        for i, sample in enumerate(outputs):
            bad = _non_finite(sample)
            if bad:
                dataset = getattr(getattr(loop, "dataloader", None), "dataset", None)
                raise NonFiniteError(f"{what}: the model's output {bad} is not finite (NaN/inf)"
                                     f"{_sample_file(data_batch, i, dataset)} (batch {batch_idx}): no metric is "
                                     f"computed over it; check the checkpoint's weights and the input")

    def after_val_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._check_outputs("validation", runner.val_loop, batch_idx, data_batch, outputs)

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None) -> None:
        self._check_outputs("test", runner.test_loop, batch_idx, data_batch, outputs)

    @staticmethod
    def _check_metrics(what: str, metrics) -> None:
        """A summary metric that is NaN / inf is undefined over the split (a segmentation split whose label
        maps hold only the ignore index: no pixel is counted); it is not reported, nor used by ``save_best``."""
        bad = {k: v for k, v in (metrics or {}).items() if isinstance(v, (float, int, np.floating, np.integer))
               and not isinstance(v, bool) and not math.isfinite(float(v))}
        if bad:
            shown = ", ".join(f"{k}={float(v)}" for k, v in list(bad.items())[:4])
            raise NonFiniteError(f"{what}: {shown}: undefined over this split (no sample counted: e.g. every label "
                                 f"pixel is the ignore index); the metric is not reported")

    def after_val_epoch(self, runner, metrics=None) -> None:
        self._check_metrics("validation", metrics)

    def after_test_epoch(self, runner, metrics=None) -> None:
        self._check_metrics("test", metrics)


#: the ``iou_metrics`` mmseg's ``IoUMetric`` knows (it checks them only after the whole evaluation)
IOU_METRICS = ("mIoU", "mDice", "mFscore")


def check_evaluator(loop, what: str) -> None:
    """Refuse evaluator arguments that the metric would reject only after the whole evaluation: mmseg's
    ``IoUMetric`` with an ``iou_metrics`` entry other than :data:`IOU_METRICS` (a ``KeyError`` after inference
    over the split, or after the first training interval). ``what``: the config key (``test_evaluator``).
    Raises ``ValueError`` naming the key and the value."""
    metrics = getattr(getattr(loop, "evaluator", None), "metrics", None) or []
    for metric in metrics:
        if type(metric).__name__ != "IoUMetric" or not type(metric).__module__.startswith("mmseg"):
            continue
        names = getattr(metric, "metrics", None)
        names = [names] if isinstance(names, str) else list(names or [])
        unknown = [n for n in names if n not in IOU_METRICS]
        if unknown or not names:
            raise ValueError(f"{what}.iou_metrics: {unknown[0] if unknown else names!r} is not one of "
                             f"{', '.join(IOU_METRICS)}")
