#!/usr/bin/env python
"""The whole feature-extraction pipeline against the bare model, in one process.

Pipeline: ``FeatureExtractor.extract`` (decode, resize + centre crop, normalise, batch with DataLoader workers,
model, pool; in memory) and ``FeatureExtractor.write`` (the same plus shards, metadata and manifest, whose model
fingerprint is a one-time cost per call, printed) over a folder of generated 640x480 JPEGs (photo-like: smooth
colour fields plus sensor-like noise, quality 90). Peer: the same ``FeatureExtractor.encode`` (model + pooling + copy to
numpy) on pre-made tensors, the same number of images and batches. Statistic: images/s per round, median
[min-max] over ``--rounds`` interleaved rounds; the ratio is pipeline / bare (ratio of medians, with the
per-round min-max); goal >= 0.90. Also printed: the preprocessing cost alone (decode + transform per image,
one process), which is what the workers must hide behind the model.

Correctness (non-zero exit if it fails): written and extracted features equal ``encode`` of the same images
preprocessed in this process (max |diff| <= 1e-5, same batches).

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

import numpy as np
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import fail, fmt_spread, interleaved, machine, make_jpegs, paired_ratios, table  # noqa: E402

import internvit  # noqa: E402
from internvit.data import list_images, load_image  # noqa: E402
from internvit.features import FeatureExtractor, read_features  # noqa: E402


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
        t0 = time.perf_counter()
        fe0.model_info()
        fingerprint_s = time.perf_counter() - t0

        batches = [torch.stack(pre[i:i + args.batch]) for i in range(0, len(pre), args.batch)]

        def bare():
            for b in batches:
                fe0.encode(b).cpu().numpy()

        fns = {"bare": bare}
        for w, fe in fes.items():
            fns[f"extract, {w} workers"] = (lambda fe=fe: fe.extract(img_dir))
            fns[f"write, {w} workers"] = (lambda fe=fe: shutil.rmtree(write(fe)))
        times = interleaved(fns, args.rounds, warmup=0)
        n = len(paths)
        print(f"{machine()}; InternViT-300M shape, {args.depth} blocks, {args.image_size}px, {args.dtype}, batch "
              f"{args.batch}, pool cls; {n} JPEGs 640x480 (mean {mean_kb:.0f} KiB); {args.rounds} interleaved rounds")
        print(f"preprocessing alone (PIL decode + resize/crop + normalise, this process): {prep_ms:.1f} ms/image; "
              f"one-time cost per write call (manifest: model fingerprint): {fingerprint_s:.2f} s, included in the "
              f"write rows")
        rows = []
        for name, t in times.items():
            ips = [n / s for s in t]
            if name == "bare":
                rows.append([name + " (peer: encode on pre-made tensors)", fmt_spread(ips, "{:.2f}"), "1", ""])
                continue
            r = paired_ratios(times["bare"], t)
            ratio = statistics.median(times["bare"]) / statistics.median(t)
            what = " (decode..model, in memory)" if name.startswith("extract") else " (decode..write shards)"
            rows.append([name + what, fmt_spread(ips, "{:.2f}"),
                         f"{ratio:.3f} [{min(r):.3f}-{max(r):.3f}]", "met" if ratio >= 0.9 else "NOT met"])
        print(table(rows, ["what", "images/s median [min-max]", "of bare (ratio of medians [per-round min-max])",
                           "goal >= 0.90"]))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
