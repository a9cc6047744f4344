#!/usr/bin/env python
"""Peak memory and wall time of ``internvit.load_model`` on a ~2 GB InternViT-6B-width checkpoint.

Writes a synthetic checkpoint (width 3200, 25 heads, MLP 12800, ``--layers`` blocks, fp32) into a temporary
folder in two forms: a Hugging Face directory (``config.json`` + ``model.safetensors``) and an original-family
``.pth`` (``{'module': state_dict}``, keys ``cls_token`` / ``blocks.N.*``). Each load runs in a fresh
subprocess, which then reads every tensor once (lazily memory-mapped pages count too); its peak RSS
(``VmHWM`` of ``/proc/self/status``) is compared with the parameter bytes
and with the bare readers ``safetensors.torch.load_file`` / ``torch.load(weights_only=True)`` as peers.
``loader peak`` = peak RSS minus the RSS after ``import torch, internvit`` (what the load itself costs).
The temporary folder is removed at the end.

The loaded model owns its memory (safetensors are read, ``.pth`` tensors copied out of the memory map with the
mapped pages released as it goes), so peak RSS stays near one copy of the parameters.

  python bench/bench_load.py              # 4 blocks ≈ 1.98 GB of parameters, ~1-2 min
  python bench/bench_load.py --layers 8 --tmp /scratch
  python bench/bench_load.py --quick      # the tiny 6B-style preset: checks the script runs (numbers meaningless)
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import internvit  # noqa: E402
from internvit.checkpoints import hf_to_original_key  # noqa: E402

CHILD = r"""
import json, os, sys, time
sys.path.insert(0, {root!r})
import torch, internvit
def rss(field):
    with open('/proc/self/status') as f:
        return next(int(l.split()[1]) * 1024 for l in f if l.startswith(field + ':'))
base = rss('VmRSS')
kind, path, cfg = sys.argv[1], sys.argv[2], sys.argv[3] or None
t0 = time.perf_counter()
if kind == 'load_model':
    obj = internvit.load_model(path, cfg)
    nbytes = sum(p.numel() * p.element_size() for p in obj.state_dict().values())
elif kind == 'safetensors.load_file':
    from safetensors.torch import load_file
    obj = load_file(path)
    nbytes = sum(t.numel() * t.element_size() for t in obj.values())
else:
    obj = torch.load(path, map_location='cpu', weights_only=True)
    nbytes = sum(t.numel() * t.element_size() for t in obj['module'].values())
dt = time.perf_counter() - t0
tensors = obj.state_dict().values() if kind == 'load_model' else (obj.values() if kind != 'torch.load'
                                                                      else obj['module'].values())
with torch.no_grad():
    total = sum(float(t.float().sum()) for t in tensors)  # read every byte: lazily mapped pages count too
print(json.dumps(dict(seconds=dt, touched=time.perf_counter() - t0, base=base, hwm=rss('VmHWM'),
                      loaded_bytes=nbytes)))
"""


def make_checkpoint(folder: str, layers: int, preset: str = "internvit-6b-224px") -> tuple[str, str, int]:
    """Write the HF directory and the original-family .pth; returns (hf_dir, pth, parameter bytes)."""
    cfg = internvit.get_config(preset)
    cfg.num_hidden_layers = layers
    torch.manual_seed(0)
    model = internvit.build_model(cfg, init=False)  # values do not matter; skip the slow trunc-normal init
    hf_dir = internvit.save_model(model, os.path.join(folder, "hf"))
    pth = os.path.join(folder, "original.pth")
    torch.save({"module": {hf_to_original_key(k): v for k, v in model.state_dict().items()}}, pth)
    nbytes = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    del model
    return hf_dir, pth, nbytes


def measure(kind: str, path: str, config: str = "") -> dict:
    with tempfile.TemporaryFile("w+") as out:
        rc = subprocess.call([sys.executable, "-c", CHILD.format(root=ROOT), kind, path, config], stdout=out)
        if rc:
            raise RuntimeError(f"{kind} {path}: child exited with {rc}")
        out.seek(0)
        # VmHWM, not the parent's wait4 ru_maxrss: on Linux a child's ru_maxrss starts from the parent's RSS
        return json.loads(out.read().strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=4, help="blocks of width 3200 (~0.49 GB each in fp32)")
    p.add_argument("--tmp", default=None, help="where to write the temporary checkpoint")
    p.add_argument("--quick", action="store_true", help="tiny preset instead of width 3200 (a smoke test)")
    args = p.parse_args(argv)
    if args.layers < 1:
        p.error(f"--layers must be >= 1, got {args.layers}")
    folder = tempfile.mkdtemp(prefix="internvit-bench-load-", dir=args.tmp)
    try:
        preset = "internvit-6b-tiny" if args.quick else "internvit-6b-224px"
        hf_dir, pth, nbytes = make_checkpoint(folder, args.layers, preset)
        cfg_json = os.path.join(hf_dir, "config.json")
        st = os.path.join(hf_dir, "model.safetensors")
        runs = [
            ("load_model(HF dir, safetensors)", "load_model", hf_dir, ""),
            ("safetensors.torch.load_file  [peer]", "safetensors.load_file", st, ""),
            ("load_model(original .pth)", "load_model", pth, cfg_json),
            ("torch.load(weights_only)     [peer]", "torch.load", pth, ""),
        ]
        gb = 1024 ** 3
        print(f"parameters: {nbytes / gb:.2f} GiB fp32 ({args.layers} blocks of {preset}); "
              f"safetensors file {os.path.getsize(st) / gb:.2f} GiB, .pth {os.path.getsize(pth) / gb:.2f} GiB")
        print(f"{'what':38s} {'wall s':>7s} {'+read s':>8s} {'peak RSS':>9s} {'loader peak':>12s} {'peak/params':>12s} "
              f"{'loader/params':>14s}")
        results = {}
        for label, kind, path, cfg in runs:
            r = measure(kind, path, cfg)
            assert r["loaded_bytes"] == nbytes, (label, r["loaded_bytes"], nbytes)
            peak, loader = r["hwm"], r["hwm"] - r["base"]
            results[label] = r
            print(f"{label:38s} {r['seconds']:7.2f} {r['touched']:8.2f} {peak / gb:8.2f}G {loader / gb:11.2f}G "
                  f"{peak / nbytes:12.2f} {loader / nbytes:14.2f}")
        ours, peer = results[runs[0][0]], results[runs[1][0]]
        print(f"load_model vs safetensors.load_file: wall incl. reading {ours['touched'] / peer['touched']:.2f}x, "
              f"loader peak {(ours['hwm'] - ours['base']) / (peer['hwm'] - peer['base']):.2f}x")
        goal = (ours["hwm"] - ours["base"]) / nbytes
        print(f"goal loader peak <= 1.15 x parameter bytes: {'met' if goal <= 1.15 else 'NOT met'} ({goal:.2f})")
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
