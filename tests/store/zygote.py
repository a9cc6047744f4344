"""A fork server for kill sweeps: import torch & co once, then run each command in a fresh forked process.

A kill sweep runs an operation twice per write point; starting a Python that imports torch and torchvision
costs seconds each time. The server (``python zygote.py serve SOCKET MODULE...``) imports the modules once and
forks a child per request; the child takes the request's environment, working folder and ``argv`` (a script
path or ``-c CODE``), runs it as ``__main__`` and exits with its status. The fault injection of
:mod:`internvit.store` (``os._exit`` at the N-th write point) kills that child exactly as it would kill a
fresh interpreter. The client (``python -S zygote.py SOCKET ARGV...``, no imports beyond the standard library)
relays the child's stdout, stderr and exit status, so it is a drop-in command line for :mod:`tests.faults`.

    with Zygote(["internvit.features"]) as z:
        kill_sweep(..., command=lambda d: z.cmd([CLI, "--out", str(d / "out"), ...]))
"""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time

HERE = os.path.abspath(__file__)


def _recv_all(conn: socket.socket) -> bytes:
    chunks = []
    while True:
        b = conn.recv(1 << 16)
        if not b:
            return b"".join(chunks)
        chunks.append(b)


def _child(req: dict, out_fd: int, err_fd: int) -> int:
    import runpy
    import traceback

    os.dup2(out_fd, 1)
    os.dup2(err_fd, 2)
    os.environ.clear()
    os.environ.update(req["env"])
    os.chdir(req["cwd"])
    argv = req["argv"]
    code = 0
    try:
        if argv[0] == "-c":
            sys.argv = ["-c", *argv[2:]]
            sys.path.insert(0, "")
            exec(compile(argv[1], "<string>", "exec"), {"__name__": "__main__"})
        else:
            sys.argv = list(argv)
            sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))
            runpy.run_path(argv[0], run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        if not isinstance(e.code, (int, type(None))):
            print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001 - reported like an interpreter would
        traceback.print_exc()
        code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    return code


def serve(sock_path: str, modules: list) -> None:
    import gc

    for m in modules:
        __import__(m)
    gc.collect()
    gc.freeze()  # the imported modules' objects: never scanned again by a child's collections (mmengine's
    # datasets call gc.collect(), 0.24 s each over torch's heap)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(sock_path)
    srv.listen(4)
    print("ready", flush=True)
    while True:
        conn, _ = srv.accept()
        req = json.loads(_recv_all(conn))
        if req.get("op") == "quit":
            conn.close()
            break
        with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
            pid = os.fork()
            if pid == 0:
                srv.close()
                conn.close()
                os._exit(_child(req, out.fileno(), err.fileno()))
            _, status = os.waitpid(pid, 0)
            out.seek(0)
            err.seek(0)
            resp = {"code": os.waitstatus_to_exitcode(status), "stdout": out.read().decode("utf-8", "replace"),
                    "stderr": err.read().decode("utf-8", "replace")}
        conn.sendall(json.dumps(resp).encode("utf-8"))
        conn.close()
    srv.close()


def client(sock_path: str, argv: list) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(sock_path)
    s.sendall(json.dumps({"argv": argv, "env": dict(os.environ), "cwd": os.getcwd()}).encode("utf-8"))
    s.shutdown(socket.SHUT_WR)
    resp = json.loads(_recv_all(s))
    sys.stdout.write(resp["stdout"])
    sys.stderr.write(resp["stderr"])
    return int(resp["code"])


class Zygote:
    """Start a fork server that has imported ``modules``; :meth:`cmd` gives command lines that run through it."""

    def __init__(self, modules: list) -> None:
        self.modules = list(modules)

    def __enter__(self) -> "Zygote":
        from tests.faults import REPO, _env

        self.dir = tempfile.mkdtemp(prefix="zy")
        self.sock = os.path.join(self.dir, "s")
        self.proc = subprocess.Popen([sys.executable, HERE, "serve", self.sock, *self.modules], cwd=str(REPO),
                                     env=_env(), stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if line.strip() != "ready":
            self.proc.kill()
            raise RuntimeError(f"zygote did not start (exit {self.proc.wait()})")
        return self

    def cmd(self, argv: list) -> list:
        """The command line running ``argv`` (``[script, args...]`` or ``['-c', code, args...]``) in a fork."""
        return [sys.executable, "-S", HERE, self.sock, *[str(a) for a in argv]]

    def __exit__(self, *exc) -> None:
        try:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(self.sock)
            s.sendall(b'{"op": "quit"}')
            s.close()
            self.proc.wait(timeout=30)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        for name in os.listdir(self.dir):
            os.remove(os.path.join(self.dir, name))
        os.rmdir(self.dir)
        time.sleep(0)


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(HERE))))
        serve(sys.argv[2], sys.argv[3:])
    else:
        sys.exit(client(sys.argv[1], sys.argv[2:]))
