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
    # a dangling config.json (a Hugging Face cache folder whose blob is gone) read "directory has no config.json"
    c = tmp_path / "dangcfg"
    c.mkdir()
    shutil.copy(os.path.join(vit_fixture, "model.safetensors"), c)
    os.symlink("../blobs/cfg999", c / "config.json")
    with pytest.raises(CheckpointError, match=r"dangcfg: config\.json is a broken symbolic link \(to \.\./blobs/cf"):
        internvit.load_model(str(c))
    # and every other file read names a dangling link the same way (one reason function)
    from internvit.file_reads import require_file

    with pytest.raises(FileNotFoundError, match=r"a broken symbolic link \(to \.\./blobs/cfg999\)"):
        require_file(str(c / "config.json"), "config file")


# ---- F4: every pickle torch may read is vetted; torch's advice is never shown -------------------------------
def _renamed_pickle(src: bytes, dst: str, payload: bytes) -> None:
    """torch.save's archive with data.pkl stored as DATA.PKL (``payload``) next to a harmless decoy.pkl."""
    with zipfile.ZipFile(io.BytesIO(src)) as z, zipfile.ZipFile(dst, "w") as out:
        for n in z.namelist():
            if n.endswith("/data.pkl"):
                out.writestr(n[:-len("data.pkl")] + "DATA.PKL", payload)
                out.writestr(n[:-len("data.pkl")] + "decoy.pkl", pickle.dumps({"a": 1}, protocol=2))
            else:
                out.writestr(n, z.read(n))


class _Payload:
    def __reduce__(self):
        return (os.system, ("true",))


def test_an_upper_case_pkl_is_vetted_before_torch_reads_it(vit_fixture, tmp_path):
    buf = io.BytesIO()
    torch.save(torch.load(os.path.join(vit_fixture, "original_format.pth"), weights_only=True), buf)
    path = str(tmp_path / "case.pth")
    _renamed_pickle(buf.getvalue(), path, pickle.dumps(_Payload(), protocol=2))
    assert any("system" in g for g in pickled_globals(path)[0])
    with pytest.raises(CheckpointError, match=r"case\.pth: refusing to load: it references (posix|os)\.system"):
        internvit.load_model(path, "internvit-6b-tiny")


def test_a_renamed_sparse_tensor_pickle_is_refused(tmp_path):
    buf = io.BytesIO()
    torch.save({"w": torch.sparse_coo_tensor(torch.tensor([[0, 1]]), torch.tensor([1.0, 2.0]), (4,))}, buf)
    with zipfile.ZipFile(buf) as z:
        pkl = z.read(next(n for n in z.namelist() if n.endswith("/data.pkl")))
    path = str(tmp_path / "sparse_case.pth")
    _renamed_pickle(buf.getvalue(), path, pkl)
    with pytest.raises(CheckpointError, match=r"refusing to load: it references torch\._utils\._rebuild_sparse"):
        safe_torch_load(path)


def test_entries_differing_only_in_case_are_refused(tmp_path):
    path = str(tmp_path / "twice.pth")
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("archive/data.pkl", pickle.dumps({"a": 1}, protocol=2))
        z.writestr("archive/DATA.pkl", pickle.dumps({"a": 2}, protocol=2))
    with pytest.raises(CheckpointError, match=r"twice\.pth: not a torch checkpoint .*differ only in case"):
        pickled_globals(path)


def test_torch_refusal_names_the_global_not_the_advice(tmp_path):
    path = str(tmp_path / "payload.pth")
    torch.save({"x": _Payload()}, path)
    with pytest.raises(CheckpointError) as e:
        safe_torch_load(path, allowed=lambda g: True)  # past the vetting: torch's own refusal is what is shown
    assert "payload.pth" in str(e.value) and "GLOBAL" in str(e.value) and "system" in str(e.value)
    assert "weights_only" not in str(e.value) and "likely succeed" not in str(e.value)


@pytest.mark.parametrize("text", [
    # torch 2.4
    "Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely succeed, but it "
    "can result in arbitrary code execution.Do it only if you get the file from a trusted source. WeightsUnpickler "
    "error: Unsupported global: GLOBAL posix.system was not an allowed global by default.",
    # torch 2.6+ with a blocked module (no WeightsUnpickler marker)
    "Weights only load failed. In PyTorch 2.6, we changed the default value of the `weights_only` argument in "
    "`torch.load` from `False` to `True`. Re-running `torch.load` with `weights_only` set to `False` will likely "
    "succeed, but it can result in arbitrary code execution. Do it only if you got the file from a trusted source.\n\n"
    "Trying to load unsupported GLOBAL posix.system whose module posix is blocked.\n\nCheck the documentation of "
    "torch.load to learn more about types accepted by default with weights_only https://pytorch.org/docs.",
])
def test_torch_load_reason_keeps_the_reason_line(text):
    reason = ck.torch_load_reason(text)
    assert "GLOBAL posix.system" in reason and "likely succeed" not in reason and "weights_only" not in reason


