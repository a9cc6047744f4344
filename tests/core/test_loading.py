"""Loading: key families, named-key errors, known heads, save/convert round trips, 300M-style variants."""
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import internvit
from internvit import CheckpointError
from internvit.checkpoints import hf_to_original_key, original_to_hf_key

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _out(model, x):
    with torch.no_grad():
        return model(x).last_hidden_state


def test_rename_table_round_trip():
    for k in ["cls_token", "pos_embed", "patch_embed.proj.weight", "blocks.7.ls1.gamma", "blocks.12.attn.qkv.bias",
              "blocks.0.attn.q_norm.weight", "blocks.3.mlp.fc2.weight", "blocks.44.norm2.bias"]:
        assert hf_to_original_key(original_to_hf_key(k)) == k
    assert original_to_hf_key("blocks.7.ls2.gamma") == "encoder.layers.7.ls2"
    assert original_to_hf_key("patch_embed.proj.bias") == "embeddings.patch_embedding.bias"


def test_missing_unexpected_misshaped_named(tmp_path, vit_fixture):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    del sd["encoder.layers.1.attn.q_norm.weight"]
    sd["encoder.layers.0.attn.bogus"] = torch.zeros(3)
    sd["encoder.layers.2.mlp.fc1.weight"] = torch.zeros(128, 64)
    bad = tmp_path / "bad.safetensors"
    save_file(sd, str(bad))
    with pytest.raises(CheckpointError) as e:
        internvit.load_model(bad, os.path.join(vit_fixture, "config.json"))
    msg = str(e.value)
    assert "missing keys: encoder.layers.1.attn.q_norm.weight" in msg
    assert "unexpected keys: encoder.layers.0.attn.bogus" in msg
    assert "mis-shaped keys: encoder.layers.2.mlp.fc1.weight (checkpoint [128, 64] vs model [256, 64])" in msg
    assert str(bad) in msg


def test_config_mismatch_is_an_error(vit_fixture):
    with pytest.raises(CheckpointError, match="missing keys: .*attn.qkv.bias"):
        internvit.load_model(os.path.join(vit_fixture, "original_format.pth"), "internvit-300m-tiny")


def test_known_heads_reported_prefix_stripped(tmp_path, vit_fixture):
    sd = load_file(os.path.join(vit_fixture, "model.safetensors"))
    sd = {"vision_model." + k: v for k, v in sd.items()}
    sd["clip_projector.cross_attn.q.weight"] = torch.zeros(4, 4)
    sd["logit_scale"] = torch.zeros(())
    path = tmp_path / "composite.safetensors"
    save_file(sd, str(path))
    model = internvit.load_model(path, os.path.join(vit_fixture, "config.json"))
    assert sorted(model.load_report.ignored) == ["clip_projector.cross_attn.q.weight", "logit_scale"]
    ref = internvit.load_model(vit_fixture)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(_out(model, x), _out(ref, x))


