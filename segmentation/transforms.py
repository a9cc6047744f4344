"""Data transforms of the published InternViT segmentation pipelines (mmseg 1.x ``TRANSFORMS``)."""
from __future__ import annotations

import os
from typing import Optional

import mmcv
import numpy as np
from mmcv.transforms import BaseTransform
from mmseg.registry import TRANSFORMS

from internvit.data import DataError


def setr_resize_shape(h: int, w: int, short_side: int) -> tuple[int, int]:
    """``(new_h, new_w)``: short side to ``short_side``, long side proportional (rounded half up, as mmcv)."""
    scale = short_side / min(h, w)
    return int(h * scale + 0.5), int(w * scale + 0.5)


@TRANSFORMS.register_module()
class SETRResize(BaseTransform):
    """The reference's test-time resize: short side to the crop size, long side proportional (no cap), then
    (``size_divisor``) up to the next multiple of the patch size — two bilinear resizes, as the reference's
    ``SETR_Resize`` + ``ResizeToMultiple``. Segmentation maps (if already loaded) use nearest.

    Modified keys: ``img``, ``img_shape``, ``pad_shape``, ``scale_factor``, ``keep_ratio`` and ``seg_fields``.
    """

    def __init__(self, short_side: int = 504, size_divisor: Optional[int] = 14,
                 interpolation: str = "bilinear") -> None:
        if short_side <= 0:
            raise ValueError(f"SETRResize: short_side must be positive, got {short_side}")
        self.short_side = int(short_side)
        self.size_divisor = size_divisor
        self.interpolation = interpolation

    def _resize(self, img: np.ndarray, interpolation: str) -> np.ndarray:
        new_h, new_w = setr_resize_shape(img.shape[0], img.shape[1], self.short_side)
        img = mmcv.imresize(img, (new_w, new_h), interpolation=interpolation, backend="cv2")
        if self.size_divisor:
            img = mmcv.imresize_to_multiple(img, self.size_divisor, scale_factor=1, interpolation=interpolation)
        return img

    def transform(self, results: dict) -> dict:
        img = results["img"]
        h, w = img.shape[:2]
        img = self._resize(img, self.interpolation)
        results["img"] = img
        results["img_shape"] = img.shape[:2]
        results["pad_shape"] = img.shape[:2]
        results["scale_factor"] = (img.shape[1] / w, img.shape[0] / h)
        results["keep_ratio"] = True
        for key in results.get("seg_fields", []):
            results[key] = self._resize(results[key], "nearest")
        return results

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}(short_side={self.short_side}, size_divisor={self.size_divisor}, "
                f"interpolation={self.interpolation!r})")


@TRANSFORMS.register_module()
class CheckSegLabels(BaseTransform):
    """Refuse a segmentation map the metric would silently mis-score: a label value that is neither a class
    (``0 .. num_classes - 1``, after ``reduce_zero_label``) nor ``ignore_index``, or a map whose size differs
    from the image's original size (``ori_shape``; mmseg's ``IoUMetric`` excludes out-of-range values from
    every class's areas without a word, and fails on a size mismatch deep in the test loop), or a file that is
    not one 8-bit channel (mode ``L``, ``P`` or ``1``): ``LoadAnnotations`` casts a 16-bit map to ``uint8``
    (257 became class 1, scored as such) and keeps the channels of an RGB / LA map (the metric failed with an
    ``IndexError``).

    Place it after ``LoadAnnotations``. Raises :class:`internvit.data.DataError` (a ``ValueError``) naming the
    annotation file, which the tools report as one ``error:`` line. Modifies nothing.
    """

    LABEL_MODES = ("L", "P", "1")

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if int(num_classes) < 1:
            raise ValueError(f"CheckSegLabels: num_classes must be >= 1, got {num_classes}")
        self.num_classes, self.ignore_index = int(num_classes), int(ignore_index)
        self._mode_ok: set = set()  # label files whose header was read once (not again every epoch)

    def transform(self, results: dict) -> dict:
        seg = results.get("gt_seg_map")
        if seg is None:
            return results
        where = results.get("seg_map_path", "the segmentation map")
        if isinstance(where, str) and where not in self._mode_ok:
            mode = _image_mode(where)
            if mode is not None and mode not in self.LABEL_MODES:
                raise DataError(f"{where}: a label map must be one 8-bit channel (PNG mode L or P), this file is "
                                 f"mode {mode!r}: its values would be cast to uint8 or its channels kept")
            self._mode_ok.add(where)
        if seg.ndim != 2:
            raise DataError(f"{where}: a label map must have one channel, this one has shape {tuple(seg.shape)}")
        shape = results.get("ori_shape")
        if shape is not None and tuple(seg.shape[:2]) != tuple(shape[:2]):
            raise DataError(f"{where}: {seg.shape[0]}x{seg.shape[1]} label map for a {shape[0]}x{shape[1]} image")
        values = np.unique(seg)
        bad = values[((values < 0) | (values >= self.num_classes)) & (values != self.ignore_index)]
        if bad.size and results.get("reduce_zero_label"):  # name the file's values: each was reduced by one
            raise DataError(f"{where}: label values {(bad[:5].astype(np.int64) + 1).tolist()} are neither classes "
                             f"1..{self.num_classes} (reduce_zero_label: 0 is ignored, 1 becomes class 0) nor the "
                             f"ignore index {self.ignore_index}")
        if bad.size:
            raise DataError(f"{where}: label values {bad[:5].tolist()} are neither classes 0..{self.num_classes - 1} "
                             f"nor the ignore index {self.ignore_index}")
        return results

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_classes={self.num_classes}, ignore_index={self.ignore_index})"


def _image_mode(path: str) -> Optional[str]:
    """The PIL mode of a local image file from its header (``None`` when it is not a local file PIL reads)."""
    if not os.path.isfile(path):
        return None
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.mode
    except Exception:  # noqa: BLE001 - LoadAnnotations has already read it; leave other formats alone
        return None
