"""The output folder of :meth:`internvit.features.FeatureExtractor.write`: the job's identity and the refusals of
a folder that holds something else (another job's features, an interrupted different job, a user's files), the
inputs recorded for a folder or list file, the shard plan and the commit of the manifest. Its public names are
re-exported by :mod:`internvit.features`.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
from typing import Any, Mapping, Optional, Sequence, Union

from .feature_metadata import _to_json_value, output_text
from .feature_read import ERRORS, MANIFEST, _read_rows
from .store import PARTS  # where the ranks of a distributed write keep their parts until rank 0 commits
from .store import named_write_errors as _writing

#: the ``error`` of a row whose features hold NaN or infinity (not stored; listed in ``errors.jsonl``)
NONFINITE_ERROR = "non-finite features (NaN or infinity"

#: keys of the manifest's ``model`` that describe it without being part of the job identity (the weights
#: fingerprint already identifies the weights)
MODEL_DESCRIPTION_KEYS = ("name", "random_init")


# ---------------------------------------------------------------------------------------------------
# Committing
# ---------------------------------------------------------------------------------------------------
#: timing of a call that computed nothing
DONE_STATS = {"seconds": 0.0, "images": 0, "images_per_s": None}


def _dist_rank_world() -> tuple[int, int]:
    """``(rank, world size)`` of an initialised ``torch.distributed`` group, else ``(0, 1)``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _remove_parts(out_dir: str) -> None:
    import shutil

    from .store import fsync_dir

    parts = os.path.join(out_dir, PARTS)
    if os.path.isdir(parts):
        shutil.rmtree(parts)
        fsync_dir(out_dir)


def _plan_shards(plan: dict, generation: int) -> list[dict]:
    """The shards of a write, their rows and their file names (generation 1 keeps the plain names)."""
    from .store import generation_name

    n, size = len(plan["paths"]), plan["shard_size"]

    def named(pattern: str, k: int) -> str:
        rel = pattern.format(shard=k)
        return rel if generation == 1 else generation_name(rel, generation)

    return [{"index": k, "start": k * size, "end": min((k + 1) * size, n),
             "features": named(plan["features_pattern"], k), "metadata": named(plan["metadata_pattern"], k)}
            for k in range(math.ceil(n / size))]


def _commit_features(st, plan: dict, shards: list[dict], records: dict) -> dict:
    """Write ``errors.jsonl`` and commit the manifest of a feature folder (every shard written)."""
    from .store import generation_name

    paths, job = plan["paths"], plan["job"]
    gen = st.generation
    errors = sorted((i, e) for rec in records.values() for i, e in rec["errors"])
    errors_file = ERRORS if gen == 1 else generation_name(ERRORS, gen)
    with _writing(os.path.join(st.folder, errors_file)):
        st.write_bytes(errors_file, "".join(
            json.dumps({"id": i, "path": output_text(paths[i]), "error": output_text(e)}, ensure_ascii=False) + "\n"
            for i, e in errors).encode("utf-8"))  # also when empty: same files on every run
    feature_shape = list(_known_shape(records[s["index"]] for s in shards) or (0,))
    manifest = {k: v for k, v in job.items() if k != "extra"}
    manifest["model"] = plan["info"]  # with its name (not part of the job identity)
    manifest.update({
        "feature_shape": feature_shape,
        "dim": feature_shape[0],
        "count": int(sum(int(r["count"]) for r in records.values())),
        "num_errors": len(errors),
        "num_nonfinite": sum(1 for _, e in errors if e.startswith(NONFINITE_ERROR)),
        "num_escaped_paths": sum(1 for p in paths if output_text(p) != p),
        "errors_file": errors_file,
        "shards": [dict(s, count=int(records[s["index"]]["count"]),
                        **({"sha256": records[s["index"]]["sha256"]} if "sha256" in records[s["index"]] else {}))
                   for s in shards],
    })
    manifest.update(job["extra"])
    files = [errors_file] + [s[key] for s in shards for key in ("features", "metadata")]
    with _writing(os.path.join(st.folder, MANIFEST)):
        committed = st.commit(manifest, files)
    _remove_parts(plan["out_dir"])
    return committed



