#!/usr/bin/env python
"""Build (or extend) a FAISS index over images or over existing embeddings.

  # images (folder / list file / parquet of paths+captions / webdataset tars) → embeddings → tuned index
  python tools/build_index.py images/ out/index --model /models/InternVL-14B-224px --mode InternVL-G
  python tools/build_index.py 'shards/{00000..00099}.tar' out/index --model internvl-c:/models/InternVL-14B-224px
  python tools/build_index.py images/ out/index --model internvit:internvit-6b-tiny      # image → image
  python tools/build_index.py more_images/ out/index --model ... --add                   # incremental
  python tools/build_index.py images/ out/captions --model ... --kind text               # image → text
  # existing embeddings in clip-retrieval's layout (img_emb/, text_emb/, metadata/): no model needed
  python tools/build_index.py embeddings/ out/index --max-index-memory 4G --target-recall 0.95

Every argument is checked before any work (bad input: one `error:` line, exit status 2, nothing written).
Rerunning an interrupted command with the same arguments resumes it; --overwrite discards an interrupted job
of other arguments (and, from an embeddings folder, replaces an index built from other embeddings).
Adding embeddings the index already holds (its build's or an earlier add's) is refused unless
--allow-duplicate; --add keeps the folder's id offset (an --id-offset that differs is refused: ids already
handed out never change). With --add and --overwrite, the embeddings-add-* folders of other interrupted adds
are removed (without it they are named in a warning); a refused --add leaves no embeddings folder behind.

  # the embedding stage across processes / machines (gloo on CPU, NCCL with --device cuda): each rank embeds
  # whole shards, rank 0 commits the embeddings and builds the index; the same result as one process
  torchrun --nproc_per_node 8 tools/build_index.py images/ out/index --model ... --device cuda
"""
import argparse
import json
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import (  # noqa: E402
    ArgumentParser,
    UsageError,
    device,
    dtype_arg,
    fraction,
    memory_size,
    nonnegative_int,
    positive_int,
    run,
)

MAX_ID = 2**63 - 1  # faiss ids are int64


def id_offset(value: str) -> int:
    """An integer from 0 to 2**63 - 1 (the folder's ids must also fit: checked against its size later)."""
    v = nonnegative_int(value)
    if v > MAX_ID:
        raise argparse.ArgumentTypeError(f"must be <= 2**63 - 1 = {MAX_ID} (faiss ids are int64), got {v}")
    return v


#: the library's messages name Python arguments; from the command line, the flags that do the same
CLI_HINTS = (("add_to_index / --add", "--add"), ("--overwrite (overwrite=True)", "--overwrite"),
             ("overwrite=True", "--overwrite"), ("another embeddings folder", "another --embeddings folder"),
             ("allow_duplicate=True", "--allow-duplicate"), ("set_id_offset / --id-offset", "--id-offset"),
             ("discard it explicitly", "pass --overwrite to discard it"),
             ("--discard-pending (discard_pending=True)", "--overwrite"),
             ("leave id_offset out", "leave --id-offset out"),
             ("discard_pending=True", "--overwrite"))


def cli_message(e: BaseException) -> str:
    """The first line of ``e``'s message with the Python arguments it names replaced by their flags."""
    from internvit.cli import one_line

    text = one_line(e)
    for python, flag in CLI_HINTS:
        text = text.replace(python, flag)
    return text


