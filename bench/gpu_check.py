#!/usr/bin/env python
"""One prepared GPU check (about 5-8 minutes on one H200): parity, 6B throughput, feature extraction, segmentation.

Sections (each one's numbers go to ``gpu_check.json`` under ``--out`` / ``$OUT``, rewritten after every section
so a run cut short still leaves what it measured; exit status 1 if a correctness check failed or a section
raised):

1. **parity**: the fixtures (``internvit-6b-style-tiny``: both inputs, every hidden state) on the device in fp32
   (TF32 off; max |diff| <= 1e-4) and bf16 (relative L2 error of the last hidden state against the fp32
   reference, for our SDPA path, our GEMM path and the upstream-style bf16 path of ``_common.py``; ours must
   be <= 1.05x upstream's). The InternVL-C/G fixture's image and text embeddings too (fp32, 1e-4).
2. **forward**: an InternViT-6B (48 blocks, width 3200, random weights, bf16) at 224 and 448 px with a batch
   sweep: images/s, TFLOP/s and the fraction of the bf16 matmul peak (8192^3 ``torch.mm``, timed in the same
   interleaved rounds); goal >= 0.55 at 448 px.
2b. **compile**: the same 6B, eager against ``compile_model(model, 'inductor')`` at 448 px batch 16 (interleaved;
   compile time reported; skipped if less than 150 s of the budget is left).
3. **extract**: ``FeatureExtractor`` over a folder of generated 640x480 JPEGs (decode, resize, normalise,
   batch, model) against the same model's ``encode`` on pre-made device batches; goal >= 0.90 of bare.
   Models: the 6B at 224 px and InternViT-300M at 448 px, bf16.
4. **seg**: the 6B backbone as full tuning uses it (504 px, bf16 parameters, drop-path 0.4, ``out_indices``
   [11, 23, 35, 47], batch 2): forward + backward of the core model's ``forward_intermediates`` (the mmseg
   plugin is not importable without mmseg), peak memory and it/s with and without gradient checkpointing.

Dependencies on the device: torch, numpy, safetensors (parity), pillow + torchvision + tqdm (only for
``extract``; the H200 image of this workplace has them all, so no wheels need carrying). Where torchvision is
missing the core is imported without the package ``__init__`` and ``extract`` is reported as skipped; to run it,
carry wheels (``pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl torchvision==<match>
pillow tqdm`` here, ``pip install --no-index .whl/*.whl`` there; ``.whl/`` is git-ignored).

The fixtures (``../shared/fixtures``) do not travel with the repo: copy them into an ignored folder first,
``mkdir -p work_dirs && cp -r ../shared/fixtures work_dirs/gpu_fixtures``, and carry that folder:

  run(command="PYTHONUNBUFFERED=1 python3 bench/gpu_check.py --fixtures work_dirs/gpu_fixtures",
      carry=["work_dirs/gpu_fixtures"], timeout_s=600)
  python bench/gpu_check.py --device cpu --quick --fixtures ../shared/fixtures     # tiny sizes, checks it runs
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
import traceback
import types

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import interleaved, make_jpegs, matmul_peak, rel_error, sync, vit_flops  # noqa: E402


def import_core():
    """``internvit`` (full package if its dependencies are there, else the core modules only)."""
    try:
        import internvit

        return internvit, True
    except ImportError as e:
        print(f"note: full 'import internvit' failed ({e}); importing the core modules only", flush=True)
        for name in [m for m in sys.modules if m == "internvit" or m.startswith("internvit.")]:
            del sys.modules[name]
        pkg = types.ModuleType("internvit")
        pkg.__path__ = [os.path.join(ROOT, "internvit")]
        sys.modules["internvit"] = pkg
        from internvit import factory
        from internvit.config import get_config

        pkg.load_model, pkg.build_model, pkg.get_config = factory.load_model, factory.build_model, get_config
        return pkg, False


class Report:
    def __init__(self, out_dir: str | None) -> None:
        self.path = os.path.join(out_dir, "gpu_check.json") if out_dir else None
        self.data: dict = {"failures": [], "sections": {}}

    def section(self, name: str, value) -> None:
        self.data["sections"][name] = value
        self.save()

    def failure(self, msg: str) -> None:
        print(f"FAIL: {msg}", flush=True)
        self.data["failures"].append(msg)
        self.save()

    def save(self) -> None:
        if self.path:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = self.path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(self.data, f, indent=1, default=str)
            os.replace(tmp, self.path)


def log(msg: str) -> None:
    print(msg, flush=True)


# -- 1. parity -------------------------------------------------------------------------------------------------
def check_parity(iv, fixtures: str, device: str, rep: Report) -> dict:
    import _common
    from safetensors.torch import load_file

    res: dict = {}
    vit_dir = os.path.join(fixtures, "internvit-6b-style-tiny")
    if not os.path.isdir(vit_dir):
        rep.failure(f"parity: fixtures not found at {vit_dir} (see --fixtures)")
        return res
    exp = load_file(os.path.join(vit_dir, "expected.safetensors"))
    tf32 = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        m32 = iv.load_model(vit_dir, device=device)
        for tag in ("native", "upscaled"):
            x = exp[f"{tag}.pixel_values"].to(device)
            with torch.no_grad():
                out = m32(x, output_hidden_states=True)
            d = max((h.cpu() - exp[f"{tag}.hidden_states.{i}"]).abs().max().item()
                    for i, h in enumerate(out.hidden_states))
            res[f"fp32.{tag}.max_abs_diff"] = d
            log(f"parity fp32 {tag}: max |diff| over all hidden states {d:.2e}")
            if d > 1e-4:
                rep.failure(f"parity fp32 {tag} on {device}: {d:.2e} > 1e-4")
        bf = iv.load_model(vit_dir, device=device, dtype=torch.bfloat16)
        for tag in ("native", "upscaled"):
            x, ref = exp[f"{tag}.pixel_values"].to(device), exp[f"{tag}.last_hidden_state"].to(device)
            errs = {"upstream_style": rel_error(_common.upstream_style_forward(bf, x), ref)}
            for impl in ("sdpa", "gemm"):
                with torch.no_grad():
                    errs[impl] = rel_error(bf.set_attention(impl)(x).last_hidden_state, ref)
            bf.set_attention("auto")
            res[f"bf16.{tag}.rel_l2_error"] = errs
            log(f"parity bf16 {tag}: rel. L2 error vs fp32 reference " +
                ", ".join(f"{k} {v:.3e}" for k, v in errs.items()))
            for impl in ("sdpa", "gemm"):
                if errs[impl] > 1.05 * errs["upstream_style"]:
                    rep.failure(f"parity bf16 {tag} {impl}: error {errs[impl]:.3e} > 1.05 x upstream-style "
                                f"{errs['upstream_style']:.3e}")
        cg_dir = os.path.join(fixtures, "internvl-cg-tiny")
        if os.path.isdir(cg_dir):
            model = iv.load_model(cg_dir, device=device)
            e = load_file(os.path.join(cg_dir, "expected.safetensors"))
            with torch.no_grad():
                txt = model.encode_text(e["input_ids"].to(device))
                outs = {"text_embeds": txt}
                for mode in ("C", "G"):
                    outs[f"image_embeds.{mode}"] = model.encode_image(e["pixel_values"].to(device),
                                                                      mode=f"InternVL-{mode}")
            for k, v in outs.items():
                d = (v.float().cpu() - e[k]).abs().max().item()
                res[f"internvl.{k}.max_abs_diff"] = d
                log(f"parity InternVL {k}: max |diff| {d:.2e}")
                if d > 1e-4:
                    rep.failure(f"parity InternVL {k} on {device}: {d:.2e} > 1e-4")
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return res


# -- 2. forward throughput ---------------------------------------------------------------------------------------
def build_random(iv, preset: str, device: str, dtype: torch.dtype, **overrides):
    """A randomly initialised model built directly on ``device`` in ``dtype`` (no full-size CPU copy)."""
    from internvit.models.vit import InternViT

    cfg = iv.get_config(preset)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    with torch.device("meta"):
        model = InternViT(cfg)
    model = model.to(dtype=dtype).to_empty(device=device)
    torch.manual_seed(0)
    with torch.no_grad():
        model.init_weights()
    return model.eval()


def check_forward(model, device: str, sizes: dict, iters: int, deadline: float, peak_n: int, rep: Report) -> dict:
    cfg = model.config
    res: dict = {"model": f"{cfg.num_hidden_layers} blocks, width {cfg.hidden_size}, bf16, random weights",
                 "peak": f"{peak_n}^3 bf16 torch.mm", "runs": []}
    peak_fn, peak_flops = matmul_peak(torch.bfloat16, device, n=peak_n)
    for size, batches in sizes.items():
        for b in batches:
            if time.perf_counter() > deadline:
                res["runs"].append(dict(image_size=size, batch=b, skipped="time budget"))
                continue
            x = torch.randn(b, 3, size, size, device=device, dtype=torch.bfloat16)
            flops = vit_flops(batch=b, image_size=size, patch=cfg.patch_size, width=cfg.hidden_size,
                              depth=cfg.num_hidden_layers, mlp=cfg.intermediate_size, heads=cfg.num_attention_heads)
            try:
                with torch.inference_mode():
                    if device == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    t = interleaved({"peak": peak_fn, "model": lambda x=x: model.forward_features(x)}, iters, 1,
                                    device)
            except torch.cuda.OutOfMemoryError:
                res["runs"].append(dict(image_size=size, batch=b, skipped="out of memory"))
                torch.cuda.empty_cache()
                continue
            frac = [flops / tm / (peak_flops / tp) for tm, tp in zip(t["model"], t["peak"])]
            r = dict(image_size=size, batch=b, images_per_s=b / statistics.median(t["model"]),
                     tflops=flops / statistics.median(t["model"]) / 1e12,
                     peak_tflops=peak_flops / statistics.median(t["peak"]) / 1e12,
                     fraction_of_peak_median=statistics.median(frac), fraction_min=min(frac), fraction_max=max(frac),
                     max_memory_gib=torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None)
            res["runs"].append(r)
            log(f"forward {size}px batch {b}: {r['images_per_s']:.1f} img/s, {r['tflops']:.1f} TFLOP/s, "
                f"fraction of peak {r['fraction_of_peak_median']:.3f} [{min(frac):.3f}-{max(frac):.3f}] "
                f"(peak {r['peak_tflops']:.0f} TFLOP/s)")
    for size in sizes:
        done = [r for r in res["runs"] if r["image_size"] == size and "fraction_of_peak_median" in r]
        if done:
            best = max(done, key=lambda r: r["fraction_of_peak_median"])
            res[f"best_{size}"] = dict(batch=best["batch"], fraction=best["fraction_of_peak_median"],
                                       images_per_s=best["images_per_s"])
    return res


# -- 3. feature extraction ---------------------------------------------------------------------------------------
def check_extract(model, device: str, n_images: int, batch: int, workers: int, rounds: int, rep: Report) -> dict:
    from internvit.features import FeatureExtractor

    size = model.config.image_size
    fe = FeatureExtractor(model, pool="cls", batch_size=batch, num_workers=workers, device=device,
                          dtype=torch.bfloat16, progress=False)
    with tempfile.TemporaryDirectory(prefix="gpu-check-jpegs-") as d:
        make_jpegs(d, n_images)
        premade = torch.randn(batch, 3, size, size).pin_memory() if device == "cuda" else torch.randn(
            batch, 3, size, size)
        n_batches = max(1, n_images // batch)

        def bare():
            for _ in range(n_batches):
                fe.encode(premade).cpu()

        outs = {}

        def pipeline(fx=fe, key="pipeline"):
            out = fx.extract(d)
            assert out.features.shape[0] == n_images, out.features.shape
            outs[key] = out.features

        # the same extractor normalising in the loader workers (float32 batches), as before 2026-12-04
        fe_float = FeatureExtractor(model, pool="cls", batch_size=batch, num_workers=workers, device=device,
                                    dtype=torch.bfloat16, progress=False)
        fe_float._loader_transform = fe_float.transform
        t = interleaved({"bare": bare, "pipeline": pipeline,
                         "pipeline_float_loader": lambda: pipeline(fe_float, "float")}, rounds, 1, device)
    bare_ips = [n_batches * batch / s for s in t["bare"]]
    pipe_ips = [n_images / s for s in t["pipeline"]]
    float_ips = [n_images / s for s in t["pipeline_float_loader"]]
    ratio = statistics.median(pipe_ips) / statistics.median(bare_ips)
    diff = float(abs(outs["pipeline"] - outs["float"]).max())
    res = dict(image_size=size, images=n_images, batch=batch, workers=workers, bare_images_per_s=bare_ips,
               pipeline_images_per_s=pipe_ips, ratio_of_medians=ratio, uint8_loader=fe._defer_normalize,
               per_round=[p / b for p, b in zip(pipe_ips, bare_ips)], float_loader_images_per_s=float_ips,
               float_loader_ratio_of_medians=statistics.median(float_ips) / statistics.median(bare_ips),
               uint8_vs_float_loader_max_abs_diff=diff)
    log(f"extract {size}px: pipeline {statistics.median(pipe_ips):.1f} img/s vs bare "
        f"{statistics.median(bare_ips):.1f} img/s = {ratio:.3f} of bare (goal >= 0.90); float32 loader "
        f"{statistics.median(float_ips):.1f} img/s; uint8 vs float32 loader features max |diff| {diff:.2e}")
    return res


def check_normalize(device: str, rep: Report) -> dict:
    """``normalize_pixels`` on the device must give the CPU's float32 bits (the uint8 loader path relies on it)."""
    from internvit.config import IMAGENET_MEAN, IMAGENET_STD
    from internvit.transforms import normalize_pixels

    g = torch.Generator().manual_seed(0)
    pixels = torch.randint(0, 256, (8, 3, 64, 64), dtype=torch.uint8, generator=g)
    pixels[0, 0, 0] = torch.arange(64, dtype=torch.uint8) * 4
    cpu = normalize_pixels(pixels, IMAGENET_MEAN, IMAGENET_STD)
    dev = normalize_pixels(pixels.to(device), IMAGENET_MEAN, IMAGENET_STD).cpu()
    mismatched = int((cpu != dev).sum())
    log(f"normalize_pixels on {device} vs CPU: {mismatched} of {cpu.numel()} values differ")
    if mismatched:
        rep.failure(f"normalize_pixels on {device}: {mismatched} values differ from the CPU's")
    return {"values": cpu.numel(), "mismatched": mismatched}