# ---------------------------------------------------------------------------------------------------
# The job's inputs, and the refusals of a folder that holds something else
# ---------------------------------------------------------------------------------------------------
def inputs_checksum(paths: Sequence[str], extra_columns: Optional[Mapping[str, Sequence]] = None) -> str:
    """SHA-256 of every input path and extra-column value, streamed (memory does not grow with the inputs)."""
    h = hashlib.sha256()
    for p in paths:
        h.update(os.fspath(p).encode("utf-8", "surrogateescape"))
        h.update(b"\n")
    for name in sorted(extra_columns or {}):
        h.update(json.dumps(name).encode("utf-8") + b"\n")
        for v in (extra_columns or {})[name]:
            h.update(json.dumps(_to_json_value(v), default=str, ensure_ascii=False).encode("utf-8", "surrogateescape"))
            h.update(b"\n")
    return h.hexdigest()


def canonical_paths(paths: Sequence[str]) -> list[str]:
    """``paths`` made absolute, each file's folder by its real path (``os.path.realpath``: ``./many``, ``many``,
    an absolute path, another working directory or a symlinked folder all give the same text); the file name
    itself is kept, so a symlinked *file* stays its own row. ``realpath`` runs once per folder."""
    real: dict[str, str] = {}
    out = []
    for p in paths:
        folder, name = os.path.split(os.path.abspath(os.fspath(p)))
        if folder not in real:
            real[folder] = os.path.realpath(folder)
        out.append(os.path.join(real[folder], name))
    return out


def resolve_input_paths(paths: Sequence[str], out_dir: Union[str, os.PathLike],
                        extra_columns: Optional[Mapping[str, Sequence]] = None) -> list[str]:
    """The paths :meth:`FeatureExtractor.write` records for a folder or list file: :func:`canonical_paths`, so
    another spelling of the same folder is the same job (resumed or reused). A folder ``out_dir`` holding a job
    (finished or interrupted) whose inputs are ``paths`` as listed (written before paths were made absolute)
    keeps them as listed, so that job still resumes."""
    paths = [os.fspath(p) for p in paths]
    canon = canonical_paths(paths)
    if canon == paths:
        return canon
    out_dir = os.fspath(out_dir)
    recorded = set()
    if out_dir and os.path.isdir(out_dir):
        from .store import read_manifest

        recorded.add((read_manifest(out_dir) or {}).get("inputs_checksum"))
        recorded.add(((_pending_header(out_dir) or {}).get("job") or {}).get("inputs_checksum"))
    recorded.discard(None)
    if recorded and inputs_checksum(canon, extra_columns) not in recorded \
            and inputs_checksum(paths, extra_columns) in recorded:
        return paths
    return canon


#: entries that make a folder a feature extraction's (besides the store's own ``.store`` and ``.parts``)
FEATURE_FOLDER_MARKERS = (MANIFEST, "progress.json")


def refuse_foreign_out(out_dir: Union[str, os.PathLike]) -> None:
    """Refuse an output folder that holds files but no feature extraction (a user's photos, another tool's
    output): ``FileExistsError`` naming a few of its entries; ``NotADirectoryError`` when ``out_dir`` is a file
    or lies under one. A missing or empty folder, or one of a finished or interrupted feature extraction (any
    job: another job's finished features are then refused or replaced by :meth:`FeatureExtractor.write`), passes.
    The one check of :meth:`FeatureExtractor.write` and ``tools/extract_features.py``, before any work."""
    from .store import refuse_foreign_folder

    refuse_foreign_folder(out_dir, FEATURE_FOLDER_MARKERS, "feature extraction")


