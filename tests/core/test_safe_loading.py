"""Loading never runs code: crafted pickles through every loading path; importing the packages changes nothing
process-wide; loaded weights are not tied to their file.

The payloads are real: :func:`test_payloads_are_live` unpickles each one with ``weights_only=False`` in a
subprocess and sees it modify the marker file, so the refusal tests below can fail.
"""
import collections
import importlib.util
import io
import json
import logging
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

import internvit
from internvit import CheckpointError, compat
from internvit.cli import run

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLS_TOY = os.path.join(ROOT, "configs", "classification", "toy", "digits_linear_probe.py")
UNTOUCHED = "untouched\n"


class _Call:
    """Pickles as ``func(*args)`` (a REDUCE); ``func`` and ``args`` may be ``_Call`` themselves."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)

    def __call__(self, *args):  # pickle wants the reduce function of a nested call to look callable
        raise AssertionError("only pickled")


def _write_code(marker: str) -> str:
    return f"open({marker!r}, 'w').write('pwned')"


def _live_payloads(marker: str) -> dict:
    """Objects whose unpickling (with weights_only=False) modifies ``marker``."""
    import subprocess as sp

    from mmengine.logging import HistoryBuffer, MMLogger

    code = _write_code(marker)
    globals_of_history_buffer = _Call(getattr, _Call(getattr, HistoryBuffer, "__init__"), "__globals__")
    builtins_dict = _Call(_Call(getattr, globals_of_history_buffer, "get"), "__builtins__")
    exec_via_getattr = _Call(_Call(getattr, builtins_dict, "get"), "exec")
    nested = io.BytesIO()
    torch.save({"w": torch.zeros(1), "x": _Call(exec, code)}, nested)
    return {
        "mmlogger": _Call(MMLogger, "internvit-test-evil", "mmengine", marker),  # log_file opened with mode 'w'
        "filehandler": _Call(logging.FileHandler, marker, "w"),
        "os.system": _Call(os.system, f"echo pwned > {marker}"),
        "subprocess.Popen": _Call(sp.Popen, ["sh", "-c", f"echo pwned > {marker}"]),
        "eval": _Call(eval, code),
        "exec": _Call(exec, code),
        "getattr-chain": _Call(exec_via_getattr, code),
        "_load_from_bytes": _Call(torch.storage._load_from_bytes, nested.getvalue()),
    }


#: the global each payload's refusal names (the first one the vetting meets, in sorted order)
REFUSED = {
    "mmlogger": "mmengine.logging.logger.MMLogger", "filehandler": "logging.FileHandler",
    "os.system": "posix.system", "subprocess.Popen": "subprocess.Popen", "eval": "builtins.eval",
    "exec": "builtins.exec", "getattr-chain": "builtins.exec|builtins.getattr|HistoryBuffer",
    "_load_from_bytes": "torch.storage._load_from_bytes",
}


def _weights(payload) -> dict:
    """A real-looking original-family weight file of the 6B-style tiny preset with a payload inside."""
    from internvit.checkpoints import hf_to_original_key

    model = internvit.build_model("internvit-6b-tiny")
    sd = {hf_to_original_key(k): v for k, v in model.state_dict().items()}
    return {"module": sd, "meta": {"note": payload}}


def _runner_checkpoint(payload) -> dict:
    """A real-looking mmengine Runner checkpoint (meta, state dict, message hub, optimizer) with a payload."""
    from mmengine.logging import HistoryBuffer

    return {"meta": {"epoch": 1, "iter": 4, "seed": np.int64(0), "mmengine_version": "0.10.7"},
            "state_dict": {"head.fc.weight": torch.zeros(10, 128), "head.fc.bias": torch.zeros(10)},
            "message_hub": {"log_scalars": {"train/loss": HistoryBuffer([0.5, 0.25], [1, 1])},
                            "runtime_info": {"epoch": 1, "eta": np.float64(0.0), "hook": payload},
                            "resumed_keys": {"epoch": True}},
            "optimizer": {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}}


@pytest.fixture(scope="module")
def payloads(tmp_path_factory):
    """``{kind: (weights.pth, runner.pth)}`` and the marker they target."""
    folder = tmp_path_factory.mktemp("payloads")
    marker = str(folder / "marker.txt")
    files = {}
    for kind, payload in _live_payloads(marker).items():
        files[kind] = (str(folder / f"{kind}.weights.pth"), str(folder / f"{kind}.runner.pth"))
        torch.save(_weights(payload), files[kind][0])
        torch.save(_runner_checkpoint(payload), files[kind][1])
    return files, marker


@pytest.fixture
def marker(payloads):
    """The marker, reset to known content; the test then checks it is untouched."""
    path = payloads[1]
    with open(path, "w") as f:
        f.write(UNTOUCHED)
    stat = os.stat(path)
    yield path
    with open(path) as f:
        assert f.read() == UNTOUCHED, "a payload ran"
    assert os.stat(path).st_mtime_ns == stat.st_mtime_ns


def _check_one_line(message: str, path: str, kind: str) -> None:
    lines = [ln for ln in message.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, message
    assert path in lines[0], message
    assert "weights_only=False" not in lines[0] and "TRUST" not in lines[0]
    if kind in REFUSED:
        import re

        assert re.search(REFUSED[kind], lines[0]), lines[0]


def test_payloads_are_live(payloads, tmp_path):
    """Unpickled without protection, every payload modifies the marker (in a subprocess)."""
    files, marker = payloads
    script = textwrap.dedent(f"""
        import json, os, sys, time, torch
        marker, files, out = {marker!r}, {json.dumps(files)}, {{}}
        for kind, paths in files.items():
            for path in paths:
                with open(marker, 'w') as f:
                    f.write('untouched\\n')
                try:
                    torch.load(path, weights_only=False)
                except Exception:
                    pass
                for _ in range(50):  # Popen runs in the background
                    if open(marker).read() != 'untouched\\n':
                        break
                    time.sleep(0.1)
                out[path] = open(marker).read() != 'untouched\\n'
        print(json.dumps(out))
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    ran = json.loads(proc.stdout.strip().splitlines()[-1])
    assert all(ran.values()), {p: r for p, r in ran.items() if not r}


