"""Zero-shot never passes a silent wrong result on: non-finite embeddings are refused, class names that collide
are refused (or, for the shipped upstream lists, warned about), skipped files are named, images are not videos,
top-5 below 5 classes is not reported as 1.0, unused or unknown options and existing outputs are refused."""
import json
import os
import shutil
import subprocess
import sys
import unicodedata

import pytest
import torch
import zeroshot_eval  # noqa: E402  (tools/, put on sys.path by conftest.py)
from PIL import Image

import internvit
from classification.zero_shot import (
    build_zero_shot_classifier,
    classification_metrics,
    match_classes,
    resolve_class_index,
    run_zero_shot,
)

from .conftest import ROOT, write_images  # noqa: E402


@pytest.fixture(scope="module")
def nan_model(fx, tmp_path_factory):
    """The fixture with one vision weight set to NaN: every image embedding is NaN, text embeddings are fine."""
    model = internvit.load_model(fx)
    with torch.no_grad():
        model.vision_model.embeddings.class_embedding.view(-1)[0] = float("nan")
    out = str(tmp_path_factory.mktemp("nan") / "model")
    internvit.save_model(model, out)
    for name in ("tokenizer.model", "tokenizer_config.json"):
        shutil.copy(os.path.join(fx, name), out)
    return out




def cli(capsys, *argv):
    try:
        rc = zeroshot_eval.main([str(a) for a in argv])
    except SystemExit as e:  # argparse's errors
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


# -- 1, 10: non-finite embeddings ------------------------------------------------------------------------------
def test_nan_image_embeddings_are_refused_in_one_line(nan_model, tmp_path):
    data = write_images(tmp_path / "d", ["cat", "dog", "bird"])
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    out = tmp_path / "res.json"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "zeroshot_eval.py"), "--model", nan_model,
                        "--data", str(data), "--templates", str(tmp_path / "t.txt"), "--workers", "0",
                        "--output", str(out)], capture_output=True, text=True, cwd=str(tmp_path),
                       env=dict(os.environ, OMP_NUM_THREADS="1"))
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert r.returncode == 2 and r.stdout == "" and len(lines) == 1, r.stderr
    assert lines[0].startswith("error: 3 of 3 images gave non-finite embeddings") and "bird" in lines[0]
    assert not out.exists()


def test_nan_text_embeddings_name_the_classes(fx):
    model, tok = internvit.load_model(fx).eval(), internvit.get_tokenizer(fx)
    with torch.no_grad():
        dog, zebra = (set(tok([f"a photo of a {c}."])[0].tolist()) for c in ("dog", "zebra"))
        model.qllama.model.embed_tokens.weight[sorted(zebra - dog)] = float("nan")  # the tokens only 'zebra' has
    with pytest.raises(ValueError, match=r"text embeddings of 1 of 2 class names are not finite.*'zebra'"):
        build_zero_shot_classifier(model, tok, ["dog", "zebra"], ["a photo of a {c}."])


def test_nan_video_embeddings_are_refused(nan_model, tmp_path, capsys):
    pytest.importorskip("av")
    from tests.zeroshot.test_video import DIGIT_WORDS, digit_frame, write_video

    for d in range(2):
        os.makedirs(tmp_path / "v" / DIGIT_WORDS[d])
        write_video(tmp_path / "v" / DIGIT_WORDS[d] / "a.mkv", [digit_frame(d)] * 3)
    rc, out, err = cli(capsys, "--video", "--model", nan_model, "--data", tmp_path / "v", "--num-frames", "2",
                       "--templates", "kinetics400", "--workers", "0")
    assert rc == 2 and out == "" and len(err) == 1, err
    assert err[0].startswith("error: 2 of 2 videos gave non-finite embeddings")


# -- 2, 3: class names that collide ----------------------------------------------------------------------------
def test_folders_that_normalise_to_one_name_are_refused(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["ice cream", "ice_cream", "cake"])
    rc, out, err = cli(capsys, "--model", fx, "--data", data, "--workers", "0", "--templates", "imagenet1k")
    assert rc == 2 and len(err) == 1, err
    assert "duplicate class names: 'ice cream' (position 1) and 'ice_cream' (position 2)" in err[0]