def build_parser() -> ArgumentParser:
    p = ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("source", help="image folder, .txt/.lst list, .parquet, tar pattern, or an embeddings folder "
                                  "(when --model is not given)")
    p.add_argument("out_dir", help="index folder")
    p.add_argument("--model", default=None, help="encoder spec: internvl-c:DIR, internvl-g:DIR, internvit:SRC, "
                                                 "open_clip:NAME[@weights], or a model dir / preset")
    p.add_argument("--mode", default=None, choices=["InternVL-C", "InternVL-G"], help="InternVL image embedding")
    p.add_argument("--tokenizer", default=None, help="tokenizer.model (or its folder) for InternVL text")
    p.add_argument("--kind", default=None, choices=["img", "text"],
                   help="index images or captions (default: img; with --add, the index's kind)")
    p.add_argument("--add", action="store_true", help="add to the existing index in out_dir (no rebuild)")
    p.add_argument("--index-key", default=None, help="faiss index_factory string (default: automatic)")
    p.add_argument("--max-index-memory", type=memory_size, default="4G",
                   help="memory budget of the index, e.g. 4G, 512M")
    p.add_argument("--target-recall", type=fraction, default=0.95, help="recall@10 vs exact search to tune for")
    p.add_argument("--embeddings", default=None, help="where to keep the embeddings (default OUT/embeddings)")
    p.add_argument("--batch-size", type=positive_int, default=32)
    p.add_argument("--shard-size", type=positive_int, default=10_000, help="images per embedding shard")
    p.add_argument("--num-workers", type=nonnegative_int, default=0, help="image-reading worker processes")
    p.add_argument("--device", type=device, default="cpu")
    p.add_argument("--dtype", default="float32", type=dtype_arg, help="fp32, bf16, fp16, fp64 or torch's names")
    p.add_argument("--path-column", default=None, help="parquet column holding image paths")
    p.add_argument("--caption-column", default=None, help="parquet column holding captions")
    p.add_argument("--gpu", action="store_true", help="train / add with faiss-gpu when a GPU is present")
    p.add_argument("--on-disk", action="store_const", const=True, default=None,
                   help="IVF index with its inverted lists on disk, memory-mapped (default: when the codes exceed "
                        "--max-index-memory); embeddings folders only")
    p.add_argument("--workers", type=positive_int, default=1, help="processes adding the partitions of an "
                                                                   "on-disk build")
    p.add_argument("--id-offset", type=id_offset, default=None, help="global id of this folder's first row, "
                   "for searching several folders as one collection (tools/search.py DIR1 DIR2 ...); default: "
                   "0 for a new folder, the recorded one for --add / a rebuild (--add refuses another value)")
    p.add_argument("--overwrite", action="store_true", help="discard an interrupted job of other arguments; from "
                   "an embeddings folder, also replace an index built from other embeddings (as a new generation)")
    p.add_argument("--allow-duplicate", action="store_true", help="with --add: add embeddings even if the index "
                   "already holds them (every row would be indexed twice)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def _check_embeddings_source(args) -> None:
    """Without --model: the source must be an embeddings folder; the index key, kind and dim are checked
    against it (and against the index for --add) before anything is written."""
    from retrieval.embeddings import EmbeddingSource, find_shards
    from retrieval.index import check_kind, plan_index, read_manifest

    if args.add:  # the kind defaults to the index's: a caption index takes a folder of text_emb/ only
        manifest = read_manifest(args.out_dir)
        args.kind = check_kind(manifest, args.kind, args.out_dir)
    if not os.path.isdir(args.source) or not find_shards(args.source, args.kind or "img"):
        if args.add and os.path.isdir(args.source) and find_shards(args.source, "img" if args.kind == "text"
                                                                   else "text"):
            raise UsageError(f"{args.source}: holds no {args.kind}_emb/ shards to add to a {args.kind} index")
        raise UsageError(f"{args.source}: without --model the source must be an embeddings folder "
                         f"(img_emb/, text_emb/, metadata/)")
    if not args.add:
        args.kind = args.kind or "img"
        src = EmbeddingSource.from_folder(args.source, args.kind)
        from retrieval.ondisk import plan_ondisk, wants_on_disk

        if args.on_disk or wants_on_disk(src.count, src.dim, args.index_key, args.max_index_memory):
            if args.gpu:
                raise UsageError("--gpu cannot be used with an on-disk build")
            plan_ondisk(src.count, src.dim, args.index_key, args.max_index_memory)
        else:
            plan_index(src.count, src.dim, args.index_key, args.max_index_memory)


def _committed_index(out_dir: str) -> bool:
    from retrieval.index_build import _committed_or_none

    return _committed_or_none(out_dir) is not None


def main(argv=None) -> int:
    from internvit.cli import USER_ERRORS

    args = build_parser().parse_args(argv)
    try:
        return _main(args)
    except USER_ERRORS as e:  # one line, naming this tool's flags where the library names Python arguments
        raise UsageError(cli_message(e)) from None


def _check_model_offset(args) -> None:
    """With --model: the folder's last id under --id-offset must fit int64; checked before anything is
    embedded (the number of inputs is known from the listing)."""
    from retrieval.index_folder import check_id_offset
    from retrieval.inputs import image_inputs

    images, _ = image_inputs(args.source, path_column=args.path_column, caption_column=args.caption_column)
    n = len(images.paths if hasattr(images, "paths") else images)
    if args.add:
        from retrieval.index import read_manifest

        n += int(read_manifest(args.out_dir)["next_id"])
    check_id_offset(args.id_offset, n, args.out_dir)


def _check_add_id_offset(args) -> None:
    """--add keeps the folder's recorded offset: another --id-offset would renumber every id handed out."""
    from retrieval.index import read_manifest

    recorded = int(read_manifest(args.out_dir).get("id_offset", 0))
    if args.id_offset != recorded:
        raise UsageError(f"{args.out_dir}: --id-offset {args.id_offset} differs from the folder's recorded id "
                         f"offset {recorded}; --add keeps the recorded offset (changing it would renumber every id "
                         f"already handed out): leave --id-offset out")


def _main(args) -> int:
    logging.getLogger().setLevel(logging.WARNING if args.quiet else logging.INFO)  # printed by cli.run's handler
    if args.add and args.index_key:
        raise UsageError("--index-key cannot be used with --add (the index keeps its key)")
    if args.add and (args.on_disk or args.workers > 1):
        raise UsageError("--on-disk / --workers cannot be used with --add (an on-disk index is rebuilt, not extended)")
    if args.model is not None and (args.on_disk or args.workers > 1):
        raise UsageError("--on-disk / --workers build from an embeddings folder: extract the features first "
                         "(tools/extract_features.py), then build from that folder")
    if args.allow_duplicate and not args.add:
        raise UsageError("--allow-duplicate is for --add")
    if args.add and args.id_offset is not None:
        _check_add_id_offset(args)
    if args.allow_duplicate and args.model is not None:
        raise UsageError("--allow-duplicate adds from an embeddings folder: extract the features first "
                         "(tools/extract_features.py), then --add that folder")

    if args.model is None:
        from retrieval.index import add_to_index, build_index

        _check_embeddings_source(args)
        if int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun: an embeddings folder is indexed once, by rank 0 (--workers adds in parallel)
        # --id-offset (or the recorded one, without it) is committed with the rows, in one commit
        if args.add:
            manifest = add_to_index(args.out_dir, args.source, kind=args.kind, use_gpu=args.gpu,
                                    progress=not args.quiet, id_offset=args.id_offset,
                                    allow_duplicate=args.allow_duplicate, discard_pending=args.overwrite)
        else:
            manifest = build_index(args.source, args.out_dir, kind=args.kind, index_key=args.index_key,
                                   max_index_memory=args.max_index_memory, target_recall=args.target_recall,
                                   use_gpu=args.gpu, progress=not args.quiet, on_disk=args.on_disk,
                                   workers=args.workers, id_offset=args.id_offset, overwrite=args.overwrite)
    else:
        from internvit.distributed_features import agree, init_from_env, leave
        from internvit.features import parse_dtype
        from retrieval.encoders import load_encoder
        from retrieval.pipeline import index_images

        if args.add:
            from retrieval.index import read_manifest

            read_manifest(args.out_dir)  # a missing / unfinished index is reported before the model loads
        if args.id_offset is not None:
            _check_model_offset(args)
        if args.overwrite and not args.add and _committed_index(args.out_dir):
            raise UsageError(f"{args.out_dir}: --overwrite with --model only discards an interrupted job; "
                             f"to replace the index there, build into another folder (or from an "
                             f"embeddings folder with --overwrite)")
        # under torchrun (WORLD_SIZE > 1): join the group; every rank embeds whole shards, rank 0 builds the index
        rank, world, args.device = init_from_env(args.device)
        loaded: list = []  # a model that cannot be loaded is reported on every rank
        agree(lambda: loaded.append(load_encoder(args.model, mode=args.mode, tokenizer=args.tokenizer,
                                                 device=args.device, dtype=parse_dtype(args.dtype))), rank, world)
        encoder = loaded[0]
        manifest = index_images(args.source, args.out_dir, encoder, add=args.add, kind=args.kind,
                                embeddings_dir=args.embeddings, index_key=args.index_key,
                                max_index_memory=args.max_index_memory, target_recall=args.target_recall,
                                batch_size=args.batch_size, shard_size=args.shard_size,
                                num_workers=args.num_workers, path_column=args.path_column,
                                caption_column=args.caption_column, use_gpu=args.gpu,
                                progress=not args.quiet, id_offset=args.id_offset, overwrite=args.overwrite)
        leave()
        if manifest is None:
            return 0  # a rank > 0 under torchrun: the embeddings are committed, rank 0 builds the index
    summary = {k: manifest.get(k) for k in ("index_key", "search_params", "ntotal", "dim", "bytes_per_vector",
                                            "normalize", "skipped")}
    summary["tuned_recall@10"] = manifest.get("tuning", {}).get("recall")
    print(json.dumps({"index": os.path.abspath(args.out_dir), **summary}))
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
