"""InternViT: the block math, once, for every released variant (6B RMSNorm/QK-norm and 300M LayerNorm/qkv-bias).

Module and parameter names follow the Hugging Face ``InternVisionModel`` layout, so HF checkpoints load
as they are; other key families are mapped in :mod:`internvit.checkpoints`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import nn

from ..checkpoints import vision_key_map
from ..config import InternViTConfig


class RMSNorm(nn.Module):
    """``w * cast_to_input_dtype(x * rsqrt(mean(x^2) + eps))`` with the normalisation done in fp32."""

    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _HAS_RMS_NORM:
            # one fused op (fp32 inside for bf16/fp16, one rounding): the same values as the three-step form
            # below, bit for bit on CPU, with fewer passes and no fp32 copy of the activations
            return self.weight * F.rms_norm(x, (x.shape[-1],), eps=self.eps)
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


_HAS_RMS_NORM = hasattr(F, "rms_norm")


class LayerNorm(nn.LayerNorm):
    """LayerNorm with fp32 statistics and affine for every input dtype, output in the input dtype.

    Same-dtype input and weights go straight to ``F.layer_norm`` (its CPU and CUDA kernels compute in fp32 and
    round once, as upstream's bf16 ``nn.LayerNorm``); mixed dtypes are computed in fp32 and cast back.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.weight is None or x.dtype == self.weight.dtype:
            # fp32 as is; bf16/fp16 with same-dtype weights: the CPU and CUDA kernels accumulate in fp32 and
            # round once (upstream's nn.LayerNorm in bf16), without the fp32 copy in and out
            return super().forward(x)
        w = self.weight.float() if self.weight is not None else None
        b = self.bias.float() if self.bias is not None else None
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def build_norm(config: InternViTConfig) -> nn.Module:
    if config.norm_type == "rms_norm":
        return RMSNorm(config.hidden_size, config.layer_norm_eps)
    return LayerNorm(config.hidden_size, eps=config.layer_norm_eps)


def drop_path(x: torch.Tensor, p: float, training: bool) -> torch.Tensor:
    """Stochastic depth per sample, rescaled by 1/keep."""
    if p == 0.0 or not training:
        return x
    keep = 1.0 - p
    mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
    return x * mask / keep


def interpolate_pos_embed(pos_embed: torch.Tensor, new_hw: tuple[int, int],
                          old_hw: Optional[tuple[int, int]] = None) -> torch.Tensor:
    """Resize a ``(1, 1 + h*w, C)`` table to another grid: class row kept, bicubic (align_corners=False) in fp32."""
    n = pos_embed.shape[1] - 1
    if old_hw is None:
        side = int(round(n ** 0.5))
        if side * side != n:
            raise ValueError(f"position embedding with {n} patch rows is not a square grid; pass old_hw")
        old_hw = (side, side)
    if tuple(old_hw) == tuple(new_hw):
        return pos_embed
    cls_row, grid = pos_embed[:, :1], pos_embed[:, 1:]
    c = grid.shape[-1]
    grid = grid.float().reshape(1, old_hw[0], old_hw[1], c).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=tuple(new_hw), mode="bicubic", align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(1, new_hw[0] * new_hw[1], c).to(pos_embed.dtype)
    return torch.cat([cls_row, grid], dim=1)


#: the pixel dtypes the model takes (anything else is not normalised pixels: refused, not cast)
PIXEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class Embeddings(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.patch_size = config.patch_size
        self.grid = (config.grid_size, config.grid_size)
        self.class_embedding = nn.Parameter(torch.zeros(1, 1, c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, kernel_size=config.patch_size,
                                         stride=config.patch_size)
        self.position_embedding = nn.Parameter(torch.zeros(1, self.grid[0] * self.grid[1] + 1, c))

    def forward(self, pixel_values: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Raises ``TypeError`` for pixels that are not float16 / bfloat16 / float32 / float64 (e.g. the uint8 of
        ``torchvision.io.read_image``: not normalised) and ``ValueError`` for a shape the patches do not tile."""
        if pixel_values.dtype not in PIXEL_DTYPES:
            raise TypeError(f"pixel_values of dtype {str(pixel_values.dtype).replace('torch.', '')}: expected "
                            f"normalised floating-point pixels (float16, bfloat16, float32 or float64), e.g. from "
                            f"internvit.build_transform(model.config)")
        h, wd, p = pixel_values.shape[-2], pixel_values.shape[-1], self.patch_size
        channels = self.patch_embedding.in_channels
        if pixel_values.dim() != 4 or pixel_values.shape[1] != channels or h % p or wd % p or h < p or wd < p:
            # the strided convolution dropped the last h % p rows / w % p columns without a word
            raise ValueError(f"pixel_values of shape {tuple(pixel_values.shape)}: expected (B, {channels}, H, W) with "
                             f"H and W positive multiples of the patch size {p} (resize or pad the image first)")
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # B, C, h, w
        hw = (x.shape[2], x.shape[3])
        x = x.flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(w.dtype).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        pos = interpolate_pos_embed(self.position_embedding, hw, self.grid).to(w.dtype)
        return x + pos, hw


#: attention implementations: ``'sdpa'`` (``F.scaled_dot_product_attention``: flash/efficient/cuDNN kernels on
#: CUDA, the fused flash kernel on CPU) or ``'gemm'`` (upstream's naive path: ``softmax((q * scale) @ kᵀ) @ v`` as
#: two batched matmuls in the input dtype). ``'auto'`` picks per call, see :func:`attention_impl_for`.
ATTENTION_IMPLS = ("auto", "sdpa", "gemm")
#: ``'auto'`` uses ``'gemm'`` for CPU bf16/fp16 sequences of at least this many tokens (``None``: never). Measured
#: under load on a 2-core AVX-512 CPU without native bf16, the CPU flash kernel beat the GEMM path at 257 and
#: 1,025 tokens in fp32 and bf16 (``bench/bench_forward.py`` times the ``gemm`` variant next to the default).
GEMM_ATTENTION_MIN_TOKENS: Optional[int] = None
#: on CPU, q/k/v are copied into contiguous ``(B, H, N, D)`` tensors before the flash kernel from this many tokens
#: on (``None``: never): the strided views span ``3C`` per token, which costs the kernel cache/TLB locality on
#: long sequences (measured under load: 0.90x the time at 1,025 tokens fp32 including the copy, 1.05x at 257)
CPU_SDPA_CONTIGUOUS_MIN_TOKENS: Optional[int] = 512


def attention_impl_for(device: torch.device, dtype: torch.dtype, tokens: int, impl: str = "auto") -> str:
    """The attention implementation used for one call (``impl`` other than ``'auto'`` is returned as is).

    The environment variable ``INTERNVIT_ATTENTION`` (``sdpa`` / ``gemm``) overrides ``'auto'``.
    """
    if impl != "auto":
        return impl
    env = os.environ.get("INTERNVIT_ATTENTION", "").strip().lower()
    if env in ("sdpa", "gemm"):
        return env
    if (device.type == "cpu" and dtype in (torch.bfloat16, torch.float16) and GEMM_ATTENTION_MIN_TOKENS is not None
            and tokens >= GEMM_ATTENTION_MIN_TOKENS):
        return "gemm"
    return "sdpa"


def gemm_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax((q * scale) @ kᵀ) @ v`` for ``(B, H, N, D)`` tensors, every step in the input dtype.

    The reference's non-flash path, operation for operation (scores and probabilities rounded to the input
    dtype; ``softmax`` accumulates in fp32 internally). Memory: one ``(B, H, N, N)`` score tensor.
    """
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    return torch.matmul(torch.softmax(scores, dim=-1), v)


class Attention(nn.Module):
    """Fused qkv (``[3][H][D]`` channel layout), optional QK RMSNorm over the full width, SDPA or GEMM attention.

    ``attn_impl`` (``'auto'`` | ``'sdpa'`` | ``'gemm'``) chooses the kernel; all give the same math
    (:func:`attention_impl_for`).
    """

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        c = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = config.head_dim
        self.scale = self.head_dim ** -0.5
        self.attn_impl = "auto"
        self.qkv = nn.Linear(c, 3 * c, bias=config.qkv_bias)
        self.qk_normalization = config.qk_normalization
        if self.qk_normalization:
            # always RMSNorm (HF code), over all heads jointly, before the head split
            self.q_norm = RMSNorm(c, config.layer_norm_eps)
            self.k_norm = RMSNorm(c, config.layer_norm_eps)
        self.proj = nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        h, d = self.num_heads, self.head_dim
        qkv = self.qkv(x)
        if self.qk_normalization:
            q, k, v = qkv.chunk(3, dim=-1)  # views; the norms write fresh q, k
            q, k, v = (t.reshape(b, n, h, d).transpose(1, 2) for t in (self.q_norm(q), self.k_norm(k), v))
        else:
            # (B, N, 3, H, D) -> 3 x (B, H, N, D) views, no copies
            q, k, v = qkv.reshape(b, n, 3, h, d).permute(2, 0, 3, 1, 4).unbind(0)
        if attention_impl_for(x.device, x.dtype, n, self.attn_impl) == "gemm":
            out = gemm_attention(q, k, v, self.scale)
        else:
            if (x.device.type == "cpu" and CPU_SDPA_CONTIGUOUS_MIN_TOKENS is not None
                    and n >= CPU_SDPA_CONTIGUOUS_MIN_TOKENS):
                q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out = F.scaled_dot_product_attention(q, k, v)
        # (B, H, N, D) -> (B, N, C); a view when the kernel wrote (B, N, H, D) memory (CPU flash kernel)
        return self.proj(out.transpose(1, 2).reshape(b, n, c))


class MLP(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.fc1, PackedLinear):
            return self.fc2(self.fc1(x, gelu=True))  # GELU fused into the GEMM (fp32, before rounding)
        return self.fc2(F.gelu(self.fc1(x)))


class PackedLinear(nn.Module):
    """Inference-only ``nn.Linear`` whose weight is stored pre-packed in oneDNN's blocked layout (CPU).

    Made by :func:`compile_model` (``mode='pack'``); the dense weight is dropped, so weights stay at one copy.
    Same math as ``F.linear`` (fp32 accumulation; for bf16 one rounding of the output). ``state_dict`` gives
    the dense weight under the usual key, and loading a state dict repacks it. No autograd through the
    weight; inputs must have the packed dtype.
    """

    def __init__(self, linear: nn.Linear, rows_hint: Optional[int] = None) -> None:
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.rows_hint = rows_hint
        self.bias = linear.bias
        self._pack(linear.weight.detach())

    def _pack(self, weight: torch.Tensor) -> None:
        self.packed_dtype = weight.dtype
        self.packed_weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), self.rows_hint)

    def forward(self, x: torch.Tensor, gelu: bool = False) -> torch.Tensor:
        if x.dtype != self.packed_dtype or x.device.type != "cpu":
            raise RuntimeError(f"PackedLinear holds a {self.packed_dtype} CPU weight; got a {x.dtype} input on "
                               f"{x.device} (pack after moving/casting the model)")
        bias = self.bias.detach() if self.bias is not None else None
        if gelu:
            return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "gelu", [], "none")
        return torch.ops.mkldnn._linear_pointwise(x, self.packed_weight, bias, "none", [], "")

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        destination[prefix + "weight"] = self.packed_weight.to_dense()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
        else:
            w = state_dict[key]
            if tuple(w.shape) != (self.out_features, self.in_features):
                error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the "
                                  f"shape in current model is {(self.out_features, self.in_features)}.")
            else:
                self._pack(w.detach().to(device="cpu", dtype=self.packed_dtype))
        rest = {k: v for k, v in state_dict.items() if k != key}
        super()._load_from_state_dict(rest, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bias={self.bias is not None}, dtype={self.packed_dtype}")


COMPILE_MODES = ("pack", "inductor")


def pack_support(dtype: torch.dtype) -> Optional[str]:
    """``None`` if oneDNN weight packing works here for ``dtype``, else the reason it does not."""
    if not torch.backends.mkldnn.is_available():
        return "this torch build has no oneDNN (mkldnn)"
    if not (hasattr(torch.ops.mkldnn, "_reorder_linear_weight") and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        return "this torch build lacks torch.ops.mkldnn._reorder_linear_weight / _linear_pointwise"
    if dtype == torch.bfloat16 and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return "this CPU has no oneDNN bf16 support"
    if dtype not in (torch.float32, torch.bfloat16):
        return f"packing supports float32 and bfloat16 weights, not {dtype}"
    return None


def compile_model(model: nn.Module, mode: str = "pack", *, rows_hint: Optional[int] = None) -> nn.Module:
    """Speed an InternViT (or a model with a ``vision_model``) up for inference; returns the same object.

    ``mode='pack'`` (CPU, fp32/bf16): the four linears of every block get their weights pre-packed for oneDNN
    (no per-call weight reordering) and fc1 gets GELU fused in; layer by layer, so peak memory grows by one
    layer's weights at most. Inference only (no gradients through the packed weights); cast or move the
    model before packing. ``rows_hint``: the expected ``batch * tokens`` (oneDNN may pick its layout from it).
    ``mode='inductor'``: every block is wrapped in ``torch.compile`` (any device; needs a C++ compiler on CPU;
    the first call of each new shape compiles). Raises ``ValueError`` for an unknown mode, a non-CPU or
    unsupported-dtype model with ``'pack'``, or a model without InternViT blocks.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {', '.join(COMPILE_MODES)}, got {mode!r}")
    vit = model if isinstance(model, InternViT) else getattr(model, "vision_model", None)
    if not isinstance(vit, InternViT):
        raise ValueError(f"compile_model needs an InternViT (or a model with .vision_model), got "
                         f"{type(model).__name__}")
    blocks = list(vit.encoder.layers)
    if mode == "inductor":
        for blk in blocks:
            blk.compile()  # in place: parameter names and state_dict keys stay as they are
        vit.compiled = mode
        return model
    w = blocks[0].attn.qkv.weight if isinstance(blocks[0].attn.qkv, nn.Linear) else None
    if w is not None:
        if w.device.type != "cpu":
            raise ValueError(f"compile mode 'pack' is for CPU models; this one is on {w.device}")
        reason = pack_support(w.dtype)
        if reason:
            raise ValueError(f"compile mode 'pack' is not available: {reason}")
    with torch.no_grad():
        for blk in blocks:
            for parent, name in ((blk.attn, "qkv"), (blk.attn, "proj"), (blk.mlp, "fc1"), (blk.mlp, "fc2")):
                lin = getattr(parent, name)
                if isinstance(lin, nn.Linear):
                    setattr(parent, name, PackedLinear(lin, rows_hint))
                    del lin
    vit.compiled = mode
    return model


class Block(nn.Module):
    """``x + DropPath(ls1 * Attn(norm1(x)))`` then ``x + DropPath(ls2 * MLP(norm2(x)))``."""

    def __init__(self, config: InternViTConfig, drop_path_rate: float = 0.0) -> None:
        super().__init__()
        self.norm1 = build_norm(config)
        self.attn = Attention(config)
        self.ls1 = nn.Parameter(torch.full((config.hidden_size,), float(config.initializer_factor)))
        self.norm2 = build_norm(config)
        self.mlp = MLP(config)
        self.ls2 = nn.Parameter(torch.full((config.hidden_size,), float(config.initializer_factor)))
        self.drop_path_rate = drop_path_rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training and self.drop_path_rate > 0:
            x = x + drop_path(self.attn(self.norm1(x).to(x.dtype)) * self.ls1, self.drop_path_rate, True)
            return x + drop_path(self.mlp(self.norm2(x).to(x.dtype)) * self.ls2, self.drop_path_rate, True)
        # x + ls * f(x) in one pass (addcmul): one fewer full-size temporary per residual branch
        x = torch.addcmul(x, self.attn(self.norm1(x).to(x.dtype)), self.ls1)
        return torch.addcmul(x, self.mlp(self.norm2(x).to(x.dtype)), self.ls2)


class Encoder(nn.Module):
    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        n = config.num_hidden_layers
        rates = [config.drop_path_rate * i / max(n - 1, 1) for i in range(n)]  # linspace(0, rate, n)
        self.layers = nn.ModuleList(Block(config, r) for r in rates)


@dataclass
class InternViTOutput:
    """What :meth:`InternViT.forward` returns (HF ``BaseModelOutputWithPooling`` fields)."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: Optional[tuple[torch.Tensor, ...]] = None

    def __getitem__(self, i: int):  # tuple-style access, as HF outputs allow
        return (self.last_hidden_state, self.pooler_output, self.hidden_states)[i]


class InternViT(nn.Module):
    """InternViT-6B / -300M vision transformer. Any input height × width (multiples of the patch size).

    ``forward`` returns :class:`InternViTOutput`; ``forward_features`` the ``(B, 1 + h*w, C)`` tokens;
    ``forward_intermediates`` per-block outputs in timm's sense.
    """

    #: maps checkpoint keys (either key family, common prefixes) onto this module's names
    checkpoint_key_map = staticmethod(vision_key_map)

    def __init__(self, config: InternViTConfig) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        self.grad_checkpointing = False
        self.compiled: Optional[str] = None  # set by compile_model
        self.num_prefix_tokens = 1
        self.embed_dim = config.hidden_size
        self.patch_size = config.patch_size

    # -- set-up helpers ------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Random initialisation (used for presets without weights): trunc-normal linears, zero biases."""
        std = self.config.initializer_range
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, (RMSNorm, nn.LayerNorm)):
                nn.init.ones_(m.weight)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
        nn.init.trunc_normal_(self.embeddings.position_embedding, std=std)
        nn.init.trunc_normal_(self.embeddings.class_embedding, std=std)
        for blk in self.encoder.layers:
            nn.init.constant_(blk.ls1, self.config.initializer_factor)
            nn.init.constant_(blk.ls2, self.config.initializer_factor)

    def set_grad_checkpointing(self, enable: bool = True) -> "InternViT":
        """Recompute each block in the backward pass (training memory only; no numeric effect)."""
        self.grad_checkpointing = enable
        return self

    def freeze(self, frozen: bool = True) -> "InternViT":
        """Stop (or restart) gradients for every parameter."""
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self

    def set_attention(self, impl: str = "auto") -> "InternViT":
        """Choose the attention kernel of every block: ``'auto'``, ``'sdpa'`` or ``'gemm'`` (same math)."""
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention impl must be one of {', '.join(ATTENTION_IMPLS)}, got {impl!r}")
        for m in self.modules():
            if isinstance(m, Attention):
                m.attn_impl = impl
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype

    @property
    def num_layers(self) -> int:
        return len(self.encoder.layers)

    # -- forward -------------------------------------------------------------------------------------
    def _run_block(self, blk: Block, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(blk, x, use_reentrant=False)
        return blk(x)

    def _blocks(self, x: torch.Tensor, last: Optional[int] = None):
        """Yield ``(index, output)`` after each block (up to and including ``last``)."""
        for i, blk in enumerate(self.encoder.layers):
            x = self._run_block(blk, x)
            yield i, x
            if last is not None and i >= last:
                return

    def forward_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        x, _ = self.embeddings(pixel_values)
        for _, out in self._blocks(x):
            x = out
        return x

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> InternViTOutput:
        """``pixel_values`` ``(B, 3, H, W)`` float, normalised, H and W multiples of the patch size (any size:
        position embeddings are interpolated); else ``ValueError`` (the convolution would drop the border);
        ``TypeError`` for integer / bool / other non-float16-to-float64 pixels (use ``build_transform``).
        Returns tokens ``(B, 1 + H/p * W/p, C)`` (class token first), the pooled class token and, with
        ``output_hidden_states``, the embeddings and every block's output."""
        x, _ = self.embeddings(pixel_values)
        hidden = [x] if output_hidden_states else None
        for _, out in self._blocks(x):
            if hidden is not None:
                hidden.append(out)
            x = out
        return InternViTOutput(x, x[:, 0], tuple(hidden) if hidden is not None else None)

    def resolve_indices(self, indices: Union[int, Sequence[int], None]) -> list[int]:
        """timm convention: an int ``n`` means the last ``n`` blocks; a sequence lists blocks (negatives allowed)."""
        n = self.num_layers
        if indices is None:
            return [n - 1]
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"indices={indices}: must be between 1 and the number of blocks ({n})")
            return list(range(n - indices, n))
        out = []
        for i in indices:
            j = i + n if i < 0 else i
            if not 0 <= j < n:
                raise ValueError(f"block index {i} out of range for a model with {n} blocks")
            out.append(j)
        return out

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: Union[int, Sequence[int], None] = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
        return_prefix_tokens: bool = False,
    ):
        """Outputs of chosen blocks, as in timm's ViT.

        ``output_fmt='NCHW'`` gives ``(B, C, h, w)`` patch maps, ``'NLC'`` ``(B, h*w, C)`` tokens; with
        ``return_prefix_tokens`` each entry is ``(map, cls_token (B, 1, C))``. InternViT has no final norm,
        so ``norm`` is accepted for timm compatibility and has no effect. Returns ``intermediates`` if
        ``intermediates_only`` else ``(final_tokens, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        wanted = self.resolve_indices(indices)
        last = max(wanted) if (stop_early or intermediates_only) else None
        b = x.shape[0]
        x, (h, w) = self.embeddings(x)
        picked = {}
        for i, out in self._blocks(x, last):
            if i in wanted:
                picked[i] = out
            x = out
        intermediates = []
        for i in wanted:
            t = picked[i]
            prefix, patches = t[:, :1], t[:, 1:]
            if output_fmt == "NCHW":
                patches = patches.reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
            intermediates.append((patches, prefix) if return_prefix_tokens else patches)
        if intermediates_only:
            return intermediates
        return x, intermediates
