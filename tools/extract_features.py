#!/usr/bin/env python
"""Extract InternViT features of a folder / list of images into resumable shards.

  python tools/extract_features.py --model /models/InternViT-300M-448px-V2_5 --images photos/ --out feats/
  python tools/extract_features.py --model ckpt.pth --config internvit-6b-224px --images list.txt --out feats/ \\
      --layers 11 23 -1 --pool grid --image-size 448 --dtype bf16 --device cuda

Dynamic-resolution tiles (InternVL-Chat preprocessing; docs/features.md):
  python tools/extract_features.py --model /models/InternViT-300M-448px --images scans/ --out feats/ --tiles 12
      [--no-thumbnail] [--tile-pool mean|thumbnail] [--projector-input]

--model takes the released checkpoint (a Hugging Face folder with config.json, or a weight file with --config).
A preset name (internvit-300m-448px-v2-5, ...) builds the architecture with RANDOM weights: a dry run whose
features mean nothing (a warning says so, and the manifest records model.random_init: true).

Rerunning the same command after an interruption continues where it stopped. Under
``torchrun --nproc_per_node N tools/extract_features.py ...`` each rank extracts whole shards and rank 0
commits the folder (byte-identical to a single-process run).
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import (  # noqa: E402
    ArgumentParser,
    UsageError,
    device,
    dtype_arg,
    hold_warnings,
    nonnegative_int,
    positive_int,
    run,
)


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True,
                   help="HF directory or weight file (.safetensors/.pth/.bin) of the released weights, or a preset "
                        "name (random weights: a dry run)")
    p.add_argument("--config", default=None,
                   help="preset name or config.json of a bare weight file's architecture (not with a preset "
                        "--model)")
    p.add_argument("--images", required=True, help="image folder (recursive) or .txt/.lst list of paths")
    p.add_argument("--out", required=True, help="output folder (resumed if it holds a run with the same arguments)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="block indices, e.g. 11 23 -1 (default: last)")
    p.add_argument("--pool", default=None, choices=["cls", "mean", "cls_mean", "grid"],
                   help="default cls (not with --projector-input)")
    p.add_argument("--image-size", type=positive_int, default=None,
                   help="override the preset's input size (a multiple of the patch size, 14)")
    p.add_argument("--resize-mode", default=None, choices=["crop", "squash"], help="default crop (not with --tiles)")
    p.add_argument("--normalize", action="store_true", help="L2-normalise the feature vectors")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--num-workers", type=nonnegative_int, default=0)
    p.add_argument("--shard-size", type=positive_int, default=1000)
    p.add_argument("--dtype", default="float32", type=dtype_arg, help="fp32, bf16, fp16, fp64 or torch's names")
    p.add_argument("--device", type=device, default="cpu", help="cpu | cuda | cuda:N")
    p.add_argument("--metadata-format", default="parquet", choices=["parquet", "jsonl"])
    p.add_argument("--max-image-pixels", type=nonnegative_int, default=None, metavar="N",
                   help="images of more than N pixels are refused and listed in errors.jsonl (default: Pillow's "
                        "178956970; 0: no limit); over N/2 a warning line names the file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the finished (or drop the interrupted) features of another job in --out (committed "
                        "as a new generation; without it they are refused). Never a folder of other files")
    p.add_argument("--discard-pending", action="store_true",
                   help="drop an interrupted job of other arguments in --out instead of refusing")
    t = p.add_argument_group("dynamic-resolution tiles (docs/features.md); --batch-size then counts tiles")
    t.add_argument("--tiles", type=positive_int, default=None, metavar="MAX_NUM",
                   help="cut each image into at most MAX_NUM tiles of --image-size (InternVL-Chat rule)")
    t.add_argument("--min-tiles", type=positive_int, default=None, metavar="MIN_NUM", help="default 1")
    t.add_argument("--no-thumbnail", action="store_true", help="no whole-image thumbnail after multi-tile grids")
    t.add_argument("--tile-pool", default=None, choices=["mean", "thumbnail"],
                   help="one row per image (mean over its tiles, or the thumbnail) instead of one row per tile")
    t.add_argument("--projector-input", action="store_true",
                   help="per tile, the MLLM projector's input: patch tokens pixel-shuffled to (256, 4C) at 448 px")
    t.add_argument("--downsample-ratio", type=float, default=None,
                   help="pixel-shuffle ratio of --projector-input (default 0.5)")
    return p


def _check_tiles(args) -> None:
    """Tile arguments, checked before the model is loaded: a flag that does not apply in the mode asked for is
    refused (never silently ignored)."""
    if args.tiles is None:
        used = [f for f, on in (("--min-tiles", args.min_tiles is not None), ("--no-thumbnail", args.no_thumbnail),
                                ("--tile-pool", args.tile_pool), ("--projector-input", args.projector_input),
                                ("--downsample-ratio", args.downsample_ratio is not None))
                if on]
        if used:
            raise UsageError(f"{used[0]} needs --tiles MAX_NUM")
        return
    if args.resize_mode is not None:
        raise UsageError("--resize-mode does not apply with --tiles (each tile is already --image-size square)")
    if args.downsample_ratio is not None and not args.projector_input:
        raise UsageError("--downsample-ratio needs --projector-input (it is the projector input's pixel shuffle)")
    if args.projector_input and args.pool is not None:
        raise UsageError("--pool does not apply with --projector-input (its rows are the block's patch tokens, "
                         "not pooled)")
    from internvit.tiling import TileSettings

    try:
        TileSettings(max_num=args.tiles, min_num=1 if args.min_tiles is None else args.min_tiles, image_size=1,
                     use_thumbnail=not args.no_thumbnail, tile_pool=args.tile_pool,
                     projector_input=args.projector_input,
                     downsample_ratio=0.5 if args.downsample_ratio is None else args.downsample_ratio)
    except ValueError as e:
        raise UsageError(str(e).replace("max_num", "--tiles").replace("min_num", "--min-tiles")
                         .replace("downsample_ratio", "--downsample-ratio")) from None
    if args.projector_input and (args.normalize or (args.layers is not None and len(args.layers) != 1)):
        raise UsageError("--projector-input takes raw tokens of one block: no --normalize, at most one --layers")


def _vision_config(args):
    """The vision config of --config / --model when it can be read without loading weights (a preset, a
    folder or a config.json), else ``None`` (a bare weight file: checked when the model is built)."""
    from internvit.config import get_config, is_preset

    spec = args.config if args.config is not None else args.model
    if not (is_preset(spec) or os.path.isdir(spec) or spec.endswith(".json")):
        return None
    try:
        cfg = get_config(spec)
    except (ValueError, TypeError, OSError):
        return None  # reported by load_model, naming the file
    return getattr(cfg, "vision_config", cfg)


def _check_image_size(args) -> None:
    """--image-size (or the preset's size) must be a whole number of patches: of ``patch_size /
    downsample_ratio`` with --projector-input, whose token grid is pixel-shuffled."""
    cfg = _vision_config(args)
    patch = getattr(cfg, "patch_size", None)
    if not patch:
        return
    size = args.image_size if args.image_size is not None else getattr(cfg, "image_size", None)
    if size is None:
        return
    if size % patch:
        raise UsageError(f"--image-size {size}: must be a multiple of the patch size {patch} (the patch embedding "
                         f"would drop the last {size % patch} pixel rows and columns); "
                         f"e.g. {size - size % patch or patch}")
    if args.projector_input:
        unit = patch * round(1 / (0.5 if args.downsample_ratio is None else args.downsample_ratio))
        if size % unit:
            raise UsageError(f"--image-size {size}: --projector-input needs a multiple of {unit} (patch size {patch} "
                             f"/ --downsample-ratio); e.g. {max(unit, size - size % unit)}")


def _check_model_spec(value: str, what: str) -> None:
    """A weight file / folder that exists, or a preset name (checked before anything is loaded)."""
    if os.path.exists(value):
        return
    import internvit

    if value not in internvit.list_presets():
        looks_like_path = os.sep in value or value.endswith((".json", ".pth", ".pt", ".bin", ".safetensors"))
        raise UsageError(f"{what} {value}: no such file or folder" if looks_like_path else
                         f"{what} {value!r}: not a file, a folder or a preset "
                         f"(presets: {', '.join(internvit.list_presets())})")


def _is_preset(value: str) -> bool:
    """Whether --model names a preset (random weights): not an existing path, and a preset name."""
    from internvit.config import is_preset

    return not os.path.exists(value) and is_preset(value)


def _check_config(args) -> None:
    """--config describes the architecture of a bare weight file (or overrides a folder's config.json); with a
    preset --model it would build *another* architecture under the preset's name: refused."""
    if args.config is not None and _is_preset(args.model):
        raise UsageError(f"--config applies to a weight file or checkpoint folder, not to a preset: --model "
                         f"{args.model} is a preset, which names its own architecture (random weights); drop "
                         f"--config, or give the weight file or folder as --model")


def _random_weights_warning(model_arg: str) -> str:
    """The one warning line of a preset --model (random weights)."""
    return (f"--model {model_arg} is a preset: its weights are RANDOM (seeded from the name), not the released "
            f"ones, so these features are a dry run and mean nothing; for the release's features give its "
            f"checkpoint folder (config.json + safetensors, e.g. --model /models/InternViT-300M-448px-V2_5) or a "
            f"weight file with --config {model_arg} (the manifest records model.random_init: true)")


def _init_distributed(args):
    """Join the ``torchrun`` process group (``WORLD_SIZE`` > 1): gloo on CPU, NCCL on ``cuda:LOCAL_RANK``."""
    from internvit.distributed_features import init_from_env

    _, world, args.device = init_from_env(args.device)
    if world <= 1:
        return None
    import torch.distributed as dist

    return dist


def _main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    import internvit
    from internvit.data import list_images, set_max_image_pixels
    from internvit.features import (
        FeatureExtractor,
        output_text,
        parse_dtype,
        refuse_foreign_out,
        resolve_input_paths,
    )
    from internvit.store import StoreError

    # every check before the model is loaded or anything is written (an empty value: refused by the parser)
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UsageError(f"--out {args.out}: exists and is not a folder")
    try:
        refuse_foreign_out(args.out)
    except (FileExistsError, NotADirectoryError) as e:
        raise UsageError(f"--out {e}") from None
    _check_out_writable(args.out)
    _check_model_spec(args.model, "--model")
    if args.config is not None:
        _check_model_spec(args.config, "--config")
    _check_config(args)
    _check_tiles(args)
    _check_image_size(args)
    try:
        images = list_images(args.images)
    except (OSError, ValueError, TypeError) as e:  # a missing folder, a file of another kind, an unreadable list
        raise UsageError(f"--images {e}") from None
    if not images:
        raise UsageError(f"--images {args.images}: no images found (looked for {', '.join(_extensions())})")
    images = resolve_input_paths(images, args.out)  # absolute: another spelling of the folder is the same job
    set_max_image_pixels(args.max_image_pixels)  # this process and its DataLoader workers
    dist = _init_distributed(args)  # under torchrun: each rank writes whole shards, rank 0 commits
    with hold_warnings() as held:  # a lossy cast, a resized position table: printed once the job is accepted
        model = internvit.load_model(args.model, args.config, dtype=parse_dtype(args.dtype), device=args.device)
    try:
        fx = FeatureExtractor(model, dict(image_size=args.image_size, resize_mode=args.resize_mode or "crop"),
                              pool=args.pool, layers=args.layers, batch_size=args.batch_size,
                              num_workers=args.num_workers, device=args.device, dtype=args.dtype,
                              normalize=args.normalize, progress=not args.no_progress, model_name=args.model,
                              tiles=args.tiles, min_tiles=args.min_tiles,
                              use_thumbnail=None if args.tiles is None else not args.no_thumbnail,
                              tile_pool=args.tile_pool, projector_input=args.projector_input,
                              downsample_ratio=args.downsample_ratio)
    except ValueError as e:  # the block indices can only be checked against the loaded model
        if args.layers is not None and "block" in str(e):
            raise UsageError(f"--layers {' '.join(map(str, args.layers))}: {e}") from None
        raise
    fx.held_warnings = held
    fx.random_init_warning = _random_weights_warning(args.model).replace("{", "{{").replace("}", "}}")  # see write
    try:
        m = fx.write(images, args.out, shard_size=args.shard_size, metadata_format=args.metadata_format,
                     metadata_pattern="metadata/part-{shard:05d}." + args.metadata_format,
                     discard_pending=args.discard_pending or args.overwrite, overwrite=args.overwrite,
                     manifest_extra=None if args.max_image_pixels is None else
                     {"max_image_pixels": args.max_image_pixels})  # which images are refused: part of the job
    except OSError as e:
        raise _out_error(args.out, e) from None
    except (ValueError, StoreError) as e:  # the folder holds another job's features, finished or pending
        raise (UsageError(f"--out {e}") if str(e).startswith(args.out) else e) from None
    if dist is not None:
        dist.destroy_process_group()
        if int(os.environ.get("RANK", "0")) != 0:
            return 0
    if m["count"] == 0 and m["num_errors"]:
        raise UsageError(_all_failed_message(args.out, m["num_errors"]))
    speed = m["timing"].get("images_per_s")
    ranks = m["timing"].get("world_size") if m["timing"].get("scope") == "job" else None
    rate = f"{speed:.1f} images/s" + (f" over all {ranks} ranks" if ranks else "") if speed else \
        "nothing left to compute"
    rows = "" if args.tiles is None else (" (one per tile)" if args.tile_pool is None else " (one per image)")
    print(f"wrote {m['count']} features{rows} of shape {tuple(m['feature_shape'])} to {output_text(args.out)} "
          f"({len(m['shards'])} shards, {_skipped_text(args.out, m)}, {rate})")
    return 0


def _skipped_text(out: str, m: dict) -> str:
    """The summary's count of the inputs the job skipped, by reason, and where they are listed:
    ``'2 unreadable images skipped (listed in OUT/errors.jsonl)'``; ``'no image skipped'``."""
    from internvit.features import output_text

    nonfinite = int(m.get("num_nonfinite") or 0)
    unreadable = int(m["num_errors"]) - nonfinite
    parts = [f"{n} {what}{'s' if n != 1 else ''}{how}" for n, what, how in (
        (unreadable, "unreadable image", ""), (nonfinite, "image", " with non-finite features")) if n]
    if not parts:
        return "no image skipped"
    where = output_text(os.path.join(out, m.get("errors_file") or "errors.jsonl"))
    return f"{' and '.join(parts)} skipped (listed in {where})"


def _out_error(out: str, e: OSError) -> OSError:
    """An ``OSError`` of creating or writing --out that names a path (read-only file system, a folder that cannot
    be created) as ``--out OUT: ...``; the errors that already say which file and why (no space left) as they
    are."""
    if e.filename is None or str(e).startswith("--out"):
        return e
    return OSError(f"--out {out}: cannot create or write it: {e.strerror or e} ({e.filename})")


def _check_out_writable(out: str) -> None:
    """--out on a read-only file system, refused before the model is loaded (nothing is created)."""
    parent = os.path.abspath(out)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    try:
        readonly = bool(os.statvfs(parent).f_flag & os.ST_RDONLY)
    except OSError:
        return
    if readonly:
        raise UsageError(f"--out {out}: {parent} is on a read-only file system")


def _all_failed_message(out: str, num_errors: int) -> str:
    """The ``error:`` text of a job in which no image gave a feature (the folder keeps the record of why)."""
    import json

    from internvit.features import ERRORS, output_text

    path = os.path.join(out, ERRORS)
    with open(path, encoding="utf-8") as f:
        first = json.loads(f.readline())
    return (f"--images: none of the {num_errors} images gave a feature (first: {first['path']}: {first['error']}); "
            f"every failure is listed in {output_text(path)}")


def _extensions() -> list:
    from internvit.data import IMAGE_EXTENSIONS

    return list(IMAGE_EXTENSIONS)


def main(argv=None) -> int:
    """The exit status: 0, or 2 after one ``error:`` line (argument errors exit 2 from argparse)."""
    return run(_main, argv)


if __name__ == "__main__":
    sys.exit(main())
