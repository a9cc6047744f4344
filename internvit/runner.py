"""The logic behind ``tools/train.py`` / ``tools/test.py``: generic over mmengine configs (segmentation and
classification alike), so the CLIs stay thin and tests call these functions directly.

Order of events: the OpenMMLab compatibility fixes (:func:`internvit.compat.apply`) → ``Config.fromfile``
(which imports the config's ``custom_imports``) → mmseg's ``register_all_modules`` only when the config's
``default_scope`` is ``'mmseg'`` → the checkpoint to load is read without running code
(:func:`internvit.compat.load_runner_checkpoint`) → a ``Runner`` (or the config's ``runner_type``, e.g.
``FlexibleRunner``) → the checkpoint's state dict is checked against the model (missing, unexpected and
mis-shaped keys are a :class:`internvit.CheckpointError`; the files the new runner wrote are removed again).
The runner's ``train`` / ``val`` / ``test`` run inside :func:`internvit.compat.safe_checkpoint_loading` and
:func:`internvit.compat.durable_checkpoint_saving` (checkpoints are written atomically, old ones removed after
the new one is complete).

Set-up problems raise ``OSError`` / ``ValueError`` (``CheckpointError``) / ``KeyError`` / ``TypeError`` /
``ImportError`` with a one-line message naming the file or key; the tools report them as ``error: ...``. The
checks themselves (checkpoint fit, class lists, test output paths) are in :mod:`internvit.run_checks`.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import os.path as osp
import re
import shutil
import sys
import warnings
from typing import Any, Callable, Optional

from internvit import compat
from internvit.cli import one_line
from internvit.cpu_distributed import join_cpu_process_group
from internvit.file_reads import require_file
from internvit.run_checks import (
    NonFiniteCheckHook,
    check_classes,
    check_data_files,
    check_evaluator,
    check_fits,
    check_input_kind,
    check_launcher_env,
    check_one_process_draws,
    check_option_keys,
    check_output_path,
    check_same_classes,
    check_split_options,
    check_train_loop,
    check_unique_names,
    class_list,
    dataset_class_names,
    name_data_errors,
)
from internvit.store import first_missing_dir, make_dirs
from internvit.train_hooks import OwedValidationHook, RunningStatsSyncHook, StepRandomnessHook, seed_data_loading
from internvit.work_dir import (  # noqa: F401 - latest_complete_checkpoint: part of the runner API
    _is_local,
    _release_after_training,
    check_work_dir,
    check_work_dir_path,
    latest_complete_checkpoint,
    lock_work_dir,
    set_aside_earlier_run,
)

#: what building a runner raises for bad input (configs, checkpoints, model arguments): the tools report these
#: as one ``error:`` line; anything else, and anything raised once training / testing runs, keeps its traceback
SETUP_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError)


@contextlib.contextmanager
def held_back_warnings():
    """Warnings and standard output inside the block (libraries announcing things while a runner is built:
    mmengine's environment banner, its config dump) are shown when the block succeeds and dropped when it
    raises, so a set-up error is the only line the user sees. Log handlers created inside the block write to
    the real standard output afterwards."""
    real, held = sys.stdout, io.StringIO()
    with warnings.catch_warnings(record=True) as caught, contextlib.redirect_stdout(held):
        try:
            yield
        finally:
            _repoint_streams(held, real)
    real.write(held.getvalue())
    real.flush()
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


def _repoint_streams(old, new) -> None:
    """Log handlers writing to ``old`` write to ``new`` (every logger, mmengine's ``MMLogger`` instances too)."""
    from mmengine.logging import MMLogger

    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger)), *MMLogger._instance_dict.values()]
    for lg in loggers:
        for h in lg.handlers:
            if isinstance(h, logging.StreamHandler) and h.stream is old:
                h.setStream(new)


def cfg_options_action():
    """mmengine's ``DictAction`` for ``--cfg-options``, with a one-line error for an item that is not
    ``key=value``."""
    from mmengine.config import DictAction

    class CfgOptions(DictAction):
        def __call__(self, parser, namespace, values, option_string=None):
            bad = next((v for v in values if "=" not in v or v.startswith("=")), None)
            if bad is not None:
                parser.error(f"argument {option_string}: expected key=value, got {bad!r}")
            super().__call__(parser, namespace, values, option_string)

    return CfgOptions


