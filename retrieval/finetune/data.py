"""Image-caption pairs for retrieval fine-tuning (reference-spec-2 §2.4–2.5).

Annotation formats (:func:`load_pairs`), read by the loader of evaluation
(:func:`retrieval.evaluate.read_entries`):

* ``flickr_txt`` — the Flickr30K / Flickr30K-CN Karpathy text files: a header line, then
  ``<numeric id>.jpg,<caption>`` per line (split on the first ``.jpg,``).
* ``coco_json`` — the BLIP / LAVIS list ``[{"image": rel_path, "caption": str | [str], "image_id": "coco_123"}]``
  or Karpathy's ``dataset_*.json`` (``{"images": [...]}``, filtered to ``split``: one name, ``'train,restval'``
  or a sequence; ``imgid`` is the image id).
* ``images`` — any image collection :func:`retrieval.inputs.image_inputs` reads (a folder with ``.txt``
  captions beside the images, a parquet of paths + captions, a list file).

Image identity, one rule for training and evaluation (:func:`retrieval.evaluate.image_identities`): the
entry's whole ``image_id`` string when given, else the image's normalised path (``os.path.normpath`` of the
path resolved against ``image_root``); identities are numbered densely 0..N-1 in order of first appearance.
Captions and image paths must be strings (``null`` or a number is refused, naming the entry).

Every caption goes through the protocol's clean-up :func:`retrieval.evaluate.pre_caption`. One training sample
per caption (an image with 5 captions appears 5 times).
"""
from __future__ import annotations

import math
import os
import random
from typing import Optional, Sequence, Union

import torch
from mmengine.registry import DATASETS
from torch.utils.data import Dataset
from torchvision import transforms as T

from internvit.config import IMAGENET_MEAN, IMAGENET_STD
from internvit.transforms import ToNormalizedTensor

FORMATS = ("auto", "flickr_txt", "coco_json", "images")


def _detect(annotation: str) -> str:
    if annotation.endswith(".json"):
        return "coco_json"
    if annotation.endswith(".txt"):
        return "flickr_txt"
    return "images"


def _image_collection(source: str) -> list:
    """The entries of an image collection; its paths made absolute first (they are relative to the working
    directory, not to the annotation's folder)."""
    from retrieval.evaluate import AnnotationEntry
    from retrieval.inputs import image_inputs

    images, captions = image_inputs(source)
    if not isinstance(images, list):
        raise ValueError(f"{source}: fine-tuning reads image files (a folder, list or parquet), not tar members")
    if captions is None:
        raise ValueError(f"{source}: no captions (put a .txt beside each image, or use a parquet caption column)")
    return [AnnotationEntry(f"image {i}", os.path.abspath(p) if isinstance(p, str) else p, [c] if c else [], None)
            for i, (p, c) in enumerate(zip(images, captions))]


def _read(annotation: str, image_root: Optional[str], format: str,
          split: Union[None, str, Sequence[str]]) -> tuple[list, str]:
    """``(entries, root)`` of an annotation file or image collection (:func:`retrieval.evaluate.read_entries`)."""
    from retrieval.evaluate import read_entries

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    annotation = os.fspath(annotation)
    if not os.path.exists(annotation):
        raise FileNotFoundError(f"{annotation}: no such annotation file or image collection")
    fmt = _detect(annotation) if format == "auto" else format
    root = image_root or (annotation if os.path.isdir(annotation) else os.path.dirname(os.path.abspath(annotation)))
    if fmt == "images":
        return _image_collection(annotation), root
    return read_entries(annotation, split, format=fmt), root


def load_pairs(annotation: str, image_root: Optional[str] = None, *, format: str = "auto",
               split: Union[None, str, Sequence[str]] = None, max_words: int = 50) -> list[tuple[str, str, int]]:
    """``[(image_path, cleaned_caption, image_id)]``, one per caption, in file order.

    ``image_path`` is normalised (``os.path.normpath``) and resolved against ``image_root`` (default: the
    annotation's folder). ``image_id`` follows the identity rule evaluation uses
    (:func:`retrieval.evaluate.image_identities`): the entry's whole ``image_id`` string when given, else the
    normalised path, numbered densely ``0..N-1`` in order of first appearance; one ``image_id`` may name
    several images (declared positives of each other), one path with two ``image_id`` s is refused.
    ``split`` (Karpathy's ``dataset_*.json`` only): a name, a comma-separated string (``'train,restval'``)
    or a sequence of names. Raises ``FileNotFoundError`` for a missing file, ``ValueError`` for an unknown
    format, malformed lines or entries (naming file and line or entry: a caption or image path that is not
    a string included) or an ambiguous identity.
    """
    from retrieval.evaluate import image_identities, pre_caption, split_note

    entries, root = _read(annotation, image_root, format, split)
    fulls, ids = image_identities(os.fspath(annotation), entries, root, one_image_per_id=False)
    pairs = [(full, pre_caption(c, max_words), i) for e, full, i in zip(entries, fulls, ids) for c in e.captions]
    if not pairs:
        raise ValueError(f"{annotation}: no image-caption pairs" + split_note(entries, split))
    return pairs


