#!/usr/bin/env bash
# `make demo`: the main jobs on bundled toy data (generated here, deterministic), on CPU in a few minutes.
# Random-weight tiny models stand in for the released checkpoints (there is no model hub here), so the
# segmentation and probe numbers are real learning, and the retrieval rankings only show the pieces connect.
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread is fastest on small shared CPUs
OUT=demo_out
FIX=../shared/fixtures/internvl-cg-tiny
rm -rf "$OUT" work_dirs/demo_*
mkdir -p "$OUT"

echo "== 1. toy data (segmentation scenes, rendered digits)"
$PY tools/make_toy_seg_dataset.py data/toy_seg
$PY tools/make_toy_cls_dataset.py data/toy_digits

echo "== 2. feature extraction (tiny InternViT-6B-style model, cls+mean of two blocks, sharded + manifest)"
$PY tools/extract_features.py --model internvit-6b-tiny --images data/toy_seg/images/validation \
    --out "$OUT/features" --layers 1 -1 --pool cls_mean --shard-size 8 --batch-size 4
$PY -c "from internvit.features import read_features; f, m = read_features('$OUT/features'); \
print('features', f.shape, f.dtype, 'rows', len(m), 'first', m[0]['path'])"

echo "== 3. segmentation: train the toy UperNet (300 iters), evaluate, write overlays"
$PY tools/train.py configs/toy/upernet_internvit_tiny_toy.py --work-dir work_dirs/demo_seg
$PY tools/test.py configs/toy/upernet_internvit_tiny_toy.py work_dirs/demo_seg/iter_300.pth \
    --work-dir work_dirs/demo_seg --show-dir "$OUT/seg_overlays"

echo "== 4. linear probe on a frozen tiny InternViT (cached features), digits"
$PY tools/train.py configs/classification/toy/digits_linear_probe.py --work-dir work_dirs/demo_cls
$PY tools/test.py configs/classification/toy/digits_linear_probe.py work_dirs/demo_cls/epoch_10.pth \
    --work-dir work_dirs/demo_cls_test

echo "== 5. retrieval: index the digit images, query by image (and by text when the fixture tokenizer is present)"
$PY tools/build_index.py data/toy_digits/val "$OUT/index_vit" --model internvit:internvit-6b-tiny --quiet
$PY tools/search.py "$OUT/index_vit" --image data/toy_digits/val/3/0003.png -k 5 --html "$OUT/search.html"
if [ -f "$FIX/tokenizer.model" ]; then
  $PY tools/build_index.py data/toy_digits/val "$OUT/index_vl" --model internvl-g:internvl-tiny \
      --tokenizer "$FIX/tokenizer.model" --quiet
  $PY tools/search.py "$OUT/index_vl" --text "a handwritten digit seven" -k 3
fi
echo "== demo done: outputs in $OUT/ and work_dirs/demo_*"
