"""Trial 9a: faults a new user met in classification / zero-shot, each refused or warned about, never a
silent wrong number."""
import math
import os

import pytest
import torch

from classification.metrics import Accuracy, mean_per_class_recall
from classification.zero_shot import classification_metrics

NAN, INF = math.nan, math.inf


# --------------------------------------------------------------------------------------------------------------
# 1. metrics refuse NaN / infinite scores, out-of-range and non-integer labels (classification/checks.py)
# --------------------------------------------------------------------------------------------------------------
def _accuracy(samples, topk=(1,)) -> dict:
    m = Accuracy(topk=topk, mean_recall=True)
    m.process(None, [dict(pred_score=torch.tensor(s), gt_label=y) for s, y in samples])
    return m.compute_metrics(m.results)


@pytest.mark.parametrize("score,label,match", [
    ([NAN, 0.2, 0.3], 1, r"sample 0 pred_score: 1 of 3 values \(position 0\) hold NaN"),
    ([0.1, INF, 0.3], 1, r"sample 0 pred_score: .* hold infinity"),
    ([0.1, 0.2, 0.7], 3, r"sample 0 gt_label 3 is outside \[0, 3\)"),
    ([0.1, 0.2, 0.7], -1, r"gt_label -1 is outside \[0, 3\)"),
    ([0.1, 0.8, 0.1], 1.5, r"gt_label 1.5 is not an integer"),
    ([0.1, 0.8, 0.1], torch.tensor(0.5), r"gt_label 0.5 is not an integer"),
    ([0.1, 0.8, 0.1], True, r"gt_label: expected one integer class index"),
])
def test_accuracy_refuses_bad_scores_and_labels(score, label, match):
    with pytest.raises(ValueError, match=match):
        _accuracy([([0.7, 0.2, 0.1], 0), (score, label)][1:])


def test_metric_refusals_are_data_errors_which_train_and_test_report_in_one_line():
    """tools/train.py and tools/test.py turn a DataError met while a loop runs into one 'error:' line; a plain
    ValueError from the metric was a traceback."""
    from internvit.data import DataError

    with pytest.raises(DataError, match="gt_label 1.5 is not an integer"):
        _accuracy([([0.1, 0.8, 0.1], 1.5)])
    with pytest.raises(DataError, match="hold NaN"):
        classification_metrics(torch.tensor([[NAN, 1.0]]), torch.tensor([0]))


def test_nan_scores_are_refused_when_the_metrics_are_computed():
    """A NaN score is refused by compute_metrics: in a runner, its non-finite check (naming the image) runs after
    the evaluator's process and so speaks first."""
    m = Accuracy(topk=(1,))
    m.process(None, [dict(pred_score=torch.tensor([0.7, 0.2, 0.1]), gt_label=0),
                     dict(pred_score=torch.tensor([NAN, 0.2, 0.1]), gt_label=0)])
    with pytest.raises(ValueError, match=r"sample 1 pred_score: 1 of 3 values \(position 0\) hold NaN"):
        m.compute_metrics(m.results)


def test_accuracy_names_the_sample_and_keeps_good_input_working():
    with pytest.raises(ValueError, match="sample 1 gt_label 9"):
        _accuracy([([0.7, 0.2, 0.1], 0), ([0.7, 0.2, 0.1], 9)])
    assert _accuracy([([0.7, 0.2, 0.1], 0), ([0.1, 0.2, 0.7], 2.0)]) == {"top1": 100.0, "mean_recall": 100.0}


