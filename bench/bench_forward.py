#!/usr/bin/env python
"""Forward throughput of our InternViT-300M vs timm's ``vit_intern300m_patch14_448``, same weights, same process.

timm's InternViT-300M uses exactly the original InternVL key family (``cls_token``, ``pos_embed``,
``blocks.N.ls1.gamma``, ...), so our weights go into timm through the core rename table
(:func:`internvit.checkpoints.hf_to_original_key`); no extra mapping is needed.

Checks that both give the same tokens (max |diff| <= 1e-4), then times them interleaved (median of
``--iters`` forwards each) and prints images/s and the ``ours/timm`` throughput ratio.

  python bench/bench_forward.py                      # ~1 min on 2 CPU cores (batch 4, 4 blocks, 224 px)
  python bench/bench_forward.py --depth 24 --image-size 448 --batch 2 --iters 3 --dtype bf16
"""
import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import internvit  # noqa: E402
from internvit.checkpoints import hf_to_original_key  # noqa: E402


def build_pair(depth: int, image_size: int, seed: int = 0):
    """Our model and timm's with identical random weights (LayerScale and norms perturbed so layout bugs show)."""
    import timm

    torch.manual_seed(seed)
    cfg = internvit.get_config("internvit-300m-448px")
    cfg.num_hidden_layers, cfg.image_size = depth, image_size
    ours = internvit.build_model(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            if ".ls" in name or "norm" in name:
                p.uniform_(0.5, 1.5)
            elif name.endswith("bias"):
                p.normal_(0, 0.02)
    ref = timm.create_model("vit_intern300m_patch14_448", pretrained=False, depth=depth, img_size=image_size).eval()
    sd = {hf_to_original_key(k): v for k, v in ours.state_dict().items()}
    result = ref.load_state_dict(sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys, result
    return ours, ref


@torch.inference_mode()
def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--depth", type=int, default=4, help="number of blocks (24 in the real model)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--iters", type=int, default=7)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    ours, ref = build_pair(args.depth, args.image_size)
    x = torch.randn(args.batch, 3, args.image_size, args.image_size)
    a, b = ours.forward_features(x), ref.forward_features(x)
    diff = (a - b).abs().max().item()
    print(f"max |ours - timm| over {tuple(a.shape)} tokens (fp32): {diff:.2e}")
    if diff > 1e-4:
        print("FAIL: outputs differ by more than 1e-4", file=sys.stderr)
        return 1

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    ours, ref, x = ours.to(dtype), ref.to(dtype), x.to(dtype)
    models = {"ours": ours.forward_features, "timm": ref.forward_features}
    for _ in range(args.warmup):
        for f in models.values():
            f(x)
    times = {k: [] for k in models}
    for i in range(args.iters):  # interleaved, order alternating, so load from other processes hits both alike
        for k in (list(models) if i % 2 == 0 else list(models)[::-1]):
            t0 = time.perf_counter()
            models[k](x)
            times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    pair_ratio = statistics.median(t / o for t, o in zip(times["timm"], times["ours"]))
    print(f"torch {torch.__version__}, timm {timm.__version__}, {torch.get_num_threads()} threads, {args.dtype}, "
          f"batch {args.batch}, depth {args.depth}, {args.image_size}px, {args.iters} iters (median)")
    for k in models:
        print(f"  {k:5s} {med[k] * 1000:8.1f} ms/batch  {args.batch / med[k]:7.2f} images/s")
    print(f"ours/timm throughput ratio: {med['timm'] / med['ours']:.3f} (ratio of medians), "
          f"{pair_ratio:.3f} (median of per-iteration ratios)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
