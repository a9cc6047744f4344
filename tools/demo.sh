#!/usr/bin/env bash
# `make demo`: the main jobs on bundled data, on CPU, with nothing from outside the repository.
#   1. toy data: synthetic segmentation scenes, rendered digits, and the digits image-caption set (real scans
#      from scikit-learn, captions in English / French / Chinese, its own SentencePiece tokenizer)
#   2. feature extraction        3. toy segmentation train + test        4. linear probe on digits (cached features)
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

# All the steps run in ONE python process (`steps` below): each tool runs as `python tools/X.py ARGS` would run
# it (its command line is the first line of its log), but torch / mmengine / mmseg are imported once, not once
# per tool (on a small CPU that import is several seconds for each of the ~14 tools).
# steps ITEM [:: ITEM]...: each ITEM is either NAME SCRIPT ARGS... (output to $LOGS/NAME.log; on failure its tail
# is shown and the demo stops; SCRIPT -c CODE runs a snippet, as python -c) or ! SHELL-COMMAND (progress lines)
read -r -d '' DRIVER <<'EOF' || true
import gc, os, runpy, subprocess, sys, time, traceback
logs, items, cur = sys.argv[1], [], []
for a in sys.argv[2:]:
    if a == "::":
        items.append(cur)
        cur = []
    else:
        cur.append(a)
items.append(cur)
sys.path.insert(0, os.getcwd())

def fresh_mmengine_state():
    # mmengine keeps loggers, visualizers, message hubs and scopes as named per-process instances: forget
    # them (closing the log files), so each step starts as it would in a process of its own
    if "mmengine" not in sys.modules:
        return
    import logging
    from mmengine.utils import ManagerMixin
    todo = [ManagerMixin]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for inst in list(getattr(cls, "_instance_dict", {}).values()):
            for h in list(getattr(inst, "handlers", [])):
                if isinstance(h, logging.FileHandler):
                    h.close()
                    inst.removeHandler(h)
        getattr(cls, "_instance_dict", {}).clear()

for item in items:
    if item[0] == "!":  # a shell command, on the terminal
        sys.stdout.flush()
        if subprocess.run(["bash", "-c", item[1]]).returncode:
            sys.exit(1)
        continue
    name, script, args = item[0], item[1], item[2:]
    log = os.path.join(logs, name + ".log")
    sys.stdout.flush(); sys.stderr.flush()
    saved = os.dup(1), os.dup(2)
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1); os.dup2(fd, 2); os.close(fd)
    print("$ python", script, *(repr(a) if " " in a else a for a in args), flush=True)
    sys.argv, code, t0, c0 = [script, *args], 0, time.monotonic(), time.process_time()
    try:
        if script == "-c":  # a snippet, as python -c
            sys.argv = ["-c", *args[1:]]
            exec(compile(args[0], "<demo>", "exec"), {"__name__": "__main__"})
        else:
            runpy.run_path(script, run_name="__main__")
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 1
    finally:
        fresh_mmengine_state()
        gc.collect()
        sys.stdout.flush(); sys.stderr.flush()
        os.dup2(saved[0], 1); os.dup2(saved[1], 2)
        os.close(saved[0]); os.close(saved[1])
    with open(os.path.join(logs, "seconds.tsv"), "a", encoding="utf-8") as f:
        f.write(f"{name}\t{time.monotonic() - t0:.1f}\t{time.process_time() - c0:.1f}\n")
    if code:
        print(f"   FAILED: python {script} {' '.join(args)} (full log: {log})")
        with open(log, encoding="utf-8", errors="replace") as f:
            print("".join("   | " + line for line in f.readlines()[-25:]), end="")
        sys.exit(1)
EOF
steps() { "$PY" -c "$DRIVER" "$LOGS" "$@"; }
step() { echo "== $* [$(( $(date +%s) - START ))s]"; }
# the last line of a log matching a pattern, without mmengine's timestamp prefix
last() { grep -a -E "$2" "$LOGS/$1.log" | tail -n 1 | sed -E 's/^[0-9\/]+ [0-9:]+ - mmengine - [A-Z]+ - //'; }
# the top-5 digits of each query of tools/search.py --json
search_digits() {
  "$PY" - "$LOGS/ret_search.log" <<'PY'
import json, os, sys
rows = [r for line in open(sys.argv[1], encoding="utf-8") if line.startswith("[") for r in json.loads(line)]
by_query = {}
for r in rows:
    by_query.setdefault(r.get("query"), []).append(os.path.basename(os.path.dirname(r.get("path", ""))))
for q, digits in by_query.items():
    print(f"   query {q!r}: top-5 digits {' '.join(digits)}")
PY
}
# the service's answers, each hit shown as the digit folder of its image
serve_digits() {
  awk '/^(serving|text query|image query|wrote|server stopped)/ { if (hits) print "     top digits:" hits; hits="";
         print "   " $0; next }
       /^ +[0-9]+ +id / { n = split($NF, parts, "/"); hits = hits " " (n > 1 ? parts[n-1] : $NF) }
       END { if (hits) print "     top digits:" hits }' "$LOGS/serve.log"
}
export START LOGS OUT PY
export -f step last search_digits serve_digits