def test_torch_load_reason_with_advice_only_is_a_fixed_sentence():
    advice = ("Weights only load failed. Re-running `torch.load` with `weights_only` set to `False` will likely "
              "succeed, but it can result in arbitrary code execution.")
    assert ck.torch_load_reason(advice) == ck.TORCH_REFUSAL


# ---- F5: module. stripped key by key, then vision_model. / backbone. -------------------------------------------
def test_flat_ddp_internvl_chat_keys_load(vit_fixture, tmp_path):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    flat = {"module.vision_model." + k: v for k, v in sd.items()}
    flat["module.mlp1.0.weight"] = torch.ones(4)
    torch.save(flat, str(tmp_path / "ddp_chat.pth"))
    m = internvit.load_model(str(tmp_path / "ddp_chat.pth"), "internvit-6b-tiny")
    assert torch.equal(m.embeddings.class_embedding, sd[CLS]) and m.load_report.ignored == ["module.mlp1.0.weight"]


def test_one_stray_prefixed_key_does_not_hide_the_others(vit_fixture, tmp_path):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    torch.save({**sd, "module.extra": torch.zeros(1)}, str(tmp_path / "stray.pth"))
    with pytest.raises(CheckpointError, match=r"unexpected keys: extra") as e:
        internvit.load_model(str(tmp_path / "stray.pth"), "internvit-6b-tiny")
    assert "no InternViT keys" not in str(e.value)


def test_no_internvit_keys_message_lists_no_internvit_key(tmp_path):
    torch.save({"module.vision_model.foo.weight": torch.zeros(1)}, str(tmp_path / "none.pth"))
    with pytest.raises(CheckpointError, match=r"no InternViT keys found .*module\.vision_model\.foo\.weight"):
        internvit.load_model(str(tmp_path / "none.pth"), "internvit-6b-tiny")


# ---- F3 / F13: the config's grid is bounded and a whole number of patches ---------------------------------------
def test_config_with_a_huge_position_grid_is_refused_before_anything_is_allocated(vit_fixture, tmp_path):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    sd["embeddings.patch_embedding.weight"] = sd["embeddings.patch_embedding.weight"][:, :, :1, :1].contiguous()
    sd["embeddings.position_embedding"] = sd["embeddings.position_embedding"][:, :5].contiguous()  # 2 x 2 grid
    d = _folder(tmp_path / "bomb", vit_fixture, _config(vit_fixture, patch_size=1, image_size=16384), sd)
    with pytest.raises(ValueError, match=r"bomb/config\.json: config: image_size 16384 / patch_size 1 gives a "
                                         r"16384 x 16384 position grid of hidden_size 64"):
        internvit.load_model(d)


def test_released_grids_are_within_the_bound():
    for name in ("internvit-6b-448px-v2-5", "internvit-6b-224px", "internvit-300m-448px", "internvl-14b-224px"):
        get_config(name)


def test_image_size_not_a_multiple_of_the_patch_is_refused_naming_config_json(vit_fixture, tmp_path):
    d = _folder(tmp_path / "img60", vit_fixture, _config(vit_fixture, image_size=60))
    with pytest.raises(ValueError, match=r"img60/config\.json: config: image_size 60 is not a multiple of "
                                         r"patch_size 14.*e\.g\. 56"):
        internvit.load_model(d)


# ---- F9: QLLaMA fields the text tower does not implement are refused ----------------------------------------------
@pytest.mark.parametrize("field,value", [("rope_scaling", {"type": "linear", "factor": 4.0}), ("hidden_act", "gelu"),
                                         ("num_key_value_heads", 2), ("attention_bias", True), ("mlp_bias", True),
                                         ("head_dim", 8)])
def test_unsupported_qllama_fields_are_refused(internvl_fixture, field, value):
    c = _config(internvl_fixture)
    c["qllama_config"] = dict(c["qllama_config"], **{field: value})
    with pytest.raises(ValueError, match=rf"config: qllama_config\.{field} .* is not supported"):
        get_config(c)


# ---- F10: pixels must be floating point -------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.uint8, torch.bool, torch.int64])
def test_integer_or_bool_pixels_are_a_type_error(dtype):
    m = internvit.load_model("internvit-6b-tiny")
    with pytest.raises(TypeError, match=rf"pixel_values of dtype {str(dtype)[6:]}.*build_transform"):
        m(torch.ones(1, 3, 56, 56, dtype=dtype))
    assert m(torch.ones(1, 3, 56, 56, dtype=torch.float64)).last_hidden_state.dtype == torch.float32


# ---- F2: dtype=None gives one dtype ---------------------------------------------------------------------------
def _mixed(vit_fixture, tmp_path, **config):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    mixed = {k: (v if k.endswith(("ls1", "ls2")) else v.bfloat16()) for k, v in sd.items()}
    return _folder(tmp_path / "mixed", vit_fixture, _config(vit_fixture, **config), mixed)


