"""``load_model`` / ``save_model`` / ``build_model``: from presets, Hugging Face directories and weight files."""
from __future__ import annotations

import fnmatch
import hashlib
import json
import logging
import math
import os
import shutil
from typing import Optional, Sequence, Union

import torch
from torch import nn

from .checkpoints import (
    WEIGHT_SUFFIXES,
    CheckpointError,
    LoadReport,
    TensorSource,
    load_into,
    materialize_meta,
    open_weights,
)
from .config import (
    VISION_PRESETS,
    ConfigLike,
    InternViTConfig,
    InternVLConfig,
    _canon,
    check_sizes,
    get_config,
    is_preset,
    read_config_json,
)
from .file_reads import not_a_file_reason
from .fileio import atomic_write, save_safetensors
from .models.vit import InternViT, interpolate_pos_embed
from .store import replace_folder

logger = logging.getLogger("internvit")

SourceLike = Union[str, os.PathLike]


def _model_class(config):
    if isinstance(config, InternVLConfig):
        from .models.internvl import InternVLModel

        return InternVLModel
    return InternViT


def preset_seed(name: str) -> int:
    """The fixed seed a preset's random weights are drawn with (from its canonical name: the same in every process
    and for every accepted spelling of the preset, e.g. ``InternViT-6B-tiny`` and ``internvit_6b_tiny``)."""
    name = _canon(name) if is_preset(name) else name
    return int.from_bytes(hashlib.sha256(f"internvit-preset:{name}".encode("utf-8")).digest()[:4], "little") >> 1


#: the dtypes a model is loaded in (``load_model``'s ``dtype``; strings as the FeatureExtractor spells them)
MODEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def model_dtype(dtype: Union[str, torch.dtype, None]) -> Optional[torch.dtype]:
    """``dtype`` as a ``torch.dtype`` (``None`` stays ``None``): a string as :func:`internvit.features.parse_dtype`
    reads it (``'bf16'``, ``'fp32'``, ...; ``ValueError`` for another). Raises ``TypeError`` naming ``dtype`` and
    the allowed values for anything else, e.g. an integer, bool, complex or float8 dtype (the model cannot run
    in it)."""
    from .features import DTYPES, parse_dtype

    if dtype is None:
        return None
    parsed = parse_dtype(dtype) if isinstance(dtype, str) else dtype
    if parsed not in MODEL_DTYPES:
        allowed = ", ".join([*map(str, MODEL_DTYPES), *map(repr, DTYPES), "None"])
        raise TypeError(f"dtype must be one of {allowed}; got {dtype!r}")
    return parsed


def build_model(config: ConfigLike, *, device: str | torch.device = "cpu",
                dtype: Union[str, torch.dtype] = torch.float32, init: bool = True,
                seed: Optional[int] = None) -> nn.Module:
    """A randomly initialised model for a preset / dict / ``config.json`` (``init=False`` skips init).

    ``seed``: draw the weights from ``torch.manual_seed(seed)`` on a forked RNG (the global RNG state is left
    untouched). A preset name defaults to :func:`preset_seed` of the name, so a preset gives the same weights
    in every process; other configs default to ``None`` (the global RNG). ``dtype``: as :func:`model_dtype`
    reads it (``TypeError`` / ``ValueError`` for one the model cannot run in).
    """
    dtype = model_dtype(dtype) or torch.float32
    if seed is None and isinstance(config, str) and is_preset(config) and not os.path.exists(config):
        seed = preset_seed(config)
    cfg = get_config(config)
    if seed is None:
        model = _model_class(cfg)(cfg)
        if init:
            model.init_weights()
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(seed))
            model = _model_class(cfg)(cfg)
            if init:
                model.init_weights()
    return model.to(device=device, dtype=dtype)


