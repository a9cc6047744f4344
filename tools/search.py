#!/usr/bin/env python
"""Query a retrieval index by text, image or embedding; print a table, optionally write an HTML grid.

  python tools/search.py out/index --text "a dog on a beach" "a red car" -k 5
  python tools/search.py out/index --image query.jpg -k 10 --html results.html
  python tools/search.py out/index --embedding queries.npy --json
  python tools/search.py part0/ part1/ part2/ --text "a red car"   # several folders searched as one

The query encoder is the one the index was built with (recorded in its manifest), rebuilt in the recorded
dtype and device unless --dtype / --device are given; --model overrides it (it must be the same model and
dimension, or the search stops with an error). --tokenizer also serves an index built from a weight file
without one (e.g. internvl_c_13b_224px.pth). Bad input: one `error:` line, exit status 2, nothing written.
"""
import argparse
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, device, dtype_arg, existing_file, positive_int, run  # noqa: E402

MAX_K = 2**31 - 1  # faiss' result lists; a search returns at most the index's vector count anyway


def k_value(value: str) -> int:
    """An integer from 1 to 2**31 - 1 (results are at most the number of indexed vectors)."""
    v = positive_int(value)
    if v > MAX_K:
        raise argparse.ArgumentTypeError(f"must be <= {MAX_K}, got {value}")
    return v


#: the library's messages name Python arguments; from the command line, the flags that do the same
CLI_HINTS = (("pass encoder= to Retriever.load, or query with search_embedding",
              "pass --model, or query with --embedding"),)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index_dir", nargs="+", help="index folder(s); several are searched as one collection "
                                                "(global ids from each manifest's id_offset)")
    q = p.add_mutually_exclusive_group(required=True)
    q.add_argument("--text", nargs="+", help="text queries")
    q.add_argument("--image", nargs="+", help="image files")
    q.add_argument("--embedding", type=existing_file, help=".npy file of (Q, D) query vectors")
    p.add_argument("-k", type=k_value, default=10, help="results per query (at most the number of indexed vectors "
                                                       "are returned)")
    p.add_argument("--html", default=None, help="write a result grid with thumbnails to this file")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --html file")
    p.add_argument("--json", action="store_true", help="print JSON records instead of a table")
    p.add_argument("--model", default=None, help="encoder spec (default: the one in the index manifest)")
    p.add_argument("--mode", default=None, choices=["InternVL-C", "InternVL-G"])
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (or its folder) for InternVL text queries")
    p.add_argument("--params", default=None, help="faiss search parameters overriding the tuned ones, "
                                                  "e.g. nprobe=64 or efSearch=128")
    p.add_argument("--device", type=device, default=None,
                   help="default: the one the index was built on (cpu without CUDA)")
    p.add_argument("--dtype", default=None, type=dtype_arg,
                   help="fp32, bf16, fp16, fp64 or torch's names; default: the one the index was built in")
    return p


def main(argv=None) -> int:
    from internvit.cli import USER_ERRORS, one_line

    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as e:  # one line, naming this tool's flags where the library names Python arguments
        text = one_line(e)
        for python, flag in CLI_HINTS:
            text = text.replace(python, flag)
        raise UsageError(text) from None


def _main(args) -> int:
    if args.text is not None and any(not t.strip() for t in args.text):
        raise UsageError("empty text query")
    if args.html and os.path.isdir(args.html):
        raise UsageError(f"--html {args.html}: is a folder; give a file name")
    if args.html:
        from internvit.store import check_outside_managed

        check_outside_managed("--html", args.html)
    if args.html and os.path.lexists(args.html) and not args.overwrite:
        raise UsageError(f"--html {args.html}: already exists (pass --overwrite to replace it)")


    from internvit.features import parse_dtype
    from retrieval.search import Retriever, format_table

    query = None
    if args.embedding is not None:
        from retrieval.evaluate import load_query_vectors

        try:
            query = load_query_vectors(args.embedding)
        except ValueError as e:
            raise UsageError(f"--embedding {e}") from None
    dtype = parse_dtype(args.dtype) if args.dtype else None
    # the index (file, metadata, search params) is opened and checked before any model is loaded
    dirs = args.index_dir[0] if len(args.index_dir) == 1 else args.index_dir
    retriever = Retriever.load(dirs, None, device=args.device, dtype=dtype, tokenizer=args.tokenizer,
                               search_params=args.params)
    if args.model:
        from retrieval.encoders import load_encoder, recorded_device_dtype

        dev, dt = recorded_device_dtype(retriever.manifest.get("encoder"), args.device, dtype)
        encoder = load_encoder(args.model, mode=args.mode, tokenizer=args.tokenizer, device=dev, dtype=dt)
        for r in getattr(retriever, "retrievers", [retriever]):
            encoder.check_compatible(r.manifest, r.index_dir)
            r._encoder = encoder
        retriever._encoder = encoder
    if args.text is not None:
        result = retriever.search_text(args.text, args.k)
    elif args.image is not None:
        result = retriever.search_image(args.image, args.k)
    else:
        result = retriever.search_embedding(query, args.k)
    if args.html:
        from retrieval.html import write_html

        write_html(result, args.html, title=f"{' '.join(args.index_dir)}: top {args.k}")
    if args.json:
        print(json.dumps(result.to_records(), default=str, ensure_ascii=False))
    else:
        print(format_table(result))
    if args.html:
        print(f"wrote {args.html}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
