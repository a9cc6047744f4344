"""Retrieval evaluation: image↔text recall@k on Flickr30K / COCO (Karpathy-style JSON), exactly and through
a FAISS index, and an index-quality report (ANN recall vs exact, latency, QPS, bytes per vector).

Recall follows CLIP_benchmark / the InternVL protocol (reference-spec §8): captions cleaned by
:func:`pre_caption`, L2-normalised embeddings, score = text·image, a query counts as a hit at k if any of its
positives is in the top k. ``image_retrieval_recall@k`` is text → image, ``text_retrieval_recall@k`` image → text.

Ties (equal scores: duplicate captions or images) are counted pessimistically, by score and never by id or by
the order a search returned them in: a query's rank is 1 + the number of non-positives scoring at least as high
as its best positive. The exact numbers and those through a Flat index are therefore the same (numpy's stable
sort puts the lower id first on a tie, faiss' ``IndexFlatIP`` the higher one).
"""
from __future__ import annotations

import logging
import numbers
import os
import re
import tempfile
import time
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np

from .embeddings import EmbeddingSource
from .index import (
    _drop_self,
    build_index,
    exact_search,
    indexed_source,
    new_index,
    open_index,
    parse_memory,
    set_search_params,
)
from .index_plan import check_index_key
from .search import _Queries

logger = logging.getLogger("retrieval")


class _QueryRules(_Queries):
    """The query validation of :class:`~retrieval.search.Retriever` (``_Queries._prepare``: shape, dim,
    NaN / inf, all-zero queries of a normalised index, normalisation) for an index opened without one."""

    def __init__(self, manifest: dict, index_dir: str) -> None:
        self.manifest, self.index_dir = manifest, index_dir


def knn_recall(found: np.ndarray, truth: np.ndarray, k: int) -> dict:
    """ANN quality against exact neighbours, as faiss / autofaiss define it, per query then averaged.

    ``recall@k`` (k-recall@k): |found[:k] ∩ truth[:k]| / min(k, retrievable neighbours), the denominator being
    the number of exact neighbours the query has (``truth`` entries other than ``-1``), so k larger than the
    collection does not cap the score below 1. ``1-recall@k``: the exact nearest neighbour is in found[:k].
    ``-1`` ("no result") is never a hit; a query with no retrievable neighbour at all is not counted
    (``n_evaluated`` says how many were). ``ValueError`` when no query has one."""
    recalls, ones = [], []
    for f, t in zip(found, truth):
        t = [int(x) for x in t[:k] if x >= 0]
        if not t:
            continue
        f = {int(x) for x in f[:k] if x >= 0}
        recalls.append(len(f & set(t)) / len(t))
        ones.append(t[0] in f)
    if not recalls:
        raise ValueError("no query has a neighbour in the index to retrieve (a 1-vector index searched "
                         "leave-one-out has none): give held-out queries")
    return {f"recall@{k}": float(np.mean(recalls)), f"1-recall@{k}": float(np.mean(ones)),
            "n_evaluated": len(recalls)}

_PUNCT = re.compile(r"[.!\"()*#:;~]")
_RUNS = re.compile(r"\s{2,}")


