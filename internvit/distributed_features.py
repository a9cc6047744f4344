"""``FeatureExtractor.write`` across the ranks of a ``torch.distributed`` group (``torchrun``).

Rank 0 opens the output folder's :class:`~internvit.store.Store` first (its lock, the recovery of an interrupted
job, the refusal of a different one) and holds it to the end, so no other writer can interleave. Every rank then
writes the whole shards ``k`` with ``k % world == rank`` into its own sub-store ``OUT/.parts/rank-R-of-W`` (the
same durable protocol: a killed rank resumes its part, finished parts are committed and kept). Once every part
is committed, rank 0 hard-links each part's files into the folder through its store (``open_file``: the part
files stay intact, so a kill during the merge loses nothing), writes ``errors.jsonl``, commits the manifest and
removes ``.parts``. The folder is byte-identical to a single-process run with the same arguments: the same
shards, rows, metadata and manifest (the world size is not part of the job).

A failure on any rank is reported on every rank (``RuntimeError`` naming the rank and its error; the failing
rank raises its own error); a rank that dies is reported by ``torchrun``. Rerunning the same command finishes
the job: rank 0's store is held (:meth:`~internvit.store.Store.hold`) from the moment the ranks start their
parts, so a rank killed at any point leaves a folder that is still this job's (its ``.store`` and ``.parts``),
resumed by the same command with any number of ranks (one process included).
"""
from __future__ import annotations

import datetime
import json
import os
import shutil
import time
from contextlib import ExitStack
from typing import TYPE_CHECKING, Any, Callable, Optional

import numpy as np

from . import feature_folder as FF

if TYPE_CHECKING:
    from .features import FeatureExtractor

#: how long a rank waits for the others at a collective. A resumed job can leave one rank computing its whole
#: part while the others, done, wait (torch's 30-minute default would time out); a rank that dies is reported
#: by ``torchrun``, which then stops the others, so a long wait never hides a dead rank.
TIMEOUT = datetime.timedelta(hours=24)


def init_from_env(device: str) -> tuple[int, int, str]:
    """Join the ``torchrun`` process group when ``WORLD_SIZE`` > 1: gloo on CPU, NCCL on ``cuda:LOCAL_RANK``.

    Returns ``(rank, world size, device)``: ``(0, 1, device)`` unchanged without torchrun, else the rank's
    device (``cuda:LOCAL_RANK`` when ``device`` is a CUDA device). Every tool that runs under torchrun joins
    through this function; :func:`leave` ends the membership.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1, device
    import torch
    import torch.distributed as dist

    if str(device).startswith("cuda"):
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
        dist.init_process_group("nccl", timeout=TIMEOUT)
    else:
        dist.init_process_group("gloo", timeout=TIMEOUT)
    return dist.get_rank(), dist.get_world_size(), device


def leave() -> None:
    """Leave the process group joined by :func:`init_from_env` (no-op without one)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def agree(fn: Callable[[], Any], rank: int, world: int) -> list:
    """Run ``fn`` on this rank; gather ``(result, error)`` from all ranks; raise on every rank if one failed.

    Returns every rank's result (picklable), in rank order. The failing rank raises its own exception, the
    others ``RuntimeError('rank R of W failed: ...')``; when a peer died, ``RuntimeError('rank R of W: lost
    contact ...')``. With ``world == 1`` it is ``[fn()]``.
    """
    if world <= 1:
        return [fn()]
    import torch.distributed as dist

    err: Optional[BaseException] = None
    try:
        res = fn()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the other ranks have been told
        res, err = None, e
    gathered: list = [None] * world
    try:
        dist.all_gather_object(gathered, (res, None if err is None else f"{type(err).__name__}: {err}"))
    except RuntimeError as e:  # a peer died (killed, crashed): say so rather than pass on gloo's / NCCL's words
        first = (str(e).strip().splitlines() or [""])[0]
        raise RuntimeError(f"rank {rank} of {world}: lost contact with another rank, which died or was stopped "
                           f"(torchrun names it; rerun the same command to resume): {first}") from e
    if err is not None:
        raise err
    bad = [(r, msg) for r, (_, msg) in enumerate(gathered) if msg]
    if bad:
        raise RuntimeError(f"rank {bad[0][0]} of {world} failed: {bad[0][1]}")
    return [g[0] for g in gathered]


_agree = agree


