"""Linear and attention-pooling probes on a frozen InternViT, as mmengine models.

* :class:`InternViTClassifier` — the frozen InternViT (built by :func:`internvit.load_model` /
  :func:`internvit.build_model`) followed by one of the two published probe heads
  (reference-spec §4.2), or the head alone on cached features (``from_features=True``).
* :class:`ClsPatchConcatHead` — ``concat(class token, mean patch token)`` → ``BatchNorm1d(2C, eps=1e-6)`` →
  ``Linear(2C, K)``.
* :class:`AttentionPoolingHead` — :class:`internvit.models.pooling.AttentionPoolingBlock` (C → C, the ViT's
  head count) → ``BatchNorm1d(C, eps=1e-6)`` → ``Linear(C, K)``.
* :class:`ClsDataPreprocessor` — batches to the device; Mixup / CutMix in training (timm ``mode='batch'``
  semantics).
* :class:`TrainableEMA` — the EMA model for ``EMAHook`` that copies only what trains (the frozen backbone is
  shared, not duplicated).
"""
from __future__ import annotations

import copy
import os
import re
from typing import Any, Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from mmengine.model import BaseDataPreprocessor, BaseModel, BaseModule, ExponentialMovingAverage
from torch import nn

from internvit.config import InternViTConfig, InternVLConfig, get_config
from internvit.features import parse_dtype
from internvit.fileio import atomic_write

from .registry import MODELS

BACKBONE_KEYS = ("arch", "pretrained", "dtype", "frozen", "grad_checkpointing", "init_seed")


def _parse_dtype(dtype) -> torch.dtype:
    """``internvit.features.parse_dtype``, also accepting ``'torch.bfloat16'`` (``str(torch.bfloat16)``)."""
    return parse_dtype(dtype if isinstance(dtype, torch.dtype) else str(dtype).replace("torch.", ""))


# ---------------------------------------------------------------------------------------------------
# Backbone
# ---------------------------------------------------------------------------------------------------
def backbone_spec(spec: Union[dict, str]) -> dict:
    """Normalise a backbone spec (a preset name or a dict with :data:`BACKBONE_KEYS`).

    ``arch``: preset name / config dict / ``config.json`` path (``None``: read from ``pretrained``);
    ``pretrained``: Hugging Face directory or weight file in either key family (``None``: random init with
    ``init_seed``); ``dtype``: storage dtype of the backbone; ``frozen``: no gradients, eval mode.
    """
    spec = dict(arch=spec) if isinstance(spec, str) else dict(spec)
    unknown = set(spec) - set(BACKBONE_KEYS)
    if unknown:
        raise ValueError(f"backbone: unknown keys {sorted(unknown)} (expected {', '.join(BACKBONE_KEYS)})")
    out = dict(arch=None, pretrained=None, dtype="float32", frozen=True, grad_checkpointing=False, init_seed=0)
    out.update(spec)
    if out["arch"] is None and out["pretrained"] is None:
        raise ValueError("backbone: give arch= (a preset name, e.g. 'internvit-6b-224px') and/or pretrained=")
    try:
        _parse_dtype(out["dtype"])
    except ValueError as e:
        raise ValueError(f"backbone: {e}") from None
    if out["pretrained"] is not None:
        out["pretrained"] = os.path.expanduser(os.fspath(out["pretrained"]))
    return out


def backbone_config(spec: Union[dict, str]) -> InternViTConfig:
    """The InternViT config a spec describes, without building the model (reads only ``config.json`` /
    checkpoint headers)."""
    spec = backbone_spec(spec)
    if spec["arch"] is not None:
        cfg = get_config(spec["arch"])
    elif os.path.isdir(spec["pretrained"]):
        cfg = get_config(spec["pretrained"])
    else:
        from internvit.checkpoints import open_weights
        from internvit.factory import infer_vision_config

        if not os.path.isfile(spec["pretrained"]):
            raise FileNotFoundError(f"backbone: pretrained {spec['pretrained']}: no such file or directory")
        cfg = infer_vision_config(open_weights(spec["pretrained"]))
    return cfg.vision_config if isinstance(cfg, InternVLConfig) else cfg


