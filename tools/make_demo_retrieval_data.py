#!/usr/bin/env python
"""Make the demo's image-caption set from scikit-learn's handwritten digits (real 8x8 scans, no download):
upscaled PNGs, captions in English, French and Chinese, and a SentencePiece tokenizer trained on them.

  python tools/make_demo_retrieval_data.py OUT [--image-size 56] [--val-fraction 0.25] [--seed 0]
                                           [--image-ids image|digit] [--per-class N] [--overwrite]

Writes OUT/images/{train,val}/<digit>/*.png, OUT/train.json (COCO-Karpathy style pairs), OUT/val.json and
OUT/val_10.json (evaluation lists), OUT/tokenizer.model and OUT/meta.json.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, fraction, positive_int, run  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("out_dir", help="output folder (refused if it exists, unless --overwrite and made by this tool)")
    p.add_argument("--image-size", type=positive_int, default=56, help="side of the PNGs in pixels (default 56)")
    p.add_argument("--val-fraction", type=fraction, default=0.25, help="held-out share of each digit (default 0.25)")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the caption templates")
    p.add_argument("--image-ids", choices=["image", "digit"], default="image",
                   help="training positives: the captions of the same scan (image) or of the same digit (digit)")
    p.add_argument("--per-class", type=positive_int, default=None, help="keep only N scans of each digit")
    p.add_argument("--vocab-size", type=positive_int, default=256, help="tokenizer pieces at most (default 256)")
    p.add_argument("--overwrite", action="store_true", help="replace a folder this tool made before")
    args = p.parse_args(argv)
    if not 0 < args.val_fraction < 1:
        p.error(f"argument --val-fraction: must be between 0 and 1 (exclusive), got {args.val_fraction}")
    from retrieval.finetune.demo_data import make_digit_pairs

    m = make_digit_pairs(args.out_dir, image_size=args.image_size, val_fraction=args.val_fraction, seed=args.seed,
                         vocab_size=args.vocab_size, per_class=args.per_class, image_ids=args.image_ids,
                         overwrite=args.overwrite)
    print(f"{args.out_dir}: {m['num_train_images']} train images ({m['num_train_captions']} captions), "
          f"{m['num_val_images']} held-out images, languages {', '.join(m['languages'])}, "
          f"tokenizer {m['vocab_size']} pieces")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