@pytest.mark.parametrize("logits,target,match", [
    ([[NAN, 1.0], [0.0, 1.0]], [0, 1], r"scores: 1 of 2 rows \(position 0\) hold NaN"),
    ([[0.0, 1.0], [0.0, -INF]], [0, 1], r"scores: 1 of 2 rows \(position 1\) hold infinity"),
    ([[0.0, 1.0], [0.0, 1.0]], [0, 7], r"labels: 1 of 2 labels \(position 1\) are outside \[0, 2\) \(first: 7"),
    ([[0.0, 1.0], [0.0, 1.0]], [-1, 1], r"outside \[0, 2\) \(first: -1"),
    ([[0.0, 1.0], [0.0, 1.0]], [0.0, 1.5], r"labels: 1 of 2 labels \(position 1\) are not integers \(first: 1.5"),
    ([[0.0, 1.0], [0.0, 1.0]], [0], r"2 score rows but labels of shape \(1,\)"),
])
def test_zero_shot_metrics_refuse_bad_scores_and_labels(logits, target, match):
    with pytest.raises(ValueError, match=match):
        classification_metrics(torch.tensor(logits), torch.tensor(target))


def test_the_probe_preprocessor_refuses_labels_the_loss_would_truncate():
    """The loss took gt_label.long(): a 1.5 trained as class 1."""
    from classification.probes import ClsDataPreprocessor

    pre = ClsDataPreprocessor(num_classes=3)
    batch = {"inputs": torch.zeros(2, 3, 4, 4), "data_samples": {"gt_label": torch.tensor([0.0, 1.5])}}
    with pytest.raises(ValueError, match=r"ClsDataPreprocessor: gt_label: 1 of 2 labels \(position 1\) are not"):
        pre(batch, training=True)
    batch["data_samples"]["gt_label"] = torch.tensor([0, 3])
    with pytest.raises(ValueError, match=r"outside \[0, 3\) \(first: 3"):
        pre(batch)
    batch["data_samples"]["gt_label"] = torch.tensor([0.0, 2.0])
    assert pre(batch)["data_samples"]["gt_label"].tolist() == [0, 2]


def test_mean_per_class_recall_refuses_fractional_and_negative_labels():
    with pytest.raises(ValueError, match="labels: 1 of 2 labels .* not integers"):
        mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0.0, 1.5]))
    with pytest.raises(ValueError, match="negative class index -2 in the labels"):
        mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0, -2]))
    assert mean_per_class_recall(torch.tensor([0, 1]), torch.tensor([0, 0])) == 50.0


class _Pixels(torch.nn.Module):
    """A CLIP-style image tower: the mean colour of the image (3-d embedding)."""

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3)) + torch.tensor([1.0, 2.0, 3.0])


def test_zero_shot_evaluate_refuses_a_fractional_label():
    """The evaluation loop checks the labels the loader gives, before any metric."""
    from classification.zero_shot import zero_shot_evaluate

    model, classifier = _Pixels(), torch.nn.functional.normalize(torch.rand(3, 2), dim=0)
    loader = [(torch.zeros(2, 3, 28, 28), torch.tensor([0.0, 0.5]))]
    with pytest.raises(ValueError, match=r"labels: 1 of 2 labels \(position 1\) are not integers"):
        zero_shot_evaluate(model, classifier, loader, mode=None)
    loader = [(torch.zeros(2, 3, 28, 28), torch.tensor([0, 2]))]
    with pytest.raises(ValueError, match=r"outside \[0, 2\) \(first: 2"):
        zero_shot_evaluate(model, classifier, loader, mode=None)


# --------------------------------------------------------------------------------------------------------------
# 2. list / annotation files: blank lines in positional lists, non-UTF-8, columns by header, conflicting labels
# --------------------------------------------------------------------------------------------------------------
def _images(root, names) -> None:
    from PIL import Image

    for i, n in enumerate(names):
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(root / n)


def _dataset(root, csv_text: str, classes=None, **kw):
    from classification.datasets import ImageFolderDataset

    (root / "ann.csv").write_bytes(csv_text if isinstance(csv_text, bytes) else csv_text.encode())
    return ImageFolderDataset(str(root), ann_file="ann.csv", classes=classes, **kw)


