"""OpenMMLab compatibility fixes for the modern stack, in one place. Import before mmseg / mmengine runners.

* ``mmcv.ops`` for mmcv-lite: mmseg imports ``mmcv.ops`` unconditionally, but mmcv-lite has no compiled
  ``mmcv._ext``. We install a bare ``mmcv.ops`` package exposing the pure-PyTorch ``point_sample`` and
  raising ``ModuleNotFoundError`` for compiled ops (mmseg guards optional heads on that error).
* mmseg 1.2.2 asserts ``mmcv < 2.2.0`` at import; with mmcv 2.2.x the check is passed by presenting a
  compatible version string during ``import mmseg`` only.
* torch >= 2.6 defaults ``torch.load(weights_only=True)``, which cannot read the checkpoints mmengine's
  Runner writes (they pickle a ``message_hub`` and numpy values), while older torch unpickles anything.
  :func:`load_runner_checkpoint` reads them without running code on every torch version;
  :func:`safe_checkpoint_loading` makes mmengine's ``CheckpointLoader`` use it *inside a block only*
  (``internvit.runner`` runs its Runners in that block). Pretrained weights load via :mod:`internvit.checkpoints`.
* mmengine writes checkpoints in place (``open('wb')``), rewrites ``iter_N.pth`` after a new best one while
  ``last_checkpoint`` names it, and removes old checkpoints *before* writing the new one: a kill during a save
  could leave no loadable checkpoint. :func:`durable_checkpoint_saving` makes every checkpoint write atomic
  and the removals follow the save, inside a block only (``internvit.runner`` runs its Runners in it).

:func:`apply` (what ``import segmentation`` runs) installs only the mmcv fixes, and they are no-ops where they
are not needed (full mmcv present). It is idempotent.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import re
import sys
import types
import warnings

_applied: set[str] = set()
_shimmed: set[str] = set()


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
    _shimmed.add("mmcv.ops")
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
        with warnings.catch_warnings():  # scoped: the process's warning filters are unchanged afterwards
            # with the mmcv.ops shim, mmcv's transformer bricks announce that the compiled deformable attention is
            # missing; no InternViT model uses it (mmseg's heads that need compiled ops fail when built instead)
            warnings.filterwarnings("ignore", message=r"Fail to import ``MultiScaleDeformableAttention``")
            importlib.import_module("mmseg")
            if "mmcv.ops" in _shimmed:
                importlib.import_module("mmcv.cnn.bricks.transformer")
    finally:
        mmcv.__version__ = real


#: Globals an mmengine Runner checkpoint pickles beyond tensor plumbing: numpy values (meta, message hub) and
#: the message hub's ``HistoryBuffer`` whose state names its statistics methods as ``getattr(HistoryBuffer,
#: 'mean')``. The last two are unpickled as inert stand-ins (:class:`_HistoryBufferState`,
#: :func:`_history_buffer_getattr`) and rebuilt from plain data; nothing else of ``mmengine`` is admitted.
_RUNNER_GLOBALS = re.compile(
    r"^(numpy(\._core|\.core)\.multiarray (_reconstruct|scalar)|numpy (ndarray|dtype)"
    r"|mmengine\.logging\.history_buffer HistoryBuffer|(__builtin__|builtins) getattr)$"
)
_STATISTICS = ("mean", "max", "min", "current")


def is_runner_global(spec: str) -> bool:
    """Whether a pickled global (``'module name'``) may appear in an mmengine Runner checkpoint."""
    from internvit.checkpoints import is_tensor_global

    return is_tensor_global(spec) or bool(_RUNNER_GLOBALS.match(spec))


class _HistoryBufferState:
    """Stands in for ``mmengine.logging.HistoryBuffer`` while unpickling: keeps the pickled state as data.

    The real class's ``__setstate__`` writes the pickled statistics methods into a class-wide registry; this
    one stores the state, which :func:`_rebuild_history_buffers` checks and turns into a fresh HistoryBuffer.
    """

    def __setstate__(self, state) -> None:
        self.state = state


class _StatisticName(str):
    """What ``getattr(HistoryBuffer, 'mean')`` unpickles to: the name of a built-in statistic."""


def _history_buffer_getattr(obj, name):
    """Stands in for ``getattr`` while unpickling: resolves only ``HistoryBuffer.<built-in statistic>``."""
    if obj is _HistoryBufferState and name in _STATISTICS:
        return _StatisticName(name)
    raise pickle.UnpicklingError(f"getattr({getattr(obj, '__name__', type(obj).__name__)}, {name!r}) is not a "
                                 f"history-buffer statistic")


# torch.load(weights_only=True) looks user-allowed globals up by ``module.qualname`` (``module.name`` on torch 2.4):
# the stand-ins answer to the names an mmengine checkpoint uses (the tuple form of add_safe_globals does the same,
# but only on torch >= 2.6)
_HistoryBufferState.__module__ = "mmengine.logging.history_buffer"
_HistoryBufferState.__name__ = _HistoryBufferState.__qualname__ = "HistoryBuffer"


def _alias(func, module: str, name: str):
    """``func`` under the global name ``module.name`` (for the weights-only unpickler's look-up)."""
    def alias(*args):
        return func(*args)

    alias.__module__, alias.__name__, alias.__qualname__ = module, name, name
    return alias


def _runner_safe_globals() -> list:
    import numpy as np

    multiarray = (getattr(np, "_core", None) or np.core).multiarray
    dtypes = [getattr(np.dtypes, n) for n in dir(np.dtypes) if n.endswith("DType")] if hasattr(np, "dtypes") else []
    # getattr as pickled by protocol 2 (``__builtin__``, mapped to ``builtins`` by newer torch); numpy's array
    # functions under both numpy 1 (``numpy.core``) and numpy 2 (``numpy._core``) names
    aliases = [_alias(_history_buffer_getattr, m, "getattr") for m in ("builtins", "__builtin__")]
    aliases += [_alias(getattr(multiarray, f), f"numpy.{core}.multiarray", f)
                for f in ("_reconstruct", "scalar") for core in ("core", "_core")]
    return [_HistoryBufferState, np.ndarray, np.dtype, *aliases, *dtypes]


def _history_buffer(state, filename: str, where: str):
    import numpy as np
    from mmengine.logging import HistoryBuffer

    from internvit.checkpoints import CheckpointError

    def bad(why: str):
        return CheckpointError(f"{filename}: refusing to load: history buffer {where} {why}")

    if not isinstance(state, dict) or set(state) - {"max_length", "_log_history", "_count_history",
                                                     "statistics_methods"}:
        raise bad("has unexpected fields")
    methods = state.get("statistics_methods", {})
    if not isinstance(methods, dict) or not all(type(v) is _StatisticName for v in methods.values()):
        raise bad("names statistics methods that are not mmengine's built-in ones")
    log, count, max_length = state.get("_log_history"), state.get("_count_history"), state.get("max_length")
    for arr in (log, count):
        if not (type(arr) is np.ndarray and arr.ndim == 1 and arr.dtype.kind in "biuf"):
            raise bad("holds a history that is not a 1-D numeric array")
    if len(log) != len(count) or type(max_length) is not int or max_length < 1:
        raise bad("has inconsistent lengths")
    return HistoryBuffer(log, count, max_length)


def _rebuild_history_buffers(obj, filename: str):
    """Replace every :class:`_HistoryBufferState` (in dicts and lists) by a HistoryBuffer built from its data."""
    from internvit.checkpoints import CheckpointError

    stack = [(obj, "")]
    while stack:
        o, where = stack.pop()
        items = o.items() if isinstance(o, dict) else enumerate(o) if isinstance(o, list) else ()
        for k, v in list(items):
            if isinstance(v, _HistoryBufferState):
                o[k] = _history_buffer(v.state, filename, f"{where}/{k}")
            elif isinstance(v, (dict, list, tuple)):
                if isinstance(v, tuple) and any(isinstance(x, _HistoryBufferState) for x in v):
                    raise CheckpointError(f"{filename}: refusing to load: history buffer inside a tuple at {where}/{k}")
                stack.append((v, f"{where}/{k}"))
    if isinstance(obj, _HistoryBufferState):
        raise CheckpointError(f"{filename}: refusing to load: the checkpoint is a bare history buffer")
    return obj


def load_runner_checkpoint(filename: str, map_location=None, *, mmap: bool = False):
    """Load a checkpoint for mmengine (``load_from``, ``--resume``, ``tools/test.py CKPT``) without running code.

    The pickle's globals are vetted from its opcodes: tensor plumbing, numpy arrays / scalars / dtypes and
    mmengine's history buffers (the message hub's state) only. It is then read with
    ``torch.load(weights_only=True)`` and exactly those extra globals, for this one load (the numpy ones
    as themselves, the history buffer and its ``getattr`` as inert stand-ins); the result must be plain data,
    and each history buffer is rebuilt by its constructor from checked arrays. Anything else raises
    :class:`internvit.CheckpointError` with one line naming the file and the refused global.
    """
    from internvit.checkpoints import safe_torch_load

    obj = safe_torch_load(filename, map_location=map_location, mmap=mmap, allowed=is_runner_global,
                          safe_globals=_runner_safe_globals(), allowed_types=(_HistoryBufferState,))
    return _rebuild_history_buffers(obj, filename)


def _load_local(filename, map_location=None):
    filename = os.path.expanduser(filename)
    from internvit.file_reads import require_file

    require_file(filename, "checkpoint file")
    return load_runner_checkpoint(filename, map_location)


def _load_url(filename, map_location=None, model_dir=None, progress=False):
    """http(s) checkpoints: downloaded into torch's hub cache as mmengine does, then read as a local file."""
    import torch
    from mmengine.dist import barrier, get_dist_info

    model_dir = model_dir or os.path.join(torch.hub.get_dir(), "checkpoints")
    cached = os.path.join(model_dir, os.path.basename(filename.split("?")[0]))
    rank, world_size = get_dist_info()
    if rank == 0 and not os.path.isfile(cached):
        os.makedirs(model_dir, exist_ok=True)
        torch.hub.download_url_to_file(filename, cached, progress=progress)
    if world_size > 1:
        barrier()
    return load_runner_checkpoint(cached, map_location)


@contextlib.contextmanager
def safe_checkpoint_loading():
    """Inside the block, mmengine's ``CheckpointLoader`` reads local and http(s) checkpoints with
    :func:`load_runner_checkpoint`; its previous loaders are back afterwards (nothing changes process-wide).
    ``internvit.runner`` runs every Runner it builds inside this block."""
    from mmengine.runner import CheckpointLoader

    saved = CheckpointLoader._schemes
    CheckpointLoader._schemes = type(saved)(saved)  # register into a copy, restore the original object after
    try:
        CheckpointLoader.register_scheme(prefixes="", loader=_load_local, force=True)
        CheckpointLoader.register_scheme(prefixes=("http://", "https://"), loader=_load_url, force=True)
        yield
    finally:
        CheckpointLoader._schemes = saved


class _DeferredRemovals:
    """A checkpoint hook's file backend whose ``remove`` / ``rmtree`` are recorded instead of done (everything
    else is the real backend's)."""

    def __init__(self, backend, pending: list) -> None:
        self._backend = backend
        self._pending = pending

    def __getattr__(self, name: str):
        return getattr(self._backend, name)

    def remove(self, filepath) -> None:
        self._pending.append(("remove", filepath))

    def rmtree(self, dir_path) -> None:
        self._pending.append(("rmtree", dir_path))


def _open_last_checkpoint_atomically(file, mode: str = "r", *args, **kwargs):
    """``open`` as mmengine's checkpoint hook sees it: its ``last_checkpoint`` is written through
    :func:`internvit.fileio.atomic_write` (a kill leaves the previous complete pointer); anything else is
    the built-in ``open``."""
    import builtins

    if "w" in mode and os.path.basename(os.fspath(file)) == "last_checkpoint":
        return _atomic_text(os.fspath(file), mode, *args, **kwargs)
    return builtins.open(file, mode, *args, **kwargs)


@contextlib.contextmanager
def _atomic_text(path: str, mode: str, *args, **kwargs):
    from internvit.fileio import atomic_write

    with atomic_write(path) as tmp, open(tmp, mode, *args, **kwargs) as f:
        yield f


def _protected_paths(hook) -> set:
    """The checkpoints a hook's state names now (the last one, the best ones): never removed."""
    paths = {getattr(hook, "last_ckpt", None), getattr(hook, "best_ckpt_path", None),
             *(getattr(hook, "best_ckpt_path_dict", None) or {}).values()}
    return {os.path.abspath(str(p)) for p in paths if p}


def _removing_after_save(method):
    """Wrap a ``CheckpointHook`` save method: the old checkpoints it removes (``max_keep_ckpts``, a replaced
    best checkpoint) are removed only after the whole save has returned, i.e. after the new checkpoint and
    ``last_checkpoint`` are complete (a save that raises removes nothing)."""
    def save(self, *args, **kwargs):
        if getattr(self, "_internvit_pending", None) is not None:  # nested (the best save re-saves iter_N)
            return method(self, *args, **kwargs)
        pending: list = []
        backend = self.file_backend
        self._internvit_pending, self.file_backend = pending, _DeferredRemovals(backend, pending)
        try:
            result = method(self, *args, **kwargs)
        finally:
            self.file_backend, self._internvit_pending = backend, None
        _remove_old_checkpoints(backend, pending, _protected_paths(self))
        return result

    save.__name__, save.__doc__ = method.__name__, method.__doc__
    save._internvit_original = method
    return save


def _remove_old_checkpoints(backend, pending: list, keep: set) -> None:
    from internvit.store import _point

    for op, path in pending:
        if os.path.abspath(str(path)) in keep:
            continue
        if op == "remove" and backend.isfile(path):
            backend.remove(path)
        elif op == "rmtree" and backend.isdir(path):
            backend.rmtree(path)
        else:
            continue
        _point("checkpoint:removed")


def _atomic_put(self, obj: bytes, filepath) -> None:
    """``LocalBackend.put`` through :func:`internvit.fileio.atomic_write`: the file at ``filepath`` is the
    complete old or the complete new bytes at every instant."""
    from internvit.fileio import atomic_write

    with atomic_write(filepath) as tmp, open(tmp, "wb") as f:
        f.write(obj)


@contextlib.contextmanager
def deferred_config_dump():
    """Inside the block, a ``Runner`` or ``FlexibleRunner`` being built writes none of its config copies: not the
    one in the work dir (mmengine's ``dump_config``, called in place by their ``__init__``, replaced an earlier
    run's copy even when the set-up was then refused) and not its visualizer's (``visualizer.add_config``, e.g.
    ``LocalVisBackend``'s ``<save_dir>/vis_data/config.py``: ``tools/test.py --show-dir`` left it in an existing
    show-dir, even one inside the test images, when the run was refused). The calls are recorded on the runner
    and the runners collected in the yielded list instead, for :func:`dump_config_atomically` once the caller's
    set-up checks pass. Every patched method is back afterwards."""
    from mmengine.runner import FlexibleRunner, Runner

    built: list = []
    patched: list = []  # visualizers whose add_config is the recorder for now
    classes = (Runner, FlexibleRunner)
    saved = {cls: (cls.__dict__["dump_config"], cls.__dict__["build_visualizer"]) for cls in classes}

    def recording_visualizer(build):
        def build_visualizer(self, *args, **kwargs):
            visualizer = build(self, *args, **kwargs)
            calls = self.__dict__.setdefault("_internvit_vis_configs", [])

            def add_config(config, **kw):
                calls.append((visualizer, config, kw))

            add_config._internvit_recorder = True
            visualizer.add_config = add_config  # on the instance: whatever class the visualizer is
            patched.append(visualizer)
            return visualizer

        build_visualizer.__doc__ = build.__doc__
        return build_visualizer

    for cls, (_, build) in saved.items():
        cls.dump_config = lambda self: built.append(self)
        cls.build_visualizer = recording_visualizer(build)
    try:
        yield built
    finally:
        for cls, (dump, build) in saved.items():
            cls.dump_config, cls.build_visualizer = dump, build
        for visualizer in patched:
            if getattr(visualizer.__dict__.get("add_config"), "_internvit_recorder", False):
                del visualizer.add_config


def _atomic_local_vis_config(self, config, **kwargs) -> None:
    """``LocalVisBackend.add_config`` through :func:`internvit.fileio.atomic_write`."""
    from mmengine.config import Config

    from internvit.fileio import atomic_write

    assert isinstance(config, Config)
    with atomic_write(self._config_save_file) as tmp:
        config.dump(tmp)


def dump_config_atomically(runner) -> None:
    """Write ``runner``'s config copies that :func:`deferred_config_dump` held back, each through
    :func:`internvit.fileio.atomic_write` (a kill never leaves one half-written): the work dir's, where
    mmengine's ``dump_config`` writes it (``work_dir/<config name>``, or ``<timestamp>.py``), and its
    visualizer's (``visualizer.add_config``: ``LocalVisBackend`` writes ``<save_dir>/vis_data/config.py``,
    other backends record it as they do)."""
    from mmengine.visualization import LocalVisBackend
    from mmengine.visualization.vis_backend import force_init_env

    from internvit.fileio import atomic_write

    name = os.path.basename(runner.cfg.filename) if runner.cfg.filename is not None else f"{runner.timestamp}.py"
    with atomic_write(os.path.join(runner.work_dir, name)) as tmp:
        runner.cfg.dump(tmp)
    calls = runner.__dict__.pop("_internvit_vis_configs", [])
    if not calls:
        return
    saved = LocalVisBackend.__dict__["add_config"]
    LocalVisBackend.add_config = force_init_env(_atomic_local_vis_config)
    try:
        for visualizer, config, kwargs in calls:
            visualizer.add_config(config, **kwargs)  # the visualizer's own (master-only) method
    finally:
        LocalVisBackend.add_config = saved


@contextlib.contextmanager
def durable_checkpoint_saving():
    """Inside the block, mmengine writes checkpoints crash-safely (``internvit.runner`` runs every Runner it
    builds inside this block); the previous methods are back afterwards.

    * every file written through mmengine's ``LocalBackend.put`` (``save_checkpoint``: ``iter_N.pth``,
      ``epoch_N.pth``, ``best_*.pth``, published checkpoints) goes through :func:`internvit.fileio.atomic_write`
      (temporary file beside it, ``fsync``, rename, ``fsync`` of the folder): a checkpoint rewritten in place
      (mmengine re-saves ``iter_N.pth`` after a new best one) is never seen half-written;
    * ``CheckpointHook`` writes ``last_checkpoint`` the same way, after the checkpoint it names is complete;
    * the checkpoints ``CheckpointHook`` removes (``max_keep_ckpts``, the previous best) are removed only after
      the new checkpoint and ``last_checkpoint`` are complete (mmengine removes them first).
    """
    from mmengine.fileio.backends import LocalBackend
    from mmengine.hooks import checkpoint_hook

    hook_cls = checkpoint_hook.CheckpointHook
    saved_put = LocalBackend.__dict__["put"]
    saved_methods = {n: hook_cls.__dict__[n] for n in ("_save_checkpoint_with_step", "_save_best_checkpoint")}
    had_open, saved_open = hasattr(checkpoint_hook, "open"), getattr(checkpoint_hook, "open", None)
    LocalBackend.put = _atomic_put
    for name, method in saved_methods.items():
        if not hasattr(method, "_internvit_original"):
            setattr(hook_cls, name, _removing_after_save(method))
    checkpoint_hook.open = _open_last_checkpoint_atomically
    try:
        yield
    finally:
        LocalBackend.put = saved_put
        for name, method in saved_methods.items():
            setattr(hook_cls, name, method)
        if had_open:
            checkpoint_hook.open = saved_open
        else:
            del checkpoint_hook.open


def apply(mmseg: bool = True) -> None:
    """Apply the import-time fixes (idempotent): the ``mmcv.ops`` shim where compiled ops are absent, and
    ``import mmseg`` inside the version window. ``mmseg=False`` skips importing mmseg (classification-only use).
    Nothing else changes process-wide; safe checkpoint loading is scoped (:func:`safe_checkpoint_loading`)."""
    if "base" not in _applied:
        _install_mmcv_ops_shim()
        _applied.add("base")
    if mmseg and "mmseg" not in _applied:
        _import_mmseg_with_version_window()
        _applied.add("mmseg")
