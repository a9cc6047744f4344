"""A real, self-contained image-caption set for the demo and tests: scikit-learn's handwritten digits (1,797
8×8 scans shipped with scikit-learn), upscaled, captioned in English, French and Chinese, plus a small
SentencePiece tokenizer trained on those captions (LLaMA ids: unk 0, bos 1, eos 2; no pad piece).

Layout written by :func:`make_digit_pairs` (``out``):

* ``images/{train,val}/<digit>/<n>.png`` — dark ink on white, ``image_size`` px (bicubic);
* ``train.json`` — BLIP / COCO-Karpathy training list ``[{"image", "caption", "image_id"}]``, one caption per
  language per image (``image_id``: ``digits_<n>`` per scan, or ``digit_<d>`` per digit);
* ``val.json`` — evaluation list ``[{"image", "caption": [...]}]`` of every held-out image;
* ``val_10.json`` — the first held-out image of each digit (exact-image recall is meaningful there: the
  captions name only the digit);
* ``tokenizer.model`` — the SentencePiece model; ``meta.json`` — counts, templates, digit names.
"""
from __future__ import annotations

import json
import os
import random
from typing import Optional

import numpy as np

from internvit.fileio import atomic_write

NUMBERS = {
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"],
    "fr": ["zéro", "un", "deux", "trois", "quatre", "cinq", "six", "sept", "huit", "neuf"],
    "zh": ["零", "一", "二", "三", "四", "五", "六", "七", "八", "九"],
}
TEMPLATES = {
    "en": ["a handwritten digit {}", "the number {} written by hand", "a scan of a handwritten {}",
           "a photo of the digit {}"],
    "fr": ["un chiffre {} écrit à la main", "le nombre {}", "une image du chiffre {}"],
    "zh": ["手写数字{}", "一张数字{}的图片", "手写的{}"],
}
MARKER = "meta.json"


def captions_of(digit: int, rng: random.Random) -> list[str]:
    """One caption per language for ``digit``, templates drawn by ``rng``."""
    return [rng.choice(TEMPLATES[lang]).format(NUMBERS[lang][digit]) for lang in TEMPLATES]


def all_captions() -> list[str]:
    """Every caption the templates can produce (the tokenizer's training text)."""
    return [t.format(NUMBERS[lang][d]) for lang in TEMPLATES for t in TEMPLATES[lang] for d in range(10)]


def train_tokenizer(path: str, texts: list[str], vocab_size: int = 256) -> str:
    """Train a SentencePiece unigram model on ``texts`` (and their ``'summarize:'`` forms) → ``path``.

    At most ``vocab_size`` pieces (fewer when the text does not support that many); ids 0/1/2 are
    ``<unk>``/``<s>``/``</s>`` as in LLaMA. Deterministic (one thread). Returns ``path``.
    """
    import io

    import sentencepiece as spm

    from retrieval.evaluate import pre_caption

    lines = []
    for t in texts:
        c = pre_caption(t)
        lines += [c, "summarize:" + c]
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type="unigram", character_coverage=1.0, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        num_threads=1, minloglevel=2, user_defined_symbols=["summarize:"])
    with open(path, "wb") as f:
        f.write(buf.getvalue())
    return path


