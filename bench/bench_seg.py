#!/usr/bin/env python
"""Training-iteration time of our toy UperNet (InternViTBackbone + pyramid + UPerHead + aux head) vs mmseg's own
``VisionTransformer`` + ``MultiLevelNeck`` + the same heads, with the same dims and the same batch, in the same
process (interleaved rounds, median per-iteration time). Prints the ratio ours / mmseg (goal <= 1.05).

  python bench/bench_seg.py [--data data/toy_seg] [--iters 20] [--rounds 5] [--threads 1]

The data is the toy dataset (made on the fly into a temporary folder if ``--data`` does not exist).
"""
import argparse
import copy
import os
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
TOY_UPER = os.path.join(ROOT, "configs", "toy", "upernet_internvit_tiny_toy.py")


def mmseg_peer_backbone(cfg) -> tuple[dict, dict]:
    """mmseg's ViT (+ MultiLevelNeck for the ×4/×2/×1/×½ pyramid) with the toy InternViT's dims."""
    bb, arch = cfg.model.backbone, cfg.model.backbone.arch
    c = arch["hidden_size"]
    backbone = dict(type="VisionTransformer", img_size=bb.img_size, patch_size=arch["patch_size"], in_channels=3,
                    embed_dims=c, num_layers=arch["num_hidden_layers"], num_heads=arch["num_attention_heads"],
                    mlp_ratio=arch["intermediate_size"] // c, out_indices=tuple(bb.out_indices),
                    qkv_bias=arch["qkv_bias"], drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0,
                    with_cls_token=True, output_cls_token=False, norm_cfg=dict(type="LN", eps=1e-6),
                    act_cfg=dict(type="GELU"), patch_norm=False, final_norm=False, interpolate_mode="bicubic")
    neck = dict(type="MultiLevelNeck", in_channels=[c] * 4, out_channels=c, scales=[4, 2, 1, 0.5])
    return backbone, neck


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
        model.train_step(batch, optim)
    return (time.perf_counter() - t) / n


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=os.path.join(ROOT, "data", "toy_seg"))
    parser.add_argument("--iters", type=int, default=20, help="iterations per model per round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: leave as is)")
    args = parser.parse_args(argv)

    import torch

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
    batch = pseudo_collate([dataset[i] for i in range(args.batch_size)])

    ours_cfg = copy.deepcopy(cfg.model)
    peer_cfg = copy.deepcopy(cfg.model)
    peer_cfg.backbone, peer_cfg.neck = mmseg_peer_backbone(cfg)
    torch.manual_seed(0)
    ours = build(ours_cfg)
    peer = build(peer_cfg)
    n_ours = sum(p.numel() for p in ours[0].parameters())
    n_peer = sum(p.numel() for p in peer[0].parameters())
    for m in (ours, peer):  # warm-up
        time_iters(*m, batch, 3)
    t_ours, t_peer = [], []
    for r in range(args.rounds):  # interleave, alternating who goes first, to share any machine noise
        order = [(ours, t_ours), (peer, t_peer)] if r % 2 == 0 else [(peer, t_peer), (ours, t_ours)]
        for m, acc in order:
            acc.append(time_iters(*m, batch, args.iters))
    mo, mp = statistics.median(t_ours), statistics.median(t_peer)
    print(f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}, threads {torch.get_num_threads()}; "
          f"batch {args.batch_size} x {tuple(batch['inputs'][0].shape)}; {args.rounds} rounds x {args.iters} iters")
    for label, t, n in (("ours  InternViTBackbone(+pyramid)+UPerHead+aux ", mo, n_ours),
                        ("mmseg VisionTransformer+MultiLevelNeck+UPerHead+aux", mp, n_peer)):
        print(f"{label}: {t * 1e3:8.1f} ms/iter  ({n / 1e6:.3f} M params)")
    print(f"ratio ours / mmseg = {mo / mp:.3f}  (goal <= 1.05)")
    if tmp:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
