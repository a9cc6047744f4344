"""Retrieval evaluation: image↔text recall@k on Flickr30K / COCO (Karpathy-style JSON), exactly and through
a FAISS index, and an index-quality report (ANN recall vs exact, latency, QPS, bytes per vector).

Recall follows CLIP_benchmark / the InternVL protocol (reference-spec §8): captions cleaned by
:func:`pre_caption`, L2-normalised embeddings, score = text·image, a query counts as a hit at k if any of its
positives is in the top k. ``image_retrieval_recall@k`` is text → image, ``text_retrieval_recall@k`` image → text.
"""
from __future__ import annotations

import os
import re
import tempfile
import time
from typing import Optional, Sequence, Union

import numpy as np

from .embeddings import EmbeddingSource
from .index import (
    _drop_self,
    _parse_key,
    build_index,
    exact_search,
    indexed_source,
    new_index,
    open_index,
    parse_memory,
    recall_at_k,
    set_search_params,
)

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


def _entries_json(path: str, data, split: Optional[str]) -> list[tuple[str, list]]:
    if isinstance(data, dict) and isinstance(data.get("images"), list):
        entries = []
        for n, im in enumerate(data["images"]):
            if not isinstance(im, dict) or "filename" not in im:
                raise ValueError(f"{path}: images[{n}] has no 'filename'")
            if split is not None and im.get("split", split) != split:
                continue
            rel = os.path.join(im.get("filepath", ""), im["filename"])
            entries.append((rel, [s["raw"] if isinstance(s, dict) else s for s in im.get("sentences", [])]))
        return entries
    if isinstance(data, list):
        entries = []
        for n, e in enumerate(data):
            if not isinstance(e, dict) or "image" not in e or "caption" not in e:
                raise ValueError(f"{path}: entry {n} is not an {{'image', 'caption'}} object")
            caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            entries.append((e["image"], caps))
        return entries
    raise ValueError(f"{path}: unknown annotation format (expected Karpathy's {{'images': [...]}} or a list "
                     f"of {{'image', 'caption'}})")


def _entries_txt(path: str) -> list[tuple[str, list]]:
    """clip_benchmark's Flickr30K text format (reference-spec-2 §2.4): a header line, then one
    ``<id>.jpg,<caption>`` line per caption, split at the first ``.jpg,``."""
    entries = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if lineno == 1 or not line.strip():
                continue
            image, sep, caption = line.partition(".jpg,")
            if not sep:
                raise ValueError(f"{path}:{lineno}: expected '<id>.jpg,<caption>'")
            entries.append((image + ".jpg", [caption]))
    return entries


def load_annotations(path: str, image_root: Optional[str] = None, *, split: Optional[str] = "test",
                     max_words: int = 50) -> tuple[list[str], list[str], list[int]]:
    """``(image_paths, captions, text_to_image)`` from a retrieval annotation file.

    Accepted: Karpathy's ``dataset_{flickr30k,coco}.json`` (``{'images': [{'filename', 'filepath'?, 'split',
    'sentences': [{'raw'}]}]}``, filtered to ``split``), the BLIP / CLIP_benchmark list ``[{'image': path,
    'caption': [..] or str}]`` (one entry per image, or one per caption), or clip_benchmark's Flickr30K
    ``.txt`` (``<id>.jpg,<caption>`` lines after a header). Entries are grouped by image as CLIP_benchmark
    does: an image listed several times is one gallery item holding all its captions (images keep the order
    of their first appearance, captions their file order). Paths resolve against ``image_root`` (default:
    the annotation file's folder). Captions go through :func:`pre_caption`. Raises ``ValueError`` naming
    the file for an unknown format, a malformed entry or no captioned images.
    """
    from internvit.cli import read_json

    if path.lower().endswith(".txt"):
        entries = _entries_txt(path)
    else:
        entries = _entries_json(path, read_json(path), split)
    root = image_root or os.path.dirname(os.path.abspath(path))
    by_image: dict[str, list[str]] = {}
    for rel, caps in entries:
        if not isinstance(rel, str):
            raise ValueError(f"{path}: image path {rel!r} is not a string")
        full = os.path.normpath(rel if os.path.isabs(rel) else os.path.join(root, rel))
        by_image.setdefault(full, []).extend(str(c) for c in caps)
    images, captions, t2i = [], [], []
    for full, caps in by_image.items():
        if not caps:
            continue
        images.append(full)
        for c in caps:
            captions.append(pre_caption(c, max_words))
            t2i.append(len(images) - 1)
    if not images:
        raise ValueError(f"{path}: no images with captions" + (f" in split {split!r}" if split else ""))
    return images, captions, t2i