def infer_vision_config(source: TensorSource) -> InternViTConfig:
    """Read the architecture off the tensor shapes; the head count comes from the preset of that width.

    The weights do not record the head count (the q/k norms span the whole width). Every released model of a
    width has the same head count (3200: 25, 1024: 16), which is then the right one; for another width it is
    an assumption, and a warning says so (naming the preset it came from): pass ``config=`` to be sure.
    """
    mapping, _, _ = InternViT.checkpoint_key_map(source.keys())
    shapes = {model_key: source.shape(ck) for ck, model_key in mapping.items()}
    try:
        c = shapes["embeddings.class_embedding"][-1]
        layers = 1 + max(int(k.split(".")[2]) for k in shapes if k.startswith("encoder.layers."))
        patch = shapes["embeddings.patch_embedding.weight"][-1]
        grid = int(round((shapes["embeddings.position_embedding"][1] - 1) ** 0.5))
        ffn = shapes["encoder.layers.0.mlp.fc1.weight"][0]
    except (KeyError, ValueError) as e:
        msg = f"cannot infer the architecture from the checkpoint (missing {e}); pass config="
        raise CheckpointError(msg) from None
    same_width = [p for p in VISION_PRESETS.values() if p["hidden_size"] == c]
    if not same_width:
        raise CheckpointError(f"checkpoint width {c} matches no preset, so the head count is unknown: pass "
                              f"config= (a preset name, dict or config.json)")
    read = dict(hidden_size=c, num_hidden_layers=layers, patch_size=patch, image_size=grid * patch,
                intermediate_size=ffn, qkv_bias="encoder.layers.0.attn.qkv.bias" in shapes,
                qk_normalization="encoder.layers.0.attn.q_norm.weight" in shapes,
                norm_type="layer_norm" if "encoder.layers.0.norm1.bias" in shapes else "rms_norm")
    released = [n for n, p in VISION_PRESETS.items() if p["hidden_size"] == c and "tiny" not in n]
    style = ("norm_type", "qk_normalization", "qkv_bias")  # name the preset of the same family (300M vs 6B)
    alike = [n for n, p in VISION_PRESETS.items() if p["hidden_size"] == c
             and all(p.get(k) == read[k] for k in style)]
    name = released[0] if released else (alike or [n for n, p in VISION_PRESETS.items() if p is same_width[0]])[0]
    base = dict(VISION_PRESETS[name], **read)
    if not released:
        logger.warning("the weights do not record the number of attention heads: assumed %d (from the preset %r "
                       "of width %d); pass config= (a preset name, dict or config.json) if the model had another",
                       base["num_attention_heads"], name, c)
    return InternViTConfig(**base)


def infer_config(source: TensorSource) -> InternViTConfig | InternVLConfig:
    """Config of a bare weight file: a released InternVL layout (text tower keys present) or an InternViT."""
    keys = [k[len("module."):] if k.startswith("module.") else k for k in source.keys()]
    if any(k.startswith("transformer.") for k in keys):
        return get_config("internvl-c-13b-224px")  # internvl_c_13b_224px.pth; strict loading checks the shapes
    if any(k.startswith("qllama.") or k == "query_tokens" for k in keys):
        return get_config("internvl-14b-224px")
    return infer_vision_config(source)


def _pos_embed_resizer(model: nn.Module, key: str):
    """Resize a checkpoint's square position grid to the model's (as the reference does at load time)."""
    def resize(t: torch.Tensor, shape: tuple) -> torch.Tensor:
        n_new = shape[1] - 1
        side = int(round(n_new ** 0.5))
        n_old = t.shape[1] - 1 if t.ndim == 3 and t.shape[0] == 1 and t.shape[2] == shape[2] else -1
        if n_old < 1 or round(n_old ** 0.5) ** 2 != n_old:  # a grid of the model's width is resized, nothing else
            raise CheckpointError(f"{key}: {list(t.shape)} in the checkpoint is not a square grid of patch rows "
                                  f"plus a class row of the model's width, so it cannot be resized to the model's "
                                  f"{list(shape)}")
        return interpolate_pos_embed(t, (side, side))
    return resize


def _raw_config(config: ConfigLike) -> Optional[dict]:
    """The ``config.json`` mapping behind ``config`` (a dict, a path or a folder holding one); ``None`` for a preset,
    a config object or an unreadable file (:func:`get_config` names that)."""
    if isinstance(config, dict):
        return config
    if isinstance(config, (str, os.PathLike)) and not is_preset(str(config)):
        path = os.path.join(config, "config.json") if os.path.isdir(config) else os.fspath(config)
        try:
            return read_config_json(path)
        except (OSError, ValueError, UnicodeDecodeError, RecursionError):
            return None
    return None


def _config_torch_dtype(raw: Optional[dict]) -> Optional[torch.dtype]:
    """The ``torch_dtype`` (or, newer ``transformers``, ``dtype``) a ``config.json`` records, if it names one."""
    for where in (raw or {}, (raw or {}).get("vision_config") or {}):
        value = where.get("torch_dtype", where.get("dtype")) if isinstance(where, dict) else None
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            return getattr(torch, value)
    return None


