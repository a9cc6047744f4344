#!/usr/bin/env python
"""On-disk IVF build benchmark: an index larger than its memory budget (issue 12 §2).

1. **generate** ``--n`` × ``--dim`` L2-normalised float32 vectors from a Gaussian mixture (``--centers``
   clusters: real neighbourhood structure) straight into ``.npy`` shards of ``--shard-rows`` rows in
   clip-retrieval's layout (``img_emb/img_emb_{N}.npy``), in a child process, one shard at a time; plus
   ``--queries`` fresh vectors of the same mixture that are never indexed. Existing shards with the same
   parameters are reused (``--data``).
2. **build** with :func:`retrieval.ondisk.build_ondisk_index` (``--max-index-memory``, ``--index-key`` or
   the automatic on-disk key, ``--workers`` processes adding partitions), streaming the shards from disk.
   The build runs in a fresh process; reported: wall time by stage, its peak RSS (VmHWM, reset after the
   imports) and that of its partition worker processes, and its sampled peak of *anonymous* RSS (``RssAnon``
   every 20 ms: the process's own memory; VmHWM also counts the file-backed pages faiss maps while merging
   and searching, which the kernel drops under memory pressure). Goal: peak RSS <= budget + 1 GiB.
3. **exact** top-10 of the queries by a streaming brute-force pass over the shards
   (``faiss.contrib.exhaustive_search.knn_ground_truth``), then **recall@10** and **QPS** of the built index
   with its tuned search parameters (one batch of all queries; and one query at a time).

  python bench/bench_ondisk.py --n 200000 --dim 256 --max-index-memory 256M      # a quick check
  python bench/bench_ondisk.py --n 10000000 --dim 256 --max-index-memory 2G \\
      --data /big/bench_ondisk_data --out /big/bench_ondisk_index                 # the issue's size

To *enforce* the bound rather than observe it, ``--memory-limit 3G`` runs the build in a new cgroup v1 memory
group with that hard limit (as root; page cache counts there too, and is reclaimed before the build would be
killed; swap is limited too): a build that needed more would be OOM-killed and the benchmark would fail.

Prints a table and one JSON line (``--json FILE`` also writes it).
"""
import argparse
import json
import os
import resource
import shutil
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from internvit.cli import ArgumentParser, UsageError, memory_size, positive_int, run, write_json  # noqa: E402


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=10_000_000, help="collection size")
    p.add_argument("--dim", type=positive_int, default=256)
    p.add_argument("--centers", type=positive_int, default=None, help="mixture clusters (default n / 200)")
    p.add_argument("--queries", type=positive_int, default=1000, help="held-out queries for recall / QPS")
    p.add_argument("--noise", type=float, default=1.0,
                   help="expected norm of the noise added to a unit centre (default 1.0: cluster members have cosine "
                        "~0.5, above the largest cosine of random unit vectors among 10M in 256 dims, ~0.36, so "
                        "nearest neighbours are cluster members; 1.8 (cosine ~0.24) keeps that only to ~200k rows)")
    p.add_argument("--shard-rows", type=positive_int, default=500_000)
    p.add_argument("--max-index-memory", type=memory_size, default="2G", help="the build's memory budget")
    p.add_argument("--index-key", default=None, help="IVF key (default: the automatic on-disk choice)")
    p.add_argument("--workers", type=positive_int, default=1, help="processes adding partitions")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--memory-limit", type=memory_size, default=None,
                   help="run the build in a new memory cgroup with this hard limit and no swap (needs root and the "
                        "cgroup v1 memory controller at /sys/fs/cgroup/memory): the bound enforced, not observed")
    p.add_argument("--data", default=None, help="folder for the generated shards (default: a temporary one)")
    p.add_argument("--out", default=None, help="index folder (default: a temporary one, removed)")
    p.add_argument("--overwrite", action="store_true", help="replace the index in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result JSON here")
    return p


