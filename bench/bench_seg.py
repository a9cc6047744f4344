#!/usr/bin/env python
"""Training-iteration time of our toy UperNet (InternViTBackbone + reference pyramid + UPerHead + aux head) against
mmseg's own ``VisionTransformer`` + a neck + the same heads, same dims, same batch, same process.

Equal work: the default peer neck is mmseg's ``Feature2Pyramid`` (ConvTranspose x4 / x2, identity, max-pool:
the same structure and FLOPs as the InternViT pyramid; BN where ours has a channels-first LayerNorm). The
previous peer, ``MultiLevelNeck`` (1x1 + 3x3 convs at every pyramid level: ~3x the backbone+neck FLOPs of
ours), is available with ``--peer-necks feature2pyramid,multilevel`` and is then compared per GFLOP only.
FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` over one whole training step (forward +
backward, matmuls/convs/attention) and over the backbone+neck forward; parameters are counted for the whole
model and for backbone+neck.

Statistic: per round, ms per iteration over ``--iters`` iterations; median [min-max] over ``--rounds``
interleaved rounds (order rotating); ours/peer = ratio of median times (and of ms per GFLOP), with the
per-round min-max. Goal <= 1.05 against the equal-work peer. Correctness (non-zero exit): the pyramids have
the same shapes and every loss is finite (the architectures differ, so outputs cannot be compared).

  python bench/bench_seg.py [--data data/toy_seg] [--iters 20] [--rounds 5] [--threads 1]
  python bench/bench_seg.py --quick          # 2 iterations x 2 rounds: checks that it runs

The data is the toy dataset (made on the fly into a temporary folder if ``--data`` does not exist).
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "bench"))

from _common import fmt_spread, table  # noqa: E402

TOY_UPER = os.path.join(ROOT, "configs", "toy", "upernet_internvit_tiny_toy.py")


def mmseg_peer_backbone(cfg, neck: str = "feature2pyramid") -> tuple[dict, dict]:
    """mmseg's ViT (+ a neck giving the x4/x2/x1/x1/2 pyramid) with the toy InternViT's dims."""
    bb, arch = cfg.model.backbone, cfg.model.backbone.arch
    c = arch["hidden_size"]
    backbone = dict(type="VisionTransformer", img_size=bb.img_size, patch_size=arch["patch_size"], in_channels=3,
                    embed_dims=c, num_layers=arch["num_hidden_layers"], num_heads=arch["num_attention_heads"],
                    mlp_ratio=arch["intermediate_size"] // c, out_indices=tuple(bb.out_indices),
                    qkv_bias=arch["qkv_bias"], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                    with_cls_token=True, output_cls_token=False, norm_cfg=dict(type="LN", eps=1e-6),
                    act_cfg=dict(type="GELU"), patch_norm=False, final_norm=False, interpolate_mode="bicubic")
    if neck == "feature2pyramid":
        neck_cfg = dict(type="Feature2Pyramid", embed_dim=c, rescales=[4, 2, 1, 0.5],
                        norm_cfg=dict(type="BN", requires_grad=True))
    elif neck == "multilevel":
        neck_cfg = dict(type="MultiLevelNeck", in_channels=[c] * 4, out_channels=c, scales=[4, 2, 1, 0.5])
    else:
        raise ValueError(f"unknown peer neck {neck!r}")
    return backbone, neck_cfg


def count_flops(model, batch, optim) -> tuple[float, float]:
    """FLOPs of one training step (forward + backward) and of the backbone+neck forward."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as fc:
        model.train_step(batch, optim)
    step = fc.get_total_flops()
    data = model.data_preprocessor(batch, True)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model.extract_feat(data["inputs"])
    return float(step), float(fc.get_total_flops())


def pyramid_shapes(model, batch) -> list:
    data = model.data_preprocessor(batch, True)
    with torch.no_grad():
        return [tuple(f.shape) for f in model.extract_feat(data["inputs"])]


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def build(cfg_model):
    from mmengine.config import ConfigDict
    from mmengine.optim import build_optim_wrapper
    from mmengine.registry import DefaultScope
    from mmseg.registry import MODELS

    with DefaultScope.overwrite_default_scope("mmseg"):
        model = MODELS.build(ConfigDict(cfg_model))
    model.init_weights()
    model.train()
    optim = build_optim_wrapper(model, dict(type="OptimWrapper", optimizer=dict(type="AdamW", lr=1e-4,
                                                                                weight_decay=0.05)))
    return model, optim