def _checkpoint_dtype(source: TensorSource, preferred: Optional[torch.dtype], origin: str) -> Optional[torch.dtype]:
    """The one dtype a model loaded with ``dtype=None`` gets: ``preferred`` (the config's ``torch_dtype``) when
    the checkpoint holds floating tensors of it, else the floating dtype holding the most elements. A checkpoint
    that mixes floating dtypes is logged (WARNING) with the dtype chosen."""
    sizes: dict[torch.dtype, int] = {}
    for k in source:
        dt = source.dtype(k)
        if dt.is_floating_point:
            sizes[dt] = sizes.get(dt, 0) + math.prod(source.shape(k))
    if not sizes:
        return None
    chosen = preferred if preferred in sizes else max(sizes, key=lambda d: sizes[d])
    if len(sizes) > 1:
        why = "the config's torch_dtype" if chosen == preferred else "the dtype of most of the weights"
        logger.warning("%s: the checkpoint mixes %s weights: loaded as %s (%s), one dtype for the whole model; "
                       "pass dtype= to choose another", origin, ", ".join(str(d).replace("torch.", "")
                                                                          for d in sorted(sizes, key=str)),
                       str(chosen).replace("torch.", ""), why)
    return chosen


def _grid_of(rows: int) -> Optional[int]:
    """The side of a square position grid of ``rows`` rows (a class row included), or ``None``."""
    side = math.isqrt(max(rows - 1, 0))
    return side if side > 0 and side * side == rows - 1 else None


def _image_size_from_checkpoint(cfg, raw: Optional[dict], source: TensorSource, mapping: dict, origin: str) -> None:
    """A ``config.json`` without ``image_size`` (and without ``force_image_size``): take it from the checkpoint's
    position table (its grid times ``patch_size``: read off the shape, nothing allocated), else keep the
    default and warn."""
    if raw is None or raw.get("force_image_size"):
        return
    vision_raw = raw.get("vision_config") if isinstance(raw.get("vision_config"), dict) else raw
    if "image_size" in vision_raw:
        return
    vision = cfg.vision_config if isinstance(cfg, InternVLConfig) else cfg
    table = next((ck for ck, k in mapping.items() if k.endswith("embeddings.position_embedding")), None)
    shape = source.shape(table) if table is not None else ()
    side = _grid_of(shape[1]) if len(shape) == 3 else None
    if side is None or side * vision.patch_size == vision.image_size:
        if side is None:
            logger.warning("%s: config.json has no image_size and the checkpoint's position table does not give "
                           "one: using the default %d", origin, vision.image_size)
        return
    vision.image_size = side * vision.patch_size
    check_sizes(vision)
    vision.check_grid()


#: marks the log record of a resized position table (convert_checkpoint refuses the resize instead of warning)
_RESIZED = "internvit_position_table_resized"


class _WithoutResizeWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not getattr(record, _RESIZED, False)


