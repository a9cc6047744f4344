"""Trial 9b: feature-extraction faults found by a new user (the torchrun kill of one rank is in
tests/features/test_distributed.py)."""
from __future__ import annotations

import os

import pytest

from internvit.store import PARTS, Store, StoreError, refuse_foreign_folder


# -- 1. a rank's death never orphans the output ------------------------------------------------------------
def test_a_folder_holding_only_parts_is_the_stores_own(tmp_path):
    """What a rank killed before the merge left (under the old code, without rank 0's '.store'): not a user's
    folder."""
    (tmp_path / PARTS / "rank-0-of-2").mkdir(parents=True)
    refuse_foreign_folder(tmp_path, ("manifest.json",), "feature extraction")  # no FileExistsError
    (tmp_path / "holiday.jpg").write_bytes(b"x")
    other = tmp_path / "user"
    other.mkdir()
    (other / "holiday.jpg").write_bytes(b"x")
    with pytest.raises(FileExistsError, match="holiday.jpg"):
        refuse_foreign_folder(other, ("manifest.json",), "feature extraction")


def test_a_held_store_keeps_its_marker_when_the_block_fails(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with Store(out, job={"a": 1}):
            raise RuntimeError("refused before writing")
    assert not out.exists()  # a refused job leaves nothing
    with pytest.raises(RuntimeError):
        with Store(out, job={"a": 1}) as st:
            st.hold()
            os.makedirs(out / PARTS / "rank-1-of-2")  # another process writes for this job
            raise RuntimeError("a peer died")
    assert (out / ".store").is_dir()
    with pytest.raises(StoreError, match="outside"):
        Store(out).hold()


# -- 2. --max-image-pixels: one place, from the header, in every DataLoader worker ----------------------------
_SPAWN = """
import sys
from torch.utils.data import DataLoader
from torchvision.transforms import ToTensor
from internvit.data import ImageDataset, collate_images, set_max_image_pixels
if __name__ == "__main__":
    set_max_image_pixels(int(sys.argv[2]))
    ds = ImageDataset([sys.argv[1]], ToTensor())
    for ctx in ("fork", "spawn"):
        for pixels, ids, errors in DataLoader(ds, batch_size=1, num_workers=1, collate_fn=collate_images,
                                              multiprocessing_context=ctx):
            print(ctx, ids, errors[0][1] if errors else None)
"""


def _image(path, w=60, h=40):
    from PIL import Image

    Image.new("RGB", (w, h), (10, 20, 30)).save(path)
    return str(path)


def test_the_pixel_limit_reaches_spawned_dataloader_workers(tmp_path):
    """A spawned worker imports PIL afresh (Pillow's default limit): the 2,400-pixel image was read there."""
    import sys

    from tests.faults import run

    img = _image(tmp_path / "a.png")
    script = tmp_path / "spawn.py"
    script.write_text(_SPAWN)
    r = run([sys.executable, str(script), img, "1000"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-2000:]
    lines = r.stdout.splitlines()
    assert [ln.split(" [")[0] for ln in lines] == ["fork", "spawn"]
    for line in lines:
        assert "[] DecompressionBombError: 2,400 pixels, over the limit of 1,000" in line, r.stdout


def test_set_max_image_pixels_is_the_one_place(tmp_path):
    from PIL import Image

    from internvit.data import MAX_IMAGE_PIXELS_ENV, load_image, set_max_image_pixels

    img = _image(tmp_path / "a.png")
    default = Image.MAX_IMAGE_PIXELS
    try:
        set_max_image_pixels(2000)
        assert os.environ[MAX_IMAGE_PIXELS_ENV] == "2000"
        with pytest.raises(Image.DecompressionBombError, match="2,400 pixels, over the limit of 2,000 .*header"):
            load_image(img)
        set_max_image_pixels(0)
        assert load_image(img).size == (60, 40)
        with pytest.raises(ValueError, match="max_image_pixels"):
            set_max_image_pixels(-1)
    finally:
        set_max_image_pixels(None)
    assert Image.MAX_IMAGE_PIXELS == default and os.environ.pop(MAX_IMAGE_PIXELS_ENV) == "pillow"


def test_the_limit_is_checked_from_the_header_before_decoding(tmp_path):
    """A PNG whose header claims 30000 x 30000 pixels and holds almost no data: refused as too large (from the
    header), not read as a truncated file (which would mean it was being decoded)."""
    import struct
    import zlib

    from PIL import Image

    from internvit.data import MAX_IMAGE_PIXELS_ENV, load_image, set_max_image_pixels

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "bomb.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 100)) + chunk(b"IEND", b""))
    try:
        set_max_image_pixels(10 ** 8)
        with pytest.raises(Image.DecompressionBombError, match="900,000,000 pixels, over the limit of 100,000,000"):
            load_image(str(path))
    finally:
        set_max_image_pixels(None)
        os.environ.pop(MAX_IMAGE_PIXELS_ENV)


# -- 3. the Python API refuses a user's folder as the CLI does; the CLI's --overwrite -------------------------
@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Four small images and the tiny preset model."""
    import internvit
    from tests.features.images import make_images

    root = tmp_path_factory.mktemp("t9b")
    make_images(str(root / "imgs"), 4, seed=9)
    return root, internvit.load_model("internvit-6b-tiny")


def _tree(folder):
    return sorted(os.path.relpath(os.path.join(d, n), folder) for d, ds, fs in os.walk(folder) for n in ds + fs)


def test_api_write_refuses_a_folder_of_other_files(tiny, tmp_path):
    from internvit.features import FeatureExtractor

    root, model = tiny
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    fx = FeatureExtractor(model, progress=False)
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match=r"user: a folder that is not empty \(notes.txt\)"):
            fx.write(root / "imgs", user, overwrite=overwrite)
        assert _tree(user) == ["notes.txt"]
    m = fx.write(root / "imgs", tmp_path / "new")  # a new folder, and then the same one again
    assert m["count"] == 4 and fx.write(root / "imgs", tmp_path / "new")["count"] == 4


def test_cli_overwrite_replaces_another_jobs_features(tiny, tmp_path):
    import json
    import sys

    from tests.faults import REPO, run

    root, _ = tiny
    cmd = [sys.executable, str(REPO / "tools" / "extract_features.py"), "--model", "internvit-6b-tiny", "--images",
           str(root / "imgs"), "--out", str(tmp_path / "o"), "--no-progress"]
    assert run(cmd).returncode == 0
    r = run([*cmd, "--normalize"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: ") and "--overwrite" in lines[0]
    assert json.loads((tmp_path / "o" / "manifest.json").read_text())["normalize"] is False
    r = run([*cmd, "--normalize", "--overwrite"])
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["normalize"] is True and m["count"] == 4 and m["_store"]["generation"] == 2
    (tmp_path / "user").mkdir()
    (tmp_path / "user" / "a.txt").write_text("mine")
    r = run([*cmd[:-3], "--out", str(tmp_path / "user"), "--no-progress", "--overwrite"])
    assert r.returncode == 2 and r.stderr.startswith("error: --out") and _tree(tmp_path / "user") == ["a.txt"]


# -- 4. metadata columns: the tile columns are reserved; a parquet column keeps its values' types ---------------
@pytest.mark.parametrize("name,kw", [("tile_index", dict(tiles=2)), ("cols", dict(tiles=2, tile_pool="mean")),
                                     ("num_tiles", dict(tiles=2, tile_pool="mean")), ("path", {})])
def test_a_column_named_like_one_the_job_adds_is_refused(tiny, tmp_path, name, kw):
    """A user's 'tile_index' column was replaced by the tiler's, silently (parquet and jsonl)."""
    from internvit.features import FeatureExtractor

    root, model = tiny
    fx = FeatureExtractor(model, progress=False, **kw)
    with pytest.raises(ValueError, match=rf"extra_columns: '{name}' is a reserved column name \(this job writes "
                                         rf"id, path"):
        fx.write(root / "imgs", tmp_path / "o", extra_columns={name: [7, 7, 7, 7]})
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("values,match", [
    ([1, 2.5, 3, 4], r"row 0 holds 1 \(int\), which a parquet column of double stores as 1.0"),
    ([1, "a", 3, 4], r"values of types int \(first at row 0\), str \(first at row 1\)"),
    (["a", b"b", "c", "d"], r"row 0 holds 'a' \(str\), which a parquet column of binary stores as b'a'"),
    ([True, 2, 3, 4], r"values of types bool \(first at row 0\), int \(first at row 1\)"),
    ([{"a": 1}, {"b": 2}, {}, {}], r"row 0 holds \{'a': 1\} \(dict\)"),
])
def test_a_parquet_column_of_mixed_types_is_refused_not_coerced(tiny, tmp_path, values, match):
    from internvit.features import FeatureExtractor, read_features

    root, model = tiny
    fx = FeatureExtractor(model, progress=False)
    with pytest.raises(ValueError, match=r"extra_columns\['x'\]: .*" + match + ".*metadata_format='jsonl'"):
        fx.write(root / "imgs", tmp_path / "o", extra_columns={"x": values})
    assert not (tmp_path / "o").exists()
    jsonl = dict(metadata_format="jsonl", metadata_pattern="metadata/part-{shard:05d}.jsonl")
    if any(isinstance(v, bytes) for v in values):  # JSON has no bytes: written as the text "b'b'" before
        with pytest.raises(ValueError, match=r"extra_columns\['x'\]: row 1 holds b'b' \(bytes\), which a JSON"):
            fx.write(root / "imgs", tmp_path / "j", extra_columns={"x": values}, **jsonl)
        assert not (tmp_path / "j").exists()
        return
    fx.write(root / "imgs", tmp_path / "j", extra_columns={"x": values}, **jsonl)  # JSON keeps each type
    assert [(type(r["x"]), r["x"]) for r in read_features(tmp_path / "j")[1]] == [(type(v), v) for v in values]


def test_a_parquet_column_of_one_type_is_kept(tiny, tmp_path):
    import numpy as np

    from internvit.features import FeatureExtractor, read_features

    root, model = tiny
    cols = {"label": np.arange(4), "score": [0.5, float("nan"), None, 2.0], "tags": [("a",), ["b"], [], None]}
    FeatureExtractor(model, progress=False).write(root / "imgs", tmp_path / "o", extra_columns=cols)
    rows = read_features(tmp_path / "o")[1]
    assert [r["label"] for r in rows] == [0, 1, 2, 3] and [r["tags"] for r in rows] == [["a"], ["b"], [], None]
    assert rows[0]["score"] == 0.5 and rows[1]["score"] != rows[1]["score"] and rows[2]["score"] is None


# -- 5. the random-weights warning comes only once the job is accepted ---------------------------------------
def test_a_refused_run_prints_only_its_error_line(tiny, tmp_path):
    """A different job pending in --out is refused by the store: the preset's random-weights warning was
    printed before that refusal, so the refused run printed two lines."""
    import sys

    from internvit.store import FAULT_EXIT_CODE
    from tests.faults import REPO, run

    root, _ = tiny
    cmd = [sys.executable, str(REPO / "tools" / "extract_features.py"), "--model", "internvit-6b-tiny", "--images",
           str(root / "imgs"), "--out", str(tmp_path / "o"), "--no-progress", "--shard-size", "2"]
    assert run(cmd, fault_at=4).returncode == FAULT_EXIT_CODE
    r = run([*cmd, "--normalize"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "an interrupted job is pending" in lines[0], r.stderr
    r = run(cmd)  # the same job resumes: now the warning, then the work
    assert r.returncode == 0 and r.stderr.count("RANDOM") == 1 and "wrote 4 features" in r.stdout, r.stderr


# -- 6. lossy casts warn once; no readable image gives (0, D); skipped images counted; broken links named -------
def test_a_lossy_cast_warns_once_with_its_own_class(tiny, tmp_path):
    import warnings

    import torch

    import internvit
    from internvit import LossyModelCastWarning
    from internvit.features import FeatureExtractor

    _, model = tiny
    internvit.save_model(model, tmp_path / "fp32")
    exact = internvit.load_model("internvit-6b-tiny").to(torch.bfloat16).to(torch.float32)  # bf16 values in fp32
    internvit.save_model(exact, tmp_path / "bf16_in_fp32")
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        internvit.load_model(tmp_path / "fp32", dtype="bf16")
        internvit.load_model(tmp_path / "fp32", dtype="fp64")  # widening: nothing lost
        internvit.load_model(tmp_path / "bf16_in_fp32", dtype="bf16")  # every value fits: nothing lost
        FeatureExtractor(internvit.load_model(tmp_path / "fp32"), dtype="fp16", progress=False)
        FeatureExtractor(internvit.load_model(tmp_path / "fp32", dtype="fp16"), dtype="fp16", progress=False)
    lossy = [w for w in got if issubclass(w.category, LossyModelCastWarning)]
    assert [str(w.message).split(": casting")[0] for w in lossy] == [str(tmp_path / "fp32"),
                                                                      "FeatureExtractor(dtype=float16)",
                                                                      str(tmp_path / "fp32")]
    assert "from float32 to bfloat16 changes their values (first: " in str(lossy[0].message)
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=LossyModelCastWarning)
        FeatureExtractor(internvit.load_model(tmp_path / "fp32"), dtype="bf16", progress=False)
    assert not [w for w in got if issubclass(w.category, LossyModelCastWarning)]


def test_cli_lossy_cast_one_warning_line_after_the_checks(tiny, tmp_path):
    import sys

    import internvit
    from tests.faults import REPO, run

    root, model = tiny
    internvit.save_model(model, tmp_path / "fp32")
    cmd = [sys.executable, str(REPO / "tools" / "extract_features.py"), "--model", str(tmp_path / "fp32"),
           "--images", str(root / "imgs"), "--out", str(tmp_path / "o"), "--no-progress", "--dtype", "bf16"]
    r = run(cmd)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 0 and len(lines) == 1 and lines[0].startswith("warning: ") and \
        "from float32 to bfloat16 changes their values" in lines[0], r.stderr
    r = run([*cmd, "--normalize"])  # refused (another job's features): only the error line
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out "), r.stderr


@pytest.mark.parametrize("kw,shape", [({}, (0, 64)), (dict(pool="grid"), (0, 64, 4, 4)), (dict(tiles=2), (0, 64)),
                                      (dict(tiles=2, tile_pool="mean"), (0, 64)),
                                      (dict(tiles=2, projector_input=True), (0, 4, 256))])
def test_no_readable_image_gives_zero_rows_of_the_models_dimension(tiny, tmp_path, kw, shape):
    """extract() gave (0, 0) and a tile folder recorded feature_shape [0]: not the model's D."""
    from internvit.features import FeatureExtractor, read_features

    _, model = tiny
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "a.jpg").write_text("not an image")
    (bad / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    fx = FeatureExtractor(model, progress=False, **kw)
    r = fx.extract(bad)
    assert r.features.shape == shape and len(r.errors) == 2
    m = fx.write(bad, tmp_path / "o")
    assert tuple(m["feature_shape"]) == shape[1:] and read_features(tmp_path / "o")[0].shape == shape


def test_skipped_images_are_counted_and_broken_links_named(tiny, tmp_path):
    import json
    import shutil
    import sys

    from tests.faults import REPO, run

    root, _ = tiny
    imgs = tmp_path / "imgs"
    shutil.copytree(root / "imgs", imgs)
    (imgs / "gone.png").symlink_to(tmp_path / "nowhere.png")
    (imgs / "text.jpg").write_text("not an image")
    r = run([sys.executable, str(REPO / "tools" / "extract_features.py"), "--model", "internvit-6b-tiny",
             "--images", str(imgs), "--out", str(tmp_path / "o"), "--batch-size", "1"])
    assert r.returncode == 0, r.stderr
    assert f"(1 shards, 2 unreadable images skipped (listed in {tmp_path / 'o' / 'errors.jsonl'})" in r.stdout
    assert "skipped=2]" in r.stderr.replace("\r", "\n").splitlines()[-1]  # the bar's total, not the batch's
    errors = [json.loads(line) for line in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert errors[0]["path"] == str(imgs / "gone.png") and errors[0]["error"] == (
        f"FileNotFoundError: {imgs / 'gone.png'}: a broken symbolic link (to {tmp_path / 'nowhere.png'}, which "
        f"does not exist)")


def test_load_warnings_of_a_refused_run_are_not_printed(tiny, tmp_path):
    """A checkpoint whose position table is resized for its config.json: the load's warning line was printed
    before the refusal of --out (another job's features), so the refused run printed two lines."""
    import json
    import sys

    import internvit
    from tests.faults import REPO, run

    root, model = tiny
    internvit.save_model(model, tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg, image_size=112)))
    cmd = [sys.executable, str(REPO / "tools" / "extract_features.py"), "--model", str(tmp_path / "m"),
           "--images", str(root / "imgs"), "--out", str(tmp_path / "o"), "--no-progress"]
    r = run(cmd)
    assert r.returncode == 0 and r.stderr.count("resized (bicubic)") == 1, r.stderr
    r = run([*cmd, "--normalize"])
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: --out "), r.stderr