# --------------------------------------------------------------------------------------------- data
def _generate(folder: str, n: int, dim: int, centers: int, shard_rows: int, queries: int, seed: int,
              noise: float = 1.8) -> None:
    """Write the shards (one at a time; at most one shard in memory) and the queries: unit centres plus Gaussian
    noise of expected norm ``noise``, normalised (two members of one cluster have cosine ~ 1 / (1 + noise**2))."""
    import numpy as np

    from retrieval.embeddings import save_npy

    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, dim)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)

    def draw(m, r):
        x = c[r.integers(0, centers, m)]
        x += (noise / np.sqrt(dim)) * r.standard_normal((m, dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        return x

    os.makedirs(os.path.join(folder, "img_emb"), exist_ok=True)
    for i, s in enumerate(range(0, n, shard_rows)):
        path = os.path.join(folder, "img_emb", f"img_emb_{i:05d}.npy")
        tmp = path + ".tmp"
        save_npy(tmp, draw(min(shard_rows, n - s), np.random.default_rng([seed, i])))
        os.replace(tmp, path)
    save_npy(os.path.join(folder, "queries.npy"), draw(queries, np.random.default_rng([seed, 1 << 30])))


def ensure_data(folder: str, args) -> None:
    spec = {"n": args.n, "dim": args.dim, "centers": args.centers, "shard_rows": args.shard_rows,
            "queries": args.queries, "seed": args.seed, "noise": args.noise}
    spec_path = os.path.join(folder, "spec.json")
    if os.path.isfile(spec_path):
        with open(spec_path, encoding="utf-8") as f:
            if json.load(f) == spec:
                print(f"reusing the shards in {folder}", file=sys.stderr)
                return
        raise UsageError(f"--data {folder}: holds shards of other parameters; give another folder")
    import multiprocessing as mp

    t0 = time.perf_counter()
    proc = mp.get_context("spawn").Process(target=_generate, args=(folder, args.n, args.dim, args.centers,
                                                                  args.shard_rows, args.queries, args.seed,
                                                                  args.noise))
    proc.start()
    proc.join()
    if proc.exitcode != 0:
        raise RuntimeError(f"generating the shards failed (exit {proc.exitcode})")
    with open(spec_path, "w", encoding="utf-8") as f:
        json.dump(spec, f)
    print(f"generated {args.n} x {args.dim} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)


# --------------------------------------------------------------------------------------------- memory
def _status(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
    return 0


class AnonSampler(threading.Thread):
    """Peak ``RssAnon`` of this process, sampled every ``interval`` seconds (a lower bound of the true peak)."""

    def __init__(self, interval: float = 0.02) -> None:
        super().__init__(daemon=True)
        self.interval, self.peak, self._done = interval, 0, threading.Event()

    def run(self) -> None:
        while not self._done.is_set():
            self.peak = max(self.peak, _status("RssAnon:"))
            self._done.wait(self.interval)

    def stop(self) -> int:
        self._done.set()
        self.join()
        return max(self.peak, _status("RssAnon:"))


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")
        return True
    except OSError:
        return False


class MemoryCgroup:
    """A cgroup v1 memory group with a hard limit (page cache counts and is reclaimed first; no swap), which a
    process joins with :meth:`join`. ``UsageError`` when it cannot be made (not root, no v1 memory controller)."""

    ROOT = "/sys/fs/cgroup/memory"

    def __init__(self, limit: int) -> None:
        self.path = os.path.join(self.ROOT, f"bench_ondisk_{os.getpid()}")
        try:
            os.mkdir(self.path)
            self._write("memory.limit_in_bytes", limit)
            if os.path.exists(os.path.join(self.path, "memory.memsw.limit_in_bytes")):
                self._write("memory.memsw.limit_in_bytes", limit)
        except OSError as e:
            raise UsageError(f"--memory-limit: cannot make a memory cgroup under {self.ROOT} ({e})") from None

    def _write(self, name: str, value) -> None:
        with open(os.path.join(self.path, name), "w", encoding="ascii") as f:
            f.write(str(value))

    def _read(self, name: str) -> str:
        with open(os.path.join(self.path, name), encoding="ascii") as f:
            return f.read()

    def join(self, pid: int) -> None:
        self._write("cgroup.procs", pid)

    def report(self) -> dict:
        oom = dict(line.split() for line in self._read("memory.oom_control").splitlines())
        return {"limit": int(self._read("memory.limit_in_bytes")),
                "max_usage": int(self._read("memory.max_usage_in_bytes")),
                "oom_kills": int(oom.get("oom_kill", 0))}

    def remove(self) -> None:
        """Remove the group once its last process (e.g. a multiprocessing helper still exiting) has left."""
        for _ in range(100):
            try:
                os.rmdir(self.path)
                return
            except OSError:
                time.sleep(0.1)
        print(f"warning: could not remove the memory cgroup {self.path} (still in use); rmdir it later",
              file=sys.stderr)


def _build_child(data: str, out: str, kw: dict, result_path: str) -> None:
    """The build, measured: wall time, VmHWM (from after the imports), sampled anonymous peak, workers' peak."""
    import pyarrow.parquet  # noqa: F401  (imported by the build; not part of what it allocates)

    from retrieval.embeddings import EmbeddingSource
    from retrieval.ondisk import build_ondisk_index

    EmbeddingSource.open(data).rows(0, 1)
    base = _status("VmRSS:")
    reset = _reset_peak()
    sampler = AnonSampler()
    sampler.start()
    t0 = time.perf_counter()
    build_ondisk_index(data, out, **kw)
    build_s = time.perf_counter() - t0
    peak_anon = sampler.stop()
    peak = _status("VmHWM:") if reset else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    with open(result_path, "w", encoding="utf-8") as f:
        json.dump({"build_s": build_s, "peak": peak, "base": base, "peak_anon": peak_anon,
                   "children": children}, f)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.centers = args.centers or max(16, args.n // 200)
    import tempfile

    import numpy as np

    from retrieval.embeddings import EmbeddingSource
    from retrieval.faiss_ops import faiss_module
    from retrieval.index_folder import open_index
    from retrieval.index_plan import format_bytes
    from retrieval.index_tune import recall_at_k
    from retrieval.ondisk import plan_ondisk

    plan_ondisk(args.n, args.dim, args.index_key, args.max_index_memory)  # a bad key / budget: before any work
    faiss = faiss_module()
    scratch = tempfile.mkdtemp(prefix="bench_ondisk_")
    data = args.data or os.path.join(scratch, "data")
    out = args.out or os.path.join(scratch, "index")
    try:
        ensure_data(data, args)
        queries = np.load(os.path.join(data, "queries.npy"))
        # -- build, in a fresh process whose only children are the partition workers
        import multiprocessing as mp

        res_path = os.path.join(scratch, "build.json")
        kw = dict(index_key=args.index_key, max_index_memory=args.max_index_memory, target_recall=args.target_recall,
                  workers=args.workers, seed=args.seed, progress=False, overwrite=args.overwrite)
        cgroup = MemoryCgroup(args.memory_limit) if args.memory_limit else None
        proc = mp.get_context("spawn").Process(target=_build_child, args=(data, out, kw, res_path))
        try:
            if cgroup is not None:  # this process joins, so the child (and its workers) start inside; then leaves
                cgroup.join(os.getpid())
            proc.start()
            if cgroup is not None:
                with open(os.path.join(MemoryCgroup.ROOT, "cgroup.procs"), "w", encoding="ascii") as f:
                    f.write(str(os.getpid()))
            proc.join()
            limited = cgroup.report() if cgroup is not None else None
        finally:
            if cgroup is not None:
                cgroup.remove()
        if proc.exitcode != 0:
            why = f" (the memory cgroup's OOM killer: {limited})" if limited and limited["oom_kills"] else ""
            raise RuntimeError(f"the build failed (exit {proc.exitcode}){why}; its error is above")
        with open(res_path, encoding="utf-8") as f:
            b = json.load(f)
        build_s, peak, base, peak_anon, children = (b["build_s"], b["peak"], b["base"], b["peak_anon"],
                                                    b["children"])
        # -- exact search, streamed over the shards
        from faiss.contrib.exhaustive_search import knn_ground_truth

        src = EmbeddingSource.open(data)
        t0 = time.perf_counter()
        _, truth = knn_ground_truth(queries, (b for _, b in src.iter_batches(262_144)), 10,
                                    metric_type=faiss.METRIC_INNER_PRODUCT)
        exact_s = time.perf_counter() - t0
        # -- recall and QPS of the committed index (lists memory-mapped)
        index, manifest = open_index(out)
        index.search(queries[:10], 10)
        t0 = time.perf_counter()
        _, found = index.search(queries, 10)
        qps_batch = len(queries) / (time.perf_counter() - t0)
        one = queries[: min(200, len(queries))]
        t0 = time.perf_counter()
        for q in one:
            index.search(q[None], 10)
        qps_single = len(one) / (time.perf_counter() - t0)
        recall = recall_at_k(found, truth, 10)
        budget = int(args.max_index_memory)
        od = manifest["on_disk"]
        result = {
            "n": args.n, "dim": args.dim, "index_key": manifest["index_key"],
            "search_params": manifest["search_params"], "max_index_memory": budget, "workers": args.workers,
            "partitions": od["partitions"], "partition_rows": od["partition_rows"],
            "build_s": build_s, "timings": manifest["build"]["timings"],
            "peak_rss": peak, "peak_rss_growth": peak - base, "peak_rss_anon_sampled": peak_anon,
            "peak_rss_workers": children, "rss_goal": budget + 2**30, "rss_ok": peak <= budget + 2**30,
            "index_file_bytes": manifest["index_bytes"], "ivfdata_bytes": od["ivfdata_bytes"],
            "bytes_per_vector": manifest["bytes_per_vector"], "tuned_recall": manifest["tuning"]["recall"],
            "recall@10": recall, "qps_batch": qps_batch, "qps_single": qps_single,
            "exact_search_s": exact_s, "faiss_threads": faiss.omp_get_max_threads(), "memory_cgroup": limited,
        }
        print(f"on-disk build of {args.n} x {args.dim} with budget {format_bytes(budget)}: {manifest['index_key']} "
              f"({od['partitions']} partitions, {args.workers} worker(s))")
        rows = [("build time", f"{build_s:.1f} s ({', '.join(f'{k} {v:.1f}' for k, v in result['timings'].items())})"),
                ("peak RSS (VmHWM)", f"{format_bytes(peak)} (goal <= {format_bytes(budget + 2**30)}: "
                                     f"{'met' if result['rss_ok'] else 'NOT met'})"),
                ("peak anonymous RSS (sampled)", format_bytes(peak_anon)),
                ("peak RSS of workers", format_bytes(children)),
                ("lists on disk", f"{format_bytes(od['ivfdata_bytes'])} ({result['bytes_per_vector']:.1f} B/vector)"),
                ("recall@10 vs exact", f"{recall:.4f} at {manifest['search_params']} (tuned {result['tuned_recall']})"),
                ("QPS", f"{qps_batch:.0f} batched, {qps_single:.0f} one query at a time"),
                ("exact search pass", f"{exact_s:.1f} s")]
        if limited is not None:
            rows.insert(3, ("memory cgroup (hard limit)", f"limit {format_bytes(limited['limit'])}, max usage incl. "
                                                          f"page cache {format_bytes(limited['max_usage'])}, OOM kills "
                                                          f"{limited['oom_kills']}"))
        for k, v in rows:
            print(f"  {k:<30} {v}")
        if not result["rss_ok"] and peak_anon <= budget + 2**30:
            print("  note: the peak RSS above the goal is file-backed pages of the mapped partition / lists files "
                  "(page cache, reclaimable); the process's own memory stayed within it")
        print(json.dumps(result))
        if args.json:
            write_json(args.json, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
