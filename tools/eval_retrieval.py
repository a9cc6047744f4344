#!/usr/bin/env python
"""Retrieval evaluation.

  # image<->text recall@1/5/10 on Flickr30K / COCO Karpathy test, exactly and through FAISS indexes
  python tools/eval_retrieval.py recall --model internvl-g:/models/InternVL-14B-224px \\
      --annotations dataset_flickr30k.json --images flickr30k-images/ [--index-key HNSW32] [--out res.json]
  # index quality (autofaiss score_index style): ANN recall vs exact, latency p50/p99, QPS, bytes/vector
  python tools/eval_retrieval.py index out/index [--embeddings out/index/embeddings] [-k 10]

recall@k (index) = |found top-k & exact top-k| / min(k, neighbours the query has); 1-recall@k = the exact
nearest neighbour is in the found top k; a -1 (no result) is a miss. Query vectors are checked as Retriever
checks them (NaN / inf, all-zero on a normalised index, dim). Image<->text recall counts ties (equal scores)
against the query, the same way exactly and through the index.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import (  # noqa: E402
    ArgumentParser,
    UsageError,
    device,
    dtype_arg,
    fraction,
    memory_size,
    nonnegative_int,
    positive_int,
    run,
)

MAX_K = 2**31 - 1


def k_value(value: str) -> int:
    """An integer from 1 to 2**31 - 1 (lists are at most the collection anyway)."""
    v = positive_int(value)
    if v > MAX_K:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_K}, got {value}")
    return v


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, parser_class=ArgumentParser)
    r = sub.add_parser("recall", help="image<->text recall@k on an annotation file")
    r.add_argument("--model", required=True, help="encoder spec with a text tower (InternVL-C/G, open_clip)")
    r.add_argument("--mode", default=None, choices=["InternVL-C", "InternVL-G"])
    r.add_argument("--tokenizer", default=None)
    r.add_argument("--annotations", required=True,
                   help="Karpathy dataset_*.json, [{'image','caption'}] JSON or clip_benchmark's Flickr30K .txt")
    r.add_argument("--images", default=None, help="image root (default: the annotation file's folder)")
    r.add_argument("--split", default=None,
                   help="Karpathy split(s) to evaluate, comma-separated (e.g. test,restval; 'none' = all; default "
                        "test); refused for a format without splits (a [{'image','caption'}] list, Flickr .txt)")
    r.add_argument("--index-key", default=None, help="faiss index_factory string (default: automatic)")
    r.add_argument("--max-index-memory", type=memory_size, default="4G")
    r.add_argument("--target-recall", type=fraction, default=0.95)
    r.add_argument("--batch-size", type=positive_int, default=32)
    r.add_argument("--num-workers", type=nonnegative_int, default=0)
    r.add_argument("--device", type=device, default="cpu")
    r.add_argument("--dtype", default="float32", type=dtype_arg, help="fp32, bf16, fp16, fp64 or torch's names")
    r.add_argument("--out", default=None, help="also write the results as JSON here")
    r.add_argument("--overwrite", action="store_true", help="replace --out even if it is not one of our reports")
    q = sub.add_parser("index", help="index-quality report of a built index")
    q.add_argument("index_dir")
    q.add_argument("--embeddings", default=None, help="the embeddings the index was built from "
                                                      "(default: the folder recorded in its manifest)")
    q.add_argument("--query-embeddings", default=None, help=".npy of query vectors not in the index "
                                                            "(default: indexed rows, leave-one-out)")
    q.add_argument("-k", type=k_value, default=10, help="recall@k (k above the collection size is scored against "
                                                       "the neighbours a query has)")
    q.add_argument("--queries", type=positive_int, default=1000)
    q.add_argument("--params", default=None, help="search parameters to score instead of the tuned ones")
    q.add_argument("--out", default=None, help="also write the report as JSON here")
    q.add_argument("--overwrite", action="store_true", help="replace --out even if it is not one of our reports")
    return p


#: the field every report of this tool carries, naming the tool and the sub-command that wrote it; a file is
#: replaced without --overwrite only when it carries this tool's marker (never by a guess from its other keys:
#: an index's manifest.json holds index_key, ntotal, ... too)
MARKER_KEY = "written_by"


def _marker(command: str) -> str:
    return f"tools/eval_retrieval.py {command}"


def _report_kind(path: str):
    """The sub-command whose report ``path`` holds (``'recall'`` / ``'index'``), or ``None`` when it holds
    anything else: another tool's file, an index manifest, or a report written before reports carried
    :data:`MARKER_KEY`."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    return {_marker(c): c for c in ("recall", "index")}.get(data.get(MARKER_KEY))




