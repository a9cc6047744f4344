"""The logic behind ``tools/train.py`` / ``tools/test.py``: generic over mmengine configs (segmentation and
classification alike), so the CLIs stay thin and tests call these functions directly.

Order of events: the OpenMMLab compatibility fixes (:func:`internvit.compat.apply`) → ``Config.fromfile``
(which imports the config's ``custom_imports``) → mmseg's ``register_all_modules`` only when the config's
``default_scope`` is ``'mmseg'`` → the checkpoint to load is read without running code
(:func:`internvit.compat.load_runner_checkpoint`) → a ``Runner`` (or the config's ``runner_type``, e.g.
``FlexibleRunner``) → the checkpoint's state dict is checked against the model (missing, unexpected and
mis-shaped keys are a :class:`internvit.CheckpointError`; the files the new runner wrote are removed again).
The runner's ``train`` / ``val`` / ``test`` run inside :func:`internvit.compat.safe_checkpoint_loading`.

Set-up problems raise ``OSError`` / ``ValueError`` (``CheckpointError``) / ``KeyError`` / ``TypeError`` /
``ImportError`` with a one-line message naming the file or key; the tools report them as ``error: ...``.
"""
from __future__ import annotations

import contextlib
import logging
import os
import os.path as osp
import re
import shutil
import warnings
from typing import Any, Optional

from internvit import compat

#: what building a runner raises for bad input (configs, checkpoints, model arguments): the tools report these
#: as one ``error:`` line; anything else, and anything raised once training / testing runs, keeps its traceback
SETUP_ERRORS = (OSError, ValueError, KeyError, TypeError, ImportError)


@contextlib.contextmanager
def held_back_warnings():
    """Warnings raised inside the block (libraries announcing things while a runner is built) are shown when
    the block succeeds and dropped when it raises, so a set-up error is the only line the user sees."""
    with warnings.catch_warnings(record=True) as caught:
        yield
    for w in caught:
        warnings.showwarning(w.message, w.category, w.filename, w.lineno, w.file, w.line)


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
                launcher: str = "none"):
    """Read an mmengine config with the compatibility fixes applied first; returns the ``Config``."""
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
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    cfg.launcher = launcher
    if work_dir is not None:
        cfg.work_dir = work_dir
    elif cfg.get("work_dir") is None:
        cfg.work_dir = osp.join("./work_dirs", osp.splitext(osp.basename(config))[0])
    if cfg.get("default_scope") == "mmseg":
        compat.apply(mmseg=True)
        from mmseg.utils import register_all_modules

        register_all_modules(init_default_scope=False)
    return cfg


def build_runner(cfg, checkpoint: Optional[str] = None, dataloaders: tuple = ()):
    """``Runner.from_cfg``, or the registry's ``runner_type`` (``FlexibleRunner`` for FSDP / DeepSpeed).

    Its ``train`` / ``val`` / ``test`` load checkpoints only through :func:`internvit.compat.load_runner_checkpoint`
    (:func:`internvit.compat.safe_checkpoint_loading` around each call). ``checkpoint`` (a local file) is read
    without running code *before* the runner is built and checked against the built model afterwards; when it
    does not fit, the files the runner has written (its log folder, a work dir it created) are removed and
    :class:`internvit.CheckpointError` names the keys. ``dataloaders`` (``'train'``, ``'val'``, ``'test'``) are
    built now rather than when the loop starts, so that a dataset's bad input (a missing folder, an unknown
    label) is a set-up error too (a plain ``Runner`` only; the same call its loops make).
    """
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    ckpt = _read_checkpoint(checkpoint) if checkpoint else None
    work_dir = osp.abspath(cfg.work_dir)
    existing = set(os.listdir(work_dir)) if osp.isdir(work_dir) else None
    runner = RUNNERS.build(cfg) if "runner_type" in cfg else Runner.from_cfg(cfg)
    try:
        if ckpt is not None:
            check_fits(runner.model, ckpt, checkpoint)
        _build_dataloaders(runner, dataloaders)
    except Exception:
        _discard_run_files(runner, work_dir, existing)
        raise
    _scope_checkpoint_loading(runner)
    return runner


def _build_dataloaders(runner, names: tuple) -> None:
    from mmengine.runner import Runner

    if type(runner).build_dataloader is not Runner.build_dataloader or not isinstance(runner, Runner):
        return
    diff_rank_seed = runner._randomness_cfg.get("diff_rank_seed", False)
    for name in names:
        attr = f"_{name}_dataloader"
        loader = getattr(runner, attr, None)
        if isinstance(loader, dict):
            setattr(runner, attr, runner.build_dataloader(loader, seed=runner.seed, diff_rank_seed=diff_rank_seed))