def _recall_from_topk(topk: np.ndarray, positives: Sequence[set], ks: Sequence[int]) -> dict:
    out = {}
    for k in ks:
        hits = [bool(pos & set(row[:k].tolist())) for row, pos in zip(topk, positives)]
        out[k] = float(np.mean(hits))
    return out


def retrieval_recall(image_emb: np.ndarray, text_emb: np.ndarray, text_to_image: Sequence[int],
                     ks: Sequence[int] = (1, 5, 10), *, image_topk: Optional[np.ndarray] = None,
                     text_topk: Optional[np.ndarray] = None) -> dict:
    """CLIP-style recall@k. Exact (dot products) unless ranked lists are given: ``image_topk`` (texts × K,
    image ids per text query) and ``text_topk`` (images × K, text ids per image query), e.g. from an index."""
    t2i = np.asarray(text_to_image)
    kmax = max(ks)
    if image_topk is None:
        scores = text_emb @ image_emb.T
        image_topk = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    if text_topk is None:
        scores = image_emb @ text_emb.T
        text_topk = np.argsort(-scores, axis=1, kind="stable")[:, :kmax]
    i2t: list[set] = [set() for _ in range(len(image_emb))]
    for t, i in enumerate(t2i):
        i2t[i].add(t)
    ir = _recall_from_topk(image_topk, [{int(i)} for i in t2i], ks)
    tr = _recall_from_topk(text_topk, i2t, ks)
    out = {f"image_retrieval_recall@{k}": ir[k] for k in ks}
    out.update({f"text_retrieval_recall@{k}": tr[k] for k in ks})
    out["mean_recall"] = float(np.mean(list(ir.values()) + list(tr.values())))
    return out


