#!/usr/bin/env python
"""Forward speed of our InternViT-300M against timm's ``vit_intern300m_patch14_448`` (same weights, same process)
and against the machine's measured matmul peak, for fp32 and bf16 at 224 px and 448 px.

Peer: timm's ``vit_intern300m_patch14_448`` (original key family; our weights go in through the core rename
table). Peak: a 2048^3 ``torch.mm`` in the same dtype, timed in the same interleaved rounds as the models.
Statistic: per round, fraction of peak = (model FLOP/s) / (matmul FLOP/s of that round); the table shows the
median with [min-max] over ``--iters`` rounds; ours/timm is the ratio of median times, with the [min-max] of
the per-round ratios. Model FLOPs = 2 x multiply-adds of the linear layers, attention matmuls and patch embed.

Variants (``--variants``) are timed in the same rounds: ``pack`` = ``compile_model(model, 'pack')`` (oneDNN
pre-packed weights, GELU fused into fc1), ``gemm`` = ``set_attention('gemm')`` (matmul-softmax-matmul
attention), ``inductor`` = ``compile_model(model, 'inductor')`` (compiles during warm-up; slow to start).

Correctness (non-zero exit if it fails, after the table): fp32 tokens of ours (and every variant) within 1e-4
of timm's; in bf16, the relative L2 error of ours (and every variant) against our fp32 output is at most 1.05x
that of upstream's bf16 path (``_common.upstream_style_forward``: naive attention, bf16 LayerNorm, separate
LayerScale multiply and residual add); timm's bf16 error is printed too.

  python bench/bench_forward.py                    # the README table: fp32+bf16, 224 px x4 and 448 px x1, 4 blocks
  python bench/bench_forward.py --quick            # tiny check that it runs (1 block, 56/112 px, 3 rounds)
  python bench/bench_forward.py --variants pack,gemm,inductor --iters 25 --json out.json
"""
import argparse
import copy
import os
import statistics
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import (  # noqa: E402
    fail,
    fmt_spread,
    interleaved,
    machine,
    matmul_peak,
    paired_ratios,
    ratio_of_medians,
    rel_error,
    table,
    upstream_style_forward,
    vit_flops,
)

import internvit  # noqa: E402
from internvit.checkpoints import hf_to_original_key  # noqa: E402
from internvit.cli import write_json  # noqa: E402
from internvit.models.vit import compile_model, pack_support  # noqa: E402

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
VARIANTS = ("pack", "gemm", "inductor")
#: goals of issue 14 (fraction of the measured matmul peak; ours/timm for fp32)
GOALS = {("fp32", "small"): 0.85, ("fp32", "large"): 0.85, ("bf16", "small"): 0.75, ("bf16", "large"): 0.70}


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


def make_variant(ours, name: str, dtype: torch.dtype):
    """A copy of ``ours`` set up as variant ``name``; ``(model, None)`` or ``(None, reason it is skipped)``."""
    m = copy.deepcopy(ours)
    if name == "gemm":
        return m.set_attention("gemm"), None
    if name == "pack":
        reason = pack_support(dtype)
        return (None, reason) if reason else (compile_model(m, "pack"), None)
    if name == "inductor":
        return compile_model(m, "inductor"), None
    raise ValueError(name)


