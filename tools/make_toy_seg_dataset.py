#!/usr/bin/env python
"""Generate the synthetic toy segmentation dataset (coloured shapes on noisy backgrounds, ADE20K layout).

  python tools/make_toy_seg_dataset.py [data/toy_seg] [--num-train 96] [--num-val 16] [--seed 0]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", nargs="?", default="data/toy_seg", help="output folder (default data/toy_seg)")
    parser.add_argument("--num-train", type=int, default=96)
    parser.add_argument("--num-val", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    from segmentation.toy_data import make_toy_seg_dataset

    try:
        out = make_toy_seg_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed)
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} ({args.num_train} training + {args.num_val} validation images)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
