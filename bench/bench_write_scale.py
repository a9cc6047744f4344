#!/usr/bin/env python
"""Per-shard cost of ``FeatureExtractor.write`` must not grow with the total: 1M rows of features + metadata.

Writes ``--rows`` rows (default 1,000,000) in shards of ``--shard-size`` rows through the real writer
(:meth:`internvit.features.FeatureExtractor.write`: the durable store, ``fsync`` per file, parquet metadata with
an extra ``caption`` column of ``--rows`` strings). The "model" is a pass-through ``embed_fn`` over a Dataset
that yields tiny ``(--dim,)`` float tensors, so only the writer's own work is measured.

Prints the time of each shard (from one shard's completion to the next, as recorded by the store's progress
journal), the ratio of the last shards to the first ones (mean of ``--window`` shards each, shard 0 excluded
as warm-up; goal <= 1.2), the input-checksum time, and the process's peak RSS.

  python bench/bench_write_scale.py                     # 1M rows, 100 shards
  python bench/bench_write_scale.py --rows 20000 --shard-size 1000   # a quick check that it runs
"""
import argparse
import os
import resource
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch.utils.data import Dataset  # noqa: E402


class TinyRows(Dataset):
    """``rows`` items, item ``i`` a float32 tensor of ``dim`` values (deterministic), with fake paths."""

    def __init__(self, rows: int, dim: int) -> None:
        import torch

        self.rows, self.dim, self.torch = rows, dim, torch
        self.paths = [f"images/{i // 1000:04d}/{i:08d}.jpg" for i in range(rows)]

    def __len__(self) -> int:
        return self.rows

    def __getitem__(self, i: int):
        return self.torch.full((self.dim,), float(i % 997) / 997.0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--shard-size", type=int, default=10_000)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--window", type=int, default=5, help="shards averaged at each end")
    p.add_argument("--tmp", default=None, help="folder for the output (removed at the end)")
    args = p.parse_args(argv)
    if args.rows < 2 * args.shard_size or min(args.rows, args.shard_size, args.dim, args.batch_size) < 1:
        p.error("need --rows >= 2 x --shard-size and positive sizes")

    from internvit import store
    from internvit.features import FeatureExtractor, inputs_checksum

    data = TinyRows(args.rows, args.dim)
    captions = [f"a photo of item {i}" for i in range(args.rows)]
    t0 = time.perf_counter()
    inputs_checksum(data.paths, {"caption": captions})
    checksum_s = time.perf_counter() - t0

    stamps = []
    save_state = store.Store.save_state

    def timed(self, **state):  # one save_state per finished shard
        save_state(self, **state)
        stamps.append(time.perf_counter())

    store.Store.save_state = timed
    fx = FeatureExtractor(None, {"image_size": 14}, embed_fn=lambda x: x, batch_size=args.batch_size,
                          progress=False)
    tmp = tempfile.mkdtemp(prefix="bench-write-", dir=args.tmp)
    try:
        t0 = time.perf_counter()
        m = fx.write(data, os.path.join(tmp, "out"), shard_size=args.shard_size,
                     extra_columns={"caption": captions})
        total = time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        store.Store.save_state = save_state
    per = [b - a for a, b in zip(stamps, stamps[1:])]  # shard k (k >= 1): from shard k-1's record to its own
    w = max(1, min(args.window, len(per) // 2))
    first, last = sum(per[:w]) / w, sum(per[-w:]) / w
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"rows {m['count']} in {len(m['shards'])} shards of {args.shard_size}, dim {args.dim}: "
          f"write {total:.1f} s, inputs checksum {checksum_s:.2f} s")
    print(f"per-shard time: first {w} shards (after shard 0) {first * 1e3:.1f} ms, last {w} {last * 1e3:.1f} ms, "
          f"ratio last/first {last / first:.2f} (goal <= 1.2)")
    print(f"peak RSS {peak_mb:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
