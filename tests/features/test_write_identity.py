"""What a feature folder records and refuses: paths that are not UTF-8, the input's own preprocessing as the job
identity, empty paths, image sizes off the patch grid, normalisation after tile pooling, flags that only apply
in some modes, and error messages that name the real problem."""
import contextlib
import errno
import importlib.util
import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision import transforms as T

import internvit
import internvit.data
from internvit.data import ImageDataset
from internvit.features import FeatureExtractor, _ChunkedSink, _writing, output_text, read_features
from internvit.store import PendingJobError, read_manifest

from .images import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLI = os.path.join(ROOT, "tools", "extract_features.py")


def _cli(argv):
    """Run the CLI in process: ``(exit status, stderr)``."""
    spec = importlib.util.spec_from_file_location("extract_features_cli_identity", CLI)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            rc = mod.main([str(a) for a in argv])
        except SystemExit as e:  # the parser's own errors (one line, status 2)
            rc = e.code
    return rc, err.getvalue()


@pytest.fixture()
def fresh_model():
    """A tiny model of its own (the extractor casts its model in place: never the shared one)."""
    torch.manual_seed(0)
    return internvit.load_model("internvit-6b-tiny")


def _interrupt_at(monkeypatch, stop_paths):
    """Make reading any of ``stop_paths`` stop the process's work like Ctrl-C (shard files before stay)."""
    real = internvit.data.load_image

    def load(path):
        if path in stop_paths:
            raise KeyboardInterrupt
        return real(path)

    monkeypatch.setattr(internvit.data, "load_image", load)
    return lambda: monkeypatch.setattr(internvit.data, "load_image", real)


# -- 1. paths that are not valid UTF-8 ---------------------------------------------------------------------
@pytest.fixture()
def odd_names(tmp_path):
    folder = tmp_path / "imgs"
    good = make_images(str(folder), 2)
    bad_good = os.fsdecode(os.fsencode(str(folder)) + b"/bad\xff.png")
    Image.new("RGB", (60, 50), (200, 0, 0)).save(bad_good, format="PNG")
    bad_corrupt = os.fsdecode(os.fsencode(str(folder)) + b"/zz\xfe.png")
    with open(bad_corrupt, "wb") as f:
        f.write(b"not a png")
    return {"folder": str(folder), "good": good, "bad_good": bad_good, "bad_corrupt": bad_corrupt}


def test_output_text_escapes_undecodable_bytes():
    assert output_text(os.fsdecode(b"/a/bad\xff.png")) == "/a/bad\\xff.png"
    assert output_text(b"/a/bad\xff.png") == "/a/bad\\xff.png"
    assert output_text("/a/ok-é.png") == "/a/ok-é.png"
    assert output_text("x\ud800y") == "x\\ud800y"  # a lone surrogate that is not an escaped byte


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_non_utf8_paths_are_written_escaped_everywhere(tiny_model, odd_names, tmp_path, fmt):
    fx = FeatureExtractor(tiny_model, batch_size=2, progress=False)
    out = tmp_path / "out"
    m = fx.write(odd_names["folder"], out, shard_size=2, metadata_format=fmt,
                 metadata_pattern="metadata/part-{shard:05d}." + fmt,
                 extra_columns={"source": [os.fsdecode(b"s\xff")] * 4})
    paths = internvit.data.list_images(odd_names["folder"])  # bad\xff, img_00, img_01, zz\xfe
    assert paths[0] == odd_names["bad_good"] and paths[3] == odd_names["bad_corrupt"]
    esc = [os.fsencode(p).decode("utf-8", "backslashreplace") for p in paths]
    assert esc[0].endswith("/bad\\xff.png")
    feats, rows = read_features(out)
    assert feats.shape == (3, 64) and m["count"] == 3 and m["num_escaped_paths"] == 2
    assert [(r["id"], r["path"], r["source"]) for r in rows] == [(i, esc[i], "s\\xff") for i in range(3)]
    with open(out / "errors.jsonl", encoding="utf-8") as f:
        errors = [json.loads(line) for line in f]
    assert [(e["id"], e["path"]) for e in errors] == [(3, esc[3])]
    ref = fx.extract(paths)  # in memory: the real paths
    assert ref.paths == paths[:3] and np.array_equal(ref.features, feats)


def test_cli_non_utf8_file_name_completes(odd_names, tmp_path):
    rc, err = _cli(["--model", "internvit-6b-tiny", "--images", odd_names["folder"], "--out", tmp_path / "o",
                    "--no-progress", "--metadata-format", "jsonl"])
    assert rc == 0, err
    _, rows = read_features(tmp_path / "o")
    assert rows[0]["path"] == output_text(odd_names["bad_good"]) and rows[0]["path"].endswith("bad\\xff.png")


