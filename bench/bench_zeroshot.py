#!/usr/bin/env python
"""Zero-shot classifier building: batched across classes and templates vs the per-class loop, same model.

The peer is the classic loop (one ``encode_text`` call per class over its templates, as the original
CLIP/CLIP_benchmark code does). Both run in this process on the same random InternVL text tower; the
script prints both timings, their ratio and the largest difference between the two weight matrices.

  python bench/bench_zeroshot.py [--classes 100] [--templates 80] [--hidden 256] [--layers 4]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import internvit  # noqa: E402
from classification.zero_shot import build_zero_shot_classifier, load_classnames, load_templates  # noqa: E402


def per_class_loop(model, tokenizer, classnames, templates) -> torch.Tensor:
    """The peer: one forward per class over that class's templates."""
    cols = []
    with torch.no_grad():
        for c in classnames:
            emb = F.normalize(model.encode_text(tokenizer([t.format(c=c) for t in templates])).float(), dim=-1)
            cols.append(F.normalize(emb.mean(0), dim=-1))
    return torch.stack(cols, dim=1)


def best_of(fn, repeats: int) -> tuple[float, torch.Tensor]:
    best, out = float("inf"), None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", default=os.path.join(os.path.dirname(ROOT), "shared", "fixtures",
                                                       "internvl-cg-tiny", "tokenizer.model"))
    p.add_argument("--classes", type=int, default=100)
    p.add_argument("--templates", type=int, default=80)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: leave the default)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = internvit.get_config("internvl-tiny")
    q = cfg.qllama_config
    q.hidden_size, q.intermediate_size, q.num_hidden_layers, q.num_attention_heads = (
        args.hidden, 4 * args.hidden, args.layers, max(1, args.hidden // 64))
    torch.manual_seed(0)
    model = internvit.build_model(cfg).eval()
    tok = internvit.get_tokenizer(args.tokenizer)
    classnames = load_classnames("en")[: args.classes]
    templates = load_templates("en")[: args.templates]

    t_loop, w_loop = best_of(lambda: per_class_loop(model, tok, classnames, templates), args.repeats)
    t_ours, w_ours = best_of(lambda: build_zero_shot_classifier(model, tok, classnames, templates,
                                                                batch_size=args.batch_size), args.repeats)
    n = len(classnames) * len(templates)
    print(f"model: random InternVL text tower, hidden {args.hidden}, {args.layers} layers; "
          f"{len(classnames)} classes x {len(templates)} templates = {n} texts; torch threads "
          f"{torch.get_num_threads()}; {torch.__version__}")
    print(f"per-class loop (peer):       {t_loop:8.3f} s  ({n / t_loop:8.0f} texts/s)")
    print(f"build_zero_shot_classifier:  {t_ours:8.3f} s  ({n / t_ours:8.0f} texts/s)")
    print(f"speed-up vs per-class loop:  {t_loop / t_ours:8.2f}x   (max |diff| of weights "
          f"{(w_loop - w_ours).abs().max().item():.2e})")


if __name__ == "__main__":
    main()