def pre_caption(caption: str, max_words: int = 50) -> str:
    """The protocol's caption clean-up, exactly as reference-spec-2 §2.4 / reference-spec §8 state it.

    In order: lower-case; each of ``. ! " ( ) * # : ; ~`` becomes a space; every run of two or more
    whitespace characters becomes one space (a single tab or newline is kept); a trailing newline, then
    surrounding spaces, are removed; only the first ``max_words`` space-separated words are kept.
    """
    caption = _PUNCT.sub(" ", str(caption).lower())
    caption = _RUNS.sub(" ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


class AnnotationEntry(NamedTuple):
    """One entry of an annotation file: ``where`` names it in messages (``'entry 3'``, ``'line 5'``,
    ``'images[2]'``), ``image`` is the path as written, ``captions`` the raw caption strings, ``image_id`` the
    explicit image id as a string (``None`` when the entry gives none)."""

    where: str
    image: str
    captions: list
    image_id: Optional[str]


def parse_splits(split: Union[None, str, Sequence[str]]) -> Optional[frozenset]:
    """Karpathy split names to keep: ``None`` (all), one name, a comma-separated string (``'train,restval'``)
    or a sequence of names. ``ValueError`` for an empty selection or a name that is not a string."""
    if split is None:
        return None
    names = split.split(",") if isinstance(split, str) else list(split)
    if not all(isinstance(s, str) for s in names):
        raise ValueError(f"split must be a name, a comma-separated string or a sequence of names, got {split!r}")
    out = frozenset(s.strip() for s in names if s.strip())
    if not out:
        raise ValueError(f"split names no split: {split!r}")
    return out


def _caption_list(path: str, where: str, value, key: str) -> list:
    """``value`` (a string or a list of strings) as a list; ``ValueError`` naming the file and the entry for
    anything else (``null``, a number: they used to become the text 'none' / '3') and for a blank string (a
    text query or training positive without text; an index build skips such captions, evaluation counted
    them as queries)."""
    caps = value if isinstance(value, list) else [value]
    for c in caps:
        if not isinstance(c, str):
            raise ValueError(f"{path}: {where}: {key} {c!r} is not a string")
        if not c.strip():
            raise ValueError(f"{path}: {where}: {key} {c!r} is blank")
    return caps


def _explicit_id(path: str, where: str, value) -> Optional[str]:
    """An entry's ``image_id`` as a string (whole, e.g. ``'coco_391895'``); ``None`` when absent."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ValueError(f"{path}: {where}: image_id {value!r} is not a string or an integer")
    return str(value)


class Entries(list):
    """The entries of an annotation file; ``has_splits``: whether its format has splits (Karpathy's
    ``dataset_*.json``), i.e. whether a ``split`` selected anything (other formats ignore it)."""

    has_splits = False


def split_note(entries, split) -> str:
    """``" in split 'test'"`` for messages about a file whose format has splits, else ``""``."""
    return f" in split {split!r}" if split and getattr(entries, "has_splits", False) else ""


def _entries_json(path: str, data, split: Union[None, str, Sequence[str]]) -> list[AnnotationEntry]:
    splits = parse_splits(split)
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        entries, restval = Entries(), 0
        entries.has_splits = True
        for n, im in enumerate(data["images"]):
            where = f"images[{n}]"
            if not isinstance(im, dict) or "filename" not in im:
                raise ValueError(f"{path}: {where} has no 'filename'")
            restval += im.get("split") == "restval"
            if splits is not None and "split" in im and im["split"] not in splits:
                continue
            if not isinstance(im["filename"], str) or not isinstance(im.get("filepath", ""), str):
                raise ValueError(f"{path}: {where}: image path {im['filename']!r} is not a string")
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            sentences = im.get("sentences", [])
            if not isinstance(sentences, list):
                raise ValueError(f"{path}: {where}: 'sentences' is not a list")
            raw = [s.get("raw") if isinstance(s, dict) else s for s in sentences]
            entries.append(AnnotationEntry(where, rel, _caption_list(path, where, raw, "sentence"),
                                           _explicit_id(path, where, im.get("imgid"))))
        if splits == frozenset({"train"}) and restval:
            logger.warning("%s: %d images of the 'restval' split are left out (Karpathy's standard training "
                           "set is train + restval: give split='train,restval' to include them)", path, restval)
        return entries
    if isinstance(data, list):
        entries = Entries()
        for n, e in enumerate(data):
            where = f"entry {n}"
            if not isinstance(e, dict) or "image" not in e or "caption" not in e:
                raise ValueError(f"{path}: {where} is not an {{'image', 'caption'}} object")
            entries.append(AnnotationEntry(where, e["image"], _caption_list(path, where, e["caption"], "caption"),
                                           _explicit_id(path, where, e.get("image_id"))))
        return entries
    raise ValueError(f"{path}: unknown annotation format (expected Karpathy's {{'images': [...]}} or a list "
                     f"of {{'image', 'caption'}})")


def _entries_txt(path: str) -> list[AnnotationEntry]:
    """clip_benchmark's Flickr30K text format (reference-spec-2 §2.4): a header line, then one
    ``<id>.jpg,<caption>`` line per caption, split at the first ``.jpg,``."""
    entries = Entries()
    with open(path, encoding="utf-8-sig") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 or not line.strip():
                continue
            image, sep, caption = line.partition(".jpg,")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected '<id>.jpg,<caption>', got {line[:60]!r}")
            if not caption.strip():
                raise ValueError(f"{path}:{lineno}: caption {caption.rstrip(chr(13) + chr(10))!r} is blank")
            entries.append(AnnotationEntry(f"line {lineno}", image + ".jpg", [caption], None))
    return entries


def read_entries(path: str, split: Union[None, str, Sequence[str]] = None, *,
                 format: Optional[str] = None) -> list[AnnotationEntry]:
    """The entries of an annotation file, for training and evaluation alike. ``format``: ``'flickr_txt'``,
    ``'coco_json'`` or ``None`` (by extension: ``.txt`` is Flickr text, anything else JSON). ``split`` filters
    Karpathy's ``dataset_*.json`` (see :func:`parse_splits`); with exactly ``'train'`` and ``restval`` images
    in the file, a warning says they are left out."""
    from internvit.cli import read_json

    if format is None:
        format = "flickr_txt" if path.lower().endswith(".txt") else "coco_json"
    if format == "flickr_txt":
        return _entries_txt(path)
    return _entries_json(path, read_json(path), split)


def resolve_image(image, root: str, path: str = "", where: str = "") -> str:
    """The normalised path of an image named in an annotation: ``os.path.normpath`` of ``image`` resolved
    against ``root`` (kept when absolute), so ``./c.png``, ``x//c.png`` and ``c.png`` spellings meet.
    ``ValueError`` naming the file and entry when ``image`` is not a string."""
    if not isinstance(image, str):
        raise ValueError(f"{path}: {where}: image path {image!r} is not a string")
    return os.path.normpath(image if os.path.isabs(image) else os.path.join(root, image))


def image_identities(path: str, entries: Sequence[AnnotationEntry], root: str, *,
                     one_image_per_id: bool) -> tuple[list[str], list[int]]:
    """``(normalised image paths, image ids)`` of ``entries``, one each: the one rule of image identity shared
    by training (:func:`retrieval.finetune.load_pairs`) and evaluation (:func:`load_annotations`).

    Rule: an image's identity is its explicit ``image_id`` (the whole string: ``coco_5`` and ``flickr_5`` are
    two images) when the annotation gives one — an entry without one naming a path that another entry gives
    an id to takes that id — else its normalised path (:func:`resolve_image`). Identities are numbered
    densely ``0..N-1`` in order of first appearance. One path with two different ``image_id`` s is
    ambiguous: ``ValueError`` naming both entries. One ``image_id`` on several paths declares them one
    identity (true positives of each other's captions, as the demo's per-digit ids do): allowed unless
    ``one_image_per_id`` (evaluation, whose gallery holds one image per identity), where it is a
    ``ValueError`` naming both entries.
    """
    fulls = [resolve_image(e.image, root, path, e.where) for e in entries]
    id_of_path: dict[str, tuple[str, str]] = {}
    path_of_id: dict[str, tuple[str, str]] = {}
    for e, full in zip(entries, fulls):
        if e.image_id is None:
            continue
        seen_id, seen_at = id_of_path.setdefault(full, (e.image_id, e.where))
        if seen_id != e.image_id:
            raise ValueError(f"{path}: {seen_at} and {e.where} give the same image {full} two image_ids "
                             f"({seen_id!r} and {e.image_id!r}): ambiguous")
        seen_path, seen_at = path_of_id.setdefault(e.image_id, (full, e.where))
        if one_image_per_id and seen_path != full:
            raise ValueError(f"{path}: {seen_at} and {e.where} give image_id {e.image_id!r} to two images "
                             f"({seen_path} and {full}): ambiguous (an evaluation gallery holds one image per id)")
    numbers: dict[tuple[str, str], int] = {}
    ids = []
    for full in fulls:
        given = id_of_path.get(full)
        key = ("id", given[0]) if given is not None else ("path", full)
        ids.append(numbers.setdefault(key, len(numbers)))
    return fulls, ids


def group_by_image(path: str, entries: Sequence[AnnotationEntry], root: str,
                   max_words: int = 50) -> tuple[list[str], list[list[str]]]:
    """``(images, captions per image)``: entries grouped by :func:`image_identities` (one image per id),
    images in order of first appearance, captions cleaned by :func:`pre_caption` in file order. An image
    without captions stays (a gallery distractor, no image → text query)."""
    fulls, ids = image_identities(path, entries, root, one_image_per_id=True)
    images: list[str] = []
    groups: list[list[str]] = []
    for e, full, i in zip(entries, fulls, ids):
        if i == len(images):
            images.append(full)
            groups.append([])
        groups[i].extend(pre_caption(c, max_words) for c in e.captions)
    return images, groups


def load_annotations(path: str, image_root: Optional[str] = None, *,
                     split: Union[None, str, Sequence[str]] = "test", max_words: int = 50,
                     format: Optional[str] = None) -> tuple[list[str], list[str], list[int]]:
    """``(image_paths, captions, text_to_image)`` from a retrieval annotation file.

    Accepted: Karpathy's ``dataset_{flickr30k,coco}.json`` (``{'images': [{'filename', 'filepath'?, 'split',
    'sentences': [{'raw'}], 'imgid'?}]}``, filtered to ``split``: a name, ``'train,restval'`` or a sequence),
    the BLIP / CLIP_benchmark list ``[{'image': path, 'caption': [..] or str, 'image_id'?}]`` (one entry per
    image, or one per caption), or clip_benchmark's Flickr30K ``.txt`` (``<id>.jpg,<caption>`` lines after a
    header). Entries are grouped by image identity (:func:`image_identities`, the rule training uses): an
    image listed several times is one gallery item holding all its captions (images keep the order of their
    first appearance, captions their file order). An image without captions stays in the gallery as a
    distractor (it is no image → text query). Paths resolve against ``image_root`` (default: the annotation
    file's folder). Captions go through :func:`pre_caption`. Raises ``ValueError`` naming the file for an
    unknown format, a malformed entry (a caption or image path that is not a string names the entry), an
    ambiguous identity, or no captions at all.
    """
    entries = read_entries(path, split, format=format)
    root = image_root or os.path.dirname(os.path.abspath(path))
    images, groups = group_by_image(path, entries, root, max_words)
    captions = [c for caps in groups for c in caps]
    t2i = [i for i, caps in enumerate(groups) for _ in caps]
    if not captions:
        raise ValueError(f"{path}: no images with captions" + split_note(entries, split))
    return images, captions, t2i


def _faiss_search(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(queries, k)`` in calls of fewer than faiss' ``distance_compute_blas_threshold`` queries,
    so that a flat (brute-force) index always scores through the same float32 kernel, one query-item pair at a
    time: faiss scores a call of more queries with BLAS (another summation order), which can make two near-tied
    items tie in one call and not in another."""
    import faiss

    queries = np.ascontiguousarray(queries, dtype=np.float32)
    step = max(1, int(getattr(faiss.cvar, "distance_compute_blas_threshold", 20)) - 1)
    if len(queries) <= step:
        return index.search(queries, k)
    parts = [index.search(queries[s:s + step], k) for s in range(0, len(queries), step)]
    return np.concatenate([d for d, _ in parts]), np.concatenate([i for _, i in parts])


def _exact_ranks(queries: np.ndarray, base: np.ndarray, positives: Sequence[set], max_rank: int) -> np.ndarray:
    """Rank of each query's best positive over the whole ``base`` (1 + non-positives scoring >= it; ties
    counted against the query) where it is at most ``max_rank``; ``inf`` beyond it (recall@k needs no more
    for k <= ``max_rank``) and for a query without positives. Scores are those of faiss' brute-force
    ``IndexFlatIP`` in float32 (the kernel a Flat index searches with, :func:`_faiss_search`), so a Flat index
    reproduces these ranks exactly, near-ties within one float32 rounding included, and identical vectors score
    identically wherever they sit. The top ``max_rank`` are listed with every item tied with the last one
    (:func:`_search_closed`): a listed positive then has every item scoring at least as high listed with it,
    and a query none of whose positives is listed has ``max_rank`` non-positives scoring above them all.
    (Scoring every item of the base, as this did before, cost a sort of the whole base per query: 4.5 s for
    2,000 queries over 5,000 items here.)"""
    import faiss

    if len(queries) == 0 or len(base) == 0:
        return np.full(len(queries), np.inf)
    flat = faiss.IndexFlatIP(base.shape[1])
    flat.add(np.ascontiguousarray(base, dtype=np.float32))
    scores, ids = _search_closed(flat, np.asarray(queries), int(max_rank))
    ranks = _list_ranks(ids, scores, positives)
    ranks[ranks > max_rank] = np.inf  # a tie group read whole can rank a positive further down: not needed
    return ranks


def _list_ranks(ids: np.ndarray, scores: Optional[np.ndarray], positives: Sequence[set]) -> np.ndarray:
    """Rank of each query's best positive in a returned list (``-1`` ids = no result, skipped). With
    ``scores``: 1 + the listed non-positives scoring >= the best listed positive (the tie rule of
    :func:`_exact_ranks`; exact whenever the list holds every item scoring that high); without: its position
    among the valid ids. ``inf`` when no positive is listed."""
    ranks = np.full(len(ids), np.inf)
    for r, (row, pos) in enumerate(zip(ids, positives)):
        valid = row >= 0
        row = row[valid]
        is_pos = np.fromiter((int(i) in pos for i in row), bool, len(row))
        if not is_pos.any():
            continue
        if scores is None:
            ranks[r] = 1 + int(np.argmax(is_pos))
        else:
            sc = np.asarray(scores[r])[valid]
            best = sc[is_pos].max()
            ranks[r] = 1 + int(((sc >= best) & ~is_pos).sum())
    return ranks


def _recall_from_ranks(ranks: np.ndarray, positives: Sequence[set], ks: Sequence[int]) -> dict:
    """recall@k = share of the queries that have a positive whose rank is <= k (queries without a positive
    are not counted: there is nothing to retrieve)."""
    has = np.array([bool(p) for p in positives], bool)
    if not has.any():
        raise ValueError("no query has a positive to retrieve")
    return {k: float(np.mean(ranks[has] <= k)) for k in ks}


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10), *, image_topk: Optional[np.ndarray] = None,
                     text_topk: Optional[np.ndarray] = None, image_topk_scores: Optional[np.ndarray] = None,
                     text_topk_scores: Optional[np.ndarray] = None) -> dict:
    """CLIP-style recall@k. Exact (dot products) unless ranked lists are given: ``image_topk`` (texts × K,
    image ids per text query) and ``text_topk`` (images × K, text ids per image query), e.g. from an index,
    ``-1`` = no result (a miss). With their ``*_scores``, ties are counted as the exact path counts them (see
    the module docstring): a list must then hold every item scoring as high as the k-th one
    (:func:`_search_closed`); without scores the list order is the ranking. An image without captions is not
    an image → text query. k larger than the gallery: every query with a positive is a hit."""
    t2i = np.asarray(text_to_image)
    if t2i.ndim != 1 or len(t2i) != len(text_emb) or (len(t2i) and (t2i.min() < 0 or t2i.max() >= len(image_emb))):
        raise ValueError(f"text_to_image must give one image id in [0, {len(image_emb)}) per caption "
                         f"({len(text_emb)} captions)")
    if not ks or any(isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    i2t: list[set] = [set() for _ in range(len(image_emb))]
    for t, i in enumerate(t2i):
        i2t[int(i)].add(t)
    t_pos = [{int(i)} for i in t2i]
    if image_topk is None:
        image_ranks = _exact_ranks(text_emb, image_emb, t_pos, max(ks))
    else:
        image_ranks = _list_ranks(np.asarray(image_topk), image_topk_scores, t_pos)
    if text_topk is None:
        text_ranks = _exact_ranks(image_emb, text_emb, i2t, max(ks))
    else:
        text_ranks = _list_ranks(np.asarray(text_topk), text_topk_scores, i2t)
    ir = _recall_from_ranks(image_ranks, t_pos, ks)
    tr = _recall_from_ranks(text_ranks, i2t, ks)
    out = {f"image_retrieval_recall@{k}": ir[k] for k in ks}
    out.update({f"text_retrieval_recall@{k}": tr[k] for k in ks})
    out["mean_recall"] = float(np.mean(list(ir.values()) + list(tr.values())))
    return out


def trivial_recall_keys(ks: Sequence[int], n_images: int, n_texts: int, *, who: str) -> set:
    """The recall@k keys that are 1.0 whatever the model: k at least the gallery (text → image over
    ``n_images`` images, image → text over ``n_texts`` captions). They are left out of a report and of its
    ``mean_recall`` (as classification's ``Accuracy`` leaves out a top-k not below the number of classes), with
    a ``UserWarning`` naming them (``who``: the reporter, e.g. ``'RetrievalRecall'``)."""
    import warnings

    left = [f"image_retrieval_recall@{k}" for k in ks if k >= n_images]
    left += [f"text_retrieval_recall@{k}" for k in ks if k >= n_texts]
    if left:
        warnings.warn(f"{who}: {', '.join(left)} not reported (k >= the gallery: {n_images} images, {n_texts} "
                      f"captions; every query is a hit), nor averaged into mean_recall; choose ks smaller than "
                      f"the gallery", UserWarning, stacklevel=3)
    return set(left)


def without_keys(recall: dict, keys: set) -> dict:
    """``recall`` (a :func:`retrieval_recall` result) without ``keys``, its ``mean_recall`` over the rest."""
    kept = {k: v for k, v in recall.items() if k != "mean_recall" and k not in keys}
    if kept:
        kept["mean_recall"] = float(np.mean(list(kept.values())))
    return kept


def _search_closed(index, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, ids)`` of the top ``k`` and at least one more, extended (doubling, per query) until the
    items tied with the k-th score are all listed or the index is exhausted, so that a score-based rank
    (:func:`_list_ranks`) up to ``k`` is exact whatever order the index returns ties in. Rows are padded with
    ``-1`` ids / ``-inf`` scores."""
    n = int(index.ntotal)
    width = min(k + 1, n)
    d, i = _faiss_search(index, queries, width)
    rows = {r: (d[r], i[r]) for r in range(len(queries))}
    while width < n:
        open_rows = [r for r, (dr, ir) in rows.items()
                     if len(ir) > k and ir[-1] >= 0 and dr[k - 1] == dr[-1]]
        if not open_rows:
            break
        width = min(2 * width, n)
        d2, i2 = _faiss_search(index, queries[open_rows], width)
        for j, r in enumerate(open_rows):
            rows[r] = (d2[j], i2[j])
    width = max(len(ir) for _, ir in rows.values())
    scores = np.full((len(queries), width), -np.inf, np.float32)
    ids = np.full((len(queries), width), -1, np.int64)
    for r, (dr, ir) in rows.items():
        scores[r, :len(dr)], ids[r, :len(ir)] = np.where(ir >= 0, dr, -np.inf), ir
    return scores, ids


def check_eval_settings(encoder, n_images: int, n_texts: int, *, ks: Sequence[int] = (1, 5, 10),
                        index_key: Optional[str] = None, max_index_memory: Union[str, int] = "4G",
                        target_recall: float = 0.95, batch_size: int = 32, num_workers: int = 0) -> None:
    """Every setting of :func:`evaluate_retrieval` checked before anything is embedded; ``ValueError`` names
    the bad one (an ``index_key`` faiss cannot build at the encoder's dim, or with more inverted lists than
    the image or caption index has vectors)."""
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    if min(ks) >= max(n_images, n_texts):
        raise ValueError(f"ks={list(ks)}: every k is at least the gallery ({n_images} images, {n_texts} captions): "
                         f"each recall would be 1.0 for any model; choose ks smaller than the gallery")
    for name, v, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if not 0 < float(target_recall) <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    parse_memory(max_index_memory)
    if index_key:
        new_index(index_key, int(encoder.dim))  # ValueError naming the key when faiss cannot build it
        for what, n in sorted((("image", n_images), ("caption", n_texts)), key=lambda t: t[1]):
            try:  # the checks build_index makes (check_index_key: lists, PQ / OPQ / PCA training, HNSW M, ...)
                check_index_key(index_key, n, int(encoder.dim))
                # a non-exact index holds out its tuning queries (n_tune_queries=min(1000, n)) before training
                held = 0 if str(index_key).strip() == "Flat" else min(min(1000, n), max(n // 10, 1))
                if held:
                    try:
                        check_index_key(index_key, n - held, int(encoder.dim))
                    except ValueError as e:
                        raise ValueError(f"{e} ({held} of the {n} vectors are held out to tune the search "
                                         f"parameters)") from None
            except ValueError as e:
                raise ValueError(f"{e} (the {what} index of this evaluation)") from None


def evaluate_retrieval(
    encoder,
    annotations: str,
    image_root: Optional[str] = None,
    *,
    split: Optional[str] = "test",
    ks: Sequence[int] = (1, 5, 10),
    index_key: Optional[str] = None,
    max_index_memory: Union[str, int] = "4G",
    target_recall: float = 0.95,
    work_dir: Optional[str] = None,
    batch_size: int = 32,
    num_workers: int = 0,
    progress: bool = True,
) -> dict:
    """Image ↔ text recall@k of ``encoder`` on an annotation file, exactly and through FAISS indexes.

    Two indexes are built in ``work_dir`` (a temporary folder by default): images (text → image) and captions
    (image → text), with ``index_key`` or the automatic choice. Returns ``{'exact': {...}, 'index': {...},
    'index_keys': {...}, 'n_images', 'n_texts'}``; the gap between the two shows what the ANN index costs. A
    recall@k with k at least the gallery is left out, with a warning (:func:`trivial_recall_keys`);
    ``ValueError`` (:func:`check_eval_settings`) when every k is.
    """
    images, captions, t2i = load_annotations(annotations, image_root, split=split)
    check_eval_settings(encoder, len(images), len(captions), ks=ks, index_key=index_key,
                        max_index_memory=max_index_memory, target_recall=target_recall, batch_size=batch_size,
                        num_workers=num_workers)
    trivial = trivial_recall_keys(ks, len(images), len(captions), who="recall")
    res = encoder.embed_images(images, batch_size=batch_size, num_workers=num_workers, progress=progress,
                               strict=True)
    img = res.features
    txt = encoder.encode_texts(captions)
    exact = retrieval_recall(img, txt, t2i, ks)
    kmax = max(ks)
    tmp = None
    if work_dir is None:
        tmp = tempfile.TemporaryDirectory(prefix="eval-retrieval-")
        work_dir = tmp.name
    try:
        keys, topk = {}, {}
        for name, base, queries in (("image", img, txt), ("text", txt, img)):
            out = os.path.join(work_dir, f"{name}_index")
            m = build_index(base, out, index_key=index_key, max_index_memory=max_index_memory,
                            target_recall=target_recall, k=min(kmax, len(base)), encoder_info=encoder.info(),
                            n_tune_queries=min(1000, len(base)), progress=progress, overwrite=True)
            index, _ = open_index(out)
            topk[name] = _search_closed(index, np.ascontiguousarray(queries, dtype=np.float32), kmax)
            keys[name] = {"index_key": m["index_key"], "search_params": m["search_params"],
                          "tuned_recall": m["tuning"]["recall"]}
        via_index = retrieval_recall(img, txt, t2i, ks, image_topk=topk["image"][1], text_topk=topk["text"][1],
                                     image_topk_scores=topk["image"][0], text_topk_scores=topk["text"][0])
    finally:
        if tmp is not None:
            tmp.cleanup()
    exact, via_index = without_keys(exact, trivial), without_keys(via_index, trivial)
    return {"exact": exact, "index": via_index, "index_keys": keys, "n_images": len(images),
            "n_texts": len(captions), "encoder": encoder.name}


def load_query_vectors(path: Union[str, os.PathLike]) -> np.ndarray:
    """The float32 array of a ``.npy`` file of query vectors (any shape; any float dtype), read without pickles.
    ``ValueError`` naming the file for a file numpy cannot read (a pickle, an object array, garbage) and, by
    :func:`~retrieval.search.check_query_dtype`, for one holding anything but finite floats (integers, complex
    numbers, strings, NaN), naming its dtype. The tools prefix the flag that named the file."""
    from .search import check_query_dtype

    try:
        q = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
        msg = (str(e).splitlines() or [type(e).__name__])[0]
        raise ValueError(f"{os.fspath(path)}: not a readable .npy array of query vectors ({msg[:120]})") from None
    if not isinstance(q, np.ndarray):
        raise ValueError(f"{os.fspath(path)}: not an .npy array of query vectors")
    return check_query_dtype(q, path)


RECALL_DEFINITION = ("recall@k = |found top-k ∩ exact top-k| / min(k, neighbours the query has); 1-recall@k = the "
                     "exact nearest neighbour is in the found top k; -1 (no result) is a miss; queries with no "
                     "neighbour are not counted")


def check_unchanged_sources(manifest: dict, kind: Optional[str] = None) -> None:
    """``ValueError`` (one line naming the folder and what changed) when an embeddings folder the index
    ``manifest`` records (its build's, then each add's) no longer holds the rows that were indexed from it:
    the exact ground truth and the leave-one-out queries of :func:`index_quality` are read from them.

    A folder whose fingerprint is the recorded one holds them (a store-written folder's fingerprint is its
    content checksum). Otherwise (rewritten, re-extracted, shuffled, or only copied or touched: a plain
    folder's fingerprint hashes its files' status) its row count and first rows are compared with the
    recorded ``head``, and, where the record has a full row checksum (an add's) or the head covers every row,
    that decides; a folder whose first rows match but whose other rows cannot be compared is refused too,
    with the way out (``--embeddings`` names the rows to score against explicitly)."""
    from .index_build import HEAD_ROWS, _identities, row_head

    kind = kind or manifest.get("kind", "img")
    for i, rec in enumerate(manifest.get("embeddings") or []):
        where = rec.get("source")
        if not where or where == "array":
            continue  # indexed_source refuses those
        first = int(rec.get("first_id", 0))
        what = "the build" if i == 0 else f"add #{i}"
        ids = f"{what}, ids {first}..{first + int(rec.get('count', 0)) - 1}"
        part = EmbeddingSource.open(where, kind)
        if part.fingerprint() in _identities(rec):
            continue
        head = rec.get("head")
        if head is not None and row_head(part) != head:
            raise ValueError(f"{where}: changed since it was indexed ({ids}): its first rows differ from the "
                             f"indexed ones (re-extracted or rewritten); rebuild the index, or pass --embeddings "
                             f"with the indexed vectors")
        checksum = rec.get("checksum")
        if isinstance(checksum, str) and checksum.startswith("sha256:"):
            if part.checksum() == checksum:
                continue
            raise ValueError(f"{where}: changed since it was indexed ({ids}): its rows differ from the indexed "
                             f"ones (row checksum); rebuild the index, or pass --embeddings with the indexed "
                             f"vectors")
        if head is not None and part.count <= HEAD_ROWS:
            continue  # the head covers every row
        raise ValueError(f"{where}: its files changed since it was indexed ({ids}: rewritten, copied or touched)"
                         f"{'; its first rows match' if head is not None else ''} but the rest cannot be compared "
                         f"with what was indexed; pass --embeddings {where} to score against it as it is")


def check_same_heads(manifest: dict, source: EmbeddingSource, name: str) -> None:
    """``ValueError`` when explicit embeddings (all indexed rows, id order) do not start each recorded part
    (build, adds) with the rows indexed from it (the recorded ``head``: row count and first rows)."""
    from .index_build import row_head

    raw = source.normalized(False)
    for i, rec in enumerate(manifest.get("embeddings") or []):
        head, first, count = rec.get("head"), int(rec.get("first_id", 0)), int(rec.get("count", 0))
        if head is None or first + count > raw.count:
            continue
        if row_head(raw, first, count) != head:
            what = "the build" if i == 0 else f"add #{i}"
            raise ValueError(f"{name}: rows {first}..{first + count - 1} are not the ones {what} indexed (their "
                             f"first rows differ); give the embeddings the index was built from")


def index_quality(index_dir: str, embeddings=None, *, queries=None, k: int = 10, n_queries: int = 1000,
                  n_latency: int = 200, seed: int = 0, search_params: Optional[str] = None,
                  kind: Optional[str] = None) -> dict:
    """An index-quality report in the spirit of autofaiss' ``score_index``.

    ``embeddings``: the folder or array the index was built from (default: the folder recorded in its
    manifest), needed for the exact ground truth. ``queries``: query vectors (array or ``.npy``) that are not
    in the index — the honest measure; without them ``n_queries`` indexed rows are searched leave-one-out,
    which overstates graph (HNSW) recall, and the report says so. Given queries go through Retriever's
    validation (``ValueError`` for NaN / inf, an all-zero query of a normalised index, another dim). Reports
    ``recall@k`` and ``1-recall@k`` as :func:`knn_recall` defines them (``recall_definition`` states it),
    single-query latency p50/p99 in ms, batch QPS, bytes per vector and the index size; ``tuned_recall`` is
    the build's held-out measurement.
    """
    if isinstance(k, bool) or not isinstance(k, numbers.Integral) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if isinstance(queries, (str, os.PathLike)):
        queries = load_query_vectors(queries)  # a bad file is named before any work
    index, manifest = open_index(index_dir)
    if search_params:
        set_search_params(index, search_params)
    normalize = bool(manifest.get("normalize"))
    if embeddings is None:  # every folder the manifest records (build + adds), without removed / skipped ids
        source, absent = indexed_source(manifest, index, kind)
        check_unchanged_sources(manifest, kind)  # never ground truth (or queries) from rewritten folders
    else:
        source = EmbeddingSource.open(embeddings, kind or manifest.get("kind", "img")).normalized(normalize)
        absent = np.zeros(0, np.int64)
        if source.count != manifest["ntotal"] or manifest.get("removed"):
            raise ValueError(f"{index_dir}: the index holds {manifest['ntotal']} vectors but the embeddings have "
                             f"{source.count}; give the embeddings of exactly the indexed rows")
        check_same_heads(manifest, source, os.fspath(embeddings) if isinstance(embeddings, (str, os.PathLike))
                         else "the embeddings")
    if queries is not None:
        q = load_query_vectors(queries) if isinstance(queries, (str, os.PathLike)) else queries
        # Retriever's own rules: (Q, D) of the index's dim, finite, not all-zero when normalised; normalised
        q, _ = _QueryRules(manifest, index_dir)._prepare(q, k)
        rows, mode = None, "given queries (not in the index)"
    else:
        present = np.setdiff1d(np.arange(source.count), absent)
        rows = np.sort(np.random.default_rng(seed).choice(present, size=min(n_queries, len(present)),
                                                          replace=False))
        q, mode = source.take(rows), "indexed rows, leave-one-out (optimistic for HNSW graphs)"
    extra = 0 if rows is None else 1
    kk = min(k + extra, source.count - len(absent))
    # k beyond the collection: every list is at most the collection (a query has no more neighbours), so memory
    # is bounded by the index, not by k (recall@k divides by the neighbours a query has: knn_recall)
    k_eff = min(k, max(kk, 1))
    _, truth = exact_search(source, q, kk, exclude=absent)
    t0 = time.perf_counter()
    _, found = index.search(q, kk)
    batch_s = time.perf_counter() - t0
    truth_k, found_k = _drop_self(truth, rows, k_eff), _drop_self(found, rows, k_eff)
    scores = knn_recall(found_k, truth_k, k)
    lat = []
    for v in q[:n_latency]:
        t = time.perf_counter()
        index.search(v[None], k_eff)
        lat.append((time.perf_counter() - t) * 1000)
    size = os.path.getsize(os.path.join(index_dir, manifest["index_file"]))
    return {
        "index_key": manifest["index_key"],
        "search_params": search_params or manifest.get("search_params", ""),
        "ntotal": int(index.ntotal),
        "dim": int(index.d),
        "k": k,
        "queries": mode,
        "n_queries": len(q),
        "n_evaluated": scores["n_evaluated"],
        f"recall@{k}": scores[f"recall@{k}"],
        f"1-recall@{k}": scores[f"1-recall@{k}"],
        "recall_definition": RECALL_DEFINITION,
        "tuned_recall": manifest.get("tuning", {}).get("recall"),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "batch_qps": len(q) / batch_s if batch_s > 0 else float("inf"),
        "index_bytes": size,
        "bytes_per_vector": size / max(index.ntotal, 1),
        "compression_ratio": (4 * index.d) / (size / max(index.ntotal, 1)),
    }
