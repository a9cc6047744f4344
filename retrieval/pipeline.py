"""Images → embeddings (clip-retrieval layout, resumable) → index: what ``tools/build_index.py`` runs."""
from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from typing import Optional, Sequence, Union

import numpy as np

from internvit.distributed_features import agree as _agree
from internvit.distributed_features import write_files
from internvit.features import _dist_rank_world as _rank_world
from internvit.store import read_manifest, refuse_foreign_folder, remove_folder

from .embeddings import KINDS, save_npy
from .encoders import Encoder
from .index_build import add_to_index, build_index, check_build_args, check_kind, recorded_source
from .index_folder import check_index_destination
from .index_folder import read_manifest as read_index_manifest
from .index_plan import plan_index
from .inputs import TarImages, image_inputs

logger = logging.getLogger("retrieval")


def _committed(folder: str) -> Optional[dict]:
    try:
        return read_manifest(folder)
    except Exception:  # noqa: BLE001 - an unreadable manifest is reported by the writer that opens it
        return None


def _check_encoder(out_dir: str, info: dict) -> None:
    """Refuse an embeddings folder that holds another encoder's (or dtype's) embeddings, before any work."""
    from .faiss_ops import IndexMismatchError

    old = (_committed(out_dir) or {}).get("encoder")
    if not old:
        return
    if old.get("name") == info["name"] and old.get("dtype", info["dtype"]) != info["dtype"]:
        raise IndexMismatchError(f"{out_dir} holds embeddings made in {old['dtype']}, not {info['dtype']}: "
                                 f"use that dtype or another folder")
    if (old.get("name"), old.get("weights_fingerprint")) != (info["name"], info["weights_fingerprint"]):
        raise IndexMismatchError(f"{out_dir} holds embeddings of encoder {old.get('name')!r}, not "
                                 f"{info['name']!r}; use another folder")


def _write_text_embeddings(encoder: Encoder, out_dir: str, manifest: dict, width: int) -> dict:
    """Caption embeddings, row-aligned with the image shards, in ``text_emb/`` (its own store folder, so the
    image folder's committed state is never rewritten). Under ``torch.distributed`` the shards are split across
    the ranks as the image shards are (:func:`internvit.distributed_features.write_files`: the same folder as
    one process). Returns the text folder's manifest."""
    import pyarrow.parquet as pq

    sub, prefix = KINDS["text"]
    folder = os.path.join(out_dir, sub)
    info = encoder.info()
    job = {"op": "text_emb", "features": (manifest.get("_store") or {}).get("job_id") or manifest.get("count"),
           "encoder": info["name"], "weights": info["weights_fingerprint"], "dtype": info["dtype"]}
    shards = manifest["shards"]

    def write(i: int, path: str) -> None:
        texts = pq.read_table(os.path.join(out_dir, shards[i]["metadata"]), columns=["caption"])
        texts = texts.column("caption").to_pylist()
        save_npy(path, encoder.encode_texts(texts) if texts else np.zeros((0, encoder.dim), np.float32))

    rank, world = _rank_world()
    return write_files(folder, job, [f"{prefix}{s['index']:0{width}d}.npy" for s in shards], write,
                       {"dim": encoder.dim, "count": manifest["count"], "encoder": info}, rank=rank, world=world,
                       description="caption embeddings folder")


