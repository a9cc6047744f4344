"""TensorSource answers membership from its index: a load reads each tensor's bytes once."""
import os

import pytest
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


def test_large_tensors_read_by_threads_in_chunks_equal_the_file(tmp_path, monkeypatch):
    """The threaded read (chunks of odd size, more chunks than threads) gives the file's exact bytes; a file cut
    inside a tensor after it was opened raises CheckpointError from a worker thread, not a short tensor."""
    g = torch.Generator().manual_seed(0)
    sd = {"a": torch.randn(37, 29, generator=g), "b": torch.randn(1000, generator=g).to(torch.bfloat16),
          "c": torch.arange(7, dtype=torch.int64)}
    path = str(tmp_path / "w.safetensors")
    save_file(sd, path)
    monkeypatch.setattr(ck, "PARALLEL_READ_MIN_BYTES", 64)
    monkeypatch.setattr(ck, "_READ_CHUNK_BYTES", 100)
    monkeypatch.setattr(ck, "read_threads", lambda: 3)
    threaded = []
    real = ck._pread_exact
    monkeypatch.setattr(ck, "_pread_exact", lambda *a: threaded.append(len(a[1])) or real(*a))
    src = ck.open_weights(path)
    for k, v in sd.items():
        assert torch.equal(src[k], v), k
    assert len(threaded) > 3 and max(threaded) == 100  # "a" (4292 bytes) and "b" (2000) in 100-byte chunks
    src = ck.open_weights(path)  # the header is checked at open; the file shrinks afterwards
    os.truncate(path, os.path.getsize(path) - 3000)
    with pytest.raises(ck.CheckpointError, match="truncated"):
        for k in sd:
            src[k]