# -- 2. the input's own preprocessing is the job identity ---------------------------------------------------
def _tf(size):
    return T.Compose([T.Resize(size), T.CenterCrop(size), T.ToTensor()])


@pytest.fixture(scope="module")
def nine_images(tmp_path_factory):
    return make_images(str(tmp_path_factory.mktemp("nine")), 9, seed=3)


def test_dataset_transform_is_recorded_and_compared(tiny_model, nine_images, tmp_path, monkeypatch):
    fx = FeatureExtractor(tiny_model, batch_size=2, progress=False)
    out = tmp_path / "out"
    restore = _interrupt_at(monkeypatch, {nine_images[4]})  # shard 0 (rows 0-2) finished, then interrupted
    with pytest.raises(KeyboardInterrupt):
        fx.write(ImageDataset(nine_images, _tf(56)), out, shard_size=3)
    restore()
    assert read_manifest(out) is None and (out / "features" / "part-00000.npy").exists()
    with pytest.raises(PendingJobError, match="preprocessing"):  # another transform never resumes this job
        fx.write(ImageDataset(nine_images, _tf(112)), out, shard_size=3)
    m = fx.write(ImageDataset(nine_images, _tf(56)), out, shard_size=3)  # the same one does
    assert "Resize(size=56" in m["preprocessing"]["transform"] and "image_size" not in m["preprocessing"]
    feats, _ = read_features(out)
    assert np.array_equal(feats, fx.extract(ImageDataset(nine_images, _tf(56))).features)
    with pytest.raises(ValueError, match="preprocessing"):  # a finished folder is not returned for another one
        fx.write(ImageDataset(nine_images, _tf(112)), out, shard_size=3)
    # the extractor's own transform given as preprocess= is the same job as the dataset's
    same = FeatureExtractor(tiny_model, _tf(56), batch_size=2, progress=False)
    assert same.write(nine_images, out, shard_size=3)["timing"]["images"] == 0


def _opaque(img):  # a plain function: its parameters cannot be recorded
    return T.functional.to_tensor(T.functional.center_crop(T.functional.resize(img, 56), 56))


def test_unidentifiable_transform_is_not_reused_or_resumed(tiny_model, nine_images, tmp_path, monkeypatch):
    fx = FeatureExtractor(tiny_model, batch_size=2, progress=False)
    out = tmp_path / "out"
    restore = _interrupt_at(monkeypatch, {nine_images[4]})
    with pytest.raises(KeyboardInterrupt):
        fx.write(ImageDataset(nine_images, _opaque), out, shard_size=3)
    restore()
    with pytest.raises(ValueError, match="interrupted job .*_opaque.*preprocess_id"):
        fx.write(ImageDataset(nine_images, _opaque), out, shard_size=3)
    done = tmp_path / "done"
    fx.write(ImageDataset(nine_images, _opaque), done, shard_size=3)
    with pytest.raises(ValueError, match="holds features .*preprocess_id"):
        fx.write(ImageDataset(nine_images, _opaque), done, shard_size=3)
    # with an explicit identity, resume and reuse work
    tagged = tmp_path / "tagged"
    restore = _interrupt_at(monkeypatch, {nine_images[4]})
    with pytest.raises(KeyboardInterrupt):
        fx.write(ImageDataset(nine_images, _opaque), tagged, shard_size=3, preprocess_id="resize56-v1")
    restore()
    m = fx.write(ImageDataset(nine_images, _opaque), tagged, shard_size=3, preprocess_id="resize56-v1")
    assert m["preprocessing"]["preprocess_id"] == "resize56-v1" and m["timing"]["images"] == 6
    again = fx.write(ImageDataset(nine_images, _opaque), tagged, shard_size=3, preprocess_id="resize56-v1")
    assert again["timing"]["images"] == 0


