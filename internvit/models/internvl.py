"""InternVL-C / InternVL-G image-text models (reference-spec §7).

* image → :class:`~internvit.models.vit.InternViT` tokens (class token included, no final norm);
* InternVL-C image embedding: ``clip_projector`` (attention pooling) of those tokens;
* InternVL-G image embedding: learned query tokens run through QLLaMA, cross-attending to the ViT tokens,
  pooled by ``clip_projector2``; the embedding is ``g/|g| + c/|c|``;
* text embedding (both modes): QLLaMA over the token ids (causal, key padding, no cross-attention), hidden
  state of the last non-padding token (id > 0) ``@ text_projection``.

A config with ``num_query_token = 0`` describes the PyTorch InternVL-C release (``internvl_c_13b_224px.pth``):
a plain LLaMA text tower, no query tokens and no ``clip_projector2`` (InternVL-G mode is then unavailable).
"""
from __future__ import annotations

import math
import os

import torch
import torch.nn.functional as F
from torch import nn

from ..checkpoints import internvl_key_map
from ..config import InternVLConfig
from .pooling import AttentionPoolingBlock
from .qllama import QLLaMA
from .vit import InternViT

MODES = ("InternVL-C", "InternVL-G")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json")


def check_mode(mode: str) -> str:
    canon = {m.lower().replace("_", "-"): m for m in MODES}
    key = str(mode).lower().replace("_", "-")
    key = {"c": "internvl-c", "g": "internvl-g"}.get(key, key)
    if key not in canon:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    return canon[key]


