"""Feature extraction (tools/extract_features.py) killed at every durable write point of the store.

After each kill a reader sees nothing or the finished features (never a mix), a *different* extraction on the
folder is refused with one line and changes nothing, and rerunning the same command ends byte-identical to an
uninterrupted run (manifest included: timings are never committed), with no duplicate or lost rows.
"""
import os
import sys

import pytest

from internvit.store import TMP_SUFFIX, PendingJobError, read_manifest
from tests.faults import REPO, kill_sweep, run, tree_digest

from ..features.images import make_bad_files, make_images
from .zygote import Zygote

CLI = str(REPO / "tools" / "extract_features.py")
MODEL = "internvit-6b-tiny"  # a preset: seeded from its name, the same weights in every process


def _images(folder):
    good = make_images(str(folder), 3, seed=3)
    bad = make_bad_files(str(folder))
    return good, bad


@pytest.fixture(scope="module")
def zygote():
    """Commands run as forks of one interpreter that imported torch once (a kill sweep runs ~45 of them)."""
    with Zygote(["torch", "torchvision", "pyarrow.parquet", "tqdm.auto", "internvit.features",
                 "internvit.models.vit"]) as z:
        yield z


def _args(d, imgs, z=None):
    if z is not None:
        return z.cmd(_args(d, imgs)[1:])
    return [sys.executable, CLI, "--model", MODEL, "--images", str(imgs), "--out", str(d / "out"),
            "--shard-size", "2", "--batch-size", "1", "--pool", "cls_mean", "--no-progress"]


def _read(out):
    """What a reader sees: None before the commit, else (feature bytes, metadata rows, manifest)."""
    if read_manifest(out) is None:
        return None
    from internvit.features import read_features

    feats, rows = read_features(out)
    return feats.tobytes(), rows, read_manifest(out)


@pytest.fixture(scope="module")
def model():
    import internvit

    return internvit.load_model(MODEL)


def test_extraction_survives_a_kill_at_every_write_point(tmp_path, model, zygote):
    from internvit.features import FeatureExtractor, read_features

    good, bad = _images(tmp_path / "imgs")  # 5 images (2 unreadable) -> 3 shards of 2 rows
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    images = sorted(good + list(bad.values()))

    import numpy as np

    from internvit.store import ForeignFolderError
    from retrieval import build_index, write_embeddings

    write_embeddings(tmp_path / "emb", np.eye(4, 8, dtype=np.float32))
    refused = []

    def different_job_is_refused(d, n):
        before = tree_digest(d / "out", ignore=lambda rel: rel.endswith(TMP_SUFFIX))
        fx = FeatureExtractor(model, dict(image_size=None, resize_mode="crop"), pool="mean", batch_size=1,
                              progress=False, model_name=MODEL)
        with pytest.raises((ValueError, PendingJobError), match="pool"):
            fx.write(images, d / "out", shard_size=2)
        assert tree_digest(d / "out", ignore=lambda rel: rel.endswith(TMP_SUFFIX)) == before
        if (d / "out" / "manifest.json").exists() or (d / "out" / ".store" / "journal.jsonl").exists():
            # another kind of writer, even with overwrite: refused (it took a killed first run's folder, and
            # committed an index beside finished features, before 2026-12-04)
            with pytest.raises((ForeignFolderError, FileExistsError), match="feature folder, not an index"):
                build_index(str(tmp_path / "emb"), str(d / "out"), index_key="Flat", overwrite=True, progress=False)
            assert tree_digest(d / "out", ignore=lambda rel: rel.endswith(TMP_SUFFIX)) == before
            refused.append(n)

    names = kill_sweep(sweep, prepare=lambda d: None, command=lambda d: _args(d, tmp_path / "imgs", zygote),
                       read=lambda d: _read(d / "out"), output=lambda d: d / "out",
                       after_kill=different_job_is_refused, min_points=20)
    assert names.count("journal:state") == 3 and names[-3:] == ["manifest:written", "manifest:renamed",
                                                                 "journal:dropped"]
    assert len(refused) >= len(names) - 1, (refused, names)  # every point from the journal's first record on
    feats, rows = read_features(sweep / "reference" / "out")
    manifest = read_manifest(sweep / "reference" / "out")
    assert [r["id"] for r in rows] == [i for i, p in enumerate(images) if p in good]  # no duplicate, none lost
    assert feats.shape == (3, 128) and manifest["num_errors"] == 2 and "timing" not in manifest


def test_rerun_after_the_commit_rewrites_nothing(tmp_path):  # a real interpreter, no fork server
    _images(tmp_path / "imgs")
    d = tmp_path / "run"
    assert run(_args(d, tmp_path / "imgs")).returncode == 0
    before = {p: os.stat(os.path.join(d, "out", p)).st_mtime_ns for p in tree_digest(d / "out")}
    r = run(_args(d, tmp_path / "imgs"))
    assert r.returncode == 0 and "nothing left to compute" in r.stdout
    assert {p: os.stat(os.path.join(d, "out", p)).st_mtime_ns for p in tree_digest(d / "out")} == before