def test_a_blank_line_in_a_class_names_file_is_refused_with_its_line(tmp_path):
    """Skipped, it shifted every later class by one: label 2 meant 'dog' (line 4), not 'bird'."""
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "classes.txt").write_text("cat\n\nbird\ndog\n")
    with pytest.raises(ValueError, match=r"classes.txt:2: blank line in the class names"):
        _dataset(tmp_path, "a.png,0\nb.png,2\n")
    (tmp_path / "classes.txt").write_text("cat\n   \nbird\n")  # white space only is blank too
    with pytest.raises(ValueError, match=r"classes.txt:2: blank line"):
        _dataset(tmp_path, "a.png,0\nb.png,1\n", classes=str(tmp_path / "classes.txt"))
    (tmp_path / "classes.txt").write_text("cat\nbird\n\n\n")  # blank lines at the end shift nothing
    assert _dataset(tmp_path, "a.png,0\nb.png,1\n").classes == ["cat", "bird"]


def test_a_blank_line_in_zero_shot_class_names_or_templates_is_refused(tmp_path):
    from classification.zero_shot import resolve_class_index, resolve_templates

    (tmp_path / "names.txt").write_text("cat\n\ndog\n")
    with pytest.raises(ValueError, match=r"names.txt:2: blank line in the class names"):
        resolve_class_index(str(tmp_path / "names.txt"), ["0", "1"])
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n\nan image of a {c}.\n")
    with pytest.raises(ValueError, match=r"t.txt:2: blank line in the templates"):
        resolve_templates(str(tmp_path / "t.txt"))


@pytest.mark.parametrize("kind", ["classes", "csv", "names"])
def test_a_file_that_is_not_utf8_is_refused_with_its_line(tmp_path, kind):
    from classification.zero_shot import resolve_class_index

    _images(tmp_path, ["a.png", "caf\u00e9.png"])
    latin1 = "caf\u00e9".encode("latin-1")
    if kind == "classes":
        (tmp_path / "classes.txt").write_bytes(b"cat\n" + latin1 + b"\n")
        with pytest.raises(ValueError, match=r"classes.txt:2: not UTF-8 text"):
            _dataset(tmp_path, "a.png,0\n")
    elif kind == "csv":
        with pytest.raises(ValueError, match=r"ann.csv:3: not UTF-8 text"):
            _dataset(tmp_path, b"path,label\na.png,0\n" + latin1 + b".png,1\n")
    else:
        (tmp_path / "names.txt").write_bytes(b"cat\n" + latin1 + b"\n")
        with pytest.raises(ValueError, match=r"names.txt:2: not UTF-8 text"):
            resolve_class_index(str(tmp_path / "names.txt"), ["0", "1"])


@pytest.mark.parametrize("header", ["label,path", "Label, Image", "split,label,filepath", "class,filename"])
def test_csv_columns_are_read_by_header_name(tmp_path, header):
    _images(tmp_path, ["x/a.png", "x/b.png", "x/c.png"])
    cols = [h.strip().lower() for h in header.split(",")]
    rows = [dict(label=y, path=p, image=p, filepath=p, filename=p, split="train", **{"class": y})
            for p, y in (("x/a.png", "cat"), ("x/b.png", "dog"), ("x/c.png", "cat"))]
    text = header + "\n" + "".join(",".join(r[c] for c in cols) + "\n" for r in rows)
    ds = _dataset(tmp_path, text)
    assert ds.classes == ["cat", "dog"]
    assert [(os.path.basename(p), y) for p, y in ds.samples] == [("a.png", 0), ("b.png", 1), ("c.png", 0)]


def test_a_csv_header_naming_two_path_columns_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"ann.csv:1: the header names 2 columns 'path', 'image' for one role"):
        _dataset(tmp_path, "path,image,label\na.png,a.png,0\n")