def _render(pixels: np.ndarray, size: int):
    from PIL import Image

    ink = (255 - pixels.reshape(8, 8) * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
    return Image.fromarray(ink, mode="L").resize((size, size), Image.BICUBIC).convert("RGB")


def make_digit_pairs(out: str, *, image_size: int = 56, val_fraction: float = 0.25, seed: int = 0,
                     vocab_size: int = 256, per_class: Optional[int] = None, image_ids: str = "image",
                     overwrite: bool = False) -> dict:
    """Write the digits image-caption set (see the module doc) to ``out``; returns the ``meta.json`` dict.

    ``per_class`` keeps only that many scans of each digit (small test sets). ``image_ids``: ``'image'`` gives
    every scan its own id (``digits_<n>``: its captions are its positives); ``'digit'`` gives all scans of a
    digit one id (``digit_<d>``): the captions name only the digit, so every scan of it is a true positive of
    every caption of it, which the recipe's multi-positive targets then use (and ITM negatives are then
    always another digit).

    An existing ``out`` made by this function with the same settings is kept as it is; one made with other
    settings is replaced only with ``overwrite``; any other existing path is refused (``FileExistsError``).
    """
    from sklearn.datasets import load_digits

    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    if image_ids not in ("image", "digit"):
        raise ValueError(f"image_ids must be 'image' or 'digit', got {image_ids!r}")
    if per_class is not None and per_class < 2:
        raise ValueError(f"per_class must be >= 2 (one train and one val scan), got {per_class}")
    if image_size < 8:
        raise ValueError(f"image_size must be >= 8, got {image_size}")
    out = os.path.abspath(out)
    params = dict(image_size=image_size, val_fraction=val_fraction, seed=seed, vocab_size=vocab_size,
                  per_class=per_class, image_ids=image_ids)
    if os.path.exists(out):
        marker = os.path.join(out, MARKER)
        if not os.path.isfile(marker):
            raise FileExistsError(f"{out} exists and was not made by this tool: not replacing it")
        with open(marker, encoding="utf-8") as f:
            previous = json.load(f)
        if previous.get("params") == params:
            return previous  # the same set, made before (deterministic: nothing to replace)
        if not overwrite:
            raise FileExistsError(f"{out} holds a digits set made with other settings (pass --overwrite to "
                                  f"replace it)")
    digits = load_digits()
    rng = np.random.default_rng(seed)
    crng = random.Random(seed)
    with atomic_write(out, is_dir=True) as tmp:  # replaces a previous set only once the new one is complete
        return _write(tmp, digits, rng, crng, image_size, val_fraction, per_class, image_ids, vocab_size, params)


def _write(tmp, digits, rng, crng, image_size, val_fraction, per_class, image_ids, vocab_size, params) -> dict:
    train_items, val_items, val_10 = [], [], {}
    for d in range(10):
        idx = np.flatnonzero(digits.target == d)
        rng.shuffle(idx)
        if per_class is not None:
            idx = idx[:per_class]
        n_val = max(1, int(round(len(idx) * val_fraction)))
        for split, chosen in (("val", idx[:n_val]), ("train", idx[n_val:])):
            folder = os.path.join(tmp, "images", split, str(d))
            os.makedirs(folder, exist_ok=True)
            for n in sorted(chosen.tolist()):
                rel = f"images/{split}/{d}/{n:04d}.png"
                _render(digits.data[n], image_size).save(os.path.join(tmp, rel))
                caps = captions_of(d, crng)
                if split == "train":
                    image_id = f"digits_{n}" if image_ids == "image" else f"digit_{d}"
                    train_items += [dict(image=rel, caption=c, image_id=image_id) for c in caps]
                else:
                    val_items.append(dict(image=rel, caption=caps))
                    val_10.setdefault(d, dict(image=rel, caption=caps))
    for name, data in (("train.json", train_items), ("val.json", val_items),
                       ("val_10.json", [val_10[d] for d in range(10)])):
        with open(os.path.join(tmp, name), "w", encoding="utf-8") as f:
            json.dump(data, f, ensure_ascii=False, indent=0)
    train_tokenizer(os.path.join(tmp, "tokenizer.model"), all_captions(), vocab_size)
    import sentencepiece as spm

    meta = dict(source="sklearn.datasets.load_digits", params=params,
                num_train_images=len(train_items) // len(TEMPLATES), num_train_captions=len(train_items),
                num_val_images=len(val_items), languages=list(TEMPLATES), numbers=NUMBERS, templates=TEMPLATES,
                vocab_size=spm.SentencePieceProcessor(model_file=os.path.join(tmp, "tokenizer.model"))
                .GetPieceSize())
    with open(os.path.join(tmp, MARKER), "w", encoding="utf-8") as f:
        json.dump(meta, f, ensure_ascii=False, indent=2)
    return meta


def label_of(path: str) -> Optional[int]:
    """The digit of an image written by :func:`make_digit_pairs` (its parent folder), else ``None``."""
    name = os.path.basename(os.path.dirname(os.fspath(path)))
    return int(name) if name.isdigit() else None


__all__ = ["NUMBERS", "TEMPLATES", "all_captions", "captions_of", "label_of", "make_digit_pairs",
           "train_tokenizer"]
