"""Trial 7a (notes/trial7a.md): presets are random weights and say so; --config with a preset is refused; the
torchrun rate is the job's; another spelling of the same image folder is the same job, and a different job is
named in words; large images get one warning line naming the file and a configurable limit; the Python API
refuses wrong types before any work; --out write errors name --out.

The CLI runs in a real interpreter (``tests.faults.run``), as a user runs it.
"""
import json
import os
import sys

import pytest

from internvit.features import FeatureExtractor, read_features
from tests.faults import REPO, run, tree_digest

from .images import make_images

CLI = str(REPO / "tools" / "extract_features.py")


def _cli(*args, cwd=None, env=None):
    return run([sys.executable, CLI, "--no-progress", *map(str, args)], cwd=cwd, env=env)


def _lines(text: str) -> list:
    return [ln for ln in text.splitlines() if ln.strip()]


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("t7a")
    make_images(str(root / "small"), 3, seed=7)
    return root


# -- 1. a preset is random weights: one warning line, and the manifest says so --------------------------------
@pytest.mark.parametrize("preset", ["internvit-6b-tiny", "internvit-300m-tiny"])
def test_a_preset_model_warns_once_and_the_manifest_records_random_weights(small, tmp_path, preset):
    r = _cli("--model", preset, "--images", small / "small", "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    warn = [ln for ln in _lines(r.stderr) if ln.startswith("warning:")]
    assert len(warn) == 1 and len(_lines(r.stderr)) == 1, r.stderr
    assert f"--model {preset} is a preset" in warn[0] and "RANDOM" in warn[0] and "checkpoint folder" in warn[0]
    model = json.loads((tmp_path / "o" / "manifest.json").read_text())["model"]
    assert model["name"] == preset and model["random_init"] is True


def test_loaded_weights_are_recorded_as_not_random_and_give_no_warning(small, tmp_path):
    import internvit

    internvit.save_model(internvit.load_model("internvit-6b-tiny"), str(tmp_path / "ckpt"))
    r = _cli("--model", tmp_path / "ckpt", "--images", small / "small", "--out", tmp_path / "o")
    assert r.returncode == 0 and not _lines(r.stderr), r.stderr
    model = json.loads((tmp_path / "o" / "manifest.json").read_text())["model"]
    assert model["random_init"] is False


def test_random_init_is_not_part_of_the_job_identity(tiny_model, small, tmp_path):
    """The field describes the weights (already fingerprinted): a folder written before it existed resumes."""
    fx = FeatureExtractor(tiny_model, progress=False)
    job = fx.signature([], None, shard_size=2, features_pattern="f{shard}", metadata_pattern="m{shard}",
                       metadata_format="jsonl")
    assert "random_init" not in job["model"] and "name" not in job["model"]
    assert fx.model_info()["random_init"] is True


def test_the_docs_first_cli_example_does_not_present_a_preset_as_released_features():
    text = (REPO / "docs" / "features.md").read_text()
    cli = text[text.index("## CLI"):]
    block = cli[cli.index("```bash"):cli.index("```", cli.index("```bash") + 7)]
    preset_line = next(ln for ln in block.splitlines() if "--model internvit-300m-448px-v2-5" in ln)
    before = block[:block.index(preset_line)]
    assert "RANDOM" in before and "/models/InternViT-300M-448px-V2_5" in block


# -- 2. --model <preset> --config <X>: refused -------------------------------------------------------------------
@pytest.mark.parametrize("config", ["internvit-300m-tiny", "internvit-6b-tiny", "CONFIG_JSON"])
def test_config_with_a_preset_model_is_refused(small, tmp_path, config):
    if config == "CONFIG_JSON":
        from internvit.config import get_config

        config = tmp_path / "config.json"
        config.write_text(json.dumps(get_config("internvit-300m-tiny").to_dict()))
    r = _cli("--model", "internvit-6b-tiny", "--config", config, "--images", small / "small", "--out", tmp_path / "o")
    assert r.returncode == 2 and _lines(r.stderr) == [ln for ln in _lines(r.stderr) if ln.startswith("error: ")]
    assert len(_lines(r.stderr)) == 1 and "--config" in r.stderr and "internvit-6b-tiny is a preset" in r.stderr
    assert not (tmp_path / "o").exists()


# -- 3. under torchrun the reported rate is the job's -------------------------------------------------------------
TORCHRUN = os.path.join(os.path.dirname(sys.executable), "torchrun")
needs_torchrun = pytest.mark.skipif(not os.path.isfile(TORCHRUN), reason="torchrun not installed")

RANK_SCRIPT = """
import json, os, sys, internvit
from internvit.distributed_features import init_from_env, leave
init_from_env("cpu")
fx = internvit.FeatureExtractor(internvit.load_model("internvit-6b-tiny"), batch_size=2, progress=False)
m = fx.write(sys.argv[1], sys.argv[2], shard_size=2)
with open(os.path.join(sys.argv[3], "rank%s.json" % os.environ["RANK"]), "w") as f:  # not stdout: ranks interleave
    json.dump({"rank": int(os.environ["RANK"]), "timing": m["timing"], "count": m["count"]}, f)
leave()
"""


@needs_torchrun
def test_torchrun_timing_counts_every_ranks_images(tmp_path):
    make_images(str(tmp_path / "imgs"), 7, seed=3)  # 4 shards: rank 0 writes 4 images, rank 1 writes 3
    (tmp_path / "s.py").write_text(RANK_SCRIPT)
    r = run([TORCHRUN, "--standalone", "--nproc_per_node", "2", str(tmp_path / "s.py"), str(tmp_path / "imgs"),
             str(tmp_path / "out"), str(tmp_path)])
    assert r.returncode == 0, r.stderr[-3000:]
    res = [json.loads((tmp_path / f"rank{k}.json").read_text()) for k in (0, 1)]
    assert sorted(x["rank"] for x in res) == [0, 1]
    for x in res:  # every rank reports the job: 7 images (not its own 4 or 3) over the wall time
        t = x["timing"]
        assert t["scope"] == "job" and t["world_size"] == 2 and t["images"] == 7 and x["count"] == 7
        assert sorted(rt["images"] for rt in t["ranks"]) == [3, 4]
        assert t["images_per_s"] == pytest.approx(7 / t["seconds"], rel=0.01)


@needs_torchrun
def test_torchrun_summary_line_says_it_is_the_jobs_rate(tmp_path):
    make_images(str(tmp_path / "imgs"), 5, seed=3)
    r = run([TORCHRUN, "--standalone", "--nproc_per_node", "2", CLI, "--model", "internvit-6b-tiny", "--images",
             str(tmp_path / "imgs"), "--out", str(tmp_path / "out"), "--shard-size", "2", "--no-progress"])
    assert r.returncode == 0, r.stderr[-3000:]
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("wrote "))
    assert "wrote 5 features" in line and "images/s over all 2 ranks" in line, line


