"""Distributed mmengine runs on CPU (torchrun + gloo), which mmengine's own set-up does not support.

* :func:`join_cpu_process_group` — ``--launcher pytorch`` without CUDA: join the process group with gloo and
  wrap the model in :class:`CPUDistributedDataParallel` (mmengine calls ``torch.cuda.set_device`` and passes
  ``device_ids=[LOCAL_RANK]``, both CUDA-only).
* :class:`CPUDistributedDataParallel` — ``MMDistributedDataParallel`` whose model's ``SyncBatchNorm`` layers
  (``norm_cfg=dict(type='SyncBN')``, the published recipes) become BatchNorm first: torch's SyncBN is
  GPU-only ("SyncBatchNorm layers only work with GPU modules"). Each process then normalises with its own
  batch's statistics (the running statistics are still averaged over the processes after every step by
  :class:`internvit.train_hooks.RunningStatsSyncHook`); rank 0 prints one warning saying so.
"""
from __future__ import annotations

import logging

import torch
from mmengine.model import MMDistributedDataParallel, revert_sync_batchnorm
from mmengine.registry import MODEL_WRAPPERS

__all__ = ["CPUDistributedDataParallel", "join_cpu_process_group"]


@MODEL_WRAPPERS.register_module()
class CPUDistributedDataParallel(MMDistributedDataParallel):
    """``MMDistributedDataParallel`` for CPU processes: ``SyncBatchNorm`` layers are reverted to BatchNorm
    (same parameters and buffers) before DDP wraps the model. Arguments as ``MMDistributedDataParallel``."""

    def __init__(self, module: torch.nn.Module, **kwargs) -> None:
        n = sum(isinstance(m, torch.nn.SyncBatchNorm) for m in module.modules())
        if n:
            module = revert_sync_batchnorm(module)
            if torch.distributed.get_rank() == 0:
                from mmengine.logging import print_log

                print_log(f"SyncBN needs CUDA: the model's {n} SyncBatchNorm layer(s) run as BatchNorm in this "
                          f"CPU run, each of the {torch.distributed.get_world_size()} processes normalising "
                          f"with its own batch's statistics (running statistics are averaged after every step)",
                          logger="current", level=logging.WARNING)
        super().__init__(module=module, **kwargs)


def join_cpu_process_group(cfg) -> None:
    """``--launcher pytorch`` (torchrun) without CUDA: join the process group with gloo here and wrap the model
    in :class:`CPUDistributedDataParallel` without ``device_ids``. A ``model_wrapper_cfg`` of type
    ``MMDistributedDataParallel`` (or none) gets this subclass; another wrapper type is kept. A plain
    ``Runner`` only (``cfg`` without ``runner_type``); with CUDA nothing changes."""
    import torch.distributed as dist

    if cfg.get("launcher") != "pytorch" or torch.cuda.is_available() or "runner_type" in cfg:
        return
    if not dist.is_initialized():
        dist.init_process_group("gloo")  # env:// (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT from torchrun)
    wrapper = dict(cfg.get("model_wrapper_cfg") or {})
    if wrapper.get("type", "MMDistributedDataParallel") in ("MMDistributedDataParallel", MMDistributedDataParallel):
        wrapper["type"] = "CPUDistributedDataParallel"
    wrapper.setdefault("device_ids", None)
    wrapper.setdefault("broadcast_buffers", False)
    wrapper.setdefault("find_unused_parameters", cfg.get("find_unused_parameters", False))
    cfg.model_wrapper_cfg = wrapper
