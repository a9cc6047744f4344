"""OpenMMLab compatibility fixes for the modern stack, in one place. Import before mmseg / mmengine runners.

* ``mmcv.ops`` for mmcv-lite: mmseg imports ``mmcv.ops`` unconditionally, but mmcv-lite has no compiled
  ``mmcv._ext``. We install a bare ``mmcv.ops`` package exposing the pure-PyTorch ``point_sample`` and
  raising ``ModuleNotFoundError`` for compiled ops (mmseg guards optional heads on that error).
* mmseg 1.2.2 asserts ``mmcv < 2.2.0`` at import; with mmcv 2.2.x the check is passed by presenting a
  compatible version string during ``import mmseg`` only.
* torch >= 2.6 defaults ``torch.load(weights_only=True)``, which cannot read the checkpoints mmengine's
  Runner writes (they pickle a ``message_hub``). mmengine's local-file loader is re-registered to allow
  full unpickling — ONLY for files of the user's own training runs (``--resume``, ``load_from``).
  Pretrained weights never go through it: they load via :mod:`internvit.checkpoints`.

Every fix is a no-op where it is not needed (full mmcv present, torch < 2.6). :func:`apply` is idempotent.
"""
from __future__ import annotations

import importlib
import os
import sys
import types

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


def _trust_runner_checkpoints() -> bool:
    import torch
    from packaging.version import parse

    if parse(torch.__version__.split("+")[0]) < parse("2.6"):
        return False
    from mmengine.runner import CheckpointLoader

    @CheckpointLoader.register_scheme(prefixes="", force=True)
    def load_from_local(filename, map_location):
        filename = os.path.expanduser(filename)
        if not os.path.isfile(filename):
            raise FileNotFoundError(f"{filename} can not be found.")
        # Trusted path: checkpoints written by the user's own mmengine training runs (they pickle
        # mmengine/numpy objects). Pretrained weights are read by internvit.checkpoints, weights_only=True.
        return torch.load(filename, map_location=map_location, weights_only=False)

    return True


def apply(mmseg: bool = True) -> None:
    """Apply every fix (idempotent). ``mmseg=False`` skips importing mmseg (classification-only use)."""
    if "base" not in _applied:
        _install_mmcv_ops_shim()
        _trust_runner_checkpoints()
        _applied.add("base")
    if mmseg and "mmseg" not in _applied:
        _import_mmseg_with_version_window()
        _applied.add("mmseg")
