"""What every command-line tool in ``tools/`` shares: one-line errors, argument types, the exit-status contract.

The contract (DEVELOPERS.md): bad input gets exactly one ``error: ...`` line on stderr naming the problem and
exit status 2, before any work is done and with nothing half-written.

    from internvit.cli import ArgumentParser, UsageError, positive_int, run

    def main(argv=None) -> int:
        p = ArgumentParser(description=__doc__)
        p.add_argument("-k", type=positive_int, default=10)
        args = p.parse_args(argv)
        ...                       # raise UsageError("...") (or ValueError/OSError/...) for bad input
        return 0

    if __name__ == "__main__":
        sys.exit(run(main))

This module imports nothing heavy (no torch) so ``--help`` and argument errors stay fast.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import sys
import warnings
from typing import Any, Callable, Iterator, Optional, Sequence

__all__ = ["ArgumentParser", "UsageError", "run", "flat", "one_line", "print_error", "positive_int", "nonnegative_int",
           "positive_float", "fraction", "existing_path", "existing_file", "existing_dir", "device", "check_device",
           "check_flag", "memory_size", "read_json", "DTYPE_NAMES", "dtype_arg", "hold_warnings", "emit_held"]

EXIT_USAGE = 2


class UsageError(ValueError):
    """Bad input from the user (an argument, a file, a folder): reported as one ``error:`` line, exit 2."""


def flat(text: str) -> str:
    """``text`` on one line: its line breaks written as the two characters ``\\n`` (blank lines dropped, each
    line's surrounding blanks stripped). A message quoting user text that holds a line break (a path named
    ``a<newline>b``) keeps all of it, and stays one ``error:`` line (it was cut at the break)."""
    return "\\n".join(line.strip() for line in str(text).splitlines() if line.strip())


def one_line(exc: BaseException) -> str:
    """An exception's message on one line (:func:`flat`; its type name when it has none).

    An error raised in a ``DataLoader`` worker arrives re-raised with the worker's traceback as its message
    (``Caught X in DataLoader worker process N.`` first, ``module.X: message`` last): its own message is the
    last line, without the type name."""
    text = str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if lines and re.match(r"Caught \w+ in DataLoader worker process \d+\.?$", lines[0]):
        return re.sub(r"^[\w.]+: ", "", lines[-1], count=1)
    if isinstance(exc, KeyError) and len(exc.args) == 1:  # KeyError('model') prints as "'model'"
        arg = exc.args[0]
        # a sentence (mmengine's "X is not in the mmseg::model registry ...") is a message, not a key
        text = arg if isinstance(arg, str) and " " in arg.strip() else f"missing key {arg!r}"
    return flat(text) or type(exc).__name__


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one ``error: ...`` line (no usage block), exit status 2.

    An empty (or blank) value is refused for every argument (``--out ''`` from an unset ``$OUT`` would mean
    the current folder; ``''`` is never a meaningful path, name or number); arguments listed in
    ``allow_empty`` (their ``dest``) may be empty."""

    def __init__(self, *args, allow_empty: Sequence[str] = (), **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.allow_empty = set(allow_empty)

    def _get_value(self, action, arg_string):  # argparse's one conversion point of every value string
        if isinstance(arg_string, str) and not arg_string.strip() and action.dest not in self.allow_empty \
                and not isinstance(action, argparse._SubParsersAction):  # a sub-command's parser names its own
            raise argparse.ArgumentError(action, f"empty value {arg_string!r}")
        return super()._get_value(action, arg_string)

    def error(self, message: str) -> None:  # noqa: D102 - argparse API
        self.exit(EXIT_USAGE, f"error: {message.splitlines()[0] if message else 'bad arguments'}\n")


#: exceptions that mean "the input is bad", reported as one line; anything else is a bug and keeps its traceback
USER_ERRORS: tuple = (UsageError, ValueError, OSError, KeyError, TypeError, RuntimeError, EOFError)


def print_error(message: str) -> None:
    """Write ``error: <message>`` to stderr as one line in a single write call.

    ``print(..., file=sys.stderr)`` issues two writes (text, then newline) when Python runs unbuffered
    (``PYTHONUNBUFFERED=1``, ``python -u``), so the lines of several ranks sharing one stderr pipe under torchrun
    could interleave mid-line; one write of a short line to a pipe is atomic (POSIX ``PIPE_BUF``).
    """
    sys.stderr.write(f"error: {flat(message)}\n")
    sys.stderr.flush()


def run(main: Callable[..., int], argv: Optional[Sequence[str]] = None,
        user_errors: tuple = USER_ERRORS) -> int:
    """Call ``main(argv)`` and turn user errors into one ``error:`` line with exit status 2.

    Meanwhile Python warnings and log records of WARNING and above print as ``warning: ...`` / ``error: ...``
    lines (:func:`tool_output`); the error itself is a single line. ``KeyboardInterrupt`` exits 130 with
    ``error: interrupted``.
    """
    try:
        with tool_output():
            return int(main(argv) or 0) if argv is not None else int(main() or 0)
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except user_errors as e:
        print_error(one_line(e))
        return EXIT_USAGE


# -- argument types (argparse calls them; ArgumentTypeError becomes "argument -k: ...") -----------------------
def _number(value: str, cast, what: str):
    try:
        return cast(value)
    except (TypeError, ValueError):
        raise argparse.ArgumentTypeError(f"expected {what}, got {value!r}") from None


def positive_int(value: str) -> int:
    """An integer >= 1."""
    v = _number(value, int, "an integer >= 1")
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def nonnegative_int(value: str) -> int:
    """An integer >= 0."""
    v = _number(value, int, "an integer >= 0")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def positive_float(value: str) -> float:
    """A finite number > 0."""
    v = _number(value, float, "a number > 0")
    if not (v > 0 and v != float("inf")):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {value}")
    return v


def fraction(value: str) -> float:
    """A number in (0, 1]."""
    v = _number(value, float, "a number in (0, 1]")
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {value}")
    return v


def existing_path(value: str) -> str:
    """A path that exists (file or folder)."""
    if not os.path.exists(value):
        raise argparse.ArgumentTypeError(f"{value}: no such file or folder")
    return value


def existing_file(value: str) -> str:
    """A path to an existing file."""
    if not os.path.isfile(value):
        raise argparse.ArgumentTypeError(f"{value}: no such file" if not os.path.exists(value)
                                         else f"{value}: not a file")
    return value


def existing_dir(value: str) -> str:
    """A path to an existing folder."""
    if not os.path.isdir(value):
        raise argparse.ArgumentTypeError(f"{value}: no such folder" if not os.path.exists(value)
                                         else f"{value}: not a folder")
    return value


_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps|xpu|xpu:\d+)$")


