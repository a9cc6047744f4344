"""What a training run saves is what it reports, and a resumed run ends where an uninterrupted one does
(internvit.train_hooks): dropout in the toy UperNet's heads drew other masks after a resume (mIoU 14.16 instead of
11.48, 133 tensors different); under dist_train.sh each rank validated with its own BatchNorm statistics, so the
logged mIoU (and save_best's choice) belonged to no saved checkpoint."""
import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch

from .conftest import ROOT, TOY_LINEAR, TOY_UPER, toy_options


def _state(path):
    from internvit.compat import load_runner_checkpoint

    return load_runner_checkpoint(str(path), "cpu")["state_dict"]


def test_a_run_resumed_mid_schedule_ends_with_the_uninterrupted_weights(toy_data, tmp_path):
    """The toy UperNet (dropout 0.1 in both heads, random flips) resumed from its iteration-2 checkpoint ends
    with exactly the weights of the run that was never stopped."""
    from internvit.runner import train

    opts = toy_options(toy_data, "", **{"train_cfg.max_iters": 4, "train_cfg.val_interval": 4,
                                        "default_hooks.checkpoint.interval": 2, "train_dataloader.batch_size": 2})
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    train(TOY_UPER, work_dir=str(whole), cfg_options=opts)
    resumed.mkdir()
    shutil.copy(whole / "iter_2.pth", resumed / "iter_2.pth")  # a run killed right after its iteration-2 save
    train(TOY_UPER, work_dir=str(resumed), cfg_options=opts, resume=str(resumed / "iter_2.pth"))
    a, b = _state(whole / "iter_4.pth"), _state(resumed / "iter_4.pth")
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ after the resume, e.g. {differ[:3]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU (gloo) path of dist_train.sh")
def test_distributed_validation_scores_the_saved_checkpoint(toy_data, tmp_path):
    """Two gloo ranks train the toy linear head and validate at iteration 2, where they also save: the logged
    mIoU equals tools/test.py's on that checkpoint (it differed by 0.2-0.6 points). The head's norm is SyncBN, as
    in the published recipes: torch's SyncBN is GPU-only (the run failed at set-up, "SyncBatchNorm layers only
    work with GPU modules", one line per rank); on CPU it runs as BatchNorm with one warning saying so, and the
    other warnings print once (rank 0), not once per rank."""
    from internvit.runner import test

    work = tmp_path / "dist"
    opts = toy_options(toy_data, "", **{"train_cfg.max_iters": 2, "train_cfg.val_interval": 2,
                                        "default_hooks.checkpoint.interval": 2, "train_dataloader.batch_size": 2,
                                        "model.decode_head.feat_norm_cfg.type": "SyncBN"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PORT=str(_free_port()), PYTHON=sys.executable)
    proc = subprocess.run(["bash", os.path.join(ROOT, "tools", "dist_train.sh"), TOY_LINEAR, "2", "--work-dir",
                           str(work), "--cfg-options", *(f"{k}={v}" for k, v in opts.items())],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("SyncBN needs CUDA: the model's 1 SyncBatchNorm layer(s) run as BatchNorm") == 1
    warned = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert warned and len(warned) == len(set(warned)), proc.stderr[-3000:]
    (scalars,) = [os.path.join(r, f) for r, _, fs in os.walk(work) for f in fs if f == "scalars.json"]
    with open(scalars) as f:
        logged = [json.loads(line) for line in f if '"mIoU"' in line]
    assert [r["step"] for r in logged] == [2]
    metrics = test(TOY_LINEAR, str(work / "iter_2.pth"), work_dir=str(tmp_path / "test"), cfg_options=opts)
    assert metrics["mIoU"] == pytest.approx(logged[0]["mIoU"], abs=1e-6)
    assert metrics["aAcc"] == pytest.approx(logged[0]["aAcc"], abs=1e-6)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_an_empty_or_missing_split_names_the_dataloader_and_folder(toy_data, tmp_path, split):
    """A split without images failed with numpy's 'need at least one array to concatenate'."""
    from internvit.runner import build_test_runner, build_train_runner

    empty = tmp_path / "empty"
    for kind in ("images", "annotations"):
        for folder in ("training", "validation"):
            (empty / kind / folder).mkdir(parents=True)
    sub = "training" if split == "train" else "validation"
    for root, must in ((empty, f"{split}_dataloader: no samples: {empty}/images/{sub} holds no '.png' images"),
                       (tmp_path / "nope", f"{split}_dataloader: {tmp_path}/nope/images/{sub}: no such file or "
                                           f"folder")):
        opts = toy_options(toy_data, "", **{f"{split}_dataloader.dataset.data_root": str(root)})
        work = tmp_path / "work"
        with pytest.raises(ValueError) as e:
            if split == "test":
                build_test_runner(TOY_LINEAR, _linear_checkpoint(toy_data, tmp_path), work_dir=str(work),
                                  cfg_options=opts)
            else:
                build_train_runner(TOY_LINEAR, work_dir=str(work), cfg_options=opts)
        assert str(e.value) == must
        assert not work.exists()


def _linear_checkpoint(toy_data, tmp_path) -> str:
    """A checkpoint of the toy linear segmentor's initial weights."""
    from internvit.runner import build_train_runner

    path = tmp_path / "linear.pth"
    if not path.exists():
        runner = build_train_runner(TOY_LINEAR, work_dir=str(tmp_path / "init"), cfg_options=toy_options(toy_data, ""))
        torch.save({"state_dict": runner.model.state_dict()}, path)
    return str(path)


def test_training_never_replaces_checkpoints_or_a_users_file_without_overwrite(toy_data, tmp_path):
    """A work dir with an earlier run's (or a user's) checkpoints, or, where no run wrote, a file named like the
    config copy: mmengine replaced them silently. Refused without --resume / --overwrite; --overwrite trains."""
    from internvit.runner import build_train_runner

    opts = toy_options(toy_data, "")
    user = tmp_path / "user"
    user.mkdir()
    (user / os.path.basename(TOY_LINEAR)).write_text("# my notes, not a config\n")
    (user / "epoch_1.pth").write_bytes(b"mine")
    with pytest.raises(FileExistsError, match=r"holds checkpoints \(epoch_1.pth\) that this run would replace: "
                                              r"--resume to continue that run, --overwrite"):
        build_train_runner(TOY_LINEAR, work_dir=str(user), cfg_options=opts)
    (user / "epoch_1.pth").unlink()
    with pytest.raises(FileExistsError, match=r"holds linear_internvit_tiny_toy.py, which no run wrote there"):
        build_train_runner(TOY_LINEAR, work_dir=str(user), cfg_options=opts)
    assert os.listdir(user) == ["linear_internvit_tiny_toy.py"]
    assert (user / "linear_internvit_tiny_toy.py").read_text() == "# my notes, not a config\n"
    build_train_runner(TOY_LINEAR, work_dir=str(user), cfg_options=opts, overwrite=True)
    assert (user / "linear_internvit_tiny_toy.py").read_text() != "# my notes, not a config\n"


def test_a_data_preprocessor_the_model_holds_is_not_overridden_at_the_top():
    """The runner reads a top-level data_preprocessor only for a model without one: the toy config's model has
    one, so data_preprocessor.mean=... changed nothing (test.py gave the unchanged mIoU); refused, naming the key."""
    from internvit.runner import load_config

    with pytest.raises(ValueError, match=r"--cfg-options data_preprocessor.mean: 'data_preprocessor' is a variable "
                                         r"of the config file, .*set the keys that use it instead: "
                                         r"model.data_preprocessor"):
        load_config(TOY_LINEAR, cfg_options={"data_preprocessor.mean": [0, 0, 0]})
    cfg = load_config(TOY_LINEAR, cfg_options={"model.data_preprocessor.mean": [0, 0, 0]})
    assert cfg.model.data_preprocessor.mean == [0, 0, 0]


def test_testing_never_replaces_a_users_file_named_like_the_config_copy(toy_data, tmp_path):
    """tools/test.py writes the config copy into its work dir too: a user's file of that name was replaced."""
    from internvit.runner import build_test_runner

    user = tmp_path / "user"
    user.mkdir()
    (user / os.path.basename(TOY_LINEAR)).write_text("# mine\n")
    ckpt = _linear_checkpoint(toy_data, tmp_path)
    with pytest.raises(FileExistsError, match=r"holds linear_internvit_tiny_toy.py, which no run wrote there"):
        build_test_runner(TOY_LINEAR, ckpt, work_dir=str(user), cfg_options=toy_options(toy_data, ""))
    assert (user / os.path.basename(TOY_LINEAR)).read_text() == "# mine\n"
    build_test_runner(TOY_LINEAR, ckpt, work_dir=str(user), cfg_options=toy_options(toy_data, ""), overwrite=True)
