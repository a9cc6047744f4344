"""save_model into an existing directory killed at every write point: the old or the new model, never neither."""
import os

import pytest

from tests.faults import kill_sweep, run

from .zygote import Zygote

SAVE = """
import sys, torch, internvit
model = internvit.build_model("internvit-6b-tiny", seed=int(sys.argv[2]))
internvit.save_model(model, sys.argv[1], overwrite=True)
"""


def _read(folder):
    """What load_model sees: the weights fingerprint, or None when there is no model there."""
    if not os.path.isdir(folder):
        return None
    import internvit
    from internvit.fingerprint import weights_fingerprint

    return weights_fingerprint(internvit.load_model(str(folder)))


@pytest.fixture(scope="module")
def zygote():
    with Zygote(["torch", "safetensors.torch", "internvit.factory"]) as z:
        yield z


def test_save_model_over_an_existing_model_survives_every_kill(tmp_path, zygote):
    def prepare(d):
        assert run(zygote.cmd(["-c", SAVE, d / "model", "1"])).returncode == 0

    names = kill_sweep(tmp_path, prepare=prepare, command=lambda d: zygote.cmd(["-c", SAVE, d / "model", "2"]),
                       read=lambda d: _read(d / "model"), output=lambda d: d / "model", min_points=3)
    assert "folder:exchanged" in names  # the atomic exchange: there is no point between delete and rename


def test_listed_case_kill_between_delete_and_rename_keeps_a_model(tmp_path, zygote):
    """Formerly: the old folder was deleted, then the new one renamed in; killed between the two, neither
    existed. Every point of the replacement now leaves one complete model at the path."""
    model = tmp_path / "model"
    assert run(zygote.cmd(["-c", SAVE, model, "1"])).returncode == 0
    old = _read(model)
    for n in (1, 2):  # folder:written (before the swap), folder:exchanged (after it, before the old is removed)
        r = run(zygote.cmd(["-c", SAVE, model, "2"]), fault_at=n)
        assert r.returncode != 0 and _read(model) is not None
    assert run(zygote.cmd(["-c", SAVE, model, "2"])).returncode == 0
    new = _read(model)
    assert new != old and sorted(os.listdir(tmp_path)) == ["model"]
