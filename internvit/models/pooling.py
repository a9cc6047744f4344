"""Attention pooling: the InternVL ``clip_projector`` / ``clip_projector2`` and the classification probe head.

A single learned-free query (the mean of all tokens, class token included) cross-attends to all tokens;
there is no residual and no MLP. Parameter names follow the reference checkpoints
(``norm1_q/k/v``, ``cross_attn.{q,k,v}.weight``, ``cross_attn.{q,k,v}_bias``, ``cross_attn.proj``).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .vit import LayerNorm


class CrossAttention(nn.Module):
    """Multi-head attention of ``q_in`` over ``k_in``/``v_in``; bias-free q/k/v weights plus separate biases."""

    def __init__(self, dim: int, num_heads: int, out_dim: int, qkv_bias: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"AttentionPoolingBlock: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim ** -0.5
        self.q = nn.Linear(dim, dim, bias=False)
        self.k = nn.Linear(dim, dim, bias=False)
        self.v = nn.Linear(dim, dim, bias=False)
        if qkv_bias:
            self.q_bias = nn.Parameter(torch.zeros(dim))
            self.k_bias = nn.Parameter(torch.zeros(dim))
            self.v_bias = nn.Parameter(torch.zeros(dim))
        else:
            self.q_bias = self.k_bias = self.v_bias = None
        self.proj = nn.Linear(dim, out_dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        return x.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, q_in: torch.Tensor, k_in: torch.Tensor, v_in: torch.Tensor) -> torch.Tensor:
        b, nq, _ = q_in.shape
        q = self._heads(F.linear(q_in, self.q.weight, self.q_bias))
        k = self._heads(F.linear(k_in, self.k.weight, self.k_bias))
        v = self._heads(F.linear(v_in, self.v.weight, self.v_bias))
        attn = torch.softmax(((q * self.scale) @ k.transpose(-2, -1)).float(), dim=-1).to(v.dtype)
        out = (attn @ v).transpose(1, 2).reshape(b, nq, self.num_heads * self.head_dim)  # -1 fails for b = 0
        return self.proj(out)


class AttentionPoolingBlock(nn.Module):
    """``(B, N, dim)`` tokens → ``(B, out_dim)``: mean-token query, LayerNormed q/k/v inputs, cross-attention, proj.

    Reference-spec §4.3: InternVL ``clip_projector`` (dim 3200, 16 heads, out 768), ``clip_projector2``
    (dim 4096, 16 heads, out 768) and the attention-pooling probe (dim 3200, 25 heads, out 3200).
    """

    def __init__(self, dim: int, num_heads: int, out_dim: int, qkv_bias: bool = True, norm_eps: float = 1e-5) -> None:
        super().__init__()
        self.dim, self.num_heads, self.out_dim = dim, num_heads, out_dim
        self.norm1_q = LayerNorm(dim, eps=norm_eps)
        self.norm1_k = LayerNorm(dim, eps=norm_eps)
        self.norm1_v = LayerNorm(dim, eps=norm_eps)
        self.cross_attn = CrossAttention(dim, num_heads, out_dim, qkv_bias=qkv_bias)

    def init_weights(self, std: float = 0.02) -> None:
        """Trunc-normal linear weights, zero biases, unit norms."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=std)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
        for b in (self.cross_attn.q_bias, self.cross_attn.k_bias, self.cross_attn.v_bias):
            if b is not None:
                nn.init.zeros_(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 3 or x.shape[-1] != self.dim:
            raise ValueError(f"AttentionPoolingBlock expects (B, N, {self.dim}) tokens, got {tuple(x.shape)}")
        x_q = x.mean(dim=1, keepdim=True)
        out = self.cross_attn(self.norm1_q(x_q), self.norm1_k(x), self.norm1_v(x))
        return out.squeeze(1)
