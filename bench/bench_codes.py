#!/usr/bin/env python
"""Bytes per vector and recall@10 of each IVF code (docs/scale.md, "Sizing"; issue 12 §4).

For every code (``Flat``, ``SQfp16``, ``SQ8``, ``SQ4``, ``PQ{d/4}``, ``PQ{d/8}``, ``OPQ{d/8}_{d/2},PQ{d/8}``
by default; ``--codes`` to choose) an index ``IVF{K},{code}`` (a pre-transform such as ``OPQ32_128`` goes
before ``IVF``) is built with :func:`retrieval.build_index` over one collection, K =
:func:`retrieval.index_plan.default_nlist` of n (or ``--nlist``), tuned to ``--target-recall`` on held-out
collection rows, as every build is. Then, per code:

* **bytes per vector** measured from the committed files (index file size, checked against the manifest,
  / ntotal), the fixed part explained from the index's components (coarse centroids, SQ ranges, PQ codebooks,
  OPQ matrix, list sizes) and the per-vector part left over, against the formula ``code + 8`` (8-byte ids in
  the inverted lists). The bench fails when the leftover differs from ``ntotal · (code + 8)`` by more than
  the index headers (4 KiB), or when faiss's code size differs from the formula;
* **recall@10** of ``--queries`` fresh queries (never indexed) against exact search
  (``faiss.contrib.exhaustive_search.knn_ground_truth``, ``IndexFlatIP`` batches streamed over the shards),
  at the tuned search parameters, and at ``nprobe = K`` (the code's own ceiling: what quantisation allows;
  ``Flat`` must reach 1 there, or the bench fails);
* **QPS**: one batch of all queries, median of ``--repeats`` runs (min-max beside it), with the faiss thread
  count. Recall and bytes do not depend on machine load; QPS does.

The collection is the one of ``bench/bench_ondisk.py`` (its generator, imported: a Gaussian mixture of
n / 200 centres with neighbourhood structure, L2-normalised, written as ``.npy`` shards, plus fresh queries of
the same mixture).

  OMP_NUM_THREADS=1 python bench/bench_codes.py                   # n = 200,000, d = 256
  OMP_NUM_THREADS=1 python bench/bench_codes.py --quick           # n = 20,000: a smoke run
  python bench/bench_codes.py --dim 768 --codes Flat SQ8 PQ96 OPQ64_768,PQ64 --json codes.json

Prints a Markdown table and one JSON line (``--json FILE`` also writes it).
"""
import argparse
import json
import os
import re
import shutil
import statistics
import sys
import time
import warnings
from types import SimpleNamespace

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from internvit.cli import ArgumentParser, UsageError, positive_int, run, write_json  # noqa: E402

#: what the index file holds beyond the components counted below (fourccs, d, ntotal, metric, nprobe, the
#: empty direct map, SQ / PQ parameters): a few hundred bytes; more means per-vector data the formula misses
HEADER_SLACK = 4096
QUICK_N = 20_000


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=positive_int, default=None, help="collection size (default 200,000)")
    p.add_argument("--quick", action="store_true", help=f"a smoke run: n = {QUICK_N:,} (unless --n is given)")
    p.add_argument("--dim", type=positive_int, default=256)
    p.add_argument("--centers", type=positive_int, default=None, help="mixture clusters (default n / 200)")
    p.add_argument("--queries", type=positive_int, default=1000, help="fresh held-out queries")
    p.add_argument("--codes", nargs="+", default=None,
                   help="codes after IVF{K}, e.g. Flat SQ8 PQ64 OPQ32_128,PQ32 (default: see above)")
    p.add_argument("--nlist", type=positive_int, default=None, help="K (default: default_nlist(n))")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--repeats", type=positive_int, default=5, help="timed runs of the query batch")
    p.add_argument("--shard-rows", type=positive_int, default=500_000)
    p.add_argument("--data", default=None, help="folder for the generated shards, reused (default: temporary)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write the result JSON here")
    return p