def load_config(config: str, *, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = "none", evaluates: Optional[str] = None):
    """Read an mmengine config with the compatibility fixes applied first; returns the ``Config``.

    ``evaluates`` (``'val'`` for training, ``'test'`` for a test) refuses ``cfg_options`` that change only the
    other split where the config gives both the same setting (:func:`internvit.run_checks.check_split_options`).
    """
    if not osp.isfile(config):
        raise FileNotFoundError(f"{config}: no such config file")
    compat.apply(mmseg=False)
    from mmengine.config import Config

    try:
        cfg = Config.fromfile(config)  # imports cfg.custom_imports (e.g. 'segmentation', 'classification')
    except SyntaxError as e:
        where = f"line {e.lineno}: " if e.lineno else ""
        msg = re.sub(r"\s*\(<unknown>, line \d+\)$", "", str(e.msg or e).splitlines()[0])
        raise ValueError(f"{config}: syntax error: {where}{msg}") from None
    if "model" not in cfg:
        raise ValueError(f"{config}: the config defines no 'model'")
    # mmengine 0.10 re-formats the whole config text with yapf on every dump/checkpoint (seconds each);
    # Config.fromfile ignores format_python_code=False, so switch it off on the instance.
    object.__setattr__(cfg, "_format_python_code", False)
    check_launcher_env(launcher)
    if cfg_options:
        check_option_keys(cfg, cfg_options)
        if evaluates:
            check_split_options(cfg, cfg_options, evaluates)
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(config))[0])
    seed = (cfg.get("randomness") or {}).get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 32):
        raise ValueError(f"randomness.seed must be an integer from 0 to 2**32 - 1 (or None), got {seed!r}")
    if not isinstance(cfg.work_dir, str) or not cfg.work_dir.strip():  # '' would be the current folder
        raise ValueError(f"work_dir must be a folder path, got {cfg.work_dir!r}")
    check_work_dir_path(cfg.work_dir, "--work-dir" if work_dir is not None else "work_dir")
    empty = [k for k, v in (cfg_options or {}).items() if isinstance(v, str) and not v.strip()]
    if empty:  # mmengine passed '' on: a type error later ("invalid literal for int()"), naming neither key nor flag
        raise ValueError(f"--cfg-options {empty[0]}=: empty value")
    dump = osp.join(osp.abspath(cfg.work_dir), osp.basename(config))  # where the Runner writes its flat copy
    if osp.isfile(dump) and osp.samefile(dump, config):
        raise ValueError(f"work dir {cfg.work_dir}: holds the config {config} itself, which the run would replace "
                         f"with its flattened copy (the _base_ lines lost): use another work dir")
    mode = ((cfg.get("model") or {}).get("test_cfg") or {}).get("mode")
    if cfg.get("default_scope") == "mmseg" and mode not in (None, "whole", "slide"):  # else an error at batch 1
        raise ValueError(f"{config}: model.test_cfg.mode must be 'whole' or 'slide', got {mode!r}")
    if cfg.get("default_scope") == "mmseg":
        compat.apply(mmseg=True)
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
    return cfg


