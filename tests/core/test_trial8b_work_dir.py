"""Trial 8b, training work dirs: one training run per work dir at a time (F4); ``--resume`` with nothing to
resume keeps the config's ``load_from`` (F5); ``--overwrite`` sets the earlier run's checkpoints aside before the
new run starts, so that a ``--resume`` never continues the earlier run (F14); a work dir that is a file and an
empty ``--cfg-options`` value name the flag (F15)."""
import os
import subprocess
import sys

import pytest
import torch

from tests.core.test_runner_errors import SEG_TOY, _fails

SEG_OPTS = {"train_cfg.max_iters": 1, "train_cfg.val_interval": 1, "train_dataloader.batch_size": 2}


@pytest.fixture(scope="module")
def seg_root(tmp_path_factory) -> str:
    """A folder holding ``data/toy_seg`` (the toy config's relative data_root): 2 training images, 1 val."""
    from segmentation.toy_data import make_toy_seg_dataset

    root = tmp_path_factory.mktemp("trial8b_seg")
    make_toy_seg_dataset(str(root / "data" / "toy_seg"), num_train=2, num_val=1)
    return str(root)


@pytest.fixture(scope="module")
def seg_checkpoint(seg_root, tmp_path_factory) -> str:
    """A checkpoint of the toy linear head (weights only: what load_from reads)."""
    from internvit.runner import build_train_runner

    cwd = os.getcwd()
    os.chdir(seg_root)
    try:
        work = tmp_path_factory.mktemp("trial8b_ckpt")
        runner = build_train_runner(SEG_TOY, work_dir=str(work / "w"), cfg_options=dict(SEG_OPTS))
        path = str(work / "weights.pth")
        torch.save({"meta": {}, "state_dict": {k: v + 1 for k, v in runner.model.state_dict().items()}}, path)
    finally:
        os.chdir(cwd)
    return path


def _hold(folder) -> subprocess.Popen:
    """Another process holding the folder lock a training run takes (as a run in progress does)."""
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); fcntl.flock(fd, fcntl.LOCK_EX); "
            "print('held', flush=True); sys.stdin.read()")
    p = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         text=True)
    assert p.stdout.readline().strip() == "held"
    return p


def _free(p: subprocess.Popen) -> None:
    p.stdin.close()
    p.wait(timeout=30)


def _locked_elsewhere(folder) -> bool:
    code = ("import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
            "try:\n    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\nexcept BlockingIOError:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-c", code, str(folder)]).returncode == 3


def test_a_second_run_in_a_busy_work_dir_is_refused_naming_the_other_run(seg_root, tmp_path, capsys, monkeypatch):
    """F4: two runs in one work dir both exited 0, one's checkpoints and config copy replacing the other's."""
    monkeypatch.chdir(seg_root)
    work = tmp_path / "work"
    (work / "20261203_183251").mkdir(parents=True)  # the other run's log folder
    holder = _hold(work)
    try:
        line = _fails("train", [SEG_TOY, "--work-dir", str(work)], capsys)
        assert line.startswith(f"error: --work-dir {work}: another training run (pid {holder.pid}, its log folder ")
        assert "20261203_183251" in line and "another --work-dir" in line, line
        assert sorted(os.listdir(work)) == ["20261203_183251"]  # nothing written
        line = _fails("train", [SEG_TOY, "--work-dir", str(work), "--resume"], capsys)  # a requeued job too
        assert "another training run" in line
    finally:
        _free(holder)
    from internvit.runner import build_train_runner

    runner = build_train_runner(SEG_TOY, work_dir=str(work), cfg_options=dict(SEG_OPTS))
    assert _locked_elsewhere(work)  # held from set-up on, for the run's lifetime
    runner = build_train_runner(SEG_TOY, work_dir=str(work), cfg_options=dict(SEG_OPTS), overwrite=True)
    runner.train()  # an earlier runner of this process gives way; training releases the lock at its end
    assert not _locked_elsewhere(work)


def _run_log(work) -> str:
    import glob

    return "".join(open(p).read() for p in glob.glob(os.path.join(work, "*", "*.log")))


def test_resume_with_nothing_to_resume_keeps_load_from(seg_root, seg_checkpoint, tmp_path, monkeypatch):
    """F5: --resume on a fresh work dir dropped the config's load_from (trained from scratch, 'Auto resumed from
    the latest checkpoint None.')."""
    from internvit.runner import build_train_runner

    monkeypatch.chdir(seg_root)
    opts = dict(SEG_OPTS, load_from=seg_checkpoint)
    runner = build_train_runner(SEG_TOY, work_dir=str(tmp_path / "fresh"), resume="auto", cfg_options=opts)
    assert runner._load_from == seg_checkpoint and not runner._resume
    runner.train()
    for handler in runner.logger.handlers:
        handler.flush()
    assert f"--resume: no checkpoint in {tmp_path / 'fresh'} to resume; a new run starts from load_from=" \
           f"{seg_checkpoint}" in _run_log(tmp_path / "fresh")
    # the weights came from load_from (+1 on every tensor), not from the model's initialisation
    bias = runner.model.decode_head.conv_seg.bias.detach()
    assert bias.abs().min() > 0.5, bias