@pytest.mark.parametrize("second", ["a.png", "./a.png", "sub/../a.png"])
def test_one_image_listed_with_two_labels_is_refused_naming_both_lines(tmp_path, second):
    _images(tmp_path, ["a.png", "b.png", "sub/c.png"])
    with pytest.raises(ValueError, match=r"ann.csv:4: .*a.png is labelled 'dog' here and 'cat' on line 2"):
        _dataset(tmp_path, f"path,label\na.png,cat\nb.png,dog\n{second},dog\n")
    ds = _dataset(tmp_path, f"path,label\na.png,cat\nb.png,dog\n{second},cat\n")  # the same label: one class
    assert ds.labels == [0, 1, 0]


def test_video_csv_reads_columns_by_header_and_refuses_conflicts(tmp_path):
    from classification.video import list_labeled_videos

    for n in ("a.mp4", "b.mp4"):
        (tmp_path / n).write_bytes(b"")
    (tmp_path / "v.csv").write_text("label,video\ncat,a.mp4\ndog,b.mp4\n")
    paths, labels = list_labeled_videos(str(tmp_path / "v.csv"))
    assert [os.path.basename(p) for p in paths] == ["a.mp4", "b.mp4"] and labels == ["cat", "dog"]
    (tmp_path / "v.csv").write_text("path,label\na.mp4,cat\na.mp4,dog\n")
    with pytest.raises(ValueError, match=r"v.csv:3: .*a.mp4 is labelled 'dog' here and 'cat' on line 2"):
        list_labeled_videos(str(tmp_path / "v.csv"))


# --------------------------------------------------------------------------------------------------------------
# 3. a class emptied by unreadable files is named (zero-shot skips unreadable images / videos)
# --------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def fx():
    from tests.conftest import fixture_dir

    return fixture_dir("internvl-cg-tiny")


def test_a_class_whose_every_image_is_unreadable_is_named(fx, tmp_path):
    from classification.zero_shot import run_zero_shot
    from tests.zeroshot.conftest import write_images

    data = write_images(tmp_path / "d", ["cat", "dog", "bird"])
    os.remove(data / "dog" / "0.png")
    for i in range(2):
        (data / "dog" / f"bad{i}.jpg").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match=r"every image of class 'dog' was skipped as unreadable.*2 of 3 listed "
                                         r"classes scored"):
        res = run_zero_shot(fx, str(data), templates=["a photo of a {c}."], num_workers=0)
    assert res["emptied_classes"] == ["dog"] and res["num_failed"] == 2 and res["num_samples"] == 2


def test_a_class_whose_every_video_is_unreadable_is_named(tmp_path):
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
    for d in range(3):
        os.makedirs(root / DIGIT_WORDS[d])
        if d != 1:
            write_video(root / DIGIT_WORDS[d] / "a.mkv", [digit_frame(d)] * 4)
    (root / "one" / "broken.mp4").write_bytes(b"not a video")
    with pytest.warns(UserWarning, match=r"every video of class 'one' was skipped as unreadable"):
        res = video.run_video_zero_shot(DigitOracle(), str(root), num_frames=2, classnames=DIGIT_WORDS[:3],
                                        templates=["{c}"], tokenizer=digit_tokenizer, transform=to_tensor,
                                        num_workers=0, mode=None)
    assert res["emptied_classes"] == ["one"] and res["num_failed"] == 1


# --------------------------------------------------------------------------------------------------------------
# 4-6. zero-shot inputs: one check for images and videos, {0} templates, option names, argument order,
#      --num-frames bound, --output onto an input
# --------------------------------------------------------------------------------------------------------------
def _zeroshot(capsys, *argv):
    from tests.zeroshot.test_trial7b_fixes import _cli  # tools/zeroshot_eval.py main(): (rc, stdout, stderr lines)

    return _cli(capsys, *argv)


@pytest.fixture
def two_classes(tmp_path):
    from tests.zeroshot.conftest import write_images

    return write_images(tmp_path / "d", ["cat", "dog"])


