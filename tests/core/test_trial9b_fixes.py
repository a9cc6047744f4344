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
