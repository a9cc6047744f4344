"""Edges of model loading (trial 8a): which weights a folder gives, one dtype per model, config bounds, vetting of
every pickle torch may read, key prefixes, preset seeds, resized position tables, QLLaMA fields, pixel / model
dtypes and broken links. Tiny fixtures only."""
from __future__ import annotations

import io
import json
import logging
import os
import pickle
import shutil
import zipfile

import pytest
import torch
from safetensors.torch import load_file, save_file

import internvit
from internvit import checkpoints as ck
from internvit.checkpoints import CheckpointError, pickled_globals, safe_torch_load
from internvit.config import get_config
from internvit.factory import convert_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CLS = "embeddings.class_embedding"


def _folder(path, fx: str, config: dict | None = None, weights: dict | None = None) -> str:
    """A model folder: ``fx``'s config.json (or ``config``) and model.safetensors (or ``weights``)."""
    os.makedirs(path)
    if config is None:
        shutil.copy(os.path.join(fx, "config.json"), path)
    else:
        with open(os.path.join(path, "config.json"), "w") as f:
            json.dump(config, f)
    if weights is None:
        shutil.copy(os.path.join(fx, "model.safetensors"), path)
    else:
        save_file(weights, os.path.join(path, "model.safetensors"))
    return str(path)


def _config(fx: str, **changes) -> dict:
    with open(os.path.join(fx, "config.json")) as f:
        return dict(json.load(f), **changes)


# ---- F1: transformers' order of weight sets; a warning names the set not read --------------------------------
@pytest.mark.parametrize("other", ["pytorch_model.bin.index.json", "model.safetensors.index.json"])
def test_model_safetensors_wins_over_another_set(vit_fixture, tmp_path, caplog, other):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    d = _folder(tmp_path / "m", vit_fixture)
    stale = {k: v * 0.5 for k, v in sd.items()}
    shard = "pytorch_model-00001-of-00001.bin" if other.startswith("pytorch") else "model-00001-of-00001.safetensors"
    torch.save(stale, os.path.join(d, shard)) if shard.endswith(".bin") else save_file(stale, os.path.join(d, shard))
    with open(os.path.join(d, other), "w") as f:
        json.dump({"weight_map": {k: shard for k in stale}}, f)
    with caplog.at_level(logging.WARNING, logger="internvit"):
        m = internvit.load_model(d)
    assert [os.path.basename(f) for f in m.load_report.files] == ["model.safetensors"]
    assert torch.equal(m.embeddings.class_embedding, sd[CLS])
    assert any(other in r.getMessage() and "model.safetensors" in r.getMessage() for r in caplog.records)


def test_safetensors_index_wins_over_a_single_bin(vit_fixture, tmp_path):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(os.path.join(vit_fixture, "config.json"), d)
    save_file(sd, str(d / "model-00001-of-00001.safetensors"))
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {k: "model-00001-of-00001.safetensors"
                                                                               for k in sd}}))
    torch.save({k: v * 0.5 for k, v in sd.items()}, str(d / "pytorch_model.bin"))
    m = internvit.load_model(str(d))
    assert [os.path.basename(f) for f in m.load_report.files] == ["model-00001-of-00001.safetensors"]


# ---- F12: a dangling link is named as such --------------------------------------------------------------------
def test_dangling_weight_link_is_named(vit_fixture, tmp_path):
    d = tmp_path / "dang"
    d.mkdir()
    shutil.copy(os.path.join(vit_fixture, "config.json"), d)
    os.symlink("../blobs/abc123", d / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"dang/model\.safetensors: a broken symbolic link \(to \.\./blobs/ab"):
        internvit.load_model(str(d))
