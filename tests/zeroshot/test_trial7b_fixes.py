"""Findings of newcomer trial 7b (zero-shot): a template that never inserts the class name ('{{c}}'), a byte-order
mark or blanks in a user's list file, the video stream that is a cover picture, rows naming missing files, class
folders without images, accuracies printed as float32 fractions."""
import json
import os

import numpy as np
import pytest
import zeroshot_eval  # noqa: E402  (tools/, put on sys.path by conftest.py)

from classification.video import read_video_frames
from classification.zero_shot import classification_metrics, resolve_class_index, resolve_templates

from .conftest import write_images


def _cli(capsys, *argv):
    try:
        rc = zeroshot_eval.main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    captured = capsys.readouterr()
    return rc, captured.out, [line for line in captured.err.splitlines() if line.strip()]


# ------------------------------------------------------------------------------------------------ A1
@pytest.mark.parametrize("templates", [["a photo of a {{c}}."], ["a photo of a {c}.", "{{c}} is shown"],
                                       [lambda c: "a photo"]])
def test_a_template_that_gives_one_prompt_for_every_class_is_refused(templates):
    with pytest.raises(ValueError, match="does not put the class name in the prompt"):
        resolve_templates(templates)


def test_templates_that_insert_the_name_are_kept():
    kept = [" {c} and {{c}}", "{}", "itap of a {c}.", lambda c: f"a photo of {c.upper()}"]
    assert resolve_templates(kept) == kept


def test_cli_refuses_an_escaped_placeholder(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    (tmp_path / "t.txt").write_text("a photo of a {{c}}.\n")
    rc, out, err = _cli(capsys, "--model", fx, "--data", data, "--templates", tmp_path / "t.txt", "--workers", "0")
    assert rc == 2 and len(err) == 1 and err[0].startswith("error: ") and "{{c}}" in err[0], err
    assert out == ""


# ------------------------------------------------------------------------------------------------ A2
def test_a_byte_order_mark_and_blanks_are_not_part_of_list_entries(tmp_path):
    (tmp_path / "names.txt").write_bytes("\ufeffbird\r\n  car \r\ncat\r\n".encode())
    (tmp_path / "t.txt").write_bytes("\ufeffa photo of a {c}.\n an image of {c} \n".encode())
    names, index = resolve_class_index(str(tmp_path / "names.txt"), ["cat", "bird", "car"])
    assert names == ["bird", "car", "cat"] and index == [2, 0, 1]  # matched by name, not by position
    assert resolve_templates(str(tmp_path / "t.txt")) == ["a photo of a {c}.", "an image of {c}"]


def test_cli_results_do_not_change_with_a_byte_order_mark(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["bird", "car", "cat", "dog", "house", "tree"], n=2)
    (tmp_path / "t.txt").write_text("a photo of a {c}.\n")
    (tmp_path / "t_bom.txt").write_bytes("\ufeffa photo of a {c}.\n".encode())
    (tmp_path / "n.txt").write_text("bird\ncar\ncat\ndog\nhouse\ntree\n")
    (tmp_path / "n_bom.txt").write_bytes("\ufeffbird\ncar\ncat\ndog\nhouse\ntree\n".encode())
    results = []
    for names, templates in (("n.txt", "t.txt"), ("n_bom.txt", "t.txt"), ("n.txt", "t_bom.txt")):
        out = tmp_path / f"{names}-{templates}.json"
        rc, _, err = _cli(capsys, "--model", fx, "--data", data, "--classnames", tmp_path / names, "--templates",
                          tmp_path / templates, "--workers", "0", "--output", out)
        assert rc == 0, err
        res = json.loads(out.read_text())
        results.append((res["acc1"], res["acc5"], res["mean_per_class_recall"]))
    assert results[0] == results[1] == results[2], results


# ------------------------------------------------------------------------------------------------ A3
def test_video_is_read_from_the_video_stream_not_a_cover_picture(tmp_path):
    import av

    path = str(tmp_path / "thumb_first.mkv")
    with av.open(path, "w") as c:
        cover = c.add_stream("mjpeg", rate=1)
        cover.width, cover.height, cover.pix_fmt = 32, 24, "yuvj420p"
        s = c.add_stream("ffv1", rate=10)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for pk in cover.encode(av.VideoFrame.from_ndarray(np.full((24, 32, 3), 200, np.uint8), format="rgb24")):
            c.mux(pk)
        c.mux(cover.encode())
        for i in range(30):
            c.mux(s.encode(av.VideoFrame.from_ndarray(np.full((48, 64, 3), i * 8, np.uint8), format="rgb24")))
        c.mux(s.encode())
    frames, info = read_video_frames(path, 8)
    assert info["num_frames"] == 30 and frames[0].size == (64, 48), info
    assert len(set(info["indices"])) == 8


# ------------------------------------------------------------------------------------------------ C2, C3
def test_csv_rows_naming_missing_files_are_refused(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog"])
    csv = tmp_path / "l.csv"
    csv.write_text(f"{data}/cat/0.png,cat\n{data}/dog/0.png,dog\n{data}/dog/typo.png,dog\n")
    rc, out, err = _cli(capsys, "--model", fx, "--data", csv, "--templates", "imagenet1k", "--workers", "0")
    assert rc == 2 and len(err) == 1 and "1 listed image not found" in err[0] and "typo.png" in err[0], err


def test_video_csv_rows_naming_missing_files_are_refused(fx, tmp_path, capsys):
    csv = tmp_path / "v.csv"
    csv.write_text("path,label\nnowhere/a.mp4,abseiling\n")
    rc, out, err = _cli(capsys, "--video", "--model", fx, "--data", csv, "--classnames", "kinetics400",
                        "--workers", "0")
    assert rc == 2 and len(err) == 1 and "listed video not found" in err[0], err


def test_an_empty_class_folder_is_a_candidate_with_a_warning(fx, tmp_path, capsys):
    data = write_images(tmp_path / "d", ["cat", "dog", "bird"])
    os.makedirs(data / "zebra")
    out = tmp_path / "r.json"
    with pytest.warns(UserWarning) as caught:
        rc, _, err = _cli(capsys, "--model", fx, "--data", data, "--templates", "imagenet1k", "--workers", "0",
                          "--output", out)
    assert rc == 0 and json.loads(out.read_text())["num_classes"] == 4, err
    warned = [str(w.message) for w in caught if "zebra" in str(w.message)]
    assert len(warned) == 1 and "no images of class 'zebra'" in warned[0], warned
    assert "left out of mean_per_class_recall (3 of 4 classes have images)" in warned[0]


# ------------------------------------------------------------------------------------------------ C4
def test_accuracies_are_exact_fractions():
    import torch

    target = torch.tensor([0] * 2 + [1] * 21)
    logits = torch.zeros(23, 7)
    logits[:, 0] = 1.0  # class 0 predicted for every image: 2 of 23 right
    m = classification_metrics(logits, target)
    assert m["acc1"] == 2 / 23 and m["mean_per_class_recall"] == 0.5, m
