"""``tools/convert_checkpoint.py to-original ... --overwrite`` onto an existing flat safetensors file, killed at
every write point: a reader sees the old file or the new one; a *different* conversion run next completes whole;
the rerun then ends byte-identical to an uninterrupted run, and no temporary file is left beside it."""
import hashlib
import os

import pytest

from tests.faults import kill_sweep, run

from .zygote import Zygote

CLI = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "tools",
                   "convert_checkpoint.py")


@pytest.fixture(scope="module")
def zygote():
    with Zygote(["torch", "safetensors.torch", "internvit.factory"]) as z:
        yield z


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Three different tiny models as HF folders (seeds 1, 2, 3)."""
    import internvit

    root = tmp_path_factory.mktemp("src")
    return {s: internvit.save_model(internvit.build_model("internvit-6b-tiny", seed=s), str(root / f"m{s}"))
            for s in (1, 2, 3)}


def _read(d):
    path = d / "out" / "w.safetensors"
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


def test_convert_over_an_existing_file_survives_every_kill(tmp_path, zygote, sources):
    def convert(d, seed, *extra):
        return zygote.cmd([CLI, "to-original", sources[seed], str(d / "out" / "w.safetensors"), *extra])

    def prepare(d):
        (d / "out").mkdir()
        assert run(convert(d, 1)).returncode == 0

    def another_conversion(d, n):
        r = run(convert(d, 3, "--overwrite"))
        assert r.returncode == 0, r.stderr[-2000:]
        ref = tmp_path / f"alone-{n}"
        (ref / "out").mkdir(parents=True)
        assert run(convert(ref, 3)).returncode == 0
        assert _read(d) == _read(ref)  # complete, the killed run's pieces play no part

    names = kill_sweep(tmp_path, prepare=prepare, command=lambda d: convert(d, 2, "--overwrite"), read=_read,
                       output=lambda d: d / "out", after_kill=another_conversion, min_points=2)
    assert names == ["file:written", "file:renamed"]