def test_mixed_dtype_checkpoint_loads_as_one_dtype_and_runs(vit_fixture, tmp_path, caplog):
    d = _mixed(vit_fixture, tmp_path)
    with caplog.at_level(logging.WARNING, logger="internvit"):
        m = internvit.load_model(d, dtype=None)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}  # the dtype holding most elements
    assert m(torch.randn(1, 3, 56, 56).to(m.dtype)).last_hidden_state.dtype == torch.bfloat16
    msg = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "bfloat16, float32" in msg and "loaded as bfloat16" in msg and "dtype=" in msg


def test_mixed_dtype_checkpoint_takes_the_config_torch_dtype(vit_fixture, tmp_path):
    m = internvit.load_model(_mixed(vit_fixture, tmp_path, torch_dtype="float32"), dtype=None)
    assert {p.dtype for p in m.parameters()} == {torch.float32}


# ---- F6: every spelling of a preset is the same model ---------------------------------------------------------
def test_preset_spellings_give_the_same_weights_and_name():
    ref = internvit.load_model("internvit-6b-tiny")
    for name in ("InternViT-6B-tiny", "internvit_6b_tiny", " internvit-6b-tiny"):
        m = internvit.load_model(name)
        assert torch.equal(m.embeddings.class_embedding, ref.embeddings.class_embedding), name
        assert m.name_or_path == "internvit-6b-tiny"
    b = internvit.build_model("InternViT-6B-tiny")
    assert torch.equal(b.embeddings.class_embedding, ref.embeddings.class_embedding)


# ---- F8: a resized position table is visible; the converter refuses to resample; image_size from the table ----
def test_resized_position_table_is_a_warning_naming_both_grids(vit_fixture, tmp_path, caplog):
    d = _folder(tmp_path / "m448", vit_fixture, _config(vit_fixture, image_size=448))
    with caplog.at_level(logging.WARNING, logger="internvit"):
        internvit.load_model(d)
    assert any("4 x 4" in r.getMessage() and "32 x 32" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)


def test_convert_refuses_to_resample_the_position_table(vit_fixture, tmp_path):
    cfg = tmp_path / "cfg448.json"
    cfg.write_text(json.dumps(_config(vit_fixture, image_size=448)))
    with pytest.raises(CheckpointError, match=r"4 x 4 grid.*image_size 448 asks for 32 x 32.*image_size is 56"):
        convert_checkpoint(os.path.join(vit_fixture, "original_format.pth"), str(tmp_path / "out"),
                           config=str(cfg))
    assert not (tmp_path / "out").exists()


def test_config_without_image_size_takes_it_from_the_position_table(vit_fixture, tmp_path):
    c = _config(vit_fixture)
    c.pop("image_size")
    m = internvit.load_model(_folder(tmp_path / "noimg", vit_fixture, c))
    assert m.config.image_size == 56 and not m.load_report.resized
    exp = load_file(os.path.join(vit_fixture, "expected.safetensors"))
    with torch.no_grad():
        out = m(exp["native.pixel_values"]).last_hidden_state
    assert (out - exp["native.last_hidden_state"]).abs().max().item() < 1e-4


# ---- F11: load_model's dtype: the extractor's spellings; nothing the model cannot run in ---------------------------
def test_load_model_takes_the_extractors_dtype_names(vit_fixture):
    assert internvit.load_model(vit_fixture, dtype="bf16").dtype == torch.bfloat16
    assert internvit.load_model("internvit-6b-tiny", dtype="fp16").dtype == torch.float16
    # every spelling a model accepts as a torch.dtype is a name too (session 15: 'float64' was refused while
    # torch.float64 loaded); torch's own spelling and any case as well; the tools' --dtype reads the same names
    from internvit.cli import dtype_arg

    for name, dtype in [("float64", torch.float64), ("FP64", torch.float64), ("torch.bfloat16", torch.bfloat16),
                        (" Float32 ", torch.float32)]:
        assert internvit.load_model("internvit-6b-tiny", dtype=name).dtype == dtype
        assert getattr(torch, dtype_arg(name)) == dtype
    with pytest.raises(ValueError, match=r"dtype must be one of fp32, .*fp64, float64, got 'int8'"):
        internvit.load_model("internvit-6b-tiny", dtype="int8")


@pytest.mark.parametrize("dtype", [torch.int8, torch.bool, torch.complex64, torch.float8_e4m3fn])
def test_load_model_refuses_dtypes_the_model_cannot_run_in(vit_fixture, dtype):
    with pytest.raises(TypeError, match=r"dtype must be one of torch\.float32.*'bf16'.*got torch\."):
        internvit.load_model(vit_fixture, dtype=dtype)


# ---- F7: the EXIF orientation is documented as a difference from the reference readers --------------------------
@pytest.mark.parametrize("doc", ["docs/features.md", "docs/retrieval.md", "docs/internvl.md"])
def test_exif_orientation_is_documented(doc):
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        text = f.read()
    assert "EXIF" in text and "InternVL-Chat" in text
