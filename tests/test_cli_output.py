"""Every tool's stderr speaks one language: ``warning: ...`` for Python warnings *and* log records of the
libraries (the retrieval and internvit loggers), ``error: ...`` for the one failure; never a bare message that
looks like output, a ``UserWarning`` category or the warning's source line (internvit.cli.run / tool_output)."""
import logging
import os
import subprocess

import numpy as np
import pytest

from internvit.cli import LevelPrefixFormatter

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SERVER: list = []


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    """Each tool runs in an interpreter of its own (logging and warnings as a user's process has them): a fork
    of one that imported torch, mmengine and the packages once (a fresh interpreter per command cost 5-8 s)."""
    from tests.store.zygote import Zygote

    with Zygote(["torch", "mmengine.runner", "segmentation", "internvit.runner", "retrieval",
                 "matplotlib.figure", "matplotlib.backends.backend_agg"]) as z:
        _SERVER.append(z)
        yield
        _SERVER.clear()


def _tool(name: str, *args, cwd=None) -> subprocess.CompletedProcess:
    from tests.faults import run

    return run(_SERVER[0].cmd([os.path.join(ROOT, "tools", f"{name}.py"), *map(str, args)]), cwd=cwd)


def _lines(text: str) -> list:
    return [line for line in text.splitlines() if line.strip()]


def test_log_warnings_of_a_tool_are_warning_lines(tmp_path):
    os.makedirs(tmp_path / "emb" / "img_emb")
    x = np.random.default_rng(0).standard_normal((50, 8)).astype("float32") * 3  # not unit length
    np.save(tmp_path / "emb" / "img_emb" / "img_emb_0.npy", x)
    r = _tool("build_index", tmp_path / "emb", tmp_path / "idx", "--quiet")
    assert r.returncode == 0, r.stderr
    assert _lines(r.stderr) == [next(ln for ln in _lines(r.stderr) if "not unit length" in ln)], r.stderr
    assert r.stderr.startswith(f"warning: {tmp_path / 'emb'}: vectors are not unit length"), r.stderr
    r = _tool("build_index", tmp_path / "emb", tmp_path / "idx2")  # without --quiet: information lines too
    assert r.returncode == 0 and any(ln.startswith("warning: ") and "not unit length" in ln
                                     for ln in _lines(r.stderr)), r.stderr


def test_python_warnings_of_a_training_run_are_warning_lines(tmp_path):
    """tools/train.py: mmengine's UserWarnings (thread settings, deprecations) print as one line each."""
    from segmentation.toy_data import make_toy_seg_dataset

    root = make_toy_seg_dataset(str(tmp_path / "toy"), num_train=2, num_val=1)
    config = os.path.join(ROOT, "configs", "toy", "linear_internvit_tiny_toy.py")
    r = _tool("train", config, "--work-dir", tmp_path / "w", "--cfg-options",
              *[f"{s}_dataloader.dataset.data_root={root}" for s in ("train", "val", "test")],
              "train_cfg.max_iters=1", "train_cfg.val_interval=1", "default_hooks.checkpoint.interval=1")
    assert r.returncode == 0, r.stderr[-2000:]
    warned = [ln for ln in _lines(r.stderr) if "Warning" in ln or ln.startswith("warning:")]
    assert warned and all(ln.startswith("warning: ") and "Warning:" not in ln for ln in warned), warned
    assert not any(ln.startswith("  ") and "warn" in ln for ln in _lines(r.stderr)), r.stderr[-2000:]


def test_level_prefix_formatter():
    f = LevelPrefixFormatter("%(message)s")

    def rec(level):
        return logging.LogRecord("retrieval", level, __file__, 1, "%s: %d rows", ("a", 3), None)

    assert [f.format(rec(lv)) for lv in (logging.INFO, logging.WARNING, logging.ERROR)] == [
        "a: 3 rows", "warning: a: 3 rows", "error: a: 3 rows"]
