"""weights_fingerprint caches per module, and every kind of weight change gives the new fingerprint."""
import pytest
import torch
from torch import nn

import internvit.fingerprint as fpmod
from internvit.fingerprint import clear_fingerprint_cache, weights_fingerprint


def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(40, 30), nn.LayerNorm(30), nn.BatchNorm1d(30))


def _uncached(m, dtype=None):
    return weights_fingerprint(m, dtype, cache=False)


@pytest.fixture
def hashes(monkeypatch):
    """Counts the full hashing passes (so a test can tell a cache hit from a recomputation)."""
    calls = []
    real = fpmod._hash_state_dict

    def counting(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(fpmod, "_hash_state_dict", counting)
    return calls


def test_second_call_is_a_cache_hit(hashes):
    m = _model()
    a = weights_fingerprint(m)
    assert weights_fingerprint(m) == a == _uncached(m)
    assert len(hashes) == 2  # one cached computation + the explicit uncached one
    b = weights_fingerprint(m, torch.bfloat16)  # per dtype
    assert b != a and weights_fingerprint(m, torch.bfloat16) == b and len(hashes) == 3
    clear_fingerprint_cache()
    assert weights_fingerprint(m) == a and len(hashes) == 4


@pytest.mark.parametrize("change", ["no_grad_add", "inference_mode", "load_state_dict", "optimizer_step",
                                    "buffer", "data_copy", "replace_parameter", "to_dtype", "one_bit_no_grad"])
def test_in_place_and_other_changes_invalidate(change, hashes):
    m = _model()
    before = weights_fingerprint(m)
    w = m[0].weight
    if change == "no_grad_add":
        with torch.no_grad():
            w.add_(1.0)
    elif change == "inference_mode":
        with torch.inference_mode():
            w.mul_(2.0)
    elif change == "load_state_dict":
        other = _model()
        with torch.no_grad():
            other[0].bias.fill_(0.5)
        m.load_state_dict(other.state_dict())
    elif change == "optimizer_step":
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        m.train()
        m(torch.randn(8, 40)).sum().backward()
        opt.step()
    elif change == "buffer":
        m.train()
        m(torch.randn(8, 40))  # BatchNorm running stats change in place
    elif change == "data_copy":  # bypasses the version counter: seen through the sampled values
        w.data.copy_(torch.randn_like(w))
    elif change == "replace_parameter":
        m[0].weight = nn.Parameter(w.detach().clone() + 1)
    elif change == "to_dtype":
        m.to(torch.float64)
    elif change == "one_bit_no_grad":  # a single bit of one value (not a sampled one): version counter
        with torch.no_grad():
            w.view(-1).view(torch.int32)[7] ^= 1
    after = weights_fingerprint(m)
    assert after != before
    assert after == _uncached(m)


def test_restored_weights_give_the_old_fingerprint_again():
    m = _model()
    before = weights_fingerprint(m)
    saved = {k: v.clone() for k, v in m.state_dict().items()}
    with torch.no_grad():
        m[0].weight.zero_()
    assert weights_fingerprint(m) != before
    m.load_state_dict(saved)
    assert weights_fingerprint(m) == before


def test_inference_tensors_are_not_cached(hashes):
    with torch.inference_mode():
        m = _model()
    a = weights_fingerprint(m)
    assert weights_fingerprint(m) == a and len(hashes) == 2  # hashed each time: no version counter to trust
    with torch.inference_mode():
        m[0].weight.add_(1.0)
    assert weights_fingerprint(m) != a


def test_state_dicts_and_meta_tensors_are_not_cached():
    sd = _model().state_dict()
    a = weights_fingerprint(sd)
    sd["0.weight"].view(-1)[3] += 1
    assert weights_fingerprint(sd) != a
    with torch.device("meta"):
        meta = nn.Linear(3, 3)
    with pytest.raises(ValueError, match="meta"):
        weights_fingerprint(meta)
