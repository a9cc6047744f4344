#!/usr/bin/env python
"""Zero-shot classification of an image folder or CSV with InternVL-C/G (acc@1, acc@5, mean per-class recall).

Example:
  python tools/zeroshot_eval.py --model /models/InternVL-14B-224px --data /data/imagenet/val \
      --mode InternVL-G --lang en --output work_dirs/zeroshot_in1k.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

DTYPES = ("float32", "float16", "bfloat16")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="InternVL directory (config.json + weights + tokenizer.model)")
    p.add_argument("--data", required=True, help="image folder <root>/<class>/<image> or a CSV of path,label")
    p.add_argument("--classnames", default=None,
                   help="shipped key (imagenet1k, imagenet-a, imagenet-r, ...), a .txt/.json file; default: the "
                        "folder names (ImageNet WordNet-id folders get their ImageNet names)")
    p.add_argument("--templates", default=None, help="shipped key or .txt/.json file (default: --dataset's)")
    p.add_argument("--dataset", default="imagenet1k", help="dataset key for the default templates")
    p.add_argument("--mode", default="InternVL-C", choices=("InternVL-C", "InternVL-G"))
    p.add_argument("--lang", default="en", help="en, zh, ja, ar or it")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or folder (default: the model folder)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--text-batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--dtype", default="float32", choices=DTYPES)
    p.add_argument("--device", default="cpu")
    p.add_argument("--output", default="zeroshot_results.json", help="JSON file to write (atomically)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    from classification.zero_shot import run_zero_shot

    try:
        result = run_zero_shot(
            args.model, args.data, classnames=args.classnames, templates=args.templates, lang=args.lang,
            dataset=args.dataset, mode=args.mode, tokenizer=args.tokenizer, batch_size=args.batch_size,
            text_batch_size=args.text_batch_size, dtype=getattr(torch, args.dtype), device=args.device,
            num_workers=args.workers, output=args.output)
    except (OSError, ValueError, KeyError) as e:
        print(f"zeroshot_eval: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2, ensure_ascii=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
