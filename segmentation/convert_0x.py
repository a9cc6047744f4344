"""Released InternVL mmseg 0.x segmentor checkpoints → mmengine checkpoints for our mmseg 1.x models.

The released files are flat state dicts (``backbone.*``, ``decode_head.*``, ``auxiliary_head.*``; possibly
wrapped in ``module`` / ``state_dict``) whose backbone uses the original InternViT key family (``cls_token``,
``pos_embed``, ``blocks.N.*``, ``ls1.gamma``). Backbone keys go through :mod:`internvit.checkpoints`'s rename
table; the pyramid (``backbone.up1…up4``) keeps its names; mmseg's ``FCNHead`` / ``UPerHead`` parameter names
did not change between 0.x and 1.x, so head keys are kept as they are.
"""
from __future__ import annotations

import os
import warnings
from typing import Optional, Union

import torch

from internvit.checkpoints import CheckpointError, torch_load_weights, unwrap_state_dict, vision_key_map
from internvit.file_reads import require_file
from internvit.fileio import atomic_write

HEAD_PREFIXES = ("decode_head.", "auxiliary_head.")


def convert_mmseg0x_state_dict(state_dict: dict, dropped: Optional[list] = None) -> dict:
    """Rename a 0.x segmentor state dict to our mmseg 1.x segmentor's names (see the module docstring).

    Backbone keys the segmentor has no place for (the classification ``head``, a final ``norm``, ...) are left
    out; their names are appended to ``dropped`` when a list is given."""
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in state_dict.items()}
    backbone_keys = [k for k in sd if k.startswith("backbone.")]
    if not backbone_keys:
        raise CheckpointError(f"no backbone.* keys: not an mmseg segmentor checkpoint (first keys: "
                              f"{', '.join(list(sd)[:5])})")
    mapping, _, ignored = vision_key_map(backbone_keys, prefix="backbone.")
    out = {mapping[k]: sd[k] for k in backbone_keys if k in mapping}
    if dropped is not None:
        dropped.extend(k for k in sd if k.startswith("backbone.") and k not in mapping)
    for k, v in sd.items():
        if k.startswith(HEAD_PREFIXES):
            out[k] = v
        elif not k.startswith("backbone.") and k not in ignored:
            out[k] = v  # anything else is kept; the segmentor's strict load reports it
    return out


def convert_mmseg0x(src: Union[str, os.PathLike], dst: Union[str, os.PathLike]) -> str:
    """Read a released mmseg 0.x segmentor checkpoint (``weights_only=True``) and write an mmengine checkpoint
    ``{'meta': ..., 'state_dict': ...}`` to ``dst`` atomically. Returns ``dst``.

    The result loads with ``mmengine.runner.load_checkpoint`` / ``tools/test.py`` into the matching config
    (``InternViTBackbone`` + ``InternViTFCNHead`` / ``UPerHead``). Backbone keys it leaves out are named in a
    ``UserWarning``.
    """
    src, dst = os.fspath(src), os.fspath(dst)
    require_file(src, "checkpoint file")
    sd = unwrap_state_dict(torch_load_weights(src), src)
    dropped: list = []
    out = convert_mmseg0x_state_dict(sd, dropped)
    if dropped:
        warnings.warn(f"{src}: left out {len(dropped)} backbone keys the mmseg 1.x segmentor does not use: "
                      f"{', '.join(dropped[:6])}{' ...' if len(dropped) > 6 else ''}", stacklevel=2)
    ckpt = {"meta": {"converted_from": os.path.basename(src), "source_format": "mmseg 0.x (InternVL release)",
                     "converter": "segmentation.convert_0x.convert_mmseg0x"},
            "state_dict": {k: v.contiguous() if isinstance(v, torch.Tensor) else v for k, v in out.items()}}
    with atomic_write(dst) as tmp:
        torch.save(ckpt, tmp)
    return dst
