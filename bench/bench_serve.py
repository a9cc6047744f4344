#!/usr/bin/env python
"""Benchmark the search service: QPS and p50/p99 latency with 1 and 16 concurrent clients, against the same
queries run through ``Retriever`` in-process.

  python bench/bench_serve.py                 # tiny InternViT, image queries (and text with the InternVL fixture)
  python bench/bench_serve.py --quick         # a small smoke run (checks the script, not the numbers)
  python bench/bench_serve.py --index out/index --queries 500 --json serve.json

The server runs as its own process (``tools/serve.py``), so clients and server do not share a GIL; the clients
are one event loop (uvloop when installed, as the server's; else asyncio's), each with one keep-alive HTTP/1.1
connection (cheap: they leave the CPU to the server). The peer, ``in_process``, is ``Retriever.search_image`` on
the image file; the service gets the same file's bytes as base64 in JSON and decodes them itself.
Goals (issue 10): throughput at 16 clients >= 3x the 1-client throughput (micro-batching), and mean latency at
1 client <= 1.10x the in-process ``Retriever`` call (service overhead). ``core`` is the worker's own calls
without HTTP or queueing (the floor). Both the server and the in-process baselines use ``--torch-threads``
intra-op threads. ``--repeats`` rounds are interleaved; the median round and the min..max are printed, and every
service answer is checked against the in-process one.
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


def _request_bytes(body, k):
    data = json.dumps(dict(body, k=k)).encode()
    return (b"POST /search HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n" % len(data)) + data


async def _client(port, reqs, lat, answers, start):
    """One keep-alive HTTP/1.1 connection sending ``reqs`` (index, raw request) one after the other."""
    import asyncio

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await start.wait()
    try:
        for i, req in reqs:
            t0 = time.perf_counter()
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head.split(b" ", 2)[1])
            length = None
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            if length is None:
                raise RuntimeError("the server answered without Content-Length")
            data = await reader.readexactly(length)
            lat.append(time.perf_counter() - t0)
            answers[i] = (status, data)
    finally:
        writer.close()


def client_loop() -> str:
    """The event loop the clients run on: uvloop when installed (it comes with uvicorn's standard extras), as
    the server's; else asyncio's own."""
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return "asyncio"
    return "uvloop"


def run_clients(port, bodies, clients, k):
    """Send ``bodies`` (JSON dicts) from ``clients`` concurrent keep-alive connections (one event loop,
    :func:`client_loop`: a cheap client that leaves the CPU to the server); returns (latencies, wall, answers as
    (status, body) by query)."""
    import asyncio

    reqs = [(i, _request_bytes(b, k)) for i, b in enumerate(bodies)]
    lat, answers = [], [None] * len(bodies)

    async def go():
        start = asyncio.Event()
        tasks = [asyncio.ensure_future(_client(port, reqs[c::clients], lat, answers, start)) for c in range(clients)]
        await asyncio.sleep(0.2)  # every connection is open before the clock starts
        t0 = time.perf_counter()
        start.set()
        await asyncio.gather(*tasks)
        return time.perf_counter() - t0

    if client_loop() == "uvloop":
        import uvloop

        wall = uvloop.run(go())
    else:
        wall = asyncio.run(go())
    return lat, wall, answers


def check_answers(answers, expected, name):
    """Every answer is a 200 whose ids equal the in-process ones (a swap of two results whose scores differ by
    less than 1e-4 counts as a tie, not an error); returns (identical queries, max |score difference|)."""
    same, worst = 0, 0.0
    for i, ((status, data), (ids, scores)) in enumerate(zip(answers, expected)):
        if status != 200:
            raise RuntimeError(f"{name}: query {i} answered {status}: {data[:200]!r}")
        rows = json.loads(data)["results"]
        got_ids = [r["id"] for r in rows]
        got = [r["score"] for r in rows]
        if len(got) != len(scores):
            raise RuntimeError(f"{name}: query {i}: {len(got)} results, in-process {len(scores)}")
        worst = max(worst, max(abs(a - b) for a, b in zip(got, scores)))
        if got_ids == ids:
            same += 1
        elif sorted(got_ids) != sorted(ids) or worst > 1e-4:
            raise RuntimeError(f"{name}: query {i}: ids {got_ids} differ from in-process {ids}")
    if worst > 1e-4:
        raise RuntimeError(f"{name}: scores differ from in-process by up to {worst:.2e}")
    return same, worst


def in_process(r, queries, kind, k):
    """The same queries through ``Retriever`` in this process; returns (latencies, wall, [(ids, scores)])."""
    fn = r.search_text if kind == "text" else r.search_image
    lat, out = [], []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        res = fn([q], k)
        lat.append(time.perf_counter() - t)
        out.append(([int(x) for x in res.ids[0] if x >= 0], [float(x) for x in res.scores[0][: len(res.rows[0])]]))
    return lat, time.perf_counter() - t0, out


def in_process_core(r, queries, kind, k):
    """The worker's own calls without the service around them (image bytes decoded as the server decodes
    them, the encoder's preprocessing, ``encode_images`` / ``encode_texts``, ``search_embedding``): the floor
    that only the HTTP and queueing overhead separates from the service. Returns (latencies, wall, answers)."""
    import torch

    from internvit.transforms import build_transform
    from retrieval.serve_core import decode_image

    enc = r.encoder
    pre = enc.preprocess
    tf = pre if callable(pre) and not isinstance(pre, dict) else build_transform(pre)
    data = {q: open(q, "rb").read() for q in set(queries)} if kind == "image" else {}
    lat, out = [], []
    t0 = time.perf_counter()
    for q in queries:
        t = time.perf_counter()
        if kind == "text":
            e = enc.encode_texts([q])
        else:
            e = enc.encode_images(torch.stack([tf(decode_image(data[q], 40_000_000))])).float().cpu().numpy()
        res = r.search_embedding(e, k)
        lat.append(time.perf_counter() - t)
        out.append(([int(x) for x in res.ids[0] if x >= 0], [float(x) for x in res.scores[0][: len(res.rows[0])]]))
    return lat, time.perf_counter() - t0, out


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
    p.add_argument("--repeats", type=positive_int, default=3,
                   help="rounds of (in-process, each client count), interleaved so that drift hits all alike; "
                        "the median round is reported with the min..max spread (default 3)")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks that the benchmark runs")
    p.add_argument("--json", default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.queries, args.repeats = min(args.images, 24), min(args.queries, 32), min(args.repeats, 2)

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

    import torch

    from retrieval import Retriever

    torch.set_num_threads(args.torch_threads)
    results = {"index": index_dir, "kind": kind, "k": args.k, "torch_threads": args.torch_threads,
               "server_threads": args.server_threads, "batch_wait_ms": float(args.batch_wait_ms),
               "queries": len(queries), "repeats": args.repeats}
    retriever = Retriever.load(index_dir)
    in_process(retriever, queries[:2], kind, args.k)  # warm-up (builds the encoder)
    port = free_port()
    proc = start_server(index_dir, port, args.torch_threads,
                        ["--threads", str(args.server_threads), "--batch-wait-ms", str(args.batch_wait_ms),
                         "--max-k", str(max(args.k, 10))])
    names = ["in_process", "core"] + [f"service_{c}" for c in args.clients]
    rounds = {n: [] for n in names}
    try:
        run_clients(port, bodies[: max(4, len(bodies) // 8)], 1, args.k)  # warm-up
        for _ in range(args.repeats):
            lat, wall, expected = in_process(retriever, queries, kind, args.k)
            rounds["in_process"].append(_stats(lat, wall))
            lat, wall, core = in_process_core(retriever, queries, kind, args.k)
            same, worst = check_answers([(200, json.dumps({"results": [{"id": i, "score": s} for i, s in zip(*c)]}))
                                         for c in core], expected, "core")
            rounds["core"].append(dict(_stats(lat, wall), identical_ids=same, max_score_diff=worst))
            for c in args.clients:
                lat, wall, answers = run_clients(port, bodies, c, args.k)
                same, worst = check_answers(answers, expected, f"service_{c}")
                rounds[f"service_{c}"].append(dict(_stats(lat, wall), identical_ids=same, max_score_diff=worst))
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    tmp.cleanup()

    def median_round(rs, key):
        return sorted(rs, key=lambda r: r[key])[len(rs) // 2]

    for n in names:
        results[n] = dict(median_round(rounds[n], "qps"), rounds=rounds[n])
    print(f"{len(queries)} {kind} queries, k={args.k}, {args.repeats} rounds; median round (min..max over rounds); "
          f"peer: Retriever in-process; client loop: {client_loop()}; torch threads {args.torch_threads} both sides")
    print(f"{'':12} {'QPS':>20} {'mean ms':>20} {'p50 ms':>8} {'p99 ms':>8}  outputs vs in-process")
    for n in names:
        s, rs = results[n], rounds[n]
        q = f"{s['qps']:.1f} ({min(r['qps'] for r in rs):.0f}..{max(r['qps'] for r in rs):.0f})"
        m = f"{s['mean_ms']:.2f} ({min(r['mean_ms'] for r in rs):.1f}..{max(r['mean_ms'] for r in rs):.1f})"
        check = "" if n == "in_process" else \
            f"ids identical {min(r['identical_ids'] for r in rs)}/{len(queries)}, max |score diff| " \
            f"{max(r['max_score_diff'] for r in rs):.1e}"
        print(f"{n:12} {q:>20} {m:>20} {s['p50_ms']:8.2f} {s['p99_ms']:8.2f}  {check}")
    if 1 in args.clients:  # ratios per round (paired: the same load hit both), then their median and range
        over = sorted(o["mean_ms"] / b["mean_ms"] - 1 for o, b in zip(rounds["service_1"], rounds["in_process"]))
        results["overhead_1_client"] = over[len(over) // 2]
        results["overhead_1_client_rounds"] = over
        print(f"service overhead at 1 client: {100 * over[len(over) // 2]:+.1f}% "
              f"({100 * over[0]:+.1f}..{100 * over[-1]:+.1f}%) (goal <= +10%)")
        core = sorted(o["mean_ms"] / b["mean_ms"] - 1 for o, b in zip(rounds["service_1"], rounds["core"]))
        results["overhead_1_client_vs_core"] = core[len(core) // 2]
        print(f"  over the worker's own calls (core: no HTTP, no queue): {100 * core[len(core) // 2]:+.1f}% "
              f"({100 * core[0]:+.1f}..{100 * core[-1]:+.1f}%)")
        for c in args.clients:
            if c > 1:
                sp = sorted(m["qps"] / o["qps"] for m, o in zip(rounds[f"service_{c}"], rounds["service_1"]))
                results[f"speedup_{c}_clients"] = sp[len(sp) // 2]
                results[f"speedup_{c}_clients_rounds"] = sp
                print(f"throughput {c} clients / 1 client: {sp[len(sp) // 2]:.2f}x ({sp[0]:.2f}..{sp[-1]:.2f}x) "
                      f"(goal >= 3x)")
    if args.quick:
        print("(--quick: tiny sizes, the numbers mean nothing)")
    if args.json:
        from internvit.cli import write_json

        write_json(args.json, results, indent=2)
    return 0


if __name__ == "__main__":
    from internvit.cli import run

    sys.exit(run(main))
