#!/usr/bin/env python
"""Convert InternViT checkpoints between key families, and released mmseg 0.x segmentors to mmseg 1.x.

  python tools/convert_checkpoint.py to-hf       SRC DST_DIR  [--config PRESET|config.json] [--overwrite]
  python tools/convert_checkpoint.py to-original SRC DST.pth  [--config PRESET|config.json] [--overwrite]
  python tools/convert_checkpoint.py mmseg0x     SRC.pth DST.pth [--overwrite]

The source is read without running code. The destination is written to a temporary name and renamed into
place, so a failure leaves nothing behind; an existing destination is replaced only with ``--overwrite``.
Bad input (a missing, corrupt, truncated or refused file, a checkpoint of another family) is one
``error: ...`` line and exit status 2. A checkpoint that ``tools/train.py`` saved (an mmengine runner checkpoint:
``meta``, ``state_dict``, ``message_hub``, ...) needs no conversion: ``tools/test.py`` and ``tools/train.py``'s
``--resume`` / ``load_from`` read it directly, and every sub-command says so.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, existing_path, run  # noqa: E402


def main(argv=None) -> int:
    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, help_ in (("to-hf", "write a Hugging Face directory (config.json + safetensors)"),
                        ("to-original", "write the original InternVL key family as {'module': state_dict}")):
        p = sub.add_parser(name, help=help_)
        p.add_argument("src", type=existing_path,
                       help="HF directory or weight file (.pth/.bin/.safetensors), either key family")
        p.add_argument("dst")
        p.add_argument("--config", default=None, help="preset name or config.json (needed for bare weight files "
                                                      "whose architecture cannot be inferred)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    p = sub.add_parser("mmseg0x", help="released InternVL mmseg 0.x segmentor checkpoint -> mmengine checkpoint")
    p.add_argument("src", type=existing_path)
    p.add_argument("dst")
    p.add_argument("--overwrite", action="store_true", help="replace an existing destination")
    args = parser.parse_args(argv)
    if os.path.lexists(args.dst) and not args.overwrite:
        raise UsageError(f"{args.dst}: already exists (pass --overwrite to replace it)")
    writes_folder = args.command == "to-hf"
    if os.path.lexists(args.dst) and os.path.isdir(args.dst) != writes_folder:
        raise UsageError(f"{args.dst}: exists and is {'not ' if writes_folder else ''}a folder, but {args.command} "
                         f"writes a {'folder' if writes_folder else 'file'} (--overwrite replaces only the same kind)")
    from internvit import CheckpointError
    from internvit.file_reads import RunnerCheckpointError
    from internvit.runner import held_back_warnings

    try:
        with held_back_warnings():  # library notices while importing / reading: shown only if the conversion works
            out = _convert(args)
    except RunnerCheckpointError as e:  # tools/train.py's own output: say what it is, not that it looks unsafe
        raise RunnerCheckpointError(e.path, e.keys, _runner_checkpoint_message(args.command, e)) from None
    except CheckpointError as e:  # name the source file in every message
        if args.src not in str(e):
            raise CheckpointError(f"{args.src}: {e}") from None
        raise
    print(f"wrote {out}")
    return 0


def _runner_checkpoint_message(command: str, e) -> str:
    """The error line for an mmengine runner checkpoint (``tools/train.py``'s ``iter_N.pth``) given as ``SRC``."""
    from internvit.file_reads import RUNNER_CHECKPOINT_READERS

    if command == "mmseg0x":
        return (f"{e.path}: already an mmseg 1.x checkpoint, nothing to convert: an mmengine runner checkpoint "
                f"({e.described()}); {RUNNER_CHECKPOINT_READERS}")
    return (f"{e.path}: an mmengine runner checkpoint ({e.described()}), not InternViT weights (a Hugging Face "
            f"folder or a weight file of either key family) as {command} converts; {RUNNER_CHECKPOINT_READERS}")


def _convert(args) -> str:
    if args.command == "mmseg0x":
        from segmentation.convert_0x import convert_mmseg0x

        return convert_mmseg0x(args.src, args.dst)
    from internvit.factory import convert_checkpoint

    return convert_checkpoint(args.src, args.dst, to=args.command[3:], config=args.config, overwrite=args.overwrite)


if __name__ == "__main__":
    from internvit.store import StoreError

    sys.exit(run(main, user_errors=(UsageError, OSError, ValueError, KeyError, StoreError)))
