"""OpenMMLab compatibility fixes for the modern stack, in one place. Import before mmseg / mmengine runners.

* ``mmcv.ops`` for mmcv-lite: mmseg imports ``mmcv.ops`` unconditionally, but mmcv-lite has no compiled
  ``mmcv._ext``. We install a bare ``mmcv.ops`` package exposing the pure-PyTorch ``point_sample`` and
  raising ``ModuleNotFoundError`` for compiled ops (mmseg guards optional heads on that error).
* mmseg 1.2.2 asserts ``mmcv < 2.2.0`` at import; with mmcv 2.2.x the check is passed by presenting a
  compatible version string during ``import mmseg`` only.
* torch >= 2.6 defaults ``torch.load(weights_only=True)``, which cannot read the checkpoints mmengine's
  Runner writes (they pickle a ``message_hub`` and numpy values), while older torch unpickles anything.
  mmengine's local-file loader is replaced by :func:`load_runner_checkpoint`: ``weights_only=True`` plus,
  for Runner checkpoints only, an allow-list of mmengine/numpy types vetted from the pickle's opcodes before
  loading — on every torch version. Pretrained weights load via :mod:`internvit.checkpoints`.

The mmcv fixes are no-ops where they are not needed (full mmcv present). :func:`apply` is idempotent.
"""
from __future__ import annotations

import importlib
import os
import pickletools
import re
import sys
import types
import zipfile
from typing import Optional

_applied: set[str] = set()


def _install_mmcv_ops_shim() -> bool:
    try:
        import mmcv.ops  # noqa: F401  (full mmcv with compiled ops: nothing to do)
        return False
    except ImportError:
        sys.modules.pop("mmcv.ops", None)
    import mmcv

    ops = types.ModuleType("mmcv.ops")
    ops.__path__ = [os.path.join(os.path.dirname(mmcv.__file__), "ops")]
    ops.__package__ = "mmcv.ops"
    sys.modules["mmcv.ops"] = ops
    mmcv.ops = ops
    point_sample = importlib.import_module("mmcv.ops.point_sample")  # pure PyTorch
    ops.point_sample = point_sample.point_sample
    ops.bilinear_grid_sample = point_sample.bilinear_grid_sample

    def sigmoid_focal_loss(*args, **kwargs):
        raise NotImplementedError("mmcv.ops.sigmoid_focal_loss needs full mmcv (compiled mmcv._ext)")

    ops.sigmoid_focal_loss = sigmoid_focal_loss

    def __getattr__(name: str):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ModuleNotFoundError(f"mmcv.ops.{name} needs full mmcv (compiled mmcv._ext), not mmcv-lite")

    ops.__getattr__ = __getattr__
    return True


def _import_mmseg_with_version_window() -> None:
    if "mmseg" in sys.modules:
        return
    import mmcv
    from packaging.version import parse

    real = mmcv.__version__
    if parse(real) >= parse("2.2.0"):
        mmcv.__version__ = "2.1.0"
    try:
        importlib.import_module("mmseg")
    finally:
        mmcv.__version__ = real


#: Globals an mmengine Runner checkpoint pickles (message hub history, numpy meta values), beyond what
#: ``torch.load(weights_only=True)`` accepts by default. Nothing here can run arbitrary code.
_RUNNER_GLOBALS = re.compile(
    r"^(mmengine\.logging\.[\w.]+ \w+"
    r"|numpy(\._core|\.core)?(\.multiarray)? (dtype|ndarray|_reconstruct|scalar)"
    r"|(__builtin__|builtins) getattr)$"
)
_TORCH_DEFAULT_GLOBALS = re.compile(r"^(torch[\w.]* \w+|collections OrderedDict|_codecs encode)$")


def _pickled_globals(path: str) -> Optional[set]:
    """The ``module name`` globals a torch zip checkpoint references, read without unpickling (or None)."""
    try:
        with zipfile.ZipFile(path) as z:
            data = z.read(next(n for n in z.namelist() if n.endswith("data.pkl")))
        found = set()
        for op, arg, _ in pickletools.genops(data):
            if op.name in ("GLOBAL", "INST"):
                found.add(arg)
            elif op.name == "STACK_GLOBAL":  # not written by torch.save's protocol 2; cannot be vetted
                return None
        return found
    except (zipfile.BadZipFile, StopIteration, ValueError, OSError):
        return None


def _resolve_global(spec: str):
    module, name = spec.split(" ")
    module = {"__builtin__": "builtins"}.get(module, module)
    obj = importlib.import_module(module)
    for part in name.split("."):
        obj = getattr(obj, part)
    return obj


def load_runner_checkpoint(filename: str, map_location=None):
    """Load a checkpoint for mmengine (``load_from``, ``--resume``, ``tools/test.py CKPT``) without running code.

    ``torch.load(weights_only=True)`` first. Checkpoints that an mmengine Runner wrote also pickle its message
    hub and numpy values; those load with exactly that extra allow-list, after checking (by reading the
    pickle's opcodes, not executing them) that the file references nothing else. Anything else is refused
    with a one-line error, unless ``INTERNVIT_TRUST_CHECKPOINTS=1`` is set for files you trust.
    """
    import pickle

    import numpy as np
    import torch

    try:
        return torch.load(filename, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError:
        pass
    if os.environ.get("INTERNVIT_TRUST_CHECKPOINTS") == "1":
        # Trusted path, explicit opt-in only: for checkpoints the user's own training runs wrote (e.g. with
        # objects outside the allow-list). Pretrained weights never come here (internvit.checkpoints).
        return torch.load(filename, map_location=map_location, weights_only=False)  # user's own training run
    found = _pickled_globals(filename)
    extra = None if found is None else sorted(g for g in found if not _TORCH_DEFAULT_GLOBALS.match(g))
    unsafe = [g for g in extra or [] if not _RUNNER_GLOBALS.match(g)] if extra is not None else ["<unreadable>"]
    if unsafe:
        raise RuntimeError(f"{filename}: refusing to unpickle objects outside the checkpoint allow-list "
                           f"({', '.join(unsafe[:5])}); set INTERNVIT_TRUST_CHECKPOINTS=1 only if you trust it")
    allowed = [_resolve_global(g) for g in extra]
    allowed += [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    torch.serialization.add_safe_globals(allowed)
    return torch.load(filename, map_location=map_location, weights_only=True)


def _register_safe_checkpoint_loader() -> None:
    from mmengine.runner import CheckpointLoader

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        return load_runner_checkpoint(filename, map_location)


def apply(mmseg: bool = True) -> None:
    """Apply every fix (idempotent). ``mmseg=False`` skips importing mmseg (classification-only use)."""
    if "base" not in _applied:
        _install_mmcv_ops_shim()
        _register_safe_checkpoint_loader()
        _applied.add("base")
    if mmseg and "mmseg" not in _applied:
        _import_mmseg_with_version_window()
        _applied.add("mmseg")
