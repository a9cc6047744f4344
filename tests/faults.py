"""Fault-injection harness: kill an operation at every durable write point of :mod:`internvit.store` in turn.

    from tests.faults import kill_sweep

    def test_add_survives_every_kill(tmp_path):
        kill_sweep(tmp_path,
                   prepare=lambda d: make_index(d / "index"),           # the state before the operation
                   command=lambda d: [sys.executable, "tools/x.py", str(d / "index"), ...],
                   read=lambda d: read_what_a_reader_sees(d / "index"))  # comparable (==) value

For each write point ``n`` (counted by one uninterrupted run with ``INTERNVIT_STORE_TRACE``) a fresh copy of the
prepared state is made, the command is run with ``INTERNVIT_STORE_FAULT_AT=n`` (the process dies there with
``os._exit``, no clean-up), a reader must then see exactly the old or the new state, and rerunning the same
command must end in the uninterrupted result (``read`` equal, and the same files byte for byte unless
``compare_files=False``). ``after_kill(d, n)`` may run another operation first (e.g. a *different* command that
must be refused or complete the pending one) and returns nothing.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from internvit.store import FAULT_EXIT_CODE

REPO = Path(__file__).resolve().parents[1]


def _env(extra: Optional[dict] = None) -> dict:
    env = dict(os.environ)
    env.pop("INTERNVIT_STORE_FAULT_AT", None)
    env.pop("INTERNVIT_STORE_TRACE", None)
    env.pop("INTERNVIT_STORE_FAULT_WAIT", None)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra or {})
    return env


def run(cmd: Sequence[str], *, fault_at: Optional[int] = None, trace: Optional[Path] = None,
        cwd: Optional[Path] = None, env: Optional[dict] = None) -> subprocess.CompletedProcess:
    """Run ``cmd`` (optionally dying at write point ``fault_at``, optionally tracing write points)."""
    extra = dict(env or {})
    if fault_at is not None:
        extra["INTERNVIT_STORE_FAULT_AT"] = str(fault_at)
    if trace is not None:
        extra["INTERNVIT_STORE_TRACE"] = str(trace)
    return subprocess.run(list(cmd), cwd=str(cwd or REPO), env=_env(extra), capture_output=True, text=True,
                          timeout=600)


def python_cmd(code: str) -> list[str]:
    """A command running ``code`` in a fresh interpreter (the repo on ``sys.path``)."""
    return [sys.executable, "-c", code]


def write_points(cmd: Sequence[str], workdir: Path, **kw) -> list[str]:
    """The names of the write points one uninterrupted run of ``cmd`` passes, in order."""
    trace = workdir / "trace.txt"
    if trace.exists():
        trace.unlink()
    r = run(cmd, trace=trace, **kw)
    assert r.returncode == 0, f"uninterrupted run failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return [line.split("\t", 1)[1] for line in trace.read_text().splitlines()] if trace.exists() else []


def tree_digest(folder: Path, ignore: Callable[[str], bool] = lambda rel: False) -> dict[str, str]:
    """``{relative path: sha256}`` of every file below ``folder`` except the store's private ``.store/``."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".store"]
        for name in files:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if not ignore(rel):
                out[rel] = hashlib.sha256(Path(root, name).read_bytes()).hexdigest()
    return out


def kill_sweep(tmp_path: Path, *, prepare: Callable[[Path], None], command: Callable[[Path], Sequence[str]],
               read: Callable[[Path], Any], output: Callable[[Path], Path],
               after_kill: Optional[Callable[[Path, int], None]] = None, compare_files: bool = True,
               ignore: Callable[[str], bool] = lambda rel: False, points: Optional[Sequence[int]] = None,
               min_points: int = 1) -> list[str]:
    """Kill ``command`` at every write point; check readers and the rerun (see the module docstring).

    Args:
        prepare: builds the state before the operation in a given folder (called once, then copied).
        command: the operation's command line for a given folder.
        read: what a reader sees in a given folder (must be comparable with ``==``).
        output: the folder (below the given one) whose files must end byte-identical.
        points: restrict to these write points (1-based); default all.
        min_points: fail if the operation has fewer write points (a harness that kills nothing proves nothing).
    Returns the write-point names.
    """
    base = tmp_path / "base"
    base.mkdir()
    prepare(base)
    old = read(base)
    ref = tmp_path / "reference"
    shutil.copytree(base, ref, symlinks=True)
    names = write_points(command(ref), tmp_path)
    assert len(names) >= min_points, f"only {len(names)} write points: {names}"
    new = read(ref)
    ref_files = tree_digest(output(ref), ignore) if compare_files else None
    for n in (points or range(1, len(names) + 1)):
        d = tmp_path / f"kill-{n}"
        shutil.copytree(base, d, symlinks=True)
        r = run(command(d), fault_at=n)
        assert r.returncode == FAULT_EXIT_CODE, (
            f"point {n} ({names[n - 1]}): expected the injected exit, got {r.returncode}:\n{r.stderr[-2000:]}")
        seen = read(d)
        assert seen == old or seen == new, f"point {n} ({names[n - 1]}): a reader sees neither old nor new state"
        if after_kill is not None:
            after_kill(d, n)
        r = run(command(d))
        assert r.returncode == 0, f"point {n} ({names[n - 1]}): rerun failed:\n{r.stdout}\n{r.stderr[-2000:]}"
        assert read(d) == new, f"point {n} ({names[n - 1]}): rerun did not reach the uninterrupted result"
        if compare_files:
            got = tree_digest(output(d), ignore)
            assert got == ref_files, (f"point {n} ({names[n - 1]}): files differ from the uninterrupted run: "
                                      f"{sorted(set(got.items()) ^ set(ref_files.items()))[:4]}")
        shutil.rmtree(d)
    return names
