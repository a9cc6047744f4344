"""Shared benchmark helpers: interleaved timing, spread statistics, measured matmul peak, peak memory, tables.

Every benchmark here compares against a named peer run in the same process, interleaved (the order rotates
each round) so that load from other processes hits all contenders alike, and reports min / median / max.
Imports only the standard library and torch, so the GPU check can use it on a bare machine.
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from typing import Callable, Mapping, Optional, Sequence

import torch


def sync(device) -> None:
    """Wait for queued GPU work (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: Mapping[str, Callable[[], object]], iters: int, warmup: int = 1,
                device="cpu") -> dict[str, list[float]]:
    """Seconds per call of every function, ``iters`` rounds, each round calling all of them once.

    The call order rotates by one each round (a, b, c / b, c, a / ...), so no contender always runs right
    after the same neighbour. ``warmup`` untimed rounds first.
    """
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
        sync(device)
    times: dict[str, list[float]] = {n: [] for n in names}
    for i in range(iters):
        k = i % len(names)
        for n in names[k:] + names[:k]:
            sync(device)
            t0 = time.perf_counter()
            fns[n]()
            sync(device)
            times[n].append(time.perf_counter() - t0)
    return times


def spread(values: Sequence[float]) -> tuple[float, float, float]:
    """``(min, median, max)``."""
    return min(values), statistics.median(values), max(values)


def fmt_spread(values: Sequence[float], fmt: str = "{:.3f}") -> str:
    lo, med, hi = spread(values)
    return f"{fmt.format(med)} [{fmt.format(lo)}-{fmt.format(hi)}]"


def paired_ratios(num: Sequence[float], den: Sequence[float]) -> list[float]:
    """Per-round ratios ``num[i] / den[i]`` (rounds are interleaved, so the pair shared the machine's state)."""
    return [a / b for a, b in zip(num, den)]


def ratio_of_medians(num: Sequence[float], den: Sequence[float]) -> float:
    return statistics.median(num) / statistics.median(den)


def matmul_peak(dtype: torch.dtype, device="cpu", n: int = 2048) -> tuple[Callable[[], object], float]:
    """A ``n^3`` matmul in ``dtype`` and its FLOP count (2 n^3): time it interleaved with the model runs."""
    g = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    b = torch.randn(n, n, generator=g).to(device=device, dtype=dtype)
    out = torch.empty(n, n, device=device, dtype=dtype)
    return (lambda: torch.mm(a, b, out=out)), 2.0 * n ** 3