def _is_local(path: str) -> bool:
    return not re.match(r"^([a-z][\w+.-]*://|\w+::)", str(path))


def _read_checkpoint(path: str):
    """A local checkpoint, read without running code and memory-mapped (only shapes are looked at)."""
    if not _is_local(path):
        return None  # a URL or a package scheme: read (safely) by the runner when it loads it
    if not osp.isfile(path):
        raise FileNotFoundError(f"{path}: no such checkpoint file")
    return compat.load_runner_checkpoint(path, "cpu", mmap=True)


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
        raise CheckpointError(f"{path}: no state dict of tensors (top-level keys: {top})")
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


def _discard_run_files(runner, work_dir: str, existing: Optional[set]) -> None:
    """Remove what a runner wrote while being built: the work dir if it made it, else the entries it added
    (its timestamped log folder, the dumped config)."""
    for handler in list(getattr(runner.logger, "handlers", [])):
        if isinstance(handler, logging.FileHandler):
            handler.close()
            runner.logger.removeHandler(handler)
    # mmengine keeps the logger and visualizer as named per-process instances: forget these two, or the next
    # runner of that name (same config, same second) would reuse them and write into the removed folder
    for instance in (getattr(runner, "logger", None), getattr(runner, "visualizer", None)):
        registry = getattr(type(instance), "_instance_dict", None)
        if registry is not None and registry.get(getattr(instance, "instance_name", None)) is instance:
            registry.pop(instance.instance_name)
    if existing is None:
        shutil.rmtree(work_dir, ignore_errors=True)
        return
    for name in set(os.listdir(work_dir)) - existing if osp.isdir(work_dir) else ():
        path = osp.join(work_dir, name)
        if osp.isdir(path) and not osp.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.remove(path)


def _scope_checkpoint_loading(runner) -> None:
    """Make the runner's ``train`` / ``val`` / ``test`` run inside :func:`compat.safe_checkpoint_loading`
    (its class's methods, looked up at call time)."""
    cls = type(runner)

    def scoped(name: str):
        def call(*args, **kwargs):
            with compat.safe_checkpoint_loading():
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
                       local_rank: Optional[int] = None):
    """The training runner of ``config``, built (config, model, checkpoint paths checked) but not started.

    ``resume='auto'`` continues from the latest checkpoint in ``work_dir``; a path resumes from that
    checkpoint. The checkpoint (or the config's ``load_from``) is read without running code and must fit the
    model (:func:`build_runner`). ``amp`` switches an ``OptimWrapper`` to ``AmpOptimWrapper`` (dynamic loss
    scale).
    """
    from mmengine.logging import print_log

    _set_local_rank(local_rank)
    cfg = load_config(config, cfg_options=cfg_options, work_dir=work_dir, launcher=launcher)
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
    checkpoint = cfg.get("load_from")
    if resume == "auto":
        from mmengine.runner import find_latest_checkpoint

        cfg.resume, cfg.load_from = True, None
        checkpoint = find_latest_checkpoint(cfg.work_dir) if osp.isdir(cfg.work_dir) else None
    elif resume:
        if not osp.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        cfg.resume, cfg.load_from = True, resume
        checkpoint = resume
    return build_runner(cfg, checkpoint, dataloaders=("train", "val"))


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
                      launcher: str = "none", local_rank: Optional[int] = None):
    """The test runner of ``config`` evaluating ``checkpoint``, built but not started.

    With ``launcher='none'`` a config for ``FlexibleRunner`` with a distributed strategy (FSDP, DeepSpeed)
    is tested with a plain single-process ``Runner``.

    ``show_dir`` writes prediction overlays (mmseg's ``SegVisualizationHook``); ``out`` stores the raw
    predictions: for mmseg configs a directory of label PNGs (``IoUMetric(output_dir=...)``), otherwise a
    pickle file (mmengine's ``DumpResults``).
    """
    _set_local_rank(local_rank)
    if _is_local(checkpoint) and not osp.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
    cfg = load_config(config, cfg_options=cfg_options, work_dir=work_dir, launcher=launcher)
    _require(cfg, config, ("test_dataloader", "test_cfg", "test_evaluator"), "testing")
    cfg.load_from = checkpoint
    if launcher == "none":
        _single_process_runner(cfg)
    if show_dir:
        _enable_visualization(cfg, osp.abspath(show_dir))
    if out:
        if cfg.get("default_scope") == "mmseg":
            cfg.test_evaluator["output_dir"] = out
            cfg.test_evaluator["keep_results"] = True
        else:
            if not out.endswith((".pkl", ".pickle")):
                raise ValueError(f"--out {out}: predictions of this config are saved as a pickle; use a .pkl name")
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = [*evaluators, dict(type="DumpResults", out_file_path=out)]
    return build_runner(cfg, checkpoint, dataloaders=("test",))