def build_runner(cfg, checkpoint: Optional[str] = None, dataloaders: tuple = (),
                 after_build: Optional[Callable] = None, checkpoint_classes: bool = False):
    """``Runner.from_cfg``, or the registry's ``runner_type`` (``FlexibleRunner`` for FSDP / DeepSpeed).

    Its ``train`` / ``val`` / ``test`` load checkpoints only through :func:`internvit.compat.load_runner_checkpoint`
    (:func:`internvit.compat.safe_checkpoint_loading` around each call). ``checkpoint`` (a local file) is read
    without running code *before* the runner is built and checked against the built model afterwards; when it
    does not fit, the files the runner has written (its log folder, a work dir it created) are removed and
    :class:`internvit.CheckpointError` names the keys. ``dataloaders`` (``'train'``, ``'val'``, ``'test'``) are
    built now rather than when the loop starts, so that a dataset's bad input (a missing folder, an unknown
    label) is a set-up error too (a plain ``Runner`` only; the same call its loops make), and their datasets'
    class counts are checked against the model's heads (:func:`check_classes`), their kind of input (images or
    cached features) against the model's (:func:`check_input_kind`), and their class lists against
    each other (:func:`check_same_classes`) and, with ``checkpoint_classes`` (testing, resuming), against the
    classes the checkpoint was trained on (its ``meta.dataset_meta``); hooks with a ``check_setup(runner)``
    method run it, and so does the model (e.g. the retrieval fine-tuning model compares the datasets'
    tokenizer and image size with its own). ``after_build(runner, checkpoint_dict_or_None)`` runs last,
    inside the same clean-up: whatever it raises also removes the runner's files. A failure while the runner
    itself is being built (an unknown registry type, a bad model argument) removes them too. The run's config
    copy is written (atomically) only once every check passed: a refused run leaves an earlier run's copy in
    that work dir as it was. A :class:`internvit.run_checks.NonFiniteCheckHook` is registered: a non-finite
    training loss or model output stops the run (:class:`internvit.run_checks.NonFiniteError`).
    """
    from mmengine.model import is_model_wrapper
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    ckpt = _read_checkpoint(checkpoint) if checkpoint else None
    join_cpu_process_group(cfg)
    work_dir = osp.abspath(cfg.work_dir)
    existing = set(os.listdir(work_dir)) if osp.isdir(work_dir) else None
    created = first_missing_dir(work_dir)  # the Runner makes every missing folder of the path
    instances = _manager_instances()
    _distinct_experiment_name(cfg, instances)
    try:
        with compat.deferred_config_dump():  # written below once every check passed
            runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
        if ckpt is not None:
            check_fits(runner.model, ckpt, checkpoint)
        _build_dataloaders(runner, dataloaders)
        for name in dataloaders:
            loader = getattr(runner, f"_{name}_dataloader", None)
            check_classes(runner.model, loader, f"{name}_dataloader")
            check_input_kind(runner.model, loader, f"{name}_dataloader")
            check_data_files(loader, f"{name}_dataloader")
            name_data_errors(loader)
        lists = {f"{n}_dataloader": dataset_class_names(getattr(runner, f"_{n}_dataloader", None))
                 for n in dataloaders}
        if checkpoint_classes and isinstance(ckpt, dict):
            meta = ckpt.get("meta") if isinstance(ckpt.get("meta"), dict) else {}
            names = (meta.get("dataset_meta") or {}).get("classes") if isinstance(meta.get("dataset_meta"),
                                                                                 dict) else None
            lists[f"checkpoint {checkpoint} (its dataset_meta)"] = class_list(names)
        check_same_classes(lists)
        for hook in getattr(runner, "hooks", ()):  # a hook's own set-up checks (e.g. an output folder it would fill)
            if callable(getattr(hook, "check_setup", None)):
                hook.check_setup(runner)
        model = getattr(runner, "model", None)
        model = model.module if is_model_wrapper(model) else model
        if callable(getattr(model, "check_setup", None)):  # the model's checks of the built datasets
            model.check_setup(runner)
        if after_build is not None:
            after_build(runner, ckpt)
    except BaseException:
        _discard_run_files(work_dir, existing, instances, created)
        raise
    compat.dump_config_atomically(runner)
    if cfg.get("default_scope") == "mmseg":
        _split_mixed_size_batches(runner.model)
    if callable(getattr(runner, "register_hook", None)):
        runner.register_hook(NonFiniteCheckHook(), priority="ABOVE_NORMAL")  # before a checkpoint is saved
        runner.register_hook(RunningStatsSyncHook())  # distributed: what is validated is what is saved
        runner.register_hook(StepRandomnessHook())  # a resumed run draws the numbers the uninterrupted one drew
        runner.register_hook(OwedValidationHook())  # resumed after a checkpoint, before its validation: run it
    _scope_checkpoint_loading(runner)
    return runner


def _split_mixed_size_batches(model) -> None:
    """Let ``model.val_step`` / ``test_step`` take a batch of images of different sizes one image at a time.
    mmseg's ``SegDataPreProcessor`` stacks an evaluation batch unpadded and asserted that its images have one
    size: ``test_dataloader.batch_size=4`` on ADE20K (images of every size) stopped with a traceback at the first
    mixed batch, after the images before it. One image at a time gives exactly what ``batch_size=1`` gives; a
    batch of one size runs as one batch as before."""
    def per_image(step: Callable) -> Callable:
        def call(data, *args, **kwargs):
            inputs = data.get("inputs") if isinstance(data, dict) else None
            if not isinstance(inputs, (list, tuple)) or len({tuple(getattr(x, "shape", ())) for x in inputs}) < 2:
                return step(data, *args, **kwargs)
            outputs: list = []
            for i in range(len(inputs)):
                one = {k: v[i:i + 1] if isinstance(v, (list, tuple)) and len(v) == len(inputs) else v
                       for k, v in data.items()}
                outputs.extend(step(one, *args, **kwargs))
            return outputs
        return call

    for name in ("val_step", "test_step"):
        if callable(getattr(model, name, None)):
            setattr(model, name, per_image(getattr(model, name)))


