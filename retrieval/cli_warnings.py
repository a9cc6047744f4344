"""Python warnings as the command-line tools print them: one ``warning: <message>`` line each, without the
category, source file and source line that :func:`warnings.formatwarning` adds (``UserWarning``, the
``warnings.warn(...)`` call). Only the text changes: filters, ``-W`` options and ``pytest.warns`` see the
same warnings."""
from __future__ import annotations

import contextlib
import warnings
from typing import Iterator


def warning_line(message, category, filename, lineno, line=None) -> str:
    """:func:`warnings.formatwarning`'s signature; ``warning: <first line of the message>``."""
    text = next((ln.strip() for ln in str(message).splitlines() if ln.strip()), category.__name__)
    return f"warning: {text}\n"


@contextlib.contextmanager
def warning_lines() -> Iterator[None]:
    """Format the warnings shown inside the block with :func:`warning_line` (restored afterwards)."""
    previous = warnings.formatwarning
    warnings.formatwarning = warning_line
    try:
        yield
    finally:
        warnings.formatwarning = previous