# --------------------------------------------------------------------------------------------- codes
def default_codes(d: int) -> list:
    """Flat, SQfp16, SQ8, SQ4, PQ(d/4), PQ(d/8), OPQ(d/8)_(d/2),PQ(d/8) (the PQ sizes that divide d)."""
    codes = ["Flat", "SQfp16", "SQ8", "SQ4"]
    m1, m2 = d // 4, d // 8
    if m1 >= 1 and d % m1 == 0:
        codes.append(f"PQ{m1}")
    if m2 >= 1 and d % m2 == 0:
        codes.append(f"PQ{m2}")
        if (d // 2) % m2 == 0:
            codes.append(f"OPQ{m2}_{d // 2},PQ{m2}")
    return codes


def index_key(code: str, nlist: int) -> str:
    """``IVF{nlist},{code}``, a pre-transform (``OPQ32_128,PQ32``) going before ``IVF``."""
    parts = code.split(",")
    return ",".join(parts[:-1] + [f"IVF{nlist}", parts[-1]])


def code_formula(code: str, d: int) -> tuple:
    """``(formula text, code bytes per vector, dimension the code sees)`` for the last part of ``code``."""
    parts = code.split(",")
    dc = d
    for pre in parts[:-1]:
        m = re.fullmatch(r"(?:OPQ\d+_|PCAR?)(\d+)", pre)
        if m:
            dc = int(m.group(1))
    last = parts[-1]
    if last == "Flat":
        return "4d + 8", 4 * dc, dc
    m = re.fullmatch(r"SQ(fp16|bf16|8|6|4)", last)
    if m:
        bits = 16 if m.group(1) in ("fp16", "bf16") else int(m.group(1))
        text = {16: "2d + 8", 8: "d + 8", 6: "3d/4 + 8", 4: "d/2 + 8"}[bits]
        return text, (dc * bits + 7) // 8, dc
    m = re.fullmatch(r"PQ(\d+)(?:x(\d+))?", last)
    if m:
        mm, bits = int(m.group(1)), int(m.group(2) or 8)
        text = "m + 8" if bits == 8 else f"m·{bits}/8 + 8"
        return text + (" (+ 4d² once)" if len(parts) > 1 else ""), (mm * bits + 7) // 8, dc
    raise UsageError(f"--codes: {code!r} is not Flat, SQfp16 / SQbf16 / SQ8 / SQ6 / SQ4 or PQm[xb] "
                     f"(optionally after a pre-transform such as OPQ32_128)")


# --------------------------------------------------------------------------------------------- bytes
def fixed_bytes(index) -> dict:
    """The parts of an in-memory IVF index file that do not grow with ntotal, in bytes, from its components."""
    import faiss

    out = {}
    if isinstance(index, faiss.IndexPreTransform):
        t = 0
        for i in range(index.chain.size()):
            lt = faiss.downcast_VectorTransform(index.chain.at(i))
            t += 4 * (lt.A.size() + lt.b.size())
        out["transform"] = t
    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))
    out["coarse quantizer"] = int(faiss.serialize_index(ivf.quantizer).size)
    if hasattr(ivf, "sq"):
        out["SQ ranges"] = 4 * ivf.sq.trained.size()
    if hasattr(ivf, "pq"):
        out["PQ codebooks"] = 4 * ivf.pq.centroids.size()
    nonempty = sum(1 for i in range(ivf.nlist) if ivf.invlists.list_size(i) > 0)
    # faiss writes list sizes as nlist size_t ("full") or (list, size) pairs of the non-empty ones ("sprs")
    out["list sizes"] = 8 * ivf.nlist if nonempty > ivf.nlist // 2 else 16 * nonempty
    return out


def measure_bytes(folder: str, manifest: dict, index, code_bytes: int) -> dict:
    """Bytes per vector from the committed files, checked against the formula (``RuntimeError`` otherwise)."""
    import faiss

    path = os.path.join(folder, manifest["index_file"])
    size = os.path.getsize(path)
    if size != manifest["index_bytes"]:
        raise RuntimeError(f"{path}: {size} bytes but the manifest says {manifest['index_bytes']}")
    if manifest.get("on_disk"):
        raise RuntimeError(f"{folder}: an on-disk index; this bench measures in-memory index files")
    files = size + sum(os.path.getsize(os.path.join(folder, e["file"])) for e in manifest.get("metadata_files", []))
    ivf = faiss.extract_index_ivf(index)
    if ivf.code_size != code_bytes:
        raise RuntimeError(f"{manifest['index_key']}: faiss stores {ivf.code_size} code bytes per vector, "
                           f"the formula says {code_bytes}")
    ntotal = int(index.ntotal)
    fixed = fixed_bytes(index)
    per_vector_part = size - sum(fixed.values())
    residual = per_vector_part - ntotal * (code_bytes + 8)
    if not 0 <= residual <= HEADER_SLACK:
        raise RuntimeError(f"{manifest['index_key']}: the index file holds {size} bytes = fixed "
                           f"{fixed} + {per_vector_part}, but ntotal · (code + 8) = {ntotal * (code_bytes + 8)} "
                           f"(difference {residual} B, beyond the {HEADER_SLACK} B of headers)")
    return {"index_file_bytes": size, "files_bytes": files, "bytes_per_vector": files / ntotal,
            "fixed_bytes": fixed, "fixed_total": sum(fixed.values()), "header_bytes": residual,
            "per_vector_bytes": (per_vector_part - residual) / ntotal}