def test_two_runners_of_one_config_in_one_second_log_to_their_own_files(seg_root, tmp_path, monkeypatch):
    """CI, session 16: a runner built in the same second as an earlier one of the same config (a fixture's
    runner, then the test's) got the earlier runner's logger (mmengine names it '{config}_{second}' and hands out
    an existing instance of a name): its log lines went to the other run's log file, its own log stayed empty."""
    import time
    import types

    import mmengine.runner.runner as mm_runner

    from internvit.runner import build_train_runner

    monkeypatch.chdir(seg_root)
    frozen = types.SimpleNamespace(time=lambda: 1764800000.0, strftime=time.strftime, localtime=time.localtime)
    monkeypatch.setattr(mm_runner, "time", frozen)  # both runners in one second
    runners = [build_train_runner(SEG_TOY, work_dir=str(tmp_path / name), cfg_options=dict(SEG_OPTS))
               for name in ("a", "b")]
    assert runners[0].timestamp == runners[1].timestamp
    for name, runner in zip("ab", runners):
        runner.logger.info(f"line of run {name}")
        for handler in runner.logger.handlers:
            handler.flush()
    logs = {name: _run_log(tmp_path / name) for name in "ab"}
    assert "line of run a" in logs["a"] and "line of run b" not in logs["a"], logs["a"]
    assert "line of run b" in logs["b"] and "line of run a" not in logs["b"], logs["b"]
    for name, runner in zip("ab", runners):  # scalars go to each run's own vis_data (mmseg names its 'visualizer')
        dirs = [backend._save_dir for backend in runner.visualizer._vis_backends.values()]
        assert dirs and all(d.startswith(str(tmp_path / name) + os.sep) for d in dirs), dirs


def test_overwrite_sets_the_earlier_runs_checkpoints_aside(seg_root, tmp_path, monkeypatch):
    """F14: --overwrite left the earlier run's checkpoints and last_checkpoint in place until each was replaced:
    a new run killed before its first checkpoint was 'resumed' from the earlier run's."""
    from internvit.runner import build_train_runner, latest_complete_checkpoint

    monkeypatch.chdir(seg_root)
    work = tmp_path / "work"
    (work / "20261203_183251").mkdir(parents=True)
    earlier = ["iter_3.pth", "iter_6.pth", "best_mIoU_iter_6.pth", "last_checkpoint"]
    for name in earlier:
        (work / name).write_text(str(work / "iter_6.pth") if name == "last_checkpoint" else name)
    (work / "pretrained.pth").write_text("a user's file")
    runner = build_train_runner(SEG_TOY, work_dir=str(work), cfg_options=dict(SEG_OPTS), overwrite=True)
    aside = [n for n in os.listdir(work) if n.startswith("overwritten_")]
    assert len(aside) == 1 and sorted(os.listdir(work / aside[0])) == sorted(earlier)
    assert (work / "pretrained.pth").read_text() == "a user's file"
    assert not any((work / n).exists() for n in earlier)
    assert latest_complete_checkpoint(runner.cfg) is None  # a --resume now finds nothing of the earlier run
    assert f"--overwrite: the earlier run's checkpoints (best_mIoU_iter_6.pth, iter_3.pth, last_checkpoint, " \
           f"iter_6.pth) moved to {work / aside[0]}" in _run_log(work)


class _Killed(BaseException):
    """The process ends here (nothing after the rename runs; build_train_runner's clean-up only removes a work dir
    it made, and this one existed)."""


