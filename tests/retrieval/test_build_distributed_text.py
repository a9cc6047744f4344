"""tools/build_index.py under torchrun with 2 gloo ranks, captions included: the caption embeddings are split across
the ranks by shard like the images, byte-identical to one process, and resume after a kill (issue 12 §1). Its own
file so that pytest-xdist (``--dist loadfile``) runs it beside the image-only torchrun tests."""
import os
import sys

import pytest

from internvit.store import FAULT_EXIT_CODE, read_manifest
from tests.faults import run
from tests.features.images import make_images

from .test_build_distributed import _args, _result, _torchrun, pytestmark  # noqa: F401  (same skip)


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """5 images with caption files, an InternVL-C encoder (text tower): the single-process folder."""
    from tests.conftest import fixture_dir

    model = f"internvl-c:{fixture_dir('internvl-cg-tiny')}"
    root = tmp_path_factory.mktemp("build_dist_text")
    for i, path in enumerate(make_images(str(root / "imgs"), 5, seed=5)):
        with open(os.path.splitext(path)[0] + ".txt", "w", encoding="utf-8") as f:
            f.write(f"a photo number {i}")
    r = run([sys.executable, *_args(root / "imgs", root / "single", "--model", model)])
    assert r.returncode == 0, r.stderr
    return root, model, _result(root / "single")


def test_two_ranks_split_the_caption_embeddings_too(captioned, tmp_path):
    """The caption embeddings (text tower: as costly as the images for InternVL-C/G) are split across the ranks
    by shard as the images are: the same text_emb/ folder as one process, byte for byte. Rank 1 commits its
    part (text shard 1) while rank 0 dies at its point 49 (writing its second text shard, 2); the rerun keeps
    rank 1's part and finishes. Point 11 of the rerun (rank 0: points 1-5 finish its part, 6 opens the folder's
    store, 7-15 link the three files in): rank 0 dies while linking; the next run finishes to the same folder."""
    root, model, ref = captioned
    out = tmp_path / "out"
    assert {"embeddings/text_emb/text_emb_0.npy", "embeddings/text_emb/text_emb_2.npy"} <= set(ref[0])
    part1 = out / "embeddings" / "text_emb" / ".parts" / "rank-1-of-2"
    r = _torchrun(root / "imgs", out, "--model", model, fault_at=49,
                  env={"INTERNVIT_STORE_FAULT_WAIT": str(part1 / "manifest.json")})
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr
    assert read_manifest(out / "embeddings") is not None  # the images were committed before
    assert read_manifest(out / "embeddings" / "text_emb") is None and read_manifest(part1) is not None
    kept = (part1 / "text_emb_1.npy").stat().st_ino

    r = _torchrun(root / "imgs", out, "--model", model, fault_at=11)
    assert r.returncode != 0 and str(FAULT_EXIT_CODE) in r.stderr
    assert read_manifest(out / "embeddings" / "text_emb") is None
    assert (part1 / "text_emb_1.npy").stat().st_ino == kept  # rank 1's finished part was not redone

    r = _torchrun(root / "imgs", out, "--model", model)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _result(out) == ref
    assert not (out / "embeddings" / "text_emb" / ".parts").exists()
