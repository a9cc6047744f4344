"""Model configurations in the Hugging Face vocabulary, and named presets for every released model.

A config is plain data: it can be built from a preset name, a dict (e.g. a parsed ``config.json``, extra
keys ignored) or a path to a ``config.json``, and written back as ``config.json``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import math
import numbers
import os
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

ConfigLike = Union[str, os.PathLike, Mapping[str, Any], "InternViTConfig", "InternVLConfig", None]


def _from_fields(cls, data: Mapping[str, Any]):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: copy.deepcopy(v) for k, v in data.items() if k in names})


#: upper bounds for the integer sizes of a config, far above every released model (InternViT-6B: width 3200,
#: 48 layers; QLLaMA: width 4096, 32 layers): a config.json is input from outside, and one that asks for ten
#: million layers or a million-pixel position grid must be refused at once, not built (hours, terabytes)
SIZE_LIMITS = {"hidden_size": 65536, "intermediate_size": 1 << 20, "num_hidden_layers": 1024,
               "num_attention_heads": 4096, "patch_size": 4096, "image_size": 16384, "num_channels": 64,
               "vocab_size": 1 << 22, "max_position_embeddings": 1 << 20, "cross_attention_frequency": 1024,
               "vision_hidden_size": 65536, "num_query_token": 65536, "clip_embed_dim": 65536,
               "attn_pool_num_heads": 4096, "max_txt_len": 1 << 20}
_MAY_BE_ZERO = ("num_query_token",)  # InternVL-C has no query tokens
#: bound on the position table a config asks for, ``(image_size / patch_size)² * hidden_size`` elements (1 GiB in
#: fp32): the per-field limits alone allow a 16384 x 16384 grid, which loading a checkpoint's table would allocate
#: (resized to the config's grid). The released 6B at 448 px needs 32² * 3200 ≈ 3.3 M.
MAX_POSITION_TABLE = 1 << 28


#: the float fields' allowed ranges ``(low, high, low_inclusive)``; every float field must be a finite number
FLOAT_RANGES = {"layer_norm_eps": (0.0, 1.0, False), "rms_norm_eps": (0.0, 1.0, False),
                "drop_path_rate": (0.0, 1.0, True), "rope_theta": (0.0, math.inf, False)}


def check_mean_std(key: str, value: Any) -> None:
    """Raise ``ValueError`` unless ``value`` is 3 finite numbers (``key`` ``'std'`` or ending in ``_std``: > 0)."""
    std = key.endswith("std")
    ok = isinstance(value, (list, tuple)) and len(value) == 3 and all(
        isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) for x in value)
    if not ok or (std and min(value) <= 0):
        raise ValueError(f"{key} must be 3 finite numbers{' > 0' if std else ''}, got {value!r}")


def check_sizes(config) -> None:
    """Raise ``ValueError`` naming the field unless every integer size field of ``config`` (a dataclass) is an
    integer from 1 (``num_query_token``: 0) to its :data:`SIZE_LIMITS` bound, and every float field is a finite
    number (within :data:`FLOAT_RANGES` where listed: a NaN ``layer_norm_eps`` made every feature NaN)."""
    for f in dataclasses.fields(config):
        if f.type in (float, "float"):
            v = getattr(config, f.name)
            low, high, inclusive = FLOAT_RANGES.get(f.name, (-math.inf, math.inf, True))
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not (low <= v if inclusive else low < v) or not v < high:
                bound = f" in {'[' if inclusive else '('}{low}, {high})" if f.name in FLOAT_RANGES else ""
                raise ValueError(f"config: {f.name} must be a finite number{bound}, got {v!r}")
    for f in dataclasses.fields(config):
        limit = SIZE_LIMITS.get(f.name)
        if limit is None:
            continue
        v, low = getattr(config, f.name), 0 if f.name in _MAY_BE_ZERO else 1
        if type(v) is not int or not low <= v <= limit:
            raise ValueError(f"config: {f.name} must be an integer from {low} to {limit}, got {v!r}")


@dataclass
class InternViTConfig:
    """Architecture of one InternViT (field names as in the HF ``config.json``, ``model_type: intern_vit_6b``)."""

    hidden_size: int = 3200
    num_attention_heads: int = 25
    intermediate_size: int = 12800
    num_hidden_layers: int = 48
    patch_size: int = 14
    image_size: int = 224
    num_channels: int = 3
    qkv_bias: bool = False
    qk_normalization: bool = True
    norm_type: str = "rms_norm"  # 'rms_norm' | 'layer_norm'
    layer_norm_eps: float = 1e-6
    initializer_factor: float = 0.1  # LayerScale init (only matters for random init)
    initializer_range: float = 0.02
    drop_path_rate: float = 0.0
    hidden_act: str = "gelu"
    # preprocessing defaults (bicubic resize of the short side, centre crop, ImageNet statistics)
    image_mean: tuple = IMAGENET_MEAN
    image_std: tuple = IMAGENET_STD
    interpolation: str = "bicubic"

    model_type = "intern_vit_6b"

    def __post_init__(self) -> None:
        if self.norm_type in ("rms", "rmsnorm"):
            self.norm_type = "rms_norm"
        elif self.norm_type in ("ln", "layernorm"):
            self.norm_type = "layer_norm"
        if self.norm_type not in ("rms_norm", "layer_norm"):
            raise ValueError(f"config: norm_type must be 'rms_norm' or 'layer_norm', got {self.norm_type!r}")
        check_sizes(self)
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"config: hidden_size {self.hidden_size} is not divisible by "
                f"num_attention_heads {self.num_attention_heads}"
            )
        if self.hidden_act != "gelu":
            raise ValueError(f"config: only hidden_act='gelu' is supported, got {self.hidden_act!r}")
        self.check_grid()
        check_mean_std("config: image_mean", self.image_mean)  # a zero std only failed when a transform was built
        check_mean_std("config: image_std", self.image_std)
        self.image_mean = tuple(self.image_mean)
        self.image_std = tuple(self.image_std)

    def check_grid(self) -> None:
        """Raise ``ValueError`` naming the fields when ``image_size`` is not a multiple of ``patch_size`` or the
        position table the grid needs exceeds :data:`MAX_POSITION_TABLE` elements."""
        if self.image_size % self.patch_size:
            fit = self.image_size // self.patch_size * self.patch_size
            raise ValueError(f"config: image_size {self.image_size} is not a multiple of patch_size {self.patch_size} "
                             f"(the patch embedding would drop the last {self.image_size - fit} pixel rows and "
                             f"columns){f'; e.g. {fit}' if fit else ''}")
        elements = self.grid_size ** 2 * self.hidden_size
        if elements > MAX_POSITION_TABLE:
            raise ValueError(f"config: image_size {self.image_size} / patch_size {self.patch_size} gives a "
                             f"{self.grid_size} x {self.grid_size} position grid of hidden_size {self.hidden_size}: "
                             f"{elements} elements, over the limit of {MAX_POSITION_TABLE} (1 GiB in fp32)")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InternViTConfig":
        data = dict(data)
        if "vision_config" in data:  # a composite (InternVL / chat) config
            data = dict(data["vision_config"])
        return _from_fields(cls, data)

    def to_dict(self) -> dict:
        out = dataclasses.asdict(self)
        out["image_mean"], out["image_std"] = list(self.image_mean), list(self.image_std)
        out["model_type"] = self.model_type
        out["architectures"] = ["InternVisionModel"]
        return out


def check_qllama_fields(data: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` naming the field when a ``qllama_config`` (a ``transformers`` LlamaConfig) asks for
    what the QLLaMA text tower does not implement: ``rope_scaling`` other than null, ``hidden_act`` other than
    ``silu``, grouped-query attention (``num_key_value_heads`` other than ``num_attention_heads``), biases
    (``attention_bias`` / ``mlp_bias`` true) or a ``head_dim`` other than ``hidden_size / num_attention_heads``.
    Absent or null fields take the released values (InternVL-14B: ``rope_scaling: null``, ``hidden_act: silu``)."""
    def refuse(name: str, want: str) -> None:
        raise ValueError(f"config: qllama_config.{name} {data[name]!r} is not supported (only {want})")

    if data.get("rope_scaling") is not None:
        refuse("rope_scaling", "null: plain rotary embeddings")
    if data.get("hidden_act", "silu") not in ("silu", None):
        refuse("hidden_act", "'silu'")
    for name in ("attention_bias", "mlp_bias"):
        if data.get(name) not in (False, None):
            refuse(name, "false")
    heads = data.get("num_attention_heads", QLLaMAConfig.num_attention_heads)
    if data.get("num_key_value_heads") not in (None, heads):
        refuse("num_key_value_heads", f"num_attention_heads, {heads!r}: no grouped-query attention")
    width = data.get("hidden_size", QLLaMAConfig.hidden_size)
    per_head = width // heads if isinstance(width, int) and isinstance(heads, int) and heads > 0 else None
    if data.get("head_dim") not in (None, per_head):
        refuse("head_dim", f"hidden_size / num_attention_heads, {per_head!r}")


