#!/usr/bin/env python
"""The whole feature-extraction pipeline against the bare model, in one process.

Pipeline: ``FeatureExtractor.extract`` (decode, resize + centre crop, normalise, batch with DataLoader workers
or, without workers, a prefetch thread; model, pool; in memory) and ``FeatureExtractor.write`` (the same plus
shards, metadata and manifest) over a folder of generated 640x480 JPEGs (photo-like: smooth colour fields plus
sensor-like noise, quality 90). Peer: the same ``FeatureExtractor.encode`` (model + pooling + copy to numpy) on
pre-made tensors, the same number of images and batches. Statistic: images/s per round, median [min-max] over
``--rounds`` interleaved rounds; the ratio is pipeline / bare (ratio of medians, with the per-round min-max);
goal >= 0.90.

Also printed: the weights fingerprint of the manifest (all weight bytes hashed: the first call per model in a
process, and a later call, which the cache answers while the weights are unchanged; the write rows include the
later kind, and the one-time cost is shown amortised over this run), the decoding (``load_image`` with PIL, the
default, and with torchvision's decoder, opt-in through ``INTERNVIT_JPEG=torchvision``: ms/image and whether
their pixels are identical on these JPEGs) and the preprocessing cost per image
against the bare model's time per image, and the time the model loop waited for input (median per run).

Correctness (non-zero exit if it fails): written and extracted features equal ``encode`` of the same images
preprocessed in this process (max |diff| <= 1e-5, same batches); torchvision's decoded pixels equal PIL's.

  python bench/bench_extract.py                 # InternViT-300M (24 blocks) at 224 px, fp32, 32 images, workers 0,1
  python bench/bench_extract.py --quick         # 2 blocks, 56 px, 16 images, 2 rounds: checks that it runs
  python bench/bench_extract.py --depth 4 --dtype bf16 --workers 1 --images 128
"""
import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Optional

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import fail, fmt_spread, interleaved, machine, make_jpegs, paired_ratios, table  # noqa: E402

import internvit  # noqa: E402
from internvit import jpeg  # noqa: E402
from internvit.data import list_images, load_image  # noqa: E402
from internvit.features import FeatureExtractor, read_features  # noqa: E402
from internvit.fingerprint import clear_fingerprint_cache  # noqa: E402


