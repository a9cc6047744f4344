"""The one durable-output mechanism: every folder the project writes commits through :class:`Store`.

Guarantees (what a kill, a second writer and a reader see):

* **One commit point.** A folder's committed state is its ``manifest.json``, replaced atomically (temporary
  file, ``fsync``, ``rename``, ``fsync`` of the folder). Readers (:func:`read_manifest`) only look at what the
  committed manifest references; they never take a lock and never see a half-written file.
* **Immutable data files.** Data files are written once (temporary name, ``fsync``, ``rename``) and never
  rewritten while a committed manifest references them; a new state writes new (generation-named, see
  :func:`generation_name`) files. Files the previous manifest referenced but the new one does not stay on disk
  until the next writer opens the folder, so a reader that read the previous manifest can still open them.
* **A journal for the job in progress.** Before a data file is created its name is appended (``fsync``) to
  ``.store/journal.jsonl`` with the job's identity (a JSON dict, e.g. the arguments that decide the output). If
  the process dies, the job is *pending*: rerunning the same job resumes it (its complete files are kept and
  listed in :attr:`Store.pending_files`, its saved state in :attr:`Store.state`); a *different* job is refused
  with :class:`PendingJobError` naming the first field that differs (``discard_pending=True`` drops it
  explicitly). Files that neither the committed manifest nor the pending journal reference, and temporary
  files, are removed when the next writer opens the folder. Files the store did not create are never removed
  or overwritten (:class:`StoreError`).
* **One writer at a time.** A writer holds an exclusive lock (``.store/lock``, ``filelock``; a whole-folder
  replacement locks the folders themselves with ``flock``); a second writer gets :class:`StoreBusyError` at once,
  never interleaved writes.
* **Whole-folder replacement** (:func:`replace_folder`, used by ``save_model``): the new folder is built beside
  the old one and swapped in with one ``renameat2(RENAME_EXCHANGE)`` (or, where that is missing, two renames
  with a recoverable backup), so there is never a moment in which neither the old nor the new copy exists.

Fault injection (for tests): with ``INTERNVIT_STORE_FAULT_AT=N`` the process exits with status
:data:`FAULT_EXIT_CODE` (``os._exit``, no clean-up) at the N-th durable write point; with
``INTERNVIT_STORE_TRACE=FILE`` every write point appends its name to FILE; with ``INTERNVIT_STORE_FAULT_WAIT=FILE``
the fault first waits (at most 120 s) until FILE exists, so a test can order what several processes reach.
``tests/faults.py`` kills an operation at every point in turn.

This module imports only the standard library and ``filelock``.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Sequence, TypeVar, Union

__all__ = ["Store", "StoreError", "StoreBusyError", "PendingJobError", "read_manifest", "committed_files",
           "read_consistent", "replace_folder", "refuse_foreign_folder", "generation_name", "job_id", "fsync_dir",
           "MANIFEST", "FAULT_EXIT_CODE"]

MANIFEST = "manifest.json"
STORE_DIR = ".store"
JOURNAL = os.path.join(STORE_DIR, "journal.jsonl")
LOCK = os.path.join(STORE_DIR, "lock")
#: the scratch folder of a job written by several processes (``torchrun`` ranks): ``PARTS/rank-R-of-W`` holds
#: rank R's own sub-store until the folder's writer merges and removes it (:mod:`internvit.distributed_features`)
PARTS = ".parts"
TMP_SUFFIX = ".store-tmp"
STORE_KEY = "_store"
FAULT_EXIT_CODE = 75
PathLike = Union[str, os.PathLike]
T = TypeVar("T")


class StoreError(RuntimeError):
    """A store folder cannot be written or read as asked (the message names the folder and the reason)."""


class StoreBusyError(StoreError):
    """Another writer holds the folder's lock."""


class PendingJobError(StoreError):
    """The folder holds an interrupted job that differs from the one asked for."""


class ForeignFolderError(StoreError, ValueError):
    """The folder holds (or a killed job was writing) another kind of content than the writer's
    ``description``: refused even with ``discard_pending`` (an ``--overwrite`` replaces its own kind only).
    Also a ``ValueError``, as the writers' own refusals of a committed folder of another kind are."""


