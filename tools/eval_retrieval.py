#!/usr/bin/env python
"""Retrieval evaluation.

  # image<->text recall@1/5/10 on Flickr30K / COCO Karpathy test, exactly and through FAISS indexes
  python tools/eval_retrieval.py recall --model internvl-g:/models/InternVL-14B-224px \\
      --annotations dataset_flickr30k.json --images flickr30k-images/ [--index-key HNSW32] [--out res.json]
  # index quality (autofaiss score_index style): ANN recall vs exact, latency p50/p99, QPS, bytes/vector
  python tools/eval_retrieval.py index out/index [--embeddings out/index/embeddings] [-k 10]
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("recall", help="image<->text recall@k on an annotation file")
    r.add_argument("--model", required=True, help="encoder spec with a text tower (InternVL-C/G, open_clip)")
    r.add_argument("--mode", default=None, choices=["InternVL-C", "InternVL-G"])
    r.add_argument("--tokenizer", default=None)
    r.add_argument("--annotations", required=True, help="Karpathy dataset_*.json or [{'image','caption'}] JSON")
    r.add_argument("--images", default=None, help="image root (default: the annotation file's folder)")
    r.add_argument("--split", default="test", help="Karpathy split to evaluate ('none' = all)")
    r.add_argument("--index-key", default=None, help="faiss index_factory string (default: automatic)")
    r.add_argument("--max-index-memory", default="4G")
    r.add_argument("--target-recall", type=float, default=0.95)
    r.add_argument("--batch-size", type=int, default=32)
    r.add_argument("--num-workers", type=int, default=0)
    r.add_argument("--device", default="cpu")
    r.add_argument("--dtype", default="fp32")
    r.add_argument("--out", default=None, help="also write the results as JSON here")
    q = sub.add_parser("index", help="index-quality report of a built index")
    q.add_argument("index_dir")
    q.add_argument("--embeddings", default=None, help="the embeddings the index was built from "
                                                      "(default: the folder recorded in its manifest)")
    q.add_argument("--query-embeddings", default=None, help=".npy of query vectors not in the index "
                                                            "(default: indexed rows, leave-one-out)")
    q.add_argument("-k", type=int, default=10)
    q.add_argument("--queries", type=int, default=1000)
    q.add_argument("--params", default=None, help="search parameters to score instead of the tuned ones")
    q.add_argument("--out", default=None)
    args = p.parse_args(argv)

    from retrieval.embeddings import EmbeddingError, atomic_write_json
    from retrieval.index import RetrievalError

    try:
        if args.command == "recall":
            from internvit.features import parse_dtype
            from retrieval.encoders import load_encoder
            from retrieval.evaluate import evaluate_retrieval

            encoder = load_encoder(args.model, mode=args.mode, tokenizer=args.tokenizer, device=args.device,
                                   dtype=parse_dtype(args.dtype))
            result = evaluate_retrieval(encoder, args.annotations, args.images,
                                        split=None if args.split.lower() == "none" else args.split,
                                        index_key=args.index_key, max_index_memory=args.max_index_memory,
                                        target_recall=args.target_recall, batch_size=args.batch_size,
                                        num_workers=args.num_workers)
        else:
            from retrieval.evaluate import index_quality

            result = index_quality(args.index_dir, args.embeddings, queries=args.query_embeddings, k=args.k,
                                   n_queries=args.queries,
                                   search_params=args.params)
        if args.out:
            atomic_write_json(args.out, result)
    except (OSError, ValueError, KeyError, RetrievalError, EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
