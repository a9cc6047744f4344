"""webdataset tars: any number of shards reads under a low open-files limit (an LRU of open tars)."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest
from PIL import Image

from retrieval.inputs import TarImages, image_inputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
N_TARS = 60


def _colour(s: int) -> tuple[int, int, int]:
    return (s * 4 % 256, 255 - s * 4 % 256, (s * 37) % 256)


def _write_tars(folder, n: int = N_TARS) -> None:
    for s in range(n):
        buf = io.BytesIO()
        Image.new("RGB", (8, 8), _colour(s)).save(buf, "PNG")
        with tarfile.open(folder / f"shard-{s:03d}.tar", "w") as tar:
            for name, data in ((f"{s:03d}.png", buf.getvalue()), (f"{s:03d}.txt", f"caption {s}".encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_handles_are_bounded_and_reads_are_right(tmp_path):
    _write_tars(tmp_path, 12)
    ds, caps = image_inputs(str(tmp_path / "shard-{000..011}.tar"))
    assert isinstance(ds, TarImages) and len(ds) == 12 and caps[3] == "caption 3"
    ds.max_open_files = 3
    order = [0, 11, 1, 10, 2, 9, 3, 8, 0, 11, 5, 5, 6, 7, 4]
    for i in order:
        assert np.asarray(ds[i])[0, 0].tolist() == list(_colour(i))
        assert len(ds._handles) <= 3
    ds.close()
    assert not ds._handles
    with pytest.raises(ValueError, match="max_open_files"):
        TarImages([], max_open_files=0)


def test_truncated_tar_member_is_an_error(tmp_path):
    _write_tars(tmp_path, 1)
    ds, _ = image_inputs(str(tmp_path / "shard-000.tar"))
    path = tmp_path / "shard-000.tar"
    _, offset, size = ds.members[0]
    with open(path, "r+b") as f:
        f.truncate(offset + size // 2)
    with pytest.raises(OSError, match="truncated"):
        ds.read_bytes(0)


_CHILD = textwrap.dedent("""
    import json, resource, sys
    from retrieval.encoders import load_encoder
    from retrieval.inputs import image_inputs

    enc = load_encoder("internvit:internvit-6b-tiny")
    ds, caps = image_inputs(sys.argv[1])
    resource.setrlimit(resource.RLIMIT_NOFILE, (40, 40))
    res = enc.embed_images(ds, strict=False)
    print(json.dumps({"n": len(ds), "ids": len(res.ids), "errors": [e["error"] for e in res.errors][:3]}))
""")


def test_many_tars_under_low_open_files_limit(tmp_path):
    """The reported case: past the open-files limit, tar images were silently recorded as unreadable."""
    _write_tars(tmp_path)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=ROOT)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / f"shard-{{000..{N_TARS - 1:03d}}}.tar")],
                         capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"n": N_TARS, "ids": N_TARS, "errors": []}