def test_templates_with_a_numbered_placeholder_work_like_the_others(fx, two_classes):
    """'a photo of a {0}.' was refused as having no placeholder; it is str.format's own spelling of '{}'."""
    import json

    from classification.zero_shot import run_zero_shot

    results = [run_zero_shot(fx, str(two_classes), templates=[t], num_workers=0)
               for t in ("a photo of a {0}.", "a photo of a {}.", "a photo of a {c}.")]
    assert len({json.dumps({k: r[k] for k in ("acc1", "mean_per_class_recall")}) for r in results}) == 1


@pytest.mark.parametrize("template,msg", [
    ("a photo", r"template 'a photo' has no '\{c\}' placeholder \(nor '\{\}' or '\{0\}'\)"),
    ("a {1}", r"template 'a \{1\}': unknown field \{1\}"),
    ("a {0} and {1}", r"template 'a \{0\} and \{1\}': unknown field \{1\}"),
    ("a {name}", r"template 'a \{name\}': unknown field \{name\}"),
    ("a {c.upper}", r"unknown field \{c.upper\}"),
    ("{} or {0}", r"template '\{\} or \{0\}': cannot switch"),
])
@pytest.mark.parametrize("video", [False, True])
def test_bad_templates_are_refused_by_the_one_check_for_images_and_videos(fx, two_classes, tmp_path, capsys,
                                                                         template, msg, video):
    (tmp_path / "t.txt").write_text(template + "\n")
    rc, out, err = _zeroshot(capsys, "--model", fx, "--data", two_classes, "--templates", tmp_path / "t.txt",
                             "--workers", "0", *(["--video"] if video else []))
    assert rc == 2 and len(err) == 1 and out == "", err
    assert err[0].startswith(f"error: --templates {tmp_path / 't.txt'}: ") and __import__("re").search(msg, err[0])


def test_video_messages_name_the_option_not_the_keyword(fx, tmp_path, capsys):
    (tmp_path / "v" / "0").mkdir(parents=True)
    (tmp_path / "v" / "0" / "a.mp4").write_bytes(b"")
    rc, _, err = _zeroshot(capsys, "--video", "--model", fx, "--data", tmp_path / "v", "--workers", "0")
    assert rc == 2 and len(err) == 1 and "pass --classnames" in err[0] and "classnames=" not in \
        err[0].replace("(classnames= in Python)", ""), err


@pytest.mark.parametrize("video", [False, True])
def test_the_first_error_is_about_the_first_bad_option_on_the_command_line(fx, two_classes, tmp_path, capsys,
                                                                          video):
    (tmp_path / "t.txt").write_text("a photo\n")
    bad_dataset = ["--dataset", "imagenet_1k"]
    bad_templates = ["--templates", tmp_path / "t.txt"]
    extra = ["--video"] if video else []
    base = ["--model", fx, "--data", two_classes, "--workers", "0", *extra]
    rc, _, err = _zeroshot(capsys, *base, *bad_dataset, *bad_templates)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --dataset imagenet_1k: "), err
    rc, _, err = _zeroshot(capsys, *base, *bad_templates, *bad_dataset)
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: --templates "), err
    # a valid dataset with templates: the conflict is named once both are given
    rc, _, err = _zeroshot(capsys, *base, "--dataset", "kinetics400" if video else "cifar10", "--templates",
                           "imagenet1k" if not video else "kinetics400")
    assert rc == 2 and len(err) == 1 and "only picks the default templates" in err[0], err
    rc, _, err = _zeroshot(capsys, *base, *bad_dataset, "--data", tmp_path / "nope")  # --data given last
    assert rc == 2 and err[0].startswith("error: --dataset imagenet_1k"), err