@pytest.mark.parametrize("layout", ["csv", "folders"])
def test_number_classes_without_classnames_are_refused(fx, tmp_path, capsys, layout):
    """Index labels (a CSV of ``path,3``) or number folders (``000/``, ``001/``) without ``--classnames`` were
    scored with prompts such as 'a photo of 3.' and reported as an accuracy; they name nothing, so they are
    refused. With names given they are indices (the fourth name for ``3``)."""
    if layout == "csv":
        write_images(tmp_path / "imgs", ["a"], n=3)
        data = tmp_path / "d.csv"
        data.write_text("".join(f"imgs/a/{i}.png,{label}\n" for i, label in enumerate((3, 1, 0))))
    else:
        data = write_images(tmp_path / "d", ["000", "001", "002"])
    rc, out, err = cli(capsys, "--model", fx, "--data", data, "--workers", "0", "--templates", "imagenet1k")
    assert rc == 2 and len(err) == 1, err
    assert "the data's classes are numbers ('0', '1', '2', ...:" in err[0] or "('000', '001', '002':" in err[0]
    assert "pass --classnames" in err[0]
    if layout == "folders":  # one number among names, or a float label: the same
        write_images(tmp_path / "d2", ["7", "dog", "n02084071"])
        rc, out, err = cli(capsys, "--model", fx, "--data", tmp_path / "d2", "--workers", "0", "--templates",
                           "imagenet1k")
        assert rc == 2 and "the data's classes are numbers (1 of 3) ('7':" in err[0], err
    else:
        (tmp_path / "f.csv").write_text("imgs/a/0.png,3.0\nimgs/a/1.png,1.0\n")
        rc, out, err = cli(capsys, "--model", fx, "--data", tmp_path / "f.csv", "--workers", "0", "--templates",
                           "imagenet1k")
        assert rc == 2 and "the data's classes are numbers ('1.0', '3.0':" in err[0], err
    assert "pass --classnames" in err[0]
    (tmp_path / "names.txt").write_text("red\ngreen\nblue\nyellow\n")
    rc, out, err = cli(capsys, "--model", fx, "--data", data, "--workers", "0", "--templates", "imagenet1k",
                       "--classnames", tmp_path / "names.txt")
    assert rc == 0, err


def test_an_index_label_beyond_the_class_names_names_the_index(fx, tmp_path, capsys):
    """One row labelled 10 with 6 names said 'the data has 11 classes, and 11 of them ... match no class name'."""
    write_images(tmp_path / "imgs", ["a"])
    (tmp_path / "d.csv").write_text("imgs/a/0.png,10\n")
    (tmp_path / "names.json").write_text('["black", "blue", "green", "red", "white", "yellow"]')
    rc, out, err = cli(capsys, "--model", fx, "--data", tmp_path / "d.csv", "--workers", "0", "--templates",
                       "imagenet1k", "--classnames", tmp_path / "names.json")
    assert rc == 2 and len(err) == 1, err
    assert "labels are class indices up to 10, but 6 class names are given (indices 0..5)" in err[0]


def test_a_repeated_name_in_your_list_says_duplicate(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["a", "b"])
    (tmp_path / "names.txt").write_text("a\na\nb\n")
    rc, out, err = cli(capsys, "--model", fx, "--data", data, "--workers", "0", "--classnames",
                       tmp_path / "names.txt", "--templates", "imagenet1k")
    assert rc == 2 and len(err) == 1 and "duplicate class names: 'a' (position 0) and 'a' (position 1)" in err[0]


def test_nfc_and_nfd_names_are_one_name_and_shown_apart():
    nfc, nfd = unicodedata.normalize("NFC", "café"), unicodedata.normalize("NFD", "café")
    assert nfc != nfd
    with pytest.raises(ValueError, match=r"'café' \(position 0\) and 'cafe\\u0301' \(position 1\)"):
        resolve_class_index([nfc, nfd, "tea"], ["0", "1", "2"])
    with pytest.raises(ValueError, match="duplicate class names"):
        resolve_class_index(None, [nfc, nfd])  # folders from two file systems
    assert match_classes([nfc, "tea"], ["tea", nfd]) == [1, 0]  # an NFD folder matches an NFC name
    names, _ = resolve_class_index(None, [nfd, "tea"])
    assert names[0] == nfc  # the prompt gets the NFC spelling


@pytest.mark.parametrize("lang,dups,classes", [("en", 2, 4), ("zh", 1, 2), ("ja", 9, 18), ("ar", 4, 8),
                                               ("it", 19, 39)])
def test_shipped_duplicates_are_warned(lang, dups, classes):
    with pytest.warns(UserWarning, match=rf"imagenet1k' \({lang}\).*: {dups} names? appears? more than once "
                                         rf"\({classes} classes"):
        names, index = resolve_class_index("imagenet1k", [str(i) for i in range(1000)], lang)
    assert len(names) == 1000 and index == list(range(1000))  # kept unchanged (parity with upstream numbers)


def test_shipped_empty_name_is_warned():
    with pytest.warns(UserWarning, match=r"'clevr_closest_object_distance' \(en\).*empty class name at index 3"):
        resolve_class_index("clevr_closest_object_distance", [str(i) for i in range(6)])