def _build_dataloaders(runner, names: tuple) -> None:
    from mmengine.runner import Runner

    if type(runner).build_dataloader is not Runner.build_dataloader or not isinstance(runner, Runner):
        return
    precheck_datasets(runner, tuple(f"_{name}_dataloader" for name in names))
    diff_rank_seed = runner._randomness_cfg.get("diff_rank_seed", False)
    for name in names:
        attr = f"_{name}_dataloader"
        loader = getattr(runner, attr, None)
        if isinstance(loader, dict):
            setattr(runner, attr, runner.build_dataloader(loader, seed=runner.seed, diff_rank_seed=diff_rank_seed))
            if name == "train":  # per-sample seeds, in workers too (before a loop starts them)
                seed_data_loading(getattr(runner, attr), runner.seed)


def _read_checkpoint(path: str):
    """A local checkpoint, read without running code and memory-mapped (only shapes are looked at)."""
    if not _is_local(path):
        return None  # a URL or a package scheme: read (safely) by the runner when it loads it
    require_file(path, "checkpoint file")
    return compat.load_runner_checkpoint(path, "cpu", mmap=True)


def _manager_instances() -> dict:
    """``{id(registry): (registry, its names)}`` of every mmengine ``ManagerMixin`` class (loggers, visualizers,
    message hubs, default scopes): the per-process named instances a runner creates."""
    from mmengine.utils import ManagerMixin

    out, todo = {}, [ManagerMixin]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        reg = cls.__dict__.get("_instance_dict")
        if isinstance(reg, dict):
            out[id(reg)] = (reg, set(reg))
    return out


_STAMP = re.compile(r"(?:^|_)\d{8}_\d{6}$")  # the Runner's experiment name: '{name}_{YYYYmmdd_HHMMSS}'


def _distinct_experiment_name(cfg, instances: dict) -> None:
    """Give ``cfg`` an ``experiment_name`` no earlier runner of this process used. The Runner names its logger,
    message hub and visualizer ``{experiment_name}_{second}``, and mmengine hands out an existing instance of a
    name: a second runner of the same config built in the same second logged into the first run's log file and
    wrote its scalars to the first run's ``vis_data``. A name already used gets a suffix (``toy_2``); a
    visualizer name already used (mmseg's configs name theirs ``'visualizer'``) is dropped, so that the visualizer
    takes the experiment's name and this run's log folder."""
    if cfg.get("experiment_name") is not None:
        base = str(cfg.experiment_name)
    elif cfg.filename is not None:
        base = osp.splitext(osp.basename(cfg.filename))[0]
    else:
        base = ""  # the Runner's name is the bare timestamp
    vis = cfg.get("visualizer")
    if isinstance(vis, dict) and vis.get("name") is not None and any(vis["name"] in names for _, names in
                                                                     instances.values()):
        vis.pop("name")  # a fixed name ('visualizer', mmseg's configs): the first runner's, with its save_dir
    used = {_STAMP.sub("", name) for _, names in instances.values() for name in names if _STAMP.search(name)}
    if base not in used:
        return
    base, n = base or "run", 2
    while f"{base}_{n}" in used:
        n += 1
    cfg.experiment_name = f"{base}_{n}"


def _discard_run_files(work_dir: str, existing: Optional[set], before: dict, created: Optional[str] = None) -> None:
    """Undo what building a runner did: forget the named instances it created (closing its log files; the next
    runner of that name, same config and second, would otherwise reuse them and write into the removed
    folder), then remove the work dir if it made it (from ``created``, the highest of its parent folders that
    did not exist before: ``work_dirs/`` of ``work_dirs/run1``), else the entries it added (its timestamped
    log folder, the dumped config)."""
    for key, (reg, names) in _manager_instances().items():
        old = before.get(key, (None, set()))[1]
        for name in list(names - old):
            instance = reg.pop(name, None)
            for handler in list(getattr(instance, "handlers", [])):
                if isinstance(handler, logging.FileHandler):
                    handler.close()
                    instance.removeHandler(handler)
    if existing is None:
        shutil.rmtree(created or work_dir, ignore_errors=True)
        return
    for name in set(os.listdir(work_dir)) - existing if osp.isdir(work_dir) else ():
        path = osp.join(work_dir, name)
        if osp.isdir(path) and not osp.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _scope_checkpoint_loading(runner) -> None:
    """Make the runner's ``train`` / ``val`` / ``test`` run inside :func:`compat.safe_checkpoint_loading` and
    :func:`compat.durable_checkpoint_saving` (its class's methods, looked up at call time)."""
    cls = type(runner)

    def scoped(name: str):
        def call(*args, **kwargs):
            with compat.safe_checkpoint_loading(), compat.durable_checkpoint_saving():
                return getattr(cls, name)(runner, *args, **kwargs)

        call.__name__ = name
        call.__doc__ = getattr(cls, name).__doc__
        return call

    for name in ("train", "val", "test"):
        setattr(runner, name, scoped(name))