# ---------------------------------------------------------------------------------------------------------
# Write points (fault injection)
# ---------------------------------------------------------------------------------------------------------
_points = 0


def _point(name: str) -> None:
    """Mark a durable write point: trace it, and exit here if fault injection asks for this one."""
    global _points
    _points += 1
    trace = os.environ.get("INTERNVIT_STORE_TRACE")
    if trace:
        with open(trace, "a", encoding="utf-8") as f:
            f.write(f"{_points}\t{name}\n")
    at = os.environ.get("INTERNVIT_STORE_FAULT_AT")
    if at and int(at) == _points:
        wait = os.environ.get("INTERNVIT_STORE_FAULT_WAIT")
        deadline = time.monotonic() + 120
        while wait and not os.path.exists(wait) and time.monotonic() < deadline:
            time.sleep(0.05)  # another process must reach a state first (a test's scenario, made deterministic)
        os._exit(FAULT_EXIT_CODE)


# ---------------------------------------------------------------------------------------------------------
# Small durable primitives
# ---------------------------------------------------------------------------------------------------------
def fsync_dir(path: PathLike) -> None:
    """``fsync`` a folder so that renames and unlinks in it are durable (no-op where unsupported)."""
    try:
        fd = os.open(os.fspath(path), os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _fsync_file(path: str) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _tmp_beside(path: str) -> str:
    parent, name = os.path.split(path)
    os.makedirs(parent or ".", exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=parent or ".", prefix=f".{name}.", suffix=TMP_SUFFIX)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())
    return tmp


@contextmanager
def named_write_errors(path: str, space_only: bool = False) -> Iterator[None]:
    """Re-raise an ``OSError`` of writing ``path`` naming the file and the reason (``errno``); every write of a
    :class:`Store` (data files, journal, manifest) goes through it.

    numpy reports a short write as ``'N requested and M written'`` and pyarrow wraps the system error in its
    own text; both become ``OSError(errno, '<strerror> (<ENAME>) while writing <path>; ...')``. With
    ``space_only``, only a full file system or quota (ENOSPC, EDQUOT, EFBIG, a short write) is reworded and
    other errors pass as they are (the block may also read, e.g. a source it copies).
    """
    try:
        yield
    except OSError as e:
        code = e.errno
        text = str(e)
        if code is None:
            m = re.search(r"errno\s*(\d+)", text, re.IGNORECASE)
            code = int(m.group(1)) if m else None
        if code is None and ("No space left on device" in text or re.search(r"\d+ requested and \d+ written", text)):
            code = errno.ENOSPC  # a short write: the file system is full
        space = code in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
        if space_only and not space:
            raise
        if code is None:
            raise OSError(f"{path}: {text}") from e
        hint = "; free some space and rerun the same command to resume" if space else ""
        raise OSError(code, f"{os.strerror(code)} ({errno.errorcode.get(code, code)}) while writing {path}{hint}"
                      ) from e



