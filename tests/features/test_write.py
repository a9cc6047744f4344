"""FeatureExtractor.write and tools/extract_features.py: shards, metadata, errors, resume after SIGKILL, bad input."""
import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest

import internvit
from internvit.features import FeatureExtractor, read_features

from .images import make_bad_files, make_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "tools", "extract_features.py")


def _cli():
    spec = importlib.util.spec_from_file_location("extract_features_cli", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _files(folder):
    out = {}
    for root, _, files in os.walk(folder):
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _manifest(raw: bytes) -> dict:
    m = json.loads(raw)
    m.pop("timing")
    return m


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_write_read_back(tiny_model, image_dir, tmp_path, fmt):
    paths = list(image_dir["good"]) + [image_dir["corrupt"]]
    paths.insert(2, image_dir["not_image"])  # rows: 0 1 [2 bad] 3 4 5 6 [7 bad]
    labels = [f"label{i}" for i in range(len(paths))]
    fx = FeatureExtractor(tiny_model, pool="mean", batch_size=2, progress=False)
    out = tmp_path / "out"
    m = fx.write(paths, out, shard_size=3, metadata_format=fmt,
                 metadata_pattern="metadata/part-{shard:05d}." + fmt, extra_columns={"label": labels},
                 manifest_extra={"note": "hello"})
    assert m["count"] == 6 and m["num_errors"] == 2 and m["num_inputs"] == 8 and m["note"] == "hello"
    assert [s["count"] for s in m["shards"]] == [2, 3, 1] and m["feature_shape"] == [64] and m["dim"] == 64
    assert m["pool"] == "mean" and m["layers"] is None and m["dtype"] == "float32"
    assert m["model"]["config"]["hidden_size"] == 64 and m["preprocessing"]["image_size"] == 56
    assert sorted(_files(out)) == sorted(["manifest.json", "errors.jsonl"] + [s["features"] for s in m["shards"]]
                                         + [s["metadata"] for s in m["shards"]])
    assert json.loads((out / "manifest.json").read_text()) == m

    feats, rows = read_features(out)
    kept = [0, 1, 3, 4, 5, 6]
    assert [r["id"] for r in rows] == kept
    assert [r["path"] for r in rows] == [paths[i] for i in kept]
    assert [r["label"] for r in rows] == [labels[i] for i in kept]
    np.testing.assert_allclose(feats, fx.extract([paths[i] for i in kept]).features, atol=1e-6)
    if fmt == "parquet":
        table = pq.read_table(out / m["shards"][0]["metadata"])
        assert str(table.schema.field("id").type) == "int64" and table.column_names == ["id", "path", "label"]

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["path"]) for e in errors] == [(2, paths[2]), (7, paths[7])]

    # resume after losing a shard's metadata (crash between the two renames) and a left-over temp file
    before = _files(out)
    os.remove(out / m["shards"][1]["metadata"])
    (out / "features" / "part-00000.npy.partial").write_bytes(b"half")  # shard 0 is not recomputed
    m2 = fx.write(paths, out, shard_size=3, metadata_format=fmt, metadata_pattern="metadata/part-{shard:05d}." + fmt,
                  extra_columns={"label": labels}, manifest_extra={"note": "hello"})
    after = _files(out)
    assert sorted(after) == sorted(before)
    assert all(after[k] == before[k] for k in before if k != "manifest.json")
    assert _manifest(after["manifest.json"]) == _manifest(before["manifest.json"])
    assert m2["timing"]["images"] == 3  # only the lost shard was recomputed


def test_write_refuses_other_arguments(tiny_model, image_dir, tmp_path):
    fx = FeatureExtractor(tiny_model, pool="cls", progress=False)
    fx.write(image_dir["good"], tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="layers"):
        FeatureExtractor(tiny_model, pool="cls", layers=[1], progress=False).write(image_dir["good"], tmp_path,
                                                                                  shard_size=4)
    with pytest.raises(ValueError, match="shard_size"):
        fx.write(image_dir["good"], tmp_path, shard_size=5)
    with pytest.raises(ValueError, match="inputs_checksum"):
        fx.write(image_dir["good"][::-1], tmp_path, shard_size=4)
    other = internvit.load_model("internvit-6b-tiny")  # same config, other random weights
    with pytest.raises(ValueError, match="weights_fingerprint"):
        FeatureExtractor(other, pool="cls", progress=False).write(image_dir["good"], tmp_path, shard_size=4)
    with pytest.raises(ValueError, match="shard"):
        fx.write(image_dir["good"], tmp_path / "x", features_pattern="features.npy")


