"""Image-caption pairs for retrieval fine-tuning (reference-spec-2 §2.4–2.5).

Annotation formats (:func:`load_pairs`):

* ``flickr_txt`` — the Flickr30K / Flickr30K-CN Karpathy text files: a header line, then
  ``<numeric id>.jpg,<caption>`` per line (split on the first ``.jpg,``); image id = the file stem.
* ``coco_json`` — the BLIP / LAVIS list ``[{"image": rel_path, "caption": str | [str], "image_id": "coco_123"}]``
  (image id = the integer after the last ``_``; by image path when absent) or Karpathy's
  ``dataset_*.json`` (``{"images": [...]}``, filtered to ``split``).
* ``images`` — any image collection :func:`retrieval.inputs.image_inputs` reads (a folder with ``.txt``
  captions beside the images, a parquet of paths + captions, a list file, webdataset tars); image id = the
  image's position.

Every caption goes through the protocol's clean-up :func:`retrieval.evaluate.pre_caption`. One training sample
per caption (an image with 5 captions appears 5 times).
"""
from __future__ import annotations

import json
import os
import random
from collections import OrderedDict
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


def _flickr_txt(path: str, image_root: str) -> list[tuple[str, str, int]]:
    out = []
    with open(path, encoding="utf-8") as f:
        lines = f.read().splitlines()
    for n, line in enumerate(lines[1:], 2):  # the first line is a header
        if not line.strip():
            continue
        if ".jpg," not in line:
            raise ValueError(f"{path}:{n}: expected '<id>.jpg,<caption>', got {line[:60]!r}")
        name, caption = line.split(".jpg,", 1)
        try:
            image_id = int(os.path.basename(name))
        except ValueError:
            raise ValueError(f"{path}:{n}: image name {name!r} is not numeric") from None
        out.append((os.path.join(image_root, name + ".jpg"), caption, image_id))
    return out


def _coco_json(path: str, image_root: str, split: Optional[str]) -> list[tuple[str, str, int]]:
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not valid JSON ({e})") from None
    entries = []
    if isinstance(data, dict) and "images" in data:  # Karpathy's dataset_{flickr30k,coco}.json
        for im in data["images"]:
            if split is not None and im.get("split", split) != split:
                continue
            caps = [s["raw"] if isinstance(s, dict) else s for s in im.get("sentences", [])]
            entries.append((os.path.join(im.get("filepath", ""), im["filename"]), caps, im.get("imgid")))
    elif isinstance(data, list):
        for i, e in enumerate(data):
            if not isinstance(e, dict) or "image" not in e or "caption" not in e:
                raise ValueError(f"{path}: entry {i} is not a {{'image', 'caption'}} object")
            caps = e["caption"] if isinstance(e["caption"], list) else [e["caption"]]
            entries.append((e["image"], caps, e.get("image_id")))
    else:
        raise ValueError(f"{path}: unknown annotation format (a list of {{'image', 'caption', 'image_id'}} or "
                         f"Karpathy's {{'images': [...]}})")
    out, by_path = [], {}
    for rel, caps, raw_id in entries:
        full = rel if os.path.isabs(rel) else os.path.join(image_root, rel)
        image_id = None
        if raw_id is not None:
            try:
                image_id = int(str(raw_id).rsplit("_", 1)[-1])
            except ValueError:
                image_id = None
        if image_id is None:
            image_id = by_path.setdefault(full, len(by_path))
        out.extend((full, c, image_id) for c in caps)
    return out


def _image_collection(source: str) -> list[tuple[str, str, int]]:
    from retrieval.inputs import image_inputs

    images, captions = image_inputs(source)
    if not isinstance(images, list):
        raise ValueError(f"{source}: fine-tuning reads image files (a folder, list or parquet), not tar members")
    if captions is None:
        raise ValueError(f"{source}: no captions (put a .txt beside each image, or use a parquet caption column)")
    return [(p, c, i) for i, (p, c) in enumerate(zip(images, captions)) if c]


