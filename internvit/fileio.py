"""Single-file and whole-folder replacement on top of :mod:`internvit.store` (no protocol of its own).

:func:`atomic_write` is for outputs that are *one* file or *one* folder (a converted checkpoint, a config, a
model directory). Folders are replaced with :func:`internvit.store.replace_folder` (never a moment without the
old or the new copy); a file is written beside its target, ``fsync``-ed, renamed over it and the folder
``fsync``-ed, as the store writes its data files. Outputs made of many files that grow or resume commit
through :class:`internvit.store.Store` instead.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Optional, Union

from .store import TMP_SUFFIX, FolderLocks, _point, _umask, clear_interrupted, fsync_dir, replace_folder

__all__ = ["atomic_write", "save_safetensors"]


@contextmanager
def atomic_write(path: Union[str, os.PathLike], *, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path``; when the block succeeds it durably replaces ``path``, when it
    raises it is removed and ``path`` is untouched.

    Files are created empty, with the usual permissions of a new file (``0o666`` less the umask) and ``path``'s
    own name (so e.g. ``np.save`` writes exactly that file), inside a temporary folder
    ``.{name}.{random}`` + :data:`~internvit.store.TMP_SUFFIX` beside it that the writing process holds a lock
    on: the temporary folders that killed writes of the same name left behind are removed on entry, a live
    writer's never. Folders (``is_dir=True``) go through :func:`internvit.store.replace_folder` (an existing
    folder is swapped out atomically; a concurrent replacement of the same folder raises
    :class:`~internvit.store.StoreBusyError`). The parent folder is created if missing.
    """
    path = os.path.abspath(os.fspath(path))
    if is_dir:
        with replace_folder(path) as tmp:
            yield tmp
        return
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    lock = FolderLocks()
    try:
        clear_interrupted(parent, name, lock, skip=os.path.join(parent, f".{name}.old{TMP_SUFFIX}"))
        tmp_dir = tempfile.mkdtemp(dir=parent, prefix=f".{name}.", suffix=TMP_SUFFIX)
        lock(tmp_dir)
        tmp = os.path.join(tmp_dir, name)
        try:
            open(tmp, "wb").close()
            os.chmod(tmp, 0o666 & ~_umask())
            yield tmp
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
            _point("file:written")
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp_dir, ignore_errors=True)
            raise
        fsync_dir(parent)
        _point("file:renamed")
        shutil.rmtree(tmp_dir, ignore_errors=True)
    finally:
        lock.release()


def save_safetensors(tensors: dict, path: str, metadata: Optional[dict] = None) -> None:
    """``safetensors.torch.save_file(tensors, path, metadata)`` with the usual permissions of a new file (``0o666``
    less the umask), as every other file we write: safetensors creates its files ``0o600``, which other users of
    a shared model folder cannot read. Write into an :func:`atomic_write` path for durability."""
    from safetensors.torch import save_file

    save_file(tensors, path, metadata=metadata)
    os.chmod(path, 0o666 & ~_umask())