# -- 4. segmentation backbone training step ----------------------------------------------------------------------
def check_seg(iv, device: str, preset: str, size: int, batch: int, iters: int, overrides: dict, rep: Report) -> dict:
    res: dict = {"image_size": size, "batch": batch, "dtype": "bf16 parameters and activations (as the reference)"}
    model = build_random(iv, preset, device, torch.bfloat16, drop_path_rate=0.4, **overrides).train()
    n = model.num_layers
    indices = sorted({n // 4 - 1, n // 2 - 1, 3 * n // 4 - 1, n - 1})
    res["out_indices"] = indices
    x = torch.randn(batch, 3, size, size, device=device, dtype=torch.bfloat16)

    def step():
        maps = model.forward_intermediates(x, indices=indices, output_fmt="NCHW", intermediates_only=True)
        loss = sum(m.float().square().mean() for m in maps)
        loss.backward()
        for p in model.parameters():
            p.grad = None

    for cp in (False, True):
        model.set_grad_checkpointing(cp)
        try:
            step()  # warm-up
            sync(device)
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t = interleaved({"step": step}, iters, 0, device)["step"]
            mem = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
            r = dict(it_per_s=1 / statistics.median(t), seconds=t, peak_memory_gib=mem)
        except torch.cuda.OutOfMemoryError as e:
            r = dict(error=f"out of memory: {e}".splitlines()[0])
            torch.cuda.empty_cache()
        res["checkpointing" if cp else "no_checkpointing"] = r
        log(f"seg {size}px batch {batch} grad checkpointing {cp}: " +
            (f"{r['it_per_s']:.2f} it/s, peak memory {r['peak_memory_gib']}" if "it_per_s" in r else r["error"]))
    return res


def summarize(data: dict) -> None:
    """Print the headline numbers (and store the goal verdicts under ``summary``)."""
    s, out = data["sections"], {}
    fwd = s.get("forward", {})
    for k, v in fwd.items():
        if k.startswith("best_"):
            size = int(k[5:])
            goal = 0.55 if size >= 448 else None
            out[f"forward_{size}px"] = dict(v, goal=goal, met=None if goal is None else v["fraction"] >= goal)
    for preset, v in (s.get("extract") or {}).items():
        if isinstance(v, dict) and "ratio_of_medians" in v:
            out[f"extract_{preset}"] = dict(ratio=v["ratio_of_medians"], goal=0.90, met=v["ratio_of_medians"] >= 0.9)
    comp = s.get("compile") or {}
    if "speedup_ratio_of_medians" in comp:
        out["compile_inductor_vs_eager"] = dict(speed=comp["speedup_ratio_of_medians"], compile_s=comp["compile_s"])
    seg = s.get("seg") or {}
    for k in ("no_checkpointing", "checkpointing"):
        if isinstance(seg.get(k), dict):
            out[f"seg_{k}"] = {kk: seg[k].get(kk) for kk in ("it_per_s", "peak_memory_gib", "error") if kk in seg[k]}
    data["summary"] = out
    log("summary:")
    for k, v in out.items():
        log(f"  {k}: {json.dumps(v, default=str)}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixtures", default=os.path.join(ROOT, "work_dirs", "gpu_fixtures"),
                   help="folder holding internvit-6b-style-tiny/ (and internvl-cg-tiny/)")
    p.add_argument("--device", default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny models and sizes (checks that the script runs)")
    p.add_argument("--out", default=os.environ.get("OUT"), help="folder for gpu_check.json (default $OUT)")
    p.add_argument("--budget-s", type=float, default=420.0, help="stop starting forward sweeps after this long")
    p.add_argument("--sections", default=None, help="comma list (default: all) of "
                   "parity, forward, compile, extract, seg")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available (use --device cpu --quick here)", file=sys.stderr)
        return 2
    sections = (args.sections or "parity,forward,compile,extract,seg").split(",")
    t_start = time.perf_counter()
    rep = Report(args.out)
    iv, full = import_core()
    env = dict(torch=torch.__version__, device=args.device, quick=args.quick, full_package=full,
               cuda=torch.version.cuda, cpu_count=os.cpu_count())
    if args.device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
        env["gpu_memory_gib"] = torch.cuda.get_device_properties(0).total_memory / 2**30
    rep.section("environment", env)
    log(f"environment: {env}")

    if args.quick:
        big, big_over = "internvit-6b-tiny", {}
        sizes, iters, peak_n = {56: [1, 2], 112: [1]}, 3, 256
        ext = [("internvit-6b-tiny", 8, 4, 0), ("internvit-300m-tiny", 8, 4, 0)]
        seg = dict(size=56, batch=1, iters=2)
        comp_case = (56, 2)
    else:
        big, big_over = "internvit-6b-224px", {}
        sizes, iters, peak_n = {224: [16, 64, 128], 448: [8, 16, 32]}, 5, 8192
        workers = max(1, min(14, (os.cpu_count() or 2) - 2))
        ext = [("internvit-6b-224px", 1024, 64, workers), ("internvit-300m-448px", 4096, 128, workers)]
        seg = dict(size=504, batch=2, iters=5)
        comp_case = (448, 16)

    def run_section(name, fn):
        if name not in sections:
            return
        t0 = time.perf_counter()
        try:
            value = fn()
        except Exception as e:  # noqa: BLE001 - record and go on to the next section
            traceback.print_exc()
            rep.failure(f"section {name} raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            value = {"error": f"{type(e).__name__}: {e}"}
        value = dict(value, seconds=round(time.perf_counter() - t0, 1)) if isinstance(value, dict) else value
        rep.section(name, value)
        if args.device == "cuda":
            torch.cuda.empty_cache()

    run_section("parity", lambda: check_parity(iv, args.fixtures, args.device, rep))
    holder = {}

    def forward():
        holder["model"] = build_random(iv, big, args.device, torch.bfloat16, **big_over)
        return check_forward(holder["model"], args.device, sizes, iters, t_start + args.budget_s, peak_n, rep)

    run_section("forward", forward)

    def compiled():
        """Eager vs compile_model(mode='inductor') on the same weights, interleaved (6B, 448 px)."""
        import copy

        from internvit.models.vit import compile_model

        if time.perf_counter() - t_start > args.budget_s - 150:
            return {"skipped": "time budget"}
        if args.quick and args.device == "cpu" and not args.sections:
            return {"skipped": "--quick on CPU (compiling takes minutes here); name it in --sections to run it"}
        eager = holder["model"]
        comp = compile_model(copy.deepcopy(eager), "inductor")
        size, b = comp_case
        x = torch.randn(b, 3, size, size, device=args.device, dtype=torch.bfloat16)
        with torch.inference_mode():
            t0 = time.perf_counter()
            out = comp.forward_features(x)
            compile_s = time.perf_counter() - t0
            err = rel_error(out, eager.forward_features(x))
            t = interleaved({"eager": lambda: eager.forward_features(x), "inductor": lambda: comp.forward_features(x)},
                            iters, 1, args.device)
        ratio = statistics.median(t["eager"]) / statistics.median(t["inductor"])
        log(f"compile {size}px batch {b}: first call {compile_s:.0f} s; inductor/eager speed {ratio:.3f} "
            f"(rel. diff {err:.2e})")
        if err > 2e-2:
            rep.failure(f"compile: inductor output differs from eager by {err:.2e} (relative L2)")
        return dict(image_size=size, batch=b, compile_s=compile_s, speedup_ratio_of_medians=ratio, rel_diff=err,
                    eager_s=t["eager"], inductor_s=t["inductor"])

    run_section("compile", compiled)

    def extract():
        if not full:
            return {"skipped": "needs the full internvit package (torchvision, pillow, tqdm)"}
        out = {"normalize_pixels": check_normalize(args.device, rep)}
        for preset, n, b, w in ext:
            model = holder.pop("model", None) if preset == big else None  # reuse the forward section's 6B
            model = model if model is not None else build_random(iv, preset, args.device, torch.bfloat16)
            out[preset] = check_extract(model, args.device, n, b, w, 2, rep)
            del model
            if args.device == "cuda":
                torch.cuda.empty_cache()
        return out

    run_section("extract", extract)
    holder.clear()
    run_section("seg", lambda: check_seg(iv, args.device, big, seg["size"], seg["batch"], seg["iters"], big_over,
                                         rep))
    summarize(rep.data)
    rep.data["seconds"] = round(time.perf_counter() - t_start, 1)
    rep.save()
    log(f"done in {rep.data['seconds']} s; {len(rep.data['failures'])} failure(s)"
        + (f"; wrote {rep.path}" if rep.path else ""))
    return 1 if rep.data["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
