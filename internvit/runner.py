"""The logic behind ``tools/train.py`` / ``tools/test.py``: generic over mmengine configs (segmentation and
classification alike), so the CLIs stay thin and tests call these functions directly.

Order of events: the OpenMMLab compatibility fixes (:func:`internvit.compat.apply`) → ``Config.fromfile``
(which imports the config's ``custom_imports``) → mmseg's ``register_all_modules`` only when the config's
``default_scope`` is ``'mmseg'`` → a ``Runner`` (or the config's ``runner_type``, e.g. ``FlexibleRunner``).
"""
from __future__ import annotations

import logging
import os
import os.path as osp
from typing import Any, Optional

from internvit import compat


def load_config(config: str, *, cfg_options: Optional[dict] = None, work_dir: Optional[str] = None,
                launcher: str = "none"):
    """Read an mmengine config with the compatibility fixes applied first; returns the ``Config``."""
    if not osp.isfile(config):
        raise FileNotFoundError(f"{config}: no such config file")
    compat.apply(mmseg=False)
    from mmengine.config import Config

    cfg = Config.fromfile(config)  # imports cfg.custom_imports (e.g. 'segmentation', 'classification')
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


def build_runner(cfg):
    """``Runner.from_cfg``, or the registry's ``runner_type`` (``FlexibleRunner`` for FSDP / DeepSpeed)."""
    from mmengine.registry import RUNNERS
    from mmengine.runner import Runner

    if "runner_type" in cfg:
        return RUNNERS.build(cfg)
    return Runner.from_cfg(cfg)


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
    checkpoint (the user's own training checkpoint: read with full unpickling). ``amp`` switches an
    ``OptimWrapper`` to ``AmpOptimWrapper`` (dynamic loss scale).
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
    if resume == "auto":
        cfg.resume, cfg.load_from = True, None
    elif resume:
        if not osp.isfile(resume):
            raise FileNotFoundError(f"--resume {resume}: no such checkpoint")
        cfg.resume, cfg.load_from = True, resume
    return build_runner(cfg)


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
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f"{checkpoint}: no such checkpoint file")
    cfg = load_config(config, cfg_options=cfg_options, work_dir=work_dir, launcher=launcher)
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
            evaluators = cfg.test_evaluator if isinstance(cfg.test_evaluator, list) else [cfg.test_evaluator]
            cfg.test_evaluator = [*evaluators, dict(type="DumpResults", out_file_path=out)]
    return build_runner(cfg)