def check_flag(name: str, value: Any) -> bool:
    """``value`` as a bool, refusing anything else with a ``TypeError`` naming ``name`` (a string ``'no'`` or
    ``'false'`` is truthy: taken as a flag it would switch the option on). numpy bools are accepted."""
    import numpy as np

    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def check_device(value: Any) -> str:
    """Validate a device string now (not at the first tensor move): ``cpu``, ``cuda``, ``cuda:N`` (N < device
    count), ``mps``, ``xpu[:N]``. Raises :class:`UsageError` naming the device and why it is unusable."""
    s = str(value)
    if not _DEVICE.match(s):
        raise UsageError(f"device {s!r}: expected cpu, cuda, cuda:N, mps or xpu")
    if s == "cpu":
        return s
    import torch  # only for a non-CPU device

    kind, _, num = s.partition(":")
    if kind == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device {s!r}: CUDA is not available on this machine (use --device cpu)")
        if num and int(num) >= torch.cuda.device_count():
            raise UsageError(f"device {s!r}: only {torch.cuda.device_count()} CUDA device(s) present")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UsageError(f"device {s!r}: MPS is not available on this machine")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise UsageError(f"device {s!r}: XPU is not available on this machine")
    return s


def device(value: str) -> str:
    """argparse type for ``--device`` (see :func:`check_device`)."""
    try:
        return check_device(value)
    except UsageError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


#: the dtype names every tool's ``--dtype`` and :func:`internvit.features.parse_dtype` accept → ``torch``'s name
DTYPE_NAMES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
               "fp16": "float16", "float16": "float16", "fp64": "float64", "float64": "float64"}


def dtype_arg(value: str) -> str:
    """argparse type for ``--dtype``: one of :data:`DTYPE_NAMES` (any case, ``torch.`` allowed) → torch's name
    (``'bf16'`` → ``'bfloat16'``)."""
    name = str(value).strip().lower()
    name = name[len("torch."):] if name.startswith("torch.") else name
    if name not in DTYPE_NAMES:
        raise argparse.ArgumentTypeError(f"must be one of {', '.join(DTYPE_NAMES)}, got {value!r}")
    return DTYPE_NAMES[name]


_MEM = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*$", re.IGNORECASE)


def memory_size(value: str) -> int:
    """``'4G'``, ``'512M'``, ``'1.5T'``, ``'1000000'`` → bytes (binary units); must be > 0."""
    m = _MEM.match(str(value))
    if not m:
        raise argparse.ArgumentTypeError(f"expected a size such as 4G, 512M or 1000000, got {value!r}")
    n = float(m.group(1)) * 1024 ** "_kmgt".index((m.group(2) or "_").lower())
    if n < 1:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value!r}")
    return int(n)


