"""The ``error:`` line reaches stderr in one write call, so ranks sharing a pipe under torchrun never interleave.

With ``PYTHONUNBUFFERED=1`` (set on CI machines and by ``python -u``), ``print(msg, file=sys.stderr)`` writes the
text and the newline separately; two ranks failing at once then produced ``error: a...error: b`` on one line.
"""
from __future__ import annotations

import io
import sys

from internvit import cli


class _RecordingRaw(io.RawIOBase):
    """A raw stream that records every write call it receives (what a pipe would see)."""

    def __init__(self):
        self.calls: list[bytes] = []

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.calls.append(bytes(b))
        return len(b)


def _unbuffered_stderr(monkeypatch) -> _RecordingRaw:
    raw = _RecordingRaw()
    # what Python builds for stderr under PYTHONUNBUFFERED=1: text layer straight onto the raw file, write-through
    monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(raw, encoding="utf-8", line_buffering=True,
                                                         write_through=True))
    return raw


def test_user_error_is_one_write(monkeypatch):
    raw = _unbuffered_stderr(monkeypatch)

    def main(argv):
        raise ValueError("index_key 'IVF1024,Flat': 1024 inverted lists need at least 1024 vectors")

    assert cli.run(main, []) == cli.EXIT_USAGE
    lines = [c for c in raw.calls if c]
    assert lines == [b"error: index_key 'IVF1024,Flat': 1024 inverted lists need at least 1024 vectors\n"]


def test_interrupt_is_one_write(monkeypatch):
    raw = _unbuffered_stderr(monkeypatch)

    def main(argv):
        raise KeyboardInterrupt

    assert cli.run(main, []) == 130
    assert [c for c in raw.calls if c] == [b"error: interrupted\n"]
