#!/usr/bin/env python
"""Zero-shot classification of an image folder or CSV with InternVL-C/G (acc@1, acc@5, mean per-class recall).

Example:
  python tools/zeroshot_eval.py --model /models/InternVL-14B-224px --data /data/imagenet/val \
      --mode InternVL-G --lang en --output work_dirs/zeroshot_in1k.json

Videos (--video; frames by segment midpoints, frame embeddings normalised, averaged, renormalised):
  python tools/zeroshot_eval.py --video --model /models/InternVL-14B-224px --data /data/k400/val \
      --classnames kinetics400 --num-frames 8 --output work_dirs/zeroshot_k400_8f.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, device, dtype_arg, nonnegative_int, positive_int, run  # noqa: E402

LANGS = ("en", "zh", "ja", "ar", "it", "cn", "jp")
#: at most this many skipped files are named on stderr (all are listed in --output's "failed")
MAX_SKIPPED_LINES = 10


def parse_args(argv=None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="InternVL directory (config.json + weights + tokenizer.model)")
    p.add_argument("--data", required=True, help="image folder <root>/<class>/<image> or a CSV of path,label")
    p.add_argument("--classnames", default=None,
                   help="shipped key (imagenet1k, imagenet-a, imagenet-r, ...), a .txt/.json file; default: the "
                        "folder names (ImageNet WordNet-id folders get their ImageNet names)")
    p.add_argument("--templates", default=None, help="shipped key or .txt/.json file (default: --dataset's)")
    p.add_argument("--dataset", default=None,
                   help="dataset key for the default templates (default: imagenet1k; kinetics400 with --video); "
                        "refused with --templates (it would be unused)")
    p.add_argument("--mode", default="InternVL-C", choices=("InternVL-C", "InternVL-G"))
    p.add_argument("--lang", default=None, help="en (default), zh, ja, ar or it (cn/jp accepted): the language of "
                   "the shipped class names and templates; refused when none is used (files / folder names only)")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model or folder (default: the model folder)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="images per batch (default 64); with --video, "
                   "videos per batch (default 8; a forward pass sees batch-size x num-frames frames)")
    p.add_argument("--text-batch-size", type=positive_int, default=256)
    p.add_argument("--workers", type=nonnegative_int, default=2)
    p.add_argument("--dtype", default="float32", type=dtype_arg, help="fp32, bf16, fp16, fp64 or torch's names")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--output", default=None,
                   help="JSON file to write as well (atomically; an existing file needs --overwrite); default: the "
                        "result is only printed")
    p.add_argument("--overwrite", action="store_true", help="replace --output whatever it holds")
    v = p.add_argument_group("video (docs/classification.md, 'Zero-shot video classification')")
    v.add_argument("--video", action="store_true", help="--data holds videos: <root>/<class>/<video> or a CSV of "
                   "path,label; --classnames may be kinetics400/kinetics600/kinetics700")
    v.add_argument("--num-frames", type=positive_int, default=None,
                   help="frames sampled per video (default 8; 1 = middle)")
    v.add_argument("--resize-mode", default=None, choices=("crop", "squash"),
                   help="frame preprocessing: short-side resize + centre crop (default) or squash")
    args = p.parse_args(argv)
    if args.lang is not None and args.lang.lower() not in LANGS:
        p.error(f"--lang {args.lang}: unknown language; known: en, zh, ja, ar, it (cn, jp accepted)")
    if args.video and args.lang is not None:
        p.error("--lang applies to images only: the video class names and templates are English")
    if args.video and args.dataset is not None and args.dataset.strip().lower().replace("-", "").replace("_", "") \
            not in ("kinetics400", "kinetics600", "kinetics700", "k400", "k600", "k700"):
        p.error(f"--dataset {args.dataset}: unknown video dataset; known: kinetics400, kinetics600, kinetics700")
    if not args.video:  # video options are refused without --video, never silently ignored
        given = [f for f, v in (("--num-frames", args.num_frames), ("--resize-mode", args.resize_mode)) if v]
        if given:
            p.error(f"{given[0]} applies to videos only: add --video")
    args.num_frames = args.num_frames or 8
    args.resize_mode = args.resize_mode or "crop"
    return args


#: the ``written_by`` values of the results run_zero_shot / run_video_zero_shot write (``--output``)
RESULT_MARKERS = ("classification.zero_shot", "classification.video")


def _is_own_result(path: str) -> bool:
    """Whether ``path`` holds a result this tool wrote: its ``written_by`` field names it (never a guess from
    other keys; results written before the field was added do not count)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and data.get("written_by") in RESULT_MARKERS