def read_json(path: str) -> Any:
    """``json.load`` of a file; a syntax error becomes a :class:`UsageError` naming the file, line and column."""
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is skipped
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UsageError(f"{path}: invalid JSON at line {e.lineno} column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise UsageError(f"{path}: not UTF-8 text ({e.reason})") from None


def write_json(path: str, obj: Any, indent: Optional[int] = None) -> None:
    """Write ``obj`` as JSON (one line unless ``indent``) to ``path`` whole or not at all: a temporary file
    beside it, flushed and renamed over it, so a reader never sees half a result (``OSError`` as ``open``)."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=indent, default=str)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


# -- Python warnings as one line each ---------------------------------------------------------------------------
def warning_line(message, category, filename, lineno, line=None) -> str:
    """:func:`warnings.formatwarning`'s signature; ``warning: <the message on one line>`` (:func:`flat`; no
    category, source file or source line)."""
    return f"warning: {flat(message) or category.__name__}\n"


class LevelPrefixFormatter(logging.Formatter):
    """Log records as the tools' other lines: ``warning: <message>`` for WARNING, ``error: <message>`` for ERROR
    and above, the bare message below (progress and information)."""

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if record.levelno >= logging.WARNING and not record.exc_info:
            text = flat(text)  # one line, a line break of a quoted path included
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        return f"warning: {text}" if record.levelno >= logging.WARNING else text


@contextlib.contextmanager
def tool_output() -> Iterator[None]:
    """Inside the block, Python warnings print as ``warning:`` lines (:func:`warning_lines`) and, unless the
    process configured logging itself (the root logger has a handler), log records propagating to the root
    logger print on stderr through :class:`LevelPrefixFormatter` (instead of logging's bare last-resort
    output); the root logger's level is restored on exit (a tool may lower it to show INFO records).

    Under torchrun (``RANK`` set), only rank 0 prints warnings: every rank runs the same code and met the same
    ones (mmengine's logger does the same); errors print on every rank."""
    root = logging.getLogger()
    level, handler = root.level, None
    quiet = os.environ.get("RANK", "0").strip() not in ("", "0")
    if not root.handlers:
        handler = logging.StreamHandler()  # sys.stderr as it is now
        handler.setFormatter(LevelPrefixFormatter("%(message)s"))
        if quiet:
            handler.setLevel(logging.ERROR)
        root.addHandler(handler)
    try:
        with warning_lines(), (warnings.catch_warnings() if quiet else contextlib.nullcontext()):
            if quiet:
                warnings.simplefilter("ignore")
            yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(level)


@contextlib.contextmanager
def hold_warnings(logger_name: str = "internvit") -> Iterator[list]:
    """Hold the Python warnings and the ``logger_name`` log records of WARNING and above emitted inside the block
    (in order, in the yielded list) instead of printing them; :func:`emit_held` prints them later.

    A tool sets up a job (loads a model: a lossy cast, a resized position table) before the last checks that may
    refuse it (the output folder holds another job); holding the set-up's warnings until the job is accepted
    keeps a refused run to its one ``error:`` line. Warning filters apply as usual (a filtered warning is not
    held); records below WARNING pass through."""
    held: list = []
    logger = logging.getLogger(logger_name)

    def hold_record(record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        held.append(record)
        return False

    def hold_warning(message, category, filename, lineno, file=None, line=None) -> None:
        held.append(warnings.WarningMessage(message, category, filename, lineno, file, line))

    logger.addFilter(hold_record)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = hold_warning
            yield held
    finally:
        logger.removeFilter(hold_record)


def emit_held(held: list) -> None:
    """Print what :func:`hold_warnings` held, in order (warnings through the filters in force now); empties
    ``held``."""
    items, held[:] = list(held), []
    for item in items:
        if isinstance(item, logging.LogRecord):
            logging.getLogger(item.name).handle(item)
        else:
            warnings.warn_explicit(item.message, item.category, item.filename, item.lineno)


@contextlib.contextmanager
def warning_lines() -> Iterator[None]:
    """Inside the block, Python warnings print as :func:`warning_line` lines; only the text changes: filters,
    ``-W`` options and ``pytest.warns`` see the same warnings."""
    previous = warnings.formatwarning
    warnings.formatwarning = warning_line
    try:
        yield
    finally:
        warnings.formatwarning = previous


def close_process_group() -> None:
    """Destroy the default ``torch.distributed`` process group if this process joined one (a tool under torchrun;
    nothing is imported otherwise). Left to the interpreter's exit, gloo's threads raced its shutdown: ``terminate
    called without an active exception`` and SIGABRT on rank 0 after the work was done (seen under load)."""
    global _CLOSED_GROUP
    dist = sys.modules.get("torch.distributed")
    if dist is not None and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
        _CLOSED_GROUP = True


#: whether :func:`close_process_group` destroyed a process group in this process
_CLOSED_GROUP = False


def exit_tool(status: int) -> None:
    """``sys.exit(status)``, except after a run that joined a process group (:func:`close_process_group`): there,
    once the logs and streams are flushed, ``os._exit(status)`` skips the interpreter's finalization, which still
    raced gloo's threads after the group was destroyed (``terminate called without an active exception``,
    SIGABRT on rank 0 after its work was written; seen under load)."""
    if _CLOSED_GROUP:
        import logging

        logging.shutdown()  # flushes and closes every handler (mmengine's log files included)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(int(status))
    sys.exit(status)