@pytest.mark.parametrize("kill_after", range(4))
def test_overwrite_killed_at_each_move_loses_nothing_and_resumes_the_earlier_runs_newest(
        seg_root, seg_checkpoint, tmp_path, monkeypatch, kill_after):
    """Kill sweep of the set-aside moves (one rename each: every write point): after a kill, a --resume continues
    the earlier run from its newest checkpoint (never an older one: moved last; once it moved, nothing is found,
    as the test above shows), and a rerun with
    --overwrite leaves every earlier file, byte for byte, in an overwritten_* folder and none in the work dir."""
    import glob
    import shutil

    import internvit.work_dir as wd
    from internvit.runner import build_train_runner, latest_complete_checkpoint

    monkeypatch.chdir(seg_root)
    work = tmp_path / "work"
    (work / "20261203_183251").mkdir(parents=True)
    for name in ("iter_3.pth", "iter_6.pth", "best_mIoU_iter_6.pth"):
        shutil.copy(seg_checkpoint, work / name)
        with open(work / name, "ab") as f:
            f.write(name.encode())  # torch.load reads the zip's central directory from the end: still loads
    (work / "last_checkpoint").write_text(str(work / "iter_6.pth"))
    earlier = {n: (work / n).read_bytes() for n in os.listdir(work) if not n.startswith("2026")}
    real, moves = os.replace, []

    def replace(src, dst):  # the set-aside's moves (the config copy is written through a rename too)
        if os.path.basename(src) in earlier and len(moves) == kill_after:
            raise _Killed
        real(src, dst)
        if os.path.basename(src) in earlier:
            moves.append(os.path.basename(src))

    monkeypatch.setattr(wd.os, "replace", replace)
    with pytest.raises(_Killed):
        build_train_runner(SEG_TOY, work_dir=str(work), cfg_options=dict(SEG_OPTS), overwrite=True)
    monkeypatch.setattr(wd.os, "replace", real)
    assert len(moves) == kill_after
    from mmengine.config import Config

    cfg = Config(dict(work_dir=str(work), default_hooks={}))
    found = latest_complete_checkpoint(cfg)  # what a --resume would continue from now
    assert found == str(work / "iter_6.pth"), found

    build_train_runner(SEG_TOY, work_dir=str(work), cfg_options=dict(SEG_OPTS), overwrite=True)
    assert not any((work / n).exists() for n in earlier)
    kept = {}
    for path in glob.glob(str(work / "overwritten_*" / "*")):
        assert os.path.basename(path) not in kept, path  # each earlier file once
        kept[os.path.basename(path)] = open(path, "rb").read()
    assert kept == earlier


def test_overwrite_from_the_earlier_runs_weights_reads_them_from_their_new_place(seg_root, seg_checkpoint,
                                                                                 tmp_path, monkeypatch):
    import shutil

    from internvit.runner import build_train_runner

    monkeypatch.chdir(seg_root)
    work = tmp_path / "work"
    work.mkdir()
    shutil.copy(seg_checkpoint, work / "iter_6.pth")
    runner = build_train_runner(SEG_TOY, work_dir=str(work), overwrite=True,
                                cfg_options=dict(SEG_OPTS, load_from=str(work / "iter_6.pth")))
    assert os.path.basename(os.path.dirname(runner._load_from)).startswith("overwritten_")
    assert os.path.isfile(runner._load_from)


@pytest.mark.parametrize("argv,must", [
    (["--work-dir", "{file}"], "error: --work-dir {file}: a file, not a folder"),
    (["--work-dir", "{file}/sub"], "error: --work-dir {file}/sub: a file, not a folder ({file} is)"),
    (["--work-dir", "{tmp}/w", "--cfg-options", "train_cfg.max_iters="],
     "error: --cfg-options train_cfg.max_iters=: empty value"),
    (["--work-dir", "{tmp}/w", "--cfg-options", "train_cfg.max_iters=abc"],
     "error: train_cfg.max_iters='abc': must be an integer"),
])
def test_work_dir_file_and_empty_option_value_name_the_flag(argv, must, tmp_path, capsys):
    """F15: '[Errno 17] File exists', '[Errno 20] Not a directory', "invalid literal for int() ... ''"."""
    (tmp_path / "afile").write_text("x")
    fill = dict(file=str(tmp_path / "afile"), tmp=str(tmp_path))
    line = _fails("train", [SEG_TOY, *[a.format(**fill) for a in argv]], capsys)
    assert line == must.format(**fill) or line.startswith(must.format(**fill)), line
    assert (tmp_path / "afile").read_text() == "x" and not (tmp_path / "w").exists()


def test_a_run_killed_while_its_workers_live_on_does_not_lock_the_next_run_out(tmp_path):
    """The lock is a flock on the folder, which forked DataLoader workers share: right after a kill -9 of a run,
    its orphaned workers still held it for a few seconds and an immediate --resume was refused, naming the dead
    run (verify round of trial 8b F4). A lock whose taker is dead is waited for; a live holder is still refused."""
    import signal
    import time

    from internvit.work_dir import WorkDirBusyError, lock_work_dir

    work = tmp_path / "w"
    work.mkdir()
    code = ("import os, sys, time\n"
            "from internvit.work_dir import lock_work_dir\n"
            f"lock_work_dir({str(work)!r})\n"
            "parent = os.getpid()\n"
            "if os.fork() == 0:\n"  # a 'DataLoader worker': shares the lock, exits 2 s after its parent is gone
            "    while os.getppid() == parent: time.sleep(0.05)\n"
            "    time.sleep(2); os._exit(0)\n"
            "print('locked', flush=True); time.sleep(60)\n")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(WorkDirBusyError, match=rf"pid {proc.pid}"):  # alive: refused at once
            lock_work_dir(str(work))
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        t = time.monotonic()
        lock_work_dir(str(work)).release()  # its worker lives on ~2 s, holding the lock: waited for
        assert 0.5 < time.monotonic() - t < 20
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