def _part_dir(out_dir: str, rank: int, world: int) -> str:
    return os.path.join(out_dir, FF.PARTS, f"rank-{rank}-of-{world}")


def _open_part(out_dir: str, job: dict, rank: int, world: int, description: str):
    """This rank's sub-store ``OUT/.parts/rank-R-of-W`` for ``job`` (a :class:`~internvit.store.Store`, to use as a
    context manager): resumed when it holds this job's pending or committed part; a part of *another* job (the
    folder's scratch space, left by an earlier run) is removed first, never reused."""
    from .store import Store, read_manifest

    folder = _part_dir(out_dir, rank, world)
    part_job = dict(job, part={"rank": rank, "world": world})
    old = read_manifest(folder) if os.path.isdir(folder) else None
    if old is not None and not FF._same_job(old, part_job):
        shutil.rmtree(folder)
    return Store(folder, job=part_job, discard_pending=True, description=description)


def _write_part(fx: "FeatureExtractor", plan: dict, rank: int, world: int) -> dict:
    """Write this rank's shards into its sub-store (resumed after a kill); returns ``{index: record}``."""

    shards = [s for s in FF._plan_shards(plan, 1) if s["index"] % world == rank]
    with _open_part(plan["out_dir"], plan["job"], rank, world, "feature part") as st:
        if st.manifest is not None:
            return {int(k): v for k, v in st.manifest["records"].items()}
        records, _ = fx._write_shards(st, plan, shards)
        files = [s[key] for s in shards for key in ("features", "metadata")]
        st.commit({"records": {str(k): v for k, v in sorted(records.items())}}, files)
    return records


def _merge(st, plan: dict, world: int, records: dict) -> dict:
    """Rank 0: link every part's files into the folder's store, then commit (see the module docstring)."""
    shards = FF._plan_shards(plan, st.generation)
    parts = FF._plan_shards(plan, 1)  # names inside the part folders
    shape = FF._known_shape(records[s["index"]] for s in shards)
    for s, p in zip(shards, parts):
        src_dir = _part_dir(plan["out_dir"], s["index"] % world, world)
        rec = records[s["index"]]
        for key in ("features", "metadata"):
            if s[key] in st.pending_files:
                continue  # linked before an interruption
            with st.open_file(s[key]) as tmp:
                if key == "features" and rec["count"] == 0 and shape is not None and rec["shape"] != list(shape):
                    with open(tmp, "wb") as f:  # a rank that saw no image did not know the feature shape
                        np.save(f, np.zeros((0, *shape), np.float32))
                    continue
                os.remove(tmp)
                try:
                    os.link(os.path.join(src_dir, p[key]), tmp)
                except OSError:  # a file system without hard links
                    shutil.copyfile(os.path.join(src_dir, p[key]), tmp)
        if shape is not None and rec["count"] == 0:
            records[s["index"]] = dict(rec, shape=list(shape))
    return FF._commit_features(st, plan, shards, records)


def write_distributed(fx: "FeatureExtractor", plan: dict, rank: int, world: int) -> dict:
    """The distributed :meth:`FeatureExtractor.write` (every rank calls it with the same arguments)."""
    from .store import Store, read_manifest

    out_dir, job = plan["out_dir"], plan["job"]
    if rank != 0:
        fx.progress = False
    fx.last_stats = {}
    with ExitStack() as stack:
        def open_main() -> bool:  # rank 0: lock, recover, refuse a different job; True when already done
            if rank != 0:
                return False
            st = stack.enter_context(Store(out_dir, job=job, discard_pending=plan["discard_pending"],
                                           description="feature folder"))
            if st.manifest is not None and FF._same_job(st.manifest, job):
                FF._remove_parts(out_dir)
                return True
            if st.manifest is not None:
                FF.refuse_not_features(out_dir, st.manifest)  # also with overwrite: only features are replaced
            if st.manifest is not None and not plan["overwrite"]:
                FF._refuse_other(out_dir, st.manifest, job, plan["paths"])
            st.hold()  # the ranks now write their parts here: a rank's death leaves the folder this job's
            stack.st = st
            return False

        done = _agree(open_main, rank, world)[0]
        if not done:
            if rank == 0:
                fx._arm_warnings(plan["info"])  # every rank has passed every check
            start = time.perf_counter()

            def write_part() -> tuple:
                records = _write_part(fx, plan, rank, world)
                return records, dict(fx.last_stats) if fx.last_stats else dict(FF.DONE_STATS)

            parts = _agree(write_part, rank, world)  # returns once every rank has written its part
            stats = job_timing([p[1] for p in parts], time.perf_counter() - start)
            if rank == 0 and stats["images"]:  # another rank computed features while this one read none
                fx._fire_warnings()
            records = {k: json.loads(json.dumps(v)) for part, _ in parts for k, v in part.items()}
            _agree(lambda: _merge(stack.st, plan, world, records) if rank == 0 else None, rank, world)
        else:
            stats = job_timing([dict(FF.DONE_STATS)] * world, 0.0)
    return dict(read_manifest(out_dir), timing=stats)


