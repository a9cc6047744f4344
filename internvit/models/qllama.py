"""QLLaMA: the LLaMA decoder of InternVL-C/G whose every ``cross_attention_frequency``-th layer lets the learned
query tokens cross-attend to the InternViT tokens (reference-spec §7.3).

Two uses: the text tower (token ids → hidden states, causal + key-padding mask, cross-attention skipped) and
the InternVL-G query path (query embeddings + ViT tokens → hidden states, bidirectional, cross-attention on).
Module names follow the Hugging Face ``qllama.model.*`` checkpoint keys. Attention runs through SDPA.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..config import QLLaMAConfig
from .vit import RMSNorm

KV = tuple[torch.Tensor, torch.Tensor]


def rotary_cos_sin(seq_len: int, head_dim: int, theta: float, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """LLaMA rotary tables for positions ``0…seq_len-1`` (computed in fp32, cast to ``dtype``): ``(T, head_dim)``."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.int64).float() / head_dim))
    t = torch.arange(seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([-x2, x1], dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half convention; ``x`` is ``(B, H, T, D)``, ``cos``/``sin`` are ``(T, D)``."""
    return x * cos + _rotate_half(x) * sin


class SelfAttention(nn.Module):
    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(h, h, bias=False)
        self.v_proj = nn.Linear(h, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                past_kv: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
        """Returns the output and this call's (rotated) keys/values; ``past_kv`` are prepended keys/values."""
        b, t, c = x.shape
        q = apply_rotary(self._heads(self.q_proj(x)), cos, sin)
        k = apply_rotary(self._heads(self.k_proj(x)), cos, sin)
        v = self._heads(self.v_proj(x))
        kv = (k, v)
        if past_kv is not None:
            pk, pv = past_kv
            k = torch.cat([pk.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([pv.expand(b, -1, -1, -1), v], dim=2)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c)), kv


class CrossAttention(nn.Module):
    """Queries (RMS-normed, ``norm1``) attend to ViT tokens (RMS-normed, ``norm2``); no rotary, no mask."""

    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        h, vw = config.hidden_size, config.vision_hidden_size
        self.num_heads = config.num_attention_heads
        self.head_dim = h // self.num_heads
        self.q_proj = nn.Linear(h, h, bias=False)
        self.k_proj = nn.Linear(vw, h, bias=False)
        self.v_proj = nn.Linear(vw, h, bias=False)
        self.o_proj = nn.Linear(h, h, bias=False)
        self.norm1 = RMSNorm(h, config.rms_norm_eps)
        self.norm2 = RMSNorm(vw, config.rms_norm_eps)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        b, t, _ = x.shape
        return x.reshape(b, t, self.num_heads, self.head_dim).transpose(1, 2)

    def forward(self, queries: torch.Tensor, vision: torch.Tensor) -> torch.Tensor:
        b, t, c = queries.shape
        vision = self.norm2(vision.to(queries.dtype))
        q = self._heads(self.q_proj(self.norm1(queries)))
        k = self._heads(self.k_proj(vision))
        v = self._heads(self.v_proj(vision))
        out = F.scaled_dot_product_attention(q, k, v)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, c))