@pytest.mark.parametrize("n", [1025, 5000, 10**9])
def test_num_frames_above_1024_is_refused_with_the_memory_it_needs(fx, two_classes, capsys, n):
    """Not run on the old code: it started to allocate the frames (about 7.5 GB at 5000)."""
    rc, out, err = _zeroshot(capsys, "--video", "--model", fx, "--data", two_classes, "--num-frames", n,
                             "--batch-size", "2", "--workers", "0")
    assert rc == 2 and len(err) == 1 and out == "", err
    assert err[0].startswith(f"error: --num-frames {n}: {n} frames per video is more than 1024: a batch of 2 "
                             f"videos would hold {2 * n} frames, ") and "GiB as float32 56x56 inputs" in err[0]


def test_num_frames_bound_in_python(fx, two_classes):
    from classification.video import VideoFrameDataset, run_video_zero_shot

    with pytest.raises(ValueError, match=r"num_frames=2000: 2000 frames per video is more than 1024"):
        run_video_zero_shot(fx, str(two_classes), num_frames=2000, num_workers=0)
    with pytest.raises(ValueError, match="num_frames must be between 1 and 1024, got 1025"):
        VideoFrameDataset([], 1025, lambda x: x)
    assert len(VideoFrameDataset([], 1024, lambda x: x)) == 0


@pytest.mark.parametrize("which", ["classnames", "templates", "csv", "classes_beside_csv", "model_config"])
def test_output_onto_an_input_is_refused_before_anything_is_written(fx, tmp_path, capsys, which):
    import shutil

    from tests.zeroshot.conftest import write_images

    write_images(tmp_path, ["cat", "dog"])
    (tmp_path / "names.txt").write_text("cat\ndog\n")
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    (tmp_path / "list.csv").write_text("path,label\ncat/0.png,cat\ndog/0.png,dog\n")
    (tmp_path / "classes.txt").write_text("cat\ndog\n")
    model = tmp_path / "model"
    shutil.copytree(fx, model)
    target = {"classnames": "names.txt", "templates": "t.txt", "csv": "list.csv",
              "classes_beside_csv": "classes.txt", "model_config": "model/config.json"}[which]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    rc, out, err = _zeroshot(capsys, "--model", model, "--data", tmp_path / "list.csv", "--classnames",
                             tmp_path / "names.txt", "--templates", tmp_path / "t.txt", "--workers", "0",
                             "--output", tmp_path / target, "--overwrite")
    assert rc == 2 and len(err) == 1 and out == "", err
    assert err[0].startswith(f"error: --output {tmp_path / target}: is ") and "the result would overwrite it" in err[0]
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before


def test_output_onto_an_input_is_refused_in_python_too(fx, two_classes, tmp_path):
    from classification.zero_shot import run_zero_shot

    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    with pytest.raises(ValueError, match=r"t.txt: is the templates input"):
        run_zero_shot(fx, str(two_classes), templates=str(tmp_path / "t.txt"), output=str(tmp_path / "t.txt"),
                      num_workers=0)
    assert (tmp_path / "t.txt").read_text() == "a photo of a {c}.\n"


# --------------------------------------------------------------------------------------------------------------
# 7. a probe model and a dataset of the other kind of input (images vs cached features): a set-up error
# --------------------------------------------------------------------------------------------------------------
def test_from_features_with_an_image_dataset_is_a_set_up_error(toy_digits, tmp_path):
    """It crashed in the head's first forward ('expected (B, N, 64) tokens ... got (64, 3, 56, 56)')."""
    from internvit.runner import build_train_runner

    from .conftest import TOY_CONFIGS

    roots = {f"{s}_dataloader.dataset.data_root": toy_digits for s in ("train", "val", "test")}
    with pytest.raises(ValueError, match=r"train_dataloader: model.from_features=True takes cached backbone "
                                         r"features, but its dataset \(ImageFolderDataset\) gives images"):
        build_train_runner(os.path.join(TOY_CONFIGS, "digits_linear_probe.py"), work_dir=str(tmp_path / "w"),
                           cfg_options={"model.from_features": True, **roots})
    assert not (tmp_path / "w").exists()