def build_backbone(spec: Union[dict, str]) -> nn.Module:
    """The InternViT of a spec: loaded from ``pretrained`` (the vision tower of an InternVL checkpoint is
    taken), or randomly initialised with ``init_seed`` (independent of the global RNG, so every build of
    the same spec gives the same weights). Frozen backbones are put in eval mode without gradients."""
    import internvit

    spec = backbone_spec(spec)
    dtype = _parse_dtype(spec["dtype"])
    config = backbone_config(spec)  # the vision config: only the ViT of an InternVL checkpoint is read
    if spec["pretrained"] is not None:
        model = internvit.load_model(spec["pretrained"], config, dtype=dtype)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(spec["init_seed"]))
            model = internvit.build_model(config, dtype=dtype)
    model.is_init = True  # mmengine's init_weights() must not re-initialise loaded weights
    if spec["grad_checkpointing"]:
        model.set_grad_checkpointing(True)
    if spec["frozen"]:
        model.freeze().eval()
    return model


# ---------------------------------------------------------------------------------------------------
# Heads
# ---------------------------------------------------------------------------------------------------
def _init_linear(fc: nn.Linear, std: float) -> None:
    nn.init.normal_(fc.weight, std=std)
    nn.init.zeros_(fc.bias)


@MODELS.register_module()
class ClsPatchConcatHead(BaseModule):
    """Linear probe (``cls_patch_concat``): ``[token 0, mean(tokens 1:)]`` → BatchNorm1d → Linear.

    Accepts the ViT's ``(B, N, C)`` tokens or the already pooled ``(B, 2C)`` features (cached features,
    :data:`cache_feature` ``'cls_mean'``).
    """

    cache_feature = "cls_mean"

    def __init__(self, in_channels: int, num_classes: int, norm_eps: float = 1e-6, init_std: float = 0.01,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        self.in_channels, self.num_classes, self.init_std = in_channels, num_classes, init_std
        self.norm = nn.BatchNorm1d(2 * in_channels, eps=norm_eps)
        self.fc = nn.Linear(2 * in_channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        _init_linear(self.fc, self.init_std)

    @staticmethod
    def pool(tokens: torch.Tensor) -> torch.Tensor:
        """``(B, N, C)`` → ``(B, 2C)``: class token and mean of the patch tokens, in float32."""
        tokens = tokens.float()
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(1)], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.in_channels
        if x.ndim == 3 and x.shape[-1] == c:
            x = self.pool(x)
        elif not (x.ndim == 2 and x.shape[1] == 2 * c):
            raise ValueError(f"ClsPatchConcatHead: expected (B, N, {c}) tokens or (B, {2 * c}) pooled features, "
                             f"got {tuple(x.shape)}")
        return self.fc(self.norm(x.float()))


@MODELS.register_module()
class AttentionPoolingHead(BaseModule):
    """Attention-pooling probe: AttentionPoolingBlock(C → C) → BatchNorm1d(C) → Linear(C, K).

    Needs the full ``(B, N, C)`` token sequence (class token included); cached features are the tokens
    (:data:`cache_feature` ``'tokens'``).
    """

    cache_feature = "tokens"

    def __init__(self, in_channels: int, num_classes: int, num_heads: int, qkv_bias: bool = True,
                 pool_norm_eps: float = 1e-5, norm_eps: float = 1e-6, init_std: float = 0.01,
                 init_cfg: Optional[dict] = None) -> None:
        super().__init__(init_cfg=init_cfg)
        from internvit.models.pooling import AttentionPoolingBlock

        self.in_channels, self.num_classes, self.init_std = in_channels, num_classes, init_std
        self.attn_pooling = AttentionPoolingBlock(in_channels, num_heads, in_channels, qkv_bias=qkv_bias,
                                                  norm_eps=pool_norm_eps)
        self.norm = nn.BatchNorm1d(in_channels, eps=norm_eps)
        self.fc = nn.Linear(in_channels, num_classes)
        self.init_weights()

    def init_weights(self) -> None:
        self.attn_pooling.init_weights()
        _init_linear(self.fc, self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"AttentionPoolingHead: expected (B, N, {self.in_channels}) tokens, got "
                             f"{tuple(x.shape)} (cached features must be feature='tokens')")
        return self.fc(self.norm(self.attn_pooling(x.float())))


#: published head checkpoints (``classification/`` of the reference repo): key prefix → ours
PUBLISHED_HEAD_KEYS = (("attn_pooling.", "head.attn_pooling."), ("norm.", "head.norm."), ("head.", "head.fc."))


# ---------------------------------------------------------------------------------------------------
# Data preprocessor with Mixup / CutMix
# ---------------------------------------------------------------------------------------------------
@MODELS.register_module()
class ClsDataPreprocessor(BaseDataPreprocessor):
    """Stack a batch, move it to the device and, in training, mix it (Mixup / CutMix).

    Mixing follows timm's ``Mixup(mode='batch')``: with probability ``mix_prob`` the batch is mixed with its
    reverse, by CutMix (probability ``switch_prob`` when both are enabled, box area corrected λ) or Mixup;
    λ ~ Beta(α, α) from NumPy's global RNG (seeded by mmengine). The mixed one-hot targets go to
    ``data_samples['soft_label']``; label smoothing is applied by the classifier's loss.
    """

    def __init__(self, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0, mix_prob: float = 1.0,
                 switch_prob: float = 0.5, num_classes: Optional[int] = None, non_blocking: bool = False) -> None:
        super().__init__(non_blocking=non_blocking)
        if mixup_alpha < 0 or cutmix_alpha < 0:
            raise ValueError(f"mixup_alpha / cutmix_alpha must be >= 0, got {mixup_alpha}, {cutmix_alpha}")
        self.mixup_alpha, self.cutmix_alpha = float(mixup_alpha), float(cutmix_alpha)
        self.mix_prob, self.switch_prob, self.num_classes = float(mix_prob), float(switch_prob), num_classes

    @property
    def mixing(self) -> bool:
        return self.mix_prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    @staticmethod
    def _stack(data: dict) -> dict:
        """Accept ``default_collate`` (tensors) and ``pseudo_collate`` (lists) batches alike."""
        data = dict(data)
        if isinstance(data.get("inputs"), (list, tuple)):
            data["inputs"] = torch.stack([torch.as_tensor(x) for x in data["inputs"]])
        samples = data.get("data_samples")
        if isinstance(samples, dict):
            data["data_samples"] = {k: torch.as_tensor(v) if isinstance(v, (list, tuple)) else v
                                    for k, v in samples.items()}
        return data

    def forward(self, data: dict, training: bool = False) -> dict:
        """Stack and move the batch; its ``gt_label`` must be integer class indices in ``[0, num_classes)``
        (:func:`classification.checks.check_labels`: a ``1.5`` is refused, never truncated into the loss or the
        metrics); with Mixup / CutMix in training, add ``soft_label``."""
        data = self._stack(data)
        samples = data.get("data_samples")
        if isinstance(samples, dict) and samples.get("gt_label") is not None:
            from .checks import check_labels

            data["data_samples"] = dict(samples, gt_label=check_labels(
                samples["gt_label"], self.num_classes, "ClsDataPreprocessor: gt_label"))
        data = self.cast_data(data)
        if training and self.mixing and data.get("data_samples") is not None:
            samples = dict(data["data_samples"])
            data["inputs"], samples["soft_label"] = self.mix(data["inputs"], samples["gt_label"])
            data["data_samples"] = samples
        return data

    def mix(self, x: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mix a batch with its reverse; returns ``(mixed inputs, soft targets (B, K))``."""
        if self.num_classes is None:
            raise ValueError("ClsDataPreprocessor: num_classes is needed for Mixup / CutMix")
        if x.shape[0] % 2:
            raise ValueError(f"Mixup / CutMix needs an even batch size, got {x.shape[0]} (use drop_last=True)")
        lam, use_cutmix = 1.0, False
        if np.random.rand() < self.mix_prob:
            if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
                use_cutmix = bool(np.random.rand() < self.switch_prob)
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            else:
                use_cutmix = self.cutmix_alpha > 0
                alpha = self.cutmix_alpha if use_cutmix else self.mixup_alpha
            lam = float(np.random.beta(alpha, alpha))
        if lam != 1.0:
            if use_cutmix:
                if x.ndim != 4:
                    raise ValueError(f"CutMix needs (B, C, H, W) images, got {tuple(x.shape)}")
                (y0, y1, x0, x1), lam = self._cut_box(x.shape[-2:], lam)
                x = x.clone()
                x[:, :, y0:y1, x0:x1] = x.flip(0)[:, :, y0:y1, x0:x1]
            else:
                x = x * lam + x.flip(0) * (1.0 - lam)
        onehot = F.one_hot(labels.long(), self.num_classes).float()
        return x, onehot * lam + onehot.flip(0) * (1.0 - lam)

    @staticmethod
    def _cut_box(hw: tuple, lam: float) -> tuple[tuple[int, int, int, int], float]:
        h, w = int(hw[0]), int(hw[1])
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(h * ratio), int(w * ratio)
        cy, cx = np.random.randint(0, h), np.random.randint(0, w)
        y0, y1 = int(np.clip(cy - cut_h // 2, 0, h)), int(np.clip(cy + cut_h // 2, 0, h))
        x0, x1 = int(np.clip(cx - cut_w // 2, 0, w)), int(np.clip(cx + cut_w // 2, 0, w))
        return (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / float(h * w)


# ---------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------
_BACKBONE_KEY = re.compile(r"^(.*\.)?backbone\.")


@MODELS.register_module()
class InternViTClassifier(BaseModel):
    """Frozen InternViT + probe head, trained by mmengine's Runner.

    Args:
        backbone: spec for :func:`build_backbone` (``arch``, ``pretrained``, ``dtype``, ``frozen``, ...).
        head: head config (``type='ClsPatchConcatHead'`` or ``'AttentionPoolingHead'``, ``num_classes``);
            ``in_channels`` (and ``num_heads`` for attention pooling) default to the backbone's.
        from_features: the inputs are cached backbone features (:class:`CachedFeatureDataset`); the backbone
            is not built (its spec only gives the widths).
        label_smoothing: for hard and mixed (soft) targets alike.
        head_pretrained: a published head checkpoint (keys ``norm.*``, ``head.*``, ``attn_pooling.*``, under
            ``'model'`` or ``'model_ema'``) or one of ours, read with ``weights_only=True``.
        head_pretrained_ema: take ``'model_ema'`` from a published head checkpoint.
        save_backbone: keep the backbone in ``state_dict()`` (checkpoints). Default: only when it cannot be
            rebuilt from the spec (random init or trainable), so a frozen 6B probe checkpoint holds the head only.
    """

    def __init__(self, backbone: Union[dict, str], head: dict, *, from_features: bool = False,
                 label_smoothing: float = 0.0, head_pretrained: Optional[str] = None,
                 head_pretrained_ema: bool = False, save_backbone: Optional[bool] = None,
                 data_preprocessor: Union[dict, nn.Module, None] = None, init_cfg: Optional[dict] = None) -> None:
        if data_preprocessor is None:
            data_preprocessor = dict(type="ClsDataPreprocessor")
        if isinstance(data_preprocessor, dict):
            data_preprocessor = MODELS.build(data_preprocessor)
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        spec = backbone_spec(backbone)
        self.backbone_spec = spec
        self.vit_config = backbone_config(spec)
        self.frozen = bool(spec["frozen"])
        self.from_features = bool(from_features)
        self.backbone = None if from_features else build_backbone(spec)

        head = dict(head)
        head.setdefault("in_channels", self.vit_config.hidden_size)
        if head.get("type") in ("AttentionPoolingHead", "classification.AttentionPoolingHead"):
            head.setdefault("num_heads", self.vit_config.num_attention_heads)
        self.head = MODELS.build(head)
        self.num_classes = int(self.head.num_classes)
        if getattr(self.data_preprocessor, "num_classes", 0) is None:
            self.data_preprocessor.num_classes = self.num_classes
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {label_smoothing}")
        self.label_smoothing = float(label_smoothing)
        if save_backbone is None:
            save_backbone = spec["pretrained"] is None or not self.frozen
        self.save_backbone = bool(save_backbone) and not self.from_features
        self._register_state_dict_hook(_drop_backbone_keys)
        self.register_load_state_dict_post_hook(_forgive_missing_backbone)
        if head_pretrained is not None:
            load_head_weights(self, head_pretrained, ema=head_pretrained_ema)
            self.head.is_init = True

    # -- mode handling ---------------------------------------------------------------------------------
    def train(self, mode: bool = True) -> "InternViTClassifier":
        super().train(mode)
        if self.backbone is not None and self.frozen:
            self.backbone.eval()
        return self

    # -- forward -----------------------------------------------------------------------------------------
    def extract_feat(self, inputs: torch.Tensor) -> torch.Tensor:
        """Backbone tokens ``(B, N, C)`` of images, or the cached features unchanged."""
        if self.backbone is None:
            return inputs
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            return self.backbone.forward_features(inputs)

    def forward(self, inputs: torch.Tensor, data_samples: Optional[dict] = None, mode: str = "tensor") -> Any:
        logits = self.head(self.extract_feat(inputs))
        if mode == "tensor":
            return logits
        if mode == "loss":
            if data_samples is None:
                raise ValueError("mode='loss' needs data_samples with gt_label")
            return {"loss": self.loss(logits, data_samples)}
        if mode == "predict":
            return self.predict(logits, data_samples)
        raise ValueError(f"mode must be 'tensor', 'loss' or 'predict', got {mode!r}")

    def loss(self, logits: torch.Tensor, data_samples: dict) -> torch.Tensor:
        """Cross-entropy with label smoothing; soft (mixed) targets when the preprocessor mixed the batch."""
        logits = logits.float()
        s = self.label_smoothing
        soft = data_samples.get("soft_label")
        if soft is None:
            return F.cross_entropy(logits, data_samples["gt_label"].long(), label_smoothing=s)
        target = soft.float() * (1.0 - s) + s / logits.shape[1]
        return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()

    def predict(self, logits: torch.Tensor, data_samples: Optional[dict] = None) -> list[dict]:
        scores = logits.float().softmax(dim=-1).detach()
        labels = scores.argmax(dim=-1)
        out = [dict(pred_score=scores[i], pred_label=int(labels[i])) for i in range(len(scores))]
        if data_samples is not None and "gt_label" in data_samples:
            for d, g in zip(out, data_samples["gt_label"].tolist()):
                d["gt_label"] = int(g)
        return out


def _drop_backbone_keys(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> dict:
    if not getattr(module, "save_backbone", True):
        for k in [k for k in state_dict if k.startswith(prefix + "backbone.")]:
            del state_dict[k]
    return state_dict


def _forgive_missing_backbone(module: nn.Module, incompatible_keys) -> None:
    if not getattr(module, "save_backbone", True):
        missing = incompatible_keys.missing_keys
        missing[:] = [k for k in missing if not _BACKBONE_KEY.match(k)]


def read_head_checkpoint(path: str, ema: bool = False) -> dict:
    """Probe-head tensors of a checkpoint, renamed to this package's ``head.*`` keys (``weights_only=True``).

    Published files (the reference ``classification/`` code) hold ``{'model': {norm.*, head.*,
    attn_pooling.*}, 'model_ema': ...}`` (``ema`` picks the latter); our own checkpoints hold ``head.*`` keys
    (optionally under ``state_dict``).
    """
    from internvit.checkpoints import CheckpointError, torch_load_weights, unwrap_state_dict

    path = os.fspath(path)
    obj = torch_load_weights(path)
    if ema:
        if not isinstance(obj, dict) or "model_ema" not in obj:
            raise CheckpointError(f"{path}: no 'model_ema' entry (top-level keys: {list(obj)[:8]})")
        obj = obj["model_ema"]
    sd = unwrap_state_dict(obj, path)
    if any(k.startswith(("head.fc.", "head.norm.", "head.attn_pooling.")) for k in sd):
        return {k: v for k, v in sd.items() if k.startswith("head.")}
    mapped = {}
    for k, v in sd.items():
        for old, new in PUBLISHED_HEAD_KEYS:
            if k.startswith(old):
                mapped[new + k[len(old):]] = v
                break
    if not mapped:
        raise CheckpointError(f"{path}: no probe-head keys (norm.*, head.*, attn_pooling.*) found")
    return mapped


def load_head_weights(model: InternViTClassifier, path: str, ema: bool = False) -> list[str]:
    """Load probe-head weights (published or ours, see :func:`read_head_checkpoint`) into ``model.head``.

    Raises :class:`internvit.CheckpointError` naming missing, unexpected or mis-shaped keys; returns the keys.
    """
    from internvit.checkpoints import CheckpointError

    mapped = read_head_checkpoint(path, ema=ema)
    shapes = model.head.state_dict()
    expected = {"head." + k for k in shapes}
    missing, unexpected = sorted(expected - set(mapped)), sorted(set(mapped) - expected)
    if missing or unexpected:
        raise CheckpointError(f"{path}: head weights do not match the {type(model.head).__name__} "
                              f"(missing: {missing[:6]}, unexpected: {unexpected[:6]})")
    bad = [f"{k} {list(v.shape)} vs {list(shapes[k[5:]].shape)}" for k, v in mapped.items()
           if tuple(v.shape) != tuple(shapes[k[5:]].shape)]
    if bad:
        raise CheckpointError(f"{path}: mis-shaped head weights: {bad[:4]}")
    model.head.load_state_dict({k[5:]: v for k, v in mapped.items()})
    return sorted(mapped)


def convert_head_checkpoint(src: str, dst: str, ema: bool = False) -> str:
    """Write a published head checkpoint as an mmengine checkpoint (``{'state_dict': {head.*}}``) for
    ``tools/test.py`` / ``load_from``. Read with ``weights_only=True``; written to a temporary file and renamed."""
    mapped = {k: v.contiguous() for k, v in read_head_checkpoint(src, ema=ema).items()}
    dst = os.fspath(dst)
    with atomic_write(dst) as tmp:
        torch.save({"state_dict": mapped, "meta": {"converted_from": os.fspath(src), "ema": ema}}, tmp)
    return dst


# ---------------------------------------------------------------------------------------------------
# EMA of the trainable part only
# ---------------------------------------------------------------------------------------------------
@MODELS.register_module()
class TrainableEMA(ExponentialMovingAverage):
    """``ExponentialMovingAverage`` that shares the source model's frozen parameters instead of copying them.

    With a frozen 6B backbone, mmengine's default EMA would deep-copy ~6e9 parameters and average them every
    step; here only the trainable parameters (and, with ``update_buffers``, the buffers) are copied and
    averaged. ``momentum`` is mmengine's (``ema = (1 - m) * ema + m * x``), i.e. ``1 - decay`` of timm's
    ``ModelEma``.
    """

    def __init__(self, model: nn.Module, momentum: float = 0.0002, interval: int = 1,
                 device: Optional[torch.device] = None, update_buffers: bool = False) -> None:
        nn.Module.__init__(self)
        if not 0.0 < momentum < 1.0:
            raise ValueError(f"momentum must be in (0, 1), got {momentum}")
        if device is not None:
            raise ValueError("TrainableEMA shares the frozen parameters with the model; device= is not supported")
        shared = {id(p): p for p in model.parameters() if not p.requires_grad}
        self.module = copy.deepcopy(model, memo=dict(shared)).requires_grad_(False)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        self.interval, self.momentum, self.update_buffers = interval, momentum, update_buffers
        self.register_buffer("steps", torch.tensor(0, dtype=torch.long))
        params = dict(self.module.named_parameters())
        avg = {n: params[n] for n in trainable if n in params}
        if update_buffers:
            avg.update(dict(self.module.named_buffers()))
        self.avg_parameters = avg
