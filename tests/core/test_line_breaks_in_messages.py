"""User text holding a line break (a path named ``bad<newline>name``) stays whole in the one ``error:`` line.

Newcomer trial 10c: ``--images $'bad\\nname'`` printed ``error: --images bad``: the message was cut at the break
(the reason and the rest of the path lost). Every message printed by a tool goes through :func:`cli.flat`."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings

from internvit import cli

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_flat_writes_line_breaks_as_backslash_n():
    assert cli.flat("a\nb: no such file") == "a\\nb: no such file"
    assert cli.flat("  first\n\n\tsecond  \r\n") == "first\\nsecond"
    assert cli.one_line(ValueError("--images x\ny: no such folder")) == "--images x\\ny: no such folder"
    assert cli.one_line(ValueError("")) == "ValueError"


def test_error_warning_and_log_lines_keep_the_whole_message(capsys):
    cli.print_error("p\nq: bad")
    assert capsys.readouterr().err == "error: p\\nq: bad\n"
    assert cli.warning_line("w\nx: odd", UserWarning, "f.py", 1) == "warning: w\\nx: odd\n"
    record = logging.LogRecord("internvit", logging.WARNING, "f.py", 1, "%s: skipped", ("a\nb.png",), None)
    assert cli.LevelPrefixFormatter("%(message)s").format(record) == "warning: a\\nb.png: skipped"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert cli.warning_line("", UserWarning, "f.py", 1) == "warning: UserWarning\n"


def test_tool_names_a_path_with_a_line_break_whole(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "extract_features.py"), "--model",
                        "internvit-6b-tiny", "--images", str(tmp_path / "bad\nname"), "--out", str(tmp_path / "o"),
                        "--no-progress"], capture_output=True, text=True, cwd=tmp_path,
                       env=dict(os.environ, PYTHONPATH=ROOT))
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0] == f"error: --images {tmp_path}/bad\\nname: no such folder or list file", lines
    assert not os.path.exists(tmp_path / "o")