SEG_CFG=configs/toy/upernet_internvit_tiny_toy.py
SEG_ITERS=150  # the config's max_iters: its last checkpoint is iter_$SEG_ITERS.pth
# the probe on cached features: the frozen backbone runs once per image, then each epoch trains only the head
CLS_CFG=configs/classification/toy/digits_linear_probe_cached.py
CLS_CACHE=work_dirs/demo_cls/feature_cache  # in the demo's own work dir, replaced with it
RCFG=configs/retrieval/toy/digits_internvl_tiny.py
MODEL=work_dirs/demo_retrieval/hf_model
SERVE=()
if [ -f tools/demo_serve.py ]; then
  SERVE=(:: ! 'step "6. search service on the fine-tuned index (loopback, stopped afterwards)"'
         :: serve tools/demo_serve.py "$OUT/index_digits" --out "$OUT" --text "a handwritten digit seven"
         :: ! serve_digits)
fi

steps \
  ! 'step "1. toy data (segmentation scenes, rendered digits, digits with captions + tokenizer)"' \
  :: data_seg tools/make_toy_seg_dataset.py data/toy_seg \
  :: data_cls tools/make_toy_cls_dataset.py data/toy_digits \
  :: data_pairs tools/make_demo_retrieval_data.py data/toy_digits_pairs --image-ids digit --overwrite \
  :: ! 'echo "   $(tail -n 1 "$LOGS/data_pairs.log")"' \
  :: ! 'step "2. feature extraction (tiny InternViT-6B-style model, cls+mean of two blocks, sharded + manifest)"' \
  :: features tools/extract_features.py --model internvit-6b-tiny --images data/toy_seg/images/validation \
       --out "$OUT/features" --layers 1 -1 --pool cls_mean --shard-size 8 --batch-size 4 --no-progress \
  :: features_read -c "from internvit.features import read_features; f, m = read_features('$OUT/features'); \
print('features', tuple(f.shape), f.dtype, 'rows', len(m))" \
  :: ! 'echo "   $(tail -n 1 "$LOGS/features_read.log") -> $OUT/features"' \
  :: ! "step \"3. segmentation: train the toy UperNet ($SEG_ITERS iters), evaluate, write overlays\"" \
  :: seg_train tools/train.py $SEG_CFG --work-dir work_dirs/demo_seg \
  :: seg_test tools/test.py $SEG_CFG work_dirs/demo_seg/iter_$SEG_ITERS.pth \
       --work-dir work_dirs/demo_seg --show-dir "$OUT/seg_overlays" \
  :: ! 'echo "   test: $(last seg_test "mIoU")"' \
  :: ! 'step "4. linear probe on a frozen tiny InternViT (cached features), digits"' \
  :: cls_train tools/train.py $CLS_CFG --work-dir work_dirs/demo_cls --cfg-options \
       train_dataloader.dataset.cache_dir=$CLS_CACHE/train val_dataloader.dataset.cache_dir=$CLS_CACHE/val \
  :: ! 'echo "   held-out: $(last cls_train "Epoch\(val\)" | sed -E "s/^.*(accuracy\/top1)/\1/; s/ +data_time.*//")"' \
  :: ! 'step "5. retrieval: fine-tune a tiny InternVL-C/G on the digit captions (ITC on C and G paths + ITM)"' \
  :: ret_train tools/train.py $RCFG --work-dir work_dirs/demo_retrieval \
  :: ! 'echo "   first: $(last ret_train "Epoch\(train\) +\[1\]\[" | grep -o "loss: [0-9.]*" | head -1)," \
            "last: $(last ret_train "Epoch\(train\)" | grep -o "loss: [0-9.]*" | head -1)"
        echo "   $(last ret_train "fine-tuned model saved")"' \
  :: ret_index tools/build_index.py data/toy_digits_pairs/images/val "$OUT/index_digits" \
       --model "internvl-g:$MODEL" --quiet \
  :: ! 'echo "   index of the $(find data/toy_digits_pairs/images/val -name "*.png" | wc -l) held-out digits:" \
            "$OUT/index_digits"; echo "   held-out results:"' \
  :: ret_report tools/demo_retrieval_report.py --model "$MODEL" --data data/toy_digits_pairs \
       --index "$OUT/index_digits" --json "$OUT/retrieval_report.json" \
  :: ! 'grep -v "^\$ python" "$LOGS/ret_report.log" | sed "s/^ */   /"' \
  :: ret_search tools/search.py "$OUT/index_digits" --text "a handwritten digit seven" "手写数字三" \
       "le nombre cinq" -k 5 --json --html "$OUT/search.html" \
  :: ! 'search_digits; echo "   result page: $OUT/search.html"' \
  "${SERVE[@]}"
echo "   seconds per tool, wall (this process's CPU): $(awk -F'\t' '{ printf "%s%s %s (%s)", sep, $1, $2, $3; sep=", " }' \
     "$LOGS/seconds.tsv")"
step "demo done: outputs in $OUT/ (logs in $LOGS/) and work_dirs/demo_*"