def embed_collection(encoder: Encoder, images, out_dir: str, *, captions: Optional[Sequence[Optional[str]]] = None,
                     batch_size: int = 32, shard_size: int = 10_000, num_workers: int = 0,
                     progress: bool = True, overwrite: bool = False) -> dict:
    """Embed ``images`` (and ``captions``) into ``out_dir`` in clip-retrieval's layout; returns the manifest.

    Image shards come from :meth:`internvit.FeatureExtractor.write` (committed through the store, resumable,
    ``errors.jsonl`` for unreadable files); caption embeddings go to ``text_emb/text_emb_{N}.npy`` (its own
    store folder), row-aligned with the images that could be read. Metadata columns: ``id`` (input row),
    ``path``, ``image_path`` and ``caption`` (text embeddings only for encoders with a text tower). Rerunning
    with the same arguments finishes an interrupted job; a folder made by another encoder raises
    :class:`IndexMismatchError` before anything is embedded. ``overwrite=True`` discards an interrupted job of
    other arguments pending in ``out_dir`` and replaces its committed embeddings of other arguments.

    Under ``torch.distributed`` (``torchrun``) every rank calls it with the same arguments: the image shards
    are split across the ranks as in distributed feature extraction (:mod:`internvit.distributed_features`,
    byte-identical to one process), and so are the caption embeddings' shards.
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
    _check_encoder(out_dir, info)
    n_shards = math.ceil(n / shard_size)
    width = len(str(max(n_shards - 1, 0)))
    extra = {"image_path": list(paths)}
    if captions is not None:
        extra["caption"] = ["" if c is None else str(c) for c in captions]
    fx = encoder.feature_extractor(batch_size=batch_size, num_workers=num_workers, progress=progress)
    # the encoder (its spec, weights and the repr of its preprocessing) names what made the pixels, also where
    # that preprocessing holds plain functions (open_clip's) whose parameters cannot be read
    pre_id = "encoder:" + hashlib.sha256(json.dumps({k: info[k] for k in ("spec", "preprocess",
                                                                          "weights_fingerprint")},
                                                    sort_keys=True, default=str).encode()).hexdigest()[:16]
    manifest = fx.write(images, out_dir, shard_size=shard_size,
                        features_pattern=f"img_emb/img_emb_{{shard:0{width}d}}.npy",
                        metadata_pattern=f"metadata/metadata_{{shard:0{width}d}}.parquet",
                        extra_columns=extra, manifest_extra={"encoder": info}, preprocess_id=pre_id,
                        overwrite=overwrite, discard_pending=overwrite)
    if captions is not None and encoder.supports_text and manifest.get("count"):
        text = _write_text_embeddings(encoder, out_dir, manifest, width)
        manifest = dict(manifest, text_emb={"dim": text["dim"], "count": text["count"]})
    return manifest


def _inputs_tag(paths: Sequence[str]) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fspath(p).encode("utf-8", "surrogateescape") + b"\n")
    return h.hexdigest()[:10]


def _absolute(images):
    """File paths made absolute (so metadata, and HTML pages made from it, resolve from anywhere); tar members
    and datasets are left as they are."""
    if isinstance(images, (list, tuple)):
        return [p if "::" in os.fspath(p) else os.path.abspath(os.fspath(p)) for p in images]
    return images


def index_images(
    source: Union[str, os.PathLike, Sequence[str]],
    out_dir: str,
    encoder: Encoder,
    *,
    add: bool = False,
    kind: Optional[str] = None,
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
    id_offset: Optional[int] = None,
    overwrite: bool = False,
) -> Optional[dict]:
    """Embed a folder / list / parquet / tars of images with ``encoder`` and build (or ``add`` to) an index.

    Embeddings go to ``embeddings_dir`` (default ``OUT/embeddings``, or ``OUT/embeddings-add-<hash>`` for an
    add) and are kept, so an interrupted run resumes and the index can be rebuilt without re-encoding.
    ``kind='text'`` indexes the captions instead (image → text search); ``None``: ``'img'`` for a build, the
    index's kind for an add. Everything that can be checked without embedding is checked first (arguments,
    index key against the number of inputs, the index's model / dim / kind for an add, an output folder that
    holds another index), so a refused run writes nothing. ``id_offset`` (``None``: 0 for a build, the recorded
    one for an add) is committed with the rows (:func:`~retrieval.index_build.build_index`). Returns the index
    manifest.

    ``overwrite=True`` discards interrupted jobs of other arguments at every stage (the index's, the embeddings
    folder's) and, for an add, removes the ``OUT/embeddings-add-*`` folders of other adds that the index does not
    reference (left by an add killed while embedding; without ``overwrite`` they are named in a warning; the
    folder of an add another process is running now, its lock held, is left alone and named as such). It
    never replaces a committed index. A refused add (e.g. embeddings the index already holds) removes the
    ``embeddings-add-*`` folder it embedded into, and a refused build the embeddings folder it created, so a
    refused run leaves nothing behind.

    Under ``torch.distributed`` (``torchrun``; every rank calls it with the same arguments) the checks run on
    every rank (a refusal is raised on each), the images are embedded across the ranks (whole shards per rank,
    resumable; rank 0 commits the embeddings folder, byte-identical to one process), then rank 0 alone builds
    (or adds to) the index and returns its manifest, while the other ranks return ``None`` as soon as the
    embeddings are committed (they do not wait for the index, so a long build meets no collective timeout).
    """
    out_dir = os.fspath(out_dir)
    rank, world = _rank_world()
    prepared: dict = {}

    def prepare() -> None:  # every check, on every rank, before anything is embedded
        prepared.update(_prepare(source, out_dir, encoder, add=add, kind=kind, embeddings_dir=embeddings_dir,
                                 index_key=index_key, max_index_memory=max_index_memory,
                                 target_recall=target_recall, batch_size=batch_size, shard_size=shard_size,
                                 num_workers=num_workers, path_column=path_column, caption_column=caption_column,
                                 id_offset=id_offset, overwrite=overwrite))

    _agree(prepare, rank, world)  # a refusal is raised on every rank (the same check fails on each)
    images, captions, paths = prepared["images"], prepared["captions"], prepared["paths"]
    kind, budget, embeddings_dir = prepared["kind"], prepared["budget"], prepared["embeddings_dir"]
    created = [d for d in (out_dir, embeddings_dir) if not os.path.exists(d)] if rank == 0 else []
    if rank == 0:
        if overwrite:
            from .index_build import discard_pending

            discard_pending(out_dir)  # the index's interrupted job of other arguments
        for d in prepared["busy"]:
            logger.info("%s: embeddings of another --add of other inputs, being written by another process now "
                        "(left alone)", d)
        for d in prepared["stale"]:
            if overwrite:
                logger.warning("%s: removing the embeddings of an interrupted add of other inputs (--overwrite)", d)
                remove_folder(d)
            else:
                logger.warning("%s: embeddings of an interrupted add of other inputs, not in the index (rerun that "
                               "add to finish it, or pass --overwrite to remove them)", d)
    # a re-embed into the folder of this run: the embeddings folder's own job of other arguments goes too, unless
    # a committed index was built from (or added) that folder
    replace = overwrite and not prepared["recorded"]
    try:
        emb = embed_collection(encoder, images, embeddings_dir, captions=captions, batch_size=batch_size,
                               shard_size=shard_size, num_workers=num_workers, progress=progress,
                               overwrite=replace)
    except (ValueError, LookupError) as e:  # refused input (kills and crashes keep their work for the rerun)
        _remove_if_empty(created)
        from internvit.features import FINISHED_HINT

        if prepared["recorded"] and str(e).endswith(FINISHED_HINT):
            # "delete it, or pass --overwrite" would delete what the index was built from (or added), and
            # --overwrite leaves such a folder alone: say so instead
            raise ValueError(str(e)[:-len(FINISHED_HINT)] + recorded_hint(out_dir)) from None
        raise
    if not emb.get("count"):  # the same committed manifest on every rank
        message = f"{source}: none of the {len(paths)} images could be read{_first_error(embeddings_dir)}"
        if world > 1:
            import torch.distributed as dist

            dist.barrier()  # every rank has read errors.jsonl before rank 0 removes the folder
        _remove_if_empty(created)
        raise ValueError(message)
    if rank != 0:
        return None  # the embeddings are committed; rank 0 builds the index alone
    from internvit.store import StoreError

    from .index_build import DETERMINISTIC_ERRORS

    try:
        if add:
            return add_to_index(out_dir, embeddings_dir, kind=kind, encoder_info=encoder.info(), use_gpu=use_gpu,
                                progress=progress, id_offset=id_offset)
        return build_index(embeddings_dir, out_dir, kind=kind, index_key=index_key, max_index_memory=budget,
                           target_recall=target_recall, encoder_info=encoder.info(), use_gpu=use_gpu,
                           progress=progress, id_offset=id_offset)
    except StoreError:
        raise  # another writer / a pending job: this run's embeddings are kept for the rerun
    except DETERMINISTIC_ERRORS:
        # refused (duplicate embeddings, rows the index rejects): a rerun would be refused again, so the
        # embeddings this run made for it go (an add's own folder, or a build's new one; never --embeddings)
        ours = prepared["default_dir"] and (add or embeddings_dir in created)
        if ours and not _recorded(out_dir, embeddings_dir):
            remove_folder(embeddings_dir)
            _remove_if_empty([d for d in created if d != embeddings_dir])
        raise


def recorded_hint(out_dir: str) -> str:
    """The end of the refusal of an embeddings folder the committed index in ``out_dir`` was built from (or
    added) when this run's arguments differ from the ones that made it."""
    return (f"the index in {out_dir} was built from (or added) these embeddings, so they are kept, also with "
            f"overwrite=True: rerun with the arguments they were made with, or give another embeddings folder")


def _recorded(out_dir: str, embeddings_dir: str) -> bool:
    """Whether the committed index in ``out_dir`` was built from (or added) ``embeddings_dir``: by path or by
    content (:func:`~retrieval.index_source.recorded_source`), so a copied or moved index folder knows its own."""
    manifest = _committed(out_dir) or {}
    return "index_file" in manifest and recorded_source(manifest, embeddings_dir) is not None


def being_written(folder: str) -> bool:
    """Whether another process holds ``folder``'s store lock now (a live job, not an interrupted one)."""
    from filelock import FileLock, Timeout

    from internvit.store import LOCK

    path = os.path.join(folder, LOCK)
    if not os.path.exists(path):
        return False
    lock = FileLock(path, timeout=0)
    try:
        lock.acquire()
    except Timeout:
        return True
    lock.release()
    return False


def stale_add_folders(out_dir: str, keep: str) -> list:
    """``OUT/embeddings-add-*`` folders other than ``keep`` that the committed index does not reference (by path
    or content): the embeddings of an add interrupted before it committed (or refused by an older version), or
    of an add another process is running now (:func:`being_written`; :func:`index_images` leaves those alone)."""
    import glob

    manifest = _committed(out_dir) or {}
    keep = os.path.abspath(keep)
    return sorted(d for d in glob.glob(os.path.join(glob.escape(out_dir), "embeddings-add-*"))
                  if os.path.isdir(d) and os.path.abspath(d) != keep and recorded_source(manifest, d) is None)


def _prepare(source, out_dir: str, encoder: Encoder, *, add: bool, kind: Optional[str],
             embeddings_dir: Optional[str], index_key: Optional[str], max_index_memory, target_recall: float,
             batch_size: int, shard_size: int, num_workers: int, path_column: Optional[str],
             caption_column: Optional[str], id_offset: Optional[int] = None, overwrite: bool = False) -> dict:
    """The checks of :func:`index_images` that need no embedding; returns the inputs and resolved settings."""
    budget = check_build_args(kind=kind or "img", target_recall=target_recall, max_index_memory=max_index_memory)
    for name, v, low in (("batch_size", batch_size, 1), ("shard_size", shard_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {v!r}")
    images, captions = image_inputs(source, path_column=path_column, caption_column=caption_column)
    images = _absolute(images)
    paths = images.paths if hasattr(images, "paths") else images
    if add:
        manifest = read_index_manifest(out_dir)
        kind = check_kind(manifest, kind, out_dir)
        if not manifest.get("encoder"):  # bare vectors: the model's embeddings may not share their space
            from .faiss_ops import IndexMismatchError

            raise IndexMismatchError(f"{out_dir}: the index records no model (built from bare embeddings); refusing "
                                     f"to add embeddings of encoder {encoder.name!r} to it (they may not share its "
                                     f"vector space): build a new index with that model")
        encoder.check_compatible(manifest, out_dir)  # before embedding anything
        from .index_build import check_add_room

        check_add_room(manifest, id_offset, len(paths), out_dir)  # the grown folder's ids fit: before embedding
    else:
        kind = kind or "img"
        check_index_destination(out_dir)  # a user's folder: refused before anything is embedded into it
        plan_index(len(paths), encoder.dim, index_key, budget)  # e.g. IVF1024 on 300 images: refused now
    if kind == "text" and not encoder.supports_text:
        raise ValueError(f"kind='text' needs an encoder that embeds text; {encoder.name!r} cannot (image-only, "
                         f"or no tokenizer: pass --tokenizer)")
    if kind == "text" and captions is None:
        raise ValueError(f"{source}: kind='text' needs captions (.txt files next to the images, a caption "
                         f"column or .txt tar members), none found")
    default_dir = embeddings_dir is None
    if embeddings_dir is None:
        embeddings_dir = os.path.join(out_dir, f"embeddings-add-{_inputs_tag(paths)}" if add else "embeddings")
    embeddings_dir = os.fspath(embeddings_dir)
    held = _committed(embeddings_dir) or {}
    if "index_file" in held:  # --embeddings naming an index folder
        raise FileExistsError(f"{embeddings_dir}: an index folder, not an embeddings folder: give the embeddings "
                              f"a new or empty folder (or one of embeddings made with these arguments)")
    if not add and not _recorded(out_dir, embeddings_dir) and "index_file" in (_committed(out_dir) or {}):
        # the build's own embeddings are recognised by content too (a copied or moved index folder)
        raise FileExistsError(f"{out_dir}: already holds an index built from other embeddings (use --add "
                              f"to extend it, or another folder)")
    refuse_foreign_folder(embeddings_dir, ("manifest.json", ".store"), "embeddings folder")
    _check_encoder(embeddings_dir, encoder.info())
    others = stale_add_folders(out_dir, embeddings_dir) if add else []
    busy = {d: being_written(d) for d in others}
    return dict(images=images, captions=captions, paths=paths, kind=kind, budget=budget,
                embeddings_dir=embeddings_dir, default_dir=default_dir,
                recorded=_recorded(out_dir, embeddings_dir),
                stale=[d for d in others if not busy[d]], busy=[d for d in others if busy[d]])


def _first_error(folder: str) -> str:
    import json

    try:
        with open(os.path.join(folder, "errors.jsonl"), encoding="utf-8") as f:
            e = json.loads(f.readline())
        return f" (first: {e['path']}: {e['error']})"
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def _remove_if_empty(created: list) -> None:
    """Remove the folders this call created when the run failed before any embedding was committed (a
    refused run leaves nothing behind; a committed embedding stays for the rerun)."""
    for d in reversed(created):
        if not os.path.isdir(d):
            continue
        committed = [r for r, _, fs in os.walk(d) if "manifest.json" in fs and (_committed(r) or {}).get("count")]
        if not committed:
            remove_folder(d)