@torch.inference_mode()
def run_case(image_size: int, batch: int, depth: int, dtypes, variants, iters: int, warmup: int, label: str,
             failures: list):
    cfg = internvit.get_config("internvit-300m-448px")
    ours32, timm32 = build_pair(depth, image_size)
    x32 = torch.randn(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(1))
    a, b = ours32.forward_features(x32), timm32.forward_features(x32)
    diff = (a - b).abs().max().item()
    print(f"[{image_size}px] max |ours - timm| fp32 tokens {tuple(a.shape)}: {diff:.2e}")
    if diff > 1e-4:
        fail(f"{image_size}px: ours and timm differ by {diff:.2e} > 1e-4 in fp32")
    ref_tokens = a
    flops = vit_flops(batch=batch, image_size=image_size, patch=cfg.patch_size, width=cfg.hidden_size,
                      depth=depth, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads)
    results = []
    for dname in dtypes:
        dtype = DTYPES[dname]
        ours = ours32 if dtype == torch.float32 else copy.deepcopy(ours32).to(dtype)
        peer = timm32 if dtype == torch.float32 else copy.deepcopy(timm32).to(dtype)
        x = x32.to(dtype)
        models = {"ours": ours, "timm": peer}
        notes = []
        for v in variants:
            m, reason = make_variant(ours, v, dtype)
            if m is None:
                notes.append(f"variant {v} skipped: {reason}")
            else:
                models[f"ours+{v}"] = m
        # correctness of every contender (failures are collected; the table is still printed)
        if dtype != torch.float32:
            err_up = rel_error(upstream_style_forward(ours, x), ref_tokens)
            notes.append(f"{dname} rel. L2 error vs our fp32 output: upstream-style {dname} path {err_up:.2e}")
        for name, m in models.items():
            out = m.forward_features(x)
            if dtype == torch.float32:
                d = (out - ref_tokens).abs().max().item()
                if d > 1e-4:
                    failures.append(f"{image_size}px fp32: {name} differs from ours by {d:.2e} > 1e-4")
            else:
                e = rel_error(out, ref_tokens)
                notes.append(f"{dname} rel. L2 error vs our fp32 output: {name} {e:.2e}")
                if name != "timm" and e > 1.05 * err_up:
                    failures.append(f"{image_size}px {dname}: {name} error {e:.2e} > 1.05 x upstream-style "
                                    f"{err_up:.2e}")
        peak_fn, peak_flops = matmul_peak(dtype)
        fns = {"matmul": peak_fn}
        fns.update({k: (lambda m=m, x=x: m.forward_features(x)) for k, m in models.items()})
        times = interleaved(fns, iters, warmup)
        peak = [peak_flops / t for t in times["matmul"]]
        for name in models:
            frac = [flops / t / p for t, p in zip(times[name], peak)]
            row = dict(case=label, image_size=image_size, batch=batch, dtype=dname, model=name,
                       ms=[t * 1e3 for t in times[name]], peak_gflops=[p / 1e9 for p in peak], fraction=frac)
            if name != "timm":
                row["vs_timm_ratio_of_medians"] = ratio_of_medians(times["timm"], times[name])
                row["vs_timm_per_round"] = paired_ratios(times["timm"], times[name])
            results.append(row)
        for n in notes:
            print(f"[{image_size}px {dname}] {n}")
    return results


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depth", type=int, default=4, help="number of blocks (24 in the real model)")
    p.add_argument("--small", default="224x4", help="first case, SIZExBATCH (default 224x4)")
    p.add_argument("--large", default="448x1", help="second case, SIZExBATCH (default 448x1)")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--variants", default="pack,gemm", help=f"comma list from {', '.join(VARIANTS)} ('' for none)")
    p.add_argument("--iters", type=int, default=15, help="interleaved rounds (>= 15 for the README)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="1 block, 56x2 / 112x1, 3 rounds: checks that it runs")
    p.add_argument("--json", default=None, help="also write all per-round numbers here")
    args = p.parse_args(argv)
    if args.quick:
        args.depth, args.small, args.large, args.iters, args.warmup = 1, "56x2", "112x1", 3, 1
    dtypes = [d for d in args.dtypes.split(",") if d]
    variants = [v for v in args.variants.split(",") if v]
    bad = [d for d in dtypes if d not in DTYPES] + [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown dtype/variant: {', '.join(bad)}")
    if args.threads:
        torch.set_num_threads(args.threads)
    import timm

    cases = []
    for label, spec in (("small", args.small), ("large", args.large)):
        size, batch = (int(v) for v in spec.lower().split("x"))
        cases.append((label, size, batch))
    results, failures = [], []
    for label, size, batch in cases:
        results += run_case(size, batch, args.depth, dtypes, variants, args.iters, args.warmup, label, failures)

    print(f"\n{machine()}, timm {timm.__version__}; InternViT-300M shape, {args.depth} blocks, same weights; "
          f"{args.iters} interleaved rounds (order rotating), statistic: median [min-max] over rounds")
    rows = []
    for r in results:
        goal = GOALS.get((r["dtype"], r["case"]))
        frac_med = statistics.median(r["fraction"])
        if r["model"] == "timm":
            vs, verdict = "peer", ""
        else:
            ratio = r["vs_timm_ratio_of_medians"]
            lo, hi = min(r["vs_timm_per_round"]), max(r["vs_timm_per_round"])
            vs = f"{ratio:.3f} [{lo:.3f}-{hi:.3f}]"
            ok = goal is not None and frac_med >= goal and (r["dtype"] != "fp32" or ratio >= 1.0)
            verdict = f">= {goal:.2f}{' and >= 1.0x timm' if r['dtype'] == 'fp32' else ''}: " + \
                ("met" if ok else "NOT met")
        rows.append([f"{r['image_size']}px x{r['batch']}", r["dtype"], fmt_spread(r["peak_gflops"], "{:.0f}"),
                     r["model"], fmt_spread(r["ms"], "{:.1f}"), fmt_spread(r["fraction"]), vs, verdict])
    print(table(rows, ["input", "dtype", "matmul peak GFLOP/s", "model", "ms/batch", "fraction of peak",
                       "speed vs timm (ratio of medians [per-round min-max])", "goal"]))
    if args.json:
        write_json(args.json, dict(machine=machine(), depth=args.depth, iters=args.iters, results=results,
                                   failures=failures), indent=1)
    for msg in failures:
        print(f"FAIL: {msg}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
