"""tools/extract_features.py under torchrun with 2 gloo ranks on CPU (issue 12 §1): byte-identical to one process,
and after a kill (in the ranks' parts, or in rank 0's merge) rerunning the same command finishes the job."""
import os
import shutil
import sys

import pytest

from internvit.store import FAULT_EXIT_CODE, read_manifest
from tests.faults import REPO, run, tree_digest

from .images import make_bad_files, make_images

CLI = str(REPO / "tools" / "extract_features.py")
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
pytestmark = pytest.mark.skipif(not os.path.isfile(TORCHRUN), reason="torchrun not installed")


def _args(imgs, out):
    return [CLI, "--model", "internvit-6b-tiny", "--images", str(imgs), "--out", str(out), "--shard-size", "2",
            "--batch-size", "1", "--no-progress"]


def _torchrun(imgs, out, fault_at=None):
    return run([TORCHRUN, "--standalone", "--nproc_per_node", "2", *_args(imgs, out)], fault_at=fault_at)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    root = tmp_path_factory.mktemp("dist")
    make_images(str(root / "imgs"), 5, seed=4)
    make_bad_files(str(root / "imgs"))  # 7 inputs -> 4 shards, rank 0 writes shards 0 and 2, rank 1 shards 1 and 3
    r = run([sys.executable, *_args(root / "imgs", root / "single")])
    assert r.returncode == 0, r.stderr
    return root, tree_digest(root / "single")


def test_two_ranks_write_what_one_process_writes(reference, tmp_path):
    root, ref = reference
    r = _torchrun(root / "imgs", tmp_path / "out")
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(tmp_path / "out") == ref
    assert not (tmp_path / "out" / ".parts").exists() and r.stdout.count("wrote 5 features") == 1


@pytest.mark.parametrize("fault_at,phase", [(6, "parts"), (30, "merge")])
def test_killed_ranks_resume_to_the_same_folder(reference, tmp_path, fault_at, phase):
    """Point 6: both ranks die inside their first shard. Point 30: rank 1 has finished its part (it has
    11 write points), rank 0 dies while linking the parts into the folder."""
    root, ref = reference
    out = tmp_path / "out"
    r = _torchrun(root / "imgs", out, fault_at=fault_at)
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr  # torchrun reports the rank's exit code
    assert read_manifest(out) is None
    if phase == "merge":
        assert read_manifest(out / ".parts" / "rank-1-of-2") is not None  # rank 1's part is committed
        assert (out / ".store" / "journal.jsonl").exists()  # rank 0 had started the folder's job
    r = _torchrun(root / "imgs", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(out) == ref
    if phase == "merge":
        return
    # and one process can finish what two started
    shutil.rmtree(out)
    assert _torchrun(root / "imgs", out, fault_at=6).returncode != 0
    r = run([sys.executable, *_args(root / "imgs", out)])
    assert r.returncode == 0 and tree_digest(out) == ref, r.stderr[-2000:]


_ONE_RANK_DIES = """import os, runpy, sys
if os.environ.get("RANK") == os.environ["KILL_RANK"]:
    os.environ["INTERNVIT_STORE_FAULT_AT"] = os.environ["KILL_AT"]
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.parametrize("kill_rank,kill_at", [(1, 3), (1, 6), (1, 12), (0, 4)])
def test_one_rank_killed_leaves_a_folder_the_rerun_resumes(reference, tmp_path, kill_rank, kill_at):
    """Only one rank dies (at a write point of its part); the other loses contact and fails. The folder must stay
    the job's (rank 0 removed its '.store' on that failure, leaving only '.parts', which the rerun refused as a
    user's folder): the same command, with 2 ranks or one process, ends in the uninterrupted folder."""
    root, ref = reference
    wrapper = tmp_path / "one_rank_dies.py"
    wrapper.write_text(_ONE_RANK_DIES)
    out = tmp_path / "out"
    r = run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(wrapper), *_args(root / "imgs", out)],
            env={"KILL_RANK": str(kill_rank), "KILL_AT": str(kill_at)})
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr, r.stderr[-2000:]
    assert read_manifest(out) is None and (out / ".store").is_dir() and (out / ".parts").is_dir()
    snapshot = tmp_path / "snapshot"
    shutil.copytree(out, snapshot, symlinks=True)
    # a different job (another shard size) without --discard-pending is refused, the interrupted one left as it was
    before = tree_digest(out)
    r = run([sys.executable, *_args(root / "imgs", out)[:-5], "--shard-size", "3", "--batch-size", "1",
             "--no-progress"])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    # an interrupted job of 2 processes, named with the way out (it took the folder and dropped the parts before)
    assert "interrupted job of 2 processes" in lines[0] and "--discard-pending" in lines[0], lines
    assert tree_digest(out) == before
    r = _torchrun(root / "imgs", out)
    assert r.returncode == 0, r.stderr[-3000:]
    assert tree_digest(out) == ref and not (out / ".parts").exists()
    r = run([sys.executable, *_args(root / "imgs", snapshot)])  # one process finishes what two started
    assert r.returncode == 0, r.stderr[-2000:]
    assert tree_digest(snapshot) == ref