def decode_costs(paths: list, rounds: int = 3) -> tuple[float, Optional[float], bool]:
    """``load_image`` ms/image with PIL and with the opt-in torchvision decoder (``None`` where unavailable),
    interleaved, median over ``rounds``; and whether both give the same pixels on every image."""
    saved_env, saved = os.environ.get("INTERNVIT_JPEG"), jpeg._available
    try:
        os.environ["INTERNVIT_JPEG"] = "torchvision"
        jpeg._available = None
        tv_ok = jpeg.fast_jpeg_available()  # its one-time self-check, outside the timing
        ms: dict = {"pil": [], "tv": []}
        pixels: dict = {}
        for r in range(rounds):
            for kind in (("pil", "tv") if r % 2 == 0 else ("tv", "pil")):
                if kind == "tv" and not tv_ok:
                    continue
                jpeg._available = kind == "tv"
                t0 = time.perf_counter()
                pixels[kind] = [np.asarray(load_image(q)) for q in paths]
                ms[kind].append((time.perf_counter() - t0) / len(paths) * 1e3)
        same = not tv_ok or all(np.array_equal(a, b) for a, b in zip(pixels["pil"], pixels["tv"]))
        return statistics.median(ms["pil"]), (statistics.median(ms["tv"]) if tv_ok else None), same
    finally:
        if saved_env is None:
            os.environ.pop("INTERNVIT_JPEG", None)
        else:
            os.environ["INTERNVIT_JPEG"] = saved_env
        jpeg._available = saved


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=32)
    p.add_argument("--depth", type=int, default=24, help="blocks of the InternViT-300M shape (24 = the real model)")
    p.add_argument("--image-size", type=int, default=224)
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--workers", default="0,1", help="comma list of DataLoader worker counts to try")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads for the model")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--tmp", default=None, help="where to write the JPEGs and feature folders")
    args = p.parse_args(argv)
    if args.quick:
        args.images, args.depth, args.image_size, args.rounds, args.batch = 16, 2, 56, 2, 4
    if args.threads:
        torch.set_num_threads(args.threads)
    workers = [int(w) for w in args.workers.split(",") if w != ""]
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32

    cfg = internvit.get_config("internvit-300m-448px")
    cfg.num_hidden_layers, cfg.image_size = args.depth, args.image_size
    torch.manual_seed(0)
    model = internvit.build_model(cfg).eval()
    tmp = tempfile.mkdtemp(prefix="bench-extract-", dir=args.tmp)
    try:
        img_dir = os.path.join(tmp, "jpegs")
        os.makedirs(img_dir)
        make_jpegs(img_dir, args.images, unique=min(args.images, 64))
        paths = list_images(img_dir)
        mean_kb = sum(os.path.getsize(q) for q in paths) / len(paths) / 1024
        fes = {w: FeatureExtractor(model, pool="cls", batch_size=args.batch, num_workers=w, dtype=dtype,
                                   progress=False) for w in workers}
        fe0 = fes[workers[0]]

        # the weights fingerprint: first call per model (every weight byte hashed), then the cached one
        clear_fingerprint_cache()
        t0 = time.perf_counter()
        fe0.model_info()
        fingerprint_first_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        fe0.model_info()
        fingerprint_cached_s = time.perf_counter() - t0

        pil_ms, tv_ms, same_pixels = decode_costs(paths)
        if not same_pixels:
            fail("torchvision's JPEG decoding differs from PIL's on the benchmark JPEGs")
        decoder = "torchvision.io.decode_jpeg (INTERNVIT_JPEG=torchvision)" if jpeg.fast_jpeg_available() else "PIL"
        tv_text = (f"{tv_ms:.1f} ms/image, pixels identical to PIL's on all {len(paths)} JPEGs" if tv_ms is not None
                   else "unavailable here")

        # correctness: pipeline output == encode of the same images preprocessed here
        t0 = time.perf_counter()
        pre = [fe0.transform(load_image(q)) for q in paths]
        prep_ms = (time.perf_counter() - t0) / len(paths) * 1e3
        ref = np.concatenate([fe0.encode(torch.stack(pre[i:i + args.batch])).cpu().numpy()
                              for i in range(0, len(pre), args.batch)])
        counter = iter(range(10 ** 6))

        def write(fe):
            out = os.path.join(tmp, f"out{next(counter)}")
            fe.write(img_dir, out)
            return out

        feats, _ = read_features(write(fes[workers[0]]))
        for label, got in ((f"write, {workers[0]} workers", feats),
                           (f"extract, {workers[-1]} workers", fes[workers[-1]].extract(img_dir).features)):
            d = float(np.abs(got - ref).max()) if got.shape == ref.shape else float("inf")
            if d > 1e-5:
                fail(f"pipeline features ({label}) differ from encode() of the same images: {d:.2e}")
        batches = [torch.stack(pre[i:i + args.batch]) for i in range(0, len(pre), args.batch)]

        def bare():
            for b in batches:
                fe0.encode(b).cpu().numpy()

        waits: dict = {}  # per row: seconds the model loop waited for input, per run
        fp_write: list = []  # per write call: seconds in the fingerprint (cached)

        def run_extract(fe, name):
            fe.extract(img_dir)
            waits.setdefault(name, []).append(fe.last_stats.get("input_wait_seconds", float("nan")))

        def run_write(fe, name):
            out = os.path.join(tmp, f"out{next(counter)}")
            timing = fe.write(img_dir, out)["timing"]
            waits.setdefault(name, []).append(timing.get("input_wait_seconds", float("nan")))
            fp_write.append(timing.get("fingerprint_seconds", float("nan")))
            shutil.rmtree(out)

        fns = {"bare": bare}
        for w, fe in fes.items():
            fns[f"extract, {w} workers"] = (lambda fe=fe, k=f"extract, {w} workers": run_extract(fe, k))
            fns[f"write, {w} workers"] = (lambda fe=fe, k=f"write, {w} workers": run_write(fe, k))
        times = interleaved(fns, args.rounds, warmup=0)
        n = len(paths)
        bare_ms = statistics.median(times["bare"]) / n * 1e3
        print(f"{machine()}; InternViT-300M shape, {args.depth} blocks, {args.image_size}px, {args.dtype}, batch "
              f"{args.batch}, pool cls; {n} JPEGs 640x480 (mean {mean_kb:.0f} KiB); {args.rounds} interleaved rounds")
        print(f"decoding (load_image, median of 3 interleaved passes): PIL {pil_ms:.1f} ms/image, torchvision "
              f"{tv_text}; used in the pipeline rows: {decoder}; decode + resize/crop + normalise: {prep_ms:.1f} "
              f"ms/image in one thread, {prep_ms / bare_ms:.1%} of the bare model's {bare_ms:.1f} ms/image")
        print(f"weights fingerprint (manifest): first call per model {fingerprint_first_s:.3f} s (= "
              f"{fingerprint_first_s / n * 1e3:.1f} ms/image if this run were the whole job), cached "
              f"{fingerprint_cached_s * 1e3:.2f} ms; inside the write rows: median "
              f"{statistics.median(fp_write) * 1e3:.2f} ms [{min(fp_write) * 1e3:.2f}-{max(fp_write) * 1e3:.2f}] "
              f"per call" if fp_write else "")
        rows = []
        for name, t in times.items():
            ips = [n / s for s in t]
            if name == "bare":
                rows.append([name + " (peer: encode on pre-made tensors)", fmt_spread(ips, "{:.2f}"), "1", "", ""])
                continue
            r = paired_ratios(times["bare"], t)
            ratio = statistics.median(times["bare"]) / statistics.median(t)
            what = " (decode..model, in memory)" if name.startswith("extract") else " (decode..write shards)"
            w = waits.get(name) or [float("nan")]
            rows.append([name + what, fmt_spread(ips, "{:.2f}"),
                         f"{ratio:.3f} [{min(r):.3f}-{max(r):.3f}]", f"{statistics.median(w):.3f}",
                         "met" if ratio >= 0.9 else "NOT met"])
        print(table(rows, ["what", "images/s median [min-max]", "of bare (ratio of medians [per-round min-max])",
                           "input wait s (median)", "goal >= 0.90"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