def time_iters(model, optim, batch, n: int) -> float:
    t = time.perf_counter()
    for _ in range(n):
        losses = model.train_step(batch, optim)
    for k, v in losses.items():
        if not bool(torch.isfinite(torch.as_tensor(v)).all()):
            print(f"FAIL: loss {k} is not finite: {v}", file=sys.stderr)
            sys.exit(1)
    return (time.perf_counter() - t) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "toy_seg"))
    parser.add_argument("--iters", type=int, default=20, help="iterations per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave as is)")
    parser.add_argument("--peer-necks", default="feature2pyramid",
                        help="comma list: feature2pyramid (equal work, the goal), multilevel (per GFLOP only)")
    parser.add_argument("--quick", action="store_true", help="2 iterations x 2 rounds, batch 2")
    args = parser.parse_args(argv)
    if args.quick:
        args.iters, args.rounds, args.batch_size = 2, 2, 2
    necks = [n for n in args.peer_necks.split(",") if n]

    import segmentation  # noqa: F401  (internvit.compat first, then registration)
    from segmentation.toy_data import make_toy_seg_dataset

    if args.threads:
        torch.set_num_threads(args.threads)
    from mmengine.config import Config
    from mmengine.dataset import pseudo_collate
    from mmseg.registry import DATASETS
    from mmseg.utils import register_all_modules

    register_all_modules(init_default_scope=True)
    tmp = None
    if not os.path.isdir(args.data):
        tmp = tempfile.mkdtemp(prefix="bench-seg-")
        args.data = make_toy_seg_dataset(os.path.join(tmp, "toy_seg"), num_train=args.batch_size, num_val=1)
    cfg = Config.fromfile(TOY_UPER)
    ds_cfg = copy.deepcopy(cfg.train_dataloader.dataset)
    ds_cfg.data_root = args.data
    dataset = DATASETS.build(ds_cfg)
    batch = pseudo_collate([dataset[i % len(dataset)] for i in range(args.batch_size)])

    contenders = {}
    torch.manual_seed(0)
    contenders["ours: InternViTBackbone + pyramid"] = build(copy.deepcopy(cfg.model))
    for neck in necks:
        peer_cfg = copy.deepcopy(cfg.model)
        peer_cfg.backbone, peer_cfg.neck = mmseg_peer_backbone(cfg, neck)
        label = "mmseg: VisionTransformer + " + ("Feature2Pyramid" if neck == "feature2pyramid" else "MultiLevelNeck")
        contenders[label] = build(peer_cfg)
    names = list(contenders)
    ours_name = names[0]
    shapes = {k: pyramid_shapes(m[0], batch) for k, m in contenders.items()}
    for k, v in shapes.items():
        if v != shapes[ours_name]:
            print(f"FAIL: pyramid shapes differ: {k} {v} vs ours {shapes[ours_name]}", file=sys.stderr)
            return 1
    info = {}
    for k, (model, optim) in contenders.items():
        step_flops, feat_flops = count_flops(model, batch, optim)
        bb = n_params(model.backbone) + n_params(getattr(model, "neck", None))
        info[k] = dict(params=n_params(model), bb_params=bb, step_gflop=step_flops / 1e9, feat_gflop=feat_flops / 1e9)
    for m in contenders.values():  # warm-up
        time_iters(*m, batch, 2)
    times = {k: [] for k in names}
    for r in range(args.rounds):  # interleaved, order rotating, to share any machine noise
        order = names[r % len(names):] + names[:r % len(names)]
        for k in order:
            times[k].append(time_iters(*contenders[k], batch, args.iters))
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"batch {args.batch_size} x {tuple(batch['inputs'][0].shape)}; {args.rounds} rounds x {args.iters} iters; "
          f"statistic: median [min-max] of per-round ms/iter; pyramid {shapes[ours_name]}")
    rows = []
    for k in names:
        t = [x * 1e3 for x in times[k]]
        i = info[k]
        per_gflop = [x / i["step_gflop"] for x in t]
        if k == ours_name:
            vs = "-"
        else:
            per_round = [a / b for a, b in zip(times[ours_name], times[k])]
            ratio = statistics.median(times[ours_name]) / statistics.median(times[k])
            ratio_gflop = (statistics.median(times[ours_name]) / info[ours_name]["step_gflop"]) / (
                statistics.median(times[k]) / i["step_gflop"])
            equal = "Feature2Pyramid" in k
            vs = (f"time {ratio:.3f} [{min(per_round):.3f}-{max(per_round):.3f}]" if equal
                  else "time n/a (unequal work)")
            vs += f"; per GFLOP {ratio_gflop:.3f}"
            if equal:
                vs += f" -> goal <= 1.05 {'met' if ratio <= 1.05 else 'NOT met'}"
        rows.append([k, f"{i['params'] / 1e6:.3f} M ({i['bb_params'] / 1e6:.3f} M)",
                     f"{i['feat_gflop']:.3f}", f"{i['step_gflop']:.3f}", fmt_spread(t, "{:.1f}"),
                     f"{statistics.median(per_gflop):.2f}", vs])
    print(table(rows, ["model", "params (backbone+neck)", "backbone+neck fwd GFLOP", "train step GFLOP",
                       "ms/iter", "ms per step GFLOP", "ours / peer"]))
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