def test_other_dataset_class_is_identified(tiny_model, tmp_path):
    class Ready(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return torch.full((3, 56, 56), float(i))

    fx = FeatureExtractor(tiny_model, batch_size=2, progress=False)
    m = fx.write(Ready(), tmp_path / "o", shard_size=2)
    assert m["preprocessing"]["dataset"].endswith("Ready") and m["preprocessing"]["unverified_callables"]
    with pytest.raises(ValueError, match="preprocess_id"):
        fx.write(Ready(), tmp_path / "o", shard_size=2)


def test_tiles_refuse_an_image_dataset_transform(tiny_model, nine_images):
    fx = FeatureExtractor(tiny_model, tiles=2, progress=False)
    with pytest.raises(ValueError, match="own transform"):
        fx.extract(ImageDataset(nine_images[:2], _tf(56)))


# -- 3. empty paths ------------------------------------------------------------------------------------------
def test_empty_paths_are_refused(tiny_model, nine_images, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    fx = FeatureExtractor(tiny_model, progress=False)
    with pytest.raises(ValueError, match="out_dir: empty path"):
        fx.write(nine_images[:2], "")
    with pytest.raises(ValueError, match="images: empty path"):
        fx.write("", tmp_path / "o")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("flag", ["--out", "--images", "--model", "--config"])
def test_cli_empty_path_arguments(nine_images, tmp_path, monkeypatch, flag):
    monkeypatch.chdir(tmp_path)
    args = {"--model": "internvit-6b-tiny", "--images": nine_images[0], "--out": "o", "--config": None}
    args[flag] = ""
    rc, err = _cli([x for k, v in args.items() if v is not None for x in (k, v)] + ["--no-progress"])
    assert rc == 2 and err == f"error: argument {flag}: empty value ''\n"
    assert os.listdir(tmp_path) == []


# -- 4. image sizes off the patch grid ----------------------------------------------------------------------
def test_image_size_must_be_a_multiple_of_the_patch(tiny_model):
    with pytest.raises(ValueError, match="image_size 50 is not a multiple of the model's patch size 14"):
        FeatureExtractor(tiny_model, dict(image_size=50), progress=False)
    with pytest.raises(ValueError, match="projector_input: image_size 42 must be a multiple of 28"):
        FeatureExtractor(tiny_model, dict(image_size=42), tiles=2, projector_input=True, progress=False)
    FeatureExtractor(tiny_model, dict(image_size=42), progress=False)  # fine without the projector


def test_transform_output_off_the_patch_grid_is_refused(tiny_model, nine_images):
    fx = FeatureExtractor(tiny_model, _tf(50), progress=False)
    with pytest.raises(ValueError, match="50x50 px: not a multiple of the patch size 14"):
        fx.extract(nine_images[:1])


@pytest.mark.parametrize("extra,msg", [
    (["--image-size", "50"], "--image-size 50: must be a multiple of the patch size 14"),
    (["--tiles", "2", "--projector-input", "--image-size", "42"], "--projector-input needs a multiple of 28"),
])
def test_cli_image_size_refused_before_anything(nine_images, tmp_path, extra, msg):
    rc, err = _cli(["--model", "internvit-6b-tiny", "--images", nine_images[0], "--out", tmp_path / "o",
                    "--no-progress", *extra])
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- 5. normalise after tile pooling --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def half_red_blue(tmp_path_factory):
    a = np.zeros((56, 112, 3), np.uint8)
    a[:, :56] = (255, 0, 0)
    a[:, 56:] = (0, 0, 255)
    path = str(tmp_path_factory.mktemp("rb") / "rb.png")
    Image.fromarray(a).save(path)
    return path


@pytest.mark.parametrize("tile_pool", [None, "mean", "thumbnail"])
def test_normalize_gives_unit_rows_after_tile_pooling(half_red_blue, tmp_path, tile_pool):
    def embed(x):
        return x.mean(dim=(2, 3))

    kw = dict(preprocess=dict(image_size=56), embed_fn=embed, tiles=4, tile_pool=tile_pool, progress=False)
    raw = FeatureExtractor(None, **kw).extract([half_red_blue]).features
    res = FeatureExtractor(None, normalize=True, **kw).extract([half_red_blue]).features
    assert raw.shape[0] == (3 if tile_pool is None else 1)
    np.testing.assert_allclose(np.linalg.norm(res, axis=1), 1.0, atol=1e-6)
    np.testing.assert_allclose(res, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-6)
    FeatureExtractor(None, normalize=True, **kw).write([half_red_blue], tmp_path / "o")
    feats, _ = read_features(tmp_path / "o")
    np.testing.assert_allclose(feats, res, atol=1e-6)


def test_normalize_grid_tiles_per_position(tiny_model, half_red_blue):
    kw = dict(pool="grid", tiles=2, tile_pool="mean", progress=False)
    raw = FeatureExtractor(tiny_model, **kw).extract([half_red_blue]).features
    res = FeatureExtractor(tiny_model, normalize=True, **kw).extract([half_red_blue]).features
    np.testing.assert_allclose(res, raw / np.linalg.norm(raw, axis=1, keepdims=True), atol=1e-5)


# -- 6. flags that only apply in some mode ------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,msg", [
    (dict(min_tiles=1), "min_tiles needs tiles"),
    (dict(use_thumbnail=False), "use_thumbnail needs tiles"),
    (dict(tile_pool="mean"), "tile_pool needs tiles"),
    (dict(tiles=3, downsample_ratio=0.25), "downsample_ratio needs projector_input"),
    (dict(tiles=3, projector_input=True, pool="mean"), "pool='mean' with projector_input"),
])
def test_flags_outside_their_mode_are_refused(tiny_model, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        FeatureExtractor(tiny_model, progress=False, **kwargs)


def test_projector_manifest_records_no_pool(tiny_model, nine_images, tmp_path):
    m = FeatureExtractor(tiny_model, tiles=1, projector_input=True, progress=False).write(nine_images[:2],
                                                                                         tmp_path / "o")
    assert m["pool"] is None and m["tiling"]["projector_input"] is True


@pytest.mark.parametrize("extra,msg", [
    (["--downsample-ratio", "0.25"], "--downsample-ratio needs --tiles"),
    (["--min-tiles", "1"], "--min-tiles needs --tiles"),
    (["--tiles", "3", "--downsample-ratio", "0.25"], "--downsample-ratio needs --projector-input"),
    (["--tiles", "3", "--projector-input", "--pool", "mean"], "--pool does not apply with --projector-input"),
    (["--tiles", "3", "--resize-mode", "squash"], "--resize-mode does not apply with --tiles"),
])
def test_cli_flags_outside_their_mode(nine_images, tmp_path, extra, msg):
    rc, err = _cli(["--model", "internvit-6b-tiny", "--images", nine_images[0], "--out", tmp_path / "o",
                    "--no-progress", *extra])
    assert rc == 2 and msg in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o").exists()


# -- 7. messages that name the real problem -----------------------------------------------------------------
def test_short_write_names_the_file_and_enospc():
    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    arr = np.zeros((64, 1024), np.float32)
    with pytest.raises(OSError) as e:
        with _writing("/x/features/part-00000.npy"), open("/dev/full", "wb") as f:
            np.save(_ChunkedSink(f), arr)
            f.flush()
    assert e.value.errno == errno.ENOSPC
    assert "No space left on device (ENOSPC) while writing /x/features/part-00000.npy" in str(e.value)


def test_cli_disk_full_names_the_file(nine_images, tmp_path):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a small tmpfs")
    try:
        proc = subprocess.run([sys.executable, CLI, "--model", "internvit-6b-tiny", "--images", nine_images[0],
                               "--out", str(mnt / "o"), "--no-progress", "--pool", "grid", "--image-size", "448"],
                              capture_output=True, text=True, env=dict(os.environ, OMP_NUM_THREADS="1"))
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: [Errno 28] No space left on device (ENOSPC) while writing ")
    assert "/o/features/part-00000.npy" in line


def test_dtype_change_is_named(fresh_model, nine_images, tmp_path):
    model_dir = internvit.save_model(fresh_model, str(tmp_path / "model"))
    base = ["--model", model_dir, "--images", nine_images[0], "--out", tmp_path / "o", "--no-progress"]
    assert _cli(base)[0] == 0
    rc, err = _cli(base + ["--dtype", "bf16"])
    assert rc == 2 and 'dtype: "float32" there, "bfloat16" now' in err


def test_pending_job_message_names_the_flag_that_exists(fresh_model, nine_images, tmp_path, monkeypatch):
    model_dir = internvit.save_model(fresh_model, str(tmp_path / "model"))
    (tmp_path / "list.txt").write_text("\n".join(nine_images) + "\n")
    base = ["--model", model_dir, "--images", tmp_path / "list.txt", "--out", tmp_path / "o", "--no-progress",
            "--shard-size", "3", "--batch-size", "2"]
    restore = _interrupt_at(monkeypatch, {nine_images[4]})
    assert _cli(base)[0] == 130
    restore()
    rc, err = _cli(base + ["--pool", "mean"])
    assert rc == 2 and 'pool: "cls" there, "mean" now' in err and "--discard-pending" in err
    rc, err = _cli(base + ["--pool", "mean", "--discard-pending"])
    assert rc == 0, err
    assert read_manifest(tmp_path / "o")["pool"] == "mean"


@pytest.mark.parametrize("dtype,hint", [("fp32", "they are not a precision overflow: check the weights and the image"),
                                        ("bf16", "try fp32"), ("fp16", "try bf16 or fp32")])
@pytest.mark.parametrize("tiles", [None, 2])
def test_nonfinite_message_fits_the_dtype(nine_images, dtype, hint, tiles):
    def nan_embed(x):
        return torch.full((x.shape[0], 4), float("nan"))

    fx = FeatureExtractor(None, dict(image_size=56), embed_fn=nan_embed, dtype=dtype, tiles=tiles, progress=False)
    res = fx.extract(nine_images[:1])
    name = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}[dtype]
    assert [e["error"] for e in res.errors] == [f"non-finite features (NaN or infinity in dtype {name}; {hint})"]

