#!/usr/bin/env python
"""Serve one or more retrieval indexes over HTTP: a search page at /, a JSON API, and clip-retrieval's
back-end API (/indices-list, /knn-service, /metadata), so clip-retrieval's front end and ClipClient work.

  python tools/serve.py out/index                        # http://127.0.0.1:1234/
  python tools/serve.py photos=out/img_index captions=out/cap_index --port 8080
  python tools/serve.py all=parts/a,parts/b,parts/c photos=out/img_index   # a group of folders as one index
  python tools/serve.py out/index --host 0.0.0.0 --allow-remote     # other machines too (no authentication!)

Indexes are named by their folder's base name, or NAME=DIR. NAME=DIR1,DIR2[,...] serves a group: folders
holding disjoint parts of one collection (ids made global by each manifest's id_offset; see docs/scale.md),
searched as one index NAME, results merged by score. An index folder that a later
`tools/build_index.py --add` (or a rebuild) commits to is reloaded in the background without a restart;
a commit to any member of a group reloads the whole group.
See docs/serve.md for the API, the limits and the hot-reload rules.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, UsageError, device, dtype_arg, memory_size, nonnegative_int, positive_int, run  # noqa: E402


def _nonneg_float(value: str) -> float:
    import argparse

    try:
        v = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {value!r}") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {value}")
    return v


def _port(value: str) -> int:
    import argparse

    v = nonnegative_int(value)
    if v > 65535:
        raise argparse.ArgumentTypeError(f"must be a TCP port 0..65535, got {v}")
    return v


def main(argv=None) -> int:
    import argparse

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("index_dirs", nargs="+", metavar="INDEX_DIR",
                   help="index folders (or NAME=DIR; NAME=DIR1,DIR2,... for a group of folders searched as one)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    p.add_argument("--port", type=_port, default=1234, help="port (default 1234; 0 = any free port)")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --host that is not loopback (the service has no authentication)")
    p.add_argument("--device", type=device, default=None,
                   help="device of the query encoders (default: the one each index was built on, cpu without CUDA)")
    p.add_argument("--dtype", default=None, type=dtype_arg,
                   help="fp32, bf16, fp16, fp64 or torch's names; default: the one each index was built in")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model for InternVL text queries (overrides the "
                                                     "recorded one)")
    p.add_argument("--image-root", default=None, help="base folder of relative image paths in the metadata "
                                                      "(default: the current folder)")
    p.add_argument("--max-k", type=positive_int, default=1000, help="most results per query (default 1000)")
    p.add_argument("--max-text-chars", type=positive_int, default=2000, help="longest text query (default 2000)")
    p.add_argument("--max-upload", type=memory_size, default=16 * 1024**2,
                   help="largest query image, in bytes (default 16M)")
    p.add_argument("--max-pixels", type=positive_int, default=40_000_000,
                   help="most decoded pixels of a query image (default 40000000)")
    p.add_argument("--batch-wait-ms", type=_nonneg_float, default=2.0,
                   help="under load, how long a batch waits for more queries (default 2 ms; 0 = never)")
    p.add_argument("--max-batch", type=positive_int, default=32, help="most queries encoded together (default 32)")
    p.add_argument("--threads", type=positive_int, default=2,
                   help="batches encoded and searched at once (one worker thread per index) and image decoding "
                        "threads (default 2)")
    p.add_argument("--inline-ms", type=_nonneg_float, default=20.0,
                   help="a lone query on an idle index runs on the event loop thread, without a thread "
                        "hand-off, while lone queries take at most this long (default 20 ms; 0 = never)")
    p.add_argument("--reload-interval", type=_nonneg_float, default=1.0,
                   help="seconds between checks of the index manifests (0 = no hot reload)")
    p.add_argument("--max-connections", type=positive_int, default=256,
                   help="concurrent connections before the server answers 503 (default 256)")
    p.add_argument("--public-url", default=None,
                   help="the URL clients reach the service at when it runs behind a reverse proxy, e.g. "
                        "https://example.org/search/ (result URLs start with it; default: the URL each request "
                        "came to)")
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])
    p.add_argument("--access-log", action="store_true",
                   help="log one line per request (off by default: it costs as much as a small query)")
    args = p.parse_args(argv)

    from retrieval.serve import _index_names, check_host, check_public_url

    warning = check_host(args.host, args.allow_remote)  # ValueError -> one error line, exit 2
    if args.public_url is not None:
        try:
            args.public_url = check_public_url(args.public_url)
        except ValueError as e:
            raise UsageError(f"--public-url: {e}") from None
    names = _index_names(args.index_dirs)  # NAME=DIR1,DIR2 groups; bad group syntax -> one error line
    for dirs in names.values():
        for path in [dirs] if isinstance(dirs, str) else dirs:
            if not os.path.isfile(os.path.join(path, "manifest.json")):
                raise UsageError(f"{path}: not an index folder (no manifest.json)" if os.path.isdir(path)
                                 else f"{path}: no such folder")
        if not isinstance(dirs, str):  # members must answer the same queries, with disjoint id ranges
            from retrieval.index_folder import read_manifest
            from retrieval.sharded import check_shards

            check_shards([read_manifest(d) for d in dirs], dirs)
    if args.port:  # a taken port is reported now, before the indexes are loaded
        import socket

        with socket.socket(socket.AF_INET6 if ":" in args.host else socket.AF_INET) as sock:
            # as uvicorn binds (SO_REUSEADDR, then listen): connections of a stopped server left in TIME-WAIT do
            # not block a restart on the same port, a listening process does
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((args.host, args.port))
                sock.listen(1)
            except OSError as e:
                raise UsageError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    if args.tokenizer is not None:  # as search.py: a tokenizer that cannot be read stops the start-up
        from internvit import get_tokenizer

        try:
            get_tokenizer(args.tokenizer)
        except Exception as e:  # noqa: BLE001 - missing file, folder without tokenizer.model, not sentencepiece
            msg = (str(e).splitlines() or [type(e).__name__])[0]
            msg = msg[len(args.tokenizer):].lstrip(": ") if msg.startswith(args.tokenizer) else msg
            raise UsageError(f"--tokenizer {args.tokenizer}: {msg}") from None
    from PIL import Image

    if Image.MAX_IMAGE_PIXELS and args.max_pixels > Image.MAX_IMAGE_PIXELS:  # the decoder refuses more anyway
        raise UsageError(f"--max-pixels {args.max_pixels}: over the image decoder's (PIL's) limit of "
                         f"{Image.MAX_IMAGE_PIXELS} pixels; give at most that")
    if args.image_root and not os.path.isdir(args.image_root):
        raise UsageError(f"--image-root {args.image_root}: no such folder")
    dtype = None
    if args.dtype:
        from internvit.features import parse_dtype

        dtype = parse_dtype(args.dtype)
    if warning:
        print(warning, file=sys.stderr)

    import uvicorn

    from retrieval.serve import ServeLimits, create_app

    limits = ServeLimits(max_k=args.max_k, max_text_chars=args.max_text_chars, max_upload_bytes=args.max_upload,
                         max_pixels=args.max_pixels)
    app = create_app(names, device=args.device, dtype=dtype, tokenizer=args.tokenizer, limits=limits,
                     batch_wait_ms=args.batch_wait_ms, max_batch=args.max_batch, threads=args.threads,
                     inline_ms=args.inline_ms, public_url=args.public_url,
                     reload_interval_s=args.reload_interval, image_root=args.image_root)
    if args.port == 0:
        from retrieval.serve import free_port

        args.port = free_port(args.host)
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {', '.join(app.state.served)} on http://{host}:{args.port}/", file=sys.stderr, flush=True)
    from retrieval.serve_http import http_protocol

    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level, access_log=args.access_log,
                limit_concurrency=args.max_connections, timeout_keep_alive=5, server_header=False,
                http=http_protocol())
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