def test_unreadable_and_missing_sources(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.safetensors"):
        internvit.load_model(junk, "internvit-6b-tiny")
    with pytest.raises(FileNotFoundError, match="not a preset"):
        internvit.load_model(tmp_path / "nothing-here")
    empty = tmp_path / "emptydir"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        internvit.load_model(empty)


def test_pickle_payload_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.pth"
    torch.save({"module": {"cls_token": torch.zeros(1, 1, 64)}, "x": Evil()}, path)
    with pytest.raises(CheckpointError, match=r"evil.pth: refusing to load: it references posix.system"):
        internvit.load_model(path, "internvit-6b-tiny")


def test_save_and_reload_sharded_300m(tmp_path):
    model = internvit.load_model("internvit-300m-tiny")
    assert model.config.qkv_bias and model.config.norm_type == "layer_norm"
    out_dir = internvit.save_model(model, tmp_path / "m300", max_shard_bytes=60_000)
    files = sorted(os.listdir(out_dir))
    assert "model.safetensors.index.json" in files and sum(f.startswith("model-0") for f in files) > 1
    again = internvit.load_model(out_dir)
    x = torch.randn(2, 3, 42, 70)  # downscaled, non-square
    torch.testing.assert_close(_out(again, x), _out(model, x), atol=0, rtol=0)
    assert json.load(open(os.path.join(out_dir, "config.json")))["model_type"] == "intern_vit_6b"


def test_pos_embed_resized_to_config_grid(vit_fixture):
    cfg = internvit.get_config(os.path.join(vit_fixture, "config.json"))
    cfg.image_size = 84
    model = internvit.load_model(os.path.join(vit_fixture, "original_format.pth"), cfg)
    assert model.embeddings.position_embedding.shape == (1, 37, 64)
    assert model.load_report.resized == ["embeddings.position_embedding"]
    ref = internvit.load_model(vit_fixture)
    x = torch.randn(1, 3, 84, 84)  # interpolating once at load == interpolating at forward time
    torch.testing.assert_close(_out(model, x), _out(ref, x), atol=1e-5, rtol=0)


def test_convert_cli_round_trip(tmp_path, vit_fixture):
    tool = os.path.join(ROOT, "tools", "convert_checkpoint.py")
    orig, hf = tmp_path / "orig.pth", tmp_path / "hf"
    subprocess.run([sys.executable, tool, "to-original", vit_fixture, str(orig)], check=True, capture_output=True)
    sd = torch.load(orig, weights_only=True)["module"]
    assert "blocks.0.ls1.gamma" in sd and "cls_token" in sd
    subprocess.run([sys.executable, tool, "to-hf", str(orig), str(hf), "--config", "internvit-6b-tiny"],
                   check=True, capture_output=True)
    x = torch.randn(1, 3, 56, 56)
    torch.testing.assert_close(_out(internvit.load_model(hf), x), _out(internvit.load_model(vit_fixture), x),
                               atol=0, rtol=0)
    # 16-bit checkpoints stay 16-bit, and known heads (clip_projector.*) are carried into the original family
    sd16 = {k: v.to(torch.bfloat16) for k, v in sd.items()}
    sd16["clip_projector.cross_attn.q.weight"] = torch.ones(4, 4, dtype=torch.bfloat16)
    torch.save({"module": sd16}, tmp_path / "orig16.pth")
    subprocess.run([sys.executable, tool, "to-original", str(tmp_path / "orig16.pth"), str(tmp_path / "o2.pth"),
                    "--config", "internvit-6b-tiny"], check=True, capture_output=True)
    back = torch.load(tmp_path / "o2.pth", weights_only=True)["module"]
    assert back.keys() == sd16.keys() and all(back[k].dtype == torch.bfloat16 for k in back)
    assert torch.equal(back["blocks.1.mlp.fc1.weight"], sd16["blocks.1.mlp.fc1.weight"])
    assert torch.equal(back["clip_projector.cross_attn.q.weight"], sd16["clip_projector.cross_attn.q.weight"])
    bad = subprocess.run([sys.executable, tool, "to-hf", str(tmp_path / "missing.pth"), str(hf)],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error:") and len(bad.stderr.strip().splitlines()) == 1


def test_300m_matches_timm(tmp_path):
    """timm's independent InternViT-300M implementation (same architecture, timm names = original family)."""
    timm = pytest.importorskip("timm")
    ref = timm.create_model("vit_intern300m_patch14_448", pretrained=False, img_size=56, embed_dim=64, depth=3,
                            num_heads=4, num_classes=0).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path / "timm300m.pth"
    torch.save(ref.state_dict(), path)
    ours = internvit.load_model(path, "internvit-300m-tiny")
    assert ours.load_report.family == "original"
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), atol=1e-4, rtol=0)


def test_bare_weights_of_an_unreleased_width_say_the_head_count_is_assumed(tmp_path, caplog):
    """A 64-wide model with 8 heads, saved without its config: the weights do not record the head count, so
    the 4 of the tiny preset of that width is an assumption, and a warning says so (outputs differed by 1.7
    silently); config= gives the right model; a released width (1024: 16 heads in every release) is silent."""
    import logging

    from internvit.factory import convert_checkpoint

    cfg = dict(internvit.get_config("internvit-6b-tiny").to_dict(), num_attention_heads=8)
    model = internvit.build_model(cfg, seed=0)
    pth = convert_checkpoint(internvit.save_model(model, tmp_path / "hf"), tmp_path / "o.pth", to="original")
    with caplog.at_level(logging.WARNING, logger="internvit"):
        guessed = internvit.load_model(pth)
    assert guessed.config.num_attention_heads == 4
    assert "do not record the number of attention heads: assumed 4 (from the preset 'internvit-6b-tiny'" in caplog.text
    # a 300M-style (layer norm, qkv bias, no QK-norm) file of the same width names the 300M tiny preset
    cfg300 = dict(internvit.get_config("internvit-300m-tiny").to_dict(), num_attention_heads=8)
    pth300 = convert_checkpoint(internvit.save_model(internvit.build_model(cfg300, seed=0), tmp_path / "hf3"),
                                tmp_path / "o3.pth", to="original")
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="internvit"):
        assert internvit.load_model(pth300).config.norm_type == "layer_norm"
    assert "(from the preset 'internvit-300m-tiny'" in caplog.text, caplog.text
    right = internvit.load_model(pth, cfg)
    x = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        assert torch.equal(right(x).last_hidden_state, model.eval()(x).last_hidden_state)
    caplog.clear()
    from internvit.factory import infer_vision_config  # the 300M width (1024): no warning

    class Shapes:
        def __init__(self, sd):
            self.sd = sd

        def keys(self):
            return list(self.sd)

        def shape(self, k):
            return tuple(self.sd[k].shape)

    wide = internvit.build_model(dict(internvit.get_config("internvit-300m-tiny").to_dict(), hidden_size=1024,
                                      num_attention_heads=16, intermediate_size=64, num_hidden_layers=1), seed=0)
    with caplog.at_level(logging.WARNING, logger="internvit"):
        assert infer_vision_config(Shapes(wide.state_dict())).num_attention_heads == 16
    assert "attention heads" not in caplog.text
