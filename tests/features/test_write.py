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
import torch

import internvit
from internvit.features import FeatureExtractor, open_features, read_features
from internvit.store import read_manifest

from .images import make_bad_files, make_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "tools", "extract_features.py")


def _cli():
    spec = importlib.util.spec_from_file_location("extract_features_cli", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _files(folder):
    """Every file of the folder except the store's private ``.store/`` (lock, journal)."""
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".store"]
        for f in files:
            path = os.path.join(root, f)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = fh.read()
    return out


def _manifest(raw: bytes) -> dict:
    m = json.loads(raw)
    assert "timing" not in m  # volatile: returned by write(), never committed
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
    timing = m.pop("timing")
    assert timing["images"] == 8 and timing["nonfinite"] == 0
    assert json.loads((out / "manifest.json").read_text()) == m
    assert m["_store"]["files"] == sorted(["errors.jsonl"] + [s[k] for s in m["shards"] for k in ("features",
                                                                                                 "metadata")])

    feats, rows = read_features(out)
    kept = [0, 1, 3, 4, 5, 6]
    assert [r["id"] for r in rows] == kept
    assert [r["path"] for r in rows] == [paths[i] for i in kept]
    assert [r["label"] for r in rows] == [labels[i] for i in kept]
    np.testing.assert_allclose(feats, fx.extract([paths[i] for i in kept]).features, atol=1e-6)
    mapped, label_rows = open_features(out, columns=["label"])
    assert len(mapped) == 6 and mapped.shape == (6, 64) and label_rows == [{"label": labels[i]} for i in kept]
    assert all(np.array_equal(mapped[j], feats[j]) for j in range(6)) and np.array_equal(np.asarray(mapped), feats)
    assert isinstance(mapped.parts[0], np.memmap)
    if fmt == "parquet":
        table = pq.read_table(out / m["shards"][0]["metadata"])
        assert str(table.schema.field("id").type) == "int64" and table.column_names == ["id", "path", "label"]

    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["path"]) for e in errors] == [(2, paths[2]), (7, paths[7])]

    # a rerun of the finished job returns the committed manifest and rewrites nothing
    before = _files(out)
    mtimes = {k: os.stat(out / k).st_mtime_ns for k in before}
    m2 = fx.write(paths, out, shard_size=3, metadata_format=fmt, metadata_pattern="metadata/part-{shard:05d}." + fmt,
                  extra_columns={"label": labels}, manifest_extra={"note": "hello"})
    assert m2.pop("timing")["images"] == 0 and m2 == m
    assert _files(out) == before and {k: os.stat(out / k).st_mtime_ns for k in before} == mtimes


def test_overwrite_writes_a_new_generation(tiny_model, image_dir, tmp_path):
    out = tmp_path / "out"
    m1 = FeatureExtractor(tiny_model, pool="cls", progress=False).write(image_dir["good"], out, shard_size=4)
    m1.pop("timing")
    old = read_features(out)
    fx2 = FeatureExtractor(tiny_model, pool="mean", progress=False)
    with pytest.raises(ValueError, match="pool"):
        fx2.write(image_dir["good"], out, shard_size=4)
    assert read_features(out)[0].tobytes() == old[0].tobytes()
    m2 = fx2.write(image_dir["good"], out, shard_size=4, overwrite=True)
    assert m2["_store"]["generation"] == 2 and m2["shards"][0]["features"] == "features/part-00000.g0002.npy"
    assert m2["errors_file"] == "errors.g0002.jsonl"
    np.testing.assert_allclose(read_features(out)[0], fx2.extract(image_dir["good"]).features, atol=1e-6)
    # the first generation's files stay until the next writer opens the folder (a reader may still use them)
    assert (out / "features" / "part-00000.npy").exists()
    fx2.write(image_dir["good"], out, shard_size=4)  # same job: returns, but a writer opened nothing
    FeatureExtractor(tiny_model, pool="cls", progress=False).write(image_dir["good"], out, shard_size=4,
                                                                   overwrite=True)
    # generation 1 was retired by generation 2 and removed when the third writer opened the folder
    assert not (out / "features" / "part-00000.npy").exists()
    assert (out / "features" / "part-00000.g0002.npy").exists() and read_manifest(out)["_store"]["generation"] == 3


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
    other = internvit.load_model("internvit-6b-tiny")
    with torch.no_grad():  # same config, one weight differs in its last bit: a different model
        w = other.state_dict()["encoder.layers.1.mlp.fc2.bias"]
        w.view(torch.int32)[-1] ^= 1
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
    assert "manifest.json" not in partial and (tmp_path / "run" / ".store" / "journal.jsonl").exists()
    assert not any("part-00001" in k for k in partial)
    assert partial["features/part-00000.npy"] == ref["features/part-00000.npy"]

    # other arguments on the interrupted folder: one-line error, exit 2
    rc, err = _run_capture(main, args[:-1] + ["--pool", "mean", "--no-progress", "--out", str(tmp_path / "run")])
    assert rc == 2 and "pool" in err and len(err.strip().splitlines()) == 1

    assert main(args + ["--out", str(tmp_path / "run")]) == 0
    done = _files(tmp_path / "run")
    assert done == ref  # byte-identical, manifest included (timing is never committed)
    _manifest(done["manifest.json"])
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


def test_cli_out_with_another_tools_manifest_says_so(image_dir, tmp_path):
    """A folder holding some other tool's manifest.json was called 'features made with different arguments
    (dtype: null there ...); ... delete it': the folder is not a feature extraction's, and it is left alone."""
    out = tmp_path / "theirs"
    out.mkdir()
    (out / "manifest.json").write_text('{"mine": 1}')
    rc, err = _run_capture(_cli(), ["--model", "internvit-6b-tiny", "--images", image_dir["folder"], "--out", str(out),
                                    "--no-progress"])
    assert rc == 2 and err == (f"error: --out {out}: its manifest.json is not a feature folder's (no store record and "
                               f"shards): a folder no feature extraction wrote (overwrite / --overwrite replaces "
                               f"only features); give a new or empty folder\n")
    assert os.listdir(out) == ["manifest.json"] and (out / "manifest.json").read_text() == '{"mine": 1}'