def _set_local_rank(local_rank: Optional[int]) -> None:
    if local_rank is not None and "LOCAL_RANK" not in os.environ:
        os.environ["LOCAL_RANK"] = str(local_rank)


def train(config: str, **kwargs):
    """Train with mmengine (arguments of :func:`build_train_runner`); returns the runner after training."""
    runner = build_train_runner(config, **kwargs)
    runner.train()
    return runner


def build_train_runner(config: str, *, work_dir: Optional[str] = None, resume: Optional[str] = None,
                       amp: bool = False, cfg_options: Optional[dict] = None, launcher: str = "none",
                       local_rank: Optional[int] = None, overwrite: bool = False):
    """The training runner of ``config``, built (config, model, checkpoint paths checked) but not started.

    A work dir holding files the run would replace is refused unless ``overwrite``
    (:func:`check_work_dir`: checkpoints of an earlier run when not resuming, or, in a folder no run wrote, a
    file named like the run's config copy); ``FileExistsError``.

    ``resume='auto'`` continues from the latest complete checkpoint in ``work_dir``
    (:func:`latest_complete_checkpoint`); a path resumes from that checkpoint. The checkpoint (or the config's
    ``load_from``) is read without running code and must fit the model (:func:`build_runner`). ``amp`` switches
    an ``OptimWrapper`` to ``AmpOptimWrapper`` (dynamic loss scale).
    """
    from mmengine.logging import print_log

    _set_local_rank(local_rank)
    cfg = load_config(config, cfg_options=cfg_options, work_dir=work_dir, launcher=launcher, evaluates="val")
    if amp:
        wrapper = cfg.optim_wrapper.get("type", "OptimWrapper")
        if wrapper == "AmpOptimWrapper":
            print_log("AMP training is already enabled in the config.", logger="current", level=logging.WARNING)
        elif wrapper != "OptimWrapper":
            raise ValueError(f"--amp needs optim_wrapper.type='OptimWrapper', the config has {wrapper!r}")
        else:
            cfg.optim_wrapper.type = "AmpOptimWrapper"
            cfg.optim_wrapper.loss_scale = "dynamic"
    _require(cfg, config, ("train_dataloader", "train_cfg", "optim_wrapper"), "training")
    check_train_loop(None, train_cfg=cfg.get("train_cfg"))  # e.g. max_iters='abc': before the loop casts it
    if resume and resume != "auto":
        if osp.isdir(resume):
            raise IsADirectoryError(f"--resume {resume}: a folder, not a checkpoint file (give the .pth file, or "
                                    f"--resume alone for the latest one in the work dir)")
        if not osp.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
    work = osp.abspath(cfg.work_dir)
    made = make_dirs(work)
    lock = lock_work_dir(work)  # before anything is read or written there: one training run at a time
    notes = []  # for the run's log, once it exists
    try:
        checkpoint = cfg.get("load_from")
        if resume == "auto":
            found = latest_complete_checkpoint(cfg)
            if found is not None:
                cfg.resume, cfg.load_from = True, found
                checkpoint = found
            else:  # nothing to resume: the run starts as it would without --resume, from the config's load_from
                cfg.resume = False
                start = f"from load_from={checkpoint}" if checkpoint else "from the initial weights (no load_from)"
                notes.append(f"--resume: no checkpoint in {cfg.work_dir} to resume; a new run starts {start}")
        elif resume:
            cfg.resume, cfg.load_from = True, resume
            checkpoint = resume
        if not overwrite:
            check_work_dir(cfg.work_dir, osp.basename(config), resuming=bool(cfg.get("resume")))
        runner = build_runner(cfg, checkpoint, dataloaders=("train", "val"), after_build=_prepare_training,
                              checkpoint_classes=bool(cfg.get("resume")))
        if overwrite and not cfg.get("resume"):
            set_aside_earlier_run(runner, work)
    except BaseException:
        if made is not None:
            shutil.rmtree(made, ignore_errors=True)
        lock.release()
        raise
    for note in notes:
        runner.logger.warning(note)
    _release_after_training(runner, lock)
    return runner


