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
import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, device, dtype_arg, nonnegative_int, positive_int, run  # noqa: E402

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


def _position(argv: list, options: tuple) -> float:
    """Where the last of ``options`` is given on the command line (``--opt value`` or ``--opt=value``; an option
    given twice counts where its value is taken, the last time)."""
    def given(opt: str) -> float:
        return max((i for i, a in enumerate(argv) if a == opt or a.startswith(opt + "=")), default=math.inf)

    return max(given(o) for o in options)


def _path_checks(args) -> list:
    """``[(options, check)]`` of the paths the command line names (each check raises :class:`UsageError`)."""
    def data() -> None:
        if not os.path.exists(args.data):
            raise UsageError(f"--data {args.data}: no such folder or CSV file")

    def output() -> None:
        if args.output is not None:
            _check_not_an_input(args)  # first: --overwrite would not help
            _check_output(args.output, args.overwrite)
        elif args.overwrite:
            raise UsageError("--overwrite without --output: nothing is written")

    def model() -> None:
        if not os.path.exists(args.model) and os.sep in args.model:
            raise UsageError(f"--model {args.model}: no such file or folder")

    def tokenizer() -> None:
        if args.tokenizer is not None and not os.path.exists(args.tokenizer):
            raise UsageError(f"--tokenizer {args.tokenizer}: no such file or folder")

    return [(("--model",), model), (("--data",), data), (("--tokenizer",), tokenizer),
            (("--output",) if args.output is not None else ("--overwrite",), output)]


def check_inputs(args, argv: list) -> None:
    """The one input check of the image and the video command (``--video``): the paths, then everything
    :func:`classification.zero_shot.zero_shot_input_errors` refuses (class names, templates, dataset, language,
    frames), all before any data is read or any model loaded. Of the problems found, the one about the option
    given first on the command line is raised (a :class:`UsageError` naming that option and its value)."""
    from classification.zero_shot import zero_shot_input_errors

    problems = []
    for options, check in _path_checks(args):
        try:
            check()
        except UsageError as e:
            problems.append((_position(argv, options), str(e)))
    values = {"--classnames": args.classnames, "--templates": args.templates, "--dataset": args.dataset,
              "--lang": args.lang, "--num-frames": args.num_frames}
    for options, message, _ in zero_shot_input_errors(
            classnames=args.classnames, templates=args.templates, dataset=args.dataset, lang=args.lang,
            video=args.video, num_frames=args.num_frames, batch_size=args.batch_size, model=args.model):
        flag = options[0]
        problems.append((_position(argv, options), f"{flag} {values[flag]}: {message}"))
    if problems:
        raise UsageError(min(problems, key=lambda p: p[0])[1])  # min keeps the first of equal positions


def _check_not_an_input(args) -> None:
    """Refuse an ``--output`` that is one of the files the run reads (it would be replaced by the result)."""
    from classification.zero_shot import refuse_output_onto_input, zero_shot_inputs

    inputs = zero_shot_inputs(args.data, classnames=args.classnames, templates=args.templates, model=args.model,
                              tokenizer=args.tokenizer)
    try:
        refuse_output_onto_input(args.output, [(f"--{name}", path) for name, path in inputs])
    except ValueError as e:
        raise UsageError(f"--output {e}") from None


def _main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.video:
        args.batch_size = args.batch_size or 8
    check_inputs(args, argv)
    import torch

    from classification.zero_shot import run_zero_shot

    if args.video:
        return _video(args)
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
        batch_size=args.batch_size, text_batch_size=args.text_batch_size, dtype=getattr(torch, args.dtype),
        device=args.device, num_workers=args.workers, resize_mode=args.resize_mode, output=args.output)
    _report(result, args, "videos")
    return 0


if __name__ == "__main__":
    sys.exit(main())