def test_wordnet_folders_with_a_duplicate_name_warn(tmp_path):
    # ImageNet-1k's two 'sunglasses' classes (n04355933 and n04356056) as folders: names looked up, then warned
    with pytest.warns(UserWarning, match="1 name appears more than once"):
        resolve_class_index(None, ["n04355933", "n04356056"])


# -- 4: skipped images are named -------------------------------------------------------------------------------
def test_skipped_images_are_named_and_listed(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    for i in range(12):
        (data / "dog" / f"bad{i:02d}.jpg").write_bytes(b"not an image")
    os.symlink(data / "nowhere.png", data / "cat" / "dangling.png")
    out = tmp_path / "res.json"
    rc, stdout, err = cli(capsys, "--model", fx, "--data", data, "--workers", "0", "--templates", "imagenet1k",
                          "--output", out)
    assert rc == 0, err
    res = json.loads(out.read_text())
    assert res["num_failed"] == 13 == len(res["failed"]) and res["num_samples"] == 2
    assert {os.path.basename(f["path"]) for f in res["failed"]} == {"dangling.png"} | {f"bad{i:02d}.jpg"
                                                                                     for i in range(12)}
    assert all(f["error"] for f in res["failed"])
    skipped = [line for line in err if line.startswith("skipped ")]
    assert len(skipped) == 11 and skipped[-1].startswith("skipped 3 more images") and "dangling.png" in err[0]
    assert "failed" not in json.loads(stdout)


# -- 5: images are not videos; short videos are counted --------------------------------------------------------
def test_images_named_as_videos_are_skipped(tmp_path, capsys, fx):
    pytest.importorskip("av")
    from classification import video
    from tests.zeroshot.test_video import (
        DIGIT_WORDS,
        DigitOracle,
        digit_frame,
        digit_tokenizer,
        to_tensor,
        write_video,
    )

    root = tmp_path / "v"
    for d in range(5):
        os.makedirs(root / DIGIT_WORDS[d])
        write_video(root / DIGIT_WORDS[d] / "a.mkv", [digit_frame(d)] * 4)
    Image.fromarray(digit_frame(1)).save(root / "one" / "png.mp4", format="PNG")
    Image.fromarray(digit_frame(2)).save(root / "two" / "jpeg.mp4", format="JPEG")
    Image.fromarray(digit_frame(3)).save(root / "three" / "still.gif")
    frames = [digit_frame(4) for _ in range(3)]
    for k, f in enumerate(frames):
        f[0, 0] = 10 * k  # distinct frames (PIL merges identical ones)
    frames = [Image.fromarray(f) for f in frames]
    frames[0].save(root / "four" / "moving.gif", save_all=True, append_images=frames[1:], duration=100)
    write_video(root / "zero" / "short.mkv", [digit_frame(0)] * 2)
    res = video.run_video_zero_shot(DigitOracle(), str(root), num_frames=3, classnames=DIGIT_WORDS[:5],
                                    templates=["{c}"], tokenizer=digit_tokenizer, transform=to_tensor,
                                    num_workers=0, mode=None)
    failed = {os.path.basename(f["path"]): f["error"] for f in res["failed"]}
    assert set(failed) == {"png.mp4", "jpeg.mp4", "still.gif"}, failed
    assert "an image, not a video" in failed["png.mp4"] and "pipe" in failed["png.mp4"]
    assert "an image, not a video" in failed["jpeg.mp4"] and "a still image" in failed["still.gif"]
    assert res["num_samples"] == 7 and res["acc1"] == 1.0  # the animated GIF is a video
    assert res["num_short_videos"] == 1  # short.mkv: 2 frames for 3 samples (frames repeat)


def test_cli_says_when_videos_are_padded(fx, tmp_path, capsys):
    pytest.importorskip("av")
    from tests.zeroshot.test_video import DIGIT_WORDS, digit_frame, write_video

    for d, n in ((0, 2), (1, 5)):
        os.makedirs(tmp_path / "v" / DIGIT_WORDS[d])
        write_video(tmp_path / "v" / DIGIT_WORDS[d] / "a.mkv", [digit_frame(d)] * n)
    out = tmp_path / "res.json"
    rc, stdout, err = cli(capsys, "--video", "--model", fx, "--data", tmp_path / "v", "--num-frames", "4",
                          "--templates", "kinetics400", "--workers", "0", "--output", out)
    assert rc == 0, err
    assert json.loads(out.read_text())["num_short_videos"] == 1
    assert err == ["1 of 2 videos have fewer than 4 frames: their sampled frames repeat"]


# -- 6: unknown or unused options ------------------------------------------------------------------------------
@pytest.mark.parametrize("extra,msg", [
    (["--lang", "xx"], "--lang xx: unknown language; known: en, zh, ja, ar, it"),
    (["--lang", "zh"], "'zh' is not used"),  # templates from a file, class names from the folders
    (["--dataset", "imagenet_1k"], "unknown dataset 'imagenet_1k' (did you mean imagenet1k"),
    (["--dataset", "imagenet1k"], "--dataset imagenet1k: only picks the default templates"),
])
def test_unknown_or_unused_options_are_refused(fx, tmp_path, capsys, extra, msg):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    rc, out, err = cli(capsys, "--model", fx, "--data", data, "--templates", tmp_path / "t.txt", "--workers",
                       "0", *extra)
    assert rc == 2 and len(err) == 1 and msg in err[0], err


def test_used_lang_is_recorded(fx, tmp_path):
    data = write_images(tmp_path / "d", ["n01440764", "n01443537"])  # WordNet ids: names looked up in 'zh'
    res = run_zero_shot(fx, str(data), templates=["a photo of a {c}."], lang="cn", num_workers=0)
    assert res["lang"] == "zh"
    res = run_zero_shot(fx, str(data), templates=["a photo of a {c}."], classnames=["tench", "goldfish"],
                        num_workers=0)
    assert res["lang"] is None  # nothing shipped was used: no language is claimed


# -- 7: an existing --output needs --overwrite -----------------------------------------------------------------
def test_existing_result_needs_overwrite(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    out = tmp_path / "res.json"
    old = {"acc1": 0.9, "acc5": 1.0, "num_samples": 10, "model": "other"}
    out.write_text(json.dumps(old))
    args = ["--model", fx, "--data", data, "--templates", "imagenet1k", "--workers", "0", "--output", out]
    rc, _, err = cli(capsys, *args)
    assert rc == 2 and len(err) == 1 and "exists and holds a zero-shot result" in err[0] and "--overwrite" in err[0]
    assert json.loads(out.read_text()) == old
    rc, _, err = cli(capsys, *args, "--overwrite")
    assert rc == 0 and json.loads(out.read_text())["num_samples"] == 2


# -- 8: top-5 of 5 classes or fewer ----------------------------------------------------------------------------
def test_top5_is_undefined_with_5_classes_or_fewer():
    logits, target = torch.tensor([[3.0, 2.0, 1.0], [1.0, 2.0, 3.0]]), torch.tensor([2, 0])
    m = classification_metrics(logits, target)
    assert m["acc1"] == 0.0 and m["acc5"] is None and "3 classes" in m["acc5_note"]
    m = classification_metrics(torch.eye(5)[[4, 0]], torch.tensor([4, 1]))  # 5 classes: every image is a hit
    assert m["acc5"] is None and "5 classes" in m["acc5_note"]
    logits = torch.tensor([[6.0, 5, 4, 3, 2, 1], [6.0, 5, 4, 3, 2, 1]])
    m = classification_metrics(logits, torch.tensor([4, 5]))  # 6 classes: top-5 holds class 4, not class 5
    assert m["acc5"] == 0.5 and "acc5_note" not in m


# -- 9: wording for a model without text tower or tokenizer ----------------------------------------------------
def test_vision_only_model_and_missing_tokenizer(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    rc, _, err = cli(capsys, "--model", "internvit-6b-tiny", "--data", data, "--templates", "imagenet1k",
                     "--workers", "0")
    assert rc == 2 and len(err) == 1 and "has no text tower" in err[0], err
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(os.path.join(fx, name), bare)
    rc, _, err = cli(capsys, "--model", bare, "--data", data, "--templates", "imagenet1k", "--workers", "0")
    assert rc == 2 and len(err) == 1 and "give --tokenizer" in err[0] and "tokenizer=" not in err[0].split(
        "(")[0], err
    rc, _, err = cli(capsys, "--model", bare, "--tokenizer", fx, "--data", data, "--templates", "imagenet1k",
                     "--workers", "0")
    assert rc == 0, err


def test_a_classifier_with_nan_weights_is_refused():
    """A hand-made classifier (D, C) with NaN in some class columns is refused naming them, never scored."""
    from classification.zero_shot import check_finite_classifier

    w = torch.randn(8, 4)
    check_finite_classifier(w)
    w[3, 2] = float("nan")
    w[0, 3] = float("inf")
    with pytest.raises(ValueError, match=r"non-finite \(NaN or infinity\) weights in 2 of 4 classes "
                                         r"\(first: class 2\)"):
        check_finite_classifier(w)