def job_timing(rank_stats: list, wall_seconds: float) -> dict:
    """The timing of a distributed write (the same on every rank): ``images`` of all ranks, ``seconds`` of wall
    time from the start of the ranks' work to the end of the last rank's, ``images_per_s`` the job's rate
    (``None`` when no rank computed anything), ``scope: 'job'`` and ``world_size``; ``ranks`` keeps each
    rank's own timing (its ``images_per_s`` is that rank's rate)."""
    images = sum(int(s.get("images") or 0) for s in rank_stats)
    return {"seconds": round(wall_seconds, 3), "images": images,
            "images_per_s": round(images / wall_seconds, 2) if images and wall_seconds > 0 else None,
            "scope": "job", "world_size": len(rank_stats), "ranks": [dict(s) for s in rank_stats]}


def write_files(folder: str, job: dict, names: list, write: Callable[[int, str], None], manifest: dict, *,
                rank: int = 0, world: int = 1, description: str = "folder") -> dict:
    """Write the data files ``names`` of one store folder, split across the ranks, and commit ``manifest``.

    ``write(i, path)`` writes file ``names[i]`` at ``path``; rank ``r`` writes the files ``i % world == r``.
    Every rank calls it with the same arguments and gets the committed manifest. With one process the files
    are written straight through the folder's :class:`~internvit.store.Store`; across ranks as
    :func:`write_distributed` does (each rank into its own sub-store ``FOLDER/.parts/rank-R-of-W``, resumed after
    a kill; rank 0, holding the folder's store from the start, links the parts' files in and commits), so the
    folder is byte-identical either way. A finished folder of the same job is returned as it is. Errors as
    :func:`agree` (raised on every rank).
    """
    from .store import Store, read_manifest

    names = list(names)
    if world <= 1:
        with Store(folder, job=job, discard_pending=True, description=description) as st:
            if st.manifest is not None and FF._same_job(st.manifest, job):
                return st.manifest
            for i, name in enumerate(names):
                if name not in st.pending_files:
                    with st.open_file(name) as tmp:
                        write(i, tmp)
            return st.commit(manifest, names)
    with ExitStack() as stack:
        def open_main() -> bool:  # rank 0: lock, recover, refuse a different job; True when already done
            if rank != 0:
                return False
            st = stack.enter_context(Store(folder, job=job, discard_pending=True, description=description))
            stack.st = st
            done = st.manifest is not None and FF._same_job(st.manifest, job)
            if not done:
                st.hold()  # the ranks now write their parts here: a rank's death leaves the folder this job's
            return done

        if _agree(open_main, rank, world)[0]:
            if rank == 0:
                FF._remove_parts(folder)
            return read_manifest(folder)

        def write_part() -> None:
            mine = [i for i in range(len(names)) if i % world == rank]
            with _open_part(folder, job, rank, world, f"{description} part") as st:
                if st.manifest is None:
                    for i in mine:
                        if names[i] not in st.pending_files:
                            with st.open_file(names[i]) as tmp:
                                write(i, tmp)
                    st.commit({}, [names[i] for i in mine])

        def merge() -> Optional[dict]:
            if rank != 0:
                return None
            st = stack.st
            for i, name in enumerate(names):
                if name in st.pending_files:
                    continue  # linked before an interruption
                with st.open_file(name) as tmp:
                    os.remove(tmp)
                    src = os.path.join(_part_dir(folder, i % world, world), name)
                    try:
                        os.link(src, tmp)
                    except OSError:  # a file system without hard links
                        shutil.copyfile(src, tmp)
            committed = st.commit(manifest, names)
            FF._remove_parts(folder)
            return committed

        _agree(write_part, rank, world)
        _agree(merge, rank, world)
    return read_manifest(folder)