def _same_job(manifest: Mapping[str, Any], job: Mapping[str, Any]) -> bool:
    from .store import job_id

    return (manifest.get("_store") or {}).get("job_id") == job_id(job)


#: the end of every refusal of a folder that holds finished features of another job
FINISHED_HINT = ("use another output folder (this one holds finished features: delete it, or pass --overwrite "
                 "(overwrite=True), only if you no longer need them)")


def _inputs_difference(out_dir: str, manifest: Mapping[str, Any], paths: Optional[Sequence[str]]) -> str:
    """In words, how the committed inputs of ``manifest`` differ from ``paths`` (same number of inputs, another
    checksum): the first row whose path differs, read shard by shard from the folder's metadata and
    ``errors.jsonl`` (it stops at the first difference, usually in the first shard)."""
    if paths is None:
        return "the image paths or extra-column values differ"
    try:
        errors: dict[int, str] = {}
        err_file = os.path.join(out_dir, manifest.get("errors_file") or ERRORS)
        if os.path.isfile(err_file):
            with open(err_file, encoding="utf-8") as f:
                errors = {int(r["id"]): r["path"] for r in map(json.loads, f) if r}
        for s in manifest["shards"]:
            there = {int(r["id"]): r["path"] for r in _read_rows(out_dir, dict(manifest, shards=[s]), ["id", "path"])}
            for i in range(int(s["start"]), int(s["end"])):
                old, now = there.get(i, errors.get(i)), output_text(paths[i])
                if old is not None and old != now:
                    return (f"the image paths differ (row {i}: {old!r} there, {now!r} now; give the images of the "
                            f"finished job: a folder or list file is recorded with absolute paths, so another "
                            f"spelling of the same folder is the same job)")
    except (OSError, ValueError, KeyError, TypeError):  # an unreadable record: say what is known
        return "the image paths or extra-column values differ"
    return "the image paths are the same, but the extra-column values differ"


def refuse_not_features(out_dir: str, manifest: Mapping[str, Any]) -> None:
    """``ValueError`` when the committed ``manifest.json`` of ``out_dir`` is not a feature folder's (a FAISS index
    folder of ``tools/build_index.py``, another tool's manifest): with or without ``overwrite`` (which replaced an
    index folder's manifest by features, leaving its index file orphaned), only features are ever replaced."""
    kind = (manifest.get("_store") or {}).get("description") if isinstance(manifest.get("_store"), dict) else None
    if kind not in (None, "feature folder"):  # the kind the store recorded (2026-12-04 on)
        raise ValueError(f"{out_dir}: holds {'an' if kind[:1] in 'aeiou' else 'a'} {kind}, not a feature folder: "
                         f"nothing was changed (overwrite / --overwrite replaces only features); give a new or "
                         f"empty folder")
    if not isinstance(manifest.get("shards"), list) or "_store" not in manifest:  # an embeddings folder: an int
        raise ValueError(f"{out_dir}: its manifest.json is not a feature folder's (no store record and "
                         f"shards): a folder no feature extraction wrote (overwrite / --overwrite replaces only "
                         f"features); give a new or empty folder")