class InternVLModel(nn.Module):
    """InternVL-C / InternVL-G with the contract API ``encode_image``, ``encode_text`` and ``forward``."""

    #: maps checkpoint keys (HF InternVL-14B or PyTorch InternVL-C family) onto this module's names
    checkpoint_key_map = staticmethod(internvl_key_map)

    def __init__(self, config: InternVLConfig) -> None:
        super().__init__()
        self.config = config
        vc, qc = config.vision_config, config.qllama_config
        if qc.vision_hidden_size != vc.hidden_size:
            raise ValueError(f"config: qllama_config.vision_hidden_size {qc.vision_hidden_size} != "
                             f"vision_config.hidden_size {vc.hidden_size}")
        if config.num_query_token != qc.num_query_token:
            raise ValueError(f"config: num_query_token {config.num_query_token} != "
                             f"qllama_config.num_query_token {qc.num_query_token}")
        self.vision_model = InternViT(vc)
        self.qllama = QLLaMA(qc)
        d, heads = config.clip_embed_dim, config.attn_pool_num_heads
        self.clip_projector = AttentionPoolingBlock(vc.hidden_size, heads, d)
        self.has_g = config.num_query_token > 0
        if self.has_g:
            self.query_tokens = nn.Parameter(torch.zeros(1, config.num_query_token, qc.hidden_size))
            self.clip_projector2 = AttentionPoolingBlock(qc.hidden_size, heads, d)
        self.text_projection = nn.Parameter(torch.empty(qc.hidden_size, d))
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    # -- set-up --------------------------------------------------------------------------------------
    def init_weights(self) -> None:
        """Random initialisation (presets without weights)."""
        std = 0.02
        self.vision_model.init_weights()
        self.qllama.init_weights(std)
        self.clip_projector.init_weights(std)
        if self.has_g:
            self.clip_projector2.init_weights(std)
            nn.init.normal_(self.query_tokens, std=std)
        nn.init.normal_(self.text_projection, std=self.config.qllama_config.hidden_size ** -0.5)
        with torch.no_grad():
            self.logit_scale.fill_(math.log(1 / 0.07))

    def freeze(self, frozen: bool = True) -> "InternVLModel":
        for p in self.parameters():
            p.requires_grad_(not frozen)
        return self

    @property
    def dtype(self) -> torch.dtype:
        return self.vision_model.dtype

    @property
    def image_size(self) -> int:
        return self.config.vision_config.image_size

    @property
    def extra_files(self) -> list[str]:
        """Tokenizer files found next to the loaded weights (copied along by ``save_model``)."""
        report = getattr(self, "load_report", None)
        if report is None or not report.files:
            return []
        folder = os.path.dirname(os.path.abspath(report.files[0]))
        return [os.path.join(folder, f) for f in TOKENIZER_FILES if os.path.isfile(os.path.join(folder, f))]

    # -- embeddings ----------------------------------------------------------------------------------
    def encode_image(self, pixel_values: torch.Tensor, mode: str = "InternVL-C") -> torch.Tensor:
        """``(B, 3, H, W)`` → ``(B, clip_embed_dim)`` image embeddings (not normalised, as the reference's)."""
        mode = check_mode(mode)
        tokens = self.vision_model(pixel_values).last_hidden_state
        c = self.clip_projector(tokens)
        if mode == "InternVL-C":
            return c
        if not self.has_g:
            raise ValueError("mode='InternVL-G' needs query tokens and clip_projector2, which this model "
                             "(num_query_token=0, e.g. the PyTorch InternVL-C release) does not have")
        queries = self.query_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        g = self.clip_projector2(self.qllama.encode_queries(queries, tokens))
        return F.normalize(g, dim=-1) + F.normalize(c, dim=-1)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` token ids (right-padded with 0, EOS last) → ``(B, clip_embed_dim)`` (not normalised).

        ``input_ids`` must be an integer tensor of ids in ``[0, vocab_size)`` (as the tokenizer gives): float ids
        (``1.7`` was truncated to token 1), negative ids (taken as padding) and ids past the vocabulary (an
        ``IndexError`` naming nothing) are a ``ValueError`` / ``TypeError`` naming the row and id. ``B = 0``
        (the tokenizer's answer to no texts) gives ``(0, clip_embed_dim)``.
        """
        if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2:
            got = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
            raise ValueError(f"input_ids must be a (B, T) tensor, got {got}")
        if input_ids.dtype.is_floating_point or input_ids.dtype.is_complex or input_ids.dtype == torch.bool:
            raise TypeError(f"input_ids of dtype {str(input_ids.dtype).replace('torch.', '')}: expected integer "
                            f"token ids (torch.long), e.g. from internvit.get_tokenizer(...)(texts)")
        input_ids = input_ids.to(device=self.text_projection.device, dtype=torch.long)
        if input_ids.shape[0] == 0:
            return self.text_projection.new_zeros((0, self.text_projection.shape[1]))
        vocab = self.qllama.model.embed_tokens.num_embeddings
        bad = ((input_ids < 0) | (input_ids >= vocab)).nonzero()
        if len(bad):
            row, col = (int(v) for v in bad[0])
            raise ValueError(f"input_ids row {row}, position {col}: id {int(input_ids[row, col])} is not in the "
                             f"vocabulary [0, {vocab}) (a tokenizer of another model?)")
        mask = input_ids > 0
        last = mask.sum(1) - 1
        if (last < 0).any():
            bad = int((last < 0).nonzero()[0, 0])
            raise ValueError(f"input_ids row {bad} holds only padding (id 0); nothing to encode")
        # position p only sees keys <= p (causal), so columns past the last pooled position change nothing
        t = int(last.max()) + 1
        hidden = self.qllama.encode_tokens(input_ids[:, :t], mask[:, :t])
        pooled = hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
        return pooled @ self.text_projection.to(pooled.dtype)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor,
                mode: str = "InternVL-C") -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits_per_image (B_img, B_txt), logits_per_text)`` = ``exp(logit_scale)`` × cosine similarity."""
        img = F.normalize(self.encode_image(pixel_values, mode=mode), dim=-1)
        txt = F.normalize(self.encode_text(input_ids), dim=-1)
        logits_per_image = self.logit_scale.exp() * img @ txt.t()
        return logits_per_image, logits_per_image.t()


__all__ = ["InternVLModel", "MODES", "check_mode"]