def _prepare_training(runner, ckpt=None) -> None:
    """Build the optimizer wrapper and the train / val loops now (``Runner.train`` keeps built ones), so that
    their errors are set-up errors: a layer-decay constructor that does not fit the model, ``AmpOptimWrapper``
    without a GPU, a misspelt ``train_cfg`` argument, a batch larger than the dataset with ``drop_last``
    (mmengine asserted, or failed with ``TypeError`` / ``ZeroDivisionError`` after an epoch). A run with
    nothing to train (``max_epochs`` / ``max_iters`` < 1, or a resumed checkpoint past the end) and a
    ``val_interval`` < 1 are refused (:func:`internvit.run_checks.check_train_loop`). Parameter schedulers are
    left to ``Runner.train`` (they record the learning rate after its ``auto_scale_lr``)."""
    from mmengine.runner import Runner

    if not isinstance(runner, Runner):
        return
    for attr, build, what in (("optim_wrapper", "build_optim_wrapper", "optim_wrapper"),
                              ("_train_loop", "build_train_loop", "train_cfg"),
                              ("_val_loop", "build_val_loop", "val_cfg")):
        if getattr(type(runner), build) is not getattr(Runner, build) or not isinstance(getattr(runner, attr),
                                                                                       dict):
            continue
        try:
            setattr(runner, attr, getattr(runner, build)(getattr(runner, attr)))
        except (AssertionError, ZeroDivisionError) as e:  # mmengine asserts on its arguments
            raise ValueError(f"{what}: {one_line(e) if str(e) else type(e).__name__}") from None
    check_train_loop(runner._train_loop, ckpt if getattr(runner, "_resume", False) else None,
                     dict(runner.cfg.get("train_cfg") or {}))
    check_evaluator(runner._val_loop, "val_evaluator")
    if getattr(runner, "_resume", False):
        check_resumed_optimizer(runner.optim_wrapper, ckpt, runner.cfg.get("load_from"))


def _group_sizes(state) -> Optional[list]:
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not isinstance(groups, (list, tuple)) or not all(isinstance(g, dict) for g in groups):
        return None
    return [len(g.get("params") or ()) for g in groups]


def check_resumed_optimizer(optim_wrapper, ckpt, path: Optional[str]) -> None:
    """Refuse a ``--resume`` checkpoint whose optimizer state was saved for other parameter groups than this
    config's optimizer has (another ``model.recipe``, ``paramwise_cfg``, layer decay: mmengine failed in
    ``Runner.train`` with a traceback, 'loaded state dict has a different number of parameter groups'):
    ``ValueError`` naming the checkpoint, both splits and the way out (``load_from`` takes the weights only)."""
    from mmengine.optim import OptimWrapper

    saved = ckpt.get("optimizer") if isinstance(ckpt, dict) else None
    if not isinstance(optim_wrapper, OptimWrapper) or not isinstance(saved, dict):
        return
    have, want = _group_sizes(saved), [len(g["params"]) for g in optim_wrapper.optimizer.param_groups]
    if have is None or have == want:
        return

    if len(have) == len(want):
        i = next(i for i, (a, b) in enumerate(zip(have, want)) if a != b)
        differs = (f"{len(have)} parameter groups, group {i} of {have[i]} tensors, this config's optimizer's of "
                   f"{want[i]}")
    else:
        differs = (f"{len(have)} parameter group(s) ({sum(have)} tensors), this config's optimizer {len(want)} "
                   f"({sum(want)} tensors)")
    raise ValueError(f"--resume {path}: its optimizer state has {differs} (model.recipe, paramwise_cfg or layer "
                     f"decay changed?): a resume continues "
                     f"the same training; to start a new run from its weights use --cfg-options load_from={path} "
                     f"without --resume")


def precheck_datasets(runner, attrs: tuple) -> None:
    """Call ``precheck(cfg)`` of each dataset class named by the runner's dataloader configs ``attrs`` (those not
    built yet), before any of them is built: a dataset whose construction is costly (the classification
    ``CachedFeatureDataset`` extracts features) checks its cheap parts there, so that a bad val split is refused
    before the train split's features are extracted. Raises what the prechecks raise."""
    from mmengine.dataset import BaseDataset
    from mmengine.registry import DATASETS

    for attr in attrs:
        loader = getattr(runner, attr, None)
        dataset = loader.get("dataset") if isinstance(loader, dict) else None
        if not isinstance(dataset, dict) or not isinstance(dataset.get("type"), (str, type)):
            continue
        cls = dataset["type"]
        if isinstance(cls, str):
            with DATASETS.switch_scope_and_registry(runner.cfg.get("default_scope")) as registry:
                cls = registry.get(cls)
        if cls is not None and callable(getattr(cls, "precheck", None)):
            cls.precheck(dataset)
        elif isinstance(cls, type) and issubclass(cls, BaseDataset):
            _require_samples(cls, dataset, attr.lstrip("_"))


