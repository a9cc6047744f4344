"""Evaluation: the caption clean-up, recall@k definitions, annotation formats, index-quality reports."""
import json
import os

import numpy as np
import pytest

from retrieval import build_index, write_embeddings
from retrieval.evaluate import index_quality, load_annotations, pre_caption, retrieval_recall

from .helpers import exact_topk, mixture


def test_pre_caption_protocol():
    assert pre_caption("A Dog; runs (fast)!  On the  BEACH.") == "a dog runs fast on the beach"
    assert pre_caption('He said: "hi" ~ #1 *star*') == "he said hi 1 star"
    assert pre_caption("keep, commas - and 'quotes'") == "keep, commas - and 'quotes'"
    long = " ".join(f"w{i}" for i in range(60))
    assert pre_caption(long).split() == [f"w{i}" for i in range(50)]


def test_recall_counts_any_positive_in_top_k():
    # 3 images, 2 captions each; text i belongs to image i // 2
    t2i = [0, 0, 1, 1, 2, 2]
    img = np.eye(3, dtype=np.float32)
    txt = np.eye(3, dtype=np.float32)[t2i]
    perfect = retrieval_recall(img, txt, t2i, ks=(1, 2))
    assert all(v == 1.0 for v in perfect.values())
    # text 5 leans to image 0; image 2 leans to the texts of image 0 (ranks worked out by hand below)
    txt[5] = [0.95, 0.0, 0.1]
    img2 = img.copy()
    img2[2] = [0.9, 0.0, 0.3]
    r = retrieval_recall(img2, txt, t2i, ks=(1, 2, 3))
    # text→image: text 5 scores image 0 at 0.95 > image 2 at 0.885 → miss at k=1, hit at k=2
    assert r["image_retrieval_recall@1"] == pytest.approx(5 / 6)
    assert r["image_retrieval_recall@2"] == pytest.approx(1.0)
    # image→text: image 2 scores texts 0, 1 at 0.9 > text 5 at 0.885 > text 4 at 0.3 → first hit at k=3
    assert r["text_retrieval_recall@1"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@2"] == pytest.approx(2 / 3)
    assert r["text_retrieval_recall@3"] == pytest.approx(1.0)


def test_annotation_formats(tmp_path):
    karpathy = {"images": [
        {"filename": "a.jpg", "filepath": "imgs", "split": "test", "sentences": [{"raw": "A cat."}, {"raw": "Cat!"}]},
        {"filename": "b.jpg", "filepath": "imgs", "split": "train", "sentences": [{"raw": "x"}]},
        {"filename": "c.jpg", "filepath": "imgs", "split": "test", "sentences": [{"raw": "A (red) car"}]}]}
    (tmp_path / "k.json").write_text(json.dumps(karpathy))
    imgs, caps, t2i = load_annotations(str(tmp_path / "k.json"), "/data")
    assert imgs == ["/data/imgs/a.jpg", "/data/imgs/c.jpg"]
    assert caps == ["a cat", "cat", "a red car"] and t2i == [0, 0, 1]
    (tmp_path / "blip.json").write_text(json.dumps([{"image": "x/1.jpg", "caption": ["One.", "Two"]},
                                                    {"image": "x/2.jpg", "caption": "Three"}]))
    imgs, caps, t2i = load_annotations(str(tmp_path / "blip.json"))
    assert imgs == [str(tmp_path / "x/1.jpg"), str(tmp_path / "x/2.jpg")] and t2i == [0, 0, 1]
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="unknown annotation format"):
        load_annotations(str(tmp_path / "bad.json"))


def test_index_quality_report(tmp_path):
    x = mixture(5000, noise=0.5)
    write_embeddings(tmp_path / "emb", x, shard_size=2000)
    build_index(str(tmp_path / "emb"), tmp_path / "idx", index_key="HNSW16", progress=False)
    fresh = mixture(5300, noise=0.5)[5000:]
    np.save(tmp_path / "q.npy", fresh)
    rep = index_quality(str(tmp_path / "idx"), queries=str(tmp_path / "q.npy"))
    found = build_search(tmp_path / "idx", fresh)
    truth = exact_topk(x, fresh, 10)
    expect = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
    assert rep["recall@10"] == pytest.approx(expect)
    assert rep["ntotal"] == 5000 and rep["queries"].startswith("given")
    index_file = json.loads((tmp_path / "idx" / "manifest.json").read_text())["index_file"]  # generation-named
    assert rep["bytes_per_vector"] == pytest.approx(os.path.getsize(tmp_path / "idx" / index_file) / 5000)
    assert rep["latency_ms_p99"] >= rep["latency_ms_p50"] > 0 and rep["batch_qps"] > 0
    loo = index_quality(str(tmp_path / "idx"))  # embeddings folder found through the manifest
    assert loo["queries"].startswith("indexed rows") and 0 < loo["recall@10"] <= 1


def build_search(index_dir, q):
    from retrieval.search import Retriever

    return Retriever.load(index_dir).search_embedding(q, 10).ids


