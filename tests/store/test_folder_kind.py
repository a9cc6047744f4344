"""A store folder holds one kind of content: a writer of another kind refuses it, even with --overwrite.

Found on 2026-12-04: ``extract_features --overwrite`` onto the folder of an index build killed before its first
commit took the folder (the index job was dropped), and ``build_index --overwrite`` onto a finished feature folder
committed an index manifest beside the features' ``features/``, ``metadata/`` and ``errors.jsonl`` (a folder of
two kinds; the metadata were not the index's). The store now records its writer's kind (``description``) in the
journal and the manifest, and refuses another kind before changing anything.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from internvit.store import STORE_KEY, ForeignFolderError, Store, read_manifest

from ..features.images import make_images

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXTRACT = os.path.join(ROOT, "tools", "extract_features.py")
BUILD = os.path.join(ROOT, "tools", "build_index.py")


def _snapshot(folder):
    """Every file under ``folder`` (the store's lock file aside) with its bytes."""
    out = {}
    for root, _dirs, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            if name != "lock":
                with open(path, "rb") as f:
                    out[os.path.relpath(path, folder)] = f.read()
    return out


def _write(folder, description, *, commit=True, name="a.bin"):
    with Store(folder, job={"op": description}, description=description) as st:
        with st.open_file(name) as tmp:
            with open(tmp, "wb") as f:
                f.write(b"x")
        if commit:
            st.commit({"what": description}, [name])


def test_the_kind_is_recorded_and_another_kind_refused(tmp_path):
    _write(tmp_path, "index")
    assert read_manifest(tmp_path)[STORE_KEY]["description"] == "index"
    before = _snapshot(tmp_path)
    for discard in (False, True):
        with pytest.raises(ForeignFolderError, match=r"holds an index, not a feature folder: nothing was changed"):
            with Store(tmp_path, job={"op": "f"}, discard_pending=discard, description="feature folder"):
                pass
    assert _snapshot(tmp_path) == before
    with Store(tmp_path, job={"op": "index 2"}, description="index") as st:  # its own kind: a new generation
        assert st.manifest["what"] == "index"


def test_a_killed_first_job_keeps_its_kind(tmp_path):
    _write(tmp_path, "index", commit=False)  # left without a commit: pending, as after a kill
    journal = [json.loads(line) for line in open(tmp_path / ".store" / "journal.jsonl")]
    assert journal[0]["op"] == "begin" and journal[0]["description"] == "index"
    before = _snapshot(tmp_path)
    with pytest.raises(ForeignFolderError, match=r"holds the interrupted job of an index, not a feature folder"):
        with Store(tmp_path, job={"op": "f"}, discard_pending=True, description="feature folder"):
            pass
    assert _snapshot(tmp_path) == before
    with Store(tmp_path, job={"op": "index"}, description="index") as st:  # the index job resumes
        assert st.pending_files == {"a.bin"}


def test_a_folder_from_before_the_kind_was_recorded_passes(tmp_path):
    _write(tmp_path, "index")
    manifest = read_manifest(tmp_path)
    del manifest[STORE_KEY]["description"]
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with Store(tmp_path, job={"op": "f"}, description="feature folder") as st:
        assert st.manifest["what"] == "index"  # its writer's own checks decide (e.g. refuse_not_features)


def _run(args, **env):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, **env})


def _one_error(r, *parts):
    lines = [x for x in r.stderr.splitlines() if x.strip()]
    assert r.returncode == 2, r.stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    for p in parts:
        assert p in lines[0], lines[0]


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("kind")
    make_images(str(d / "images"), 3)
    emb = np.random.default_rng(0).standard_normal((64, 8)).astype(np.float32)
    (d / "emb" / "img_emb").mkdir(parents=True)
    np.save(d / "emb" / "img_emb" / "img_emb_0.npy", emb)
    return d


def _extract(images, out, *extra, **env):
    return _run([EXTRACT, "--model", "internvit-6b-tiny", "--images", str(images), "--out", str(out),
                 "--no-progress", *extra], **env)


def _build(emb, out, *extra, **env):
    return _run([BUILD, str(emb), str(out), "--index-key", "Flat", *extra], **env)


def _kill_after_begin(command, trace_dir):
    """The write point of ``command``'s first journal 'begin' (found by a traced run): killed there, a first
    run leaves its job pending and nothing committed."""
    trace = str(trace_dir / "trace.txt")
    first = command(INTERNVIT_STORE_TRACE=trace)
    assert first.returncode == 0, first.stderr
    with open(trace) as f:
        at = next(int(line.split("\t")[0]) for line in f if line.rstrip().endswith("journal:begin"))
    return at


