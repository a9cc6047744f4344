"""Zero-shot video classification: frame sampling (spec vectors), decoding only the sampled frames, bad videos
skipped and listed, the video embedding rule, an end-to-end digits task with a known answer, the CLI."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

av = pytest.importorskip("av", reason="PyAV (the 'video' extra) is needed for video decoding")

import zeroshot_eval  # noqa: E402  (tools/, put on sys.path by conftest.py)

from classification import video  # noqa: E402
from classification.video import (  # noqa: E402
    encode_videos,
    load_video_classnames,
    load_video_templates,
    read_video_frames,
    run_video_zero_shot,
    sample_frame_indices,
)

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def write_video(path, frames, codec="ffv1", fps=10):
    """Write RGB uint8 frames (H, W, 3) with PyAV; 'ffv1' (in .mkv: no frame count in the header) and 'png'
    (in .avi: counted in the header) are lossless, 'mpeg4' is lossy."""
    h, w = frames[0].shape[:2]
    with av.open(str(path), "w") as c:
        st = c.add_stream(codec, rate=fps)
        st.width, st.height = w, h
        st.pix_fmt = {"png": "rgb24", "ffv1": "bgr0"}.get(codec, "yuv420p")
        for a in frames:
            for p in st.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(a), format="rgb24")):
                c.mux(p)
        for p in st.encode():
            c.mux(p)
    return str(path)


def gray_frames(n, h=16, w=24):
    return [np.full((h, w, 3), 3 * k, np.uint8) for k in range(n)]


# -- frame sampling ------------------------------------------------------------------------------------------
def test_spec_vectors():
    assert sample_frame_indices(300, 8, fps=30) == [18, 55, 93, 130, 168, 205, 242, 280]
    assert sample_frame_indices(300, 1, fps=30) == [149]
    assert sample_frame_indices(5, 8) == [0, 0, 1, 2, 2, 2, 3, 4]
    assert sample_frame_indices(250, 8, fps=25, bound=(2.0, 6.0)) == [56, 68, 81, 94, 106, 118, 131, 144]
    assert sample_frame_indices(1, 8) == [0] * 8


@pytest.mark.parametrize("args,kwargs,msg", [((0, 8), {}, "num_frames"), ((10, 0), {}, "num_segments"),
                                             ((10, 2), {"bound": (0, 1)}, "fps"),
                                             ((10, 2), {"bound": (5, 1), "fps": 1}, "selects no frame")])
def test_sampling_errors(args, kwargs, msg):
    with pytest.raises(ValueError, match=msg):
        sample_frame_indices(*args, **kwargs)


# -- decoding ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name,codec", [("v.mkv", "ffv1"), ("v.avi", "png")])
@pytest.mark.parametrize("n,segments", [(23, 8), (23, 1), (5, 8), (40, 3)])
def test_decodes_exactly_the_sampled_frames(tmp_path, n, segments, name, codec):
    path = write_video(tmp_path / name, gray_frames(n), codec=codec)
    frames, info = read_video_frames(path, segments)
    assert info["num_frames"] == n
    assert info["indices"] == sample_frame_indices(n, segments)
    assert [int(np.asarray(f)[0, 0, 0]) for f in frames] == [3 * k for k in info["indices"]]
    assert all(f.mode == "RGB" and f.size == (24, 16) for f in frames)


def test_lossy_mp4_and_decoding_stops_after_last_needed_frame(tmp_path):
    path = write_video(tmp_path / "v.mp4", [np.full((48, 64, 3), 10 * k, np.uint8) for k in range(23)],
                       codec="mpeg4")
    frames, info = read_video_frames(path, 8)
    assert info["num_frames"] == 23 and info["fps"] == 10.0
    got = [int(np.asarray(f)[20, 30].mean()) for f in frames]
    assert all(abs(g - 10 * k) <= 8 for g, k in zip(got, info["indices"]))  # mpeg4 is lossy
    keep, decoded = video._decode_frames(path, {2, 5})
    assert sorted(keep) == [2, 5] and decoded == 6  # only the wanted frames kept; nothing decoded after the last


@pytest.fixture
def bad_videos(tmp_path):
    good = write_video(tmp_path / "good.mkv", gray_frames(6))
    corrupt = tmp_path / "corrupt.mp4"
    with open(write_video(tmp_path / "whole.mp4", gray_frames(30), codec="mpeg4"), "rb") as f:
        corrupt.write_bytes(f.read()[:300])  # the header survives, the frames do not
    empty = tmp_path / "empty.mp4"
    empty.write_bytes(b"")
    text = tmp_path / "notes.avi"
    text.write_text("not a video\n")
    return {"good": good, "corrupt": str(corrupt), "empty": str(empty), "text": str(text)}


def test_bad_videos_are_errors_not_crashes(bad_videos):
    to_t = lambda img: torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float()  # noqa: E731
    ds = video.VideoFrameDataset([bad_videos[k] for k in ("good", "corrupt", "empty", "text")], 4, to_t)
    x, i, err = ds[0]
    assert err is None and x.shape == (4, 3, 16, 24)
    for j in (1, 2, 3):
        x, i, err = ds[j]
        assert x is None and i == j and isinstance(err, str) and err


# -- classification ------------------------------------------------------------------------------------------
class DigitOracle(torch.nn.Module):
    """A CLIP-style model whose right answer is known: an image embeds as the one-hot of the digit it shows
    (nearest of the ten exemplars :func:`digit_frame` renders), a text as the one-hot of its digit word."""

    def __init__(self):
        super().__init__()
        from sklearn.datasets import load_digits

        d = load_digits()
        means = np.stack([d.images[np.flatnonzero(d.target == k)[0]] for k in range(10)])
        self.register_buffer("templates", torch.tensor(means, dtype=torch.float32).reshape(10, 64))
        self.scale = torch.nn.Parameter(torch.ones(()))  # gives the model a dtype and a device

    def encode_image(self, x):
        small = F.adaptive_avg_pool2d(x.float().mean(1, keepdim=True), 8).flatten(1)  # (B, 64)
        small = small / small.amax(1, keepdim=True).clamp_min(1e-6) * 16
        dist = torch.cdist(small, self.templates)
        return F.one_hot(dist.argmin(1), 10).float() * self.scale

    def encode_text(self, ids):
        return F.one_hot(ids[:, 0] - 1, 10).float()


def digit_tokenizer(texts):
    ids = []
    for t in texts:
        words = t.replace(".", " ").split()
        ids.append([next(DIGIT_WORDS.index(w) for w in words if w in DIGIT_WORDS) + 1, 0])
    return torch.tensor(ids)


def digit_frame(k, size=64):
    from sklearn.datasets import load_digits

    d = load_digits()
    img = d.images[np.flatnonzero(d.target == k)[0]] / 16.0 * 255
    big = np.kron(img, np.ones((size // 8, size // 8)))
    return np.repeat(big[:, :, None], 3, axis=2).astype(np.uint8)


def to_tensor(img):
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255


def make_digit_videos(root, layout, n_frames=9):
    """One video per digit: ``layout(d, k)`` is the digit shown at frame ``k`` of the video of digit ``d``."""
    for d in range(10):
        os.makedirs(root / DIGIT_WORDS[d], exist_ok=True)
        write_video(root / DIGIT_WORDS[d] / f"clip{d}.mkv", [digit_frame(layout(d, k)) for k in range(n_frames)])
    return root


def test_oracle_recognises_digits():
    m = DigitOracle()
    x = torch.stack([to_tensor(digit_frame(k)) for k in range(10)])
    assert m.encode_image(x).argmax(1).tolist() == list(range(10))


def test_middle_frame_vs_eight_frames(tmp_path):
    """Only the middle frame of 9 shows the label digit: 1 frame is right, 8 frames are wrong (the other 7
    sampled frames show the next digit) — so the sampling rule decides the answer."""
    root = make_digit_videos(tmp_path / "mid", lambda d, k: d if k == 4 else (d + 1) % 10)
    kw = dict(classnames=DIGIT_WORDS, templates=["a video of the digit {c}."], tokenizer=digit_tokenizer,
              transform=to_tensor, num_workers=0, batch_size=3, mode=None)
    one = run_video_zero_shot(DigitOracle(), str(root), num_frames=1, **kw)
    assert one["acc1"] == 1.0 and one["num_samples"] == 10 and one["num_failed"] == 0
    eight = run_video_zero_shot(DigitOracle(), str(root), num_frames=8, **kw)
    assert eight["acc1"] == 0.0 and eight["acc5"] == 1.0 and eight["acc_mean"] == 0.5
    assert sample_frame_indices(9, 8) == [0, 1, 2, 3, 4, 5, 6, 7]


def test_digits_end_to_end_with_bad_and_short_videos(tmp_path, bad_videos):
    # the label digit on 6 of 9 frames; 8 sampled frames (indices 0..7) see it at least 5 times
    root = make_digit_videos(tmp_path / "maj", lambda d, k: d if k % 3 else (d + 3) % 10)
    # a video shorter than N: 3 frames, all showing a seven
    write_video(root / "seven" / "short.mkv", [digit_frame(7)] * 3)
    os.replace(bad_videos["corrupt"], root / "two" / "corrupt.mp4")
    os.replace(bad_videos["empty"], root / "four" / "empty.mp4")
    (root / "four" / "readme.txt").write_text("not a video extension: never listed\n")
    out = tmp_path / "res.json"
    res = run_video_zero_shot(DigitOracle(), str(root), num_frames=8, classnames=DIGIT_WORDS,
                              templates=["a video of the digit {c}.", "{c}"], tokenizer=digit_tokenizer,
                              transform=to_tensor, num_workers=0, batch_size=4, mode=None, output=str(out))
    assert res["acc1"] == 1.0 and res["num_samples"] == 11 and res["num_videos"] == 13
    assert res["num_failed"] == 2
    assert sorted(os.path.basename(f["path"]) for f in res["failed"]) == ["corrupt.mp4", "empty.mp4"]
    assert json.loads(out.read_text())["acc1"] == 1.0
    assert res["frame_combination"].startswith("mean of L2-normalised")


def test_csv_with_kinetics_names(tmp_path):
    for n in "abc":  # one file per row: one file listed with two labels is refused
        write_video(tmp_path / f"{n}.mkv", gray_frames(4))
    (tmp_path / "list.csv").write_text("path,label\na.mkv,air_drumming\nb.mkv,Abseiling\nc.mkv,3\n")
    paths, raw = video.list_labeled_videos(str(tmp_path / "list.csv"))
    assert paths == [str(tmp_path / f"{n}.mkv") for n in "abc"]
    names, labels = video._resolve_video_classnames("kinetics400", raw)
    assert len(names) == 400 and labels == [1, 0, 3]
    with pytest.raises(ValueError, match="'flying a plane'.*match no class name"):
        video._resolve_video_classnames("k400", ["flying a plane"])


def test_encode_videos_rule():
    class Identity(torch.nn.Module):
        def encode_image(self, x):
            return x.flatten(1)

    frames = torch.tensor([[3.0, 4.0], [0.0, 2.0]]).reshape(1, 2, 2, 1, 1)  # one video, two frames, C=2
    v = encode_videos(Identity(), frames)
    want = F.normalize((torch.tensor([0.6, 0.8]) + torch.tensor([0.0, 1.0])) / 2, dim=0)
    assert torch.allclose(v[0], want)


def test_kinetics_metadata():
    for key, n in (("kinetics400", 400), ("kinetics600", 600), ("k700", 700), ("Kinetics-700", 700)):
        names = load_video_classnames(key)
        assert len(names) == n == len(set(names)) and names == sorted(names, key=str.lower)
    k400, k600 = set(load_video_classnames("k400")), set(load_video_classnames("k600"))
    assert len(k400 - k600) == 32  # DeepMind's Kinetics-600 note: 368 of the 400 classes kept unchanged
    templates = load_video_templates("kinetics400")
    assert len(templates) == 28 and all("{c}" in t for t in templates)
    assert templates[:2] == ["a photo of {c}.", "a photo of a person {c}."]
    with pytest.raises(ValueError, match="known: kinetics400"):
        load_video_classnames("ucf101")


# -- CLI with the tiny InternVL fixture -----------------------------------------------------------------------
def test_cli_video_end_to_end(fx, tmp_path, bad_videos, capsys):
    root = tmp_path / "vids"
    for d in range(3):
        os.makedirs(root / DIGIT_WORDS[d])
        write_video(root / DIGIT_WORDS[d] / "a.mkv", [digit_frame(d)] * (4 + d))
    os.replace(bad_videos["corrupt"], root / "one" / "corrupt.mp4")
    out = tmp_path / "res.json"
    rc = zeroshot_eval.main(["--video", "--model", fx, "--data", str(root), "--num-frames", "2",
                             "--templates", "kinetics400",
                             "--output", str(out), "--workers", "0", "--batch-size", "2"])
    assert rc == 0, capsys.readouterr().err
    res = json.loads(out.read_text())
    assert res["num_samples"] == 3 and res["num_failed"] == 1 and res["num_frames"] == 2
    assert {"acc1", "acc5", "acc_mean", "mean_per_class_recall"} <= set(res)
    assert res["num_templates"] == 28 and res["failed"][0]["path"].endswith("corrupt.mp4")


def test_cli_video_errors(fx, tmp_path, capsys):
    out = tmp_path / "res.json"
    rc = zeroshot_eval.main(["--video", "--model", fx, "--data", str(tmp_path / "missing"), "--output", str(out)])
    assert rc == 2 and not out.exists()
    assert capsys.readouterr().err.strip().count("\n") == 0
    (tmp_path / "empty").mkdir()
    rc = zeroshot_eval.main(["--video", "--model", fx, "--data", str(tmp_path / "empty"), "--output", str(out)])
    assert rc == 2 and not out.exists()
