"""The durable store: commit point, immutability, lock, pending jobs, clean-up, folder replacement, kills."""
import os

import pytest

from internvit.store import (
    FAULT_EXIT_CODE,
    PendingJobError,
    Store,
    StoreBusyError,
    StoreError,
    committed_files,
    generation_name,
    read_consistent,
    read_manifest,
    replace_folder,
)
from tests.faults import kill_sweep, python_cmd, run


def _commit_two(folder, job=None):
    with Store(folder, job=job or {"a": 1}) as s:
        s.write_bytes("data/x.bin", b"x")
        s.write_json("data/y.json", {"y": 1})
        return s.commit({"name": "two"}, ["data/x.bin", "data/y.json"])


def test_commit_and_read(tmp_path):
    m = _commit_two(tmp_path / "out")
    assert read_manifest(tmp_path / "out") == m
    assert m["name"] == "two" and m["_store"]["generation"] == 1
    assert committed_files(m) == ["data/x.bin", "data/y.json"]
    assert read_manifest(tmp_path / "nothing") is None
    assert not os.path.exists(tmp_path / "out" / ".store" / "journal.jsonl")
    assert generation_name("image.index", 3) == "image.g0003.index"


def test_committed_files_are_immutable_and_foreign_files_untouched(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "mine.txt").write_text("user file")
    _commit_two(out)
    with Store(out, job={"a": 2}) as s:
        with pytest.raises(StoreError, match="immutable"):
            s.write_bytes("data/x.bin", b"changed")
        with pytest.raises(StoreError, match="not written by this job"):
            s.write_bytes("mine.txt", b"overwrite")
    assert (out / "mine.txt").read_text() == "user file"
    assert (out / "data" / "x.bin").read_bytes() == b"x"


def test_second_writer_refused(tmp_path):
    with Store(tmp_path / "out", job={"a": 1}):
        with pytest.raises(StoreBusyError, match="another process is writing"):
            with Store(tmp_path / "out", job={"a": 1}):
                pass


def test_pending_job_resumes_and_different_job_is_refused(tmp_path):
    out = tmp_path / "out"
    with Store(out, job={"model": "m1", "size": 2}) as s:
        s.write_bytes("part-0", b"0")
        s.save_state(done=[0])
    # not committed: pending
    assert read_manifest(out) is None
    with pytest.raises(PendingJobError, match=r"size: 2 there, 3 now"):
        with Store(out, job={"model": "m1", "size": 3}):
            pass
    with Store(out, job={"model": "m1", "size": 2}) as s:
        assert s.pending_files == {"part-0"} and s.state == {"done": [0]}
        s.write_bytes("part-1", b"1")
        s.commit({}, ["part-0", "part-1"])
    assert sorted(os.listdir(out)) == [".store", "manifest.json", "part-0", "part-1"]


def test_discard_pending_and_abort(tmp_path):
    out = tmp_path / "out"
    with Store(out, job={"j": 1}) as s:
        s.write_bytes("a", b"a")
    with Store(out, job={"j": 2}, discard_pending=True) as s:
        assert not (out / "a").exists() and s.pending_files == set()
        s.write_bytes("b", b"b")
        s.abort()
    assert not (out / "b").exists()
    with Store(out, job={"j": 3}):  # nothing pending any more
        pass


def test_superseded_generation_removed_at_next_open(tmp_path):
    out = tmp_path / "out"
    _commit_two(out)
    with Store(out, job={"a": 2}) as s:
        s.write_bytes(generation_name("data/x.bin", s.generation), b"x2")
        m = s.commit({}, ["data/y.json", "data/x.g0002.bin"])
    assert m["_store"]["retired"] == ["data/x.bin"]
    assert (out / "data" / "x.bin").exists()  # a reader of generation 1 may still open it
    with Store(out, job={"a": 3}):
        pass
    assert not (out / "data" / "x.bin").exists() and (out / "data" / "x.g0002.bin").exists()


def test_read_consistent_retries(tmp_path):
    out = tmp_path / "out"
    _commit_two(out)
    calls = []

    def read(m):
        calls.append(m["_store"]["generation"])
        if len(calls) == 1:  # a writer commits a new generation and a later writer removes the old files
            with Store(out, job={"b": 1}) as s:
                s.write_bytes("data/z.bin", b"z")
                s.commit({}, ["data/z.bin"])
            with Store(out, job={"b": 2}):
                pass
        return (out / committed_files(m)[0]).read_bytes()

    assert read_consistent(out, read) == b"z" and calls == [1, 2]
    with pytest.raises(StoreError, match="no manifest.json"):
        read_consistent(tmp_path / "empty", read)


def test_replace_folder(tmp_path):
    dst = tmp_path / "model"
    with replace_folder(dst) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("1")
    with replace_folder(dst) as tmp:
        open(os.path.join(tmp, "config.json"), "w").write("2")
    assert (dst / "config.json").read_text() == "2"
    with pytest.raises(RuntimeError):
        with replace_folder(dst) as tmp:
            open(os.path.join(tmp, "config.json"), "w").write("3")
            raise RuntimeError("boom")
    assert (dst / "config.json").read_text() == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no lock or temporary files left