def test_features_over_a_killed_first_index_build_are_refused(inputs, tmp_path):
    at = _kill_after_begin(lambda **env: _build(inputs / "emb", tmp_path / "probe", **env), tmp_path)
    out = tmp_path / "index"
    killed = _build(inputs / "emb", out, INTERNVIT_STORE_FAULT_AT=str(at))
    assert killed.returncode == 75 and read_manifest(out) is None and (out / ".store" / "journal.jsonl").exists()
    before = _snapshot(out)
    _one_error(_extract(inputs / "images", out, "--overwrite"), "interrupted job of an index",
               "not a feature folder")
    assert _snapshot(out) == before
    done = _build(inputs / "emb", out)  # the index build still resumes and finishes
    assert done.returncode == 0, done.stderr
    assert read_manifest(out)["ntotal"] == 64


def test_an_index_over_features_is_refused(inputs, tmp_path):
    out = tmp_path / "features"
    assert _extract(inputs / "images", out).returncode == 0
    before = _snapshot(out)
    _one_error(_build(inputs / "emb", out, "--overwrite"), "holds a feature folder, not an index")
    assert _snapshot(out) == before
    killed_dir = tmp_path / "killed_features"
    at = _kill_after_begin(lambda **env: _extract(inputs / "images", tmp_path / "probe", **env), tmp_path)
    killed = _extract(inputs / "images", killed_dir, INTERNVIT_STORE_FAULT_AT=str(at))
    assert killed.returncode == 75 and read_manifest(killed_dir) is None
    before = _snapshot(killed_dir)
    _one_error(_build(inputs / "emb", killed_dir, "--overwrite"), "interrupted job of a feature folder")
    assert _snapshot(killed_dir) == before


def test_an_index_over_features_from_before_the_kind_was_recorded_is_refused(inputs, tmp_path):
    """A feature folder written before 2026-12-04 records no kind: the index's own destination check reads its
    manifest (no index fields) and refuses it, with --overwrite too."""
    out = tmp_path / "old_features"
    assert _extract(inputs / "images", out).returncode == 0
    manifest = read_manifest(out)
    del manifest[STORE_KEY]["description"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    for extra in ((), ("--overwrite",)):
        _one_error(_build(inputs / "emb", out, *extra), "holds a manifest.json that is not an index's",
                   "nothing was changed")
    assert _snapshot(out) == before


def test_features_over_embeddings_from_before_the_kind_was_recorded_are_refused(tmp_path):
    """From the newcomer trial: an embeddings folder's manifest has `shards` (a count) and `_store`, which passed
    for a feature folder's: with overwrite=True the embeddings were replaced by features."""
    import internvit
    from internvit.features import FeatureExtractor
    from retrieval import write_embeddings

    out = tmp_path / "emb"
    write_embeddings(out, np.eye(3, 8, dtype=np.float32))
    manifest = read_manifest(out)
    del manifest[STORE_KEY]["description"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(out)
    fx = FeatureExtractor(internvit.load_model("internvit-6b-tiny"), progress=False)
    images = make_images(str(tmp_path / "images"), 2)
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="not a feature folder's"):
            fx.write(images, out, overwrite=overwrite)
    assert _snapshot(out) == before
    assert issubclass(ForeignFolderError, ValueError)  # one exception type for a refused kind, committed or not


def test_journal_records_and_refuse_other_kind_read_without_a_lock(tmp_path):
    from internvit.store import journal_records, refuse_other_kind

    assert journal_records(tmp_path / "none") == [] and journal_records(tmp_path / "a_file_not_a_folder") == []
    _write(tmp_path / "idx", "index", commit=False)
    with open(tmp_path / "idx" / ".store" / "journal.jsonl", "a") as f:
        f.write('{"op": "state", "sta')  # a line torn by a kill mid-append
    recs = journal_records(tmp_path / "idx")
    assert [r["op"] for r in recs] == ["begin", "file"] and recs[0]["description"] == "index"
    refuse_other_kind(tmp_path / "idx", "index")  # its own kind passes
    refuse_other_kind(tmp_path / "missing", "index")
    with pytest.raises(ForeignFolderError, match="holds the interrupted job of an index, not an embeddings folder"):
        refuse_other_kind(tmp_path / "idx", "embeddings folder")
