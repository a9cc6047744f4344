"""InternVL-C/G: parity with the reference fixture, both checkpoint families, tokenizer, config variants."""
import json
import os

import pytest
import torch
from safetensors.torch import load_file

import internvit
from internvit.checkpoints import CheckpointError, internvl_key_map
from internvit.models.internvl import InternVLModel
from internvit.models.pooling import AttentionPoolingBlock
from internvit.models.vit import InternViT

TOL = 1e-4


@pytest.fixture(scope="module")
def fx(internvl_fixture_dir):
    return internvl_fixture_dir


@pytest.fixture(scope="module")
def internvl_fixture_dir():
    from tests.conftest import fixture_dir

    return fixture_dir("internvl-cg-tiny")


@pytest.fixture(scope="module")
def model(fx):
    return internvit.load_model(fx)


@pytest.fixture(scope="module")
def expected(fx):
    return load_file(os.path.join(fx, "expected.safetensors"))


@pytest.fixture(scope="module")
def texts(fx):
    with open(os.path.join(fx, "texts.json"), encoding="utf-8") as f:
        return json.load(f)["texts"]


@pytest.fixture(scope="module")
def tok(fx):
    return internvit.get_tokenizer(fx)


# -- parity with the reference run -------------------------------------------------------------------
def test_loads_as_internvl_with_internvit_tower(model):
    assert isinstance(model, InternVLModel)
    assert type(model.vision_model) is InternViT
    assert model.config.vision_config.image_size == 56
    assert sorted(k.split(".")[0] for k in model.load_report.ignored) == ["itm_head", "itm_head", "qllama"]


def test_token_ids_exact(tok, texts, expected):
    ids = tok(texts)
    assert ids.dtype == torch.long and ids.shape == (4, 80)
    assert torch.equal(ids, expected["input_ids"])


@torch.no_grad()
def test_text_embeddings(model, expected):
    out = model.encode_text(expected["input_ids"])
    torch.testing.assert_close(out, expected["text_embeds"], atol=TOL, rtol=0)


@pytest.mark.parametrize("mode", ["C", "G"])
@torch.no_grad()
def test_image_embeddings_and_logits(model, expected, mode):
    img = model.encode_image(expected["pixel_values"], mode=f"InternVL-{mode}")
    torch.testing.assert_close(img, expected[f"image_embeds.{mode}"], atol=TOL, rtol=0)
    per_image, per_text = model(expected["pixel_values"], expected["input_ids"], mode=f"InternVL-{mode}")
    torch.testing.assert_close(per_image, expected[f"logits_per_image.{mode}"], atol=TOL, rtol=0)
    assert torch.equal(per_text, per_image.t())


def test_bad_mode_and_empty_row(model, expected):
    with pytest.raises(ValueError, match="mode must be one of"):
        model.encode_image(expected["pixel_values"], mode="InternVL-X")
    with pytest.raises(ValueError, match="row 1 holds only padding"):
        model.encode_text(torch.tensor([[1, 5, 2], [0, 0, 0]]))


# -- tokenizer beyond the fixture ---------------------------------------------------------------------
def _reference_ids(fx, text, n=80):
    """The protocol written out with sentencepiece directly: BOS, prefixed text cut to n-2, EOS, zeros."""
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=os.path.join(fx, "tokenizer.model"))
    ids = [1] + sp.encode("summarize:" + text)[: n - 2] + [2]
    return ids + [0] * (n - len(ids))


def test_tokenizer_long_and_short_texts(fx, tok):
    long_text = "a very long caption about a dog " * 30
    short = ["", "a", "一"]
    ids = tok([long_text] + short)
    assert ids[0, -1].item() == 2 and (ids[0] > 0).all()  # truncated, EOS kept as the 80th id
    for row, text in zip(ids, [long_text] + short):
        assert row.tolist() == _reference_ids(fx, text)
    assert tok("a").shape == (1, 80)
    assert internvit.get_tokenizer(os.path.join(fx, "tokenizer.model"), max_length=16)([long_text]).shape == (1, 16)