def load_model(
    source: SourceLike,
    config: ConfigLike = None,
    *,
    dtype: Union[str, torch.dtype, None] = torch.float32,
    device: str | torch.device = "cpu",
    freeze: bool = False,
    mmap: bool = False,
) -> nn.Module:
    """Load an InternViT or InternVL model.

    ``source`` is a Hugging Face directory (``config.json`` + single / sharded safetensors or
    ``pytorch_model.bin``), a single weight file in either key family (``config`` then gives the
    architecture: a preset name, dict or ``config.json`` path; inferred from the shapes when omitted), or a
    preset name (random weights). A checkpoint that does not match raises :class:`CheckpointError` naming
    the missing, unexpected and mis-shaped keys; known extra heads are logged, not fatal. A weight file
    holding a text tower (``internvl_c_13b_224px.pth``, InternVL-14B weights) gives an InternVL model.
    ``dtype``: a floating dtype or its name as the FeatureExtractor spells it (``'bf16'``, ``'fp32'``, ...; see
    :func:`model_dtype`: ``TypeError`` for an integer, bool, complex or float8 dtype, ``ValueError`` for an
    unknown name). ``dtype=None`` gives the model one dtype read from the checkpoint: the config's
    ``torch_dtype`` when the checkpoint holds it, else the floating dtype of most of its weights (a checkpoint
    that mixes floating dtypes is cast to it, with a warning). A preset's random weights are drawn with
    :func:`preset_seed` of its canonical name (the same in every process and for every accepted spelling; the
    global RNG is left untouched), and ``name_or_path`` is that canonical name.

    A ``config.json`` without ``image_size`` takes it from the checkpoint's position table. A position table whose
    grid differs from the config's is resized (bicubic) to the config's grid, with a warning naming both grids;
    a config whose grid is not a whole number of patches or too large (``InternViTConfig.check_grid``) is a
    ``ValueError`` naming its ``config.json``.

    ``mmap=False`` (default) copies every weight into the model's own memory: the files may change or go away
    afterwards. ``mmap=True`` makes the weights that need no cast or move views of private (copy-on-write)
    memory maps of the files, as ``safetensors.torch.load_file`` does: no copy, pages read when first used,
    shared with the page cache across processes; the files must then not be modified in place while the model
    lives (replacing or deleting them is safe).

    ``freeze`` and ``mmap`` must be bools (``'no'`` is a ``TypeError``, not a truthy string) and ``device``
    usable here (``cpu``, ``cuda[:N]``, ``mps``, ``xpu[:N]``; else a ``ValueError`` naming it), checked before
    anything is read.
    """
    from .cli import check_device, check_flag

    src = os.fspath(source) if isinstance(source, os.PathLike) else source
    if not isinstance(src, str):
        raise TypeError(f"source must be a path or preset name, got {type(source).__name__}")
    dtype = model_dtype(dtype)
    check_flag("freeze", freeze)  # 'no' is truthy: it would freeze / memory-map
    check_flag("mmap", mmap)
    check_device(device)  # 'meta' loaded no weights, silently; 'cuda' without CUDA failed inside torch
    if not os.path.exists(src):
        if is_preset(src):
            model = build_model(config if config is not None else src, device=device,
                                dtype=dtype or torch.float32, seed=preset_seed(src))
            model.load_report = LoadReport(family="random-init")
            model.name_or_path = _canon(src)
            return model.freeze() if freeze else model
        raise FileNotFoundError(f"{src}: no such file or directory, and not a preset name")

    if os.path.isdir(src):
        cfg_path = os.path.join(src, "config.json")
        if config is None:
            if os.path.lexists(cfg_path) and not os.path.isfile(cfg_path):
                reason = not_a_file_reason(cfg_path, "config file")
                raise CheckpointError(f"{src}: config.json is {reason} (pass config=)")
            if not os.path.isfile(cfg_path):
                raise CheckpointError(f"{src}: directory has no config.json (pass config=)")
            config = cfg_path  # get_config reads it and names it in every error
    elif not src.endswith(WEIGHT_SUFFIXES):
        raise CheckpointError(f"{src}: unknown weight file type (expected {', '.join(WEIGHT_SUFFIXES)})")

    tensors = open_weights(src, mmap=mmap)
    raw = _raw_config(config)
    try:
        cfg = get_config(config) if config is not None else infer_config(tensors)
        cls = _model_class(cfg)
        mapping, family, ignored = cls.checkpoint_key_map(tensors.keys())
    except CheckpointError as e:  # every message names the file
        raise (e if src in str(e) else CheckpointError(f"{src}: {e}")) from None
    cfg_origin = os.path.join(config, "config.json") if isinstance(config, (str, os.PathLike)) \
        and os.path.isdir(config) else config if isinstance(config, (str, os.PathLike)) else src
    _image_size_from_checkpoint(cfg, raw, tensors, mapping, os.fspath(cfg_origin))
    with torch.device("meta"):
        model = cls(cfg)
    pos_keys = [k for k in model.state_dict() if k.endswith("embeddings.position_embedding")]
    source = tensors.rekey(mapping)
    if dtype is None:
        dtype = _checkpoint_dtype(source, _config_torch_dtype(raw), src)
    resized = load_into(model, source, dtype=dtype, device=device,
                        resizers={k: _pos_embed_resizer(model, k) for k in pos_keys}, origin=src)
    materialize_meta(model, device)
    grids = {k: (_grid_of(source.shape(k)[1]), _grid_of(model.state_dict()[k].shape[1])) for k in resized}
    report = LoadReport(family=family, ignored=ignored, resized=resized, files=tensors.files, grids=grids)
    model.load_report = report
    model.name_or_path = src
    for k, (old, new) in grids.items():
        vision = cfg.vision_config if isinstance(cfg, InternVLConfig) else cfg
        logger.warning("%s: the checkpoint's position table (%s) is a %d x %d grid, the config's (image_size %d / "
                       "patch_size %d) a %d x %d grid: resized (bicubic) to the config's", src, k, old, old,
                       vision.image_size, vision.patch_size, new, new, extra={_RESIZED: True})
    if ignored:
        logger.info("%s: %s", src, report.summary())
    model.eval()
    return model.freeze() if freeze else model


