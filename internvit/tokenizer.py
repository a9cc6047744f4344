"""The InternVL-C/G text tokenizer, on ``sentencepiece`` alone (no ``transformers``).

Reproduces the reference ids (reference-spec §7.6): the slow ``LlamaTokenizer`` in its legacy mode with
``add_bos_token``/``add_eos_token``, ``'summarize:'`` glued in front of every text, truncation to
``max_length`` keeping ``</s>`` as the last id, right padding with id 0.
"""
from __future__ import annotations

import os
import re
from typing import Optional, Sequence, Union

import torch

DEFAULT_PREFIX = "summarize:"
DEFAULT_MAX_LENGTH = 80


def check_texts(texts) -> list[str]:
    """``texts`` as a list of ``str``: one ``str`` becomes a list of one; a list or tuple must hold only ``str``.

    Raises ``TypeError`` naming the offending type (and position) for anything else, e.g. a dict, whose
    iteration would silently give its keys.
    """
    if isinstance(texts, str):
        return [texts]
    if not isinstance(texts, (list, tuple)):
        raise TypeError(f"texts must be a str or a list/tuple of str, got {type(texts).__name__}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise TypeError(f"texts[{i}] is a {type(t).__name__}, expected str")
    return list(texts)


class InternVLTokenizer:
    """Callable: ``tokenizer(texts) -> LongTensor (B, max_length)`` (open_clip tokenizer convention).

    ``context_length`` (alias of ``max_length``) and ``prefix`` are attributes; ``encode`` / ``decode`` give
    access to single texts. Literal special-token strings (``<s>``, ``</s>``, ``<unk>``) inside a text map to
    their ids, as in the reference tokenizer.
    """

    def __init__(self, model_file: str, max_length: int = DEFAULT_MAX_LENGTH,
                 prefix: Optional[str] = DEFAULT_PREFIX, add_bos: bool = True, add_eos: bool = True) -> None:
        import sentencepiece as spm

        if isinstance(max_length, bool) or not isinstance(max_length, int):
            raise TypeError(f"max_length must be an int, got {type(max_length).__name__}")
        if max_length < int(add_bos) + int(add_eos) + 1:
            raise ValueError(f"max_length={max_length} leaves no room for text tokens")
        if prefix is None:  # no prefix (it was glued as None + text: a TypeError on the first call)
            prefix = ""
        if not isinstance(prefix, str):
            raise TypeError(f"prefix must be a str ('' or None for no prefix), got {type(prefix).__name__} "
                            f"{prefix!r}")
        self.model_file = model_file
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(model_file)
        except (OSError, RuntimeError) as e:
            raise ValueError(f"{model_file}: not a readable SentencePiece model ({e})") from None
        self.max_length = int(max_length)
        self.prefix = prefix
        self.add_bos, self.add_eos = add_bos, add_eos
        self.bos_token_id = self.sp.bos_id() if self.sp.bos_id() >= 0 else 1
        self.eos_token_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 2
        self.unk_token_id = self.sp.unk_id()
        self.pad_token_id = 0  # the reference sets pad_token=' ', which is not a piece, so it maps to id 0
        specials = {"<s>": self.bos_token_id, "</s>": self.eos_token_id, "<unk>": self.unk_token_id}
        self._specials = specials
        self._split = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")

    @property
    def context_length(self) -> int:
        return self.max_length

    @property
    def vocab_size(self) -> int:
        return self.sp.GetPieceSize()

    def encode(self, text: str, add_prefix: bool = True) -> list[int]:
        """Ids of one text: BOS, the prefixed text, EOS (not truncated, not padded)."""
        if not isinstance(text, str):
            raise TypeError(f"texts must be str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate (text read with surrogateescape): sentencepiece's
            # own error is a pybind11 cast message naming nothing
            raise ValueError(f"text {text[:40]!r} is not valid Unicode ({e.reason} at position {e.start})") from None
        ids = []
        for chunk in self._split.split((self.prefix if add_prefix else "") + text):
            if not chunk:
                continue
            if chunk in self._specials:
                ids.append(self._specials[chunk])
            else:
                ids.extend(self.sp.EncodeAsIds(chunk))
        return ([self.bos_token_id] if self.add_bos else []) + ids + ([self.eos_token_id] if self.add_eos else [])

    def decode(self, ids: Union[Sequence[int], torch.Tensor]) -> str:
        """Text of one id sequence, without special tokens and padding (the prefix is kept)."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        skip = {self.pad_token_id, self.bos_token_id, self.eos_token_id}
        return self.sp.DecodeIds([int(i) for i in ids if int(i) not in skip])

    def truncate(self, ids: list[int], max_length: int) -> list[int]:
        """Cut to ``max_length`` keeping BOS first and EOS last (HF truncates the text between them)."""
        if len(ids) <= max_length:
            return ids
        tail = [self.eos_token_id] if self.add_eos else []
        return ids[: max_length - len(tail)] + tail

    def __call__(self, texts: Union[str, Sequence[str]], context_length: int | None = None) -> torch.Tensor:
        """``(len(texts), context_length)`` int64 ids of a text or a list/tuple of texts.

        Raises ``TypeError`` for anything but a ``str`` or a list/tuple of ``str`` (a dict, bytes, numbers),
        ``ValueError`` for a text that is not valid Unicode and for a ``context_length`` too short to hold
        BOS, the prefix, EOS and one token of text (shorter, every text became the same ids).
        """
        texts = check_texts(texts)
        length = self.max_length if context_length is None else context_length
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError(f"context_length must be an int, got {type(length).__name__}")
        fixed = len(self.encode(""))  # BOS + the prefix's tokens + EOS
        if length < fixed + 1:
            raise ValueError(f"context_length={length} leaves no room for text tokens (BOS, the prefix "
                             f"{self.prefix!r} and EOS take {fixed}; give at least {fixed + 1})")
        out = torch.zeros(len(texts), length, dtype=torch.long)  # pad id 0, right padding
        for i, text in enumerate(texts):
            ids = self.truncate(self.encode(text), length)
            out[i, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        return out

    def __repr__(self) -> str:
        return (f"InternVLTokenizer({self.model_file!r}, max_length={self.max_length}, prefix={self.prefix!r}, "
                f"vocab_size={self.vocab_size})")


def get_tokenizer(path: Union[str, os.PathLike], max_length: int = DEFAULT_MAX_LENGTH,
                  prefix: Optional[str] = DEFAULT_PREFIX) -> InternVLTokenizer:
    """Tokenizer from a model directory holding ``tokenizer.model`` or from the ``.model`` file itself.
    ``prefix``: glued before every text (``''`` or ``None``: none; anything but a str is a ``TypeError``)."""
    path = os.fspath(path)
    model_file = os.path.join(path, "tokenizer.model") if os.path.isdir(path) else path
    if not os.path.isfile(model_file):
        where = f"{path} has no tokenizer.model" if os.path.isdir(path) else f"{path}: no such tokenizer file"
        raise FileNotFoundError(where)
    return InternVLTokenizer(model_file, max_length=max_length, prefix=prefix)
