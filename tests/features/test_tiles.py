"""FeatureExtractor(tiles=...) and extract_features.py --tiles: per-tile rows with metadata, per-image pooling,
packing independence, the projector-input form, writing / resuming / sharding and the manifest."""
import contextlib
import io
import json
import os
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import internvit
from internvit import tiling
from internvit.features import FeatureExtractor, read_features
from internvit.store import read_manifest

from .images import make_bad_files

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "tools", "extract_features.py")
SIZES = [(120, 60), (56, 56), (150, 50), (50, 100), (300, 70)]  # at 56 px, max 4: 3, 1, 4, 3, 5 tiles (4x1+t)


@pytest.fixture(scope="module")
def tile_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tile_images")
    rng = np.random.default_rng(5)
    paths = []
    for k, (w, h) in enumerate(SIZES):
        p = folder / f"im{k}.png"
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(p)
        paths.append(str(p))
    bad = make_bad_files(str(folder))
    rows = paths[:2] + [bad["corrupt"]] + paths[2:]  # input rows 0..5, row 2 unreadable
    return {"rows": rows, "good": paths, "bad_row": 2}


def _reference(fx, rows, encode=None):
    """Per image, alone: its dynamic tiles through the extractor's transform and encode."""
    out = {}
    for i, p in enumerate(rows):
        try:
            img = Image.open(p).convert("RGB")
        except Exception:  # noqa: BLE001
            continue
        t = torch.stack([fx.transform(x) for x in internvit.transforms.dynamic_tiles(img, max_num=4, image_size=56)])
        out[i] = (encode or fx.encode)(t).float()
    return out


def test_per_tile_rows_and_metadata(tiny_model, tile_dir):
    fx = FeatureExtractor(tiny_model, tiles=4, pool="cls", batch_size=5, progress=False)
    res = fx.extract(tile_dir["rows"])
    ref = _reference(fx, tile_dir["rows"])
    assert res.ids == [i for i in ref for _ in range(len(ref[i]))] == [0, 0, 0, 1, 3, 3, 3, 3, 4, 4, 4, 5, 5, 5, 5, 5]
    assert res.features.shape == (16, 64)
    assert np.allclose(res.features, torch.cat(list(ref.values())).numpy(), atol=1e-5)
    assert [e["id"] for e in res.errors] == [2]
    assert res.tiles["tile_index"] == [0, 1, 2, 0, 0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4]
    assert res.tiles["is_thumbnail"] == [False, False, True, False, False, False, False, True, False, False, True,
                                         False, False, False, False, True]
    assert res.tiles["cols"] == [2] * 3 + [1] + [3] * 4 + [1] * 3 + [4] * 5
    assert res.tiles["rows"] == [1] * 3 + [1] + [1] * 4 + [2] * 3 + [1] * 5
    assert len(res.paths) == 16 and res.paths[0] == tile_dir["rows"][0]


def test_packing_does_not_change_features(tiny_model, tile_dir):
    a = FeatureExtractor(tiny_model, tiles=4, batch_size=1, progress=False).extract(tile_dir["rows"])
    b = FeatureExtractor(tiny_model, tiles=4, batch_size=64, progress=False).extract(tile_dir["rows"])
    assert a.ids == b.ids and a.tiles == b.tiles
    assert np.allclose(a.features, b.features, atol=1e-5)


@pytest.mark.parametrize("tile_pool", ["mean", "thumbnail"])
def test_per_image_pooling(tiny_model, tile_dir, tile_pool):
    fx = FeatureExtractor(tiny_model, tiles=4, tile_pool=tile_pool, pool="cls_mean", batch_size=4, progress=False)
    res = fx.extract(tile_dir["rows"])
    ref = _reference(fx, tile_dir["rows"])
    assert res.ids == [0, 1, 3, 4, 5]
    want = np.stack([(ref[i].mean(0) if tile_pool == "mean" else ref[i][-1]).numpy() for i in res.ids])
    assert res.features.shape == (5, 128) and np.allclose(res.features, want, atol=1e-5)
    assert res.tiles == {"cols": [2, 1, 3, 1, 4], "rows": [1, 1, 1, 2, 1], "num_tiles": [3, 1, 4, 3, 5]}


def test_projector_input(tiny_model, tile_dir):
    fx = FeatureExtractor(tiny_model, tiles=4, projector_input=True, batch_size=6, progress=False)
    res = fx.extract(tile_dir["good"][:2])
    assert res.features.shape == (4, 4, 256)  # 56 px: 4x4 tokens -> 2x2 after pixel shuffle, 4C = 256
    with torch.no_grad():
        ref = _reference(fx, tile_dir["good"][:2],
                         encode=lambda t: tiling.pixel_shuffle(tiny_model(t).last_hidden_state[:, 1:], 0.5))
    assert np.allclose(res.features, torch.cat(list(ref.values())).numpy(), atol=1e-5)


