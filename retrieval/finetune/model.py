"""The retrieval fine-tuning model: an mmengine ``BaseModel`` around the existing
:class:`internvit.models.internvl.InternVLModel` (reference-spec-2 §2.1–2.3).

Loss (per batch of ``B`` image-caption samples): image-text contrastive on the InternVL-G path (query outputs
→ ``clip_projector2``) and on the InternVL-C path (``clip_projector``), each against the text feature (last
real token of ``'summarize:' + caption`` → ``text_projection``), with multiple positives (every sample of the
same image id), features gathered over processes with gradients, one learned ``logit_scale``; plus
image-text matching (``itm_head`` on the query outputs of a joint, bidirectional query+caption pass, averaged
over the queries; the negative is a caption of another image). ``loss = loss_itc(G) + loss_itc(C) + loss_itm``.

The contrastive text and query features are computed by the model's own text and query passes (text causal
and blind to the queries, queries blind to the text), which is what the reference's single masked 3B-row pass
computes (its text sits at rotary positions shifted by the query count; RoPE depends only on relative
positions, so the features agree up to rounding), and exactly what evaluation and every other tool encode.

The ``itm_head`` (``Linear(hidden, 2)``) is not part of ``InternVLModel`` (it is not used for retrieval); it
is read from ``itm_head.*`` in the starting checkpoint when present and written next to the model weights
by :meth:`InternVLRetrievalFinetune.save_pretrained`, where :func:`internvit.load_model` ignores it as a
known head.
"""
from __future__ import annotations

import copy
import logging
import os
from typing import Optional, Sequence, Union

import torch
import torch.nn.functional as F
from mmengine.model import BaseModel
from mmengine.registry import MODELS
from torch import nn

from .losses import gather_no_grad, gather_with_grad, itm_loss, multi_positive_contrastive

logger = logging.getLogger("retrieval")

#: the upstream script flags of each published recipe (reference-spec-2 §2.2)
RECIPES: dict[str, dict] = {
    "full": dict(freeze_model=False, freeze_vision_model=False, freeze_qllama=False, unfreeze_qllama_head=False),
    "head": dict(freeze_model=True, freeze_vision_model=True, freeze_qllama=True, unfreeze_qllama_head=True),
}
_FLAGS = ("freeze_model", "freeze_vision_model", "freeze_qllama", "unfreeze_crossattn", "unfreeze_qllama_head")


def resolve_recipe(recipe: Union[str, dict]) -> dict:
    """A recipe name (``'full'``, ``'head'``) or a dict of the upstream flags → the full flag dict."""
    if isinstance(recipe, str):
        if recipe not in RECIPES:
            raise ValueError(f"recipe must be one of {', '.join(RECIPES)} or a dict of flags, got {recipe!r}")
        flags = dict(RECIPES[recipe])
    elif isinstance(recipe, dict):
        unknown = set(recipe) - set(_FLAGS)
        if unknown:
            raise ValueError(f"unknown recipe flags {sorted(unknown)}; known: {', '.join(_FLAGS)}")
        flags = dict(recipe)
    else:
        raise TypeError(f"recipe must be a name or a dict, got {type(recipe).__name__}")
    return {f: bool(flags.get(f, False)) for f in _FLAGS}


def _build_internvl(pretrained: str, config: Optional[dict], drop_path_rate: Optional[float],
                    image_size: Optional[int], seed: int):
    from internvit.checkpoints import open_weights
    from internvit.config import get_config, is_preset
    from internvit.factory import infer_config, load_model

    src = os.fspath(pretrained)
    if config is not None:
        cfg = get_config(copy.deepcopy(config))
    elif os.path.isdir(src) or is_preset(src) and not os.path.exists(src):
        cfg = get_config(src)
    elif os.path.isfile(src):
        cfg = infer_config(open_weights(src))
    else:
        raise FileNotFoundError(f"{src}: no such checkpoint directory or file, and not a preset name")
    if type(cfg).__name__ != "InternVLConfig":
        raise ValueError(f"{src}: not an InternVL-C/G model (retrieval fine-tuning needs the text tower)")
    if drop_path_rate is not None:
        cfg.vision_config.drop_path_rate = float(drop_path_rate)
    if image_size:  # the reference's --force_image_size: saved in the config, position table resized on load
        cfg.force_image_size = int(image_size)
        cfg.vision_config.image_size = int(image_size)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # presets (random weights) are the same in every process
        model = load_model(src, cfg, dtype=torch.float32)
    return model


