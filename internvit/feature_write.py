"""What :meth:`internvit.features.FeatureExtractor.write` runs: the checks of its arguments and output folder,
the job's identity, the refusal of a folder that holds something else, then the shards computed and written
through the durable store (:mod:`internvit.store`) and committed (:mod:`internvit.feature_folder`).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import warnings
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence, Union

import numpy as np

from .data import ImagesLike, list_images
from .feature_folder import (
    DONE_STATS,
    _commit_features,
    _dist_rank_world,
    _known_shape,
    _pending_message,
    _plan_shards,
    _refuse_other,
    _refuse_other_parts,
    _refuse_unverified_reuse,
    _remove_parts,
    _same_job,
    check_manifest_extra,
    refuse_foreign_out,
    refuse_not_features,
    resolve_input_paths,
)
from .feature_metadata import _arrow_columns, _check_json_columns, _extra_columns, _write_metadata
from .feature_read import ERRORS
from .fingerprint import PreprocessingFingerprintWarning
from .store import PARTS
from .store import named_write_errors as _writing

if TYPE_CHECKING:
    from torch.utils.data import Dataset

    from .features import FeatureExtractor


class _ChunkedSink:
    """A file-like wrapper that makes ``np.save`` write in chunks through ``write`` (whose errors carry the
    ``errno``) rather than ``ndarray.tofile`` (whose short writes carry none)."""

    def __init__(self, f) -> None:
        self.f = f

    def write(self, data) -> int:
        return self.f.write(data)


def write_features(
    fx: "FeatureExtractor",
    images: Union[ImagesLike, "Dataset"],
    out_dir: Union[str, os.PathLike],
    *,
    shard_size: int,
    features_pattern: str,
    metadata_pattern: str,
    metadata_format: str,
    extra_columns: Optional[Mapping[str, Sequence]],
    manifest_extra: Optional[Mapping[str, Any]],
    overwrite: bool,
    discard_pending: bool,
    preprocess_id: Optional[str],
) -> dict:
    """The body of :meth:`FeatureExtractor.write <internvit.features.FeatureExtractor.write>` for the extractor
    ``fx`` (see there for the arguments, the folder it writes and what it raises)."""
    from .features import _check_inputs, _check_int, _check_not_empty
    from .store import PendingJobError, Store, read_manifest
    from .tiling import row_columns

    _check_not_empty("out_dir", out_dir)
    out_dir = os.fspath(out_dir)
    _check_int("shard_size", shard_size, 1)
    shard_size = int(shard_size)
    manifest_extra = check_manifest_extra(manifest_extra)
    if metadata_format not in ("parquet", "jsonl"):
        raise ValueError(f"metadata_format must be 'parquet' or 'jsonl', got {metadata_format!r}")
    for name, pattern in (("features_pattern", features_pattern), ("metadata_pattern", metadata_pattern)):
        try:
            a, b = pattern.format(shard=0), pattern.format(shard=1)
        except (KeyError, IndexError, ValueError) as e:
            raise ValueError(f"{name} {pattern!r}: must use only the field {{shard}} ({e})") from None
        if a == b or os.path.isabs(a) or ".." in a.split("/") or a.split("/")[0] in (".store", ERRORS):
            raise ValueError(f"{name} {pattern!r}: must be a relative path containing {{shard}}")
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir}: exists and is not a folder")
    refuse_foreign_out(out_dir)  # a user's folder is never filled, not even with overwrite=True

    given = images
    reserved = ("id", "path") + (tuple(row_columns(fx.tiling)) if fx.tiling is not None else ())
    if isinstance(images, (str, os.PathLike)):  # a folder or list file: recorded with absolute paths
        _check_not_empty("images", images)
        listed = list_images(images)
        images = resolve_input_paths(listed, out_dir, _extra_columns(extra_columns, len(listed), reserved))
    ds = fx._dataset(images)
    _check_inputs(ds, given)
    paths, n = ds.paths, len(ds)
    columns = _extra_columns(extra_columns, n, reserved)
    arrow_columns = _arrow_columns(columns) if metadata_format == "parquet" else None  # refused before work
    if metadata_format == "jsonl":
        _check_json_columns(columns)
    t0 = time.perf_counter()
    info = fx.model_info()  # hashes every weight byte once per model (cached while the weights are unchanged)
    fingerprint_s = {"fingerprint_seconds": round(time.perf_counter() - t0, 3)}
    with warnings.catch_warnings():
        if preprocess_id is not None:  # the warning asks for it: given, the callables are identified
            warnings.simplefilter("ignore", PreprocessingFingerprintWarning)
        preprocessing = fx.input_preprocessing(images)
    job = fx.signature(paths, columns, shard_size=shard_size, features_pattern=features_pattern,
                       metadata_pattern=metadata_pattern, metadata_format=metadata_format,
                       manifest_extra=manifest_extra, model_info=info,
                       preprocessing=preprocessing, preprocess_id=preprocess_id)
    old = read_manifest(out_dir) if os.path.isdir(out_dir) else None
    leftover_parts = os.path.isdir(os.path.join(out_dir, PARTS))
    if old is not None:
        refuse_not_features(out_dir, old)  # also with overwrite: an index folder is not replaced by features
    if old is not None and not overwrite and not _same_job(old, job):
        _refuse_other(out_dir, old, job, paths)
    _refuse_unverified_reuse(out_dir, old, job)
    if leftover_parts and not discard_pending:
        _refuse_other_parts(out_dir, job)
    if old is not None and _same_job(old, job) and not leftover_parts:
        return dict(old, timing=dict(DONE_STATS, **fingerprint_s))  # finished: nothing is rewritten
    plan = dict(out_dir=out_dir, ds=ds, paths=paths, columns=columns, arrow_columns=arrow_columns, info=info,
                job=job, shard_size=shard_size,
                features_pattern=features_pattern, metadata_pattern=metadata_pattern,
                metadata_format=metadata_format, overwrite=overwrite, discard_pending=discard_pending)
    rank, world = _dist_rank_world()
    try:
        if world > 1:
            from .distributed_features import write_distributed

            return write_distributed(fx, plan, rank, world)

        with Store(out_dir, job=job, discard_pending=discard_pending, description="feature folder") as st:
            if st.manifest is not None and _same_job(st.manifest, job):
                _remove_parts(out_dir)
                return dict(st.manifest, timing=dict(DONE_STATS, **fingerprint_s))  # finished meanwhile
            if st.manifest is not None:
                refuse_not_features(out_dir, st.manifest)  # committed meanwhile by another tool
            if st.manifest is not None and not overwrite:
                _refuse_other(out_dir, st.manifest, job, paths)
            fx._arm_warnings(info)
            shards = _plan_shards(plan, st.generation)
            records, stats = fx._write_shards(st, plan, shards)
            committed = _commit_features(st, plan, shards, records)
    except PendingJobError as e:
        raise PendingJobError(_pending_message(out_dir, job, e)) from None
    finally:
        fx._armed = None
    return dict(committed, timing=dict(stats, **fingerprint_s))


def write_shards(fx: "FeatureExtractor", st, plan: dict, shards: list[dict]) -> tuple[dict, dict]:
    """Compute and write ``shards`` (those a resumed job has not finished) as data files of the store ``st`` with
    the extractor ``fx`` (``FeatureExtractor._write_shards``).

    Returns ``({shard index: record}, timing)``; a record (``count``, ``shape``, ``errors``) is saved in the
    store's journal once both files of its shard are durable.
    """
    ds, paths, columns = plan["ds"], plan["paths"], plan["columns"]
    shard_size, metadata_format = plan["shard_size"], plan["metadata_format"]
    records: dict[int, dict] = {}
    for s in shards:  # shards an interrupted run of this job finished (files complete, record saved)
        rec = st.state.get(f"shard-{s['index']}")
        if rec is not None and {s["features"], s["metadata"]} <= st.pending_files:
            records[s["index"]] = rec
    feature_shape = _known_shape(records.values())
    arrow_columns = plan["arrow_columns"]

    def finish(s: dict, feats: list, ids: list, errs: list, shape: tuple, row_cols=None) -> None:
        arr = np.concatenate(feats) if feats else np.zeros((0, *shape), np.float32)
        arr = np.ascontiguousarray(arr, dtype=np.float32)
        with _writing(os.path.join(st.folder, s["features"])):
            with st.open_file(s["features"]) as tmp, open(tmp, "wb") as f:
                np.save(_ChunkedSink(f), arr)
        with _writing(os.path.join(st.folder, s["metadata"])):
            with st.open_file(s["metadata"]) as tmp:
                _write_metadata(tmp, metadata_format, ids, paths, columns, arrow_columns, row_cols)
        # sha256 of the float32 rows: the shard's content identity, recorded in the manifest (a job over
        # this folder, e.g. an index build, is resumed only over the same content, without re-reading it)
        rec = {"count": len(ids), "shape": list(arr.shape[1:]), "errors": sorted([int(i), e] for i, e in errs),
               "sha256": hashlib.sha256(arr.data).hexdigest()}
        with _writing(os.path.join(st.folder, ".store", "journal.jsonl")):
            st.save_state(**{f"shard-{s['index']}": rec})  # the shard is done once this is durable
        records[s["index"]] = json.loads(json.dumps(rec))

    pending = [s for s in shards if s["index"] not in records]
    # batches never cross a shard boundary, so a shard's numbers do not depend on what else is pending
    batches = [b for s in pending for b in fx._batches(s["start"], s["end"], ds)]
    bufs = {s["index"]: ([], [], [], 0) for s in pending}
    tile_cols: dict[int, dict] = {}  # tiles: per-row metadata columns of each pending shard
    waiting = []  # finished shards with no readable image, written once the feature shape is known
    by_index = {s["index"]: s for s in shards}
    for ids, feats, errs, *b_tiles in fx._run(ds, batches, sum(s["end"] - s["start"] for s in pending)):
        k = (ids[0] if ids else errs[0][0]) // shard_size
        for key, v in (b_tiles[0] if b_tiles else {}).items():
            tile_cols.setdefault(k, {}).setdefault(key, []).extend(v)
        f_list, id_list, err_list, seen = bufs[k]
        if feats is not None:
            fx._fire_warnings()  # the first features of the job: the model's warnings print now
            f_list.append(feats)
            feature_shape = feature_shape or tuple(feats.shape[1:])
        id_list.extend(ids)
        err_list.extend(errs)
        bufs[k] = (f_list, id_list, err_list, seen + len(set(ids)) + len(errs))  # images (a tile row each)
        s = by_index[k]
        if bufs[k][3] == s["end"] - s["start"]:
            waiting.append(k)
            if feature_shape is not None:
                for j in waiting:
                    finish(by_index[j], *bufs.pop(j)[:3], feature_shape, _tile_cols(fx, tile_cols, j))
                waiting = []
    if waiting and feature_shape is None:  # no image of the whole job could be read
        feature_shape = fx._blank_output_shape()
    for j in waiting:
        finish(by_index[j], *bufs.pop(j)[:3], feature_shape or (0,), _tile_cols(fx, tile_cols, j))
    return records, (dict(fx.last_stats) if pending else dict(DONE_STATS))


def _tile_cols(fx: "FeatureExtractor", tile_cols: dict, shard: int) -> Optional[dict]:
    """The per-row tile columns of a finished shard (``None`` without tiles; empty lists for an empty shard)."""
    if fx.tiling is None:
        return None
    from .tiling import row_columns

    return tile_cols.pop(shard, None) or {k: [] for k in row_columns(fx.tiling)}
