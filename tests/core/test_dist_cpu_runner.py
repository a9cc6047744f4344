"""tools/test.py under torchrun on a machine without CUDA (gloo): mmengine's own set-up called
torch.cuda.set_device ("Found no NVIDIA driver") although the configs name the gloo backend. Two ranks give the
metrics of one process, printed once."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from .test_runner_errors import CLS_TOY, ROOT, _probe_state_dict


@pytest.fixture()
def digits_root(tmp_path) -> str:
    """A folder holding ``data/toy_digits`` (the toy config's relative data_root)."""
    from classification.datasets import make_toy_digits

    make_toy_digits(str(tmp_path / "data" / "toy_digits"))
    return str(tmp_path)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU (gloo) path")
def test_torchrun_test_on_cpu_matches_one_process(tmp_path, digits_root):
    ckpt = str(tmp_path / "probe.pth")
    torch.manual_seed(0)
    torch.save({"meta": {"dataset_meta": {"classes": tuple(str(c) for c in range(10))}},
                "state_dict": _probe_state_dict()}, ckpt)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    tool = os.path.join(ROOT, "tools", "test.py")
    one = subprocess.run([sys.executable, tool, CLS_TOY, ckpt, "--work-dir", str(tmp_path / "w1")],
                         capture_output=True, text=True, cwd=digits_root, env=env, timeout=600)
    assert one.returncode == 0, one.stderr[-2000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
                          str(port), tool, CLS_TOY, ckpt, "--launcher", "pytorch", "--work-dir", str(tmp_path / "w2")],
                         capture_output=True, text=True, cwd=digits_root, env=env, timeout=600)
    assert two.returncode == 0, two.stderr[-3000:]
    lines = [line for line in two.stdout.splitlines() if line.startswith("{")]
    assert len(lines) == 1, two.stdout[-2000:]
    assert json.loads(lines[0]) == json.loads([x for x in one.stdout.splitlines() if x.startswith("{")][0])


def test_close_process_group_destroys_the_group_a_tool_joined(tmp_path):
    """train.py / test.py end with internvit.cli.close_process_group: a gloo group left to the interpreter's
    exit raced its shutdown (rank 0 aborted after its work). Without a group it does nothing."""
    import torch.distributed as dist

    from internvit.cli import close_process_group

    close_process_group()  # no group: nothing to do, no error
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        assert dist.is_initialized()
        close_process_group()
        assert not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def test_exit_after_a_process_group_flushes_and_keeps_the_status(tmp_path):
    """tools/train.py / test.py exit through internvit.cli.exit_tool: after a run that joined a process group,
    os._exit skips the interpreter's finalization (which still raced gloo's threads: SIGABRT on rank 0, seen in a
    fresh-clone CI run) once the logs and streams are flushed; the exit status is the tool's."""
    import subprocess
    import sys

    code = (
        "import logging, sys\n"
        "import torch.distributed as dist\n"
        "from internvit.cli import close_process_group, exit_tool\n"
        f"dist.init_process_group('gloo', store=dist.FileStore({str(tmp_path / 'store')!r}, 1), rank=0, "
        "world_size=1)\n"
        f"log = logging.getLogger('t'); log.addHandler(logging.FileHandler({str(tmp_path / 'run.log')!r}))\n"
        "log.warning('logged'); print('printed'); sys.stderr.write('to stderr')\n"
        "close_process_group()\n"
        "exit_tool(3)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 3, r.stderr
    assert r.stdout == "printed\n" and r.stderr.endswith("to stderr"), (r.stdout, r.stderr)
    assert (tmp_path / "run.log").read_text() == "logged\n"
