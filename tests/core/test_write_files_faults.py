"""``internvit.distributed_features.write_files`` (one process): a *different* job after a kill completes whole (the
killed job's pending files are discarded), and over a committed folder it is refused (its fixed file names are
immutable once committed), leaving the folder as it was. (A kill at every write point passes too, but takes 3.5 min:
not in the suite; the 2-rank kills are in tests/retrieval/test_build_distributed_text.py.)"""
from internvit.store import read_manifest
from tests.faults import python_cmd, run


def _code(folder, tag: str) -> str:
    return (f"from internvit.distributed_features import write_files\n"
            f"names = ['a.bin', 'b.bin', 'c.bin']\n"
            f"def write(i, path):\n"
            f"    open(path, 'wb').write(('{tag}-%d' % i).encode() * 1000)\n"
            f"write_files({str(folder)!r}, {{'op': 'test', 'tag': '{tag}'}}, names, write, {{'n': 3}})\n")


def _read(folder):
    m = read_manifest(folder)
    if m is None:
        return None
    return m["n"], {name: (folder / name).read_bytes()[:5] for name in ("a.bin", "b.bin", "c.bin")}


def test_another_job_completes_after_a_kill_and_is_refused_over_a_committed_folder(tmp_path):
    out = tmp_path / "out"
    r = run(python_cmd(_code(out, "first")), fault_at=6)  # killed after its first file
    assert r.returncode != 0 and read_manifest(out) is None
    r = run(python_cmd(_code(out, "other")))
    assert r.returncode == 0, r.stderr
    assert _read(out) == (3, {"a.bin": b"other", "b.bin": b"other", "c.bin": b"other"})
    r = run(python_cmd(_code(out, "first")))
    assert r.returncode != 0 and "immutable" in r.stderr
    assert _read(out) == (3, {"a.bin": b"other", "b.bin": b"other", "c.bin": b"other"})


def test_a_part_of_another_job_is_replaced_and_this_jobs_part_is_resumed(tmp_path):
    """The one sub-store opener of write_distributed and write_files: a committed part left by another job in the
    folder's scratch space is removed (never linked into this job's folder); this job's committed part is kept."""
    from internvit.distributed_features import _open_part

    out = str(tmp_path / "out")
    with _open_part(out, {"op": "test", "tag": "old"}, 1, 2, "part") as st:
        with st.open_file("a.bin") as tmp:
            open(tmp, "wb").write(b"old")
        st.commit({}, ["a.bin"])
    part = tmp_path / "out" / ".parts" / "rank-1-of-2"
    kept = (part / "a.bin").stat().st_ino
    with _open_part(out, {"op": "test", "tag": "old"}, 1, 2, "part") as st:  # the same job: resumed as committed
        assert st.manifest is not None and (part / "a.bin").stat().st_ino == kept
    with _open_part(out, {"op": "test", "tag": "new"}, 1, 2, "part") as st:  # another job: a fresh part
        assert st.manifest is None and not (part / "a.bin").exists()