@dataclass
class QLLaMAConfig:
    """The QLLaMA text/query decoder of InternVL-C/G (LLaMA with query cross-attention)."""

    vocab_size: int = 49954
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    cross_attention_frequency: int = 2
    vision_hidden_size: int = 3200
    num_query_token: int = 96
    pad_token_id: int = 0
    bos_token_id: int = 1
    eos_token_id: int = 2

    def __post_init__(self) -> None:
        check_sizes(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "QLLaMAConfig":
        """Raises ``ValueError`` naming the field for a value of a LLaMA config field that this text tower does
        not implement (:func:`check_qllama_fields`); other unknown keys are ignored."""
        check_qllama_fields(data)
        return _from_fields(cls, data)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"model_type": "llama"}


@dataclass
class InternVLConfig:
    """InternVL-C / InternVL-G (``model_type: internvl``): an InternViT, QLLaMA and two attention-pooling projectors."""

    vision_config: InternViTConfig = field(default_factory=InternViTConfig)
    qllama_config: QLLaMAConfig = field(default_factory=QLLaMAConfig)
    clip_embed_dim: int = 768
    attn_pool_num_heads: int = 16
    num_query_token: int = 96
    force_image_size: int | None = None
    max_txt_len: int = 80

    model_type = "internvl"

    def __post_init__(self) -> None:
        if isinstance(self.vision_config, Mapping):
            self.vision_config = InternViTConfig.from_dict(self.vision_config)
        if isinstance(self.qllama_config, Mapping):
            q = dict(self.qllama_config)
            q.setdefault("vision_hidden_size", self.vision_config.hidden_size)
            q.setdefault("num_query_token", self.num_query_token)
            self.qllama_config = QLLaMAConfig.from_dict(q)
        if self.force_image_size:
            self.vision_config.image_size = int(self.force_image_size)
            check_sizes(self.vision_config)
            self.vision_config.check_grid()
        check_sizes(self)

    @property
    def image_size(self) -> int:
        return self.vision_config.image_size

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "InternVLConfig":
        return _from_fields(cls, data)

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["vision_config"] = self.vision_config.to_dict()
        out["qllama_config"] = self.qllama_config.to_dict()
        out["model_type"] = self.model_type
        out["architectures"] = ["InternVLModel"]
        return out