def test_pre_caption_exact_rules():
    """reference-spec-2 §2.4: runs of >= 2 whitespace collapse, a single tab/newline stays, only a trailing
    newline and surrounding spaces are stripped, truncation splits on single spaces."""
    assert pre_caption("a\tb") == "a\tb"
    assert pre_caption("a \t b") == "a b"
    assert pre_caption("a\n\nb") == "a b"
    assert pre_caption("  A man.\n") == "a man"
    assert pre_caption("\tx") == "\tx"
    assert pre_caption("x.\n") == "x"
    assert pre_caption("Hello;World") == "hello world"
    assert pre_caption("ÄÖ Ü") == "äö ü"
    assert pre_caption(" ".join(["w"] * 3), max_words=2) == "w w"
    assert pre_caption("a\tb c", max_words=1) == "a\tb"   # words are space-separated only


class _OneHotEncoder:
    """Maps image ``.../img_K.jpg`` and every caption ``'image K, view J'`` onto the unit vector ``e_K``: a
    perfect encoder, so every recall must be 1.0."""

    name = "one-hot"

    def __init__(self, n: int) -> None:
        self.n = n

    def _vec(self, k: int) -> np.ndarray:
        v = np.zeros(self.n, np.float32)
        v[k] = 1.0
        return v

    def embed_images(self, images, **_):
        from types import SimpleNamespace

        ks = [int(os.path.basename(p).split("_")[1].split(".")[0]) for p in images]
        return SimpleNamespace(features=np.stack([self._vec(k) for k in ks]), ids=np.arange(len(ks)), errors=[])

    def encode_texts(self, texts):
        return np.stack([self._vec(int(t.split()[1].rstrip(","))) for t in texts])

    def info(self) -> dict:
        return {"name": self.name, "kind": "test", "dim": self.n}


def test_one_entry_per_caption_is_grouped_by_image(tmp_path):
    """The reported case: 20 images x 5 captions as one list entry per caption gave recall@1 0.2."""
    from retrieval.evaluate import evaluate_retrieval

    entries = [{"image": f"imgs/img_{k:02d}.jpg", "caption": f"Image {k}, view {j}."}
               for j in range(5) for k in range(20)]   # interleaved: captions of an image are not adjacent
    (tmp_path / "ann.json").write_text(json.dumps(entries))
    imgs, caps, t2i = load_annotations(str(tmp_path / "ann.json"))
    assert len(imgs) == 20 and len(caps) == 100
    assert imgs[3] == str(tmp_path / "imgs" / "img_03.jpg")
    assert [c for c, i in zip(caps, t2i) if i == 3] == [f"image 3, view {j}" for j in range(5)]
    res = evaluate_retrieval(_OneHotEncoder(20), str(tmp_path / "ann.json"), progress=False,
                             work_dir=str(tmp_path / "work"))
    assert res["n_images"] == 20 and res["n_texts"] == 100
    for which in ("exact", "index"):
        assert res[which]["image_retrieval_recall@1"] == 1.0, res[which]
        assert res[which]["text_retrieval_recall@1"] == 1.0, res[which]


def test_grouping_same_image_written_differently(tmp_path):
    """Karpathy entries repeated, and paths that differ only in spelling (./, //), are one image."""
    (tmp_path / "a.json").write_text(json.dumps([{"image": "x/1.jpg", "caption": "one"},
                                                 {"image": "./x//1.jpg", "caption": ["two", "three"]},
                                                 {"image": "x/2.jpg", "caption": "four"}]))
    imgs, caps, t2i = load_annotations(str(tmp_path / "a.json"))
    assert imgs == [str(tmp_path / "x" / "1.jpg"), str(tmp_path / "x" / "2.jpg")]
    assert caps == ["one", "two", "three", "four"] and t2i == [0, 0, 0, 1]


def test_flickr_txt_format(tmp_path):
    (tmp_path / "flickr30k_test_karpathy.txt").write_text(
        "image,caption\n1000.jpg,A dog runs.\n1000.jpg,A dog, running\n2000.jpg,Two cats: sleeping\n")
    imgs, caps, t2i = load_annotations(str(tmp_path / "flickr30k_test_karpathy.txt"), "/data/Images")
    assert imgs == ["/data/Images/1000.jpg", "/data/Images/2000.jpg"]
    assert caps == ["a dog runs", "a dog, running", "two cats sleeping"] and t2i == [0, 0, 1]


def test_malformed_annotations_name_the_file(tmp_path):
    (tmp_path / "broken.json").write_text('[{"image": "a.jpg", "caption": "x"},')
    with pytest.raises(ValueError, match=r"broken\.json: invalid JSON at line 1"):
        load_annotations(str(tmp_path / "broken.json"))
    (tmp_path / "noimg.json").write_text('[{"caption": "x"}]')
    with pytest.raises(ValueError, match=r"noimg\.json: entry 0"):
        load_annotations(str(tmp_path / "noimg.json"))