#: what :func:`save_model` writes (besides the model's ``extra_files``): the only entries it replaces
MODEL_FILE_PATTERNS = ("config.json", "model.safetensors", "model.safetensors.index.json",
                       "model-[0-9]*-of-[0-9]*.safetensors")


def _check_model_destination(directory: str, overwrite: bool, own: Sequence[str]) -> None:
    """Refuse to replace a folder that is not empty unless ``overwrite``, and, even then, one that holds
    anything :func:`save_model` does not write (the whole folder is replaced: those files would be lost), and a
    symbolic link (the swap would replace the link, not the folder it points to)."""
    if os.path.islink(os.path.normpath(directory)):  # normpath: 'link/' names the link too
        raise FileExistsError(f"{directory}: a symbolic link (to {os.path.realpath(directory)}): save to the folder "
                              f"itself")
    if not os.path.isdir(directory) or not os.listdir(directory):
        return
    if not overwrite:
        raise FileExistsError(f"{directory}: already exists and is not empty (pass overwrite=True to replace "
                              f"the model in it)")
    patterns = (*MODEL_FILE_PATTERNS, *own)
    foreign = sorted(n for n in os.listdir(directory) if not os.path.isfile(os.path.join(directory, n))
                     or not any(fnmatch.fnmatchcase(n, p) for p in patterns))
    if foreign:
        shown = ", ".join(foreign[:5]) + (f", ... ({len(foreign)} in all)" if len(foreign) > 5 else "")
        raise FileExistsError(f"{directory}: holds entries that saving a model does not write ({shown}); the "
                              f"whole folder would be replaced and they would be lost: save to another folder "
                              f"or move them out first")


def save_model(model: nn.Module, directory: SourceLike, *, max_shard_bytes: int = 5 * 1024**3,
               dtype: Optional[torch.dtype] = None, overwrite: bool = False) -> str:
    """Write an HF-style directory (``config.json`` + safetensors, sharded past ``max_shard_bytes``).

    Built in a temporary folder next to ``directory`` and swapped in with
    :func:`internvit.store.replace_folder`: a kill at any point leaves the complete old model or the complete
    new one, never neither, never a mix. Returns the directory.

    ``directory`` must be new or empty, or, with ``overwrite=True``, hold only what saving a model writes
    (:data:`MODEL_FILE_PATTERNS` and the names of the model's ``extra_files``, which are copied in): the whole
    folder is replaced, so any other file in it is refused rather than deleted. Raises ``FileExistsError``
    for those, :class:`~internvit.store.StoreError` when ``directory`` is a file, and
    :class:`~internvit.store.StoreBusyError` if another process is replacing the same directory.
    """
    directory = os.fspath(directory)
    if not directory:
        raise ValueError("directory: empty path")
    own = [os.path.basename(e) for e in getattr(model, "extra_files", ())]
    _check_model_destination(directory, overwrite, own)
    with replace_folder(directory, description="model directory") as tmp:
        sd = model.state_dict()
        itemsize = torch.empty((), dtype=dtype).element_size() if dtype is not None else None

        def nbytes(v: torch.Tensor) -> int:
            return v.numel() * (itemsize if itemsize and v.is_floating_point() else v.element_size())

        shards, cur, size = [], [], 0  # plan by key; tensors are moved/cast one shard at a time
        for k, v in sd.items():
            if cur and size + nbytes(v) > max_shard_bytes:
                shards.append(cur)
                cur, size = [], 0
            cur.append(k)
            size += nbytes(v)
        shards.append(cur)

        def materialise(names: list[str]) -> dict:
            return {k: (sd[k].to(dtype) if dtype is not None and sd[k].is_floating_point() else sd[k])
                    .detach().cpu().contiguous() for k in names}

        if len(shards) == 1:
            save_safetensors(materialise(shards[0]), os.path.join(tmp, "model.safetensors"), {"format": "pt"})
        else:
            weight_map = {}
            for i, names in enumerate(shards, 1):
                name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
                save_safetensors(materialise(names), os.path.join(tmp, name), {"format": "pt"})
                weight_map.update({k: name for k in names})
            total = sum(nbytes(v) for v in sd.values())
            with open(os.path.join(tmp, "model.safetensors.index.json"), "w", encoding="utf-8") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(model.config.to_dict(), f, indent=2)
        for extra in getattr(model, "extra_files", ()):  # e.g. a tokenizer next to an InternVL model
            shutil.copy(extra, tmp)
    return directory