_6B = dict(hidden_size=3200, num_attention_heads=25, intermediate_size=12800, qkv_bias=False,
           qk_normalization=True, norm_type="rms_norm", initializer_factor=0.1)
_300M = dict(hidden_size=1024, num_attention_heads=16, intermediate_size=4096, num_hidden_layers=24,
             qkv_bias=True, qk_normalization=False, norm_type="layer_norm", initializer_factor=1.0,
             image_size=448)

#: Named presets. Keys are lower-case; lookup ignores case and treats '_' like '-'.
VISION_PRESETS: dict[str, dict] = {
    "internvit-6b-224px": dict(_6B, num_hidden_layers=48, image_size=224),
    "internvit-6b-448px-v1-0": dict(_6B, num_hidden_layers=45, image_size=448),
    "internvit-6b-448px-v1-2": dict(_6B, num_hidden_layers=45, image_size=448),
    "internvit-6b-448px-v1-5": dict(_6B, num_hidden_layers=45, image_size=448),
    "internvit-6b-448px-v2-5": dict(_6B, num_hidden_layers=45, image_size=448),
    "internvit-300m-448px": dict(_300M),
    "internvit-300m-448px-v2-5": dict(_300M),
    # tiny presets (tests, demos): the real architectures at toy widths
    "internvit-6b-tiny": dict(_6B, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                              num_hidden_layers=3, image_size=56),
    "internvit-300m-tiny": dict(_300M, hidden_size=64, num_attention_heads=4, intermediate_size=256,
                                num_hidden_layers=3, image_size=56),
}

