#!/usr/bin/env python
"""Evaluate a checkpoint with an mmengine config (segmentation or classification): mmseg's standard CLI.

  python tools/test.py CONFIG CHECKPOINT [--work-dir DIR] [--show-dir DIR] [--out PATH]
                                         [--cfg-options k=v ...] [--launcher none|pytorch|slurm|mpi]

The checkpoint is read without running code and must fit the config's model (missing, unexpected or
mis-shaped keys are an error), and its classes must be the test set's. Set-up problems are one ``error: ...``
line and exit status 2, and so is bad input data met while testing (an image that cannot be read: the file is
named) and a model output that is not finite (NaN/inf: no metric is computed over it); any other failure while
testing keeps its traceback. Prints the metrics as one JSON line.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, close_process_group, exit_tool, nonnegative_int, run  # noqa: E402,E501


def parse_args(argv=None):
    from internvit.runner import cfg_options_action

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="test config file path")
    parser.add_argument("checkpoint", help="checkpoint file (our training runs, or tools/convert_checkpoint.py)")
    parser.add_argument("--work-dir", help="the dir to save logs and metrics")
    parser.add_argument("--show-dir", help="write prediction overlays (image | prediction) to this dir")
    parser.add_argument("--out", help="save predictions: a dir of label PNGs (mmseg configs) or a .pkl file")
    parser.add_argument("--overwrite", action="store_true",
                        help="let --out / --show-dir replace an existing file or write into a non-empty folder")
    parser.add_argument("--cfg-options", nargs="+", action=cfg_options_action(),
                        help="override config settings, key=value")
    parser.add_argument("--launcher", choices=["none", "pytorch", "slurm", "mpi"], default="none")
    parser.add_argument("--local_rank", "--local-rank", type=nonnegative_int, default=0)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    """The exit status (0, or 2 after one ``error:`` line); a process group this run joined is destroyed."""
    try:
        return _main(argv)
    finally:
        close_process_group()


def _main(argv=None) -> int:
    args = parse_args(argv)
    from internvit.cli import one_line, print_error
    from internvit.data import DataError
    from internvit.run_checks import NonFiniteError
    from internvit.runner import SETUP_ERRORS, build_test_runner, held_back_warnings

    try:
        with held_back_warnings():  # a set-up error is the only line the user sees
            runner = build_test_runner(args.config, args.checkpoint, work_dir=args.work_dir,
                                       show_dir=args.show_dir, out=args.out, cfg_options=args.cfg_options,
                                       launcher=args.launcher, local_rank=args.local_rank, overwrite=args.overwrite)
    except SETUP_ERRORS as e:
        print_error(one_line(e))
        return 2
    try:
        metrics = runner.test()
    except (DataError, NonFiniteError) as e:  # bad data (an unreadable image) or a NaN loss / output: one line
        print_error(one_line(e))
        return 2
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank has the gathered metrics: print once
        print(json.dumps({k: round(float(v), 4) if isinstance(v, (int, float)) or hasattr(v, "item") else str(v)
                          for k, v in metrics.items()}))
    return 0


if __name__ == "__main__":
    exit_tool(run(main, user_errors=(UsageError,)))