def convert_checkpoint(src: SourceLike, dst: SourceLike, *, to: str = "hf", config: ConfigLike = None,
                       overwrite: bool = False) -> str:
    """Convert a vision checkpoint between key families.

    ``to='hf'`` writes a Hugging Face directory (``config.json`` + safetensors, :func:`save_model`);
    ``to='original'`` writes the original InternVL family (``cls_token``, ``blocks.N.*``, ``ls1.gamma``) as
    ``{'module': state_dict}`` to a ``.pth`` file (or a flat ``.safetensors`` file); a ``dst`` without a
    weight-file suffix is a ``ValueError``, and a weight holding NaN / inf a :class:`CheckpointError` naming it,
    as is a ``config`` whose grid differs from the checkpoint's position table (converting would resample the
    table; the conversion renames keys and keeps every weight as stored). Written atomically. An existing
    ``dst`` is replaced only with ``overwrite=True`` (else ``FileExistsError``).
    """
    from .checkpoints import WEIGHT_SUFFIXES, hf_to_original_key, strip_module_prefix

    if to not in ("hf", "original"):
        raise ValueError(f"to must be 'hf' or 'original', got {to!r}")
    if to == "original" and not os.fspath(dst).lower().endswith(WEIGHT_SUFFIXES):  # load_model reads the suffix
        raise ValueError(f"{os.fspath(dst)}: the destination needs a weight-file suffix "
                         f"({', '.join(WEIGHT_SUFFIXES)}), or it cannot be loaded back")
    quiet = _WithoutResizeWarning()  # a resize is refused below: its warning would precede the error line
    logger.addFilter(quiet)
    try:
        model = load_model(src, config, dtype=None)  # keep the stored dtype (16-bit releases stay 16-bit)
    finally:
        logger.removeFilter(quiet)
    if not isinstance(model, InternViT):
        raise CheckpointError(f"{src}: only vision (InternViT) checkpoints can be converted between families")
    for old, new in model.load_report.grids.values():  # a conversion renames keys: it never resamples weights
        raise CheckpointError(f"{src}: the checkpoint's position table is a {old} x {old} grid, the config's "
                              f"image_size {model.config.image_size} asks for {new} x {new}: converting would "
                              f"resample it and nothing was written; pass a --config (config=) whose image_size is "
                              f"{old * model.config.patch_size}")
    for name, t in model.state_dict().items():  # a converted copy must not carry a damaged weight on silently
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{src}: {name} holds NaN or infinite values (a damaged or diverged "
                                  f"checkpoint); nothing was written")
    if to == "hf":  # an HF InternVisionModel directory has no place for extra heads: they are reported
        if model.load_report.ignored:
            logger.warning("%s: not carried into the HF directory: %s", src, model.load_report.summary())
        return save_model(model, dst, overwrite=overwrite)
    dst = os.fspath(dst)
    if os.path.lexists(dst) and not overwrite:
        raise FileExistsError(f"{dst}: already exists (pass overwrite=True to replace it)")
    sd = {hf_to_original_key(k): v.contiguous() for k, v in model.state_dict().items()}
    # known heads next to the ViT (e.g. clip_projector.* in intern_vit_6b_224px.pth) keep their names
    extras = strip_module_prefix(model.load_report.ignored)
    if extras:
        source = open_weights(src)
        sd.update({name: source[key].contiguous() for key, name in extras.items()})
    with atomic_write(dst) as tmp:
        if dst.endswith(".safetensors"):
            save_safetensors(sd, tmp, {"format": "pt"})
        else:
            torch.save({"module": sd}, tmp)
    return dst