PROGRAM = """
import sys
from internvit.store import Store, read_manifest
out, n = sys.argv[1], int(sys.argv[2])
with Store(out, job={'n': n}) as s:
    if s.manifest and s.manifest.get('n') == n:
        sys.exit(0)
    for k in range(n):
        name = f'part-{k}.bin'
        if name not in s.pending_files:
            s.write_bytes(name, bytes([k]) * 10)
    s.commit({'n': n}, [f'part-{k}.bin' for k in range(n)])
"""


def _read(folder):
    m = read_manifest(folder)
    if m is None:
        return None
    return {f: (folder / f).read_bytes() for f in committed_files(m)}


def test_kill_at_every_write_point(tmp_path):
    names = kill_sweep(
        tmp_path,
        prepare=lambda d: None,
        command=lambda d: python_cmd(PROGRAM) + [str(d / "out"), "3"],
        read=lambda d: _read(d / "out"),
        output=lambda d: d / "out",
        min_points=8)
    assert "manifest:renamed" in names


def test_kill_then_different_job_is_refused_then_same_job_finishes(tmp_path):
    out = tmp_path / "out"
    r = run(python_cmd(PROGRAM) + [str(out), "3"], fault_at=4)
    assert r.returncode == FAULT_EXIT_CODE
    r = run(python_cmd(PROGRAM) + [str(out), "4"])
    assert r.returncode != 0 and "interrupted job is pending" in r.stderr and "n: 3 there, 4 now" in r.stderr
    r = run(python_cmd(PROGRAM) + [str(out), "3"])
    assert r.returncode == 0, r.stderr
    assert _read(out) == {f"part-{k}.bin": bytes([k]) * 10 for k in range(3)}


def test_replace_folder_survives_every_kill(tmp_path):
    code = ("import sys, os\nfrom internvit.store import replace_folder\n"
            "with replace_folder(sys.argv[1]) as t:\n"
            "    open(os.path.join(t, 'w.bin'), 'w').write(sys.argv[2])\n")

    def prepare(d):
        assert run(python_cmd(code) + [str(d / "m"), "old"]).returncode == 0

    kill_sweep(tmp_path, prepare=prepare, command=lambda d: python_cmd(code) + [str(d / "m"), "new"],
               read=lambda d: (d / "m" / "w.bin").read_text(), output=lambda d: d / "m", min_points=3)


def test_replace_folder_second_writer_busy_and_live_builds_untouched(tmp_path):
    dst = tmp_path / "model"
    with replace_folder(dst) as tmp:
        open(os.path.join(tmp, "a"), "w").write("1")
    with replace_folder(dst) as outer:
        with pytest.raises(StoreBusyError, match="another process is writing"):
            with replace_folder(dst):
                pass
        open(os.path.join(outer, "a"), "w").write("2")
    assert (dst / "a").read_text() == "2"
    # a first-time build in progress is not mistaken for an interrupted one by a concurrent replacement;
    # whichever finishes first wins, the other gets StoreBusyError instead of replacing it
    new = tmp_path / "new"
    with pytest.raises(StoreBusyError):
        with replace_folder(new) as building:
            open(os.path.join(building, "a"), "w").write("x")
            with replace_folder(new) as other:
                open(os.path.join(other, "a"), "w").write("y")
            assert os.path.isfile(os.path.join(building, "a"))
    assert (new / "a").read_text() == "y"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "new"]


def test_remove_folder_is_one_step_under_every_kill(tmp_path):
    """A refused or overwritten --add removed its embeddings folder with rmtree: a kill midway left a folder of
    that name with some files gone (its manifest could outlive its shards). remove_folder renames it away
    first: a reader sees the whole folder or none, and the rerun ends with none."""
    import sys

    from tests.faults import kill_sweep

    def prepare(d):
        emb = d / "out" / "embeddings-add-1"
        (emb / "img_emb").mkdir(parents=True)
        for i in range(3):
            (emb / "img_emb" / f"part-{i}.npy").write_bytes(bytes([i]) * 64)
        (emb / "manifest.json").write_text('{"count": 3}')

    def read(d):
        emb = d / "out" / "embeddings-add-1"
        visible = sorted(n for n in os.listdir(d / "out") if not n.startswith("."))
        return visible, (sorted(str(p.relative_to(emb)) for p in emb.rglob("*")) if emb.exists() else None)

    def another_operation(d, n):  # the next --add lists stale add folders: the half-removed one is never among them
        from retrieval.pipeline import stale_add_folders

        stale = stale_add_folders(str(d / "out"), keep=str(d / "out" / "embeddings-add-2"))
        assert stale in ([], [str(d / "out" / "embeddings-add-1")]), (n, stale)

    code = "import sys; from internvit.store import remove_folder; remove_folder(sys.argv[1])"
    names = kill_sweep(tmp_path, prepare=prepare, read=read, output=lambda d: d / "out", compare_files=False,
                       after_kill=another_operation,
                       command=lambda d: [sys.executable, "-c", code, str(d / "out" / "embeddings-add-1")])
    assert names == ["folder:renamed-away"]
