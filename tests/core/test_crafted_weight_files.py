"""Crafted weight files (the kinds a newcomer tried): every malformed header, overlapping tensors, a malformed
shard index and a key in two shards give one CheckpointError naming the file, never a raw exception or wrong
weights; the CLIs turn it into one ``error:`` line with exit status 2."""
import json
import os
import struct

import pytest
import torch
from safetensors.torch import save_file

import internvit
from internvit import CheckpointError
from internvit.checkpoints import open_weights
from internvit.factory import convert_checkpoint

TINY = "internvit-6b-tiny"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """(header dict, data bytes) of the tiny model's safetensors file."""
    folder = tmp_path_factory.mktemp("good")
    path = str(folder / "model.safetensors")
    save_file({k: v.contiguous() for k, v in internvit.load_model(TINY).state_dict().items()}, path)
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _craft(path, header_bytes: bytes, data: bytes) -> str:
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header_bytes)) + header_bytes + data)
    return str(path)


def _edit(header: dict, key: str, **fields) -> bytes:
    h = json.loads(json.dumps(header))
    h[key].update(fields)
    return json.dumps(h).encode()


CLS, BIAS, KNORM = "embeddings.class_embedding", "embeddings.patch_embedding.bias", \
    "encoder.layers.0.attn.k_norm.weight"

HEADERS = {
    "deeply nested JSON": lambda h: b"[" * 100000 + b"]" * 100000,
    "float data_offsets": lambda h: _edit(h, CLS, data_offsets=[float(x) for x in h[CLS]["data_offsets"]]),
    "float shape": lambda h: _edit(h, CLS, shape=[float(x) for x in h[CLS]["shape"]]),
    "negative shape": lambda h: _edit(h, CLS, shape=[-1] + h[CLS]["shape"][1:]),
    "huge zero-size shape": lambda h: _edit(h, CLS, shape=[0, 10**30], data_offsets=[0, 0]),
    "bool shape": lambda h: _edit(h, CLS, shape=[True] * len(h[CLS]["shape"])),
    "three offsets": lambda h: _edit(h, CLS, data_offsets=h[CLS]["data_offsets"] + [0]),
    "offsets not a list": lambda h: _edit(h, CLS, data_offsets="0-256"),
    "overlapping tensors": lambda h: _edit(h, KNORM, data_offsets=h[BIAS]["data_offsets"]),
}


@pytest.mark.parametrize("mmap", [False, True])
@pytest.mark.parametrize("case", sorted(HEADERS))
def test_malformed_safetensors_headers_are_refused_by_name(good, tmp_path, case, mmap):
    header, data = good
    path = _craft(tmp_path / "w.safetensors", HEADERS[case](header), data)
    with pytest.raises(CheckpointError, match=r"w\.safetensors: not a readable safetensors file") as e:
        internvit.load_model(path, TINY, mmap=mmap)
    assert "\n" not in str(e.value)
    if case == "overlapping tensors":
        assert "overlap" in str(e.value)


def test_tensors_in_any_disjoint_order_still_load(good, tmp_path):
    """Offsets need not follow the key order (the format allows it): swapping two same-size tensors' ranges
    is valid and loads each tensor from its own bytes."""
    header, data = good
    h = json.loads(json.dumps(header))
    b = KNORM
    a = next(k for k, v in h.items() if k not in ("__metadata__", b) and v["shape"] == h[b]["shape"]
             and v["dtype"] == h[b]["dtype"])
    h[a]["data_offsets"], h[b]["data_offsets"] = h[b]["data_offsets"], h[a]["data_offsets"]
    path = _craft(tmp_path / "swapped.safetensors", json.dumps(h).encode(), data)
    ref = open_weights(_craft(tmp_path / "plain.safetensors", json.dumps(header).encode(), data))
    got = open_weights(path)
    assert torch.equal(got[a], ref[b]) and torch.equal(got[b], ref[a])


INDEXES = {
    "a list": b"[1, 2]",
    "weight_map a list": json.dumps({"weight_map": ["x"]}).encode(),
    "weight_map value not a string": json.dumps({"weight_map": {"a": 5}}).encode(),
    "shard outside the folder": json.dumps({"weight_map": {"a": "../model.safetensors"}}).encode(),
    "invalid UTF-8": b'{"weight_map": {"a": "\xff"}}',
    "deeply nested": b"[" * 100000 + b"]" * 100000,
}


