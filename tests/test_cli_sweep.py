"""Every CLI in tools/ answers every standard bad input with one ``error:`` line, exit status 2 and no new files.

The tools are discovered with a glob, so a new tool is covered at once: it gets the generic cases (an unknown
option; ``--help`` exits 0), and :func:`test_every_tool_has_its_own_cases` fails until its own cases are added
to :data:`CASES`. The standard kinds of bad input (issue 9 §3) are: a missing path, an empty folder, a wrong
model, an empty query, wrong dimensions, a bad index key, corrupt / truncated weights and index files, an
unreadable image, out-of-range numbers and a device that does not exist.

Each case runs the tool in-process exactly as ``python tools/X.py ARGS`` would (``runpy`` with
``__name__ == '__main__'``, so the tool's own error handling is what is tested), with stderr captured at the
file-descriptor level and warnings shown as Python shows them by default. Checked for every case: the exit
status is 2, stderr is exactly one line starting with ``error: ``, and nothing was created or changed in the
output location, the current folder or the shared inputs. One case runs in a subprocess, to see what a fresh
process prints (import-time notices such as faiss' AVX512 loader message).
"""
from __future__ import annotations

import glob
import logging
import os
import runpy
import shutil
import subprocess
import sys
import warnings

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.abspath(__file__)).rsplit(os.sep, 1)[0]
TOOLS = sorted(os.path.splitext(os.path.basename(p))[0] for p in glob.glob(os.path.join(ROOT, "tools", "*.py")))
TOY_SEG = os.path.join(ROOT, "configs", "toy", "linear_internvit_tiny_toy.py")
TOY_CLS = os.path.join(ROOT, "configs", "classification", "toy", "digits_linear_probe.py")


def _has_cuda() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------------------------
# The cases. Placeholders: {W} shared inputs (read-only for the tools), {out} an output path that does not exist,
# {fx} the InternVL-C/G test fixture, {seg} / {cls} the toy configs.
# --------------------------------------------------------------------------------------------------------------
DEVICE_CASES = [("device_foo", ["--device", "foo"]), ("device_cuda_99", ["--device", "cuda:99"])]
NO_CUDA_CASES = [("device_cuda_without_gpu", ["--device", "cuda"])]

EXTRACT = ["--model", "internvit-6b-tiny", "--images", "{W}/imgs", "--out", "{out}", "--no-progress"]
ZEROSHOT = ["--model", "{fx}", "--data", "{W}/cls", "--output", "{out}/res.json", "--workers", "0"]
RECALL = ["recall", "--model", "internvl-g:{fx}", "--annotations", "{W}/ann.json", "--out", "{out}.json"]
BUILD = ["{W}/emb", "{out}", "--quiet"]
BUILD_MODEL = ["{W}/imgs", "{out}", "--model", "internvit:internvit-6b-tiny", "--quiet"]
SEARCH = ["{W}/idx", "--embedding", "{W}/q16.npy", "--html", "{out}/r.html"]