def _check_images_exist(annotation: str, paths) -> None:
    """``FileNotFoundError`` naming the first listed image that is not a file, and how many are missing."""
    missing = [p for p in dict.fromkeys(paths) if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{annotation}: {len(missing)} listed image(s) do not exist, the first: "
                                f"{missing[0]} (check image_root)")


def _to_rgb(img):
    return img.convert("RGB") if img.mode != "RGB" else img


def train_transform(image_size: int, scale: Sequence[float] = (0.5, 1.0), hflip: float = 0.5,
                    mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD) -> T.Compose:
    """The recipe's training transform: RGB → RandomResizedCrop(S, scale, bicubic) → flip → ImageNet norm."""
    return T.Compose([
        T.Lambda(_to_rgb),
        T.RandomResizedCrop(image_size, scale=tuple(scale), interpolation=T.InterpolationMode.BICUBIC),
        T.RandomHorizontalFlip(hflip),
        ToNormalizedTensor(mean, std),  # = ToTensor + Normalize, bit for bit
    ])


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def check_transform_args(image_size, scale, hflip, mode: str = "train") -> None:
    """Refuse what :class:`ImageTextPairs` would fail on at the first batch, or use silently (``ValueError``
    naming the argument): an ``image_size`` that is not a positive integer; in training a ``scale`` that is not
    an increasing pair within (0, 1] (RandomResizedCrop's area range: a reversed one failed in a data-loader
    worker) and an ``hflip`` that is not a probability. The model checks ``image_size`` against its patch size
    (:meth:`retrieval.finetune.model.InternVLRetrievalFinetune.check_setup`)."""
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"ImageTextPairs: image_size={image_size!r} is not a positive integer (pixels)")
    if mode != "train":
        return
    pair = tuple(scale) if isinstance(scale, (list, tuple)) else None
    if pair is None or len(pair) != 2 or not all(_number(v) for v in pair) or not 0 < pair[0] <= pair[1] <= 1:
        raise ValueError(f"ImageTextPairs: scale={scale!r} must be an increasing pair (min, max) of area "
                         f"fractions within (0, 1], e.g. (0.5, 1.0)")
    if not _number(hflip) or not 0 <= hflip <= 1:
        raise ValueError(f"ImageTextPairs: hflip={hflip!r} is not a probability (0 to 1)")


def eval_transform(image_size: int):
    """The retrieval protocol's evaluation transform (squash resize, bicubic), as the index builder uses."""
    from internvit.transforms import build_transform, preprocess_config

    return build_transform(preprocess_config(None, image_size=image_size, resize_mode="squash"))


def _tokenizer(tokenizer: Union[str, dict], max_length: int):
    from internvit.tokenizer import get_tokenizer

    if isinstance(tokenizer, dict):
        tokenizer = dict(tokenizer)
        return get_tokenizer(tokenizer.pop("path"), max_length=tokenizer.pop("max_length", max_length), **tokenizer)
    return get_tokenizer(tokenizer, max_length=max_length)


