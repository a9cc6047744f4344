"""TensorSource answers membership from its index: a load reads each tensor's bytes once."""
import torch
from safetensors.torch import save_file

import internvit.checkpoints as ck


def test_membership_reads_nothing_and_load_reads_each_tensor_once(tmp_path, monkeypatch):
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    reads = []
    real = ck._read_safetensors_tensor
    monkeypatch.setattr(ck, "_read_safetensors_tensor", lambda *a: reads.append(a[2]) or real(*a))
    src = ck.TensorSource()
    src._add_safetensors(str(tmp_path / "w.safetensors"))
    assert "0.weight" in src and "nope" not in src and reads == []
    with torch.device("meta"):
        target = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    ck.load_into(target, src)
    assert len(reads) == len(model.state_dict())  # once each (membership checks used to read them all too)
    for k, v in model.state_dict().items():
        assert torch.equal(target.state_dict()[k], v)
