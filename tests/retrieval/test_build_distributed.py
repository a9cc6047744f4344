"""tools/build_index.py under torchrun with 2 gloo ranks on CPU (issue 12 §1): the ranks embed whole shards, rank 0
commits the embeddings and builds the index; the folder is the one a single process writes (every file byte for
byte, the index manifest up to its timings and its own path); a killed rank resumes to the same folder; a bad
argument is refused on every rank before any work."""
import json
import os
import sys

import pytest

from internvit.store import FAULT_EXIT_CODE, read_manifest
from tests.faults import REPO, run, tree_digest
from tests.features.images import make_images

CLI = str(REPO / "tools" / "build_index.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.isfile(TORCHRUN), reason="torchrun not installed")


def _args(imgs, out, *extra):
    # 5 images in shards of 2: rank 0 embeds shards 0 and 2, rank 1 shard 1
    return [CLI, str(imgs), str(out), "--model", "internvit:internvit-6b-tiny", "--shard-size", "2",
            "--batch-size", "1", "--quiet", *extra]


def _torchrun(imgs, out, *extra, fault_at=None, env=None):
    return run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *_args(imgs, out, *extra)], fault_at=fault_at,
               env=env)


def _result(out) -> tuple:
    """Every file byte for byte except the index manifest, which is compared as data without its timings and
    with the folder's own path made relative."""
    files = tree_digest(out, ignore=lambda rel: rel == "manifest.json")
    text = (out / "manifest.json").read_text().replace(str(out), "OUT")
    manifest = json.loads(text)
    timings = manifest["build"].pop("timings")
    assert set(timings) >= {"add_s"}  # what is left out is only timing
    return files, manifest


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("build_dist")
    make_images(str(root / "imgs"), 5, seed=4)
    r = run([sys.executable, *_args(root / "imgs", root / "single")])
    assert r.returncode == 0, r.stderr
    return root, _result(root / "single")


def test_two_ranks_build_what_one_process_builds(reference, tmp_path):
    root, ref = reference
    out = tmp_path / "out"
    r = _torchrun(root / "imgs", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _result(out) == ref
    assert not (out / "embeddings" / ".parts").exists()
    assert r.stdout.count('"ntotal": 5') == 1  # rank 0 alone built and reported the index


def test_a_killed_rank_resumes_to_the_same_index(reference, tmp_path):
    """Point 13: rank 1 has committed its part (11 write points), rank 0 dies inside its second shard and
    torchrun stops rank 1. Point 45 of the rerun: rank 0 has resumed its shard and committed the embeddings
    (points 1-33; rank 1 has nothing left to write and has exited 0), it dies while building the index."""
    root, ref = reference
    out = tmp_path / "out"
    part1 = out / "embeddings" / ".parts" / "rank-1-of-2"
    # rank 0 dies at its point 13 only once rank 1 has committed its part (else, on a busy machine, torchrun could
    # stop rank 1 first and the scenario would be another one)
    r = _torchrun(root / "imgs", out, fault_at=13, env={"INTERNVIT_STORE_FAULT_WAIT": str(part1 / "manifest.json")})
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr  # torchrun reports the rank's exit code
    assert read_manifest(out / "embeddings") is None and not (out / "manifest.json").exists()
    assert read_manifest(part1) is not None

    r = _torchrun(root / "imgs", out, fault_at=45)
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr
    assert read_manifest(out / "embeddings") is not None and read_manifest(out) is None

    r = _torchrun(root / "imgs", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _result(out) == ref


def test_bad_arguments_are_refused_on_every_rank(reference, tmp_path):
    root, _ = reference
    r = _torchrun(root / "imgs", tmp_path / "out", "--index-key", "IVF1024,Flat")
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode != 0 and len(lines) == 2, r.stderr[-3000:]
    assert all("1024 inverted lists need at least 1024 vectors" in line for line in lines)
    assert not (tmp_path / "out").exists()