class MLP(nn.Module):
    """``down(SiLU(gate(x)) * up(x))``."""

    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        h, f = config.hidden_size, config.intermediate_size
        self.gate_proj = nn.Linear(h, f, bias=False)
        self.up_proj = nn.Linear(h, f, bias=False)
        self.down_proj = nn.Linear(f, h, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, config: QLLaMAConfig, cross_attention: bool) -> None:
        super().__init__()
        self.self_attn = SelfAttention(config)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.num_query_token = config.num_query_token
        self.cross_attn = CrossAttention(config) if cross_attention else None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: Optional[torch.Tensor],
                vision: Optional[torch.Tensor] = None, past_kv: Optional[KV] = None) -> tuple[torch.Tensor, KV]:
        attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, past_kv)
        x = x + attn
        nq = self.num_query_token
        if self.cross_attn is not None and vision is not None and x.shape[1] >= nq:
            q_tok, rest = x[:, :nq], x[:, nq:]
            q_tok = q_tok + self.cross_attn(q_tok, vision)
            x = torch.cat([q_tok, rest], dim=1)
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class QLLaMAModel(nn.Module):
    """Embeddings, decoder layers and the final RMSNorm (``qllama.model.*`` keys)."""

    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        self.config = config
        freq = config.cross_attention_frequency
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.layers = nn.ModuleList(
            DecoderLayer(config, cross_attention=bool(freq) and config.num_query_token > 0 and j % freq == 0)
            for j in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, inputs_embeds: torch.Tensor, mask: Optional[torch.Tensor] = None,
                vision_hidden_states: Optional[torch.Tensor] = None, past_kvs: Optional[list[KV]] = None,
                return_kvs: bool = False):
        """``inputs_embeds (B, T, H)`` → final-normed ``(B, T, H)``; ``mask`` is a boolean SDPA mask (True = attend).

        ``past_kvs`` (one ``(k, v)`` per layer, from a ``return_kvs=True`` call on a shared prefix) makes the
        inputs continue that prefix: positions start after it and every query may attend to its keys as
        ``mask`` allows. With ``return_kvs`` the per-layer keys/values are returned too.
        """
        cfg = self.config
        head_dim = cfg.hidden_size // cfg.num_attention_heads
        offset = past_kvs[0][0].shape[2] if past_kvs else 0
        t = inputs_embeds.shape[1]
        cos, sin = rotary_cos_sin(offset + t, head_dim, cfg.rope_theta, inputs_embeds.device, inputs_embeds.dtype)
        cos, sin = cos[offset:], sin[offset:]
        x, kvs = inputs_embeds, []
        for j, layer in enumerate(self.layers):
            x, kv = layer(x, cos, sin, mask, vision_hidden_states, past_kvs[j] if past_kvs else None)
            kvs.append(kv)
        return (self.norm(x), kvs) if return_kvs else self.norm(x)


class QLLaMA(nn.Module):
    """Wrapper holding ``model`` (so keys read ``qllama.model.*``). ``lm_head`` is not kept (generation only)."""

    def __init__(self, config: QLLaMAConfig) -> None:
        super().__init__()
        self.config = config
        self.model = QLLaMAModel(config)

    @staticmethod
    def _text_mask(attention_mask: torch.Tensor, prefix_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``(B, 1, T, P+T)`` boolean mask: causal over non-padding keys (after an optional visible prefix)."""
        b, t = attention_mask.shape
        dev = attention_mask.device
        mask = torch.ones(t, t, dtype=torch.bool, device=dev).tril()[None] & attention_mask.bool()[:, None, :]
        # a query at a padding position may see no key at all; its output is never used, but keep SDPA finite
        mask = mask | torch.eye(t, dtype=torch.bool, device=dev)[None]
        if prefix_mask is not None:
            mask = torch.cat([prefix_mask.bool()[:, None, :].expand(b, t, -1), mask], dim=2)
        return mask[:, None]

    def encode_tokens(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None,
                      share_prefix: bool = True) -> torch.Tensor:
        """Text path: causal attention over non-padding keys, no cross-attention → ``(B, T, H)``.

        Causal attention makes the hidden states of a token prefix that all rows share identical across rows,
        so with ``share_prefix`` that prefix (e.g. ``<s>summarize:a photo of a``) runs once and the rows
        continue from its keys/values. Same result up to float rounding; the work drops by the prefix share.
        """
        if attention_mask is None:
            attention_mask = input_ids != self.config.pad_token_id
        b, t = input_ids.shape
        embed = self.model.embed_tokens
        p = 0
        if share_prefix and b > 1:
            same = (input_ids == input_ids[:1]).all(0).int().cumprod(0)
            last = attention_mask.sum(1) - 1  # the pooled positions must stay in the per-row part
            p = min(int(same.sum()), int(last.min()))
        if p < 2:
            return self.model(embed(input_ids), self._text_mask(attention_mask), None)
        pre_ids, pre_mask = input_ids[:1, :p], attention_mask[:1, :p]
        h_pre, kvs = self.model(embed(pre_ids), self._text_mask(pre_mask), None, return_kvs=True)
        h_rest = self.model(embed(input_ids[:, p:]), self._text_mask(attention_mask[:, p:], pre_mask), None,
                            past_kvs=kvs)
        return torch.cat([h_pre.expand(b, -1, -1), h_rest], dim=1)

    def encode_queries(self, query_embeds: torch.Tensor, vision_hidden_states: torch.Tensor) -> torch.Tensor:
        """InternVL-G path: queries attend to each other bidirectionally and cross-attend to the ViT tokens."""
        return self.model(query_embeds, None, vision_hidden_states)

    def init_weights(self, std: float = 0.02) -> None:
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=std)
                if isinstance(m, nn.Linear) and m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        pad = self.config.pad_token_id
        if pad is not None and 0 <= pad < self.config.vocab_size:
            with torch.no_grad():
                self.model.embed_tokens.weight[pad].zero_()