def _read_itm_head(src: str) -> Optional[dict]:
    from internvit.checkpoints import open_weights

    if not os.path.exists(src):
        return None
    tensors = open_weights(src)
    out = {}
    for key in tensors.keys():
        name = key[len("module."):] if key.startswith("module.") else key
        if name in ("itm_head.weight", "itm_head.bias"):
            out[name.split(".", 1)[1]] = tensors[key].float()
    return out or None


def _same_file(a: str, b: str) -> bool:
    """The same file, or two files of the same bytes (a copy of the tokenizer in another folder)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        if os.path.getsize(a) != os.path.getsize(b):
            return False
        with open(a, "rb") as fa, open(b, "rb") as fb:
            return fa.read() == fb.read()
    except OSError:
        return False


@MODELS.register_module()
class InternVLRetrievalFinetune(BaseModel):
    """InternVL-C/G retrieval fine-tuning (losses of reference-spec-2 §2.3) for mmengine runners.

    Args:
        pretrained: the starting model: an HF directory (``config.json`` + safetensors, e.g. InternVL-14B-224px
            or a directory written by :meth:`save_pretrained`), a weight file, or a preset name (random
            weights, seeded by ``init_seed``).
        config: an architecture (preset name or dict) overriding the checkpoint's config (toy models).
        recipe: ``'full'`` (everything trains), ``'head'`` (only ``text_projection``: the reference's
            ``lm_head`` is not on the loss path and is not kept) or a dict of the upstream flags
            ``freeze_model``, ``freeze_vision_model``, ``freeze_qllama``, ``unfreeze_crossattn``,
            ``unfreeze_qllama_head``.
        drop_path_rate: ViT stochastic depth (``linspace(0, rate, depth)``); ``None`` keeps the config's.
        image_size: the reference's ``force_image_size`` (364 for full fine-tuning): written to the config,
            position table resized bicubically on load.
        itm: add the image-text matching loss (needs query tokens; the PyTorch InternVL-C release has none).
        tokenizer: ``tokenizer.model`` (or its folder): checked against the vocabulary and copied next to the
            weights by :meth:`save_pretrained`, so indexes and the service find it.
        grad_checkpointing: activation checkpointing of the ViT blocks (FSDP configs use the strategy's).
        eval_modes: image embeddings reported by the evaluation (``InternVL-C`` and/or ``InternVL-G``).
        init_seed: seed of random initialisation (presets, a missing ``itm_head``).
    """

    def __init__(self, pretrained: str, config: Union[str, dict, None] = None, recipe: Union[str, dict] = "full",
                 drop_path_rate: Optional[float] = None, image_size: Optional[int] = None, itm: bool = True,
                 tokenizer: Optional[str] = None, grad_checkpointing: bool = False,
                 eval_modes: tuple = ("InternVL-C", "InternVL-G"), init_seed: int = 0,
                 data_preprocessor: Optional[dict] = None, init_cfg: Optional[dict] = None) -> None:
        super().__init__(data_preprocessor=data_preprocessor, init_cfg=init_cfg)
        from internvit.models.internvl import check_mode

        self.pretrained = os.fspath(pretrained)
        self.model = _build_internvl(self.pretrained, config, drop_path_rate, image_size, init_seed)
        self.flags = resolve_recipe(recipe)
        self.use_itm = bool(itm)
        self.eval_modes = tuple(check_mode(m) for m in eval_modes)
        if not self.model.has_g:
            if self.use_itm:
                raise ValueError(f"{self.pretrained}: itm=True needs query tokens, which this model has not "
                                 f"(num_query_token=0): set itm=False")
            if "InternVL-G" in self.eval_modes:
                raise ValueError(f"{self.pretrained}: no InternVL-G path (num_query_token=0): "
                                 f"set eval_modes=('InternVL-C',)")
        hidden = self.model.config.qllama_config.hidden_size
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(init_seed + 1)
            self.itm_head = nn.Linear(hidden, 2)
            nn.init.normal_(self.itm_head.weight, std=0.02)
            nn.init.zeros_(self.itm_head.bias)
        stored = _read_itm_head(self.pretrained)
        if stored is not None:
            self.itm_head.load_state_dict(stored)
        elif self.use_itm:
            logger.info("%s: no itm_head in the checkpoint; initialised randomly", self.pretrained)
        self.tokenizer_path = None
        if tokenizer is not None:
            from internvit.tokenizer import get_tokenizer

            tok = get_tokenizer(tokenizer)
            vocab = self.model.config.qllama_config.vocab_size
            if tok.vocab_size > vocab:
                raise ValueError(f"tokenizer {tok.model_file} has {tok.vocab_size} pieces but the model's "
                                 f"vocabulary is {vocab}")
            if os.path.basename(tok.model_file) != "tokenizer.model":
                raise ValueError(f"tokenizer {tok.model_file}: name the file tokenizer.model (or pass its folder), "
                                 f"the name model folders use, so save_pretrained can copy it")
            self.tokenizer_path = tok.model_file
        if grad_checkpointing:
            self.model.vision_model.set_grad_checkpointing(True)
        # FSDP cannot shard a 0-dim parameter: hold the scale as shape (1,) while training (same arithmetic,
        # broadcast); save_pretrained writes it back as the scalar the checkpoints use
        scale = self.model.logit_scale
        if scale.ndim == 0:
            self.model.logit_scale = nn.Parameter(scale.detach().reshape(1).clone())
        self.apply_recipe()

    # -- set-up checks (internvit.runner.build_runner calls them with the dataloaders built) -----------------
    def check_setup(self, runner) -> None:
        """Compare each built dataloader's :class:`~retrieval.finetune.data.ImageTextPairs` with this model
        (``ValueError`` naming the dataloader): its ``image_size`` must be a multiple of the patch size (the
        model refused such batches only at the first step), and its tokenizer must be the one
        :meth:`save_pretrained` ships in ``hf_model`` (``model.tokenizer``): trained on one and exported with
        another, the saved folder tokenized captions with other ids than the model learnt."""
        from .data import ImageTextPairs

        patch = int(self.model.config.vision_config.patch_size)
        for name in ("train", "val", "test"):
            loader = getattr(runner, f"_{name}_dataloader", None)
            dataset = getattr(loader, "dataset", None)
            for ds in getattr(dataset, "datasets", None) or [dataset]:
                if not isinstance(ds, ImageTextPairs):
                    continue
                where = f"{name}_dataloader.dataset"
                if ds.image_size % patch:
                    raise ValueError(f"{where}: image_size={ds.image_size} is not a multiple of the model's patch "
                                     f"size {patch}")
                theirs = ds.tokenizer.model_file
                if self.tokenizer_path is not None and not _same_file(theirs, self.tokenizer_path):
                    raise ValueError(f"{where}.tokenizer ({theirs}) is not model.tokenizer ({self.tokenizer_path}): "
                                     f"the saved hf_model would not tokenize as the run trained and validated: "
                                     f"give the model and every dataset the same tokenizer")

    # -- trainable / frozen --------------------------------------------------------------------------------
    def _frozen_modules(self) -> list[nn.Module]:
        out = []
        if self.flags["freeze_vision_model"]:
            out.append(self.model.vision_model)
        if self.flags["freeze_qllama"]:
            out.append(self.model.qllama)
        return out

    def apply_recipe(self) -> None:
        """Set ``requires_grad`` as the upstream flags do, in their order (freeze → unfreeze)."""
        f = self.flags
        if f["freeze_model"]:
            for p in self.parameters():
                p.requires_grad_(False)
        for m in self._frozen_modules():
            for p in m.parameters():
                p.requires_grad_(False)
        if f["unfreeze_crossattn"]:
            for name, p in self.model.qllama.named_parameters():
                if "cross_attn" in name:
                    p.requires_grad_(True)
        if f["unfreeze_qllama_head"]:  # qllama.lm_head is not kept (not on the retrieval loss path)
            self.model.text_projection.requires_grad_(True)
        self.train(self.training)

    def train(self, mode: bool = True) -> "InternVLRetrievalFinetune":
        super().train(mode)
        for m in self._frozen_modules():  # the reference puts frozen towers in eval mode (no drop path)
            m.eval()
        return self

    def trainable_parameter_names(self) -> list[str]:
        return [n for n, p in self.named_parameters() if p.requires_grad]

    # -- forward -------------------------------------------------------------------------------------------
    def forward(self, inputs, data_samples=None, mode: str = "tensor"):
        if isinstance(inputs, (list, tuple)):
            inputs = torch.stack(list(inputs))
        if mode == "loss":
            return self.loss(inputs, data_samples)
        if mode == "predict":
            return self.predict(inputs, data_samples)
        if mode == "tensor":
            return self.image_embeddings(inputs)
        raise ValueError(f"mode must be 'loss', 'predict' or 'tensor', got {mode!r}")

    def _vision(self, pixel_values: torch.Tensor) -> torch.Tensor:
        vm = self.model.vision_model
        return vm(pixel_values.to(vm.dtype)).last_hidden_state

    def _query_outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        m = self.model
        queries = m.query_tokens.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return m.qllama.encode_queries(queries, tokens)

    def _text_features(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """``(B, T)`` ids and attention mask → ``(B, D)`` hidden state of the last real token @ text_projection."""
        m = self.model
        last = mask.long().sum(1) - 1
        if (last < 0).any():
            raise ValueError("a caption has no tokens (empty attention mask)")
        t = int(last.max()) + 1
        hidden = m.qllama.encode_tokens(ids[:, :t], mask[:, :t].bool())
        pooled = hidden[torch.arange(len(ids), device=hidden.device), last]
        return pooled @ m.text_projection.to(pooled.dtype)

    def _itm_logits(self, tokens: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Matching rows: queries and caption attend to each other (padding keys masked), the queries
        cross-attend to the ViT tokens; ``itm_head`` averaged over the query outputs → ``(B, 2)``."""
        m = self.model
        nq = m.config.num_query_token
        b = ids.shape[0]
        t = int(mask.long().sum(1).max())
        ids, mask = ids[:, :t], mask[:, :t].bool()
        text = m.qllama.model.embed_tokens(ids)
        emb = torch.cat([m.query_tokens.to(text.dtype).expand(b, -1, -1), text], dim=1)
        keys = torch.cat([torch.ones(b, nq, dtype=torch.bool, device=mask.device), mask], dim=1)
        length = keys.shape[1]
        attn = keys[:, None, None, :].expand(b, 1, length, length)
        out = m.qllama.model(emb, attn, tokens)
        return self.itm_head(out[:, :nq].to(self.itm_head.weight.dtype)).mean(1)

    def loss(self, pixel_values: torch.Tensor, samples: dict) -> dict:
        """``samples``: batched ``image_id (B,)``, ``text_ids``/``text_mask`` (``'summarize:' + caption``),
        ``match_ids``/``match_mask`` (the caption) and ``neg_ids``/``neg_mask`` (another image's caption)."""
        m = self.model
        tokens = self._vision(pixel_values)
        ids_local = samples["image_id"].long().reshape(-1)
        txt = F.normalize(self._text_features(samples["text_ids"], samples["text_mask"]).float(), dim=-1)
        c = F.normalize(m.clip_projector(tokens).float(), dim=-1)
        feats = [c, txt]
        if m.has_g:
            q_out = self._query_outputs(tokens)
            g = F.normalize(m.clip_projector2(q_out).float(), dim=-1)
            feats.append(g)
        gathered = gather_with_grad(feats)
        ids_all = gather_no_grad(ids_local)
        scale = m.logit_scale.float().exp()
        c_all, txt_all = gathered[0], gathered[1]
        losses = {"loss_itc_c": multi_positive_contrastive(c, txt, c_all, txt_all, ids_local, ids_all, scale)}
        if m.has_g:
            losses["loss_itc_g"] = multi_positive_contrastive(g, txt, gathered[2], txt_all, ids_local, ids_all,
                                                              scale)
        if self.use_itm:
            trains = self.itm_head.weight.requires_grad or any(p.requires_grad for p in m.qllama.parameters()) \
                or m.query_tokens.requires_grad or any(p.requires_grad for p in m.vision_model.parameters())
            with torch.set_grad_enabled(torch.is_grad_enabled() and trains):
                both_ids = torch.cat([samples["neg_ids"], samples["match_ids"]])
                both_mask = torch.cat([samples["neg_mask"], samples["match_mask"]])
                logits = self._itm_logits(torch.cat([tokens, tokens]), both_ids, both_mask)
                b = len(tokens)
                losses["loss_itm"] = itm_loss(logits[:b], logits[b:])
        losses["logit_scale"] = scale.detach()
        return losses

    # -- evaluation ----------------------------------------------------------------------------------------
    def image_embeddings(self, pixel_values: torch.Tensor) -> dict:
        """``{mode: (B, D)}`` L2-normalised fp32 image embeddings for ``eval_modes`` from one ViT pass
        (the same values as ``InternVLModel.encode_image``)."""
        m = self.model
        tokens = self._vision(pixel_values)
        c = m.clip_projector(tokens)
        out = {}
        for mode in self.eval_modes:
            if mode == "InternVL-C":
                out[mode] = F.normalize(c.float(), dim=-1)
            else:
                g = m.clip_projector2(self._query_outputs(tokens))
                out[mode] = F.normalize((F.normalize(g, dim=-1) + F.normalize(c, dim=-1)).float(), dim=-1)
        return out

    @torch.no_grad()
    def predict(self, pixel_values: torch.Tensor, samples) -> list[dict]:
        """One record per image: ``index``, ``image`` (``{mode: (D,)}``) and ``text`` (``(k, D)``, its captions
        encoded by ``InternVLModel.encode_text``, L2-normalised; ``(0, D)`` for an image without captions, a
        gallery distractor)."""
        if isinstance(samples, dict):  # default_collate of single-caption records
            samples = [{k: v[i] for k, v in samples.items()} for i in range(len(pixel_values))]
        images = self.image_embeddings(pixel_values)
        counts = [len(s["text_ids"]) for s in samples]
        ids = torch.cat([s["text_ids"] for s in samples]).to(pixel_values.device)
        if len(ids):
            text = F.normalize(self.model.encode_text(ids).float(), dim=-1).split(counts)
        else:  # a batch of images without captions: nothing to encode
            dim = next(iter(images.values())).shape[-1]
            text = [pixel_values.new_zeros((0, dim), dtype=torch.float32) for _ in samples]
        return [dict(index=int(s["index"]), image={k: v[i] for k, v in images.items()}, text=text[i])
                for i, s in enumerate(samples)]

    # -- export --------------------------------------------------------------------------------------------
    def hf_state_dict(self, state_dict: Optional[dict] = None) -> dict:
        """The InternVL weights (keys as ``InternVLModel``) plus ``itm_head.*`` from this module's (or a given,
        e.g. FSDP full) state dict."""
        sd = self.state_dict() if state_dict is None else state_dict
        out = {}
        for k, v in sd.items():
            if k == "model.logit_scale":
                out["logit_scale"] = v.reshape(())
            elif k.startswith("model."):
                out[k[len("model."):]] = v
            elif k.startswith("itm_head."):
                out[k] = v
        return out

    def save_pretrained(self, directory: str, *, state_dict: Optional[dict] = None,
                        dtype: Optional[torch.dtype] = None, overwrite: bool = False,
                        extra_files: Sequence[str] = ()) -> str:
        """Write an HF directory :func:`internvit.load_model` reads (config with ``force_image_size``,
        safetensors, the tokenizer when known, and ``extra_files`` copied in, all in the one atomic swap);
        returns it. ``overwrite``: as in :func:`internvit.save_model` (a folder that is not empty is replaced
        only with ``overwrite=True``, and only when it holds nothing but what saving a model writes)."""
        from internvit.factory import save_model

        extra = [*self.model.extra_files, *extra_files]
        if self.tokenizer_path and "tokenizer.model" not in {os.path.basename(e) for e in extra}:
            extra.append(self.tokenizer_path)
        export = _Export(self.model.config, self.hf_state_dict(state_dict), extra)
        return save_model(export, directory, dtype=dtype, overwrite=overwrite)


class _Export:
    """What :func:`internvit.save_model` reads: ``config``, ``state_dict()`` and ``extra_files``."""

    def __init__(self, config, state_dict: dict, extra_files: list) -> None:
        self.config = config
        self._sd = state_dict
        self.extra_files = extra_files

    def state_dict(self) -> dict:
        return self._sd


__all__ = ["InternVLRetrievalFinetune", "RECIPES", "resolve_recipe"]