def test_cli_every_image_failing_is_an_error(tmp_path):
    """A job in which no image gave a feature is one ``error:`` line naming the first failure, exit 2 (it exited
    0 with 'wrote 0 features'); the committed folder keeps ``errors.jsonl`` (the record of why), and the re-run
    says the same."""
    imgs = tmp_path / "imgs"
    imgs.mkdir()
    bad = make_bad_files(str(imgs))
    argv = ["--model", "internvit-6b-tiny", "--images", str(imgs), "--out", str(tmp_path / "out"), "--no-progress"]
    for _ in range(2):
        rc, err = _run_capture(_cli(), argv)
        assert rc == 2, err
        assert err.startswith("error: --images: none of the 2 images gave a feature") and err.count("\n") == 1
        assert bad["corrupt"] in err and "errors.jsonl" in err
    with open(tmp_path / "out" / "errors.jsonl") as f:
        assert {json.loads(line)["path"] for line in f} == set(bad.values())
    shutil.copy(make_images(str(tmp_path / "good"), 1)[0], imgs / "good.png")  # one readable image: a result
    rc, err = _run_capture(_cli(), argv[:-3] + ["--out", str(tmp_path / "out2"), "--no-progress"])
    assert rc == 0, err


def test_preset_weights_are_the_same_in_every_process(tmp_path):
    """Issue 9: a preset's random weights come from a seed of its name (not the global RNG), so running
    extract_features twice on the same --out resumes/returns instead of refusing 'a different model'."""
    import torch

    from internvit.fingerprint import weights_fingerprint

    code = ("import internvit; from internvit.fingerprint import weights_fingerprint; "
            "print(weights_fingerprint(internvit.load_model('internvit-6b-tiny')))")
    fps = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=ROOT)).stdout.strip() for _ in range(2)}
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    here = weights_fingerprint(internvit.load_model("internvit-6b-tiny"))
    assert torch.equal(torch.random.get_rng_state(), state)  # the global RNG is untouched
    assert fps == {here}
    assert weights_fingerprint(internvit.build_model("internvit-6b-tiny")) == here
    img = tmp_path / "imgs"
    make_images(str(img), 3)
    args = ["--model", "internvit-6b-tiny", "--images", str(img), "--out", str(tmp_path / "out"), "--no-progress"]
    for _ in range(2):
        r = subprocess.run([sys.executable, CLI, *args], capture_output=True, text=True, cwd=ROOT)
        assert r.returncode == 0, r.stderr


def test_fp16_overflow_rows_are_errors_not_features(tmp_path):
    """Issue 9: features that overflow fp16 (NaN/inf) are counted and listed as errors with the reason, never
    stored as features; fp32 stores them all. The 6B-style fixture with its last MLP scaled up so that its
    activations exceed fp16's range (65504) but not fp32's."""
    model_dir = _six_b_fixture("/work/shared/fixtures")
    if model_dir is None:
        pytest.skip("6B-style tiny fixture not available")

    def overflowing():
        model = internvit.load_model(model_dir)
        with torch.no_grad():
            model.state_dict()["encoder.layers.2.mlp.fc2.weight"].mul_(3e4)
        return model

    img = tmp_path / "imgs"
    paths = make_images(str(img), 4)
    fx16 = FeatureExtractor(overflowing(), dtype="fp16", pool="mean", progress=False)
    res = fx16.extract(paths)
    assert res.ids == [] and [e["id"] for e in res.errors] == [0, 1, 2, 3]
    m = fx16.write(paths, tmp_path / "out16", shard_size=2)
    assert m["num_nonfinite"] == 4 and m["num_errors"] == 4 and m["count"] == 0
    errors = [json.loads(line) for line in (tmp_path / "out16" / "errors.jsonl").read_text().splitlines()]
    assert all("non-finite" in e["error"] and "float16" in e["error"] for e in errors)
    m32 = FeatureExtractor(overflowing(), pool="mean", progress=False).write(paths, tmp_path / "out32")
    assert m32["count"] == 4 and m32["num_errors"] == 0
    assert np.isfinite(read_features(tmp_path / "out32")[0]).all()


def test_nonfinite_rows_are_dropped_row_by_row(image_dir, tmp_path):
    """Within a batch only the non-finite rows are dropped (odd positions here); the rest keep their ids."""
    def embed(x):
        feats = x.flatten(1)[:, :4].float()
        odd = (torch.arange(len(x)) % 2 == 1)[:, None]
        return torch.where(odd, torch.full_like(feats, float("inf")), feats)

    paths = image_dir["good"]
    fx = FeatureExtractor(None, dict(image_size=28), embed_fn=embed, batch_size=2, progress=False)
    m = fx.write(paths, tmp_path / "out", shard_size=4)
    feats, rows = read_features(tmp_path / "out")
    assert [r["id"] for r in rows] == [0, 2, 4] and np.isfinite(feats).all() and m["num_nonfinite"] == 3
    assert [s["count"] for s in m["shards"]] == [2, 1]


def _six_b_fixture(root):
    """A folder / weight file of the 6B-style tiny parity fixture (config + weights), if present."""
    if not os.path.isdir(root):
        return None
    for dirpath, _, files in os.walk(root):
        if "config.json" in files and any(f.endswith((".safetensors", ".bin")) for f in files) and \
                "6b" in dirpath.lower():
            return dirpath
    return None