def _check_out(path, command: str, overwrite: bool = False) -> None:
    """--out must be a file path outside every store-managed folder (even with --overwrite: its files belong to
    the index or embeddings, and its manifest.json is their commit point), in an existing folder; an existing
    file is replaced without --overwrite only when it is a report of the same sub-command (its marker)."""
    if path is None:
        return
    if os.path.isdir(path):
        raise UsageError(f"--out {path}: is a folder (give a .json file path)")
    from internvit.store import check_outside_managed

    check_outside_managed("--out", path)
    if os.path.lexists(path) and not overwrite:
        kind = _report_kind(path)
        if kind != command:
            what = (f"holds an eval_retrieval {kind} report, not a {command} report" if kind else
                    f"is not an eval_retrieval report (no {MARKER_KEY!r}: {_marker(command)!r} field; reports "
                    f"written before it was added need --overwrite too)")
            raise UsageError(f"--out {path}: exists and {what}; refusing to replace it (pass --overwrite)")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise UsageError(f"--out {path}: folder {parent} does not exist")


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    _check_out(args.out, args.command, args.overwrite)
    from retrieval.embeddings import atomic_write_json

    if args.command == "recall":
        if not os.path.isfile(args.annotations):
            raise UsageError(f"--annotations {args.annotations}: no such file")
        if args.images is not None and not os.path.isdir(args.images):
            raise UsageError(f"--images {args.images}: no such folder")
        from internvit.features import parse_dtype
        from retrieval.encoders import load_encoder
        from retrieval.evaluate import evaluate_retrieval, load_annotations

        dtype = parse_dtype(args.dtype)
        split = "test" if args.split is None else None if args.split.strip().lower() == "none" else args.split
        load_annotations(args.annotations, args.images, split=split)  # a bad file fails before the model loads
        from retrieval.evaluate import read_entries

        has_splits = read_entries(args.annotations, None).has_splits
        if split is not None and args.split is not None and not has_splits:
            raise UsageError(f"--split {args.split}: {args.annotations} has no splits (only Karpathy's "
                             f"dataset_*.json has them): its whole file is evaluated; drop --split")
        encoder = load_encoder(args.model, mode=args.mode, tokenizer=args.tokenizer, device=args.device,
                               dtype=dtype)
        result = evaluate_retrieval(encoder, args.annotations, args.images, split=split,
                                    index_key=args.index_key, max_index_memory=args.max_index_memory,
                                    target_recall=args.target_recall, batch_size=args.batch_size,
                                    num_workers=args.num_workers)
        result["split"] = (split or "none") if has_splits else None  # what was evaluated (None: no splits)
    else:
        if not os.path.isdir(args.index_dir):
            raise UsageError(f"{args.index_dir}: index folder does not exist")
        for name in ("embeddings", "query_embeddings"):
            path = getattr(args, name)
            if path is not None and not os.path.exists(path):
                raise UsageError(f"--{name.replace('_', '-')} {path}: does not exist")
        from retrieval.evaluate import index_quality

        queries = None
        if args.query_embeddings is not None:
            from retrieval.evaluate import load_query_vectors

            try:
                queries = load_query_vectors(args.query_embeddings)
            except ValueError as e:
                raise UsageError(f"--query-embeddings {e}") from None
        result = index_quality(args.index_dir, args.embeddings, queries=queries, k=args.k,
                               n_queries=args.queries, search_params=args.params)
    result = {MARKER_KEY: _marker(args.command), **result}  # printed and written alike
    if args.out:
        _check_out(args.out, args.command, args.overwrite)  # again: the run may have taken hours
        atomic_write_json(args.out, result)
    print(json.dumps(result, indent=2))
    return 0


def main(argv=None) -> int:
    """The exit status: 0, or 2 after one ``error:`` line (argument errors exit 2 from argparse)."""
    return run(_main, argv)  # warnings and log records print as "warning: ..." lines


if __name__ == "__main__":
    sys.exit(main())