def _require_samples(cls, dataset: dict, what: str) -> None:
    """Refuse an mmengine dataset config that lists no sample, naming the dataloader and where it looked
    (mmengine failed with numpy's 'need at least one array to concatenate')."""
    ds = cls(**{k: v for k, v in dataset.items() if k != "type"}, lazy_init=True)
    prefix = getattr(ds, "data_prefix", None) or {}
    folder = str(prefix.get("img_path") or getattr(ds, "data_root", "") or "")  # mmengine joined data_root on
    try:
        if ds.load_data_list():
            return
    except FileNotFoundError as e:
        raise ValueError(f"{what}: {e.filename or folder}: no such file or folder") from None
    if getattr(ds, "ann_file", ""):
        where = f"its annotation file {ds.ann_file} lists none"
    else:
        suffix = getattr(ds, "img_suffix", None)
        where = f"{folder or '.'} holds no {f'{suffix!r} ' if suffix else ''}images"
    raise ValueError(f"{what}: no samples: {where}")


def _require(cfg, config: str, keys: tuple, what: str) -> None:
    missing = [k for k in keys if cfg.get(k) is None]
    if missing:
        raise ValueError(f"{config}: {what} needs {', '.join(repr(k) for k in missing)} in the config")


def _enable_visualization(cfg, show_dir: str) -> None:
    hook = cfg.get("default_hooks", {}).get("visualization")
    if hook is None:
        raise ValueError("--show-dir needs a 'visualization' entry in the config's default_hooks "
                         "(e.g. dict(type='SegVisualizationHook'))")
    if cfg.get("visualizer") is None:
        raise ValueError("--show-dir needs a 'visualizer' in the config (e.g. dict(type='SegLocalVisualizer', "
                         "vis_backends=[dict(type='LocalVisBackend')]))")
    hook["draw"] = True
    hook["interval"] = 1  # every test image
    cfg.visualizer["save_dir"] = show_dir  # the local vis backend writes <show_dir>/vis_data/vis_image/*.png
    # visualizers are per-process singletons by name: a fresh name, or an earlier runner's instance is reused
    cfg.visualizer["name"] = f"visualizer_show_{len(show_dir)}_{abs(hash(show_dir))}"


def test(config: str, checkpoint: str, **kwargs) -> dict[str, Any]:
    """Evaluate ``checkpoint`` with the config's test loop (arguments of :func:`build_test_runner`); returns
    the metrics."""
    return build_test_runner(config, checkpoint, **kwargs).test()


#: strategies that need a process group; ``--launcher none`` tests their configs with a plain ``Runner``
_DISTRIBUTED_STRATEGIES = ("FSDPStrategy", "DeepSpeedStrategy", "DDPStrategy", "ColossalAIStrategy")


def _single_process_runner(cfg) -> None:
    """``--launcher none`` on a ``FlexibleRunner`` config with a distributed strategy: evaluate with a plain
    ``Runner`` instead (a full checkpoint loads the same; sharding is only for training memory)."""
    from mmengine.logging import print_log

    strategy = cfg.get("strategy") or {}
    if cfg.get("runner_type") != "FlexibleRunner" or strategy.get("type") not in _DISTRIBUTED_STRATEGIES:
        return
    print_log(f"--launcher none: testing with a single-process Runner instead of FlexibleRunner + "
              f"{strategy['type']}", logger="current", level=logging.WARNING)
    for key in ("runner_type", "strategy"):
        cfg.pop(key)
    if cfg.get("model", {}).get("backbone", {}).get("out_dtype") is not None:  # DeepSpeed bf16 heads
        cfg.model.backbone.pop("out_dtype")


