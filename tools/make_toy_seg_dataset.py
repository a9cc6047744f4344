#!/usr/bin/env python
"""Generate the synthetic toy segmentation dataset (coloured shapes on noisy backgrounds, ADE20K layout).

  python tools/make_toy_seg_dataset.py [data/toy_seg] [--num-train 96] [--num-val 16] [--seed 0] [--overwrite]

Rerunning with the same arguments keeps the existing dataset. Any other existing non-empty folder (or file)
at the output path is refused unless --overwrite is given.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, nonnegative_int, positive_int, run  # noqa: E402


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", nargs="?", default="data/toy_seg", help="output folder (default data/toy_seg)")
    p.add_argument("--num-train", type=positive_int, default=96)
    p.add_argument("--num-val", type=positive_int, default=16)
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at the output path")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from segmentation.toy_data import make_toy_seg_dataset

    out = make_toy_seg_dataset(args.out, num_train=args.num_train, num_val=args.num_val, seed=args.seed,
                               overwrite=args.overwrite)
    print(f"{out}: {args.num_train} training + {args.num_val} validation images")
    return 0


def main(argv=None) -> int:
    """The exit status: 0, or 2 after one ``error:`` line (argument errors exit 2 from argparse)."""
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