def check_eval_settings(encoder, n_images: int, n_texts: int, *, ks: Sequence[int] = (1, 5, 10),
                        index_key: Optional[str] = None, max_index_memory: Union[str, int] = "4G",
                        target_recall: float = 0.95, batch_size: int = 32, num_workers: int = 0) -> None:
    """Every setting of :func:`evaluate_retrieval` checked before anything is embedded; ``ValueError`` names
    the bad one (an ``index_key`` faiss cannot build at the encoder's dim, or with more inverted lists than
    the image or caption index has vectors)."""
    if not ks or any(isinstance(k, bool) or not isinstance(k, int) or k < 1 for k in ks):
        raise ValueError(f"ks must be integers >= 1, got {list(ks)}")
    for name, v, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    if not 0 < float(target_recall) <= 1:
        raise ValueError(f"target_recall must be in (0, 1], got {target_recall}")
    parse_memory(max_index_memory)
    if index_key:
        new_index(index_key, int(encoder.dim))  # ValueError naming the key when faiss cannot build it
        nlist = _parse_key(index_key)["nlist"]
        smallest = min(n_images, n_texts)
        if nlist > smallest:
            raise ValueError(f"index_key {index_key!r} has {nlist} inverted lists but the "
                             f"{'image' if n_images <= n_texts else 'caption'} index would hold only {smallest} "
                             f"vectors (use fewer lists, e.g. IVF{max(1, smallest // 39)},Flat, or Flat)")


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
    'index_keys': {...}, 'n_images', 'n_texts'}``; the gap between the two shows what the ANN index costs.
    """
    images, captions, t2i = load_annotations(annotations, image_root, split=split)
    check_eval_settings(encoder, len(images), len(captions), ks=ks, index_key=index_key,
                        max_index_memory=max_index_memory, target_recall=target_recall, batch_size=batch_size,
                        num_workers=num_workers)
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
            _, ids = index.search(np.ascontiguousarray(queries), kmax)
            keys[name] = {"index_key": m["index_key"], "search_params": m["search_params"],
                          "tuned_recall": m["tuning"]["recall"]}
            topk[name] = ids
        via_index = retrieval_recall(img, txt, t2i, ks, image_topk=topk["image"], text_topk=topk["text"])
    finally:
        if tmp is not None:
            tmp.cleanup()
    return {"exact": exact, "index": via_index, "index_keys": keys, "n_images": len(images),
            "n_texts": len(captions), "encoder": encoder.name}


def index_quality(index_dir: str, embeddings=None, *, queries=None, k: int = 10, n_queries: int = 1000,
                  n_latency: int = 200, seed: int = 0, search_params: Optional[str] = None,
                  kind: Optional[str] = None) -> dict:
    """An index-quality report in the spirit of autofaiss' ``score_index``.

    ``embeddings``: the folder or array the index was built from (default: the folder recorded in its
    manifest), needed for the exact ground truth. ``queries``: query vectors (array or ``.npy``) that are not
    in the index — the honest measure; without them ``n_queries`` indexed rows are searched leave-one-out,
    which overstates graph (HNSW) recall, and the report says so. Reports ``recall@k`` (k-recall@k vs exact),
    ``1-recall@k`` (the exact nearest neighbour is in the top k), single-query latency p50/p99 in ms, batch
    QPS, bytes per vector and the index size; ``tuned_recall`` is the build's held-out measurement.
    """
    index, manifest = open_index(index_dir)
    if search_params:
        set_search_params(index, search_params)
    normalize = bool(manifest.get("normalize"))
    if embeddings is None:  # every folder the manifest records (build + adds), without removed / skipped ids
        source, absent = indexed_source(manifest, index, kind)
    else:
        source = EmbeddingSource.open(embeddings, kind or manifest.get("kind", "img")).normalized(normalize)
        absent = np.zeros(0, np.int64)
        if source.count != manifest["ntotal"] or manifest.get("removed"):
            raise ValueError(f"{index_dir}: the index holds {manifest['ntotal']} vectors but the embeddings have "
                             f"{source.count}; give the embeddings of exactly the indexed rows")
    if queries is not None:
        q = np.load(queries, allow_pickle=False) if isinstance(queries, (str, os.PathLike)) else queries
        q = np.ascontiguousarray(q, dtype=np.float32)
        if q.ndim != 2 or q.shape[1] != source.dim:
            raise ValueError(f"queries must be (Q, {source.dim}), got shape {q.shape}")
        if normalize:  # the index normalised its vectors, and normalises queries
            q = np.ascontiguousarray(q / np.linalg.norm(q, axis=1, keepdims=True), dtype=np.float32)
        rows, mode = None, "given queries (not in the index)"
    else:
        present = np.setdiff1d(np.arange(source.count), absent)
        rows = np.sort(np.random.default_rng(seed).choice(present, size=min(n_queries, len(present)),
                                                          replace=False))
        q, mode = source.take(rows), "indexed rows, leave-one-out (optimistic for HNSW graphs)"
    extra = 0 if rows is None else 1
    kk = min(k + extra, source.count - len(absent))
    _, truth = exact_search(source, q, kk, exclude=absent)
    t0 = time.perf_counter()
    _, found = index.search(q, kk)
    batch_s = time.perf_counter() - t0
    truth_k, found_k = _drop_self(truth, rows, k), _drop_self(found, rows, k)
    one_recall = float(np.mean([t[0] in set(f.tolist()) for t, f in zip(truth_k, found_k)]))
    lat = []
    for v in q[:n_latency]:
        t = time.perf_counter()
        index.search(v[None], k)
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
        f"recall@{k}": recall_at_k(found_k, truth_k, k),
        f"1-recall@{k}": one_recall,
        "tuned_recall": manifest.get("tuning", {}).get("recall"),
        "latency_ms_p50": float(np.percentile(lat, 50)),
        "latency_ms_p99": float(np.percentile(lat, 99)),
        "batch_qps": len(q) / batch_s if batch_s > 0 else float("inf"),
        "index_bytes": size,
        "bytes_per_vector": size / max(index.ntotal, 1),
        "compression_ratio": (4 * index.d) / (size / max(index.ntotal, 1)),
    }