@pytest.mark.parametrize("kwargs,msg", [
    (dict(projector_input=True), "needs tiles"),
    (dict(tiles=4, projector_input=True, normalize=True), "raw tokens"),
    (dict(tiles=4, projector_input=True, layers=[0, 1]), "one block"),
    (dict(tiles=0), "max_num"),
    (dict(tiles=4, min_tiles=5), "max_num must be >= min_num"),
    (dict(tiles=4, tile_pool="max"), "tile_pool"),
    (dict(tiles=4, tile_pool="thumbnail", use_thumbnail=False), "use_thumbnail"),
    (dict(tiles=4, projector_input=True, downsample_ratio=0.3), "downsample_ratio"),
])
def test_bad_tile_arguments(tiny_model, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        FeatureExtractor(tiny_model, progress=False, **kwargs)


def test_write_read_resume_and_manifest(tiny_model, tile_dir, tmp_path):
    fx = FeatureExtractor(tiny_model, tiles=4, batch_size=5, progress=False)
    m = fx.write(tile_dir["rows"], tmp_path / "out", shard_size=2, metadata_format="jsonl",
                 metadata_pattern="metadata/part-{shard:05d}.jsonl")
    assert m["tiling"] == {"rule": "InternVL-Chat dynamic_preprocess", "max_num": 4, "min_num": 1, "image_size": 56,
                           "use_thumbnail": True, "tile_pool": None, "projector_input": False,
                           "downsample_ratio": None}
    assert m["count"] == 16 and m["num_errors"] == 1 and [s["count"] for s in m["shards"]] == [4, 4, 8]
    feats, rows = read_features(tmp_path / "out")
    ref = fx.extract(tile_dir["rows"])
    assert np.array_equal(feats, ref.features)
    assert [r["id"] for r in rows] == ref.ids
    assert [r["tile_index"] for r in rows] == ref.tiles["tile_index"]
    assert [r["is_thumbnail"] for r in rows] == ref.tiles["is_thumbnail"]
    assert set(rows[0]) == {"id", "path", "tile_index", "cols", "rows", "is_thumbnail"}
    assert read_manifest(tmp_path / "out")["tiling"]["max_num"] == 4
    # the same job again: nothing rewritten; other tiling: refused, naming it
    before = {f: os.path.getmtime(tmp_path / "out" / f) for f in ("manifest.json", "features/part-00000.npy")}
    fx.write(tile_dir["rows"], tmp_path / "out", shard_size=2, metadata_format="jsonl",
             metadata_pattern="metadata/part-{shard:05d}.jsonl")
    assert before == {f: os.path.getmtime(tmp_path / "out" / f) for f in before}
    other = FeatureExtractor(tiny_model, tiles=2, batch_size=5, progress=False)
    with pytest.raises(ValueError, match="tiling"):
        other.write(tile_dir["rows"], tmp_path / "out", shard_size=2, metadata_format="jsonl",
                    metadata_pattern="metadata/part-{shard:05d}.jsonl")
    whole = FeatureExtractor(tiny_model, batch_size=5, progress=False)
    with pytest.raises(ValueError, match="different arguments"):
        whole.write(tile_dir["rows"], tmp_path / "out", shard_size=2, metadata_format="jsonl",
                    metadata_pattern="metadata/part-{shard:05d}.jsonl")


def test_pooled_parquet_write(tiny_model, tile_dir, tmp_path):
    fx = FeatureExtractor(tiny_model, tiles=4, tile_pool="mean", batch_size=5, progress=False)
    m = fx.write(tile_dir["rows"], tmp_path / "p", shard_size=4)
    feats, rows = read_features(tmp_path / "p")
    assert feats.shape == (5, 64) and m["tiling"]["tile_pool"] == "mean"
    assert [(r["id"], r["num_tiles"]) for r in rows] == [(0, 3), (1, 1), (3, 4), (4, 3), (5, 5)]


def _cli_main():
    import importlib.util

    spec = importlib.util.spec_from_file_location("extract_features_cli_tiles", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main


def _files(folder):
    out = {}
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if d != ".store"]
        for f in files:
            with open(os.path.join(root, f), "rb") as fh:
                out[os.path.relpath(os.path.join(root, f), folder)] = fh.read()
    return out


def test_cli_tiles_killed_mid_run_resumes_byte_identical(tiny_model, tile_dir, tmp_path, monkeypatch):
    from tests.faults import run

    model_dir = internvit.save_model(tiny_model, str(tmp_path / "model"))
    (tmp_path / "list.txt").write_text("\n".join(tile_dir["rows"]) + "\n")
    args = ["--model", model_dir, "--images", str(tmp_path / "list.txt"), "--tiles", "4", "--shard-size", "2",
            "--batch-size", "3", "--no-progress"]
    trace = tmp_path / "trace.txt"
    monkeypatch.setenv("INTERNVIT_STORE_TRACE", str(trace))  # the reference run, in process, lists write points
    assert _cli_main()(args + ["--out", str(tmp_path / "ref")]) == 0
    monkeypatch.delenv("INTERNVIT_STORE_TRACE")
    ref = _files(tmp_path / "ref")
    points = trace.read_text().splitlines()
    assert len(points) >= 6
    cmd = [sys.executable, CLI, *args, "--out", str(tmp_path / "run")]
    proc = run(cmd, fault_at=len(points) // 2)  # killed after the first shard, before the last
    assert proc.returncode != 0 and not (tmp_path / "run" / "manifest.json").exists()
    assert any(f.startswith("features/") for f in _files(tmp_path / "run"))
    assert run(cmd).returncode == 0
    assert _files(tmp_path / "run") == ref  # byte-identical, manifest included
    m = json.loads(ref["manifest.json"])
    assert m["tiling"]["max_num"] == 4 and m["count"] == 16


@pytest.mark.parametrize("extra,msg", [(["--tile-pool", "mean"], "--tile-pool needs --tiles"),
                                       (["--no-thumbnail"], "--no-thumbnail needs --tiles"),
                                       (["--tiles", "3", "--min-tiles", "4"], "--tiles must be >= --min-tiles"),
                                       (["--tiles", "3", "--tile-pool", "thumbnail", "--no-thumbnail"],
                                        "use_thumbnail"),
                                       (["--tiles", "3", "--projector-input", "--normalize"], "raw tokens")])
def test_cli_tile_argument_errors(tile_dir, tmp_path, extra, msg):
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = _cli_main()(["--model", "internvit-6b-tiny", "--images", tile_dir["good"][0], "--out",
                          str(tmp_path / "o"), *extra])
    assert rc == 2 and msg in err.getvalue() and len(err.getvalue().strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()
