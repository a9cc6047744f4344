"""The probe feature cache killed at every durable write point: a rerun finishes it (never refused forever)."""
import json

import pytest

from internvit.store import FAULT_EXIT_CODE, read_manifest
from tests.faults import kill_sweep, run

from ..features.images import make_images
from .zygote import Zygote

CODE = """
import sys
from classification.datasets import ImageFolderDataset
from classification.feature_cache import CachedFeatureDataset
images = ImageFolderDataset(sys.argv[1], transform=dict(image_size=28))
ds = CachedFeatureDataset(images, dict(arch="internvit-6b-tiny"), sys.argv[2], batch_size=1, progress=False)
print(len(ds), ds.extracted)
"""


@pytest.fixture(scope="module")
def zygote():
    with Zygote(["torch", "torchvision", "pyarrow.parquet", "tqdm.auto", "mmengine.dist", "internvit.features",
                 "internvit.models.vit", "classification.feature_cache"]) as z:
        yield z


def _dataset(root):
    for c in ("a", "b"):
        make_images(str(root / c), 2, seed=ord(c))


def _read(cache):
    m = read_manifest(cache)
    if m is None:
        return None
    from internvit.features import read_features

    feats, rows = read_features(cache)
    return feats.tobytes(), [(r["id"], r["label"]) for r in rows], json.dumps(m["probe_cache"], sort_keys=True)


def test_cache_survives_a_kill_at_every_write_point(tmp_path, zygote):
    _dataset(tmp_path / "data")
    sweep = tmp_path / "sweep"
    sweep.mkdir()
    kill_sweep(sweep, prepare=lambda d: None,
               command=lambda d: zygote.cmd(["-c", CODE, tmp_path / "data", d / "cache"]),
               read=lambda d: _read(d / "cache"), output=lambda d: d / "cache", min_points=10)


def test_killed_after_extraction_before_the_commit_is_finished_by_the_next_run(tmp_path, zygote):
    """The listed case: the old cache was killed after extraction but before its marker file and was then
    refused forever. Now the last step is the manifest commit; killed just before it, the next run finishes
    the pending job (its shards are kept, not recomputed) and the cache is used."""
    from tests.faults import write_points

    _dataset(tmp_path / "data")
    cmd = zygote.cmd(["-c", CODE, tmp_path / "data", tmp_path / "ref"])
    names = write_points(cmd, tmp_path)
    at = names.index("manifest:written") + 1
    cache = tmp_path / "cache"
    cmd = zygote.cmd(["-c", CODE, tmp_path / "data", cache])
    assert run(cmd, fault_at=at).returncode == FAULT_EXIT_CODE
    assert read_manifest(cache) is None and (cache / ".store" / "journal.jsonl").exists()
    r = run(cmd, env={"INTERNVIT_STORE_TRACE": str(tmp_path / "trace2")})
    assert r.returncode == 0 and r.stdout.split() == ["4", "True"], r.stderr[-2000:]
    resumed = (tmp_path / "trace2").read_text()
    assert "journal:state" not in resumed  # no shard was computed again
    assert _read(cache) == _read(tmp_path / "ref")
    r = run(cmd)
    assert r.returncode == 0 and r.stdout.split() == ["4", "False"]  # a committed cache is read, not rebuilt


@pytest.mark.parametrize("stale", ["committed", "pending"])
def test_stale_cache_is_replaced(tmp_path, stale, zygote):
    """Another backbone: a committed cache is replaced by a new generation; a pending one is discarded."""
    _dataset(tmp_path / "data")
    cache = tmp_path / "cache"
    cmd = zygote.cmd(["-c", CODE, tmp_path / "data", cache])
    other = zygote.cmd(["-c", CODE.replace('dict(arch="internvit-6b-tiny")',
                                           'dict(arch="internvit-6b-tiny", init_seed=7)'), tmp_path / "data", cache])
    if stale == "committed":
        assert run(other).returncode == 0
    else:
        assert run(other, fault_at=5).returncode == FAULT_EXIT_CODE
    r = run(cmd)
    assert r.returncode == 0 and r.stdout.split() == ["4", "True"], r.stderr[-2000:]
    assert run(zygote.cmd(["-c", CODE, tmp_path / "data", tmp_path / "ref"])).returncode == 0
    assert _read(cache)[:2] == _read(tmp_path / "ref")[:2]


def test_stale_cache_replacement_survives_a_kill_at_every_write_point(tmp_path, zygote):
    """A committed cache of another backbone is re-extracted beside it and swapped in whole: killed at every
    write point of that, a reader still sees the complete stale cache (never a mix), the stale backbone's own
    job run next (a different operation) finds its cache intact and computes nothing (killed after the swap: it
    replaces the new cache back, whole), and the rerun replaces it with the same bytes as an uninterrupted
    replacement."""
    _dataset(tmp_path / "data")
    other_code = CODE.replace('dict(arch="internvit-6b-tiny")', 'dict(arch="internvit-6b-tiny", init_seed=7)')

    def prepare(d):
        assert run(zygote.cmd(["-c", other_code, tmp_path / "data", d / "cache"])).returncode == 0

    stale = tmp_path / "stale"
    prepare(stale)

    def other_job_keeps_its_cache(d, n):
        before = _read(d / "cache")
        r = run(zygote.cmd(["-c", other_code, tmp_path / "data", d / "cache"]))
        assert r.returncode == 0, (n, r.stderr[-2000:])
        # killed before the swap: its cache is intact and read (nothing computed); after it: replaced back, whole
        computed = before != _read(stale / "cache")
        assert r.stdout.split() == ["4", str(computed)] and _read(d / "cache") == _read(stale / "cache"), n

    sweep = tmp_path / "sweep"
    sweep.mkdir()
    names = kill_sweep(sweep, prepare=prepare, command=lambda d: zygote.cmd(["-c", CODE, tmp_path / "data",
                                                                              d / "cache"]),
                       read=lambda d: _read(d / "cache"), output=lambda d: d / "cache",
                       after_kill=other_job_keeps_its_cache, min_points=10)
    assert "folder:written" in names and ({"folder:exchanged", "folder:renamed"} & set(names)), names