def encode_padded(tokenizer, text: str, add_prefix: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of one text: BOS + (``'summarize:'`` if ``add_prefix``) text + EOS, truncated keeping EOS,
    right-padded with 0 to ``tokenizer.max_length`` (the recipe's ``pad_to_max_length``)."""
    ids = tokenizer.truncate(tokenizer.encode(text, add_prefix=add_prefix), tokenizer.max_length)
    out = torch.zeros(tokenizer.max_length, dtype=torch.long)
    out[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    mask = torch.zeros(tokenizer.max_length, dtype=torch.bool)
    mask[: len(ids)] = True
    return out, mask


@DATASETS.register_module()
class ImageTextPairs(Dataset):
    """Training or evaluation set of image-caption pairs.

    ``mode='train'``: one item per caption: ``{'inputs': (3, S, S) float, 'data_samples': {'image_id',
    'text_ids', 'text_mask' ('summarize:' + caption), 'match_ids', 'match_mask' (the caption),
    'neg_ids', 'neg_mask' (a random caption of another image, redrawn until the image differs)}}``.

    ``mode='eval'``: one item per image (squash resize): ``{'inputs', 'data_samples': {'index', 'text_ids'
    (k, max_length) of its captions, tokenised as the encoders do}}`` (use ``pseudo_collate``). Images are
    grouped as :func:`retrieval.evaluate.load_annotations` (``tools/eval_retrieval.py recall``) groups them,
    by the identity rule training uses; an image without captions stays as a gallery distractor.

    Every listed image must be a file: ``FileNotFoundError`` at construction names the first missing one and
    how many are missing (instead of a crash mid-training).

    Args:
        annotation: annotation file or image collection (see :func:`load_pairs`).
        tokenizer: ``tokenizer.model`` path (or its folder, or ``dict(path=..., max_length=...)``).
        image_root: folder the annotation's image names are relative to (default: the annotation's folder).
        format: ``'auto'`` (by extension), ``'flickr_txt'``, ``'coco_json'`` or ``'images'``.
        split: Karpathy split(s) to keep (``dataset_*.json`` only): a name, a comma-separated string
            (``'train,restval'``, Karpathy's standard training set) or a sequence of names; default: train for
            training (a warning says when ``restval`` images are left out), test for eval.
        image_size: the model input size ``S`` (the recipe: 364 full, 224 head).
        scale / hflip: RandomResizedCrop scale range and flip probability (training).
        max_length: token budget (80 in the recipe).
    """

    def __init__(self, annotation: str, tokenizer: Union[str, dict], image_root: Optional[str] = None,
                 format: str = "auto", mode: str = "train", split: Union[None, str, Sequence[str]] = None,
                 image_size: int = 224,
                 scale: Sequence[float] = (0.5, 1.0), hflip: float = 0.5, max_length: int = 80,
                 max_words: int = 50) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        check_transform_args(image_size, scale, hflip, mode)
        self.mode = mode
        self.image_size = int(image_size)
        self.tokenizer = _tokenizer(tokenizer, max_length)
        split = split if split is not None else ("train" if mode == "train" else "test")
        if mode == "train":
            self.pairs = load_pairs(annotation, image_root, format=format, split=split, max_words=max_words)
            if len({i for _, _, i in self.pairs}) < 2:
                raise ValueError(f"{annotation}: training needs captions of at least two images (negatives)")
            _check_images_exist(os.fspath(annotation), (p for p, _, _ in self.pairs))
            self.transform = train_transform(image_size, scale, hflip)
        else:
            self.images, self.captions = self._eval_groups(annotation, image_root, format, split, max_words)
            _check_images_exist(os.fspath(annotation), self.images)
            self.transform = eval_transform(image_size)

    @staticmethod
    def _eval_groups(annotation, image_root, format, split, max_words) -> tuple[list[str], list[list[str]]]:
        """Images and their captions by :func:`retrieval.evaluate.group_by_image`, the grouping of
        :func:`retrieval.evaluate.load_annotations` (``tools/eval_retrieval.py recall``), for every format."""
        from retrieval.evaluate import group_by_image, split_note

        entries, root = _read(annotation, image_root, format, split)
        images, groups = group_by_image(os.fspath(annotation), entries, root, max_words)
        if not any(groups):
            raise ValueError(f"{annotation}: no images with captions" + split_note(entries, split))
        return images, groups

    def __len__(self) -> int:
        return len(self.pairs) if self.mode == "train" else len(self.images)

    def _load(self, path: str) -> torch.Tensor:
        from internvit.data import load_image

        return self.transform(load_image(path))

    def _negative(self, image_id: int) -> str:
        while True:  # python's random: mmengine seeds it per process and data-loader worker
            _, cap, other = self.pairs[random.randrange(len(self.pairs))]
            if other != image_id:
                return cap

    def __getitem__(self, i: int) -> dict:
        if self.mode == "eval":
            ids = torch.zeros((0, self.tokenizer.max_length), dtype=torch.long)  # no captions: a distractor
            if self.captions[i]:
                ids = torch.stack([encode_padded(self.tokenizer, c, True)[0] for c in self.captions[i]])
            return dict(inputs=self._load(self.images[i]), data_samples=dict(index=i, text_ids=ids))
        path, caption, image_id = self.pairs[i]
        text_ids, text_mask = encode_padded(self.tokenizer, caption, True)
        match_ids, match_mask = encode_padded(self.tokenizer, caption, False)
        neg_ids, neg_mask = encode_padded(self.tokenizer, self._negative(image_id), False)
        return dict(inputs=self._load(path), data_samples=dict(
            image_id=torch.tensor(image_id, dtype=torch.long), text_ids=text_ids, text_mask=text_mask,
            match_ids=match_ids, match_mask=match_mask, neg_ids=neg_ids, neg_mask=neg_mask))


__all__ = ["FORMATS", "ImageTextPairs", "encode_padded", "eval_transform", "load_pairs", "train_transform"]
