#!/usr/bin/env python
"""Report what the demo's fine-tuned InternVL-C/G learned, on held-out handwritten digits.

  python tools/demo_retrieval_report.py --model MODEL_DIR --data DATA_DIR --index INDEX_DIR [--json OUT.json]

* zero-shot accuracy: classification.build_zero_shot_classifier over the digit names (per language, the
  language's caption templates), images embedded as the index's encoder does;
* text -> image recall@1 through the index: every caption template x digit x language is a query; a hit when
  the top image shows that digit;
* image -> image top-1 same-digit rate through the index (the query image itself left out).
MODEL_DIR is the fine-tuned model (HF layout, tokenizer.model inside); DATA_DIR the folder made by
tools/make_demo_retrieval_data.py; INDEX_DIR an index of DATA_DIR/images/val built by tools/build_index.py.
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from internvit.cli import ArgumentParser, existing_dir, run, write_json  # noqa: E402


def main(argv=None) -> int:
    p = ArgumentParser(description=__doc__, formatter_class=__import__("argparse").RawDescriptionHelpFormatter)
    p.add_argument("--model", type=existing_dir, required=True, help="fine-tuned model folder")
    p.add_argument("--data", type=existing_dir, required=True, help="folder made by make_demo_retrieval_data.py")
    p.add_argument("--index", type=existing_dir, required=True, help="index of DATA/images/val")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    args = p.parse_args(argv)
    meta_path = os.path.join(args.data, "meta.json")
    if not os.path.isfile(meta_path):
        raise ValueError(f"{args.data}: no meta.json (not made by tools/make_demo_retrieval_data.py)")

    import numpy as np
    import torch

    import internvit
    from classification.zero_shot import build_zero_shot_classifier
    from retrieval.finetune.demo_data import label_of
    from retrieval.search import Retriever

    with open(meta_path, encoding="utf-8") as f:
        meta = json.load(f)
    torch.set_num_threads(1)
    r = Retriever.load(args.index)
    enc = r.encoder
    paths = [r.metadata(i)["path"] for i in range(r.ntotal)]
    labels = np.array([label_of(q) for q in paths])
    if (labels == None).any():  # noqa: E711 - object array
        raise ValueError(f"{args.index}: indexed images are not in <digit>/ folders")
    image_emb = enc.embed_images(paths, strict=True).features  # the encoder of the index (same mode)

    model = internvit.load_model(args.model)
    tok = internvit.get_tokenizer(args.model)
    out = {"mode": enc.name, "n_images": int(len(paths))}
    zs = {}
    for lang, templates in meta["templates"].items():
        w = build_zero_shot_classifier(model, tok, meta["numbers"][lang], templates).numpy()
        zs[lang] = float(((image_emb @ w).argmax(1) == labels).mean())
    out["zero_shot_accuracy"] = zs

    queries, truth = [], []
    for lang, templates in meta["templates"].items():
        for t in templates:
            for d, word in enumerate(meta["numbers"][lang]):
                queries.append(t.format(word))
                truth.append(d)
    res = r.search_text(queries, k=1)
    out["text_to_image_recall@1"] = float(np.mean([labels[ids[0]] == d for ids, d in zip(res.ids, truth)]))
    out["n_text_queries"] = len(queries)

    res = r.search_embedding(image_emb, k=2)
    hits = []
    for i, ids in enumerate(res.ids):
        other = next(int(j) for j in ids if j != i and j >= 0)
        hits.append(labels[other] == labels[i])
    out["image_to_image_top1_same_digit"] = float(np.mean(hits))

    print(f"  zero-shot accuracy on {len(paths)} held-out digits: "
          + ", ".join(f"{lang} {v:.1%}" for lang, v in zs.items()))
    print(f"  text -> image recall@1 through the index ({len(queries)} caption queries): "
          f"{out['text_to_image_recall@1']:.1%}")
    print(f"  image -> image top-1 same digit: {out['image_to_image_top1_same_digit']:.1%}")
    if args.json:
        write_json(args.json, out, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(run(main))
