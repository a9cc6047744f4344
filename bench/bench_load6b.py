#!/usr/bin/env python
"""Loading InternViT-6B at real scale: a 48-block, width-3200 bf16 checkpoint (~11.8 GB) in the Hugging Face layout.

Writes ``config.json`` (the fields of the released ``OpenGVLab/InternViT-6B-224px`` config: no ``norm_type``,
``initializer_range`` 1e-10, ``use_flash_attn``, ``torch_dtype bfloat16``, ...), ``model-0000k-of-0000n
.safetensors`` shards of at most ``--max-shard-gb`` GB (5 GB as ``save_pretrained`` writes them) and
``model.safetensors.index.json``, one tensor at a time (random bf16 values). Then, each in a fresh subprocess,
alternating (peer, ours, mmap, mmap, ours, peer):

- peer: ``safetensors.torch.load_file`` of every shard (the bare read of the same files; it memory-maps them);
- ours: ``internvit.load_model(dir, dtype=torch.bfloat16)`` (the default: weights copied into the model's own
  memory, so the files may change afterwards);
- mmap: ``internvit.load_model(dir, dtype=torch.bfloat16, mmap=True)`` (copy-on-write views of the files, as
  the peer);

each followed by reading every tensor once (lazily mapped pages count too). Reported: wall seconds of the load
and load+read (median [min-max] of the two runs), peak RSS (``VmHWM``) minus the RSS after imports ("loader
peak") against the parameter bytes. Goals: loader peak <= 1.15x parameter bytes; load+read time <= 1.5x the
peer's. Then one 224 px bf16 forward (batch 1) of the loaded model, timed, in the last ``ours`` child.

The page cache is set before every child, the same for both, and the cached bytes are printed (measured with
``mincore``), so the cache state cannot favour either side:

- ``cold``: the shards' pages are dropped from the page cache (``posix_fadvise(DONTNEED)`` after a sync; no
  root needed): both read from the disk;
- ``warm``: the shards are read through once right before: both start from a full cache where memory allows.
  On a machine whose RAM holds less than twice the checkpoint, a loader that copies the weights into its own
  memory (ours) cannot keep the whole file cached (it drops each chunk it copied: ``file_reads.drop_behind_for``),
  while a memory map (the peer) shares the cached pages and needs no new memory.

  python bench/bench_load6b.py --tmp /scratch                        # the real size: ~11.8 GB on disk, RAM >= 16 GB
  python bench/bench_load6b.py --quick                              # small check that it runs (~0.5 GB, 3 shards)
                                                                     # (= --blocks 2 --max-shard-gb 0.2)
"""
import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import table  # noqa: E402

import internvit  # noqa: E402
from internvit.file_reads import page_cache_bytes  # noqa: E402

#: config.json of OpenGVLab/InternViT-6B-224px as released (reference-spec §5.1 and reference-spec-2 §4)
HF_CONFIG = {
    "_name_or_path": "OpenGVLab/InternViT-6B-224px",
    "architectures": ["InternVisionModel"],
    "attention_dropout": 0.0,
    "auto_map": {"AutoConfig": "configuration_intern_vit.InternVisionConfig",
                 "AutoModel": "modeling_intern_vit.InternVisionModel"},
    "drop_path_rate": 0.0,
    "dropout": 0.0,
    "hidden_act": "gelu",
    "hidden_size": 3200,
    "image_size": 224,
    "initializer_factor": 0.1,
    "initializer_range": 1e-10,
    "intermediate_size": 12800,
    "layer_norm_eps": 1e-06,
    "model_type": "intern_vit_6b",
    "num_attention_heads": 25,
    "num_channels": 3,
    "num_hidden_layers": 48,
    "patch_size": 14,
    "qk_normalization": True,
    "qkv_bias": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.36.2",
    "use_bfloat16": True,
    "use_flash_attn": True,
}

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch, internvit
def rss(field):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))
kind, path, forward = sys.argv[1], sys.argv[2], sys.argv[3] == '1'
base = rss('VmRSS')
t0 = time.perf_counter()
if kind in ('ours', 'mmap'):
    model = internvit.load_model(path, dtype=torch.bfloat16, mmap=kind == 'mmap')
    tensors = list(model.state_dict().values())
else:
    from safetensors.torch import load_file
    index = json.load(open(os.path.join(path, 'model.safetensors.index.json')))
    state = {{}}
    for shard in sorted(set(index['weight_map'].values())):
        state.update(load_file(os.path.join(path, shard)))
    tensors = list(state.values())
load_s = time.perf_counter() - t0
after_load = rss('VmHWM')
nbytes = sum(t.numel() * t.element_size() for t in tensors)
with torch.no_grad():
    # read every byte once, accumulating in fp32 without an fp32 copy of the tensor
    total = sum(float(c.sum(dtype=torch.float32)) for t in tensors for c in t.reshape(-1).split(1 << 20))
