#!/usr/bin/env python
"""Train with an mmengine config (segmentation or classification): mmseg's standard CLI.

  python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--amp] [--cfg-options k=v ...]
                               [--launcher none|pytorch|slurm|mpi] [--local_rank N]
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models (default ./work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume: alone, from the latest checkpoint in the work dir; or from the given checkpoint")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (AmpOptimWrapper)")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings, key=value")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from internvit.runner import build_train_runner

    try:
        # only config / checkpoint problems are one-line errors; failures while training keep their traceback
        runner = build_train_runner(args.config, work_dir=args.work_dir, resume=args.resume, amp=args.amp,
                                    cfg_options=args.cfg_options, launcher=args.launcher, local_rank=args.local_rank)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    runner.train()
    return 0


if __name__ == "__main__":
    sys.exit(main())
