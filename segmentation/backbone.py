"""``InternViTBackbone``: the :class:`internvit.InternViT` core as an mmseg 1.x backbone (+ the reference pyramid).

The backbone *is* an :class:`~internvit.models.vit.InternViT` (subclass, so parameter names inside a segmentor
are ``backbone.embeddings.*`` / ``backbone.encoder.layers.N.*``) with the 4-level pyramid of the reference
(``up1 … up4``) on top. No block math lives here.
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence, Union

import torch
from mmengine.logging import print_log
from mmengine.model import BaseModule
from mmseg.registry import MODELS
from torch import nn

from internvit.checkpoints import CheckpointError, load_into, materialize_meta, open_weights
from internvit.config import InternViTConfig, get_config
from internvit.features import parse_dtype
from internvit.models.vit import InternViT, LayerNorm, interpolate_pos_embed

ArchLike = Union[str, Mapping, InternViTConfig]


def resolve_arch(arch: ArchLike, **overrides) -> InternViTConfig:
    """An :class:`InternViTConfig` from a preset name, a dict in the config vocabulary or a config object."""
    cfg = get_config(dict(arch) if isinstance(arch, Mapping) else arch)
    if not isinstance(cfg, InternViTConfig):
        raise ValueError(f"arch={arch!r} is not a vision (InternViT) architecture")
    for k, v in overrides.items():
        if v is not None:
            setattr(cfg, k, v)
    cfg.__post_init__()
    return cfg


def resolve_dtype(dtype: Union[str, torch.dtype, None]) -> torch.dtype:
    """``None`` → fp32, else :func:`internvit.features.parse_dtype` (``'bf16'``, ``torch.bfloat16``, ...)."""
    return torch.float32 if dtype is None else parse_dtype(dtype)


class LayerNorm2d(LayerNorm):
    """Channels-first LayerNorm (statistics over C of ``(B, C, H, W)``), computed in fp32, cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)


def _final_norm(c: int, with_final_norm: bool) -> nn.Module:
    return LayerNorm2d(c, eps=1e-6) if with_final_norm else nn.Identity()


def build_pyramid(c: int, with_final_norm: bool = False) -> tuple[nn.Module, ...]:
    """The reference's ×4 / ×2 / ×1 / ×½ necks (module indices match its ``up1.0``, ``up1.1``, ``up1.3``, ...)."""
    up1 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2), LayerNorm2d(c, eps=1e-6), nn.GELU(),
                        nn.ConvTranspose2d(c, c, 2, 2), _final_norm(c, with_final_norm))
    up2 = nn.Sequential(nn.ConvTranspose2d(c, c, 2, 2), _final_norm(c, with_final_norm))
    up3 = nn.Sequential(nn.Identity(), _final_norm(c, with_final_norm))
    up4 = nn.Sequential(nn.MaxPool2d(2, 2), _final_norm(c, with_final_norm))
    for m in (up1, up2):
        for layer in m.modules():
            if isinstance(layer, nn.ConvTranspose2d):  # N(0, sqrt(2 / fan_out)), fan_out = k*k*out
                fan_out = layer.kernel_size[0] * layer.kernel_size[1] * layer.out_channels
                nn.init.normal_(layer.weight, 0.0, (2.0 / fan_out) ** 0.5)
                nn.init.zeros_(layer.bias)
    return up1, up2, up3, up4