def test_tokenizer_refuses_lone_surrogates_and_lengths_without_room_for_text(tok):
    """A lone surrogate gave sentencepiece's pybind11 cast error naming nothing; context lengths 3-5 left no
    room after BOS + 'summarize:' + EOS, so every text became the same ids."""
    with pytest.raises(ValueError, match=r"'bad\\udcff name' is not valid Unicode \(surrogates not allowed at "
                                         r"position 3"):
        tok(["ok", "bad\udcff name"])
    fixed = len(tok.encode(""))
    assert fixed > 2  # the prefix has tokens of its own
    with pytest.raises(ValueError, match=f"context_length={fixed} leaves no room .* at least {fixed + 1}"):
        tok(["a dog"], context_length=fixed)
    a, b = tok(["dog", "cat"], context_length=fixed + 1)
    assert not torch.equal(a, b)


def test_tokenizer_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="has no tokenizer.model"):
        internvit.get_tokenizer(tmp_path)
    bad = tmp_path / "tokenizer.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a readable SentencePiece model"):
        internvit.get_tokenizer(bad)


@torch.no_grad()
def test_text_embedding_independent_of_padding_and_batch(model, tok):
    texts = ["a dog", "a long caption " * 40, "x"]
    padded = model.encode_text(tok(texts))
    wide = model.encode_text(tok(texts, context_length=120))
    alone = torch.cat([model.encode_text(tok([t])) for t in texts])
    torch.testing.assert_close(padded, alone, atol=1e-5, rtol=0)
    torch.testing.assert_close(padded[[0, 2]], wide[[0, 2]], atol=1e-5, rtol=0)
    single = model.encode_text(torch.tensor([[1]]))  # a one-token sequence
    assert single.shape == (1, 32) and torch.isfinite(single).all()


