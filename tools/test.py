#!/usr/bin/env python
"""Evaluate a checkpoint with an mmengine config (segmentation or classification): mmseg's standard CLI.

  python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out PATH]
                                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def parse_args(argv=None):
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file (our training runs, or tools/convert_checkpoint.py)")
    parser.add_argument("--work-dir", help="the dir to save logs and metrics")
    parser.add_argument("--show-dir", help="write prediction overlays (image | prediction) to this dir")
    parser.add_argument("--out", help="save predictions: a dir of label PNGs (mmseg configs) or a .pkl file")
    parser.add_argument("--cfg-options", nargs="+", action=DictAction, help="override config settings, key=value")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from internvit.runner import build_test_runner

    try:
        # only config / checkpoint problems are one-line errors; failures while testing keep their traceback
        runner = build_test_runner(args.config, args.checkpoint, work_dir=args.work_dir, show_dir=args.show_dir,
                                   out=args.out, cfg_options=args.cfg_options, launcher=args.launcher,
                                   local_rank=args.local_rank)
    except (OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    metrics = runner.test()
    print(json.dumps({k: round(float(v), 4) if isinstance(v, (int, float)) or hasattr(v, "item") else str(v)
                      for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
