"""Images → embeddings (clip-retrieval layout, resumable) → index: what ``tools/build_index.py`` runs."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from .embeddings import KINDS, atomic_save_npy, atomic_write_json
from .encoders import Encoder
from .index import IndexMismatchError, add_to_index, build_index
from .inputs import TarImages, image_inputs

logger = logging.getLogger("retrieval")

ENCODER_FILE = "encoder.json"


def embed_collection(encoder: Encoder, images, out_dir: str, *, captions: Optional[Sequence[Optional[str]]] = None,
                     batch_size: int = 32, shard_size: int = 10_000, num_workers: int = 0,
                     progress: bool = True) -> dict:
    """Embed ``images`` (and ``captions``) into ``out_dir`` in clip-retrieval's layout; returns the manifest.

    Image shards come from :meth:`internvit.FeatureExtractor.write` (atomic, resumable, ``errors.jsonl``
    for unreadable files); caption embeddings are written per shard next to them, row-aligned with the images
    that could be read (``text_emb/text_emb_{N}.npy``). Metadata columns: ``id`` (input row), ``path``,
    ``image_path`` and ``caption`` (text embeddings only for encoders with a text tower). Rerunning with the
    same arguments finishes an interrupted job; a folder made by another encoder raises
    :class:`IndexMismatchError`.
    """
    out_dir = os.fspath(out_dir)
    if isinstance(images, TarImages) and images.transform is None:
        images.transform = encoder._transform()  # FeatureExtractor takes a Dataset of ready tensors
    paths = images.paths if hasattr(images, "paths") else [os.fspath(p) for p in images]
    n = len(paths)
    if n == 0:
        raise ValueError("no images to embed")
    if captions is not None and len(captions) != n:
        raise ValueError(f"{len(captions)} captions for {n} images")
    info = encoder.info()
    enc_path = os.path.join(out_dir, ENCODER_FILE)
    if os.path.isfile(enc_path):
        with open(enc_path, encoding="utf-8") as f:
            old = json.load(f)
        if old.get("name") == info["name"] and old.get("dtype", info["dtype"]) != info["dtype"]:
            raise IndexMismatchError(f"{out_dir} holds embeddings made in {old['dtype']}, not {info['dtype']}: "
                                     f"use that dtype or another folder")
        if (old.get("name"), old.get("weights_fingerprint")) != (info["name"], info["weights_fingerprint"]):
            raise IndexMismatchError(f"{out_dir} holds embeddings of encoder {old.get('name')!r}, not "
                                     f"{info['name']!r}; use another folder")
    else:
        atomic_write_json(enc_path, info)
    n_shards = math.ceil(n / shard_size)
    width = len(str(max(n_shards - 1, 0)))
    extra = {"image_path": list(paths)}
    if captions is not None:
        extra["caption"] = ["" if c is None else str(c) for c in captions]
    fx = encoder.feature_extractor(batch_size=batch_size, num_workers=num_workers, progress=progress)
    manifest = fx.write(images, out_dir, shard_size=shard_size,
                        features_pattern=f"img_emb/img_emb_{{shard:0{width}d}}.npy",
                        metadata_pattern=f"metadata/metadata_{{shard:0{width}d}}.parquet",
                        extra_columns=extra, manifest_extra={"encoder": info})
    if captions is not None and encoder.supports_text:  # image-only encoders keep captions as metadata only
        import pyarrow.parquet as pq

        sub, prefix = KINDS["text"]
        for shard in manifest["shards"]:
            out = os.path.join(out_dir, sub, f"{prefix}{shard['index']:0{width}d}.npy")
            if os.path.isfile(out):
                continue
            texts = pq.read_table(os.path.join(out_dir, shard["metadata"]), columns=["caption"])
            texts = texts.column("caption").to_pylist()
            emb = encoder.encode_texts(texts) if texts else np.zeros((0, encoder.dim), np.float32)
            atomic_save_npy(out, emb)
        manifest["text_emb"] = {"dim": encoder.dim, "count": manifest["count"]}
        atomic_write_json(os.path.join(out_dir, "manifest.json"), manifest)
    return manifest


def _inputs_tag(paths: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(paths).encode()).hexdigest()[:10]


def index_images(
    source: Union[str, os.PathLike, Sequence[str]],
    out_dir: str,
    encoder: Encoder,
    *,
    add: bool = False,
    kind: str = "img",
    embeddings_dir: Optional[str] = None,
    index_key: Optional[str] = None,
    max_index_memory: Union[str, int] = "4G",
    target_recall: float = 0.95,
    batch_size: int = 32,
    shard_size: int = 10_000,
    num_workers: int = 0,
    path_column: Optional[str] = None,
    caption_column: Optional[str] = None,
    use_gpu: bool = False,
    progress: bool = True,
) -> dict:
    """Embed a folder / list / parquet / tars of images with ``encoder`` and build (or ``add`` to) an index.

    Embeddings go to ``embeddings_dir`` (default ``OUT/embeddings``, or ``OUT/embeddings-add-<hash>`` for an
    add) and are kept, so an interrupted run resumes and the index can be rebuilt without re-encoding.
    ``kind='text'`` indexes the captions instead (image → text search). Returns the index manifest.
    """
    out_dir = os.fspath(out_dir)
    images, captions = image_inputs(source, path_column=path_column, caption_column=caption_column)
    if kind == "text" and not encoder.supports_text:
        raise ValueError(f"kind='text' needs an encoder that embeds text; {encoder.name!r} cannot (image-only, "
                         f"or no tokenizer: pass --tokenizer)")
    if kind == "text" and captions is None:
        raise ValueError(f"{source}: kind='text' needs captions (.txt files next to the images, a caption "
                         f"column or .txt tar members), none found")
    paths = images.paths if hasattr(images, "paths") else images
    if embeddings_dir is None:
        embeddings_dir = os.path.join(out_dir, f"embeddings-add-{_inputs_tag(paths)}" if add else "embeddings")
    embed_collection(encoder, images, embeddings_dir, captions=captions, batch_size=batch_size,
                     shard_size=shard_size, num_workers=num_workers, progress=progress)
    if add:
        return add_to_index(out_dir, embeddings_dir, kind=kind, encoder_info=encoder.info(), use_gpu=use_gpu,
                            progress=progress)
    return build_index(embeddings_dir, out_dir, kind=kind, index_key=index_key, max_index_memory=max_index_memory,
                       target_recall=target_recall, encoder_info=encoder.info(), use_gpu=use_gpu, progress=progress)