# -- checkpoint families ------------------------------------------------------------------------------
def _to_pytorch_internvl_c(sd):
    """The internvl_c_13b_224px.pth layout, written from reference-spec §6 (original ViT names at top level,
    LLaMA text tower under transformer.*, no G branch)."""
    ren = [("vision_model.embeddings.class_embedding", "cls_token"),
           ("vision_model.embeddings.position_embedding", "pos_embed"),
           ("vision_model.embeddings.patch_embedding.", "patch_embed.proj."),
           ("vision_model.encoder.layers.", "blocks."), ("qllama.model.", "transformer.")]
    out = {}
    for k, v in sd.items():
        g_branch = k.startswith(("query_tokens", "clip_projector2.", "itm_head.", "qllama.lm_head"))
        if g_branch or (k.startswith("qllama.") and ".cross_attn." in k):
            continue
        for a, b in ren:
            k = k.replace(a, b)
        if k.endswith((".ls1", ".ls2")):
            k += ".gamma"
        out[k] = v
    out["transformer.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)  # old checkpoints carry it
    return out


@torch.no_grad()
def test_pytorch_internvl_c_checkpoint(fx, expected, tmp_path):
    sd = _to_pytorch_internvl_c(load_file(os.path.join(fx, "model.safetensors")))
    assert "blocks.0.ls1.gamma" in sd and "transformer.norm.weight" in sd
    path = tmp_path / "internvl_c_tiny.pth"
    torch.save({"module": sd}, path)
    cfg = json.load(open(os.path.join(fx, "config.json")))
    cfg["num_query_token"] = 0
    cfg["qllama_config"]["num_query_token"] = 0
    m = internvit.load_model(path, cfg)
    assert m.load_report.family == "internvl-original" and not m.has_g
    torch.testing.assert_close(m.encode_text(expected["input_ids"]), expected["text_embeds"], atol=TOL, rtol=0)
    torch.testing.assert_close(m.encode_image(expected["pixel_values"]), expected["image_embeds.C"], atol=TOL, rtol=0)
    with pytest.raises(ValueError, match="InternVL-G"):
        m.encode_image(expected["pixel_values"], mode="InternVL-G")
    # without a config the layout is recognised as the released InternVL-C (13B) and checked strictly
    from internvit.checkpoints import open_weights
    from internvit.factory import infer_config

    cfg13 = infer_config(open_weights(path))
    assert isinstance(cfg13, internvit.InternVLConfig) and cfg13.num_query_token == 0
    assert cfg13.qllama_config.hidden_size == 4096
    with pytest.raises(CheckpointError, match="config: missing keys: .*mis-shaped keys: clip_projector"):
        internvit.load_model(path)


def test_key_map_reports_unknown_and_ignores_heads(fx, tmp_path):
    keys = ["vision_model.embeddings.class_embedding", "qllama.model.norm.weight", "qllama.lm_head.weight",
            "itm_head.bias", "text_projection", "qllama.model.layers.0.self_attn.rotary_emb.inv_freq", "foo.bar"]
    mapping, family, ignored = internvl_key_map(keys)
    assert family == "internvl-hf"
    assert mapping["vision_model.embeddings.class_embedding"] == "vision_model.embeddings.class_embedding"
    assert mapping["foo.bar"] == "foo.bar"  # reported as unexpected by the loader
    assert set(ignored) == {"qllama.lm_head.weight", "itm_head.bias",
                            "qllama.model.layers.0.self_attn.rotary_emb.inv_freq"}
    sd = load_file(os.path.join(fx, "model.safetensors"))
    sd["foo.bar"] = torch.zeros(1)
    del sd["text_projection"]
    torch.save(sd, tmp_path / "x.bin")
    with pytest.raises(CheckpointError, match=r"missing keys: text_projection.*unexpected keys: foo\.bar"):
        internvit.load_model(tmp_path / "x.bin", os.path.join(fx, "config.json"))


@torch.no_grad()
def test_save_sharded_and_bin_directories_roundtrip(model, expected, tmp_path):
    out = internvit.save_model(model, tmp_path / "saved", max_shard_bytes=2_000_000)
    assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
    assert os.path.isfile(os.path.join(out, "tokenizer.model"))  # copied along
    again = internvit.load_model(out)
    ids = internvit.get_tokenizer(out)(["a photo of a dog."])
    torch.testing.assert_close(again.encode_text(ids), model.encode_text(ids), atol=0, rtol=0)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    torch.save(model.state_dict(), bin_dir / "pytorch_model.bin")
    (bin_dir / "config.json").write_text(json.dumps(model.config.to_dict()))
    m2 = internvit.load_model(bin_dir)
    torch.testing.assert_close(m2.encode_image(expected["pixel_values"], mode="InternVL-G"),
                               expected["image_embeds.G"], atol=TOL, rtol=0)


# -- configurations -----------------------------------------------------------------------------------
def test_other_sizes_build_and_run():
    cfg = dict(model_type="internvl", clip_embed_dim=16, attn_pool_num_heads=2, num_query_token=5,
               vision_config=dict(hidden_size=48, num_attention_heads=3, intermediate_size=96, num_hidden_layers=2,
                                  image_size=28, qkv_bias=True, qk_normalization=False, norm_type="layer_norm"),
               qllama_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=5,
                                  num_attention_heads=2, cross_attention_frequency=2))
    m = internvit.build_model(cfg).eval()
    assert [i for i, layer in enumerate(m.qllama.model.layers) if layer.cross_attn is not None] == [0, 2, 4]
    assert m.qllama.model.layers[0].cross_attn.k_proj.weight.shape == (32, 48)  # vision width from the config
    assert m.query_tokens.shape == (1, 5, 32)
    with torch.no_grad():
        img = m.encode_image(torch.randn(2, 3, 42, 28), mode="InternVL-G")  # non-square, pos-embed resized
        txt = m.encode_text(torch.tensor([[1, 7, 9, 2], [1, 2, 0, 0]]))
    assert img.shape == (2, 16) and txt.shape == (2, 16)
    assert torch.isfinite(img).all() and torch.isfinite(txt).all()


def test_presets():
    m = internvit.build_model("internvl-tiny")
    assert isinstance(m, InternVLModel) and m.has_g
    cfg = internvit.get_config("internvl-c-13b-224px")
    assert cfg.num_query_token == 0 and cfg.qllama_config.num_query_token == 0
    with torch.device("meta"):
        c = InternVLModel(cfg)
    assert not hasattr(c, "clip_projector2") and all(layer.cross_attn is None for layer in c.qllama.model.layers)


def test_attention_pooling_block_contract():
    blk = AttentionPoolingBlock(dim=64, num_heads=4, out_dim=10)
    assert sorted(blk.state_dict()) == sorted(
        [f"norm1_{n}.{p}" for n in "qkv" for p in ("weight", "bias")]
        + [f"cross_attn.{n}.weight" for n in "qkv"] + [f"cross_attn.{n}_bias" for n in "qkv"]
        + ["cross_attn.proj.weight", "cross_attn.proj.bias"])
    blk.init_weights()
    x = torch.randn(3, 17, 64)
    assert blk(x).shape == (3, 10)
    # the query is the token mean, so permuting the tokens must not change the output
    torch.testing.assert_close(blk(x), blk(x[:, torch.randperm(17)]), atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match=r"expects \(B, N, 64\)"):
        blk(torch.randn(3, 17, 32))