read_s = time.perf_counter() - t0
out = dict(load_s=load_s, read_s=read_s, base=base, hwm=rss('VmHWM'), after_load=after_load, loaded_bytes=nbytes,
           finite=total == total)
if forward:
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode():
        t1 = time.perf_counter()
        y = model(x).last_hidden_state
        out['forward_s'] = time.perf_counter() - t1
    out['forward_finite'] = bool(torch.isfinite(y).all())
print(json.dumps(out))
"""


def write_checkpoint(folder: str, blocks: int, max_shard_bytes: int) -> int:
    """The HF directory, one tensor at a time; returns the parameter bytes."""
    from safetensors.torch import save_file

    cfg = dict(HF_CONFIG, num_hidden_layers=blocks)
    with torch.device("meta"):
        model = internvit.InternViT(internvit.get_config(cfg))
    shapes = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    del model
    gen = torch.Generator().manual_seed(0)

    def value(key: str, shape: tuple) -> torch.Tensor:
        if key.endswith(("norm1.weight", "norm2.weight", "q_norm.weight", "k_norm.weight")):
            return torch.ones(shape, dtype=torch.bfloat16)
        if key.endswith((".ls1", ".ls2")):
            return torch.full(shape, 0.1, dtype=torch.bfloat16)
        if key.endswith(".bias"):
            return torch.zeros(shape, dtype=torch.bfloat16)
        return torch.empty(shape, dtype=torch.float32).uniform_(-0.02, 0.02, generator=gen).to(torch.bfloat16)

    shards, current, size, total = [], {}, 0, 0
    for key, shape in shapes:
        nbytes = 2 * int(torch.Size(shape).numel())
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            tmp = os.path.join(folder, f"shard{len(shards)}.tmp")
            save_file(current, tmp, metadata={"format": "pt"})
            shards[-1] = list(current)
            current, size = {}, 0
        current[key] = value(key, shape)
        size += nbytes
        total += nbytes
    shards.append(current)
    save_file(current, os.path.join(folder, f"shard{len(shards)}.tmp"), metadata={"format": "pt"})
    shards[-1] = list(current)
    n = len(shards)
    weight_map = {}
    for i, keys in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{n:05d}.safetensors"
        os.replace(os.path.join(folder, f"shard{i}.tmp"), os.path.join(folder, name))
        weight_map.update({k: name for k in keys})
    with open(os.path.join(folder, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(cfg, f, indent=2)
    return total


def set_cache(files: list, state: str) -> int:
    """Put ``files`` in the page-cache ``state`` (``cold``: their pages dropped after a sync; ``warm``: read
    through once); returns their bytes resident afterwards."""
    os.sync()
    for path in files:
        fd = os.open(path, os.O_RDONLY)
        try:
            if state == "cold":
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            else:
                while os.read(fd, 1 << 24):
                    pass
        finally:
            os.close(fd)
    return sum(max(0, page_cache_bytes(p)) for p in files)


def child(kind: str, path: str, forward: bool) -> dict:
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.call([sys.executable, "-c", CHILD.format(root=ROOT), kind, path, "1" if forward else "0"],
                             stdout=out)
        out.seek(0)
        text = out.read().strip()
    if rc:
        raise RuntimeError(f"{kind} child exited with status {rc}")
    return json.loads(text.splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--blocks", type=int, default=48, help="48 = InternViT-6B (~11.8 GB in bf16)")
    p.add_argument("--max-shard-gb", type=float, default=5.0, help="shard size limit, GB (10^9 bytes)")
    p.add_argument("--tmp", default=None, help="where to write the checkpoint (needs ~12 GB at full size)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint folder (path printed)")
    p.add_argument("--checkpoint", default=None, help="use this folder written by an earlier --keep run")
    p.add_argument("--cache", choices=("cold", "warm", "both"), default="both",
                   help="page-cache state before every child (default: both, cold first)")
    p.add_argument("--no-forward", action="store_true", help="skip the 224 px bf16 forward")
    p.add_argument("--quick", action="store_true", help="2 blocks, 0.2 GB shards: checks that it runs")
    args = p.parse_args(argv)
    if args.quick:
        args.blocks, args.max_shard_gb = 2, 0.2
    if args.blocks < 1 or args.max_shard_gb <= 0:
        p.error("--blocks must be >= 1 and --max-shard-gb > 0")
    if args.checkpoint is not None and not os.path.isfile(os.path.join(args.checkpoint,
                                                                       "model.safetensors.index.json")):
        p.error(f"--checkpoint {args.checkpoint}: no model.safetensors.index.json there")
    if args.tmp is not None and not os.path.isdir(args.tmp):
        p.error(f"--tmp {args.tmp}: not a directory")
    folder = args.checkpoint or tempfile.mkdtemp(prefix="internvit-6b-hf-", dir=args.tmp)
    try:
        t0 = time.perf_counter()
        if args.checkpoint is None:
            nbytes = write_checkpoint(folder, args.blocks, int(args.max_shard_gb * 1e9))
        else:
            with open(os.path.join(folder, "model.safetensors.index.json")) as f:
                nbytes = json.load(f)["metadata"]["total_size"]
        shard_files = sorted(os.path.join(folder, f) for f in os.listdir(folder) if f.endswith(".safetensors"))
        with open(os.path.join(folder, "config.json")) as f:
            blocks = json.load(f)["num_hidden_layers"]
        print(f"{'wrote' if args.checkpoint is None else 'using'} {folder}: {len(shard_files)} shard(s), "
              f"{nbytes / 1e9:.2f} GB of bf16 parameters ({blocks} blocks, width 3200) in "
              f"{time.perf_counter() - t0:.0f} s")
        with open("/proc/meminfo") as f:
            mem = next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemTotal:"))
        print(f"{os.cpu_count()}-core CPU, {mem / 2**30:.1f} GiB RAM, torch {torch.__version__}")
        states = ["cold", "warm"] if args.cache == "both" else [args.cache]
        order = ["peer", "ours", "mmap", "mmap", "ours", "peer"]
        runs = {s: {"peer": [], "ours": [], "mmap": []} for s in states}
        for si, state in enumerate(states):
            for i, kind in enumerate(order):
                last_ours = si == len(states) - 1 and kind == "ours" and i == 4
                resident = set_cache(shard_files, state)
                r = child(kind, folder, forward=last_ours and not args.no_forward)
                r["resident"] = resident
                if r["loaded_bytes"] != nbytes:
                    print(f"FAIL: {kind} loaded {r['loaded_bytes']} bytes, the checkpoint holds {nbytes}",
                          file=sys.stderr)
                    return 1
                if not r["finite"]:
                    print(f"FAIL: {kind} loaded non-finite values", file=sys.stderr)
                    return 1
                if state == "cold" and resident > 0.01 * nbytes:
                    print(f"FAIL: could not drop the checkpoint from the page cache ({resident / 1e9:.2f} GB "
                          f"still resident)", file=sys.stderr)
                    return 1
                runs[state][kind].append(r)
        gb = 1e9
        ratios = {}
        for state in states:
            rows = []
            for kind, label in (("peer", "safetensors.torch.load_file, all shards [peer]"),
                                ("ours", "internvit.load_model(dir, dtype=bf16)"),
                                ("mmap", "internvit.load_model(dir, dtype=bf16, mmap=True)")):
                rs = runs[state][kind]
                med = {k: statistics.median(r[k] for r in rs) for k in ("load_s", "read_s")}
                loader = max(r["hwm"] - r["base"] for r in rs)
                rows.append([label, f"{min(r['resident'] for r in rs) / gb:.2f}",
                             f"{med['load_s']:.2f} [{min(r['load_s'] for r in rs):.2f}-"
                             f"{max(r['load_s'] for r in rs):.2f}]",
                             f"{med['read_s']:.2f} [{min(r['read_s'] for r in rs):.2f}-"
                             f"{max(r['read_s'] for r in rs):.2f}]",
                             f"{max(r['hwm'] for r in rs) / gb:.2f}", f"{loader / gb:.2f}", f"{loader / nbytes:.3f}"])
            peer_s = statistics.median(r["read_s"] for r in runs[state]["peer"])
            for kind in ("ours", "mmap"):
                ratios[state, kind] = statistics.median(r["read_s"] for r in runs[state][kind]) / peer_s
            print(f"\npage cache {state}: 2 fresh-process runs each, order {', '.join(order)}; statistic: "
                  f"median [min-max]; memory: the larger of the two runs; load+read / peer's: copy (default) "
                  f"{ratios[state, 'ours']:.3f}, mmap=True {ratios[state, 'mmap']:.3f}")
            print(table(rows, ["what", "cached GB at start", "load s", "load+read s", "peak RSS GB",
                               "loader peak GB", "loader peak / params"]))
        ours_peak = max(r["hwm"] - r["base"] for s in states for r in runs[s]["ours"]) / nbytes
        verdict = "met" if ours_peak <= 1.15 else "NOT met"
        print(f"goal loader peak <= 1.15 x parameter bytes: {ours_peak:.3f} -> {verdict}")
        for state in states:
            for kind, what in (("ours", "default (copy)"), ("mmap", "mmap=True")):
                r = ratios[state, kind]
                print(f"goal load+read time <= 1.5 x peer, page cache {state}, {what}: {r:.3f} -> "
                      f"{'met' if r <= 1.5 else 'NOT met'}")
        fwd = runs[states[-1]]["ours"][-1]
        if "forward_s" in fwd:
            print(f"one 224 px bf16 forward (batch 1) of the loaded model: {fwd['forward_s']:.2f} s "
                  f"({torch.get_num_threads()} threads; output finite: {fwd['forward_finite']})")
            if not fwd["forward_finite"]:
                print("FAIL: the forward gave non-finite values", file=sys.stderr)
                return 1
    finally:
        if args.keep or args.checkpoint is not None:
            print(f"kept {folder}")
        else:
            shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