@pytest.mark.parametrize("case", sorted(INDEXES))
def test_malformed_shard_index_is_refused_by_name(tmp_path, case):
    folder = internvit.save_model(internvit.load_model(TINY), str(tmp_path / "hf"))
    (tmp_path / "hf" / "model.safetensors").rename(tmp_path / "hf" / "model-00001-of-00001.safetensors")
    (tmp_path / "hf" / "model.safetensors.index.json").write_bytes(INDEXES[case])  # read: no model.safetensors
    with pytest.raises(CheckpointError, match=r"model\.safetensors\.index\.json: not a valid shard index"):
        internvit.load_model(folder)


def test_a_key_in_two_shards_is_refused(tmp_path):
    """The shard index maps each key to one file; a second copy elsewhere must not win silently."""
    sd = {k: v.contiguous() for k, v in internvit.load_model(TINY).state_dict().items()}
    folder = tmp_path / "hf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(internvit.load_model(TINY).config.to_dict()))
    keys = sorted(sd)
    first, second = keys[: len(keys) // 2], keys[len(keys) // 2:]
    save_file({k: sd[k] for k in first}, str(folder / "model-00001-of-00002.safetensors"))
    save_file({**{k: sd[k] for k in second}, CLS: torch.full_like(sd[CLS], 7.0)},
              str(folder / "model-00002-of-00002.safetensors"))
    index = {"weight_map": {**{k: "model-00001-of-00002.safetensors" for k in first},
                            **{k: "model-00002-of-00002.safetensors" for k in second}}}
    assert CLS in first
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match=rf"tensor {CLS} is also in .*model-00001-of-00002"):
        internvit.load_model(str(folder))


def test_convert_cli_gives_one_error_line_for_a_crafted_header(good, tmp_path):
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    header, data = good
    path = _craft(tmp_path / "w.safetensors", HEADERS["float data_offsets"](header), data)
    out = tmp_path / "out.pth"
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_checkpoint.py"), "to-original", path,
                           str(out), "--config", TINY], capture_output=True, text=True, cwd=root, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith("error: "), proc.stderr[-2000:]
    assert "w.safetensors" in err[0] and not out.exists()


def test_saved_weights_are_as_readable_as_the_config(tmp_path):
    """safetensors creates files 0o600; ours get 0o666 less the umask like every other file we write."""
    old = os.umask(0o022)
    try:
        folder = internvit.save_model(internvit.load_model(TINY), str(tmp_path / "hf"))
        flat = convert_checkpoint(folder, str(tmp_path / "flat.safetensors"), to="original")
    finally:
        os.umask(old)
    for path in (os.path.join(folder, "model.safetensors"), flat):
        assert os.stat(path).st_mode & 0o777 == 0o644, path
    assert os.stat(os.path.join(folder, "config.json")).st_mode & 0o777 == 0o644


@pytest.mark.parametrize("command, existing", [("to-hf", "file"), ("to-original", "folder")])
def test_convert_overwrite_refuses_a_destination_of_the_other_kind(tmp_path, command, existing):
    """--overwrite replaces a folder by a folder and a file by a file; anything else is one error line, exit 2,
    and the destination is untouched."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    src = internvit.save_model(internvit.load_model(TINY), str(tmp_path / "hf"))
    dst = tmp_path / "dst.pth"
    if existing == "file":
        dst.write_text("mine")
    else:
        dst.mkdir()
        (dst / "keep.txt").write_text("mine")
    proc = subprocess.run([sys.executable, os.path.join(root, "tools", "convert_checkpoint.py"), command, src,
                           str(dst), "--overwrite"], capture_output=True, text=True, cwd=root, timeout=120)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and err[0].startswith(f"error: {dst}: exists and is"), proc.stderr
    assert (dst.read_text() if existing == "file" else (dst / "keep.txt").read_text()) == "mine"


@pytest.mark.parametrize("field, value", [("num_hidden_layers", 10_000_000), ("image_size", 1_400_000),
                                          ("hidden_size", -64), ("hidden_size", 10**9), ("num_hidden_layers", 0),
                                          ("intermediate_size", 12.5), ("patch_size", "14")])
def test_config_json_sizes_are_bounded_before_anything_is_built(tmp_path, field, value):
    """A config.json asking for ten million layers or a million-pixel grid is refused at once (it used to build
    for minutes or try a terabyte allocation), naming the file and the field."""
    folder = internvit.save_model(internvit.load_model(TINY), str(tmp_path / "hf"))
    cfg_path = os.path.join(folder, "config.json")
    cfg = json.load(open(cfg_path))
    cfg[field] = value
    json.dump(cfg, open(cfg_path, "w"))
    with pytest.raises(ValueError, match=rf"config\.json: config: {field} must be an integer from 1 to \d+, got"):
        internvit.load_model(folder)  # raised while reading the config, before a model exists


def test_every_preset_is_within_the_bounds():
    from internvit.config import get_config, list_presets

    assert all(get_config(p) for p in list_presets())
