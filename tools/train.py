#!/usr/bin/env python
"""Train with an mmengine config (segmentation or classification): mmseg's standard CLI.

  python tools/train.py CONFIG [--work-dir DIR] [--resume [CKPT]] [--overwrite] [--amp] [--cfg-options k=v ...]
                               [--launcher none|pytorch|slurm|mpi] [--local_rank N]

Set-up problems (a missing or broken config, a checkpoint that is refused or does not fit the model) are one
``error: ...`` line and exit status 2, and so is bad input data met while training (an image that cannot be
read: the file is named) and a loss that is not finite (the run stops before saving a checkpoint of it); any
other failure while training keeps its traceback. One training run per work dir at a time: a second one is refused
(the work dir is locked from set-up until training ends).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, close_process_group, exit_tool, nonnegative_int, run  # noqa: E402,E501


def parse_args(argv=None):
    from internvit.runner import cfg_options_action

    parser = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("config", help="train config file path")
    parser.add_argument("--work-dir", help="the dir to save logs and models (default ./work_dirs/<config name>)")
    parser.add_argument("--resume", nargs="?", const="auto", default=None,
                        help="resume: alone, from the latest checkpoint in the work dir; or from the given checkpoint")
    parser.add_argument("--amp", action="store_true", help="automatic mixed precision (AmpOptimWrapper)")
    parser.add_argument("--overwrite", action="store_true",
                        help="train anew in a work dir that holds checkpoints of an earlier run (they are moved "
                             "to <work-dir>/overwritten_<time>/ before the run starts), or files a run would replace")
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
    from internvit.runner import SETUP_ERRORS, build_train_runner, held_back_warnings

    try:
        with held_back_warnings():  # a set-up error is the only line the user sees
            runner = build_train_runner(args.config, work_dir=args.work_dir, resume=args.resume, amp=args.amp,
                                        cfg_options=args.cfg_options, launcher=args.launcher,
                                        local_rank=args.local_rank, overwrite=args.overwrite)
    except SETUP_ERRORS as e:
        print_error(one_line(e))
        return 2
    try:
        runner.train()
    except (DataError, NonFiniteError) as e:  # bad data (an unreadable image) or a NaN loss / output: one line
        print_error(one_line(e))
        return 2
    return 0


if __name__ == "__main__":
    exit_tool(run(main, user_errors=(UsageError,)))
