"""Trial 7a (notes/trial7a.md): presets are random weights and say so; --config with a preset is refused; the
torchrun rate is the job's; another spelling of the same image folder is the same job, and a different job is
named in words; large images get one warning line naming the file and a configurable limit; the Python API
refuses wrong types before any work; --out write errors name --out.

The CLI runs as a user runs it, in an interpreter of its own: a fork of one that imported torch once
(``tests/store/zygote.py``; a fresh interpreter per command cost 5 s), torchrun's ranks as real processes.
"""
import json
import os
import sys

import numpy as np
import pytest
from PIL import Image

from internvit.features import FeatureExtractor, read_features
from tests.faults import REPO, run, tree_digest
from tests.store.zygote import Zygote

from .images import make_images

CLI = str(REPO / "tools" / "extract_features.py")
_SERVER: list = []


@pytest.fixture(scope="module", autouse=True)
def _fork_server():
    with Zygote(["torch", "torchvision", "pyarrow.parquet", "tqdm.auto", "internvit.features",
                 "internvit.models.vit"]) as z:
        _SERVER.append(z)
        yield
        _SERVER.clear()


def _cli(*args, cwd=None, env=None):
    return run(_SERVER[0].cmd([CLI, "--no-progress", *map(str, args)]), cwd=cwd, env=env)


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


def test_a_preset_run_refused_by_the_output_folder_prints_only_the_error(small, tmp_path):
    """Session 15's list: a refusal found inside ``write`` (the folder holds another job) came after the
    random-weights warning: two lines for one bad input."""
    assert _cli("--model", "internvit-6b-tiny", "--images", small / "small", "--out", tmp_path / "o").returncode == 0
    r = _cli("--model", "internvit-6b-tiny", "--images", small / "small", "--out", tmp_path / "o", "--pool", "mean")
    assert r.returncode == 2 and len(_lines(r.stderr)) == 1, r.stderr
    assert r.stderr.startswith(f"error: --out {tmp_path / 'o'} holds features made with different arguments (pool:")


def test_the_api_warns_about_random_weights_when_it_writes(small, tmp_path, caplog):
    import logging

    import internvit

    fx = FeatureExtractor(internvit.load_model("internvit-6b-tiny"), progress=False)
    with caplog.at_level(logging.WARNING, logger="internvit"):
        fx.write(str(small / "small"), str(tmp_path / "o"), shard_size=2)
    warned = [r.getMessage() for r in caplog.records if "RANDOM" in r.getMessage()]
    assert warned == [FeatureExtractor.random_init_warning.format(name="internvit-6b-tiny")], caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="internvit"):
        fx.write(str(small / "small"), str(tmp_path / "o"), shard_size=2)  # finished: nothing computed, no warning
    assert not [r for r in caplog.records if "RANDOM" in r.getMessage()]


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
        # seconds are rounded to 1 ms: on a fast run (~0.04 s) that alone moves 7 / seconds by more than 1 %
        assert t["images_per_s"] == pytest.approx(7 / t["seconds"], rel=0.01 + 0.0005 / t["seconds"])


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
    assert "holds finished features" in err[0] and "there, \"" not in err[0]  # not two truncated hex strings
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
    assert "there, \"" not in r.stderr  # not two truncated hex strings


# -- 5. large images: one warning line naming the file; the limit can be changed ---------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    root = tmp_path_factory.mktemp("bomb")
    Image.new("L", (10000, 10000), 128).save(root / "warn.png")  # 100 Mpx: over the warning threshold
    Image.new("L", (14000, 14000), 128).save(root / "err.png")  # 196 Mpx: refused by default
    Image.new("RGB", (30, 30)).save(root / "ok.png")
    return root


