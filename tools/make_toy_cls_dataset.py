#!/usr/bin/env python
"""Render scikit-learn's bundled digits as an ImageFolder-style toy classification set (no download).

    python tools/make_toy_cls_dataset.py data/toy_digits [--image-size 32] [--val-fraction 0.2] [--seed 0]

Every class gets at least one image in each split: a --val-fraction that would leave one without (e.g. 0.001 or
0.999) is refused, naming the resulting counts.

Rerunning with the same arguments keeps the existing dataset. Any other existing non-empty folder (or file)
at the output path is refused unless --overwrite is given.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, nonnegative_int, run  # noqa: E402


def _image_size(value: str) -> int:
    import argparse

    try:
        v = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer between 8 and 1024, got {value!r}") from None
    if not 8 <= v <= 1024:
        raise argparse.ArgumentTypeError(f"must be between 8 and 1024, got {v}")
    return v


def build_parser() -> ArgumentParser:
    import argparse

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output folder (train/<class>/*.png, val/<class>/*.png, train.csv, val.csv)")
    p.add_argument("--image-size", type=_image_size, default=32, help="side of the rendered PNGs (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="share of each class in val, in (0, 1), leaving every class an image in each split "
                        "(default 0.2; checked before any work)")
    p.add_argument("--seed", type=nonnegative_int, default=0, help="seed of the stratified split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace whatever is at the output path")
    return p


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from classification.datasets import make_toy_digits

    m = make_toy_digits(args.out_dir, image_size=args.image_size, val_fraction=args.val_fraction,
                        seed=args.seed, overwrite=args.overwrite)
    print(f"{args.out_dir}: {m['num_train']} train / {m['num_val']} val images, {len(m['classes'])} classes")
    return 0


def main(argv=None) -> int:
    """The exit status: 0, or 2 after one ``error:`` line (argument errors exit 2 from argparse)."""
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
