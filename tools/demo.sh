#!/usr/bin/env bash
# `make demo`: the main jobs on bundled data, on CPU, with nothing from outside the repository.
#   1. toy data: synthetic segmentation scenes, rendered digits, and the digits image-caption set (real scans
#      from scikit-learn, captions in English / French / Chinese, its own SentencePiece tokenizer)
#   2. feature extraction        3. toy segmentation train + test        4. linear probe on digits
#   5. retrieval fine-tuning of a tiny InternVL-C/G on the digit captions (the published recipe's losses),
#      then on held-out digits: zero-shot accuracy, text -> image and image -> image through a FAISS index
#   6. the search service on that index (when tools/demo_serve.py is present)
# Progress and the numbers that matter go to the terminal; every command's full output is in demo_out/logs/.
set -euo pipefail
PY=${1:-python}
cd "$(dirname "$0")/.."
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}   # tiny models: one thread is fastest on small shared CPUs
export PYTHONWARNINGS=${PYTHONWARNINGS:-ignore}
OUT=demo_out
LOGS=$OUT/logs
MARK=$OUT/.made-by-make-demo
# demo_out/ and work_dirs/demo_* are this script's own outputs: replaced on every run, never a user's folder
if [ -e "$OUT" ] && [ ! -f "$MARK" ]; then
  echo "error: $OUT exists and was not made by make demo (or by an older one): move it away, or run make clean" >&2
  exit 2
fi
rm -rf "$OUT" work_dirs/demo_*
mkdir -p "$LOGS"
touch "$MARK"
START=$(date +%s)

# run NAME CMD...: the command's output goes to $LOGS/NAME.log; on failure show its tail and stop
run() {
  local name=$1; shift
  if ! "$@" > "$LOGS/$name.log" 2>&1; then
    echo "   FAILED: $* (full log: $LOGS/$name.log)"
    tail -n 25 "$LOGS/$name.log" | sed 's/^/   | /'
    exit 1
  fi
}
step() { echo "== $* [$(( $(date +%s) - START ))s]"; }
# the last line of a log matching a pattern, without mmengine's timestamp prefix
last() { grep -a -E "$2" "$LOGS/$1.log" | tail -n 1 | sed -E 's/^[0-9\/]+ [0-9:]+ - mmengine - [A-Z]+ - //'; }

step "1. toy data (segmentation scenes, rendered digits, digits with captions + tokenizer)"
run data_seg $PY tools/make_toy_seg_dataset.py data/toy_seg
run data_cls $PY tools/make_toy_cls_dataset.py data/toy_digits
run data_pairs $PY tools/make_demo_retrieval_data.py data/toy_digits_pairs --image-ids digit --overwrite
echo "   $(tail -n 1 "$LOGS/data_pairs.log")"

step "2. feature extraction (tiny InternViT-6B-style model, cls+mean of two blocks, sharded + manifest)"
run features $PY tools/extract_features.py --model internvit-6b-tiny --images data/toy_seg/images/validation \
    --out "$OUT/features" --layers 1 -1 --pool cls_mean --shard-size 8 --batch-size 4 --no-progress
run features_read $PY -c "from internvit.features import read_features; f, m = read_features('$OUT/features'); \
print('features', tuple(f.shape), f.dtype, 'rows', len(m))"
echo "   $(tail -n 1 "$LOGS/features_read.log") -> $OUT/features"

step "3. segmentation: train the toy UperNet (300 iters), evaluate, write overlays"
run seg_train $PY tools/train.py configs/toy/upernet_internvit_tiny_toy.py --work-dir work_dirs/demo_seg
run seg_test $PY tools/test.py configs/toy/upernet_internvit_tiny_toy.py work_dirs/demo_seg/iter_300.pth \
    --work-dir work_dirs/demo_seg --show-dir "$OUT/seg_overlays"
echo "   test: $(last seg_test 'mIoU')"

step "4. linear probe on a frozen tiny InternViT (cached features), digits"
run cls_train $PY tools/train.py configs/classification/toy/digits_linear_probe.py --work-dir work_dirs/demo_cls
run cls_test $PY tools/test.py configs/classification/toy/digits_linear_probe.py work_dirs/demo_cls/epoch_10.pth \
    --work-dir work_dirs/demo_cls_test
echo "   test: $(last cls_test 'accuracy')"

step "5. retrieval: fine-tune a tiny InternVL-C/G on the digit captions (ITC on C and G paths + ITM)"
RCFG=configs/retrieval/toy/digits_internvl_tiny.py
run ret_train $PY tools/train.py $RCFG --work-dir work_dirs/demo_retrieval
echo "   first: $(last ret_train 'Epoch\(train\) +\[1\]\[' | grep -o 'loss: [0-9.]*' | head -1)," \
     "last: $(last ret_train 'Epoch\(train\)' | grep -o 'loss: [0-9.]*' | head -1)"
echo "   $(last ret_train 'fine-tuned model saved')"
MODEL=work_dirs/demo_retrieval/hf_model
run ret_index $PY tools/build_index.py data/toy_digits_pairs/images/val "$OUT/index_digits" \
    --model "internvl-g:$MODEL" --quiet
echo "   index of the $(find data/toy_digits_pairs/images/val -name '*.png' | wc -l) held-out digits: $OUT/index_digits"
echo "   held-out results:"
run ret_report $PY tools/demo_retrieval_report.py --model "$MODEL" --data data/toy_digits_pairs \
    --index "$OUT/index_digits" --json "$OUT/retrieval_report.json"
sed "s/^ */   /" "$LOGS/ret_report.log"
run ret_search $PY tools/search.py "$OUT/index_digits" --text "a handwritten digit seven" "手写数字三" \
    "le nombre cinq" -k 5 --json --html "$OUT/search.html"
$PY - "$LOGS/ret_search.log" <<'EOF'
import json, os, sys
rows = [r for line in open(sys.argv[1], encoding="utf-8") if line.startswith("[") for r in json.loads(line)]
by_query = {}
for r in rows:
    by_query.setdefault(r.get("query"), []).append(os.path.basename(os.path.dirname(r.get("path", ""))))
for q, digits in by_query.items():
    print(f"   query {q!r}: top-5 digits {' '.join(digits)}")
EOF
echo "   result page: $OUT/search.html"

if [ -f tools/demo_serve.py ]; then
  step "6. search service on the fine-tuned index (loopback, stopped afterwards)"
  run serve $PY tools/demo_serve.py "$OUT/index_digits" --out "$OUT" --text "a handwritten digit seven"
  # the service's answers, each hit shown as the digit folder of its image
  awk '/^(serving|text query|image query|wrote|server stopped)/ { if (hits) print "     top digits:" hits; hits="";
         print "   " $0; next }
       /^ +[0-9]+ +id / { n = split($NF, parts, "/"); hits = hits " " (n > 1 ? parts[n-1] : $NF) }
       END { if (hits) print "     top digits:" hits }' "$LOGS/serve.log"
fi
step "demo done: outputs in $OUT/ (logs in $LOGS/) and work_dirs/demo_*"
