"""Model behaviour: bf16, gradient checkpointing, freezing, presets, index handling."""
import pytest
import torch

import internvit
from internvit.models.vit import RMSNorm


def test_presets_build_with_right_shapes():
    assert "internvit-6b-448px-v1-5" in internvit.list_presets()
    cfg = internvit.get_config("InternViT-6B-448px-V1-5")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.image_size, cfg.qk_normalization) == (3200, 45, 448, True)
    cfg = internvit.get_config("internvit_300m_448px")
    assert (cfg.hidden_size, cfg.qkv_bias, cfg.norm_type, cfg.initializer_factor) == (1024, True, "layer_norm", 1.0)
    with pytest.raises(ValueError, match="neither a preset"):
        internvit.get_config("internvit-7b")


def test_6b_parameter_count_matches_release():
    with torch.device("meta"):
        model = internvit.InternViT(internvit.get_config("internvit-6b-224px"))
    assert sum(p.numel() for p in model.parameters()) == 5_902_793_600


def test_bf16_close_to_fp32(vit_fixture):
    ref = internvit.load_model(vit_fixture)
    bf = internvit.load_model(vit_fixture, dtype=torch.bfloat16)
    assert bf.dtype == torch.bfloat16
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        a, b = ref(x).last_hidden_state, bf(x).last_hidden_state
    assert b.dtype == torch.bfloat16
    rel = (a - b.float()).norm() / a.norm()
    assert rel < 0.03, rel


def test_rmsnorm_normalises_in_fp32():
    norm = RMSNorm(8).to(torch.bfloat16)
    x = (torch.randn(4, 8) * 1e3).to(torch.bfloat16)
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16)
    assert torch.equal(norm(x), expected)


def test_grad_checkpointing_same_grads():
    torch.manual_seed(0)
    model = internvit.load_model("internvit-6b-tiny").train()
    x = torch.randn(2, 3, 56, 56)
    model(x).last_hidden_state.square().mean().backward()
    g0 = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).last_hidden_state.square().mean().backward()
    for a, p in zip(g0, model.parameters()):
        torch.testing.assert_close(p.grad, a)


def test_freeze_and_drop_path():
    model = internvit.load_model("internvit-6b-tiny", freeze=True)
    assert not any(p.requires_grad for p in model.parameters())
    model.freeze(False)
    assert all(p.requires_grad for p in model.parameters())
    cfg = internvit.get_config("internvit-6b-tiny")
    cfg.drop_path_rate = 0.3
    m = internvit.build_model(cfg)
    rates = [blk.drop_path_rate for blk in m.encoder.layers]
    assert rates[0] == 0.0 and abs(rates[-1] - 0.3) < 1e-9
    x = torch.randn(4, 3, 56, 56)
    m.eval()
    with torch.no_grad():
        torch.testing.assert_close(m(x).last_hidden_state, m(x).last_hidden_state)


def test_intermediate_index_errors():
    model = internvit.load_model("internvit-6b-tiny")
    assert model.resolve_indices(2) == [1, 2]
    assert model.resolve_indices([-1, 0]) == [2, 0]
    with pytest.raises(ValueError, match="out of range"):
        model.resolve_indices([3])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(torch.randn(1, 3, 56, 56), output_fmt="NHWC")


def test_attention_choice_and_compile_errors(monkeypatch):
    from internvit.models.vit import PackedLinear, attention_impl_for, compile_model, pack_support

    model = internvit.load_model("internvit-300m-tiny")
    with pytest.raises(ValueError, match="attention impl"):
        model.set_attention("flash")
    with pytest.raises(ValueError, match="compile mode"):
        compile_model(model, "fast")
    with pytest.raises(ValueError, match="InternViT"):
        compile_model(torch.nn.Linear(2, 2))
    cpu = torch.device("cpu")
    assert attention_impl_for(cpu, torch.bfloat16, 4096, "sdpa") == "sdpa"
    monkeypatch.setenv("INTERNVIT_ATTENTION", "gemm")
    assert attention_impl_for(cpu, torch.float32, 10) == "gemm"
    monkeypatch.delenv("INTERNVIT_ATTENTION")
    assert attention_impl_for(cpu, torch.float32, 10) == "sdpa"
    if pack_support(torch.float32) is not None:
        pytest.skip(pack_support(torch.float32))
    x = torch.randn(2, 3, 56, 56)
    with torch.no_grad():
        ref = model(x).last_hidden_state
        compile_model(model, "pack")
        assert isinstance(model.encoder.layers[0].mlp.fc1, PackedLinear)
        torch.testing.assert_close(model(x).last_hidden_state, ref, atol=1e-5, rtol=1e-5)
        with pytest.raises(RuntimeError, match="PackedLinear holds a torch.float32"):
            model.encoder.layers[0].mlp.fc1(torch.randn(1, 64, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_fused_path_equals_reference_formula(dtype):
    """The fused F.rms_norm path gives the spec's values: normalise in fp32, cast, then multiply by the weight."""
    norm = RMSNorm(96).to(dtype)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = (torch.randn(3, 7, 96) * 50).to(dtype)
    xf = x.float()
    expected = norm.weight * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    torch.testing.assert_close(norm(x), expected, atol=0, rtol=0)
