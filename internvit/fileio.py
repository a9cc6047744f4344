"""Atomic file and folder writes: build the result under a temporary name beside the target, then rename.

A crash or an exception while writing never leaves a half-written target behind, and readers only ever see
the old target or the complete new one (``os.replace`` is atomic within a file system).
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Iterator, Union

__all__ = ["atomic_write"]


def _current_umask() -> int:
    try:  # Linux: read it without touching the process state
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextmanager
def atomic_write(path: Union[str, os.PathLike], *, is_dir: bool = False) -> Iterator[str]:
    """Yield a temporary path beside ``path`` (same folder, same extension); when the block succeeds it
    replaces ``path`` (an existing folder is removed first for ``is_dir``), when it raises it is removed.

    Files are created empty as ``.{name}.{random}.tmp{ext}`` (the extension stays the last suffix, so e.g.
    ``np.save`` writes exactly that file); folders as ``.{name}.tmp-{random}``. The result gets the usual
    permissions of a new file or folder (``0o666`` / ``0o777`` less the umask), not ``tempfile``'s private ones.
    The parent folder is created if missing.
    """
    path = os.path.abspath(os.fspath(path))
    parent, name = os.path.split(path)
    os.makedirs(parent, exist_ok=True)
    if is_dir:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{name}.tmp-")
        mode = 0o777
    else:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{name}.", suffix=f".tmp{os.path.splitext(name)[1]}")
        os.close(fd)
        mode = 0o666
    try:
        os.chmod(tmp, mode & ~_current_umask())
        yield tmp
        if is_dir and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        if is_dir:
            shutil.rmtree(tmp, ignore_errors=True)
        elif os.path.lexists(tmp):
            os.remove(tmp)
        raise