# --------------------------------------------------------------------------------------------- search
def recall_and_qps(index, queries, truth, repeats: int) -> tuple:
    from retrieval.index_tune import recall_at_k

    index.search(queries[:10], 10)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, found = index.search(queries, 10)
        times.append(time.perf_counter() - t0)
    qps = [len(queries) / t for t in times]
    return recall_at_k(found, truth, 10), statistics.median(qps), min(qps), max(qps)


def ceiling(index, nlist: int, queries, truth, params: str) -> float:
    """recall@10 with every list scanned (nprobe = K): the code's quantisation limit."""
    from retrieval.faiss_ops import set_search_params
    from retrieval.index_tune import recall_at_k

    set_search_params(index, f"nprobe={nlist}")
    _, found = index.search(queries, 10)
    set_search_params(index, params)
    return recall_at_k(found, truth, 10)


# --------------------------------------------------------------------------------------------- main
def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    args.n = args.n or (QUICK_N if args.quick else 200_000)
    if not 0.0 < args.target_recall <= 1.0:
        raise UsageError(f"--target-recall must be in (0, 1], got {args.target_recall}")
    args.centers = args.centers or max(16, args.n // 200)  # bench_ondisk.py's default
    import tempfile

    import numpy as np
    from bench_ondisk import ensure_data  # the generator of bench_ondisk.py (import has no side effects)

    from retrieval import build_index
    from retrieval.embeddings import EmbeddingSource
    from retrieval.faiss_ops import faiss_module
    from retrieval.index_folder import open_index
    from retrieval.index_plan import check_index_key, default_nlist, format_bytes

    faiss = faiss_module()
    d, nlist = args.dim, args.nlist or default_nlist(args.n)
    codes = args.codes or default_codes(d)
    if len(set(codes)) != len(codes):
        raise UsageError("--codes: a code is given twice")
    n_held = min(1000, max(args.n // 10, 1))  # build_index holds out its tuning rows before training
    plans = []
    for code in codes:  # every key checked before any work
        formula, cbytes, dc = code_formula(code, d)
        key = index_key(code, nlist)
        try:
            check_index_key(key, args.n - n_held, d)
        except ValueError as e:
            raise UsageError(f"--codes {code}: {e}") from None
        plans.append((code, key, formula, cbytes, dc))

    scratch = tempfile.mkdtemp(prefix="bench_codes_")
    data = args.data or os.path.join(scratch, "data")
    try:
        spec = SimpleNamespace(n=args.n, dim=d, centers=args.centers, shard_rows=args.shard_rows,
                               queries=args.queries, seed=args.seed,
                               noise=1.8)  # the noise the docs/scale.md table was measured with
        ensure_data(data, spec)
        queries = np.load(os.path.join(data, "queries.npy"))
        norms = np.linalg.norm(queries, axis=1)
        if not np.allclose(norms, 1.0, atol=1e-4):
            raise RuntimeError(f"{data}/queries.npy: queries are not unit length ({norms.min()}..{norms.max()})")
        from faiss.contrib.exhaustive_search import knn_ground_truth

        src = EmbeddingSource.open(data)
        if (src.count, src.dim) != (args.n, d):
            raise RuntimeError(f"{data}: holds {src.count} x {src.dim} vectors, expected {args.n} x {d}")
        t0 = time.perf_counter()
        _, truth = knn_ground_truth(queries, (b for _, b in src.iter_batches(262_144)), 10,
                                    metric_type=faiss.METRIC_INNER_PRODUCT)
        exact_s = time.perf_counter() - t0
        print(f"exact top-10 of {len(queries)} queries over {args.n} x {d}: {exact_s:.1f} s", file=sys.stderr)

        results = []
        for code, key, formula, cbytes, dc in plans:
            out = os.path.join(scratch, re.sub(r"[^A-Za-z0-9_]+", "_", code))
            t0 = time.perf_counter()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                manifest = build_index(data, out, index_key=key, target_recall=args.target_recall, seed=args.seed,
                                       progress=False, on_disk=False)
            build_s = time.perf_counter() - t0
            index, manifest = open_index(out)
            if manifest["index_key"] != key or index.ntotal != args.n or manifest["normalize"]:
                raise RuntimeError(f"{out}: built {manifest['index_key']} with {index.ntotal} vectors, normalise "
                                   f"{manifest['normalize']}; expected {key}, {args.n}, no normalisation (the "
                                   f"generator writes unit vectors)")
            b = measure_bytes(out, manifest, index, cbytes)
            params = manifest["search_params"]
            recall, qps, qps_lo, qps_hi = recall_and_qps(index, queries, truth, args.repeats)
            top = ceiling(index, nlist, queries, truth, params)
            if code == "Flat" and top < 0.999:
                raise RuntimeError(f"{key} scanning every list finds only {top:.4f} of the exact top-10: the "
                                   f"ground truth and the index disagree")
            tuned = manifest["tuning"]["recall"]
            results.append({
                "code": code, "index_key": key, "formula": formula, "code_bytes": cbytes, "code_dim": dc,
                "formula_bytes_per_vector": cbytes + 8, **b,
                "search_params": params, "tuned_recall_heldout": tuned,
                "tuning_target_met": tuned >= args.target_recall, "recall@10": recall,
                "target_met": recall >= args.target_recall, "recall@10_all_lists": top,
                "qps_batch_median": qps, "qps_batch_min": qps_lo, "qps_batch_max": qps_hi,
                "build_s": build_s, "timings": manifest["build"]["timings"],
                "train_size": manifest["index_choice"]["train_size"],
                "warnings": [str(w.message) for w in caught],
            })
            print(f"{key}: {b['bytes_per_vector']:.1f} B/vector, recall@10 {recall:.4f} at {params} "
                  f"({build_s:.0f} s)", file=sys.stderr)
            shutil.rmtree(out, ignore_errors=True)

        result = {"n": args.n, "dim": d, "nlist": nlist, "centers": args.centers, "queries": len(queries),
                  "seed": args.seed, "target_recall": args.target_recall,
                  "generator": "bench/bench_ondisk.py (Gaussian mixture, L2-normalised)",
                  "exact": "faiss.contrib.exhaustive_search.knn_ground_truth (IndexFlatIP)",
                  "faiss_threads": faiss.omp_get_max_threads(), "faiss_version": faiss.__version__,
                  "qps_statistic": f"median of {args.repeats} runs of one batch of {len(queries)} queries "
                                   f"(measured under load, not a rate for the docs)",
                  "exact_search_s": exact_s, "codes": results}
        print(f"\nIVF codes over {args.n:,} x {d} (Gaussian mixture of {args.centers:,} centres, "
              f"bench_ondisk.py's generator), K = {nlist:,}, {len(queries):,} fresh queries, target recall@10 "
              f"{args.target_recall}; faiss {faiss.__version__}, {faiss.omp_get_max_threads()} thread(s)\n")
        print("| code | formula | formula B/vector | measured B/vector (files / ntotal) | per-vector part | fixed "
              "part | search params | recall@10 (fresh) | target met | recall@10, held-out rows | recall@10, "
              "all lists | QPS, batch of %d (median [min-max] of %d; under load) |" % (len(queries), args.repeats))
        print("|---" * 12 + "|")
        for r in results:
            print(f"| `{r['code']}` | {r['formula']} | {r['formula_bytes_per_vector']} | {r['bytes_per_vector']:.1f} "
                  f"| {r['per_vector_bytes']:.1f} | {format_bytes(r['fixed_total'])} | {r['search_params']} "
                  f"| {r['recall@10']:.4f} | {'yes' if r['target_met'] else 'no'} | {r['tuned_recall_heldout']:.4f} "
                  f"| {r['recall@10_all_lists']:.4f} | {r['qps_batch_median']:.0f} [{r['qps_batch_min']:.0f}-"
                  f"{r['qps_batch_max']:.0f}] |")
        print()
        print(json.dumps(result))
        if args.json:
            write_json(args.json, result)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