def test_cached_features_for_a_model_that_runs_its_backbone_is_a_set_up_error(toy_digits, tmp_path):
    from internvit.runner import build_train_runner

    from .conftest import TOY_CONFIGS

    opts = {"model.from_features": False}
    for s in ("train", "val"):
        opts[f"{s}_dataloader.dataset.dataset.data_root"] = toy_digits
        opts[f"{s}_dataloader.dataset.cache_dir"] = str(tmp_path / "cache" / s)
    with pytest.raises(ValueError, match=r"train_dataloader: its dataset \(CachedFeatureDataset\) gives cached "
                                         r"backbone features, but model.from_features=False"):
        build_train_runner(os.path.join(TOY_CONFIGS, "digits_linear_probe_cached.py"), work_dir=str(tmp_path / "w"),
                           cfg_options=opts)


# --------------------------------------------------------------------------------------------------------------
# 8. a failed re-extraction of a feature cache leaves the previous valid cache in place
# --------------------------------------------------------------------------------------------------------------
def test_a_failed_re_extraction_keeps_the_valid_cache(toy_digits, tmp_path):
    """The re-extraction committed a manifest with the unreadable image counted, then raised: the valid cache of
    the earlier images was gone (reverting the data re-extracted everything) and the folder held a failed one."""
    import shutil

    import numpy as np

    from classification import CachedFeatureDataset, ImageFolderDataset
    from classification.feature_cache import CACHE_KEY
    from internvit.data import DataError
    from internvit.store import read_manifest

    from .conftest import toy_config

    data = tmp_path / "data"
    for c in ("0", "1"):
        shutil.copytree(os.path.join(toy_digits, "val", c), data / c)
    backbone = toy_config("digits_linear_probe.py", toy_digits, str(tmp_path)).backbone.to_dict()
    cache = str(tmp_path / "cache")

    def build():
        images = ImageFolderDataset(str(data), transform=dict(image_size=56))
        return CachedFeatureDataset(images, backbone, cache, progress=False)

    good = build()
    before = np.asarray(good.features).copy()
    key = read_manifest(cache)[CACHE_KEY]
    (data / "1" / "zz_corrupt.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="zz_corrupt.png"):
        build()
    assert read_manifest(cache)[CACHE_KEY] == key  # still the valid cache of the earlier images
    assert sorted(os.listdir(tmp_path)) == ["cache", "data"]  # nothing left beside it
    os.remove(data / "1" / "zz_corrupt.png")
    again = build()
    assert not again.extracted and np.array_equal(np.asarray(again.features), before)


def test_a_linked_cache_is_replaced_where_it_lies(toy_digits, tmp_path):
    """A cache folder that is a link (to another disk) is re-extracted there; the link stays a link."""
    import shutil

    from classification import CachedFeatureDataset, ImageFolderDataset
    from internvit.store import read_manifest

    from .conftest import toy_config

    data = tmp_path / "data"
    shutil.copytree(os.path.join(toy_digits, "val", "0"), data / "0")
    shutil.copytree(os.path.join(toy_digits, "val", "1"), data / "1")
    backbone = toy_config("digits_linear_probe.py", toy_digits, str(tmp_path)).backbone.to_dict()
    (tmp_path / "disk" / "cache").mkdir(parents=True)
    os.symlink(tmp_path / "disk" / "cache", tmp_path / "cache")
    images = ImageFolderDataset(str(data), transform=dict(image_size=56))
    CachedFeatureDataset(images, backbone, str(tmp_path / "cache"), progress=False)
    again = CachedFeatureDataset(images, dict(backbone, init_seed=3), str(tmp_path / "cache"), progress=False)
    assert again.extracted and os.path.islink(tmp_path / "cache")
    assert read_manifest(str(tmp_path / "disk" / "cache"))["probe_cache"]["backbone"]["init_seed"] == 3

