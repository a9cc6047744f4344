"""Zero-shot classification: shipped metadata, classifier building (vs open_clip and a per-class loop),
metrics (vs scikit-learn), evaluation and the CLI."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import zeroshot_eval  # noqa: E402  (tools/, put on sys.path by conftest.py)

import internvit
from classification.zero_shot import (
    build_zero_shot_classifier,
    classification_metrics,
    load_classnames,
    load_templates,
    zero_shot_evaluate,
)
from internvit.openclip_adapter import OpenCLIPModel, create_model_and_transforms
from internvit.openclip_adapter import get_tokenizer as oc_get_tokenizer

from .conftest import ROOT, write_images  # noqa: E402


@pytest.fixture(scope="module")
def model(fx):
    return internvit.load_model(fx)


@pytest.fixture(scope="module")
def tok(fx):
    return internvit.get_tokenizer(fx)


# -- metadata ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lang,n_templates", [("en", 80), ("zh", 80), ("ja", 37), ("ar", 55), ("it", 49)])
def test_imagenet_metadata_per_language(lang, n_templates):
    names = load_classnames(lang, "imagenet1k")
    assert len(names) == 1000 and all(isinstance(n, str) and n for n in names)
    templates = load_templates(lang, "imagenet1k")
    assert len(templates) == n_templates and all("{c}" in t for t in templates)
    assert load_classnames(lang, "imagenetv2") == names and load_classnames(lang, "imagenet_sketch") == names
    for variant in ("imagenet-a", "imagenet-r", "imagenet-o"):
        sub = load_classnames(lang, variant)
        assert len(sub) == 200 and set(sub) <= set(names)
    assert load_templates(lang, "imagenet-r") == templates  # falls back to the ImageNet-1k templates


def test_english_metadata_matches_open_clip():
    from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    assert load_classnames("en") == list(IMAGENET_CLASSNAMES)
    assert [t.format(c="X") for t in load_templates("en")] == [t("X") for t in OPENAI_IMAGENET_TEMPLATES]
    assert load_classnames("cn") == load_classnames("zh")  # CLIP_benchmark spellings accepted
    assert load_classnames("en", "imagenet-a")[:2] == ["stingray", "goldfinch"]
    assert load_classnames("en", "imagenet-r")[:2] == ["goldfish", "great white shark"]
    with pytest.raises(ValueError, match="lang must be one of"):
        load_classnames("de")
    with pytest.raises(ValueError, match="no class names for dataset 'nope'"):
        load_classnames("en", "nope")


# -- classifier ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_open_clip(tmp_path_factory):
    import open_clip

    cfg = {"embed_dim": 16,
           "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 16, "head_width": 16},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    path = tmp_path_factory.mktemp("oc") / "internvit-test-tiny-clip.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(str(path))
    torch.manual_seed(0)
    model = open_clip.create_model("internvit-test-tiny-clip").eval()
    return model, open_clip.get_tokenizer("internvit-test-tiny-clip")


def test_same_weights_as_open_clip_builder(tiny_open_clip):
    from open_clip import build_zero_shot_classifier as oc_build
    from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES

    model, tokenizer = tiny_open_clip
    classnames = load_classnames("en")[:30]
    templates = OPENAI_IMAGENET_TEMPLATES[:7]
    ref = oc_build(model, tokenizer, classnames, templates, num_classes_per_batch=4, device="cpu")
    ours = build_zero_shot_classifier(model, tokenizer, classnames, templates, batch_size=50)
    assert ours.shape == (16, 30)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=0)
    strings = ["a photo of a {}.", "a drawing of a {}."]  # open_clip-style positional format strings
    torch.testing.assert_close(build_zero_shot_classifier(model, tokenizer, classnames, strings),
                               oc_build(model, tokenizer, classnames, strings, device="cpu"), atol=1e-5, rtol=0)


@torch.no_grad()
def test_internvl_classifier_equals_per_class_loop(model, tok):
    classnames = ["dog", "red panda", "tabby cat", "a very long class name " * 10]
    templates = load_templates("en")[:5]
    w = build_zero_shot_classifier(model, tok, classnames, templates, batch_size=7)
    cols = []
    for c in classnames:  # the protocol written out class by class
        emb = F.normalize(model.encode_text(tok([t.format(c=c) for t in templates])), dim=-1)
        cols.append(F.normalize(emb.mean(0), dim=-1))
    torch.testing.assert_close(w, torch.stack(cols, dim=1), atol=1e-5, rtol=0)
    fns = [lambda c, t=t: t.format(c=c) for t in templates]
    torch.testing.assert_close(build_zero_shot_classifier(model, tok, classnames, fns), w, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="templates is empty"):
        build_zero_shot_classifier(model, tok, classnames, [])


# -- metrics and evaluation -----------------------------------------------------------------------------
def test_metrics_match_sklearn():
    from sklearn.metrics import balanced_accuracy_score, top_k_accuracy_score

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(200, 12, generator=g)
    target = torch.randint(0, 10, (200,), generator=g)  # classes 10 and 11 never occur
    target[:60] = logits[:60].argmax(1).clamp(max=9)
    m = classification_metrics(logits, target)
    y, s = target.numpy(), logits.numpy()
    assert m["acc1"] == pytest.approx(float((s.argmax(1) == y).mean()))
    assert m["acc5"] == pytest.approx(top_k_accuracy_score(y, s, k=5, labels=np.arange(12)))
    with pytest.warns(UserWarning):  # sklearn warns about predicted classes absent from y_true
        ref = balanced_accuracy_score(y, s.argmax(1))
    assert m["mean_per_class_recall"] == pytest.approx(ref)


@torch.no_grad()
def test_zero_shot_evaluate_and_openclip_adapter(model, tok, fx):
    torch.manual_seed(0)
    images, target = torch.randn(10, 3, 56, 56), torch.tensor([0, 1, 2, 0, 1, 2, 0, 1, 2, 0])
    classnames = ["dog", "cat", "panda"]
    w = build_zero_shot_classifier(model, tok, classnames, ["a photo of a {c}."])
    loader = [(images[:4], target[:4]), (images[4:], target[4:], [(99, "OSError: broken")])]
    res = zero_shot_evaluate(model, w, loader, mode="InternVL-G")
    logits = 100 * F.normalize(model.encode_image(images, mode="InternVL-G"), dim=-1) @ w
    assert res["acc1"] == pytest.approx((logits.argmax(1) == target).float().mean().item())
    assert res["num_samples"] == 10 and res["num_failed"] == 1 and res["failed"] == [{"path": "99",
                                                                                     "error": "OSError: broken"}]
    assert res["acc5"] is None and "3 classes" in res["acc5_note"]  # top-5 of 3 classes is undefined

    oc, _, preprocess = create_model_and_transforms(fx, mode="InternVL-G")
    assert isinstance(oc, OpenCLIPModel)
    tokenizer = oc_get_tokenizer(fx)
    w_oc = build_zero_shot_classifier(oc, tokenizer, classnames, ["a photo of a {c}."])
    torch.testing.assert_close(w_oc, w, atol=1e-6, rtol=0)
    res_oc = zero_shot_evaluate(oc, w_oc, loader, mode=None)  # open_clip models take no mode
    assert res_oc["acc1"] == res["acc1"]
    img_f, txt_f, scale = oc(images[:2], tokenizer(classnames))
    torch.testing.assert_close(img_f.norm(dim=-1), torch.ones(2))
    torch.testing.assert_close(scale, model.logit_scale.exp())
    from PIL import Image

    assert preprocess(Image.new("RGB", (80, 60))).shape == (3, 56, 56)


# -- CLI ------------------------------------------------------------------------------------------------
def _write_images(root, classes, n=2):
    write_images(root, classes, n, size=(64, 72))


def test_cli_folder_and_csv(fx, tmp_path):
    data = tmp_path / "data"
    _write_images(data, ["n01440764", "n01443537"])  # ImageNet WordNet-id folders: tench, goldfish
    (data / "n01443537" / "broken.jpg").write_text("not an image")
    csv = tmp_path / "labels.csv"
    csv.write_text("path,label\n" + "".join(f"data/{c}/{i}.png,{c}\n" for c in ("n01440764", "n01443537")
                                            for i in range(2)))
    out = tmp_path / "res" / "zs.json"
    cmd = [sys.executable, os.path.join(ROOT, "tools", "zeroshot_eval.py"), "--model", fx, "--data", str(data),
           "--templates", str(tmp_path / "t.txt"), "--output", str(out), "--workers", "0", "--mode", "InternVL-G"]
    (tmp_path / "t.txt").write_text("a photo of a {c}.\nitap of a {c}.\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr
    res = json.loads(out.read_text())
    assert res["num_samples"] == 4 and res["num_failed"] == 1 and res["num_templates"] == 2
    assert 0 <= res["acc1"] <= 1 and res["acc5"] is None and "mean_per_class_recall" in res
    assert [os.path.basename(f["path"]) for f in res["failed"]] == ["broken.jpg"] and "broken.jpg" in r.stderr
    res_csv = tmp_path / "csv.json"
    assert zeroshot_eval.main(cmd[2:5] + [str(csv), "--output", str(res_csv), "--workers", "0", "--mode",
                                          "InternVL-G", "--templates", str(tmp_path / "t.txt")]) == 0
    assert json.loads(res_csv.read_text())["acc1"] == res["acc1"]  # same images, same labels, same classifier
    # without --output the result is printed, and nothing is written (it used to land in ./zeroshot_results.json)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    r = subprocess.run(cmd[:cmd.index("--output")] + cmd[cmd.index("--output") + 2:], capture_output=True,
                       text=True, cwd=str(cwd), env=env)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["acc1"] == res["acc1"] and os.listdir(cwd) == []


def test_cli_errors(fx, tmp_path, capsys):
    data = tmp_path / "data"
    _write_images(data, ["cat", "dog"], n=1)
    out = tmp_path / "x.json"
    rc = zeroshot_eval.main(["--model", fx, "--data", str(data), "--classnames", "imagenet1k", "--output", str(out)])
    assert rc == 2 and "1000 class names given but the data has 2 classes" in capsys.readouterr().err
    rc = zeroshot_eval.main(["--model", fx, "--data", str(tmp_path / "missing"), "--output", str(out)])
    assert rc == 2 and "missing" in capsys.readouterr().err
    assert not out.exists()