INTERNVL_PRESETS: dict[str, dict] = {
    "internvl-14b-224px": dict(vision_config=VISION_PRESETS["internvit-6b-224px"], qllama_config={}),
    # the PyTorch InternVL-C release (internvl_c_13b_224px.pth): plain LLaMA text tower, no query tokens
    "internvl-c-13b-224px": dict(vision_config=VISION_PRESETS["internvit-6b-224px"],
                                 qllama_config=dict(num_query_token=0), num_query_token=0),
    "internvl-tiny": dict(
        vision_config=VISION_PRESETS["internvit-6b-tiny"],
        qllama_config=dict(vocab_size=49954, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                           num_attention_heads=4, num_query_token=8, vision_hidden_size=64),
        clip_embed_dim=32, attn_pool_num_heads=4, num_query_token=8),
}


def _canon(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def list_presets() -> list[str]:
    """Names accepted wherever a preset is expected."""
    return sorted(VISION_PRESETS) + sorted(INTERNVL_PRESETS)


def is_preset(name: Any) -> bool:
    return isinstance(name, str) and _canon(name) in (VISION_PRESETS.keys() | INTERNVL_PRESETS.keys())


def read_config_json(path: str | os.PathLike) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def get_config(config: ConfigLike) -> InternViTConfig | InternVLConfig:
    """Resolve a preset name, dict, ``config.json`` path (or directory holding one) or config object."""
    if isinstance(config, (InternViTConfig, InternVLConfig)):
        return copy.deepcopy(config)
    if isinstance(config, (str, os.PathLike)):
        s = str(config)
        if is_preset(s):
            key = _canon(s)
            if key in VISION_PRESETS:
                return InternViTConfig(**VISION_PRESETS[key])
            return InternVLConfig(**copy.deepcopy(INTERNVL_PRESETS[key]))
        path = os.path.join(s, "config.json") if os.path.isdir(s) else s
        if not os.path.isfile(path):
            raise ValueError(
                f"config {s!r} is neither a preset ({', '.join(list_presets())}) nor an existing config.json"
            )
        try:
            return _from_mapping(read_config_json(path))
        except (ValueError, TypeError) as e:  # name the file (read_config_json's own messages already do)
            raise ValueError(e if path in str(e) else f"{path}: {e}") from None
    if isinstance(config, Mapping):
        return _from_mapping(config)
    raise TypeError(f"config must be a preset name, dict, path or config object, got {type(config).__name__}")


#: the ``model_type`` of the configs this package reads (InternViT, InternVL-C/G, InternVL-Chat's vision part)
MODEL_TYPES = ("intern_vit_6b", "internvl", "internvl_chat")


def _from_mapping(config: Mapping) -> InternViTConfig | InternVLConfig:
    model_type = config.get("model_type")
    if model_type is not None and model_type not in MODEL_TYPES:
        raise ValueError(f"config: model_type {model_type!r} is not one this package reads "
                         f"({', '.join(MODEL_TYPES)}): not an InternViT / InternVL config")
    if config.get("model_type") == "internvl" or "qllama_config" in config:
        return InternVLConfig.from_dict(config)
    return InternViTConfig.from_dict(config)