def _looks_like_old_result(path: str) -> bool:
    """Whether ``path`` has the keys of an unmarked result (for the wording of a refusal only)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"acc1", "acc5", "num_samples", "model"} <= set(data)




def _check_output(path: str, overwrite: bool = False) -> None:
    if os.path.isdir(path):
        raise UsageError(f"--output {path}: is a folder (give a .json file path)")
    from internvit.store import check_outside_managed

    check_outside_managed("--output", path)
    if os.path.lexists(path) and not overwrite:
        # only the wording depends on what it holds: an existing file is never replaced without --overwrite
        what = ("holds a zero-shot result" if _is_own_result(path) else
                "holds a zero-shot result written before results were marked ('written_by')"
                if _looks_like_old_result(path) else "is not a zero-shot result (no 'written_by' field of this tool)")
        raise UsageError(f"--output {path}: exists and {what}; refusing to replace it (pass --overwrite)")
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.isdir(parent):  # the nearest existing folder must be writable (folders are created)
        if os.path.lexists(parent):
            raise UsageError(f"--output {path}: {parent} is not a folder")
        parent = os.path.dirname(parent)
    if not os.access(parent, os.W_OK):
        raise UsageError(f"--output {path}: {parent} is not writable")


def _main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.exists(args.data):
        raise UsageError(f"--data {args.data}: no such folder or CSV file")
    if args.output is not None:
        _check_output(args.output, args.overwrite)
    elif args.overwrite:
        raise UsageError("--overwrite without --output: nothing is written")
    if not os.path.exists(args.model) and os.sep in args.model:
        raise UsageError(f"--model {args.model}: no such file or folder")
    if args.tokenizer is not None and not os.path.exists(args.tokenizer):
        raise UsageError(f"--tokenizer {args.tokenizer}: no such file or folder")
    import torch

    from classification.zero_shot import run_zero_shot

    if args.video:
        return _video(args)
    if args.dataset is not None:
        from classification.zero_shot import check_dataset

        check_dataset(args.dataset)
        if args.templates is not None:
            raise UsageError(f"--dataset {args.dataset}: only picks the default templates, and --templates is "
                             f"given (drop one)")
    args.batch_size = args.batch_size or 64
    result = run_zero_shot(
        args.model, args.data, classnames=args.classnames, templates=args.templates, lang=args.lang,
        dataset=args.dataset, mode=args.mode, tokenizer=args.tokenizer, batch_size=args.batch_size,
        text_batch_size=args.text_batch_size, dtype=getattr(torch, args.dtype), device=args.device,
        num_workers=args.workers, output=args.output)
    _report(result, args, "images")
    return 0


def _report(result: dict, args, what: str) -> None:
    """Print the result (without the list of skipped files) and name the skipped files on stderr (at most
    :data:`MAX_SKIPPED_LINES` lines, then a count)."""
    print(json.dumps({k: v for k, v in result.items() if k != "failed"}, indent=2, ensure_ascii=False))
    failed = result.get("failed", [])
    for f in failed[:MAX_SKIPPED_LINES]:
        print(f"skipped {f['path']}: {f['error']}", file=sys.stderr)
    if len(failed) > MAX_SKIPPED_LINES:
        where = f" (all listed in {args.output}, 'failed')" if args.output else " (--output lists them all)"
        print(f"skipped {len(failed) - MAX_SKIPPED_LINES} more {what}{where}", file=sys.stderr)
    if result.get("num_short_videos"):
        print(f"{result['num_short_videos']} of {result['num_samples']} videos have fewer than "
              f"{result['num_frames']} frames: their sampled frames repeat", file=sys.stderr)


def main(argv=None) -> int:
    """The exit status: 0, or 2 after one ``error:`` line (argument errors exit 2 from argparse)."""
    return run(_main, argv)


def _video(args) -> int:
    import torch

    from classification.video import run_video_zero_shot

    result = run_video_zero_shot(
        args.model, args.data, num_frames=args.num_frames, classnames=args.classnames, templates=args.templates,
        dataset=args.dataset, mode=args.mode, tokenizer=args.tokenizer,
        batch_size=args.batch_size or 8, text_batch_size=args.text_batch_size, dtype=getattr(torch, args.dtype),
        device=args.device, num_workers=args.workers, resize_mode=args.resize_mode, output=args.output)
    _report(result, args, "videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
