#!/usr/bin/env python
"""Query a retrieval index by text, image or embedding; print a table, optionally write an HTML grid.

  python tools/search.py out/index --text "a dog on a beach" "a red car" -k 5
  python tools/search.py out/index --image query.jpg -k 10 --html results.html
  python tools/search.py out/index --embedding queries.npy --json

The query encoder is the one the index was built with (recorded in its manifest), rebuilt in the recorded
dtype and device unless --dtype / --device are given; --model overrides it (it must be the same model and
dimension, or the search stops with an error). --tokenizer also serves an index built from a weight file
without one (e.g. internvl_c_13b_224px.pth).
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index_dir")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", nargs="+", help="text queries")
    q.add_argument("--image", nargs="+", help="image files")
    q.add_argument("--embedding", help=".npy file of (Q, D) query vectors")
    p.add_argument("-k", type=int, default=10, help="results per query")
    p.add_argument("--html", default=None, help="write a result grid with thumbnails to this file")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--model", default=None, help="encoder spec (default: the one in the index manifest)")
    p.add_argument("--mode", default=None, choices=["InternVL-C", "InternVL-G"])
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (or its folder) for InternVL text queries")
    p.add_argument("--params", default=None, help="faiss search parameters overriding the tuned ones, "
                                                  "e.g. nprobe=64 or efSearch=128")
    p.add_argument("--device", default=None, help="default: the one the index was built on (cpu without CUDA)")
    p.add_argument("--dtype", default=None, help="fp32, bf16 or fp16 (default: the one the index was built in)")
    args = p.parse_args(argv)

    from retrieval.embeddings import EmbeddingError
    from retrieval.index import RetrievalError

    try:
        import numpy as np

        from internvit.features import parse_dtype
        from retrieval.search import Retriever, format_table

        dtype = parse_dtype(args.dtype) if args.dtype else None
        encoder = None
        if args.model:
            from retrieval.encoders import load_encoder, recorded_device_dtype
            from retrieval.index import read_manifest

            device, dt = recorded_device_dtype(read_manifest(args.index_dir).get("encoder"), args.device, dtype)
            encoder = load_encoder(args.model, mode=args.mode, tokenizer=args.tokenizer, device=device, dtype=dt)
        retriever = Retriever.load(args.index_dir, encoder, device=args.device, dtype=dtype,
                                   tokenizer=args.tokenizer, search_params=args.params)
        if args.text is not None:
            result = retriever.search_text(args.text, args.k)
        elif args.image is not None:
            result = retriever.search_image(args.image, args.k)
        else:
            result = retriever.search_embedding(np.load(args.embedding, allow_pickle=False), args.k)
        if args.html:
            from retrieval.html import write_html

            write_html(result, args.html, title=f"{args.index_dir}: top {args.k}")
    except (OSError, ValueError, KeyError, RetrievalError, EmbeddingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps(result.to_records(), default=str, ensure_ascii=False))
    else:
        print(format_table(result))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