def _refuse_other(out_dir: str, manifest: Mapping[str, Any], job: Mapping[str, Any],
                  paths: Optional[Sequence[str]] = None) -> None:
    """Raise ``ValueError`` naming the first field in which committed features differ from ``job`` (or saying
    that the folder's ``manifest.json`` is not one a feature extraction wrote). ``paths`` (this call's inputs)
    let a difference of inputs name the first row that differs."""
    refuse_not_features(out_dir, manifest)
    for key, b in job.items():
        if key == "extra":
            a = {k: manifest.get(k) for k in b}
        else:
            a = manifest.get(key)
        if key == "model" and isinstance(a, dict) and isinstance(b, dict):
            a = {k: v for k, v in a.items() if k not in MODEL_DESCRIPTION_KEYS}
            if a != b:
                diff = next(k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k))
                raise ValueError(f"{out_dir} holds features made with a different model ({diff} differs); "
                                 f"{FINISHED_HINT}")
        elif key == "num_inputs" and a != b:
            raise ValueError(f"{out_dir} holds features of another list of images (num_inputs): the number of "
                             f"input images differs ({a} there, {b} now); {FINISHED_HINT}")
        elif key == "inputs_checksum" and a != b:
            raise ValueError(f"{out_dir} holds features of another list of images (inputs_checksum): "
                             f"{_inputs_difference(out_dir, manifest, paths)}; {FINISHED_HINT}")
        elif a != b:
            raise ValueError(f"{out_dir} holds features made with different arguments ({key}: "
                             f"{_short(a)} there, {_short(b)} now); {FINISHED_HINT}")
    if manifest.get("tiling") != job.get("tiling"):  # tiles vs whole images (only tile jobs carry the key)
        raise ValueError(f"{out_dir} holds features made with different arguments (tiling: "
                         f"{_short(manifest.get('tiling'))} there, {_short(job.get('tiling'))} now); "
                         f"{FINISHED_HINT}")
    raise ValueError(f"{out_dir} holds features of another job (written by another version?); {FINISHED_HINT}")


def _pending_header(out_dir: str) -> Optional[dict]:
    """The ``begin`` record of the job pending in ``out_dir``'s store journal (``None`` when there is none or it
    belongs to an already committed generation). Read only: no lock is taken."""
    from .store import STORE_KEY, journal_records

    header = next((r for r in reversed(journal_records(out_dir)) if r.get("op") == "begin"), None)
    if header is None:
        return None
    from .store import read_manifest

    base = int(((read_manifest(out_dir) or {}).get(STORE_KEY) or {}).get("generation") or 0)
    return header if header.get("generation") == base else None


def _refuse_other_parts(out_dir: str, job: Mapping[str, Any]) -> None:
    """``PendingJobError`` when ``out_dir``'s :data:`PARTS` holds a part of an interrupted distributed job (pending
    or committed, before rank 0's merge) that is not ``job``'s: a different job took the folder and dropped
    those parts silently, where an interrupted single-process job is refused (pass ``discard_pending``)."""
    import re

    from .store import STORE_KEY, PendingJobError, _first_difference, job_id, read_manifest

    parts = os.path.join(out_dir, PARTS)
    for name in sorted(os.listdir(parts)) if os.path.isdir(parts) else ():
        m = re.fullmatch(r"rank-(\d+)-of-(\d+)", name)
        if m is None:
            continue
        folder = os.path.join(parts, name)
        mine = dict(job, part={"rank": int(m[1]), "world": int(m[2])})
        header = _pending_header(folder)
        found = (header or {}).get("job_id") or ((read_manifest(folder) or {}).get(STORE_KEY) or {}).get("job_id")
        if found is None or found == job_id(mine):
            continue
        d = _first_difference(header.get("job") or {}, mine) if header else None
        what = f" ({d[0]}: {_short(d[1])} there, {_short(d[2])} now)" if d else ""
        raise PendingJobError(f"{out_dir}: an interrupted job of {m[2]} processes is pending in this feature folder "
                              f"({PARTS}/{name}) and this one differs{what}; rerun the interrupted command to finish "
                              f"it, or drop it with --discard-pending (discard_pending=True)")