# -- 4. another spelling of the same folder is the same job; a different job is named in words ----------------
def _job(*args, cwd):
    return _cli("--model", "internvit-6b-tiny", "--shard-size", "2", "--batch-size", "1", *args, cwd=cwd)


@pytest.fixture()
def spelled(tmp_path):
    make_images(str(tmp_path / "many"), 5, seed=5)
    (tmp_path / "sub").mkdir()
    os.symlink(tmp_path / "many", tmp_path / "link")
    return tmp_path


def test_other_spellings_of_the_folder_reuse_the_finished_job(spelled):
    t = spelled
    r = _job("--images", "many", "--out", "kk", cwd=t)
    assert r.returncode == 0, r.stderr
    before = tree_digest(t / "kk")
    for images, cwd in (("./many", t), (str(t / "many"), t), ("many/", t), ("../many", t / "sub"),
                        (str(t / "link"), t / "sub")):
        r = _job("--images", images, "--out", t / "kk", cwd=cwd)
        assert r.returncode == 0 and "nothing left to compute" in r.stdout, (images, r.stderr)
    assert tree_digest(t / "kk") == before
    _, rows = read_features(str(t / "kk"))
    assert rows[0]["path"] == str(t / "many" / "img_00.png")  # recorded absolute


def test_an_interrupted_job_resumes_under_another_spelling(spelled, tmp_path_factory):
    t = spelled
    ref = tmp_path_factory.mktemp("ref")
    assert _job("--images", t / "many", "--out", ref / "kk", cwd=t).returncode == 0
    r = run([sys.executable, CLI, "--no-progress", "--model", "internvit-6b-tiny", "--shard-size", "2",
             "--batch-size", "1", "--images", "many", "--out", "kk"], cwd=t, fault_at=4)
    assert r.returncode != 0 and not (t / "kk" / "manifest.json").exists()
    r = _job("--images", "../link/", "--out", "../kk", cwd=t / "sub")
    assert r.returncode == 0, r.stderr
    assert tree_digest(t / "kk") == tree_digest(ref / "kk")


def test_a_folder_written_with_relative_paths_still_resumes_under_the_same_spelling(tiny_model, spelled,
                                                                                     monkeypatch):
    """Folders written before paths were made absolute recorded them as listed: the same command still reuses
    them (the recorded checksum is matched as listed)."""
    monkeypatch.chdir(spelled)
    from internvit.data import list_images

    m = FeatureExtractor(tiny_model, progress=False).write(list_images("many"), "old", shard_size=2)
    assert read_features("old")[1][0]["path"] == os.path.join("many", "img_00.png")
    again = FeatureExtractor(tiny_model, progress=False).write("many", "old", shard_size=2)
    assert again["timing"]["images"] == 0 and again["inputs_checksum"] == m["inputs_checksum"]


def test_a_different_finished_job_is_named_in_words_without_a_bare_delete_advice(spelled):
    t = spelled
    assert _job("--images", "many", "--out", "kk", cwd=t).returncode == 0
    make_images(str(t / "other"), 5, seed=5)
    r = _job("--images", "other", "--out", "kk", cwd=t)
    err = [ln for ln in _lines(r.stderr) if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1, r.stderr
    assert "the image paths differ (row 0:" in err[0] and str(t / "other" / "img_00.png") in err[0]
    assert "holds finished features" in err[0] and "inputs_checksum" not in err[0]
    make_images(str(t / "fewer"), 3, seed=5)
    r = _job("--images", "fewer", "--out", "kk", cwd=t)
    assert r.returncode == 2 and "the number of input images differs (5 there, 3 now)" in r.stderr, r.stderr


def test_a_different_pending_job_is_named_in_words(spelled):
    t = spelled
    r = run([sys.executable, CLI, "--no-progress", "--model", "internvit-6b-tiny", "--shard-size", "2",
             "--batch-size", "1", "--images", "many", "--out", "kk"], cwd=t, fault_at=4)
    assert r.returncode != 0
    make_images(str(t / "other"), 5, seed=6)
    r = _job("--images", "other", "--out", "kk", cwd=t)
    assert r.returncode == 2 and "an interrupted job is pending" in r.stderr, r.stderr
    assert "the same number of input images (5) but other image paths" in r.stderr
    assert "inputs_checksum" not in r.stderr