@MODELS.register_module()
class InternViTBackbone(InternViT, BaseModule):
    """InternViT-6B / -300M for mmseg 1.x.

    Args:
        arch: preset name (``'internvit-6b-224px'``, ...) or a dict in the :class:`InternViTConfig` vocabulary
            (``hidden_size``, ``num_attention_heads``, ``intermediate_size``, ``num_hidden_layers``, ``qkv_bias``,
            ``qk_normalization``, ``norm_type``, ``patch_size``, ...).
        img_size: training crop; the position table is built for ``img_size / patch_size`` (other input
            sizes are interpolated at forward time).
        out_indices: blocks whose patch tokens are returned as ``(B, C, h, w)`` maps (negative = from the end).
        with_fpn: 4-level pyramid (×4 ConvT-LN-GELU-ConvT, ×2 ConvT, ×1, ×½ max-pool); needs 4 out_indices.
        with_final_norm: channels-first LayerNorm after each pyramid level.
        freeze_vit: no gradients for the ViT; the pyramid stays trainable (as in the reference).
        with_cp: gradient checkpointing per block.
        drop_path_rate: stochastic depth, ``linspace(0, rate, L)``.
        dtype: storage / compute dtype of the whole backbone (``'bfloat16'`` as the reference).
        out_dtype: dtype of the returned maps, fp32 by default (the reference's heads are fp32). DeepSpeed bf16
            casts the heads too: its config sets ``'bfloat16'``.
        pretrained: a weight file (either key family: original ``.pth`` or HF safetensors) or HF directory,
            loaded at construction with the position grid resized to ``img_size`` (reference behaviour).
        init_cfg: ``dict(type='Pretrained', checkpoint=...)`` loads the same way, but in :meth:`init_weights`
            (mmengine style: skipped at test time, where the segmentor checkpoint supplies the weights).
    """

    def __init__(self, arch: ArchLike = "internvit-6b-224px", img_size: int = 224,
                 out_indices: Sequence[int] = (7, 11, 15, 23), with_fpn: bool = False,
                 with_final_norm: bool = False, freeze_vit: bool = False, with_cp: bool = False,
                 drop_path_rate: float = 0.0, dtype: Union[str, torch.dtype, None] = None,
                 out_dtype: Union[str, torch.dtype, None] = None, pretrained: Optional[str] = None,
                 init_cfg: Optional[dict] = None) -> None:
        if isinstance(img_size, (tuple, list)):
            if img_size[0] != img_size[1]:
                raise ValueError(f"img_size must be square, got {tuple(img_size)}")
            img_size = img_size[0]
        config = resolve_arch(arch, image_size=int(img_size), drop_path_rate=float(drop_path_rate))
        if init_cfg is not None and pretrained is not None:
            raise ValueError("InternViTBackbone: give either pretrained= or init_cfg=, not both")
        if init_cfg is not None and init_cfg.get("type") != "Pretrained":
            raise ValueError(f"InternViTBackbone: only init_cfg=dict(type='Pretrained', checkpoint=...) is "
                             f"supported, got {init_cfg!r}")
        self.out_dtype = resolve_dtype(out_dtype)
        self._target_dtype = resolve_dtype(dtype)
        if pretrained is not None:  # build the ViT on the meta device: no wasted random init, no 2nd copy
            with torch.device("meta"):
                InternViT.__init__(self, config)
        else:
            InternViT.__init__(self, config)
        self.init_cfg = init_cfg
        self._is_init = False
        self.pretrained = pretrained
        self.out_indices = self.resolve_indices(list(out_indices))
        self.with_fpn = with_fpn
        self.freeze_vit = freeze_vit
        if with_fpn and len(self.out_indices) != 4:
            raise ValueError(f"with_fpn=True needs exactly 4 out_indices, got {list(out_indices)}")
        if pretrained is not None:
            self.load_pretrained(pretrained, inplace=False)
            materialize_meta(self)
        elif init_cfg is None:
            InternViT.init_weights(self)
        if freeze_vit:  # everything built so far: the pyramid below stays trainable
            self.freeze()
        self.set_grad_checkpointing(with_cp)
        if with_fpn:  # the reference's attribute names: checkpoint keys backbone.up1.0.weight, ...
            self.up1, self.up2, self.up3, self.up4 = build_pyramid(config.hidden_size, with_final_norm)
        self.to(self._target_dtype)

    # -- weights ------------------------------------------------------------------------------------------
    def load_pretrained(self, path: str, inplace: bool = True) -> list[str]:
        """Load ViT weights (either key family) from ``path``; the position grid is resized to ``img_size``.

        ``inplace=False`` assigns tensors to a meta-built model (construction); ``inplace=True`` copies into
        existing parameters (after the optimizer exists). Returns the keys that were resized.
        """
        src = open_weights(path)
        mapping, family, ignored = self.checkpoint_key_map(src.keys())
        target = self
        if inplace:
            with torch.device("meta"):
                target = InternViT(self.config)
        grid = self.config.grid_size
        resizers = {"embeddings.position_embedding": lambda t, shape: interpolate_pos_embed(t, (grid, grid))}
        resized = load_into(target, src.rekey(mapping), dtype=self.dtype if inplace else self._target_dtype,
                            resizers=resizers, origin=str(path))
        if inplace:
            own = dict(self.named_parameters())
            with torch.no_grad():
                for name, t in target.state_dict().items():
                    own[name].copy_(t)
        msg = f"InternViTBackbone: loaded {path} ({family} keys)"
        if resized:
            msg += f", position grid resized to {grid}x{grid}"
        if ignored:
            msg += f", ignored {len(ignored)} non-ViT keys"
        print_log(msg, logger="current")
        return resized

    def init_weights(self) -> None:
        """Load ``init_cfg=dict(type='Pretrained')`` in place; weights loaded at construction are never touched."""
        if self._is_init:
            return
        if self.init_cfg is not None:
            checkpoint = self.init_cfg.get("checkpoint")
            if not checkpoint:
                raise CheckpointError("InternViTBackbone: init_cfg of type 'Pretrained' needs checkpoint=")
            self.load_pretrained(checkpoint, inplace=True)
        self._is_init = True

    # -- forward ------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``(B, 3, H, W)`` normalised images → one ``(B, C, h, w)`` map per ``out_indices`` entry (the pyramid's
        ×4 / ×2 / ×1 / ×½ scales with ``with_fpn``), ``h = ceil(H / patch)``.

        A side that is not a multiple of the patch size is zero-padded at the bottom / right to the next
        multiple (mmseg ``PatchEmbed``'s ``padding='corner'``), so every input pixel is seen; without it the
        patch convolution would drop up to ``patch - 1`` border pixels and the head stretch the rest over them.
        The shipped configs resize / pad to multiples of 14 in the pipeline, which keeps maps and pixels exactly
        aligned. Raises ``ValueError`` for an input the pyramid cannot use (a side under two patches)."""
        p = self.config.patch_size
        h, w = x.shape[-2:]
        if self.with_fpn and min(h, w) < 2 * p:  # the ×½ level max-pools the patch grid
            raise ValueError(f"InternViTBackbone: input of {h}x{w} px is too small: the pyramid needs at least "
                             f"2 patches ({2 * p} px) per side")
        if h % p or w % p:
            x = torch.nn.functional.pad(x, (0, -w % p, 0, -h % p))
        feats = self.forward_intermediates(x, indices=self.out_indices, intermediates_only=True,
                                           output_fmt="NCHW")
        if self.with_fpn:  # in the pyramid's dtype: under FSDP only the blocks compute in bf16
            dtype = self.up1[0].weight.dtype
            feats = [up(f.to(dtype)) for up, f in zip((self.up1, self.up2, self.up3, self.up4), feats)]
        return tuple(f.contiguous().to(self.out_dtype) for f in feats)
