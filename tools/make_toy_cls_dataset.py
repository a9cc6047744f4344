"""Render scikit-learn's bundled digits as an ImageFolder-style toy classification set (no download).

    python tools/make_toy_cls_dataset.py data/toy_digits [--image-size 32] [--val-fraction 0.2] [--seed 0]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from classification.datasets import make_toy_digits  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output folder (train/<class>/*.png, val/<class>/*.png, train.csv, val.csv)")
    p.add_argument("--image-size", type=int, default=32, help="side of the rendered PNGs (default 32)")
    p.add_argument("--val-fraction", type=float, default=0.2, help="share of each class in val (default 0.2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the stratified split (default 0)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing different folder")
    args = p.parse_args(argv)
    try:
        m = make_toy_digits(args.out_dir, image_size=args.image_size, val_fraction=args.val_fraction,
                            seed=args.seed, overwrite=args.overwrite)
    except (ValueError, FileExistsError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out_dir}: {m['num_train']} train / {m['num_val']} val images, {len(m['classes'])} classes")
    return 0


if __name__ == "__main__":
    sys.exit(main())