def _refuse_unverified_reuse(out_dir: str, old: Optional[dict], job: Mapping[str, Any]) -> None:
    """Refuse to reuse or resume a job whose preprocessing includes callables known only by name."""
    from .store import job_id

    names = (job.get("preprocessing") or {}).get("unverified_callables")
    if not names or "preprocess_id" in job["preprocessing"]:
        return
    header = _pending_header(out_dir) if os.path.isdir(out_dir) else None
    finished = old is not None and _same_job(old, job)
    pending = header is not None and header.get("job_id") == job_id(job)
    if finished or pending:
        raise ValueError(
            f"{out_dir} holds {'features' if finished else 'an interrupted job'} made with a preprocessing that "
            f"includes {', '.join(names)}, whose parameters cannot be recorded, so it cannot be told whether "
            f"they match this call's; pass preprocess_id='...' (a name you change whenever that preprocessing "
            f"changes) to {'reuse' if finished else 'resume'} it, or use another output folder or delete it")


def _pending_message(out_dir: str, job: Mapping[str, Any], e: BaseException) -> str:
    """The message of a refused pending job, naming the field that differs and how to drop the job."""
    from .store import _first_difference

    header = _pending_header(out_dir) or {}
    d = _first_difference(header.get("job") or {}, dict(job)) if header else None
    if not d:
        return str(e)
    what = f" ({d[0]}: {_short(d[1])} there, {_short(d[2])} now)"
    if d[0] == "num_inputs":
        what = f" (num_inputs): the number of input images differs ({d[1]} there, {d[2]} now)"
    elif d[0] == "inputs_checksum":
        what = (f" (inputs_checksum): the same number of input images ({job.get('num_inputs')}) but other image "
                f"paths or extra-column values (another folder or list of images, or its files changed; a folder or "
                f"list file is recorded with absolute paths, so another spelling of the same folder is the same job)")
    return (f"{out_dir}: an interrupted job is pending in this feature folder and this one differs{what}; rerun "
            f"the interrupted command to finish it, or drop it with --discard-pending (discard_pending=True)")


def _known_shape(records) -> Optional[tuple]:
    for rec in records:
        if rec["count"] > 0 or rec["shape"] != [0]:
            return tuple(rec["shape"])
    return None



#: the fields of a feature folder's manifest that the job writes itself (:meth:`FeatureExtractor.write`; the store
#: adds ``_store``, ``write`` returns ``timing``): ``manifest_extra`` may not replace them
MANIFEST_FIELDS = ("dtype", "model", "embed_fn", "preprocessing", "pool", "layers", "normalize", "shard_size",
                   "num_inputs", "inputs_checksum", "features_pattern", "metadata_pattern", "metadata_format",
                   "tiling", "normalize_after", "feature_shape", "dim", "count", "num_errors", "num_nonfinite",
                   "num_escaped_paths", "errors_file", "shards", "_store", "timing")


def check_manifest_extra(manifest_extra: Optional[Mapping[str, Any]]) -> dict:
    """``manifest_extra`` as a dict, checked before any work: a ``Mapping`` of str keys that are not the
    manifest's own fields (:data:`MANIFEST_FIELDS`: ``{'count': 99}`` replaced the count, ``{'shards': 1}``
    committed a folder no reader could open) holding JSON values JSON keeps as they are (an ``object()`` was
    written as its ``repr``, with a memory address that differs on every run; NaN is not JSON)."""
    if manifest_extra is None:
        return {}
    if not isinstance(manifest_extra, Mapping):
        raise TypeError(f"manifest_extra must be a dict, got {type(manifest_extra).__name__}")
    own = [k for k in manifest_extra if k in MANIFEST_FIELDS]
    if own:
        raise ValueError(f"manifest_extra: {', '.join(map(repr, own))} is a field the job writes itself; use "
                         f"another name")
    for k, v in manifest_extra.items():
        try:
            json.dumps(v, allow_nan=False)  # no default=: what JSON cannot hold is refused, never its repr
        except (TypeError, ValueError):
            ok = False
        else:
            ok = isinstance(k, str)
        if not ok:
            raise ValueError(f"manifest_extra[{k!r}] = {v!r:.60}: give JSON data (None, bool, int, finite float, "
                             f"str, lists and dicts of them) under a str key")
    return dict(manifest_extra)


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + "..."