def _atomic_json(path: str, obj: Any, point: str) -> None:
    tmp = _tmp_beside(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2, sort_keys=False, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        _point(f"{point}:written")
        os.replace(tmp, path)
    except BaseException:
        if os.path.lexists(tmp):
            os.remove(tmp)
        raise
    fsync_dir(os.path.dirname(path) or ".")
    _point(f"{point}:renamed")


def refuse_foreign_folder(path: PathLike, markers: Sequence[str], what: str) -> None:
    """Raise ``FileExistsError`` when ``path`` is a folder that holds files but none of ``markers`` (``fnmatch``
    patterns of the entries a writer of ``what`` leaves: ``manifest.json``, ...) nor the store's own entries
    (:data:`STORE_DIR`, and :data:`PARTS`, which the ranks of a distributed job killed before its merge leave):
    a user's folder, which a job writing its files by name would fill, fail on or replace. Checked before any
    work; a missing or empty folder, or one of a finished or interrupted job of that kind, passes. A ``path``
    that is a file, or lies under one, raises ``NotADirectoryError`` naming that file."""
    import fnmatch

    path = os.fspath(path)
    existing = os.path.abspath(path)
    while not os.path.lexists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    if os.path.lexists(existing) and not os.path.isdir(existing):
        where = path if existing == os.path.abspath(path) else f"{path}: {existing}"
        raise NotADirectoryError(f"{where}: a file, not a folder: give a new or empty folder for the {what}")
    if not os.path.isdir(path):
        return
    names = sorted(os.listdir(path))
    markers = (*markers, STORE_DIR, PARTS)
    if names and not any(fnmatch.fnmatchcase(n, m) for n in names for m in markers):
        shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
        article = _article(what)
        raise FileExistsError(f"{path}: a folder that is not empty ({shown}) and holds no {what}: give a new or "
                              f"empty folder (or the folder of {article} {what} to resume or extend)")


def first_missing_dir(path: PathLike) -> Optional[str]:
    """The highest folder of ``path`` (itself included) that does not exist yet, i.e. the one to remove to undo
    ``os.makedirs(path)``; None when ``path`` exists."""
    path = os.path.abspath(os.fspath(path))
    if os.path.lexists(path):
        return None
    while not os.path.lexists(os.path.dirname(path)) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return path


def make_dirs(path: PathLike) -> Optional[str]:
    """``os.makedirs(path, exist_ok=True)`` that says what it made: the highest folder this call created
    (the one to remove to undo it), ``None`` when ``path`` existed. A folder another process creates meanwhile
    is not counted as made here (so a refused job never removes another's folder)."""
    path = os.path.abspath(os.fspath(path))
    missing = []
    p = path
    while not os.path.isdir(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    made = None
    for p in reversed(missing):
        try:
            os.mkdir(p)
        except FileExistsError:
            continue
        made = made or p
    return made


def generation_name(name: str, generation: int) -> str:
    """``('image.index', 3)`` → ``'image.g0003.index'``: a new file name for each committed generation."""
    stem, ext = os.path.splitext(name)
    return f"{stem}.g{int(generation):04d}{ext}"


def job_id(job: Optional[Mapping[str, Any]]) -> str:
    """A stable short hash of a job's identity (a JSON-able dict)."""
    text = json.dumps(job, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------------------
def read_manifest(folder: PathLike) -> Optional[dict]:
    """The committed manifest of ``folder`` (``None`` when nothing was committed yet).

    Raises :class:`StoreError` naming the file when it exists but is not a JSON object.
    """
    path = os.path.join(os.fspath(folder), MANIFEST)
    try:
        with open(path, encoding="utf-8") as f:
            obj = json.load(f)
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StoreError(f"{path}: not a valid manifest ({e})") from None
    if not isinstance(obj, dict):
        raise StoreError(f"{path}: not a valid manifest (a JSON object is expected)")
    return obj


def committed_files(manifest: Optional[Mapping[str, Any]]) -> list[str]:
    """The data files (relative paths) a committed manifest references."""
    if not manifest:
        return []
    return list((manifest.get(STORE_KEY) or {}).get("files", []))


def read_consistent(folder: PathLike, read: Callable[[dict], T], *, attempts: int = 5) -> T:
    """``read(manifest)`` against one committed state of ``folder``.

    Files of a superseded state are removed only when a later writer opens the folder; if that happens between
    reading the manifest and opening a file (``FileNotFoundError``), the read is retried on the newer manifest.
    Raises :class:`StoreError` when the folder has no committed manifest.
    """
    folder = os.fspath(folder)
    last: Optional[BaseException] = None
    for _ in range(max(1, attempts)):
        manifest = read_manifest(folder)
        if manifest is None:
            raise StoreError(f"{folder}: no {MANIFEST} (nothing committed there)")
        try:
            return read(manifest)
        except FileNotFoundError as e:
            last = e
            if read_manifest(folder) == manifest:
                raise
    raise StoreError(f"{folder}: the folder kept changing while being read ({last})")


# ---------------------------------------------------------------------------------------------------------
# The writer
# ---------------------------------------------------------------------------------------------------------
def _first_difference(a: Any, b: Any, prefix: str = "") -> Optional[tuple[str, Any, Any]]:
    if isinstance(a, Mapping) and isinstance(b, Mapping):
        for key in list(a) + [k for k in b if k not in a]:
            if key not in a or key not in b:
                return f"{prefix}{key}", a.get(key), b.get(key)
            d = _first_difference(a[key], b[key], f"{prefix}{key}.")
            if d:
                return d
        return None
    return None if a == b else (prefix.rstrip(".") or "job", a, b)


def _article(noun: str) -> str:
    return "an" if noun[:1] in "aeiou" else "a"


def _short(v: Any, limit: int = 60) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= limit else s[:limit] + "..."


def journal_records(folder: PathLike) -> list[dict]:
    """The records of ``folder``'s store journal, in order (``[]`` when there is none); a line torn by a kill
    mid-append (never acknowledged) is skipped. Read only: no lock is taken."""
    try:
        with open(os.path.join(os.fspath(folder), JOURNAL), encoding="utf-8") as f:
            lines = f.read().split("\n")
    except (FileNotFoundError, NotADirectoryError):
        return []
    out = []
    for line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict):
            out.append(rec)
    return out


def refuse_other_kind(folder: PathLike, description: str) -> None:
    """:class:`ForeignFolderError` when ``folder``'s recorded kind (its committed manifest's, else its pending
    job's) is not ``description``; reads only, so a tool can check before any work (``Store`` checks on
    entering). Folders written before the kind was recorded (2026-12-04) pass (their writers' own checks
    apply)."""
    folder = os.path.abspath(os.fspath(folder))
    if not os.path.isdir(folder):
        return
    recorded, what = ((read_manifest(folder) or {}).get(STORE_KEY) or {}).get("description"), "holds"
    if recorded is None:
        header = next((r for r in reversed(journal_records(folder)) if r.get("op") == "begin"), None)
        recorded, what = (header or {}).get("description"), "holds the interrupted job of"
    if recorded is not None and recorded != description:
        raise ForeignFolderError(
            f"{folder}: {what} {_article(recorded)} {recorded}, not {_article(description)} {description}: "
            f"nothing was changed; give another folder (overwrite / --overwrite replaces only its own kind of "
            f"folder)")


class Store:
    """Exclusive, crash-safe writer of one output folder (use as a context manager).

    Args:
        folder: the output folder (created if missing).
        job: what identifies this job (a JSON-able dict, e.g. the arguments that decide the output). A pending
            (interrupted) job is resumed only by the same ``job``.
        discard_pending: drop a pending job of another identity (its files are removed) instead of refusing.
        description: the kind of content (``'feature folder'``, ``'index'``): named in messages, and recorded in
            the journal and the manifest's ``_store`` block. A folder whose recorded kind differs (committed, or
            the pending job of a killed first run) is refused with :class:`ForeignFolderError`, also with
            ``discard_pending``: a writer never replaces another kind of folder (an index with features).

    Raises (on entering): :class:`StoreBusyError` if another writer holds the folder, :class:`PendingJobError`
    if a different job is pending, :class:`ForeignFolderError` if it holds another kind of content,
    :class:`StoreError` if the folder cannot be used.

    Inside the block: :attr:`manifest` (committed, or ``None``), :attr:`state` / :attr:`pending_files` (what an
    interrupted run of the same job left), :meth:`open_file` / :meth:`write_json` / :meth:`write_bytes` for new
    data files, :meth:`save_state` for progress, :meth:`commit` for the new manifest, :meth:`abort` to drop the
    job. Leaving the block without :meth:`commit` keeps the job pending (a rerun resumes it).
    """

    def __init__(self, folder: PathLike, *, job: Optional[Mapping[str, Any]] = None, discard_pending: bool = False,
                 description: str = "folder") -> None:
        self.folder = os.path.abspath(os.fspath(folder))
        self.job = json.loads(json.dumps(dict(job or {}), default=str))  # JSON-normalised, comparable with a file
        self.job_id = job_id(self.job)
        self.discard_pending = discard_pending
        self.description = description
        self.manifest: Optional[dict] = None
        self.state: dict = {}
        self.pending_files: set[str] = set()
        self._intents: set[str] = set()
        self._journal_started = False
        self._made: Optional[str] = None
        self._lock = None
        self._held = False
        self.committed = False

    # -- entering: lock + recovery ------------------------------------------------------------------------
    def __enter__(self) -> "Store":
        from filelock import FileLock, Timeout

        if os.path.exists(self.folder) and not os.path.isdir(self.folder):
            raise StoreError(f"{self.folder}: exists and is not a folder")
        self._made = make_dirs(os.path.join(self.folder, STORE_DIR))  # removed again if nothing is written
        self._lock = FileLock(os.path.join(self.folder, LOCK), timeout=0)
        try:
            self._lock.acquire()
        except Timeout:
            self._lock = None
            raise StoreBusyError(f"{self.folder}: another process is writing this {self.description} "
                                 f"(lock {LOCK} is held); wait for it to finish") from None
        try:
            self._recover()
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, *exc) -> None:
        self._release()
        if exc_type is not None and self._made and not self._journal_started and not self._held:
            self._unmake()

    def hold(self) -> None:
        """Keep the folder's ownership (its :data:`STORE_DIR`) even if the block ends in an error before this
        job wrote anything: call it once other processes start writing into the folder for this job (the ranks
        of a distributed job, each into its own sub-store under :data:`PARTS`). Without it, a refused job's
        ``.store`` is removed again, and a rank killed before the merge left only ``.parts``, which the next run
        took for a user's folder and refused."""
        if self._lock is None:
            raise StoreError(f"{self.folder}: hold() outside the `with Store(...)` block")
        self._held = True

    def _unmake(self) -> None:
        """Remove the ``.store`` folder (and the output folders) this block created when it fails before writing
        anything (a refused job): only if nothing but the lock file is in it and the folders it made are empty."""
        store = os.path.join(self.folder, STORE_DIR)
        if set(os.listdir(store)) - {os.path.basename(LOCK)}:
            return
        shutil.rmtree(store, ignore_errors=True)
        path = self.folder
        while self._made != store and os.path.isdir(path) and not os.listdir(path):
            os.rmdir(path)
            if path == self._made:
                break
            path = os.path.dirname(path)

    def _release(self) -> None:
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _path(self, rel: str) -> str:
        rel = os.path.normpath(rel)
        if os.path.isabs(rel) or rel.startswith("..") or rel.split(os.sep)[0] == STORE_DIR or rel == MANIFEST:
            raise StoreError(f"{self.folder}: {rel!r} is not a data-file name inside the folder")
        return os.path.join(self.folder, rel)

    def _read_journal(self) -> tuple[Optional[dict], set[str], dict]:
        header, intents, state = None, set(), {}
        for rec in journal_records(self.folder):
            if rec.get("op") == "begin":
                header = rec
            elif rec.get("op") == "file":
                intents.add(rec["name"])
            elif rec.get("op") == "state":
                state.update(rec.get("state") or {})
        return header, intents, state

    def _remove(self, rel: str) -> None:
        path = os.path.join(self.folder, rel)
        if os.path.lexists(path):
            os.remove(path)
            _point("gc:removed")

    def _refuse_foreign(self) -> None:
        refuse_other_kind(self.folder, self.description)

    def _recover(self) -> None:
        self._refuse_foreign()
        # 1. temporary files of interrupted writes (only names this module makes)
        for root, _dirs, files in os.walk(self.folder):
            for name in files:
                if name.endswith(TMP_SUFFIX):
                    os.remove(os.path.join(root, name))
        self.manifest = read_manifest(self.folder)
        store = (self.manifest or {}).get(STORE_KEY) or {}
        keep = set(store.get("files", []))
        # 2. files of the generation before the committed one (readers had until now to finish with them)
        for rel in store.get("retired", []):
            if rel not in keep:
                self._remove(rel)
        header, intents, state = self._read_journal()
        if header is None:
            for rel in sorted(intents - keep):
                self._remove(rel)
            self._drop_journal()
            return
        base = int(store.get("generation") or 0)
        if header.get("generation") != base:
            header = None  # its job was committed (only the clean-up was interrupted), or the state moved on
        if header is not None and header.get("job_id") != self.job_id and not self.discard_pending:
            d = _first_difference(header.get("job") or {}, self.job) or ("job", None, None)
            raise PendingJobError(
                f"{self.folder}: an interrupted job is pending in this {self.description} and this one differs "
                f"({d[0]}: {_short(d[1])} there, {_short(d[2])} now); rerun the interrupted command to finish "
                f"it, or discard it explicitly")
        if header is None or header.get("job_id") != self.job_id:
            for rel in sorted(intents - keep):
                self._remove(rel)
            self._drop_journal()
            return
        # 3. resume: the same job continues; its complete files stay
        self._journal_started = True
        self._intents = intents
        self.pending_files = {rel for rel in intents if os.path.isfile(os.path.join(self.folder, rel))}
        self.state = state

    def _drop_journal(self) -> None:
        path = os.path.join(self.folder, JOURNAL)
        if os.path.exists(path):
            os.remove(path)
            fsync_dir(os.path.join(self.folder, STORE_DIR))
            _point("journal:dropped")
        self._journal_started = False
        self._intents = set()

    def _append(self, rec: dict) -> None:
        if not self._journal_started:
            self._journal_started = True
            gen = ((self.manifest or {}).get(STORE_KEY) or {}).get("generation") or 0
            self._append({"op": "begin", "job_id": self.job_id, "generation": gen, "job": self.job,
                          "description": self.description})
        path = os.path.join(self.folder, JOURNAL)
        created = not os.path.exists(path)
        with named_write_errors(path), open(path, "a", encoding="utf-8") as f:
            f.write(json.dumps(rec, default=str, separators=(",", ":")) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if created:
            fsync_dir(os.path.dirname(path))
        _point(f"journal:{rec['op']}")

    # -- the generation being written ------------------------------------------------------------------
    @property
    def generation(self) -> int:
        """The generation number the next :meth:`commit` creates (1 for a new folder)."""
        return int(((self.manifest or {}).get(STORE_KEY) or {}).get("generation") or 0) + 1

    def _check_writable(self, rel: str) -> str:
        if self._lock is None:
            raise StoreError(f"{self.folder}: write outside the `with Store(...)` block")
        path = self._path(rel)
        rel = os.path.relpath(path, self.folder)
        if rel in committed_files(self.manifest):
            raise StoreError(f"{self.folder}: {rel} belongs to the committed state and is immutable; "
                             f"write a new generation-named file")
        if os.path.lexists(path) and rel not in self._intents:
            raise StoreError(f"{path}: exists and was not written by this job; refusing to overwrite it")
        return rel

    @contextmanager
    def open_file(self, rel: str) -> Iterator[str]:
        """Yield a temporary path for the data file ``rel``; when the block succeeds the file is fsynced and
        renamed to ``rel`` (recorded in the journal first, so a kill never leaves an unknown file)."""
        rel = self._check_writable(rel)
        if rel not in self._intents:
            self._append({"op": "file", "name": rel})
            self._intents.add(rel)
        path = os.path.join(self.folder, rel)
        tmp = _tmp_beside(path)
        try:
            with named_write_errors(path, space_only=True):
                yield tmp
                _fsync_file(tmp)
            _point("file:written")
            os.replace(tmp, path)
        except BaseException:
            if os.path.lexists(tmp):
                os.remove(tmp)
            raise
        fsync_dir(os.path.dirname(path))
        _point("file:renamed")
        self.pending_files.add(rel)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write the data file ``rel`` with ``data`` (see :meth:`open_file`)."""
        with self.open_file(rel) as tmp, open(tmp, "wb") as f:
            f.write(data)

    def write_json(self, rel: str, obj: Any) -> None:
        """Write the data file ``rel`` as indented JSON (see :meth:`open_file`)."""
        self.write_bytes(rel, (json.dumps(obj, indent=2, default=str) + "\n").encode("utf-8"))

    def discard(self, rel: str) -> None:
        """Remove a data file this job wrote and no longer needs (e.g. a superseded checkpoint) before the
        commit; files of the committed state cannot be discarded (:class:`StoreError`)."""
        rel = os.path.relpath(self._path(rel), self.folder)
        if rel in committed_files(self.manifest):
            raise StoreError(f"{self.folder}: {rel} belongs to the committed state and cannot be discarded")
        if rel not in self._intents:
            raise StoreError(f"{self.folder}: {rel} was not written by this job; refusing to remove it")
        self._remove(rel)
        self.pending_files.discard(rel)

    def save_state(self, **state: Any) -> None:
        """Durably record progress of the pending job (merged into :attr:`state` of a resumed run)."""
        self._append({"op": "state", "state": state})
        self.state.update(json.loads(json.dumps(state, default=str)))

    # -- the commit point -------------------------------------------------------------------------------
    def commit(self, manifest: Mapping[str, Any], files: Iterable[str]) -> dict:
        """Make ``manifest`` (which references the data files ``files``) the folder's committed state.

        ``files`` must exist (written by this job or already committed). The manifest gets a ``_store`` block
        (generation, job id, files, retired files). Files of this job that ``files`` does not list are removed;
        files only the previous generation referenced are removed at the next writer's open. Returns the
        manifest as written.
        """
        files = sorted({os.path.relpath(self._path(f), self.folder) for f in files})
        missing = [f for f in files if not os.path.isfile(os.path.join(self.folder, f))]
        if missing:
            raise StoreError(f"{self.folder}: cannot commit, {missing[0]} does not exist")
        old = set(committed_files(self.manifest))
        foreign = [f for f in files if f not in old and f not in self._intents]
        if foreign:
            raise StoreError(f"{self.folder}: cannot commit {foreign[0]}: not written by this job")
        out = {k: v for k, v in manifest.items() if k != STORE_KEY}
        out[STORE_KEY] = {"generation": self.generation, "job_id": self.job_id, "files": files,
                          "retired": sorted(old - set(files)), "description": self.description}
        out = json.loads(json.dumps(out, default=str))
        with named_write_errors(os.path.join(self.folder, MANIFEST)):
            _atomic_json(os.path.join(self.folder, MANIFEST), out, "manifest")
        self.manifest, self.committed = out, True
        for rel in sorted(self._intents - set(files)):
            self._remove(rel)
        self._drop_journal()
        self.state, self.pending_files = {}, set()
        return out

    def abort(self) -> None:
        """Drop this job: remove the files it wrote and its journal (the committed state is unchanged)."""
        keep = set(committed_files(self.manifest))
        for rel in sorted(self._intents - keep):
            self._remove(rel)
        self._drop_journal()
        self.state, self.pending_files = {}, set()


# ---------------------------------------------------------------------------------------------------------
# Whole-folder replacement
# ---------------------------------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: str, b: str) -> bool:
    """Atomically swap two paths with ``renameat2(RENAME_EXCHANGE)``; ``False`` where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (38, 22, 95):  # ENOSYS, EINVAL, EOPNOTSUPP: the file system cannot exchange
        return False
    raise OSError(err, os.strerror(err), a)


def _fsync_tree(root: str) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            _fsync_file(os.path.join(dirpath, name))
        fsync_dir(dirpath)


def _lock_dir(path: str) -> Optional[int]:
    """An exclusive ``flock`` on a folder's own inode (no lock file); ``None`` if another process holds it."""
    import fcntl

    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    return fd


class FolderLocks:
    """Folder locks (:func:`_lock_dir`) taken one by one and released together: ``locks(folder)`` returns the
    lock's descriptor, or ``None`` if another process holds that folder; :meth:`release` drops them all."""

    def __init__(self) -> None:
        self.fds: list[int] = []

    def __call__(self, folder: str) -> Optional[int]:
        fd = _lock_dir(folder)
        if fd is not None:
            self.fds.append(fd)
        return fd

    def release(self) -> None:
        while self.fds:
            os.close(self.fds.pop())


def remove_folder(path: PathLike) -> None:
    """Remove a folder as one step: renamed first to a hidden temporary name beside it (``.{name}.removed-*`` +
    :data:`TMP_SUFFIX`, atomic), then deleted. A kill leaves either the whole folder or a hidden one nothing
    reads, never a folder of its old name with some of its files gone (which could pass for a complete one)."""
    path = os.path.abspath(os.fspath(path))
    if not os.path.lexists(path):
        return
    parent, name = os.path.dirname(path), os.path.basename(path)
    gone = tempfile.mkdtemp(prefix=f".{name}.removed-", suffix=TMP_SUFFIX, dir=parent)
    os.rename(path, os.path.join(gone, name))
    fsync_dir(parent)
    _point("folder:renamed-away")
    shutil.rmtree(gone, ignore_errors=True)


def clear_interrupted(parent: str, name: str, lock: Callable[[str], Optional[int]], skip: str = "") -> None:
    """Remove the temporary folders (``.{name}.*`` + :data:`TMP_SUFFIX`) that interrupted replacements of
    ``name`` left in ``parent``; ``lock(folder)`` returns ``None`` for one a live process holds, which is kept
    (so is ``skip``)."""
    for entry in os.listdir(parent):
        full = os.path.join(parent, entry)
        if (entry.startswith(f".{name}.") and entry.endswith(TMP_SUFFIX) and full != skip
                and os.path.isdir(full) and lock(full) is not None):
            shutil.rmtree(full, ignore_errors=True)


@contextmanager
def replace_folder(path: PathLike, *, description: str = "folder") -> Iterator[str]:
    """Build a folder's new content in a temporary folder beside it, then swap it in atomically.

    Yields the temporary folder. When the block succeeds every file is fsynced and the temporary folder takes
    ``path``'s place in one atomic exchange (the old copy is then removed); when it raises, the temporary folder
    is removed and ``path`` is untouched. At every instant ``path`` holds the complete old or the complete new
    copy (on file systems without ``renameat2`` the old copy is moved to a backup name for an instant; the next
    :func:`replace_folder` of the same path restores or removes it).

    Locking uses ``flock`` on the folders themselves (the existing ``path`` and the temporary folder), so no lock
    file is left behind: a second concurrent replacement of the same path gets :class:`StoreBusyError`, and the
    clean-up of an interrupted replacement never touches a temporary folder that a live process is building.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if os.path.lexists(path) and not os.path.isdir(path):
        raise StoreError(f"{path}: exists and is not a folder")
    busy = StoreBusyError(f"{path}: another process is writing this {description}")
    lock = FolderLocks()
    try:
        existed = os.path.isdir(path)
        if existed and lock(path) is None:
            raise busy
        backup = os.path.join(parent, f".{name}.old{TMP_SUFFIX}")
        if os.path.isdir(backup):  # an interrupted two-rename swap: restore or finish it
            if lock(backup) is None:
                raise busy
            if os.path.isdir(path):
                shutil.rmtree(backup)
            else:
                os.replace(backup, path)
                existed = True
            fsync_dir(parent)
        clear_interrupted(parent, name, lock, skip=backup)
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=TMP_SUFFIX)
        os.chmod(tmp, 0o777 & ~_umask())
        lock(tmp)
        try:
            yield tmp
            _fsync_tree(tmp)
            _point("folder:written")
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if existed:
            if _exchange(tmp, path):
                fsync_dir(parent)
                _point("folder:exchanged")
            else:
                os.replace(path, backup)
                _point("folder:backed-up")
                os.replace(tmp, path)
                fsync_dir(parent)
                _point("folder:renamed")
                tmp = backup
            shutil.rmtree(tmp, ignore_errors=True)
            _point("folder:old-removed")
        else:
            try:
                os.replace(tmp, path)
            except OSError:  # another process created `path` meanwhile
                shutil.rmtree(tmp, ignore_errors=True)
                raise busy from None
            fsync_dir(parent)
            _point("folder:renamed")
    finally:
        lock.release()


def managed_folder(path: str) -> Optional[str]:
    """The folder written through this store (an index, embeddings or feature folder: it holds :data:`STORE_DIR`
    or a committed :data:`MANIFEST` with the store's ``_store`` record) that ``path`` lies in, at any depth;
    ``None`` when there is none. Tools refuse to write a file of their own there, even with ``--overwrite``: a
    report written over ``manifest.json`` destroys the folder's commit point."""
    folder = os.path.dirname(os.path.abspath(path))
    while True:
        if os.path.isdir(os.path.join(folder, STORE_DIR)):
            return folder
        try:
            with open(os.path.join(folder, MANIFEST), encoding="utf-8") as f:
                m = json.load(f)
            if isinstance(m, dict) and "_store" in m:
                return folder
        except (OSError, ValueError):
            pass
        parent = os.path.dirname(folder)
        if parent == folder:
            return None
        folder = parent


def check_outside_managed(flag: str, path: str) -> None:
    """``ValueError`` when the output file ``path`` of a tool (given as ``flag``) lies inside a folder written
    through this store (:func:`managed_folder`): such a folder's files are replaced only by the job that owns
    them, never by another tool's report, not even with ``--overwrite``."""
    managed = managed_folder(path)
    if managed is not None:
        raise ValueError(f"{flag} {path}: inside {managed}, a folder written by this project's tools (an index, "
                         f"embeddings or feature folder, whose manifest.json is its commit point); other outputs "
                         f"are never written there, even with --overwrite: give a path outside it")