def build_test_runner(config: str, checkpoint: str, *, work_dir: Optional[str] = None,
                      show_dir: Optional[str] = None, out: Optional[str] = None, cfg_options: Optional[dict] = None,
                      launcher: str = "none", local_rank: Optional[int] = None, overwrite: bool = False):
    """The test runner of ``config`` evaluating ``checkpoint``, built but not started.

    With ``launcher='none'`` a config for ``FlexibleRunner`` with a distributed strategy (FSDP, DeepSpeed)
    is tested with a plain single-process ``Runner``.

    ``show_dir`` writes prediction overlays (mmseg's ``SegVisualizationHook``); ``out`` stores the raw
    predictions: for mmseg configs a directory of label PNGs (``IoUMetric(output_dir=...)``, one
    ``<image stem>.png`` per test image), otherwise a pickle file (mmengine's ``DumpResults``). Both replace
    same-named files, so an existing ``out`` file, or a ``show_dir`` / ``out`` folder that is not empty, needs
    ``overwrite=True`` (pointed at an annotation folder, the predictions replaced the ground truth), and test
    images whose names would collide there (``a/x.png`` and ``b/x.png``) are refused. Raises ``ValueError``.
    """
    _set_local_rank(local_rank)
    if _is_local(checkpoint) and osp.isdir(checkpoint):
        raise IsADirectoryError(f"{checkpoint}: a folder, not a checkpoint file (give the .pth file that "
                                f"tools/train.py saved)")
    if _is_local(checkpoint):
        require_file(checkpoint, "checkpoint file")
    cfg = load_config(config, cfg_options=cfg_options, work_dir=work_dir, launcher=launcher, evaluates="test")
    _require(cfg, config, ("test_dataloader", "test_cfg", "test_evaluator"), "testing")
    cfg.load_from = checkpoint
    if not overwrite:  # the run's config copy never replaces a user's file of that name
        check_work_dir(cfg.work_dir, osp.basename(config), resuming=False, checkpoints=False)
    if launcher == "none":
        _single_process_runner(cfg)
    seg = cfg.get("default_scope") == "mmseg"
    check_one_process_draws({"--show-dir": show_dir} if show_dir else {}, launcher)
    for flag, path, folder in (("--show-dir", show_dir, True), ("--out", out, seg)):
        if path:
            check_output_path(flag, path, folder, overwrite)
    if show_dir:
        _enable_visualization(cfg, osp.abspath(show_dir))
    if out:
        if seg:
            cfg.test_evaluator["output_dir"] = out
            cfg.test_evaluator["keep_results"] = True
        else:
            if not out.endswith((".pkl", ".pickle")):
                raise ValueError(f"--out {out}: predictions of this config are saved as a pickle; use a .pkl name")
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = [*evaluators, dict(type="DumpResults", out_file_path=out)]
    after = _without_training
    outputs = {flag: p for flag, p in (("--out", out), ("--show-dir", show_dir)) if p}
    if seg and outputs:
        def after(runner, ckpt=None) -> None:
            _without_training(runner)
            check_unique_names(runner, outputs)
    made = [first_missing_dir(p) for p in outputs.values()]  # removed again when the set-up fails
    try:
        runner = build_runner(cfg, checkpoint, dataloaders=("test",), after_build=after, checkpoint_classes=True)
    except BaseException:
        for path in made:
            if path is not None:
                shutil.rmtree(path, ignore_errors=True)
        raise
    _undo_outputs_on_failure(runner, {osp.abspath(p): osp.abspath(m) for p, m in zip(outputs.values(), made) if m})
    return runner


def _undo_outputs_on_failure(runner, made: dict) -> None:
    """Make ``runner.test()`` remove the output folders of ``made`` (``{output path: the highest folder this
    run created for it}``) when the test fails (bad data met in the loop, a NaN output, an interrupt): they held
    the predictions / overlays of the images before the failure only, which looked like a result and made the
    rerun refuse the folder without ``--overwrite``. A created folder that holds the work dir (``--out W/out``
    with a new ``W``) loses only the output itself, so the run's log stays. Folders that existed are left alone."""
    if not made:
        return
    work, test = osp.abspath(runner.work_dir), runner.test

    def test_or_undo():
        try:
            return test()
        except BaseException:
            for out, top in made.items():
                holds_work_dir = work == top or work.startswith(top + os.sep)
                shutil.rmtree(out if holds_work_dir else top, ignore_errors=True)
            raise

    runner.test = test_or_undo


def _without_training(runner, ckpt=None) -> None:
    """A test runner never trains: hooks that ask for ``runner.iter`` (mmseg's ``SegVisualizationHook``) get 0
    instead of building the train loop, and with it the training dataset, which need not be on disk. Its test
    loop (and evaluator) is built now, so that a bad ``test_cfg`` / ``test_evaluator`` argument is a set-up
    error rather than a traceback when testing starts."""
    from mmengine.runner import Runner

    runner._train_loop = None
    if isinstance(runner, Runner) and type(runner).build_test_loop is Runner.build_test_loop \
            and isinstance(runner._test_loop, dict):
        try:
            runner._test_loop = runner.build_test_loop(runner._test_loop)
        except AssertionError as e:  # mmengine asserts on its arguments
            raise ValueError(f"test_cfg: {one_line(e) if str(e) else type(e).__name__}") from None
    check_evaluator(runner._test_loop, "test_evaluator")