def _overlapping_copy(src: str, dst: str) -> None:
    """``src`` with its second tensor's bytes pointing at its first's (same size): a crafted header."""
    import json
    import struct

    raw = open(src, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    keys = [k for k in header if k != "__metadata__"]
    a = next(k for k in keys if any(header[j]["data_offsets"][1] - header[j]["data_offsets"][0]
                                    == header[k]["data_offsets"][1] - header[k]["data_offsets"][0] > 0
                                    for j in keys if j != k))
    b = next(j for j in keys if j != a and header[j]["data_offsets"][1] - header[j]["data_offsets"][0]
             == header[a]["data_offsets"][1] - header[a]["data_offsets"][0])
    header[b]["data_offsets"] = header[a]["data_offsets"]
    hb = json.dumps(header).encode()
    with open(dst, "wb") as f:
        f.write(struct.pack("<Q", len(hb)) + hb + raw[8 + n:])


def _with(base, **repl):
    """``base`` with the values of some options replaced (``images='x'`` replaces ``--images``'s value)."""
    out = list(base)
    for opt, value in repl.items():
        flag = "--" + opt.replace("_", "-")
        out[out.index(flag) + 1] = value
    return out


CASES: dict[str, list[tuple[str, list[str]]]] = {
    "make_toy_seg_dataset": [
        ("existing_user_folder", ["{W}/imgs", "--num-train", "2", "--num-val", "1"]),
        ("existing_file", ["{W}/ann.json", "--num-train", "2"]),
        ("out_of_range_num_train", ["{out}", "--num-train", "0"]),
        ("out_empty", ["", "--num-train", "2"]),
        ("not_a_number", ["{out}", "--seed", "x"]),
    ],
    "make_toy_cls_dataset": [
        ("existing_user_folder", ["{W}/imgs"]),
        ("out_of_range_image_size", ["{out}", "--image-size", "0"]),
        ("out_of_range_val_fraction", ["{out}", "--val-fraction", "1.5"]),
        ("val_fraction_leaves_val_empty", ["{out}", "--val-fraction", "0.001"]),
        ("val_fraction_leaves_train_empty", ["{out}", "--val-fraction", "0.999"]),
        ("val_fraction_leaves_a_class_out_of_val", ["{out}", "--val-fraction", "0.0028"]),
    ],
    "extract_features": [
        ("missing_path", _with(EXTRACT, images="{W}/nope")),
        ("empty_folder", _with(EXTRACT, images="{W}/empty")),
        ("images_not_a_folder_list_or_image", _with(EXTRACT, images="{W}/ann.json")),
        ("images_a_broken_symlink", _with(EXTRACT, images="{W}/broken_link")),
        ("wrong_model", _with(EXTRACT, model="internvit-9b-nonexistent")),
        ("missing_weights_file", _with(EXTRACT, model="{W}/nope.safetensors")),
        ("truncated_weights_dir", _with(EXTRACT, model="{W}/model_trunc")),
        ("truncated_weights_pth", [*_with(EXTRACT, model="{W}/trunc.pth"), "--config", "internvit-6b-tiny"]),
        ("integer_weights", [*_with(EXTRACT, model="{W}/int_weights.pth"), "--config", "internvit-6b-tiny"]),
        ("bad_layer", [*EXTRACT, "--layers", "99"]),
        ("batch_size_0", [*EXTRACT, "--batch-size", "0"]),
        ("num_workers_negative", [*EXTRACT, "--num-workers", "-1"]),
        ("shard_size_0", [*EXTRACT, "--shard-size", "0"]),
        ("image_size_0", [*EXTRACT, "--image-size", "0"]),
        ("out_is_a_file", _with(EXTRACT, out="{W}/ann.json")),
        ("out_is_a_user_folder", _with(EXTRACT, out="{W}/imgs")),
        ("out_under_a_file", _with(EXTRACT, out="{W}/ann.json/feats")),
        ("out_holds_a_foreign_manifest", _with(EXTRACT, out="{W}/foreign_manifest")),
        ("out_holds_a_user_folder_with_overwrite", [*_with(EXTRACT, out="{W}/imgs"), "--overwrite"]),
        # trial 10c: --overwrite replaced an index folder's manifest by features (its index file orphaned)
        ("out_is_an_index_folder_with_overwrite", [*_with(EXTRACT, out="{W}/idx"), "--overwrite"]),
        ("out_holds_another_jobs_features", [*_with(EXTRACT, out="{W}/feats"), "--normalize"]),
        # 2026-12-04: --overwrite took the folder of an index build killed before its first commit
        ("out_is_a_killed_index_build_with_overwrite", [*_with(EXTRACT, out="{W}/idx_killed"), "--overwrite"]),
        ("out_empty", _with(EXTRACT, out="")),
        ("images_empty", _with(EXTRACT, images="")),
        ("model_empty", _with(EXTRACT, model="")),
        ("config_empty", [*EXTRACT, "--config", ""]),
        ("image_size_off_the_patch_grid", [*EXTRACT, "--image-size", "50"]),
        ("projector_image_size_off_the_grid", [*EXTRACT, "--tiles", "2", "--projector-input", "--image-size", "42"]),
        ("downsample_ratio_without_tiles", [*EXTRACT, "--downsample-ratio", "0.25"]),
        ("downsample_ratio_without_projector", [*EXTRACT, "--tiles", "2", "--downsample-ratio", "0.25"]),
        ("pool_with_projector_input", [*EXTRACT, "--tiles", "2", "--projector-input", "--pool", "mean"]),
        ("resize_mode_with_tiles", [*EXTRACT, "--tiles", "2", "--resize-mode", "squash"]),
        ("blank_out", _with(EXTRACT, out=" ")),
        ("config_with_a_preset_model", [*EXTRACT, "--config", "internvit-300m-tiny"]),
        ("max_image_pixels_negative", [*EXTRACT, "--max-image-pixels", "-1"]),
        ("config_position_grid_too_large", _with(EXTRACT, model="{W}/model_bomb")),
        *[(n, [*EXTRACT, *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
    ],
    "zeroshot_eval": [
        ("missing_path", _with(ZEROSHOT, data="{W}/nope")),
        ("empty_folder", _with(ZEROSHOT, data="{W}/empty")),
        ("number_classes_without_classnames", _with(ZEROSHOT, data="{W}/digits/train")),
        ("label_csv_with_an_unnamed_third_field", [*_with(ZEROSHOT, data="{W}/digits/three_fields.csv"),
                                                   "--classnames", "{W}/digits/classes.txt"]),
        ("templates_file_missing", [*ZEROSHOT, "--templates", "/nope.txt"]),
        ("templates_name_mistyped", [*ZEROSHOT, "--templates", "imagenet1kk"]),
        ("templates_malformed_json", [*ZEROSHOT, "--templates", "{W}/broken.json"]),
        ("template_with_an_escaped_placeholder", [*ZEROSHOT, "--templates", "{W}/t_escaped.txt"]),
        ("csv_row_naming_a_missing_file", _with(ZEROSHOT, data="{W}/cls_missing_rows.csv")),
        ("wrong_model", _with(ZEROSHOT, model="{W}/nope_model")),
        ("truncated_weights", _with(ZEROSHOT, model="{W}/model_trunc")),
        ("unreadable_image_only", _with(ZEROSHOT, data="{W}/cls_bad")),
        ("batch_size_0", [*ZEROSHOT, "--batch-size", "0"]),
        ("workers_negative", _with(ZEROSHOT, workers="-1")),
        ("output_is_a_folder", _with(ZEROSHOT, output="{W}/imgs")),
        ("output_is_a_user_file", _with(ZEROSHOT, output="{W}/ann.json")),
        ("output_onto_index_manifest_overwrite", [*_with(ZEROSHOT, output="{W}/idx/manifest.json"), "--overwrite"]),
        ("output_empty", _with(ZEROSHOT, output="")),
        ("num_frames_without_video", [*ZEROSHOT, "--num-frames", "4"]),
        ("resize_mode_without_video", [*ZEROSHOT, "--resize-mode", "squash"]),
        ("overwrite_without_output", [*[a for a in ZEROSHOT if a not in ("--output", "{out}/res.json")],
                                      "--overwrite"]),
        ("lang_unknown", [*ZEROSHOT, "--lang", "xx"]),
        ("dataset_mistyped", [*ZEROSHOT, "--dataset", "imagenet_1k"]),
        ("dataset_mistyped_with_templates", [*ZEROSHOT, "--dataset", "imagenet_1k", "--templates", "imagenet1k"]),
        ("dataset_unused_with_templates", [*ZEROSHOT, "--dataset", "cifar10", "--templates", "imagenet1k"]),
        ("lang_with_video", [*ZEROSHOT, "--video", "--lang", "zh"]),
        ("video_dataset_not_kinetics", [*ZEROSHOT, "--video", "--dataset", "imagenet1k"]),
        ("vision_only_model", _with(ZEROSHOT, model="internvit-6b-tiny")),
        # trial 9a
        ("video_num_frames_5000", [*ZEROSHOT, "--video", "--num-frames", "5000"]),
        ("template_without_a_placeholder", [*ZEROSHOT, "--templates", "{W}/t_none.txt"]),
        ("template_with_a_second_field", [*ZEROSHOT, "--templates", "{W}/t_field.txt"]),
        ("video_template_without_a_placeholder", [*ZEROSHOT, "--video", "--templates", "{W}/t_none.txt"]),
        ("classnames_with_a_blank_line", [*ZEROSHOT, "--classnames", "{W}/names_blank.txt"]),
        ("csv_one_image_two_labels", _with(ZEROSHOT, data="{W}/cls_two_labels.csv")),
        # valid inputs: the output clash is the only fault (the old code overwrote the input with the result)
        ("output_onto_the_templates_file", [*_with(ZEROSHOT, output="{W}/t_ok.txt"), "--templates", "{W}/t_ok.txt",
                                            "--overwrite"]),
        ("output_onto_the_data_csv", [*_with(ZEROSHOT, data="{W}/cls_ok.csv", output="{W}/cls_ok.csv"),
                                      "--overwrite"]),
        *[(n, [*ZEROSHOT, *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
    ],
    "eval_retrieval": [
        ("missing_annotations", _with(RECALL, annotations="{W}/nope.json")),
        ("malformed_json", _with(RECALL, annotations="{W}/broken.json")),
        ("empty_annotations", _with(RECALL, annotations="{W}/ann_empty.json")),
        ("missing_images_root", [*RECALL, "--images", "{W}/nope"]),
        ("wrong_model", _with(RECALL, model="internvl-g:{W}/nope")),
        ("bad_index_key", [*RECALL, "--index-key", "Foo"]),
        ("index_key_too_many_lists", [*RECALL, "--index-key", "IVF1024,Flat"]),
        ("target_recall_1_5", [*RECALL, "--target-recall", "1.5"]),
        ("batch_size_0", [*RECALL, "--batch-size", "0"]),
        ("max_index_memory_0", [*RECALL, "--max-index-memory", "0"]),
        ("out_is_a_user_file", _with(RECALL, out="{W}/ann.json")),
        ("bad_dtype", [*RECALL, "--dtype", "fp8"]),
        *[(n, [*RECALL, *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
        ("index_missing", ["index", "{W}/nope", "--out", "{out}.json"]),
        ("index_truncated", ["index", "{W}/idx_trunc", "--out", "{out}.json"]),
        ("index_empty_file", ["index", "{W}/idx_empty", "--out", "{out}.json"]),
        ("index_k_0", ["index", "{W}/idx", "-k", "0", "--out", "{out}.json"]),
        ("index_k_huge", ["index", "{W}/idx", "-k", "99999999999999999999999", "--out", "{out}.json"]),
        ("index_queries_0", ["index", "{W}/idx", "--queries", "0", "--out", "{out}.json"]),
        ("index_wrong_dims", ["index", "{W}/idx", "--query-embeddings", "{W}/q7.npy", "--out", "{out}.json"]),
        ("index_integer_queries", ["index", "{W}/idx", "--query-embeddings", "{W}/qint.npy", "--out", "{out}.json"]),
        ("index_bad_params", ["index", "{W}/idx", "--params", "foo=bar", "--out", "{out}.json"]),
        ("index_out_empty", ["index", "{W}/idx", "--out", ""]),
        ("recall_out_empty", _with(RECALL, out="")),
        # trial 7c: --out inside an index folder (its manifest is the commit point), even with --overwrite
        ("index_out_onto_index_manifest", ["index", "{W}/idx", "--out", "{W}/idx/manifest.json"]),
        ("index_out_onto_index_manifest_overwrite", ["index", "{W}/idx", "--out", "{W}/idx/manifest.json",
                                                     "--overwrite"]),
        ("index_out_new_file_in_index_folder", ["index", "{W}/idx", "--out", "{W}/idx/report.json"]),
        ("recall_out_onto_index_manifest", _with(RECALL, out="{W}/idx/manifest.json")),
        ("recall_index_key_pq8_on_4_images", [*RECALL, "--index-key", "PQ8"]),
        ("recall_index_key_pca64_on_4_images", [*RECALL, "--index-key", "PCA64,Flat"]),
        ("recall_split_on_a_list_file", [*RECALL, "--split", "train"]),
    ],
    "search": [
        ("missing_index", ["{W}/nope", "--text", "a dog"]),
        ("html_onto_an_index_manifest", [*SEARCH[:3], "--html", "{W}/idx/manifest.json", "--overwrite"]),
        ("embedding_file_of_strings", ["{W}/idx", "--embedding", "{W}/qstr.npy"]),
        ("embedding_file_of_ints", ["{W}/idx", "--embedding", "{W}/qint.npy"]),
        ("embedding_file_of_nans", ["{W}/idx", "--embedding", "{W}/qnan.npy"]),
        ("truncated_index", ["{W}/idx_trunc", "--embedding", "{W}/q16.npy"]),
        ("empty_index_file", ["{W}/idx_empty", "--embedding", "{W}/q16.npy"]),
        ("shortened_metadata", ["{W}/idx_meta", "--image", "{W}/imgs/img_000.png"]),
        ("empty_query", ["{W}/idx_model", "--text", " "]),
        ("wrong_dims", ["{W}/idx", "--embedding", "{W}/q7.npy"]),
        ("unreadable_image", ["{W}/idx_model", "--image", "{W}/bad_imgs/0.png"]),
        ("missing_image", ["{W}/idx_model", "--image", "{W}/nope.png"]),
        ("wrong_model", ["{W}/idx_model", "--image", "{W}/imgs/img_000.png", "--model", "internvit:no-such-preset"]),
        ("collection_of_other_dims", ["{W}/idx", "{W}/idx_model", "--image", "{W}/imgs/img_000.png"]),
        ("bad_dtype", [*SEARCH, "--dtype", "fp8"]),
        ("k_0", [*SEARCH, "-k", "0"]),
        ("k_negative", [*SEARCH, "-k", "-5"]),
        ("k_huge", [*SEARCH, "-k", "99999999999999999999999"]),
        ("k_over_int32", [*SEARCH, "-k", str(2**31)]),
        ("text_on_an_index_without_model", ["{W}/idx", "--text", "seven"]),
        ("bad_params", [*SEARCH, "--params", "foo=bar"]),
        ("nprobe_on_flat", [*SEARCH, "--params", "nprobe=4"]),
        ("html_onto_an_existing_file", _with(SEARCH, html="{W}/ann.json")),
        ("html_onto_the_query_image", ["{W}/idx_model", "--image", "{W}/imgs/img_000.png", "--html",
                                       "{W}/imgs/img_000.png"]),
        ("html_empty", _with(SEARCH, html="")),
        *[(n, [*SEARCH, *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
    ],
    "build_index": [
        ("missing_path", ["{W}/nope", "{out}", "--model", "internvit:internvit-6b-tiny"]),
        ("empty_folder", ["{W}/empty", "{out}", "--model", "internvit:internvit-6b-tiny", "--quiet"]),
        ("only_unreadable_images", ["{W}/bad_imgs", "{out}", "--model", "internvit:internvit-6b-tiny", "--quiet"]),
        ("wrong_model", ["{W}/imgs", "{out}", "--model", "internvit:no-such-preset", "--quiet"]),
        ("bad_index_key", [*BUILD, "--index-key", "Foo"]),
        ("index_key_too_many_lists", [*BUILD, "--index-key", "IVF1024,Flat"]),
        ("index_key_opq_too_few_vectors", [*BUILD, "--index-key", "OPQ2,PQ2x2"]),  # OPQ trains 8-bit PQ
        ("bad_index_key_with_model", [*BUILD_MODEL, "--index-key", "Foo"]),
        ("shard_size_0", [*BUILD_MODEL, "--shard-size", "0"]),
        ("batch_size_0", [*BUILD_MODEL, "--batch-size", "0"]),
        ("max_index_memory_bad", [*BUILD, "--max-index-memory", "lots"]),
        ("target_recall_1_5", [*BUILD, "--target-recall", "1.5"]),
        ("add_to_missing_index", [*BUILD, "--add"]),
        ("all_zero_row", ["{W}/emb_zero_row", "{out}", "--quiet"]),  # refused before the normalising warning
        ("metadata_not_paired_with_shards", ["{W}/emb_unpaired", "{out}", "--quiet"]),  # equal totals only
        ("metadata_id_and_source_id", ["{W}/emb_id_clash", "{out}", "--quiet"]),  # two source_id columns
        ("metadata_column_named_rank", ["{W}/emb_rank", "{out}", "--quiet"]),  # would replace each hit's rank
        ("add_only_empty_captions", ["{W}/txt_blank", "{W}/idx_txt", "--add", "--quiet"]),  # nothing to index
        ("workers_0", [*BUILD, "--workers", "0"]),
        ("id_offset_negative", [*BUILD, "--id-offset", "-1"]),
        # 2026-12-04: --overwrite committed an index beside a feature folder's files / took a killed extraction's
        ("overwrite_a_feature_folder", ["{W}/emb", "{W}/feats", "--overwrite", "--quiet"]),
        ("overwrite_a_killed_feature_extraction", ["{W}/emb", "{W}/feats_killed", "--overwrite", "--quiet"]),
        # newcomer trial: --model embedded every image into feats_killed/embeddings before the kind was refused
        ("model_into_a_killed_feature_extraction", ["{W}/imgs", "{W}/feats_killed", "--model",
                                                    "internvit:internvit-6b-tiny", "--quiet"]),
        ("overwrite_undoing_a_removal", ["{W}/emb", "{W}/idx_removed", "--overwrite", "--index-key", "HNSW16",
                                         "--quiet"]),
        ("add_with_another_id_offset", ["{W}/emb", "{W}/idx", "--add", "--id-offset", "5", "--quiet"]),
        ("num_workers_negative", [*BUILD_MODEL, "--num-workers", "-1"]),
        ("bad_dtype", [*BUILD_MODEL, "--dtype", "fp8"]),
        ("dst_empty", ["{W}/emb", "", "--quiet"]),
        ("src_empty", ["", "{out}", "--quiet"]),
        ("out_a_user_folder_with_model", ["{W}/imgs", "{W}/cls", "--model", "internvit:internvit-6b-tiny", "--quiet"]),
        ("out_a_user_folder", ["{W}/emb", "{W}/cls", "--quiet"]),
        ("embeddings_into_a_user_folder", [*BUILD_MODEL, "--embeddings", "{W}/cls"]),
        ("embeddings_into_an_index_folder", [*BUILD_MODEL, "--embeddings", "{W}/idx"]),
        ("out_a_file", ["{W}/emb", "{W}/ann.json", "--quiet"]),
        ("out_under_a_file_with_model", ["{W}/imgs", "{W}/ann.json/idx", "--model", "internvit:internvit-6b-tiny",
                                         "--quiet"]),
        *[(n, [*BUILD_MODEL, *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
    ],
    "convert_checkpoint": [
        ("missing_path", ["to-hf", "{W}/nope.pth", "{out}"]),
        ("truncated_weights", ["to-hf", "{W}/trunc.pth", "{out}", "--config", "internvit-6b-tiny"]),
        ("truncated_weights_dir", ["to-original", "{W}/model_trunc", "{out}.pth"]),
        ("wrong_model", ["to-hf", "{W}/model", "{out}", "--config", "no-such-preset"]),
        ("not_a_mmseg_checkpoint", ["mmseg0x", "{W}/other_ckpt.pth", "{out}.pth"]),
        ("existing_destination", ["to-hf", "{W}/model", "{W}/imgs"]),
        ("overwrite_a_folder_with_a_file", ["to-original", "{W}/model", "{W}/imgs", "--overwrite"]),
        ("overwrite_a_file_with_a_folder", ["to-hf", "{W}/model", "{W}/ann.json", "--overwrite"]),
        ("overlapping_tensors", ["to-original", "{W}/overlap.safetensors", "{out}.pth", "--config",
                                 "internvit-6b-tiny"]),
        ("mmseg0x_src_empty", ["mmseg0x", "", "{out}.pth"]),
        ("dst_empty", ["to-hf", "{W}/model", ""]),
        ("overwrite_a_user_folder", ["to-hf", "{W}/model", "{W}/imgs", "--overwrite"]),
        ("to_original_without_weight_suffix", ["to-original", "{W}/model", "{out}"]),
        ("nan_weights", ["to-hf", "{W}/nan_weights.pth", "{out}", "--config", "internvit-6b-tiny"]),
        ("integer_weights", ["to-original", "{W}/int_weights.pth", "{out}.pth", "--config", "internvit-6b-tiny"]),
        ("mmseg0x_src_a_folder", ["mmseg0x", "{W}/model", "{out}.pth"]),
        ("config_position_grid_too_large", ["to-hf", "{W}/model_bomb", "{out}"]),
        ("config_grid_differs_from_the_weights", ["to-hf", "{W}/model", "{out}", "--config", "{W}/cfg448.json"]),
    ],
    "train": [
        ("missing_config", ["{W}/nope.py", "--work-dir", "{out}"]),
        ("config_syntax_error", ["{W}/syntax_error.py", "--work-dir", "{out}"]),
        ("config_without_model", ["{W}/no_model.py", "--work-dir", "{out}"]),
        ("truncated_resume_checkpoint", ["{seg}", "--work-dir", "{out}", "--resume", "{W}/trunc.pth"]),
        ("bad_cfg_option", ["{seg}", "--work-dir", "{out}", "--cfg-options", "novalue"]),
        ("work_dir_empty", ["{seg}", "--work-dir", ""]),
        ("cfg_option_key_misspelt", ["{seg}", "--work-dir", "{out}", "--cfg-options", "train_cfgs.max_iters=1"]),
        ("seed_not_an_integer", ["{seg}", "--work-dir", "{out}", "--cfg-options", "randomness.seed=abc"]),
        ("max_iters_not_an_integer", ["{seg}", "--work-dir", "{out}", "--cfg-options", "train_cfg.max_iters=abc"]),
        ("lr_beyond_float32", ["{seg}", "--work-dir", "{out}", "--cfg-options", "optim_wrapper.optimizer.lr=1e300"]),
        ("cfg_option_a_config_variable", ["{seg}", "--work-dir", "{out}", "--cfg-options", "max_iters=2"]),
        ("cfg_option_data_preprocessor_the_model_has", ["{seg}", "--work-dir", "{out}", "--cfg-options",
                                                        "data_preprocessor.mean=[0,0,0]"]),
        ("work_dir_holds_checkpoints", ["{seg}", "--work-dir", "{W}"]),
        ("iou_metric_misspelt", ["{seg}", "--work-dir", "{out}", "--cfg-options", "val_evaluator.iou_metrics=[mFoo]",
                                 *[f"{s}_dataloader.dataset.data_root={{W}}/toy_seg" for s in ("train", "val")]]),
        ("work_dir_holds_a_file_named_like_the_config_copy", ["{W}/syntax_error.py", "--work-dir", "{W}"]),
        ("train_split_missing", ["{seg}", "--work-dir", "{out}", "--cfg-options",
                                 "train_dataloader.dataset.data_root={W}/empty"]),
        ("train_split_empty", ["{seg}", "--work-dir", "{out}", "--cfg-options",
                               "train_dataloader.dataset.data_root={W}/empty_seg"]),
        # trial 8b: a work dir another run holds, one that is a file (or below one), an empty option value
        ("work_dir_in_use_by_another_run", ["{seg}", "--work-dir", "{W}/busy_work_dir"]),
        ("work_dir_is_a_file", ["{seg}", "--work-dir", "{W}/ann.json"]),
        ("work_dir_below_a_file", ["{seg}", "--work-dir", "{W}/ann.json/sub"]),
        ("cfg_option_empty_value", ["{seg}", "--work-dir", "{out}", "--cfg-options", "train_cfg.max_iters="]),
        # retrieval fine-tuning: dataset arguments, a tokenizer other than the model's, a resume of other groups
        ("pairs_scale_reversed", ["{W}/ret.py", "--work-dir", "{out}", "--cfg-options",
                                  "train_dataloader.dataset.scale=[0.9,0.2]"]),
        ("pairs_hflip_not_a_probability", ["{W}/ret.py", "--work-dir", "{out}", "--cfg-options",
                                           "train_dataloader.dataset.hflip=2.0"]),
        ("pairs_image_size_off_the_patch_grid", ["{W}/ret.py", "--work-dir", "{out}", "--cfg-options",
                                                 "train_dataloader.dataset.image_size=30"]),
        ("model_tokenizer_not_the_datasets", ["{W}/ret.py", "--work-dir", "{out}", "--cfg-options",
                                              "model.tokenizer={W}/tok80"]),
        ("resume_with_other_parameter_groups", ["{W}/ret.py", "--work-dir", "{out}", "--resume",
                                                "{W}/ret_other_groups.pth"]),
        # trial 9a: a probe that takes cached features given the image dataset (crashed in the head's forward)
        ("from_features_with_an_image_dataset", ["{cls}", "--work-dir", "{out}", "--cfg-options",
                                                 "model.from_features=True",
                                                 *[f"{s}_dataloader.dataset.data_root={{W}}/digits"
                                                   for s in ("train", "val", "test")]]),
        ("csv_unknown_label", ["{cls}", "--work-dir", "{out}", "--cfg-options",
                               "train_dataloader.dataset.data_root={W}/digits",
                               "train_dataloader.dataset.ann_file=bad.csv",
                               "val_dataloader.dataset.data_root={W}/digits",
                               "test_dataloader.dataset.data_root={W}/digits"]),
        # trial 10a: an option of the split training does not validate on (validation scored the config's data)
        ("cfg_option_of_the_test_split_only", ["{seg}", "--work-dir", "{out}", "--cfg-options",
                                               "test_dataloader.dataset.data_root={W}/toy_seg"]),
        ("launcher_slurm_outside_srun", ["{seg}", "--work-dir", "{out}", "--launcher", "slurm"]),
    ],
    "test": [
        ("missing_checkpoint", ["{seg}", "{W}/nope.pth", "--work-dir", "{out}"]),
        ("truncated_checkpoint", ["{seg}", "{W}/trunc.pth", "--work-dir", "{out}"]),
        ("other_models_checkpoint", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}"]),
        ("config_syntax_error", ["{W}/syntax_error.py", "{W}/other_ckpt.pth", "--work-dir", "{out}"]),
        ("config_without_model", ["{W}/no_model.py", "{W}/other_ckpt.pth", "--work-dir", "{out}"]),
        ("work_dir_empty", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", ""]),
        ("cfg_option_key_misspelt", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                                     "test_evalutor.iou_metrics=[mIoU]"]),
        ("safetensors_checkpoint", ["{seg}", "{W}/model/model.safetensors", "--work-dir", "{out}"]),
        ("test_split_empty", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                              "test_dataloader.dataset.data_root={W}/empty_seg"]),
        ("cfg_option_a_config_variable", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                                          "data_root={W}/imgs"]),
        ("checkpoint_is_a_folder", ["{seg}", "{W}/model", "--work-dir", "{out}"]),
        ("work_dir_is_a_file", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{W}/ann.json"]),
        ("cfg_option_empty_value", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                                    "test_dataloader.batch_size="]),
        ("bad_test_mode", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                           "model.test_cfg.mode=sliding"]),
        # trial 10a: an option of the val split only (the test scored the config's data set, exit 0)
        ("cfg_option_of_the_val_split_only", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--cfg-options",
                                              "val_dataloader.dataset.data_root={W}/toy_seg"]),
        ("launcher_mpi_outside_mpirun", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--launcher", "mpi"]),
        ("cfg_option_of_the_val_evaluator_only", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}",
                                                  "--cfg-options", "val_evaluator.iou_metrics=[mDice]"]),
        ("out_onto_a_user_file", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--out", "{W}/ann.json"]),
        ("show_dir_a_user_folder", ["{seg}", "{W}/other_ckpt.pth", "--work-dir", "{out}", "--show-dir", "{W}/imgs"]),
        # with --overwrite, refused only once the runner is built (the checkpoint does not fit): the visualizer's
        # config copy (vis_data/config.py) was written into the folder all the same
        ("show_dir_a_user_folder_overwrite_unfitting_checkpoint", ["{seg}", "{W}/other_ckpt.pth", "--work-dir",
                                                                   "{out}", "--show-dir", "{W}/imgs", "--overwrite"]),
    ],
    "demo_serve": [
        ("missing_index", ["{W}/nope", "--out", "{out}"]),
        ("not_an_index_folder", ["{W}/imgs", "--out", "{out}"]),
        ("k_0", ["{W}/idx", "-k", "0", "--out", "{out}"]),
        ("missing_image", ["{W}/idx", "--image", "{W}/nope.png", "--out", "{out}"]),
    ],
    "demo_retrieval_report": [
        ("missing_model", ["--model", "{W}/nope", "--data", "{W}/imgs", "--index", "{W}/idx", "--json", "{out}.json"]),
        ("missing_index", ["--model", "{W}/model", "--data", "{W}/imgs", "--index", "{W}/nope", "--json", "{out}.j"]),
        ("data_not_made_by_the_demo", ["--model", "{W}/model", "--data", "{W}/imgs", "--index", "{W}/idx",
                                       "--json", "{out}.json"]),
    ],
    "make_demo_retrieval_data": [
        ("existing_user_folder", ["{W}/imgs"]),
        ("out_of_range_image_size", ["{out}", "--image-size", "0"]),
        ("out_of_range_val_fraction", ["{out}", "--val-fraction", "1"]),
        ("out_of_range_per_class", ["{out}", "--per-class", "0"]),
    ],
    "serve": [
        ("missing_index", ["{W}/nope"]),
        ("not_an_index_folder", ["{W}/imgs"]),
        ("truncated_index", ["{W}/idx_trunc", "--port", "0"]),
        ("port_out_of_range", ["{W}/idx", "--port", "70000"]),
        ("max_k_0", ["{W}/idx", "--max-k", "0"]),
        ("remote_host_without_flag", ["{W}/idx", "--host", "0.0.0.0"]),
        ("group_without_name", ["{W}/idx,{W}/idx"]),
        ("group_empty_member", ["g={W}/idx,,{W}/idx"]),
        ("group_missing_member", ["g={W}/idx,{W}/nope"]),
        ("group_same_folder_twice", ["g={W}/idx,{W}/idx"]),
        ("index_empty", [""]),
        ("name_without_folder", ["a="]),
        ("name_with_a_slash", ["a/b={W}/idx"]),
        ("name_dot_dot", ["..={W}/idx"]),
        ("max_pixels_over_the_decoder_limit", ["{W}/idx", "--max-pixels", "1000000000000"]),
        ("public_url_not_http", ["{W}/idx", "--public-url", "ftp://example.org/"]),
        ("public_url_with_a_query", ["{W}/idx", "--public-url", "https://example.org/?a=1"]),
        ("tokenizer_missing", ["{W}/idx", "--tokenizer", "{W}/nope.model"]),
        ("tokenizer_folder_without_model", ["{W}/idx", "--tokenizer", "{W}/empty"]),
        *[(n, ["{W}/idx", *a]) for n, a in DEVICE_CASES + NO_CUDA_CASES],
    ],
}

#: generic cases every discovered tool gets (so a new tool is covered before it has its own cases)
GENERIC = [("unknown_option", ["--no-such-option-xyz"])]

#: (tool, case) pairs that still fail, in files this test's author does not own; strict=False so a fix shows
#: up as XPASS. Each entry says what is wrong.
XFAIL: dict[tuple[str, str], str] = {}


def _params():
    out = []
    for tool in TOOLS:
        for name, argv in GENERIC + CASES.get(tool, []):
            reason = XFAIL.get((tool, name))
            needs_no_cuda = name in dict(NO_CUDA_CASES)
            marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
            if needs_no_cuda:
                marks.append(pytest.mark.skipif("_has_cuda()", reason="CUDA is present: --device cuda is valid"))
            out.append(pytest.param(tool, argv, id=f"{tool}-{name}", marks=marks))
    return out


# --------------------------------------------------------------------------------------------------------------
# Shared inputs, built once
# --------------------------------------------------------------------------------------------------------------
def _truncate(path: str, fraction: float = 0.5) -> None:
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.truncate(int(size * fraction))


#: folder locks this test process holds for the module: ``{W}/busy_work_dir`` is "in use by another run"
_HELD_FDS: list = []


def _retrieval_inputs(w: str) -> None:
    """``{W}/ret.py``: the toy retrieval fine-tuning config on a small digits set; ``{W}/tok80``: another
    tokenizer; ``{W}/ret_other_groups.pth``: a checkpoint of its model whose optimizer state has two parameter
    groups; ``{W}/busy_work_dir``: a work dir another training run holds (its folder lock)."""
    import fcntl

    import torch
    from mmengine.registry import DefaultScope

    from retrieval.finetune.demo_data import all_captions, make_digit_pairs, train_tokenizer

    os.makedirs(f"{w}/busy_work_dir")
    fd = os.open(f"{w}/busy_work_dir", os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)
    _HELD_FDS.append(fd)
    make_digit_pairs(f"{w}/digit_pairs", per_class=2)
    os.makedirs(f"{w}/tok80")
    train_tokenizer(f"{w}/tok80/tokenizer.model", all_captions(), vocab_size=80)
    base = os.path.join(ROOT, "configs", "retrieval", "toy", "digits_internvl_tiny.py")
    with open(f"{w}/ret.py", "w") as f:
        f.write(f"_base_ = [{base!r}]\ndata_root = {w + '/digit_pairs'!r}\ntokenizer = data_root + '/tokenizer.model'\n"
                "model = dict(tokenizer=tokenizer, config='internvl-tiny')\n"
                "train_dataloader = dict(num_workers=0, persistent_workers=False, dataset=dict("
                "annotation=data_root + '/train.json', tokenizer=tokenizer, image_size=28))\n"
                "val_dataloader = dict(dataset=dict(annotation=data_root + '/val_10.json', tokenizer=tokenizer, "
                "image_size=28))\ntest_dataloader = val_dataloader\n")
    from mmengine.registry import MODELS

    import retrieval.finetune  # noqa: F401  (registers the model)
    from internvit.runner import load_config

    cfg = load_config(f"{w}/ret.py")
    with DefaultScope.overwrite_default_scope(cfg.get("default_scope")):
        state = MODELS.build(cfg.model).state_dict()
    torch.save({"meta": {"epoch": 1, "iter": 2}, "state_dict": state,
                "optimizer": {"state": {}, "param_groups": [{"params": [0], "lr": 1e-3}, {"params": [1], "lr": 1e-3}]}},
               f"{w}/ret_other_groups.pth")


@pytest.fixture(scope="module")
def W(tmp_path_factory) -> str:  # noqa: N802 - the placeholder's name
    import json

    import torch
    from PIL import Image

    import internvit
    from retrieval import build_index, remove_from_index, write_embeddings

    w = str(tmp_path_factory.mktemp("sweep"))
    rng = np.random.default_rng(0)

    def img(path, seed):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        a = np.random.default_rng(seed).integers(0, 255, (40, 44, 3), dtype=np.uint8)
        Image.fromarray(a).save(path)

    for i in range(4):
        img(f"{w}/imgs/img_{i:03d}.png", i)
        with open(f"{w}/imgs/img_{i:03d}.txt", "w") as f:
            f.write(f"picture {i}")
    os.makedirs(f"{w}/empty")
    os.symlink(f"{w}/nowhere", f"{w}/broken_link")
    os.makedirs(f"{w}/foreign_manifest")
    with open(f"{w}/foreign_manifest/manifest.json", "w") as f:  # some other tool's manifest
        f.write('{"mine": 1}')
    for kind in ("images", "annotations"):  # a segmentation data root whose splits hold no file
        for split in ("training", "validation"):
            os.makedirs(f"{w}/empty_seg/{kind}/{split}")
    os.makedirs(f"{w}/bad_imgs")
    for i in range(2):
        with open(f"{w}/bad_imgs/{i}.png", "wb") as f:
            f.write(b"\x89PNG\r\n\x1a\nnot really")
    for c in ("cat", "dog"):
        img(f"{w}/cls/{c}/0.png", len(c))
        os.makedirs(f"{w}/cls_bad/{c}")
        shutil.copy(f"{w}/bad_imgs/0.png", f"{w}/cls_bad/{c}/0.png")
    # the toy-digits layout with a CSV naming an unknown label (docs/classification.md's promise)
    for c in range(10):
        img(f"{w}/digits/train/{c}/{c}.png", c)
        img(f"{w}/digits/val/{c}/{c}.png", 10 + c)
    with open(f"{w}/digits/classes.txt", "w") as f:
        f.write("\n".join(str(c) for c in range(10)) + "\n")
    with open(f"{w}/digits/bad.csv", "w") as f:
        f.write("path,label\ntrain/0/0.png,zero\n")
    with open(f"{w}/digits/three_fields.csv", "w") as f:
        f.write("train/0/0.png,0,val\n")
    from segmentation.toy_data import make_toy_seg_dataset

    make_toy_seg_dataset(f"{w}/toy_seg", num_train=2, num_val=1)  # a split that passes the set-up checks
    with open(f"{w}/cls_missing_rows.csv", "w") as f:  # one row names a file that is not there
        f.write("path,label\ncls/cat/0.png,cat\ncls/dog/0.png,dog\ncls/dog/typo.png,dog\n")
    with open(f"{w}/t_escaped.txt", "w") as f:  # an escaped placeholder: the same prompt for every class
        f.write("a photo of a {{c}}.\n")
    # trial 9a: templates without a placeholder / with another field, class names with a blank line between them,
    # a CSV listing one image with two labels
    for name, text in (("t_none.txt", "a photo of something.\n"), ("t_field.txt", "a photo of a {0} in {1}.\n"),
                       ("names_blank.txt", "cat\n\ndog\n"), ("t_ok.txt", "a photo of a {c}.\n"),
                       ("cls_ok.csv", "path,label\ncls/cat/0.png,cat\ncls/dog/0.png,dog\n")):
        with open(f"{w}/{name}", "w") as f:
            f.write(text)
    with open(f"{w}/cls_two_labels.csv", "w") as f:
        f.write("path,label\ncls/cat/0.png,cat\ncls/dog/0.png,dog\ncls/cat/0.png,dog\n")
    # annotations, JSON
    with open(f"{w}/ann.json", "w") as f:
        json.dump([{"image": f"imgs/img_{i:03d}.png", "caption": f"picture {i}"} for i in range(4)], f)
    with open(f"{w}/ann_empty.json", "w") as f:
        f.write("[]")
    with open(f"{w}/broken.json", "w") as f:
        f.write('[{"image": "imgs/img_000.png", "caption": "x"},')
    # configs
    with open(f"{w}/syntax_error.py", "w") as f:
        f.write("model = dict(type='EncoderDecoder'\n")
    with open(f"{w}/no_model.py", "w") as f:
        f.write("default_scope = 'mmseg'\nx = 1\n")
    _retrieval_inputs(w)
    # weights: a saved tiny model, a truncated copy, a truncated .pth, another model's checkpoint
    model = internvit.build_model("internvit-6b-tiny")
    internvit.save_model(model, f"{w}/model")
    from internvit.features import FeatureExtractor

    FeatureExtractor(model, progress=False).write(f"{w}/imgs", f"{w}/feats")  # finished features of one job
    from internvit.store import Store

    for folder, kind in (("idx_killed", "index"), ("feats_killed", "feature folder")):
        with Store(f"{w}/{folder}", job={"op": "killed"}, description=kind) as st:  # what a first run killed
            with st.open_file("part.bin") as tmp, open(tmp, "wb") as f:       # before its commit leaves
                f.write(b"x")
    # configs asking for a 16384 x 16384 position grid (refused: not allocated) and for another grid than the weights'
    shutil.copytree(f"{w}/model", f"{w}/model_bomb")
    with open(f"{w}/model_bomb/config.json", "w") as f:
        json.dump(dict(model.config.to_dict(), image_size=16384, patch_size=1), f)
    with open(f"{w}/cfg448.json", "w") as f:
        json.dump(dict(model.config.to_dict(), image_size=448), f)
    shutil.copytree(f"{w}/model", f"{w}/model_trunc")
    for name in os.listdir(f"{w}/model_trunc"):
        if name.endswith(".safetensors"):
            _truncate(f"{w}/model_trunc/{name}")
    torch.save(model.state_dict(), f"{w}/trunc.pth")
    _truncate(f"{w}/trunc.pth")
    torch.save({"state_dict": {"foo.weight": torch.zeros(2, 2)}, "meta": {}}, f"{w}/other_ckpt.pth")
    damaged = {k: v.clone() for k, v in model.state_dict().items()}
    damaged["encoder.layers.0.mlp.fc1.weight"][0, 0] = float("nan")
    torch.save(damaged, f"{w}/nan_weights.pth")
    damaged["encoder.layers.0.mlp.fc1.weight"] = damaged["encoder.layers.0.mlp.fc1.weight"].long()
    torch.save(damaged, f"{w}/int_weights.pth")
    _overlapping_copy(f"{w}/model/model.safetensors", f"{w}/overlap.safetensors")
    # an index over 8 random 16-d vectors, broken copies, query files of the right and the wrong width
    x = rng.standard_normal((8, 16)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    write_embeddings(f"{w}/emb", x)
    zero_row = 3 * x  # not unit length (so normalised, with its warning) and one row that cannot be
    zero_row[5] = 0
    write_embeddings(f"{w}/emb_zero_row", zero_row)
    import pyarrow as pa
    import pyarrow.parquet as pq

    for n, rows in ((0, 3), (1, 5)):  # clip-retrieval's layout, 8 rows of metadata for 8 vectors, paired wrongly
        os.makedirs(f"{w}/emb_unpaired/img_emb", exist_ok=True)
        os.makedirs(f"{w}/emb_unpaired/metadata", exist_ok=True)
        np.save(f"{w}/emb_unpaired/img_emb/img_emb_{n}.npy", x[4 * n:4 * n + 4])
        pq.write_table(pa.table({"caption": [f"c{n}.{i}" for i in range(rows)]}),
                       f"{w}/emb_unpaired/metadata/metadata_{n}.parquet")
    write_embeddings(f"{w}/emb_id_clash", x, metadata={"id": [f"k{i}" for i in range(8)], "source_id": list(range(8))})
    write_embeddings(f"{w}/emb_rank", x, metadata={"rank": list(range(8))})
    write_embeddings(f"{w}/txt", text=x, metadata={"caption": [f"c{i}" for i in range(8)]})
    build_index(f"{w}/txt", f"{w}/idx_txt", kind="text", index_key="Flat", progress=False)
    write_embeddings(f"{w}/txt_blank", text=x[:2], metadata={"caption": ["", " "]})
    build_index(f"{w}/emb", f"{w}/idx", index_key="Flat", progress=False)
    shutil.copytree(f"{w}/idx", f"{w}/idx_removed")  # an index with a removal: a rebuild would undo it
    remove_from_index(f"{w}/idx_removed", [3])
    index_files = [n for n in os.listdir(f"{w}/idx") if n.endswith(".index")]
    for name, damage in (("idx_trunc", _truncate), ("idx_empty", lambda p: _truncate(p, 0.0))):
        shutil.copytree(f"{w}/idx", f"{w}/{name}")
        for n in index_files:
            damage(f"{w}/{name}/{n}")
    np.save(f"{w}/q16.npy", x[:2])
    np.save(f"{w}/qstr.npy", np.array(["a", "b"]))  # query "vectors" of strings
    np.save(f"{w}/qint.npy", np.arange(32).reshape(2, 16))  # integers (ids saved by mistake?)
    np.save(f"{w}/qnan.npy", np.full((2, 16), np.nan))
    np.save(f"{w}/q7.npy", rng.standard_normal((2, 7)).astype(np.float32))
    return w


@pytest.fixture(scope="module")
def model_index(W) -> str:  # noqa: N803
    """``{W}/idx_model``: an index built by a model (for image / text queries), made only when a case needs it."""
    from retrieval.encoders import load_encoder
    from retrieval.pipeline import index_images

    index_images(f"{W}/imgs", f"{W}/idx_model", load_encoder("internvit:internvit-6b-tiny"), progress=False)
    # a copy whose metadata parquet lost its last rows (the index holds more ids than the metadata)
    import pyarrow.parquet as pq

    shutil.copytree(f"{W}/idx_model", f"{W}/idx_meta", ignore=shutil.ignore_patterns("embeddings"))
    shortened = 0
    for dirpath, _, files in os.walk(f"{W}/idx_meta"):
        for n in files:
            if n.endswith(".parquet"):
                table = pq.read_table(os.path.join(dirpath, n))
                pq.write_table(table.slice(0, max(0, table.num_rows - 2)), os.path.join(dirpath, n))
                shortened += 1
    assert shortened, "the model index has no metadata parquet to shorten"
    return f"{W}/idx_model"


def _snapshot(folder: str) -> dict:
    out = {}
    for dirpath, dirs, files in os.walk(folder):
        for n in dirs + files:
            p = os.path.join(dirpath, n)
            st = os.lstat(p)
            out[os.path.relpath(p, folder)] = (st.st_size, st.st_mtime_ns) if n in files else "dir"
    return out


def _show_warning(message, category, filename, lineno, file=None, line=None):
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


def run_tool(tool: str, argv: list[str]) -> int:
    """``python tools/<tool>.py argv`` in this process: the exit status (an uncaught exception propagates)."""
    saved_argv = sys.argv
    sys.argv = [os.path.join(ROOT, "tools", f"{tool}.py"), *argv]
    # pytest's log capture puts handlers on the root logger, which would make the tools' log warnings
    # invisible here (cli.tool_output prints records only when the process configured no logging itself)
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    root.handlers.clear()
    try:
        with warnings.catch_warnings():  # Python's default warning filters, printed to stderr as a user sees them
            warnings.resetwarnings()
            for action, cat in (("ignore", DeprecationWarning), ("ignore", PendingDeprecationWarning),
                                ("ignore", ImportWarning), ("ignore", ResourceWarning)):
                warnings.simplefilter(action, cat)
            warnings.showwarning = _show_warning
            try:
                runpy.run_path(sys.argv[0], run_name="__main__")
            except SystemExit as e:
                return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        return 0
    finally:
        sys.argv = saved_argv
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)


def _fill(argv, **values):
    return [a.format(**values) for a in argv]


@pytest.fixture()
def no_server(monkeypatch):
    """A serve case that got past its checks would start a server and block: make that an error instead."""
    try:
        import uvicorn
    except ImportError:
        return

    def refuse(*a, **k):
        raise AssertionError("the server would have started: the bad input was not refused")

    monkeypatch.setattr(uvicorn, "run", refuse)


@pytest.mark.parametrize("tool,argv", _params())
def test_bad_input(tool, argv, W, tmp_path, monkeypatch, capfd, no_server, request):  # noqa: N803
    from tests.conftest import fixture_dir

    fx = fixture_dir("internvl-cg-tiny") if any("{fx}" in a for a in argv) else ""
    if any("idx_model" in a or "idx_meta" in a for a in argv):
        request.getfixturevalue("model_index")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    out = str(tmp_path / "out")
    before = _snapshot(W)
    rc = run_tool(tool, _fill(argv, W=W, out=out, fx=fx, seg=TOY_SEG, cls=TOY_CLS))
    captured = capfd.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    assert rc == 2, f"exit status {rc}; stderr: {captured.err[-1500:]}"
    assert len(lines) == 1 and lines[0].startswith("error: "), f"stderr is not one error line:\n{captured.err[-3000:]}"
    assert not glob.glob(out + "*"), f"created {glob.glob(out + '*')}"
    assert not os.listdir(cwd), f"created in the current folder: {os.listdir(cwd)}"
    assert _snapshot(W) == before, "changed the shared inputs"
    print(lines[0])  # shown with -rA: what the user reads


def test_every_tool_has_its_own_cases():
    """A new tool must add its standard bad inputs to CASES (the generic case alone proves little)."""
    missing = [t for t in TOOLS if t not in CASES]
    assert not missing, f"tools without bad-input cases in tests/test_cli_sweep.py CASES: {missing}"
    stale = [t for t in CASES if t not in TOOLS]
    assert not stale, f"CASES for tools that no longer exist: {stale}"


@pytest.mark.parametrize("tool", TOOLS)
def test_help_exits_0(tool, capfd):
    assert run_tool(tool, ["--help"]) == 0
    assert "usage" in capfd.readouterr().out.lower()


#: cases also run in a fresh process: import-time output (faiss' AVX512 loader notice, mmcv-lite's warnings when
#: mmseg is imported) happens once per process, so the in-process sweep sees it only for the first tool to import
FRESH = [("build_index", "bad_index_key"), ("make_toy_seg_dataset", "existing_user_folder"),
         ("convert_checkpoint", "not_a_mmseg_checkpoint"), ("train", "config_without_model")]


def _fresh_params():
    out = []
    for tool, name in FRESH:
        argv = dict(CASES[tool])[name]
        reason = XFAIL.get((tool, name))
        marks = [pytest.mark.xfail(reason=reason, strict=False)] if reason else []
        out.append(pytest.param(tool, argv, id=f"{tool}-{name}", marks=marks))
    return out


@pytest.mark.parametrize("tool,argv", _fresh_params())
def test_fresh_process_prints_one_line(tool, argv, W, tmp_path):  # noqa: N803
    """``python tools/X.py ...`` in a new process, imports included: still one line, exit 2, nothing written."""
    out = str(tmp_path / "out")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    before = _snapshot(W)
    args = _fill(argv, W=W, out=out, fx="", seg=TOY_SEG, cls=TOY_CLS)
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", f"{tool}.py"), *args], capture_output=True,
                       text=True, cwd=cwd, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    assert not glob.glob(out + "*") and not os.listdir(cwd) and _snapshot(W) == before


def test_own_previous_output_is_replaced_without_overwrite(W, tmp_path, capfd):  # noqa: N803
    """What a tool wrote itself may be replaced by a rerun; a user's file needs --overwrite."""
    out = str(tmp_path / "report.json")
    for _ in range(2):
        assert run_tool("eval_retrieval", ["index", f"{W}/idx", "--out", out, "--queries", "4", "-k", "2"]) == 0
    user = tmp_path / "user.json"
    user.write_text('{"mine": 1}')
    assert run_tool("eval_retrieval", ["index", f"{W}/idx", "--out", str(user)]) == 2
    assert user.read_text() == '{"mine": 1}'
    assert run_tool("eval_retrieval", ["index", f"{W}/idx", "--out", str(user), "--overwrite"]) == 0
    assert "ntotal" in user.read_text()
    capfd.readouterr()
