"""mmengine pieces of retrieval fine-tuning: the recall metric, the HF export hook, the recipe's effective
learning-rate schedule and the FSDP wrap / checkpoint functions for InternVL-C/G."""
from __future__ import annotations

import json
import math
import os.path as osp
import tempfile
from typing import Optional, Sequence

import numpy as np
import torch
from mmengine.evaluator import BaseMetric
from mmengine.hooks import Hook
from mmengine.optim.scheduler.param_scheduler import INF, _ParamScheduler
from mmengine.registry import FUNCTIONS, HOOKS, METRICS, PARAM_SCHEDULERS
from torch import nn

MARKER = "finetune.json"


# -- evaluation ------------------------------------------------------------------------------------------
@METRICS.register_module()
class RetrievalRecall(BaseMetric):
    """Image → text and text → image recall@k of every image embedding mode, computed by
    :func:`retrieval.evaluate.retrieval_recall` (the code of ``tools/eval_retrieval.py``, CLIP_benchmark's
    protocol). Keys: ``{C|G}/text_retrieval_recall@k`` (image → text), ``{C|G}/image_retrieval_recall@k``
    (text → image), ``{C|G}/mean_recall``; with the default prefix ``retrieval/``. A recall@k with k at least
    the gallery (the number of images for text → image, of captions for image → text) is 1.0 for any model: it
    is left out (a ``UserWarning`` names it) and not averaged into ``mean_recall``."""

    default_prefix = "retrieval"

    def __init__(self, ks: Sequence[int] = (1, 5, 10), collect_device: str = "cpu",
                 prefix: Optional[str] = None) -> None:
        super().__init__(collect_device=collect_device, prefix=prefix)
        self.ks = tuple(int(k) for k in ks)

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        for s in data_samples:
            self.results.append(dict(index=int(s["index"]), text=s["text"].float().cpu(),
                                     image={k: v.float().cpu() for k, v in s["image"].items()}))

    def compute_metrics(self, results: list) -> dict:
        from retrieval.evaluate import retrieval_recall, without_keys

        by_index = {}
        for r in results:  # distributed samplers may repeat items to pad shards
            by_index.setdefault(r["index"], r)
        rows = [by_index[i] for i in sorted(by_index)]
        text = torch.cat([r["text"] for r in rows]).numpy()
        t2i = np.concatenate([np.full(len(r["text"]), n) for n, r in enumerate(rows)])
        out = {}
        trivial = self._trivial_keys(len(rows), len(text))
        for mode in rows[0]["image"]:
            image = torch.stack([r["image"][mode] for r in rows]).numpy()
            kept = without_keys(retrieval_recall(image, text, t2i, self.ks), trivial)
            tag = mode.split("-")[-1]
            out.update({f"{tag}/{k}": v for k, v in kept.items()})
        return out

    def _trivial_keys(self, n_images: int, n_texts: int) -> set:
        """The recall@k keys that are 1.0 whatever the model (:func:`retrieval.evaluate.trivial_recall_keys`)."""
        from retrieval.evaluate import trivial_recall_keys

        return trivial_recall_keys(self.ks, n_images, n_texts, who="RetrievalRecall")


# -- export ----------------------------------------------------------------------------------------------
@HOOKS.register_module()
class SaveHFModelHook(Hook):
    """After training, write the fine-tuned model as an HF directory (``internvit.load_model`` reads it;
    ``build_index.py --model internvl-g:DIR`` uses it) to ``out_dir`` (default ``<work_dir>/hf_model``).

    A folder that exists and was not written by this hook is refused before training starts (nothing is
    overwritten that the run did not create). Under FSDP the full state dict is gathered to rank 0.
    """

    priority = "LOWEST"

    def __init__(self, out_dir: Optional[str] = None, dtype: Optional[str] = None) -> None:
        self.out_dir = out_dir
        self.dtype = dtype

    def _target(self, runner) -> str:
        return osp.abspath(self.out_dir or osp.join(runner.work_dir, "hf_model"))

    def check_setup(self, runner) -> None:
        """Called by :func:`internvit.runner.build_runner` at set-up (one ``error:`` line, nothing written)."""
        self.before_train(runner)

    def before_train(self, runner) -> None:
        target = self._target(runner)
        if osp.exists(target) and not osp.isfile(osp.join(target, MARKER)):
            raise FileExistsError(f"{target} exists and was not written by a fine-tuning run: choose another "
                                  f"SaveHFModelHook out_dir (or remove it)")

    def after_train(self, runner) -> None:
        from mmengine.dist import get_rank
        from mmengine.model import is_model_wrapper

        from internvit.features import parse_dtype

        model = runner.model
        module = model.module if is_model_wrapper(model) else model
        state_dict = None
        try:
            from torch.distributed.fsdp import FullStateDictConfig, StateDictType
            from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
        except ImportError:  # pragma: no cover - torch without FSDP
            FSDP = None
        if FSDP is not None and isinstance(model, FSDP):
            cfg = FullStateDictConfig(offload_to_cpu=True, rank0_only=True)
            with FSDP.state_dict_type(model, StateDictType.FULL_STATE_DICT, cfg):
                state_dict = model.state_dict()
        if get_rank() != 0:
            return
        target = self._target(runner)
        dtype = parse_dtype(self.dtype) if self.dtype else None
        # the marker goes in with the model, in the same atomic swap (a kill never leaves a model folder without
        # it, which the next run would refuse); a folder of an earlier run (checked at before_train) is replaced
        with tempfile.TemporaryDirectory() as tmp:
            marker = osp.join(tmp, MARKER)
            with open(marker, "w", encoding="utf-8") as f:
                json.dump({"work_dir": osp.abspath(runner.work_dir), "iter": runner.iter,
                           "recipe": module.flags, "pretrained": module.pretrained}, f, indent=2)
            module.save_pretrained(target, state_dict=state_dict, dtype=dtype, overwrite=True, extra_files=[marker])
        runner.logger.info(f"fine-tuned model saved to {target}")


