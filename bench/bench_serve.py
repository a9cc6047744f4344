#!/usr/bin/env python
"""Benchmark the search service: QPS and p50/p99 latency with 1 and 16 concurrent clients, against the same
queries run through ``Retriever`` in-process.

  python bench/bench_serve.py                 # tiny InternViT, image queries (and text with the InternVL fixture)
  python bench/bench_serve.py --quick         # a small smoke run (checks the script, not the numbers)
  python bench/bench_serve.py --index out/index --queries 500 --json serve.json

The server runs as its own process (``tools/serve.py``), so clients and server do not share a GIL; each client
keeps one HTTP/1.1 connection. Goals (issue 10): throughput at 16 clients >= 3x the 1-client throughput (micro-
batching), and mean latency at 1 client <= 1.10x the in-process ``Retriever`` call (service overhead). Both the
server and the in-process baseline use ``--torch-threads`` intra-op threads.
"""
import argparse
import base64
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q / 100 * (len(xs) - 1))))]


def _stats(lat, wall):
    return {"n": len(lat), "qps": len(lat) / wall, "mean_ms": 1000 * statistics.fmean(lat),
            "p50_ms": 1000 * _pct(lat, 50), "p99_ms": 1000 * _pct(lat, 99)}


def build(folder, n, spec, kind="img"):
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images
    from tests.retrieval.helpers import make_images

    imgs = os.path.join(folder, "imgs")
    make_images(imgs, n, size=(224, 224))
    out = os.path.join(folder, "index")
    index_images(imgs, out, load_encoder(spec), kind=kind, progress=False)
    return out, imgs


def start_server(index_dir, port, torch_threads, extra):
    env = dict(os.environ, OMP_NUM_THREADS=str(torch_threads))
    cmd = [sys.executable, os.path.join(ROOT, "tools", "serve.py"), index_dir, "--port", str(port),
           "--log-level", "warning", "--reload-interval", "0"] + extra
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(proc.stderr.read().decode()[-2000:])
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return proc
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server did not start")


def run_clients(port, bodies, clients, k):
    """Send ``bodies`` (JSON dicts) round-robin from ``clients`` threads; returns (latencies, wall, errors)."""
    lat, errors, lock = [], [], threading.Lock()
    per = [bodies[i::clients] for i in range(clients)]
    payloads = [[json.dumps(dict(b, k=k)).encode() for b in part] for part in per]
    barrier = threading.Barrier(clients + 1)

    def client(part):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        barrier.wait()
        for body in part:
            t0 = time.perf_counter()
            c.request("POST", "/search", body, {"Content-Type": "application/json"})
            r = c.getresponse()
            data = r.read()
            dt = time.perf_counter() - t0
            with lock:
                lat.append(dt)
                if r.status != 200:
                    errors.append(data[:200])
        c.close()

    threads = [threading.Thread(target=client, args=(p,)) for p in payloads]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - t0, errors


def in_process(index_dir, queries, kind, k, torch_threads):
    import torch

    from retrieval import Retriever

    torch.set_num_threads(torch_threads)
    r = Retriever.load(index_dir)
    fn = r.search_text if kind == "text" else r.search_image
    fn([queries[0]], k)  # warm-up (loads the encoder)
    lat = []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        fn([q], k)
        lat.append(time.perf_counter() - t)
    return lat, time.perf_counter() - t0


def main(argv=None):
    from internvit.cli import ArgumentParser, existing_dir, positive_int

    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", type=existing_dir, default=None, help="an existing index (default: build a tiny one)")
    p.add_argument("--model", default="internvit:internvit-6b-tiny", help="encoder of the built index")
    p.add_argument("--images", type=positive_int, default=256, help="images in the built index")
    p.add_argument("--queries", type=positive_int, default=256, help="queries per measurement")
    p.add_argument("--clients", type=positive_int, nargs="+", default=[1, 16])
    p.add_argument("-k", type=positive_int, default=10)
    p.add_argument("--torch-threads", type=positive_int, default=1)
    p.add_argument("--server-threads", type=positive_int, default=2, help="tools/serve.py --threads")
    p.add_argument("--batch-wait-ms", default="2", help="tools/serve.py --batch-wait-ms")
    p.add_argument("--text", action="store_true", help="text queries (needs a text-capable --index/--model)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.queries = min(args.images, 24), min(args.queries, 32)

    from retrieval.serve import free_port

    tmp = tempfile.TemporaryDirectory(prefix="bench_serve_")
    if args.index:
        index_dir, imgs = args.index, None
    else:
        index_dir, imgs = build(tmp.name, args.images, args.model)
    kind = "text" if args.text else "image"
    if kind == "text":
        words = ["red", "green", "blue", "grey", "striped", "smooth", "bright", "dark"]
        queries = [f"a {words[i % 8]} pattern number {i}" for i in range(args.queries)]
        bodies = [{"text": q} for q in queries]
    else:
        if imgs is None:
            from retrieval import Retriever

            r = Retriever.load(index_dir)
            paths = [r.metadata(i).get("image_path") or r.metadata(i).get("path") for i in range(min(r.ntotal, 64))]
        else:
            paths = sorted(os.path.join(imgs, f) for f in os.listdir(imgs) if f.endswith(".png"))
        queries = [paths[i % len(paths)] for i in range(args.queries)]
        enc = {}
        for q in set(queries):
            with open(q, "rb") as f:
                enc[q] = base64.b64encode(f.read()).decode()
        bodies = [{"image": enc[q]} for q in queries]

    results = {"index": index_dir, "kind": kind, "k": args.k, "torch_threads": args.torch_threads,
               "server_threads": args.server_threads, "batch_wait_ms": float(args.batch_wait_ms)}
    lat, wall = in_process(index_dir, queries, kind, args.k, args.torch_threads)
    results["in_process"] = _stats(lat, wall)
    port = free_port()
    proc = start_server(index_dir, port, args.torch_threads,
                        ["--threads", str(args.server_threads), "--batch-wait-ms", str(args.batch_wait_ms),
                         "--max-k", str(max(args.k, 10))])
    try:
        run_clients(port, bodies[: max(4, len(bodies) // 8)], 1, args.k)  # warm-up
        for c in args.clients:
            lat, wall, errors = run_clients(port, bodies, c, args.k)
            if errors:
                raise RuntimeError(f"{len(errors)} failed queries, e.g. {errors[0]!r}")
            results[f"service_{c}"] = _stats(lat, wall)
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tmp.cleanup()

    base = results["in_process"]
    print(f"{'':14} {'QPS':>8} {'mean ms':>8} {'p50 ms':>8} {'p99 ms':>8}")
    for name in ["in_process"] + [f"service_{c}" for c in args.clients]:
        s = results[name]
        print(f"{name:14} {s['qps']:8.1f} {s['mean_ms']:8.2f} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f}")
    if 1 in args.clients:
        one = results["service_1"]
        results["overhead_1_client"] = one["mean_ms"] / base["mean_ms"] - 1
        print(f"service overhead at 1 client: {100 * results['overhead_1_client']:+.1f}% (goal <= +10%)")
        for c in args.clients:
            if c > 1:
                results[f"speedup_{c}_clients"] = results[f"service_{c}"]["qps"] / one["qps"]
                print(f"throughput {c} clients / 1 client: {results[f'speedup_{c}_clients']:.2f}x (goal >= 3x)")
    if args.quick:
        print("(--quick: tiny sizes, the numbers mean nothing)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    from internvit.cli import run

    sys.exit(run(main))