def test_cli_resume_after_sigkill_is_byte_identical(tiny_model, tmp_path):
    model_dir = internvit.save_model(tiny_model, str(tmp_path / "model"))
    img = tmp_path / "imgs"
    good = make_images(str(img), 12, seed=1)
    bad = make_bad_files(str(img))
    rows = good[:2] + [bad["corrupt"]] + good[2:8] + [bad["not_image"]] + good[8:]  # 14 rows, bad at 2 and 9
    (tmp_path / "list.txt").write_text("\n".join(os.path.relpath(p, tmp_path) for p in rows) + "\n")
    args = ["--model", model_dir, "--images", str(tmp_path / "list.txt"), "--shard-size", "4", "--batch-size", "2",
            "--pool", "cls_mean", "--layers", "0", "-1", "--no-progress"]
    main = _cli()
    assert main(args + ["--out", str(tmp_path / "ref")]) == 0
    ref = _files(tmp_path / "ref")

    # Row 6 becomes a FIFO: the run writes shard 0 (rows 0-3), computes rows 4-5, then blocks opening row 6.
    # It is killed there, deterministically mid-shard 1.
    blocked = rows[6]
    shutil.move(blocked, str(tmp_path / "aside"))
    os.mkfifo(blocked)
    proc = subprocess.Popen([sys.executable, CLI, *args, "--out", str(tmp_path / "run")],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = tmp_path / "run" / "metadata" / "part-00000.parquet"
        deadline = time.time() + 60
        while not first.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert first.exists(), proc.stderr.read().decode() if proc.poll() is not None else "timeout"
        time.sleep(0.3)  # let it reach the FIFO
        assert proc.poll() is None
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        os.remove(blocked)
        shutil.move(str(tmp_path / "aside"), blocked)
    partial = _files(tmp_path / "run")
    assert "manifest.json" not in partial and "progress.json" in partial
    assert not any("part-00001" in k for k in partial)
    assert partial["features/part-00000.npy"] == ref["features/part-00000.npy"]

    # other arguments on the interrupted folder: one-line error, exit 2
    rc, err = _run_capture(main, args[:-1] + ["--pool", "mean", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 2 and "pool" in err and len(err.strip().splitlines()) == 1

    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    done = _files(tmp_path / "run")
    assert sorted(done) == sorted(ref)
    assert all(done[k] == ref[k] for k in ref if k != "manifest.json")
    assert _manifest(done["manifest.json"]) == _manifest(ref["manifest.json"])
    errors = [json.loads(line) for line in done["errors.jsonl"].decode().splitlines()]
    assert [e["id"] for e in errors] == [2, 9]
    feats, meta = read_features(tmp_path / "run")
    assert feats.shape == (12, 256) and [r["id"] for r in meta] == [i for i in range(14) if i not in (2, 9)]



def _run_capture(main, argv):
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)
    return rc, err.getvalue()


@pytest.mark.parametrize("case", ["missing_folder", "unknown_preset", "bad_layer"])
def test_cli_bad_input(image_dir, tmp_path, case):
    argv = {
        "missing_folder": ["--model", "internvit-6b-tiny", "--images", str(tmp_path / "nope")],
        "unknown_preset": ["--model", "internvit-9b-nonexistent", "--images", image_dir["folder"]],
        "bad_layer": ["--model", "internvit-6b-tiny", "--images", image_dir["folder"], "--layers", "5"],
    }[case]
    rc, err = _run_capture(_cli(), argv + ["--out", str(tmp_path / "out"), "--no-progress"])
    assert rc == 2
    assert err.startswith("error: ") and len(err.strip().splitlines()) == 1
    assert {"missing_folder": "nope", "unknown_preset": "internvit-9b-nonexistent", "bad_layer": "5"}[case] in err
    assert not (tmp_path / "out").exists()
