"""The training work dir: where a run writes, and what it finds there from earlier runs.

* :func:`check_work_dir_path` / :func:`check_work_dir` — a work dir that is a file, or holds files the run
  would replace (an earlier run's checkpoints, a file named like the config copy), is refused.
* :func:`lock_work_dir` — one training run per work dir at a time (a ``flock`` on the folder, held by rank 0
  until ``runner.train()`` ends; a second run is refused naming the first).
* :func:`latest_complete_checkpoint` — what ``--resume`` continues from (``last_checkpoint``, else the newest
  periodic checkpoint that loads).
* :func:`set_aside_earlier_run` — ``--overwrite`` moves the earlier run's checkpoints aside, so that a
  ``--resume`` of the new run never continues the earlier one.

:mod:`internvit.runner` builds the runners with these.
"""
from __future__ import annotations

import logging
import os
import os.path as osp
import re
import time
from typing import Optional

from internvit import compat


def _is_local(path: str) -> bool:
    return not re.match(r"^([a-z][\w+.-]*://|\w+::)", str(path))


def check_work_dir_path(work_dir: str, flag: str = "--work-dir") -> None:
    """Refuse a work dir that is a file, or lies below one (``NotADirectoryError`` naming ``flag`` and the file);
    the Runner failed with ``[Errno 17] File exists`` / ``[Errno 20] Not a directory``."""
    path = osp.abspath(work_dir)
    while True:
        if osp.lexists(path) and not osp.isdir(path):
            where = "" if path == osp.abspath(work_dir) else f" ({path} is)"
            raise NotADirectoryError(f"{flag} {work_dir}: a file, not a folder{where}")
        parent = osp.dirname(path)
        if parent == path or osp.isdir(path):
            return
        path = parent


class WorkDirBusyError(OSError):
    """Another training run holds the work dir (:func:`lock_work_dir`)."""


#: ``{work dir: FolderLocks}`` of the training runs this process built (a later one in the same folder takes over)
_WORK_DIR_LOCKS: dict = {}


def _global_rank() -> int:
    for var in ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK"):
        value = os.environ.get(var, "").strip()
        if value.isdigit():
            return int(value)
    return 0


def _lock_holder(path: str) -> Optional[int]:
    """The process id holding a ``flock`` on folder ``path`` (Linux ``/proc/locks``), or ``None``."""
    try:
        st = os.stat(path)
        want = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
        with open("/proc/locks", encoding="ascii", errors="replace") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5] == want and fields[4].isdigit():
                    return int(fields[4])
    except OSError:
        pass
    return None


#: seconds a new run waits for a work dir whose locking run is dead (its forked DataLoader workers, which share
#: the lock, notice and exit within a few seconds)
ORPHAN_WAIT_S = 30.0


