"""Zero-shot video classification with InternVL-C/G (or any CLIP-style model), e.g. Kinetics-400/600/700.

The InternVL repository has no video evaluation (reference-spec-2 §3), so the protocol is defined here:

1. **Frames.** ``num_frames`` frame indices by InternVL-Chat's segment-midpoint rule (``get_index``,
   reference-spec-2 §1.9): the span ``[0, last frame]`` is cut into ``num_frames`` equal segments and the frame
   nearest each segment's centre is taken; ``num_frames=1`` takes the middle frame, a video shorter than
   ``num_frames`` frames repeats frames. Only those frames are decoded into images (PyAV; frames before the
   last sampled one are decoded and dropped one by one), so a batch of long videos never holds more than
   ``batch_size × num_frames`` frames.
2. **Frame embeddings.** Each frame gets the image preprocessing of zero-shot classification (short-side resize
   + centre crop; ``resize_mode='squash'`` to squash) and the model's image path (``encode_image``, with
   ``mode`` for InternVL-C/G).
3. **Video embedding.** Each frame embedding is L2-normalised, the ``num_frames`` of a video are averaged and
   the mean is L2-normalised again.
4. **Scores.** ``100 · video @ classifier`` with the text classifier of
   :func:`classification.zero_shot.build_zero_shot_classifier` (templates averaged per class). Reported: top-1
   (``acc1``), top-5 (``acc5``), their mean (``acc_mean``, the Kinetics convention of EVA-CLIP/CLIP) and the
   mean per-class recall, all fractions in [0, 1].

Videos that cannot be opened or decoded, or hold no frame, are skipped, counted (``num_failed``) and listed
(``failed``: path and error); so are images under a video name (a file FFmpeg reads with an image demuxer, such
as PNG bytes named ``.mp4``, or a GIF / APNG of one frame). Videos with fewer frames than ``num_frames`` (whose
sampled frames repeat) are counted in ``num_short_videos``. Non-finite (NaN or infinity) video or text
embeddings are refused with a ``ValueError``, never scored.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from internvit.text import model_device

from .checks import check_labels
from .zero_shot import (
    MAX_NUM_FRAMES,
    METADATA_DIR,
    ZERO_SHOT_SCALE,
    NonFinite,
    Template,
    _failed_entry,
    _model_dtype,
    build_zero_shot_classifier,
    check_finite_classifier,
    check_zero_shot_inputs,
    classification_metrics,
    encode_images,
    load_text_model,
    refuse_missing,
    refuse_output_onto_input,
    resolve_templates,
    warn_emptied_classes,
    warn_empty,
    zero_shot_inputs,
)

VIDEO_EXTENSIONS: tuple[str, ...] = (".mp4", ".avi", ".mkv", ".webm", ".mov", ".m4v", ".mpg", ".mpeg", ".flv",
                                     ".wmv", ".3gp", ".ts", ".gif")
KINETICS = ("kinetics400", "kinetics600", "kinetics700")
FRAME_SAMPLING = "segment midpoints (InternVL-Chat get_index)"
FRAME_COMBINATION = "mean of L2-normalised frame embeddings, L2-normalised"

__all__ = ["FRAME_COMBINATION", "FRAME_SAMPLING", "KINETICS", "VIDEO_EXTENSIONS", "VideoFrameDataset",
           "encode_videos", "list_labeled_videos", "load_video_classnames", "load_video_templates",
           "read_video_frames", "run_video_zero_shot", "sample_frame_indices", "video_zero_shot_evaluate"]


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------
def _canon(dataset: str) -> str:
    key = dataset.strip().lower().replace("-", "").replace("_", "")
    return {"k400": "kinetics400", "k600": "kinetics600", "k700": "kinetics700"}.get(key, key)


def _read_metadata(name: str) -> dict:
    with open(os.path.join(METADATA_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def load_video_classnames(dataset: str = "kinetics400") -> list[str]:
    """Shipped class names of ``kinetics400`` / ``kinetics600`` / ``kinetics700`` (also ``k400``,
    ``kinetics-400``, ...), in the datasets' label order. Sources and licences:
    ``classification/metadata/KINETICS_SOURCES.md``."""
    key = _canon(dataset)
    names = _read_metadata("kinetics_classnames.json")
    if key not in names:
        raise ValueError(f"no shipped video class names for {dataset!r}; known: {', '.join(KINETICS)}")
    return list(names[key])


def load_video_templates(dataset: str = "kinetics400") -> list[str]:
    """The prompt templates shipped for a Kinetics dataset (CLIP's 28 Kinetics templates, ``{c}`` placeholder)."""
    key = _canon(dataset)
    templates = _read_metadata("kinetics_templates.json")
    if key not in templates:
        raise ValueError(f"no shipped video templates for {dataset!r}; known: {', '.join(KINETICS)}")
    return list(templates[key])


# ---------------------------------------------------------------------------------------------------
# Frames
# ---------------------------------------------------------------------------------------------------
def sample_frame_indices(num_frames: int, num_segments: int, *, fps: Optional[float] = None,
                         bound: Optional[tuple[float, float]] = None, first_idx: int = 0) -> list[int]:
    """Indices of ``num_segments`` frames of a ``num_frames``-frame video (reference-spec-2 §1.9).

    ``start = max(first_idx, round(t0·fps))``, ``end = min(round(t1·fps), num_frames − 1)`` for a ``bound``
    ``(t0, t1)`` in seconds (Python ``round``), else ``first_idx`` and the last frame; ``seg = (end − start) /
    num_segments``; frame ``k`` is ``int(start + seg/2 + np.round(seg·k))``. ``num_segments=1`` gives the middle
    frame; with fewer frames than segments indices repeat. Raises ``ValueError`` for ``num_frames < 1``,
    ``num_segments < 1``, a bound without a positive ``fps`` or a bound that selects no frame.
    """
    if int(num_frames) < 1:
        raise ValueError(f"num_frames must be >= 1, got {num_frames}")
    if int(num_segments) < 1:
        raise ValueError(f"num_segments must be >= 1, got {num_segments}")
    max_frame = int(num_frames) - 1
    if bound is None:  # upstream uses ±100000 s, which clamps to the whole video
        start_idx, end_idx = first_idx, max_frame
    else:
        if not fps or fps <= 0:
            raise ValueError("a time bound needs the video's fps (> 0)")
        start_idx = max(first_idx, round(bound[0] * fps))
        end_idx = min(round(bound[1] * fps), max_frame)
        if end_idx < start_idx:
            raise ValueError(f"bound {tuple(bound)} s selects no frame of a {num_frames}-frame video at {fps} fps")
    seg = (end_idx - start_idx) / num_segments
    return [int(start_idx + seg / 2 + np.round(seg * k)) for k in range(num_segments)]


#: FFmpeg demuxers that read one still picture per file (``*_pipe`` demuxers are all image formats too)
IMAGE_DEMUXERS = ("image2", "image2pipe")
#: formats that hold animations or stills: one frame is a picture, not a video
ANIMATED_IMAGE_FORMATS = ("gif", "apng", "webp")


def _format_names(container) -> list[str]:
    return [n.strip() for n in (getattr(container.format, "name", "") or "").split(",") if n.strip()]


def _open(path: str):
    """The PyAV container of a video. Raises ``ValueError`` for a file without a video stream and for an image
    (a format FFmpeg reads with an image demuxer: ``image2``, ``png_pipe``, ``jpeg_pipe``, ...)."""
    import av

    container = av.open(path)
    fmt = _format_names(container)
    if any(n in IMAGE_DEMUXERS or n.endswith("_pipe") for n in fmt):
        container.close()
        raise ValueError(f"an image, not a video (FFmpeg reads it with the {','.join(fmt)!r} image demuxer)")
    if not container.streams.video:
        container.close()
        raise ValueError("no video stream")
    return container


def video_stream(container):
    """The stream a video is read from: FFmpeg's choice (``av_find_best_stream``, the one its tools play), not
    the first video stream, which may be a cover picture or thumbnail stored before the video."""
    return container.streams.best("video") or container.streams.video[0]


def _decode_frames(path: str, wanted: set) -> tuple[dict, int]:
    """``({index: RGB PIL image}, frames decoded)``: decodes in order up to the last wanted index."""
    last = max(wanted)
    keep, count = {}, 0
    with _open(path) as container:
        stream = video_stream(container)
        stream.thread_type = "AUTO"
        for frame in container.decode(stream):
            if count in wanted:
                keep[count] = frame.to_image()  # only the sampled frames become images
            count += 1
            if count > last:
                break
    return keep, count


def read_video_frames(path: str, num_segments: int, *, bound: Optional[tuple[float, float]] = None
                      ) -> tuple[list, dict]:
    """The ``num_segments`` sampled frames of a video as RGB PIL images, and ``{num_frames, fps, indices}``.

    The frame count comes from the container header, else from counting the stream's packets (no decoding);
    if fewer frames decode than that count says, the indices are recomputed from the frames that exist.
    Raises (``ValueError``, ``OSError`` or PyAV's errors) for a file that cannot be opened or decoded, has no
    video stream or no frame, or is an image (see :func:`_open`; also a GIF / APNG / WebP of a single frame).
    """
    with _open(path) as container:
        stream = video_stream(container)
        n = int(stream.frames or 0)
        fps = float(stream.average_rate) if stream.average_rate else None
        fmt = _format_names(container)
        if n <= 0 or any(f in ANIMATED_IMAGE_FORMATS for f in fmt):
            n = sum(1 for packet in container.demux(stream) if packet.size)
    if n <= 0:
        raise ValueError("the video has no frames")
    if n == 1 and any(f in ANIMATED_IMAGE_FORMATS for f in fmt):
        raise ValueError(f"a still image, not a video (a {','.join(fmt)} file of one frame)")
    indices = sample_frame_indices(n, num_segments, fps=fps, bound=bound)
    frames, decoded = _decode_frames(path, set(indices))
    if len(frames) < len(set(indices)):  # the header over-counted: resample from what decodes
        if decoded == 0:
            raise ValueError("no frame could be decoded")
        n = decoded
        indices = sample_frame_indices(n, num_segments, fps=fps, bound=bound)
        frames, _ = _decode_frames(path, set(indices))
    return [frames[i] for i in indices], {"num_frames": n, "fps": fps, "indices": indices}


class VideoFrameDataset(Dataset):
    """Videos as stacks of sampled frames: item ``i`` is ``(frames (num_frames, 3, S, S), i, None)``.

    ``transform`` maps a PIL image to a ``(3, S, S)`` tensor. An unreadable, corrupt or empty video (or an image
    under a video name) gives ``(None, i, 'ErrorType: message')``; use :func:`internvit.data.collate_images` as
    ``collate_fn``, which drops such items and keeps their errors (batches are ``(B, num_frames, 3, S, S)``).
    With ``with_info=True`` items have a fourth element, the video's frame count (``None`` for a failed one).
    Raises ``ValueError`` for ``num_frames`` outside 1..:data:`classification.zero_shot.MAX_NUM_FRAMES`.
    """

    def __init__(self, paths: Sequence[str], num_frames: int, transform: Callable, *,
                 bound: Optional[tuple[float, float]] = None, with_info: bool = False) -> None:
        if not 1 <= int(num_frames) <= MAX_NUM_FRAMES:
            raise ValueError(f"num_frames must be between 1 and {MAX_NUM_FRAMES}, got {num_frames}")
        self.paths = [os.fspath(p) for p in paths]
        self.num_frames, self.transform, self.bound = int(num_frames), transform, bound
        self.with_info = with_info

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        from internvit.data import _error_text

        try:
            frames, info = read_video_frames(self.paths[i], self.num_frames, bound=self.bound)
            x = torch.stack([self.transform(f) for f in frames])
        except Exception as e:  # noqa: BLE001 - a bad video is reported, never fatal
            return (None, i, _error_text(e), None) if self.with_info else (None, i, _error_text(e))
        return (x, i, None, info["num_frames"]) if self.with_info else (x, i, None)


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def encode_videos(model, frames: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    """``(B, T, 3, H, W)`` frames → ``(B, D)`` fp32 video embeddings: every frame through ``encode_image``,
    L2-normalised, averaged over the ``T`` frames, L2-normalised again."""
    if frames.ndim != 5:
        raise ValueError(f"frames must be (B, T, 3, H, W), got shape {tuple(frames.shape)}")
    b, t = frames.shape[:2]
    feats = encode_images(model, frames.flatten(0, 1), mode)
    return F.normalize(feats.reshape(b, t, -1).mean(dim=1), dim=-1)


def video_zero_shot_evaluate(model, classifier: torch.Tensor, dataloader, *, mode: Optional[str] = "InternVL-C",
                             device: Optional[Union[str, torch.device]] = None,
                             dtype: Optional[torch.dtype] = None,
                             paths: Optional[Sequence[str]] = None, labels: Optional[Sequence[int]] = None,
                             classnames: Optional[Sequence[str]] = None) -> dict:
    """Zero-shot metrics over a loader of ``(frames (B, T, 3, H, W), labels, errors)``, optionally with a fourth
    element: ``(ids, short)``, the dataset indices of the videos and those of them with fewer frames than ``T``.

    ``errors`` is a list of ``(index, message)`` for skipped videos (``paths[index]`` names them in
    ``failed``). Returns ``acc1``, ``acc5`` (``None`` with 5 classes or fewer), ``acc_mean`` (their mean, ``None``
    without ``acc5``), ``mean_per_class_recall`` (fractions), ``num_samples``, ``num_failed``, ``failed``
    (``[{'path', 'error'}]``), ``num_short_videos``, ``num_classes`` and ``emptied_classes`` (the classes of
    ``labels``, every video's label, whose every video was skipped: named in a ``UserWarning`` too, see
    :func:`classification.zero_shot.warn_emptied_classes`; ``classnames`` names them). Raises ``ValueError``
    when a video embedding or the classifier is not finite (NaN or infinity), when no video could be read or a
    label is not an integer in range.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if dtype is None:
        dtype = _model_dtype(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    check_finite_classifier(classifier)
    all_logits, all_target, failed, short = [], [], [], 0
    nonfinite = NonFinite("videos")
    with torch.no_grad():
        for batch in dataloader:
            frames, target, errors = batch[:3]
            ids, short_ids = batch[3] if len(batch) > 3 else (None, ())
            failed.extend(_failed_entry(e, paths) for e in errors)
            short += len(short_ids)
            if frames is None or len(target) == 0:
                continue
            feats = encode_videos(model, frames.to(device=device, dtype=dtype), mode)
            names = [paths[i] for i in ids] if ids is not None and paths is not None else None
            if not bool(nonfinite.keep(feats, names).all()):
                continue
            all_logits.append((ZERO_SHOT_SCALE * feats @ classifier).cpu())
            all_target.append(check_labels(torch.as_tensor(target).cpu(), what="labels"))
    nonfinite.check(dtype)
    if not all_logits:
        raise ValueError(f"no video could be read ({len(failed)} failed; first: "
                         f"{failed[0]['path'] + ': ' + failed[0]['error'] if failed else 'none given'})")
    logits, target = torch.cat(all_logits), torch.cat(all_target)
    out = classification_metrics(logits, target)
    out["acc_mean"] = (out["acc1"] + out["acc5"]) / 2 if out["acc5"] is not None else None
    out.update(num_samples=int(len(target)), num_failed=len(failed), failed=failed, num_short_videos=short,
               num_classes=int(classifier.shape[1]),
               emptied_classes=warn_emptied_classes(target, labels, classnames, "videos"))
    return out


# ---------------------------------------------------------------------------------------------------
# Folder / CSV evaluation (tools/zeroshot_eval.py --video)
# ---------------------------------------------------------------------------------------------------
def _norm(name: str) -> str:
    return " ".join(name.replace("_", " ").split()).lower()


def _is_video(name: str) -> bool:
    return name.lower().endswith(VIDEO_EXTENSIONS) and not name.startswith(".")


def list_labeled_videos(data: str) -> tuple[list[str], list[str]]:
    """``(paths, raw labels)`` of a ``<root>/<class>/<video>`` folder (recursive per class, sorted) or a
    ``path,label`` CSV (relative paths against the CSV's folder; the format of
    :func:`classification.datasets.read_label_rows`). Raises ``ValueError`` / ``FileNotFoundError`` naming
    the problem."""
    paths, labels, _ = _scan_videos(data)
    return paths, labels


def _scan_videos(data: str) -> tuple[list[str], list[str], list[str]]:
    """``(paths, raw labels, classes)``: ``classes`` are every class folder (empty ones included: the candidate
    classes do not depend on which videos are present) or the CSV's distinct labels."""
    if os.path.isdir(data):
        classes = sorted(d for d in os.listdir(data) if os.path.isdir(os.path.join(data, d)) and d[0] != ".")
        paths, labels = [], []
        for c in classes:
            found = []
            for root, dirs, files in os.walk(os.path.join(data, c)):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                found.extend(os.path.join(root, f) for f in files if _is_video(f))
            paths.extend(sorted(found))
            labels.extend([c] * len(found))
        if not paths:
            raise ValueError(f"{data}: no videos ({'/'.join(VIDEO_EXTENSIONS)}) in <root>/<class>/ folders")
        warn_empty(data, [c for c in classes if c not in set(labels)], len(classes), "videos")
        return paths, labels, classes
    if os.path.isfile(data) and data.lower().endswith(".csv"):
        from .datasets import _is_index, read_label_rows

        base = os.path.dirname(os.path.abspath(data))
        rows = read_label_rows(data)
        if not rows:
            raise ValueError(f"{data}: no 'path,label' rows")
        paths = [p if os.path.isabs(p) else os.path.join(base, p) for _, p, _ in rows]
        refuse_missing(data, paths, "video")
        labels = [label for _, _, label in rows]
        if all(_is_index(label) for label in labels):
            classes = sorted(set(labels), key=int)
        else:
            classes = sorted(set(labels))
        return paths, labels, classes
    raise FileNotFoundError(f"{data}: not a video folder (<root>/<class>/<video>) or a .csv of path,label")


def _resolve_video_classnames(spec, raw_labels: Sequence[str],
                              classes: Optional[Sequence[str]] = None) -> tuple[list[str], list[int]]:
    """Class names (the candidates) and the label index of every row; ``classes`` (default: the distinct raw
    labels) are the data's classes, matched to the names by
    :func:`classification.zero_shot.resolve_class_index`."""
    from .datasets import _is_index
    from .zero_shot import resolve_class_index

    if spec is None and all(_is_index(label) for label in raw_labels):
        raise ValueError("the labels are class indices, which name nothing a text prompt can describe: pass "
                         "--classnames (classnames= in Python): a Kinetics key, a .txt / .json list in index order")
    classes = sorted(set(raw_labels)) if classes is None else list(classes)
    by_key = None
    if isinstance(spec, str) and not os.path.isfile(spec):
        by_key = load_video_classnames
    names, index = resolve_class_index(spec, classes, by_key=by_key)
    pos = {c: i for i, c in enumerate(classes)}
    return names, [index[pos[label]] for label in raw_labels]


def _resolve_video_templates(spec, dataset: Optional[str]) -> list[Template]:
    if spec is None:
        return load_video_templates(dataset or "kinetics400")
    if isinstance(spec, str) and not os.path.isfile(spec) and _canon(spec) in KINETICS:
        return load_video_templates(spec)
    return resolve_templates(spec)


def run_video_zero_shot(
    model,
    data: str,
    *,
    num_frames: int = 8,
    classnames: Optional[Union[str, Sequence[str]]] = None,
    templates: Optional[Union[str, Sequence[Template]]] = None,
    dataset: Optional[str] = None,
    mode: Optional[str] = "InternVL-C",
    tokenizer=None,
    batch_size: int = 8,
    text_batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    num_workers: int = 2,
    resize_mode: str = "crop",
    transform: Optional[Callable] = None,
    bound: Optional[tuple[float, float]] = None,
    output: Optional[str] = None,
) -> dict:
    """Zero-shot classify a video folder (``<root>/<class>/<video>``) or a ``path,label`` CSV.

    ``model``: an InternVL directory / weight file / preset or a loaded model (anything with ``encode_image``
    and ``encode_text``); the tokenizer defaults to the model directory's. ``classnames``: ``None`` (folder /
    CSV label names, ``_`` read as a space), a Kinetics key (``kinetics400``/``600``/``700``; folder or CSV
    labels are matched to it case-insensitively with ``_`` as a space, or are class indices), a list or a
    ``.txt``/``.json`` file. ``templates``: ``None`` = ``dataset``'s shipped Kinetics templates (default
    ``kinetics400``). ``batch_size`` counts videos (a forward pass sees ``batch_size × num_frames`` frames).
    Returns (and with ``output`` writes atomically as JSON; an ``output`` that is one of the inputs is refused
    first) the metrics of :func:`video_zero_shot_evaluate`
    plus the settings used.

    Raises ``ValueError`` for ``num_frames`` below 1 or above :data:`classification.zero_shot.MAX_NUM_FRAMES`
    (naming the memory it would need), ``batch_size`` below 1, the input problems of
    :func:`classification.zero_shot.zero_shot_input_errors` (a ``dataset`` that is not a Kinetics key or is given
    with ``templates``, a bad template or class-name list) before any data is read, class names that cannot be
    matched or repeat, a model without text tower or tokenizer, non-finite embeddings and data none of which can be
    read; ``FileNotFoundError`` for missing files."""
    import internvit
    from internvit.data import collate_images
    from internvit.fileio import atomic_write

    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    check_zero_shot_inputs(classnames=classnames, templates=templates, dataset=dataset, video=True,
                           num_frames=num_frames, batch_size=batch_size, model=model)
    if output:
        refuse_output_onto_input(output, zero_shot_inputs(os.fspath(data), classnames=classnames,
                                                          templates=templates, model=model, tokenizer=tokenizer))
    model_name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    paths, raw_labels, data_classes = _scan_videos(os.fspath(data))
    names, labels = _resolve_video_classnames(classnames, raw_labels, data_classes)
    temps = _resolve_video_templates(templates, dataset)
    model, tokenizer = load_text_model(model, tokenizer, dtype=dtype, device=device)
    classifier = build_zero_shot_classifier(model, tokenizer, names, temps, batch_size=text_batch_size,
                                            device=device)
    if transform is None:
        transform = internvit.build_transform(model.config, resize_mode=resize_mode)
    ds = VideoFrameDataset(paths, num_frames, transform, bound=bound, with_info=True)

    def collate(batch):
        frames, ids, errors = collate_images([item[:3] for item in batch])
        short = [i for x, i, _, n in batch if x is not None and n < num_frames]
        return frames, torch.tensor([labels[i] for i in ids], dtype=torch.long), errors, (ids, short)

    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers, collate_fn=collate)
    result = video_zero_shot_evaluate(model, classifier, loader, mode=mode, device=device, dtype=dtype,
                                      paths=paths, labels=labels, classnames=names)
    result.update(model=model_name, data=os.fspath(data), mode=mode, num_frames=int(num_frames),
                  frame_sampling=FRAME_SAMPLING, frame_combination=FRAME_COMBINATION,
                  num_templates=len(temps), logit_scale_used=ZERO_SHOT_SCALE, resize_mode=resize_mode,
                  num_videos=len(paths))
    if output:
        with atomic_write(output) as tmp, open(tmp, "w", encoding="utf-8") as f:  # marked: tools recognise it
            json.dump({"written_by": "classification.video", **result}, f, indent=2, ensure_ascii=False)
    return result
