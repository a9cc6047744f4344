"""A full disk at every point of an add (a tmpfs of growing size): the add fails with an error naming the file,
the index stays readable in its old state, and rerunning the same add with space ends in the uninterrupted
result. faiss' own file writer reported a failed final ``fclose`` only on stderr: the short (0-byte) index file
was recorded as complete, the rerun committed it (exit 0) and the index could no longer be opened (trial 8c F1)."""
import errno
import gc
import os
import shutil
import subprocess

import pytest

from retrieval import add_to_index, build_index, write_embeddings
from retrieval.faiss_ops import write_index
from retrieval.search import Retriever

from .helpers import mixture

N, D = 480, 16


def test_write_index_raises_when_the_file_cannot_be_written_whole():
    """``/dev/full``: every write fails with ENOSPC. faiss.write_index(index, path) returned normally."""
    import faiss

    if not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full")
    index = faiss.IndexFlatIP(D)
    index.add(mixture(N, d=D, seed=0))
    with pytest.raises(OSError) as e:
        write_index(index, "/dev/full")
    assert e.value.errno == errno.ENOSPC


def _state(idx):
    r = Retriever.load(str(idx))
    res = r.search_embedding(mixture(N, d=D, seed=1)[:8], 3)
    return int(r.ntotal), res.ids.tolist(), [[h["caption"] for h in row] for row in res.rows]


def _mount(mnt, size_kb: int) -> bool:
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mnt)],
                          capture_output=True).returncode == 0


def test_an_add_on_a_full_disk_fails_and_reruns_to_the_uninterrupted_index(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    emb_a, emb_b = tmp_path / "a", tmp_path / "b"
    write_embeddings(str(emb_a), mixture(N, d=D, seed=0), metadata={"caption": [f"a{i}" for i in range(N)]},
                     shard_size=N)
    write_embeddings(str(emb_b), mixture(N, d=D, seed=1), metadata={"caption": [f"b{i}" for i in range(N)]},
                     shard_size=N)
    base = tmp_path / "base"
    build_index(str(emb_a), str(base), index_key="Flat", progress=False)
    before = _state(base)
    whole = tmp_path / "whole"
    shutil.copytree(base, whole)
    add_to_index(str(whole), str(emb_b), progress=False)
    after = _state(whole)
    used = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(base) for f in fs)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    if not _mount(mnt, 4096):
        pytest.skip("cannot mount a tmpfs here")
    subprocess.run(["umount", str(mnt)], check=True)
    failed = 0
    for size_kb in range(used // 1024 + 4, used // 1024 + 84, 4):  # from "the copy barely fits" to "the add fits"
        assert _mount(mnt, size_kb)
        try:
            idx = mnt / "idx"
            shutil.copytree(base, idx)
            try:
                add_to_index(str(idx), str(emb_b), progress=False)
            except OSError as e:
                failed += 1
                assert e.errno in (errno.ENOSPC, errno.EDQUOT), (size_kb, e)
                assert "while writing" in str(e) and "rerun the same command" in str(e), (size_kb, e)
                assert _state(idx) == before, size_kb  # the old index, readable
                subprocess.run(["mount", "-o", "remount,size=8m", str(mnt)], check=True)
                add_to_index(str(idx), str(emb_b), progress=False)  # the rerun, with space
            assert _state(idx) == after, size_kb
        finally:
            gc.collect()  # the readers' memory maps of the mounted files
            if subprocess.run(["umount", str(mnt)]).returncode != 0:
                subprocess.run(["umount", "-l", str(mnt)], check=True)  # still busy: detach it
    assert failed >= 5  # the sweep reached the add's writes (index file, metadata, journal, manifest)