def vit_flops(*, batch: int, image_size: int, patch: int, width: int, depth: int, mlp: int, heads: int,
              channels: int = 3) -> float:
    """Forward FLOPs of a ViT: 2 x multiply-adds of the linear layers, the attention matmuls and the patch embed."""
    n = (image_size // patch) ** 2 + 1
    d = width // heads
    linear = 2 * batch * n * (width * 3 * width + width * width + 2 * width * mlp)
    attn = 2 * 2 * batch * heads * n * n * d
    embed = 2 * batch * (n - 1) * width * channels * patch * patch
    return float(depth * (linear + attn) + embed)


def peak_rss_bytes() -> int:
    """This process's peak resident set (``VmHWM``), bytes; 0 where /proc is unavailable."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def table(rows: Sequence[Sequence[object]], headers: Sequence[str]) -> str:
    """A GitHub-markdown table (so the README table can be pasted from the output)."""
    cells = [[str(c) for c in r] for r in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"  # noqa: E731
    return "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [line(r) for r in cells])


def machine(device="cpu") -> str:
    """One line naming the machine, torch and threads."""
    dev = torch.device(device)
    if dev.type == "cuda":
        what = f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    else:
        cap = torch.backends.cpu.get_cpu_capability() if hasattr(torch.backends, "cpu") else "?"
        what = f"{os.cpu_count()}-core CPU ({cap})"
    return f"{what}, torch {torch.__version__}, {torch.get_num_threads()} threads"


def fail(message: str) -> None:
    """Report a failed correctness check of a benchmark and exit non-zero."""
    print(f"FAIL: {message}", file=sys.stderr)
    sys.exit(1)


def rel_error(x: torch.Tensor, ref: torch.Tensor) -> float:
    """``||x - ref|| / ||ref||`` in fp32."""
    x, ref = x.float(), ref.float()
    return float((x - ref).norm() / ref.norm().clamp_min(1e-30))


def optional_float(v: Optional[float], fmt: str = "{:.3f}") -> str:
    return "-" if v is None else fmt.format(v)


@torch.no_grad()
def upstream_style_forward(model, pixel_values: torch.Tensor) -> torch.Tensor:
    """Last hidden state computed the way the upstream reference code does it in the model's dtype (bf16).

    Written from reference-spec §1 (not from upstream code), using ``model``'s parameters: patch conv and
    class/position rows in the model dtype; RMSNorm normalising in fp32, casting back, then multiplying by the
    weight in the model dtype; LayerNorm as ``nn.LayerNorm`` in the model dtype; the naive attention path
    ``softmax((q * scale) @ kᵀ) @ v`` in the model dtype; exact GELU; ``x + branch * ls`` with a separate
    multiply and add. Used to measure how far upstream's low-precision path is from the fp32 reference.
    """
    import torch.nn.functional as F

    from internvit.models.vit import interpolate_pos_embed

    cfg = model.config
    dt = model.dtype
    emb = model.embeddings

    def rms(x, w, eps):
        xf = x.float()
        return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)

    def norm(mod, x):
        if cfg.norm_type == "rms_norm":
            return rms(x, mod.weight, mod.eps)
        return F.layer_norm(x, mod.normalized_shape, mod.weight, mod.bias, mod.eps)

    x = F.conv2d(pixel_values.to(dt), emb.patch_embedding.weight, emb.patch_embedding.bias, stride=cfg.patch_size)
    b, c, h, w = x.shape
    x = x.flatten(2).transpose(1, 2)
    x = torch.cat([emb.class_embedding.to(dt).expand(b, -1, -1), x], dim=1)
    x = x + interpolate_pos_embed(emb.position_embedding, (h, w), emb.grid).to(dt)
    heads, d = cfg.num_attention_heads, cfg.head_dim
    for blk in model.encoder.layers:
        a = blk.attn
        y = norm(blk.norm1, x)
        qkv = F.linear(y, a.qkv.weight, a.qkv.bias)
        q, k, v = qkv.chunk(3, dim=-1)
        if a.qk_normalization:
            q, k = rms(q, a.q_norm.weight, a.q_norm.eps), rms(k, a.k_norm.weight, a.k_norm.eps)
        q, k, v = (t.reshape(b, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        attn = ((q * d ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)
        y = F.linear((attn @ v).transpose(1, 2).reshape(b, -1, c), a.proj.weight, a.proj.bias)
        x = x + y * blk.ls1
        y = norm(blk.norm2, x)
        y = F.linear(F.gelu(F.linear(y, blk.mlp.fc1.weight, blk.mlp.fc1.bias)), blk.mlp.fc2.weight, blk.mlp.fc2.bias)
        x = x + y * blk.ls2
    return x


def make_jpegs(folder: str, n: int, unique: int = 64, size=(640, 480)) -> None:
    """``n`` JPEGs (``unique`` distinct photo-like images, the rest copies) of ``size`` pixels, quality 90."""
    import shutil

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    w, h = size
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    first = []
    for i in range(min(unique, n)):
        f = rng.uniform(0.005, 0.05, 3)
        img = np.stack([127 + 100 * np.sin(xx * f[c] + yy * f[(c + 1) % 3] + i) for c in range(3)], -1)
        img += rng.normal(0, 12, img.shape)  # texture, so JPEG decoding does real work
        p = os.path.join(folder, f"img_{i:05d}.jpg")
        Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(p, quality=90)
        first.append(p)
    for i in range(len(first), n):
        shutil.copyfile(first[i % len(first)], os.path.join(folder, f"img_{i:05d}.jpg"))