# -- schedule --------------------------------------------------------------------------------------------
@PARAM_SCHEDULERS.register_module()
class WarmupDecayLR(_ParamScheduler):
    """DeepSpeed's ``WarmupDecayLR`` as the upstream fine-tuning effectively ran (reference-spec-2 §2.6):
    at step ``t`` of ``T = end - begin``: ``lr = base · ln(t + 1) / ln(warmup)`` for ``t < warmup``
    (``warmup_type='log'``; ``'linear'``: ``t / warmup``), then ``base · max(0, (T - t) / (T - warmup))``.

    ``by_epoch=True`` with ``convert_to_iter_based=True`` turns ``end`` (epochs) into iterations, so ``T`` is
    the run's iteration count. ``warmup`` is in scheduler steps (iterations once converted).
    """

    def __init__(self, optimizer, warmup: int = 100, warmup_type: str = "log", begin: int = 0, end: int = INF,
                 last_step: int = -1, by_epoch: bool = True, verbose: bool = False) -> None:
        if warmup_type not in ("log", "linear"):
            raise ValueError(f"warmup_type must be 'log' or 'linear', got {warmup_type!r}")
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 step, got {warmup}")
        self.warmup, self.warmup_type = int(warmup), warmup_type
        super().__init__(optimizer, param_name="lr", begin=begin, end=end, last_step=last_step,
                         by_epoch=by_epoch, verbose=verbose)

    @classmethod
    def build_iter_from_epoch(cls, *args, begin=0, end=INF, by_epoch=True, epoch_length=None, **kwargs):
        if end != INF:
            end = int(end * epoch_length)
        return cls(*args, begin=int(begin * epoch_length), end=end, by_epoch=False, **kwargs)

    def factor(self, t: int) -> float:
        total = self.end - self.begin
        if t < self.warmup:
            if self.warmup_type == "log":
                return math.log(t + 1) / math.log(self.warmup) if self.warmup > 1 else 1.0
            return t / self.warmup
        return max(0.0, (total - t) / max(1.0, total - self.warmup))

    def _get_value(self):
        f = self.factor(self.last_step)
        return [base * f for base in self.base_values]


# -- FSDP ------------------------------------------------------------------------------------------------
def _is_layer(module: nn.Module) -> bool:
    from internvit.models.qllama import DecoderLayer
    from internvit.models.vit import Block

    return isinstance(module, (Block, DecoderLayer))


@FUNCTIONS.register_module()
def internvl_layer_wrap_policy(module: nn.Module, recurse: bool, nonwrapped_numel: int = 0, **kwargs) -> bool:
    """FSDP ``auto_wrap_policy``: one unit per InternViT block and per QLLaMA decoder layer."""
    return True if recurse else _is_layer(module)


@FUNCTIONS.register_module()
def internvl_layer_check_fn(module: nn.Module) -> bool:
    """``activation_checkpointing`` ``check_fn``: every InternViT block and QLLaMA decoder layer."""
    return _is_layer(module)


__all__ = ["MARKER", "RetrievalRecall", "SaveHFModelHook", "WarmupDecayLR", "internvl_layer_check_fn",
           "internvl_layer_wrap_policy"]