@pytest.mark.parametrize("tiles", [[], ["--tiles", "4"]], ids=["whole", "tiles"])
def test_a_large_image_gives_one_warning_line_naming_the_file(bomb, tmp_path, tiles):
    r = _cli("--model", "internvit-6b-tiny", "--images", bomb, "--out", tmp_path / "o", *tiles)
    assert r.returncode == 0, r.stderr
    lines = [ln for ln in _lines(r.stderr) if "is a preset" not in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: ") and str(bomb / "warn.png") in lines[0], r.stderr
    assert "100,000,000 pixels" in lines[0] and "178,956,970" in lines[0]
    err = [json.loads(ln) for ln in (tmp_path / "o" / "errors.jsonl").read_text().splitlines()]
    assert [e["path"] for e in err] == [str(bomb / "err.png")] and "--max-image-pixels" in err[0]["error"]


def test_max_image_pixels_raises_the_limit_and_is_part_of_the_job(bomb, tmp_path):
    r = _cli("--model", "internvit-6b-tiny", "--images", bomb, "--out", tmp_path / "o", "--max-image-pixels",
             "300000000")
    assert r.returncode == 0 and "wrote 3 features" in r.stdout and "no image skipped" in r.stdout, r.stdout + r.stderr
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["max_image_pixels"] == 300000000
    r = _cli("--model", "internvit-6b-tiny", "--images", bomb, "--out", tmp_path / "o")  # the default limit
    assert r.returncode == 2 and "max_image_pixels" in r.stderr


def test_load_image_warns_naming_the_file(bomb, caplog):
    from internvit.data import load_image

    with caplog.at_level("WARNING", logger="internvit"):
        load_image(str(bomb / "warn.png"))
        load_image(str(bomb / "ok.png"))
    assert [r.getMessage() for r in caplog.records if "pixels" in r.getMessage()] == [
        f"{bomb / 'warn.png'}: 100,000,000 pixels, over the decompression-bomb warning threshold of 89,478,485 "
        f"(PIL.Image.MAX_IMAGE_PIXELS); images over 178,956,970 pixels are refused"]


# -- 8. the Python API refuses wrong types and values before any work -----------------------------------------
@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(normalize="no"), TypeError, "normalize must be True or False"),
    (dict(normalize=1), TypeError, "normalize must be True or False"),
    (dict(layers=[1.5]), TypeError, r"layers must be block indices \(ints\), got float 1.5"),
    (dict(layers=1), TypeError, "layers must be a list"),
    (dict(layers="1"), TypeError, "layers must be a list"),
    (dict(layers=[True]), TypeError, "layers must be block indices"),
    (dict(batch_size=2.5), TypeError, "batch_size must be an int, got float 2.5"),
    (dict(batch_size="4"), TypeError, "batch_size must be an int"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(num_workers=-1), ValueError, "num_workers must be >= 0, got -1"),
    (dict(num_workers=1.0), TypeError, "num_workers must be an int"),
])
def test_wrong_arguments_are_refused_at_construction(tiny_model, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        FeatureExtractor(tiny_model, progress=False, **kwargs)


def test_numpy_ints_and_bools_are_accepted(tiny_model):
    fx = FeatureExtractor(tiny_model, progress=False, layers=[np.int64(1)], batch_size=np.int32(2),
                          normalize=np.bool_(True))
    assert fx.layers == [1] and fx.batch_size == 2 and fx.normalize is True


@pytest.mark.parametrize("shard_size,exc", [(2.5, TypeError), ("2", TypeError), (0, ValueError), (True, TypeError)])
def test_write_refuses_a_shard_size_that_is_not_a_positive_int(tiny_model, small, tmp_path, shard_size, exc):
    with pytest.raises(exc, match="shard_size"):
        FeatureExtractor(tiny_model, progress=False).write(str(small / "small"), str(tmp_path / "o"),
                                                           shard_size=shard_size)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("images", [[], "EMPTY_FOLDER"])
def test_no_inputs_is_a_clear_error(tiny_model, tmp_path, images):
    if images == "EMPTY_FOLDER":
        (tmp_path / "empty").mkdir()
        images = str(tmp_path / "empty")
    fx = FeatureExtractor(tiny_model, progress=False)
    with pytest.raises(ValueError, match=r"images: nothing to extract"):
        fx.extract(images)
    with pytest.raises(ValueError, match=r"images: nothing to extract"):
        fx.write(images, str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()


# -- 9. errors writing --out name --out ----------------------------------------------------------------------
def test_an_out_that_cannot_be_created_names_out(small):
    r = _cli("--model", "internvit-6b-tiny", "--images", small / "small", "--out", "/proc/xx")
    err = [ln for ln in _lines(r.stderr) if ln.startswith("error:")]
    assert r.returncode == 2 and len(err) == 1 and err[0].startswith("error: --out /proc/xx: "), r.stderr


@pytest.fixture()
def readonly_dir(tmp_path):
    import subprocess

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,ro", "tmpfs", str(mnt)],
                                           capture_output=True).returncode != 0:
        pytest.skip("needs root to mount a read-only tmpfs")
    yield mnt
    subprocess.run(["umount", str(mnt)], capture_output=True)


def test_an_out_on_a_read_only_file_system_names_out_before_any_work(small, readonly_dir):
    r = _cli("--model", "internvit-6b-tiny", "--images", small / "small", "--out", readonly_dir / "feats")
    assert r.returncode == 2 and _lines(r.stderr) == [
        f"error: --out {readonly_dir / 'feats'}: {readonly_dir} is on a read-only file system"], r.stderr


# -- 6/7. the docs describe the real output folder and the skipped hidden names ---------------------------------
def test_docs_describe_the_output_folder_as_written(small, tmp_path, tiny_model):
    text = (REPO / "docs" / "features.md").read_text()
    m = FeatureExtractor(tiny_model, progress=False).write(str(small / "small"), str(tmp_path / "o"))
    on_disk = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert "timing" not in on_disk and "timing" in m
    assert ".partial" not in text and "no `errors.jsonl` and no `manifest.json`" in text
    listed = text[text.index("- `manifest.json` holds:"):text.index("- For clip-retrieval")]
    for key in on_disk:  # every key of a real manifest is documented
        assert f"`{key}`" in listed, key


def test_docs_say_hidden_names_are_skipped(tmp_path, tiny_model):
    from internvit.data import list_images

    (tmp_path / "hid" / ".thumbs").mkdir(parents=True)
    for p in ("a.png", ".b.png", ".thumbs/c.png"):
        Image.new("RGB", (20, 20)).save(tmp_path / "hid" / p)
    assert list_images(str(tmp_path / "hid")) == [str(tmp_path / "hid" / "a.png")]
    text = (REPO / "docs" / "features.md").read_text()
    assert "**Hidden files and folders**" in text and "`.thumbs/`" in text