def load_pairs(annotation: str, image_root: Optional[str] = None, *, format: str = "auto",
               split: Optional[str] = None, max_words: int = 50) -> list[tuple[str, str, int]]:
    """``[(image_path, cleaned_caption, image_id)]``, one per caption, in file order.

    ``image_root`` defaults to the annotation's folder. Raises ``FileNotFoundError`` for a missing file,
    ``ValueError`` for an unknown format or malformed lines (naming file and line).
    """
    from retrieval.evaluate import pre_caption

    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {format!r}")
    annotation = os.fspath(annotation)
    if not os.path.exists(annotation):
        raise FileNotFoundError(f"{annotation}: no such annotation file or image collection")
    fmt = _detect(annotation) if format == "auto" else format
    root = image_root or (annotation if os.path.isdir(annotation) else os.path.dirname(os.path.abspath(annotation)))
    if fmt == "flickr_txt":
        pairs = _flickr_txt(annotation, root)
    elif fmt == "coco_json":
        pairs = _coco_json(annotation, root, split)
    else:
        pairs = _image_collection(annotation)
    pairs = [(p, pre_caption(c, max_words), i) for p, c, i in pairs]
    if not pairs:
        raise ValueError(f"{annotation}: no image-caption pairs" + (f" in split {split!r}" if split else ""))
    return pairs


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
    (k, max_length) of its captions, tokenised as the encoders do}}`` (use ``pseudo_collate``). JSON files are
    read by :func:`retrieval.evaluate.load_annotations`, the loader of ``tools/eval_retrieval.py``.

    Args:
        annotation: annotation file or image collection (see :func:`load_pairs`).
        tokenizer: ``tokenizer.model`` path (or its folder, or ``dict(path=..., max_length=...)``).
        image_root: folder the annotation's image names are relative to (default: the annotation's folder).
        format: ``'auto'`` (by extension), ``'flickr_txt'``, ``'coco_json'`` or ``'images'``.
        split: Karpathy split to keep (``dataset_*.json`` only; default: train for training, test for eval).
        image_size: the model input size ``S`` (the recipe: 364 full, 224 head).
        scale / hflip: RandomResizedCrop scale range and flip probability (training).
        max_length: token budget (80 in the recipe).
    """

    def __init__(self, annotation: str, tokenizer: Union[str, dict], image_root: Optional[str] = None,
                 format: str = "auto", mode: str = "train", split: Optional[str] = None, image_size: int = 224,
                 scale: Sequence[float] = (0.5, 1.0), hflip: float = 0.5, max_length: int = 80,
                 max_words: int = 50) -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        self.mode = mode
        self.tokenizer = _tokenizer(tokenizer, max_length)
        split = split if split is not None else ("train" if mode == "train" else "test")
        if mode == "train":
            self.pairs = load_pairs(annotation, image_root, format=format, split=split, max_words=max_words)
            if len({i for _, _, i in self.pairs}) < 2:
                raise ValueError(f"{annotation}: training needs captions of at least two images (negatives)")
            self.transform = train_transform(image_size, scale, hflip)
        else:
            self.images, self.captions = self._eval_groups(annotation, image_root, format, split, max_words)
            self.transform = eval_transform(image_size)

    @staticmethod
    def _eval_groups(annotation, image_root, format, split, max_words):
        fmt = _detect(os.fspath(annotation)) if format == "auto" else format
        if fmt == "coco_json":
            from retrieval.evaluate import load_annotations

            images, captions, t2i = load_annotations(annotation, image_root, split=split, max_words=max_words)
            groups: list[list[str]] = [[] for _ in images]
            for c, i in zip(captions, t2i):
                groups[i].append(c)
            return images, groups
        by_id: "OrderedDict[int, tuple[str, list[str]]]" = OrderedDict()
        for path, cap, image_id in load_pairs(annotation, image_root, format=fmt, split=split,
                                              max_words=max_words):
            by_id.setdefault(image_id, (path, []))[1].append(cap)
        return [p for p, _ in by_id.values()], [c for _, c in by_id.values()]

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