KINDS = list(REFUSED)


@pytest.mark.parametrize("kind", KINDS)
def test_load_model_refuses(payloads, marker, kind):
    path = payloads[0][kind][0]
    with pytest.raises(CheckpointError) as e:
        internvit.load_model(path, "internvit-6b-tiny")
    _check_one_line(str(e.value), path, kind)


@pytest.mark.parametrize("kind", KINDS)
def test_runner_loader_refuses(payloads, marker, kind):
    """mmengine's CheckpointLoader inside the safe block (what load_from / --resume / tools/test.py use)."""
    from mmengine.runner import CheckpointLoader

    path = payloads[0][kind][1]
    with pytest.raises(CheckpointError) as e:
        with compat.safe_checkpoint_loading():
            CheckpointLoader.load_checkpoint(path, map_location="cpu")
    _check_one_line(str(e.value), path, kind)


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"tools_{name}", os.path.join(ROOT, "tools", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _tool_args(how: str, path: str, work: str) -> tuple[str, list]:
    return {
        "test.py": ("test", [CLS_TOY, path, "--work-dir", work]),
        "train.py --resume": ("train", [CLS_TOY, "--resume", path, "--work-dir", work]),
        "train.py load_from": ("train", [CLS_TOY, "--work-dir", work, "--cfg-options", f"load_from={path}"]),
        "convert_checkpoint.py": ("convert_checkpoint", ["to-hf", path, os.path.join(work, "hf")]),
    }[how]


@pytest.mark.parametrize("how", ["test.py", "train.py --resume", "train.py load_from", "convert_checkpoint.py"])
@pytest.mark.parametrize("kind", KINDS)
def test_tools_refuse(payloads, marker, kind, how, tmp_path, capsys):
    """Every tool: exit status 2, one line naming the file and the refused global, nothing written."""
    files, _ = payloads
    path = files[kind][0 if how == "convert_checkpoint.py" else 1]
    work = str(tmp_path / "work")
    name, argv = _tool_args(how, path, work)
    capsys.readouterr()
    assert run(_tool(name).main, argv, user_errors=(ValueError, OSError, KeyError)) == 2
    _check_one_line(capsys.readouterr().err, path, kind)
    assert not os.path.exists(work)


def test_runner_allow_list_is_scoped_to_one_load(payloads, marker, tmp_path):
    """The issue's sequence: a Runner checkpoint loads, then load_model gets the logger payload: refused, and
    the process-wide safe globals are what they were."""
    from mmengine.logging import HistoryBuffer

    before = set(torch.serialization.get_safe_globals())
    good = str(tmp_path / "iter_4.pth")
    torch.save(_runner_checkpoint("plain text"), good)
    ckpt = compat.load_runner_checkpoint(good, "cpu")
    assert type(ckpt["message_hub"]["log_scalars"]["train/loss"]) is HistoryBuffer
    assert set(torch.serialization.get_safe_globals()) == before
    with pytest.raises(CheckpointError, match="MMLogger"):
        internvit.load_model(payloads[0]["mmlogger"][0], "internvit-6b-tiny")


def test_process_wide_safe_globals_do_not_widen_loading(payloads, marker):
    """Globals another library marked safe process-wide are not accepted by our loaders, and stay marked."""
    torch.serialization.add_safe_globals([logging.FileHandler])
    try:
        with pytest.raises(CheckpointError, match="logging.FileHandler"):
            internvit.load_model(payloads[0]["filehandler"][0], "internvit-6b-tiny")
        assert logging.FileHandler in torch.serialization.get_safe_globals()
    finally:
        torch.serialization.clear_safe_globals()


@pytest.mark.parametrize("case", ["offset", "stride", "history-getattr", "history-fields", "object-array"])
def test_misused_torch_and_history_buffer_globals(case, tmp_path, marker):
    """Allowed globals with odd arguments: one line naming the file, never a crash or a half-built object."""
    from mmengine.logging import HistoryBuffer

    storage = torch.zeros(4).storage()
    obj = {
        "offset": lambda: {"w": _Call(torch._utils._rebuild_tensor, storage, 1 << 40, (4,), (1,))},
        "stride": lambda: {"w": _Call(torch._utils._rebuild_tensor_v2, storage, 0, (4, 4), (1 << 40, 1), False,
                                      _Call(collections.OrderedDict))},
        "history-getattr": lambda: _runner_checkpoint(_Call(getattr, HistoryBuffer, "register_statistics")),
        "history-fields": lambda: _runner_checkpoint(_with_state(HistoryBuffer([1.0], [1]), evil=1)),
        "object-array": lambda: _runner_checkpoint(np.array([1, "x"], dtype=object)),
    }[case]()
    path = str(tmp_path / f"{case}.pth")
    torch.save(obj, path)
    with pytest.raises(CheckpointError) as e:
        compat.load_runner_checkpoint(path, "cpu")
    _check_one_line(str(e.value), path, case)


def _with_state(buffer, **extra):
    """The buffer with extra attributes, which its ``__getstate__`` pickles along."""
    for k, v in extra.items():
        setattr(buffer, k, v)
    assert set(extra) <= set(buffer.__getstate__())
    return buffer


OURS = ("internvit", "segmentation", "classification", "retrieval", "mmcv.ops")
LIST_MODULES = r"""
import importlib, json, sys
{prelude}
{statement}
print(json.dumps([m for m in sys.modules if not m.startswith({ours!r}) and m != "__main__"]))
"""
IMPORT_PROBE = r"""
import importlib, json, logging, os, pickle, sys, warnings
{prelude}
for name in {modules!r}:  # third-party modules the statement imports: their own import-time effects are theirs
    try:
        importlib.import_module(name)
    except BaseException:
        pass
import numpy as np, torch, torch.serialization
from mmengine.runner import CheckpointLoader

def snapshot():
    return dict(
        safe_globals=sorted(f"{getattr(g, '__module__', '')}.{getattr(g, '__qualname__', g)}"
                            for g in torch.serialization.get_safe_globals()),
        torch_load=id(torch.load), serialization_load=id(torch.serialization.load),
        pickle=[id(pickle.load), id(pickle.loads), id(pickle.Unpickler)],
        warnings=[repr(f) for f in warnings.filters],
        root_logger=[logging.getLogger().level, [repr(h) for h in logging.getLogger().handlers],
                     logging.root.manager.disable],
        environ=dict(os.environ), default_dtype=str(torch.get_default_dtype()),
        threads=torch.get_num_threads(), np_err=np.geterr(),
        checkpoint_loaders={k: f"{v.__module__}.{v.__qualname__}" for k, v in CheckpointLoader._schemes.items()},
        modules={k: id(v) for k, v in sys.modules.items()},
    )

before = snapshot()
{statement}
after = snapshot()
changed = {k: (before[k], after[k]) for k in before if k != "modules" and before[k] != after[k]}
replaced = sorted(k for k, v in before["modules"].items() if after["modules"].get(k) != v)
print(json.dumps(dict(changed=changed, replaced_modules=replaced)))
"""
IMPORT_CASES = {
    "internvit": ("", "import internvit"),
    "classification": ("", "import classification"),
    # the documented shim (compat.apply, which imports mmseg) is the baseline; its own case is below
    "segmentation": ("from internvit import compat; compat.apply(mmseg=True)", "import segmentation"),
    "compat.apply": ("from internvit import compat", "compat.apply(mmseg=False)"),
}


def _python(code: str) -> str:
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout.strip().splitlines()[-1]


@pytest.mark.parametrize("case", list(IMPORT_CASES))
def test_import_changes_nothing_global(case):
    """In a fresh interpreter: no safe globals, checkpoint loaders, torch.load / pickle functions, warning
    filters, logging set-up, environment variables or already-imported modules change when our packages are
    imported (the mmcv.ops shim of compat.apply adds modules where compiled ops are absent, it replaces none).
    The third-party modules they import are imported first, so their own import-time effects do not count."""
    prelude, statement = IMPORT_CASES[case]
    modules = json.loads(_python(LIST_MODULES.format(prelude=prelude, statement=statement, ours=OURS)))
    result = json.loads(_python(IMPORT_PROBE.replace("{prelude}", prelude).replace("{statement}", statement)
                                .replace("{modules!r}", repr(modules))))
    assert result["changed"] == {} and result["replaced_modules"] == [], result


BIND_PROBE = r"""
import os, sys, torch, internvit
from internvit.checkpoints import hf_to_original_key
src = internvit.build_model("internvit-6b-tiny")
x = torch.randn(1, 3, 56, 56)
with torch.no_grad():
    ref = src(x).last_hidden_state
folder = sys.argv[1]
pth = os.path.join(folder, "w.pth")
torch.save({"module": {hf_to_original_key(k): v for k, v in src.state_dict().items()}}, pth)
hf = internvit.save_model(src, os.path.join(folder, "hf"))
for path, cfg in ((pth, "internvit-6b-tiny"), (hf, None)):
    model = internvit.load_model(path, cfg)
    weights = os.path.join(hf, "model.safetensors") if path == hf else pth
    torch.save({"other": torch.zeros(3)}, weights)  # the issue's sequence: overwrite the file just loaded
    with open(weights, "r+b") as f:
        f.truncate(16)
    with torch.no_grad():
        assert torch.equal(model(x).last_hidden_state, ref), path
print("ok")
"""


def test_loaded_weights_survive_overwriting_the_file(tmp_path):
    """load_model then overwrite / truncate the source: the model still works (no SIGBUS), same outputs."""
    proc = subprocess.run([sys.executable, "-c", BIND_PROBE, str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stderr[-2000:])


def test_truncated_weight_files_named(tmp_path, vit_fixture):
    """Truncated safetensors and .pth files: one CheckpointError line naming the file."""
    with open(os.path.join(vit_fixture, "model.safetensors"), "rb") as f:
        data = f.read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"cut.safetensors: not a readable safetensors file .*truncated"):
        internvit.load_model(cut, os.path.join(vit_fixture, "config.json"))
    with open(os.path.join(vit_fixture, "original_format.pth"), "rb") as f:
        data = f.read()
    for n in (0, 10, len(data) // 2, len(data) - 30):
        cut = tmp_path / f"cut{n}.pth"
        cut.write_bytes(data[:n])
        with pytest.raises(CheckpointError) as e:
            internvit.load_model(cut, "internvit-6b-tiny")
        assert str(cut) in str(e.value) and len(str(e.value).splitlines()) == 1


def test_runner_checkpoint_with_numpy1_names_loads(tmp_path):
    """A Runner checkpoint written under numpy 1 (``numpy.core.multiarray``) loads under numpy 2, and back."""
    import zipfile

    from mmengine.logging import HistoryBuffer

    src, dst = str(tmp_path / "np2.pth"), str(tmp_path / "np1.pth")
    torch.save(_runner_checkpoint("plain text"), src)
    core = "numpy._core" if hasattr(np, "_core") else "numpy.core"
    other = "numpy.core" if core == "numpy._core" else "numpy._core"
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                assert f"{core}.multiarray".encode() in data
                data = data.replace(f"{core}.multiarray".encode(), f"{other}.multiarray".encode())
            zout.writestr(item, data)
    ckpt = compat.load_runner_checkpoint(dst, "cpu")
    buffer = ckpt["message_hub"]["log_scalars"]["train/loss"]
    assert type(buffer) is HistoryBuffer and buffer.mean() == 0.375 and buffer.current() == 0.25
    assert ckpt["meta"]["seed"] == 0 and ckpt["message_hub"]["runtime_info"]["eta"] == 0.0


@pytest.mark.parametrize("zip_format", [True, False])
def test_pth_formats_load_exact_weights(tmp_path, zip_format):
    """Zip (memory-mapped, copied out with the mapped pages released) and legacy (read into memory) .pth files
    give exactly the saved weights."""
    from internvit.checkpoints import hf_to_original_key

    src = internvit.build_model("internvit-6b-tiny")
    path = str(tmp_path / "w.pth")
    torch.save({"module": {hf_to_original_key(k): v for k, v in src.state_dict().items()}}, path,
               _use_new_zipfile_serialization=zip_format)
    loaded = internvit.load_model(path, "internvit-6b-tiny").state_dict()
    assert loaded.keys() == src.state_dict().keys()
    assert all(torch.equal(loaded[k], v) for k, v in src.state_dict().items())