def _alive(pid: int) -> bool:
    """Whether process ``pid`` runs (a zombie, killed and not yet reaped, does not)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as f:
            return f.read().rsplit(")", 1)[-1].split()[0] not in ("Z", "X")
    except OSError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def lock_work_dir(work_dir: str):
    """Hold training work dir ``work_dir`` for this run (an exclusive ``flock`` on the folder itself, as the
    store's folder locks: no lock file, released when the process ends, a kill included); returns the
    :class:`internvit.store.FolderLocks` to release. Another run holding it is a :class:`WorkDirBusyError`
    naming that run (its process id and newest log folder). When the process that took the lock is dead (killed:
    its forked DataLoader workers share the lock until they notice and exit), the lock is waited for, up to
    :data:`ORPHAN_WAIT_S` seconds, so a ``--resume`` right after a kill is not refused. Distributed runs: rank 0
    holds it for all ranks. A file system without ``flock`` on folders is not locked."""
    from internvit.store import FolderLocks

    locks = FolderLocks()
    if _global_rank() != 0:
        return locks
    key = osp.realpath(work_dir)
    earlier = _WORK_DIR_LOCKS.pop(key, None)
    if earlier is not None:  # a runner this process built before (not training now): this one takes over
        earlier.release()
    deadline = time.monotonic() + ORPHAN_WAIT_S
    while True:
        try:
            got = locks(work_dir)
        except OSError as e:
            if isinstance(e, BlockingIOError):
                got = None
            else:  # no flock on this file system
                return locks
        pid = None if got is not None else _lock_holder(work_dir)
        if got is not None or pid is None or _alive(pid) or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the run that took it was killed; its DataLoader workers (forked: they share the lock)
        # are still exiting: a --resume right after the kill waits for them instead of being refused
    if got is None:
        logs = sorted(n for n in os.listdir(work_dir) if _RUN_FOLDER.match(n))
        who = f"pid {pid}" if pid is not None else "another process"
        log = f", its log folder {osp.join(work_dir, logs[-1])}" if logs else ""
        raise WorkDirBusyError(f"--work-dir {work_dir}: another training run ({who}{log}) is using this work dir: "
                               f"wait for it to end, or give another --work-dir")
    _WORK_DIR_LOCKS[key] = locks
    return locks


def _release_after_training(runner, lock) -> None:
    """The runner's ``train`` releases the work dir lock when it returns or raises."""
    train = runner.train

    def call(*args, **kwargs):
        try:
            return train(*args, **kwargs)
        finally:
            lock.release()
            for key, held in list(_WORK_DIR_LOCKS.items()):
                if held is lock:
                    del _WORK_DIR_LOCKS[key]

    call.__name__, call.__doc__ = "train", getattr(train, "__doc__", None)
    runner.train = call


#: files a training run writes in its work dir besides the periodic checkpoints: ``save_best`` checkpoints
_BEST_CHECKPOINT = re.compile(r"^best_.+_(iter|epoch)_\d+\.pth$")


def set_aside_earlier_run(runner, work_dir: str) -> Optional[str]:
    """``--overwrite``: move the checkpoints an earlier run wrote in ``work_dir`` (``last_checkpoint``, the
    periodic ``iter_N.pth`` / ``epoch_N.pth`` (or the checkpoint hook's ``filename_tmpl``), ``best_*_N.pth``)
    into a new folder ``work_dir/overwritten_<time>/`` before the new run starts, so that a ``--resume`` of the
    new run never continues the earlier one. Other files (a user's own ``.pth``, logs, ``hf_model``) stay. The
    log names what moved where; returns that folder (``None``: nothing to move). A ``load_from`` among them (a
    new run from the earlier run's weights) is read from its new place.

    Killed part way (each move is one ``rename``), nothing is lost and the work dir is a state of the earlier
    run: the best and older checkpoints move first, then ``last_checkpoint``, then the newest checkpoint, so a
    ``--resume`` continues the earlier run from its newest checkpoint or, once that moved, starts anew; a rerun
    with ``--overwrite`` moves what is left into another ``overwritten_<time>/``."""
    import time

    cfg = runner.cfg

    periodic = [osp.basename(p) for _, p in _checkpoint_steps(cfg, work_dir)][::-1]  # oldest first
    names = sorted(n for n in os.listdir(work_dir) if _BEST_CHECKPOINT.match(n) and n not in periodic)
    names += periodic[:-1]
    if osp.isfile(osp.join(work_dir, "last_checkpoint")):
        names.append("last_checkpoint")
    names += periodic[-1:]  # last: until it moves, a --resume continues the earlier run from its newest checkpoint
    if not names:
        return None
    aside = osp.join(work_dir, "overwritten_" + time.strftime("%Y%m%d_%H%M%S"))
    n = 0
    while osp.exists(aside + (f"_{n}" if n else "")):
        n += 1
    aside += f"_{n}" if n else ""
    os.mkdir(aside)
    load_from = getattr(runner, "_load_from", None)
    for name in names:
        os.replace(osp.join(work_dir, name), osp.join(aside, name))
        if load_from and _is_local(load_from) and osp.abspath(load_from) == osp.join(work_dir, name):
            runner._load_from = cfg.load_from = osp.join(aside, name)
    shown = ", ".join(names[:5]) + (f", ... ({len(names)} in all)" if len(names) > 5 else "")
    runner.logger.warning(f"--overwrite: the earlier run's checkpoints ({shown}) moved to {aside} (remove it when "
                          f"no longer needed)")
    return aside


#: the log folder mmengine makes in the work dir for every run (``20261203_132427``)
_RUN_FOLDER = re.compile(r"^\d{8}_\d{6}$")


def check_work_dir(work_dir: str, config_copy: str, resuming: bool, checkpoints: bool = True) -> None:
    """Refuse a training work dir holding files the run would replace (``FileExistsError`` naming them and the
    ways out): checkpoints (``*.pth``, ``last_checkpoint``) when the run does not resume (mmengine replaced an
    earlier run's ``iter_N.pth`` / a user's ``epoch_1.pth`` silently), and, when not resuming, in a folder
    without a run's log folder (``YYYYmmdd_HHMMSS/``, so no run wrote there), a file named like the run's config
    copy ``config_copy`` (a resumed run continues the run whose checkpoint it reads: its folder). A test run
    (``checkpoints=False``) writes no checkpoint: only the config copy is checked."""
    if not osp.isdir(work_dir):
        return
    names = sorted(os.listdir(work_dir))
    held = [n for n in names if (n.endswith(".pth") or n == "last_checkpoint") and not osp.isdir(osp.join(work_dir, n))]
    if held and checkpoints and not resuming:
        shown = ", ".join(held[:4]) + (f", ... ({len(held)} in all)" if len(held) > 4 else "")
        raise FileExistsError(f"--work-dir {work_dir}: holds checkpoints ({shown}) that this run would replace: "
                              f"--resume to continue that run, --overwrite to train anew over them, or give "
                              f"another --work-dir")
    if config_copy in names and not resuming and not any(_RUN_FOLDER.match(n) for n in names):
        raise FileExistsError(f"--work-dir {work_dir}: holds {config_copy}, which no run wrote there (no run log "
                              f"folder), and the run's config copy would replace it: give another --work-dir, or "
                              f"--overwrite")


def _checkpoint_steps(cfg, work_dir: str) -> list[tuple[int, str]]:
    """``[(step, path)]`` of the periodic checkpoints in ``work_dir`` (``iter_N.pth`` / ``epoch_N.pth``, or the
    checkpoint hook's ``filename_tmpl``), newest first; best and published checkpoints are not among them."""
    hook = (cfg.get("default_hooks") or {}).get("checkpoint") or {}
    templates = [hook["filename_tmpl"]] if hook.get("filename_tmpl") else ["iter_{}.pth", "epoch_{}.pth"]
    patterns = [re.compile("^" + re.escape(t).replace(r"\{\}", r"(\d+)") + "$") for t in templates]
    found = []
    for name in os.listdir(work_dir):
        for pattern in patterns:
            m = pattern.match(name)
            if m and osp.isfile(osp.join(work_dir, name)):
                found.append((int(m.group(1)), osp.join(work_dir, name)))
    return sorted(found, reverse=True)


def _readable(path: str) -> Optional[str]:
    """None when ``path`` is a checkpoint that loads (without running code), else why not (one line)."""
    if not osp.isfile(path):
        return "no such file"
    try:
        compat.load_runner_checkpoint(path, "cpu", mmap=True)
    except Exception as e:  # noqa: BLE001 - any failure to read makes it unusable for resuming
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return None


def latest_complete_checkpoint(cfg) -> Optional[str]:
    """The checkpoint ``--resume`` (auto) continues from: the one ``work_dir/last_checkpoint`` names when it
    loads; else (a missing or unreadable file, e.g. after a kill during a save by a version that wrote in
    place) the newest periodic checkpoint of the work dir, by iteration / epoch number, that loads, with a
    warning naming it. None when the work dir has no checkpoint at all; when it has some but none loads, the
    one ``last_checkpoint`` names (or the newest) is returned, and reading it reports why. In a copied or moved
    work dir (``last_checkpoint`` names a file of another folder, and this one has a file of that name) the
    work dir's own file is used, with a warning."""
    from mmengine.logging import print_log
    from mmengine.runner import find_latest_checkpoint

    work_dir = cfg.work_dir
    named = find_latest_checkpoint(work_dir) or None
    if named and _is_local(named) and osp.abspath(osp.dirname(named)) != osp.abspath(work_dir) \
            and osp.isfile(osp.join(work_dir, osp.basename(named))):
        # mmengine records an absolute path: in a copied or moved work dir it names the other folder's file
        print_log(f"--resume: last_checkpoint names {named}, outside {work_dir} (a copied or moved work dir); "
                  f"resuming from this work dir's {osp.basename(named)}", logger="current", level=logging.WARNING)
        named = osp.join(work_dir, osp.basename(named))
    why = _readable(named) if named else "work_dir/last_checkpoint is missing or empty"
    if named and why is None:
        return named
    candidates = _checkpoint_steps(cfg, work_dir)
    for _, path in candidates:
        if named and osp.abspath(path) == osp.abspath(named):
            continue
        if _readable(path) is None:
            print_log(f"--resume: {named or 'last_checkpoint'} cannot be used ({why}); resuming from {path}, "
                      f"the newest complete checkpoint in {work_dir}", logger="current", level=logging.WARNING)
            return path
    return named or (candidates[0][1] if candidates else None)
