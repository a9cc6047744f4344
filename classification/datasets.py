"""Image-classification datasets for mmengine (folder or CSV layout) and the bundled toy digits set.

``ImageFolderDataset`` reads ``root/<class>/<image>`` folders (torchvision ``ImageFolder`` layout) or a CSV of
``path,label`` rows. Images are opened by :func:`internvit.data.load_image` and preprocessed by
:func:`internvit.transforms.build_transform` (the same preprocessing as every other task). Items are
``dict(inputs=CHW tensor, data_samples=dict(gt_label=int, index=int))`` so mmengine's ``default_collate``
stacks them into a batch.
"""
from __future__ import annotations

import csv
import json
import math
import os
import re
import warnings
from typing import Callable, Optional, Sequence, Union

from torch.utils.data import Dataset

from internvit.data import DataError, is_image_file, list_images, load_image
from internvit.fileio import atomic_write
from internvit.transforms import build_transform, preprocess_config

from .registry import DATASETS

TransformLike = Union[dict, Callable, None]


def build_cls_transform(transform: TransformLike) -> Callable:
    """A dict of :func:`internvit.transforms.preprocess_config` fields plus ``train`` → a torchvision transform.

    ``None`` means the eval transform at 224 px; a callable is used as it is.
    """
    if callable(transform):
        return transform
    cfg = dict(transform or {})
    train = bool(cfg.pop("train", False))
    unknown = set(cfg) - {"image_size", "mean", "std", "interpolation", "resize_mode"}
    if unknown:
        raise ValueError(f"transform: unknown keys {sorted(unknown)} (expected image_size, mean, std, "
                         f"interpolation, resize_mode, train)")
    return build_transform(preprocess_config(None, **cfg), train=train)


def not_utf8_error(path: str) -> ValueError:
    """The ``ValueError('<file>:<line>: not UTF-8 text ...')`` of a text file that does not decode as UTF-8,
    naming the first line that does not (a Latin-1 / UTF-16 export read some other way would change names)."""
    with open(path, "rb") as f:
        raw = f.read()
    for lineno, line in enumerate(raw.split(b"\n"), 1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as e:
            return ValueError(f"{path}:{lineno}: not UTF-8 text ({e.reason} at byte {e.start} of the line); "
                              f"save the file as UTF-8")
    return ValueError(f"{path}: not UTF-8 text; save the file as UTF-8")


def read_list_lines(path: str, what: str) -> list[str]:
    """The entries of a one-entry-per-line text file (class names, templates), white space around each line and a
    UTF-8 byte-order mark left out. The position of an entry is its meaning (class ``i`` is line ``i + 1``), so
    a blank line between entries is refused rather than skipped (skipping would shift every later entry by one
    against the line numbers the file's author counts); blank lines at the end are ignored. Raises
    ``ValueError('<file>:<line>: ...')`` for such a blank line and for a file that is not UTF-8 (``what`` names
    the list in the message), ``FileNotFoundError`` for a missing file."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} file {path}: not found")
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark is not part of the first entry
            lines = [line.strip() for line in f.read().splitlines()]
    except UnicodeDecodeError:
        raise not_utf8_error(path) from None
    while lines and not lines[-1]:
        lines.pop()
    blank = next((i for i, line in enumerate(lines) if not line), None)
    if blank is not None:
        raise ValueError(f"{path}:{blank + 1}: blank line in the {what} (one entry per line, the line number is "
                         f"the position: remove the blank line, or write the missing entry)")
    return lines


def _read_classes(classes: Union[str, Sequence[str], None]) -> Optional[list[str]]:
    if classes is None:
        return None
    if isinstance(classes, (str, os.PathLike)):
        names = read_list_lines(os.fspath(classes), "class names")
    else:
        names = [str(c) for c in classes]
    if len(set(names)) != len(names):
        dup = sorted({n for n in names if names.count(n) > 1})
        raise ValueError(f"classes: duplicate names {dup[:5]}")
    return names


def scan_folder(root: str, classes: Optional[Sequence[str]] = None,
                allow_empty: bool = True) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples [(path, label)], classes)`` of a ``root/<class>/<image>`` tree (sorted, recursive per class).

    Raises ``FileNotFoundError`` for a missing ``root``; ``ValueError`` for a class of ``classes`` without a
    folder, no class folders, no images at all, or, with ``allow_empty=False`` (what
    :class:`ImageFolderDataset` passes by default, as torchvision's ``ImageFolder``), class folders without an
    image, which are named (see :func:`empty_classes`).
    """
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such directory (expected <root>/<class>/<image> folders)")
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    if classes is None:
        classes = found
    else:
        missing = [c for c in classes if c not in found]
        if missing:
            raise ValueError(f"{root}: no folder for classes {missing[:5]}")
    if not classes:
        raise ValueError(f"{root}: no class folders found (expected <root>/<class>/<image>)")
    samples = [(p, label) for label, name in enumerate(classes) for p in list_images(os.path.join(root, name))]
    if not samples:
        raise ValueError(f"{root}: no images found in {len(classes)} class folders")
    empty = empty_classes(samples, classes)
    if empty and not allow_empty:
        raise ValueError(f"{root}: no images for {_empty_text(empty)} (empty class folder"
                         f"{'s' if len(empty) > 1 else ''}; {len(classes)} classes): the head would never see "
                         f"them, or mean_recall would average over fewer classes; add the images, or set the "
                         f"dataset's allow_empty=True to accept it with a warning")
    return samples, list(classes)


def empty_classes(samples: Sequence[tuple[str, int]], classes: Sequence[str]) -> list[str]:
    """The names of ``classes`` that no sample is labelled with."""
    seen = {label for _, label in samples}
    return [c for i, c in enumerate(classes) if i not in seen]


def _empty_text(empty: Sequence[str]) -> str:
    shown = ", ".join(repr(c) for c in empty[:10]) + (f", ... ({len(empty)} in all)" if len(empty) > 10 else "")
    return f"class{'es' if len(empty) > 1 else ''} {shown}"


#: integer CSV labels make the classes 0..max: a bigger max needs a class list (a typo never allocates millions)
MAX_CLASSES = 1_000_000
#: a class list beside a CSV that names no classes fixes its label set (make_toy_cls_dataset writes one)
CLASSES_FILE = "classes.txt"


_INDEX = re.compile(r"-?[0-9]+")
#: header names (lower case) of the path and the label column of a label CSV; a first row naming one of each
#: is a header, and the columns are found by these names in any order (``label,path`` works)
PATH_COLUMNS = ("path", "filepath", "filename", "file", "image", "image_path", "img", "img_path", "video",
                "video_path")
LABEL_COLUMNS = ("label", "class", "category", "target")
#: first-row headers of a label CSV (lower case): the two columns in the usual order
CSV_HEADERS = {(p, "label") for p in PATH_COLUMNS}


def _is_index(label: str) -> bool:
    """An integer label (ASCII digits, optional minus): ``'²'`` or ``'٣'`` are names, never indices."""
    return _INDEX.fullmatch(label) is not None


def _header_columns(path: str, lineno: int, row: list[str]) -> Optional[tuple[int, int]]:
    """``(path column, label column)`` when ``row`` is a header (names one path and one label column), else
    ``None``. Raises ``ValueError`` for a header naming a column twice."""
    names = [x.strip().lower() for x in row]
    cols = [[i for i, n in enumerate(names) if n in group] for group in (PATH_COLUMNS, LABEL_COLUMNS)]
    if not cols[0] or not cols[1]:
        return None
    twice = next((c for c in cols if len(c) > 1), None)
    if twice is not None:
        raise ValueError(f"{path}:{lineno}: the header names {len(twice)} columns "
                         f"{', '.join(repr(row[i].strip()) for i in twice)} for one role (one path column: "
                         f"{'/'.join(PATH_COLUMNS)}; one label column)")
    return cols[0][0], cols[1][0]


def read_label_rows(path: str) -> list[tuple[int, str, str]]:
    """``[(line number, path, label)]`` of a ``path,label`` CSV: UTF-8 with or without a byte-order mark
    (Excel's "CSV UTF-8"), blank and ``#`` comment lines skipped (each row carries its own label: skipping one
    shifts nothing), an optional header on the first row that is not a comment. A header names a path column
    (:data:`PATH_COLUMNS`: ``path``, ``filename``, ``image``, ``video``, ...) and a label column
    (:data:`LABEL_COLUMNS`: ``label``, ``class``, ...), in any order (``label,path`` is read by name) and may name
    more columns, which are not read. Without a header the columns are ``path,label``.
    Paths and labels are stripped, not resolved; columns after the second are allowed only when the header
    names them (empty trailing fields always).

    Raises ``FileNotFoundError``, or ``ValueError('<file>:<line>: ...')`` for a row without the fields, a row
    with more fields than the header (or two) names, a file that is not UTF-8 (the first line that is not), and
    an image listed twice with two different labels (both lines named; the same path, after normalisation)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: annotation CSV not found")
    rows, first, width, cols = [], True, 2, (0, 1)
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.reader(f)
        try:
            for row in reader:
                lineno = reader.line_num
                if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
                    continue
                if first:
                    first = False
                    header = _header_columns(path, lineno, row)
                    if header is not None:  # a header may name more columns; they are not read
                        cols, width = header, len(row)
                        continue
                if len(row) <= max(cols):
                    want = "'path,label'" if cols == (0, 1) else f"the {max(cols) + 1} fields the header names"
                    raise ValueError(f"{path}:{lineno}: expected {want}, got {','.join(row)!r}")
                extra = [x for x in row[width:] if x.strip()]
                if extra:  # a comma in an unquoted path shifts the label: never read a shifted row quietly
                    raise ValueError(f"{path}:{lineno}: expected 'path,label', got {len(row)} fields "
                                     f"{','.join(row)!r} (quote a path holding a comma; more columns need a header "
                                     f"row naming them, e.g. path,label,split)")
                rows.append((lineno, row[cols[0]].strip(), row[cols[1]].strip()))
        except UnicodeDecodeError:
            raise not_utf8_error(path) from None
        except csv.Error as e:
            raise ValueError(f"{path}:{reader.line_num}: not a readable CSV row ({e})") from None
    _refuse_conflicting_labels(path, rows)
    return rows


def _refuse_conflicting_labels(path: str, rows: Sequence[tuple[int, str, str]]) -> None:
    """``ValueError`` naming both lines when one file is listed with two different labels: which label it has
    would depend on the row order (and it counts twice, once against each class)."""
    seen: dict[str, tuple[int, str]] = {}
    for lineno, p, label in rows:
        key = os.path.normcase(os.path.normpath(p))
        if key in seen and seen[key][1] != label:
            first, other = seen[key]
            raise ValueError(f"{path}:{lineno}: {p} is labelled {label!r} here and {other!r} on line {first}; "
                             f"a file has one label: remove one of the two rows")
        seen.setdefault(key, (lineno, label))


def read_csv(path: str, classes: Optional[Sequence[str]] = None,
             image_root: Optional[str] = None) -> tuple[list[tuple[str, int]], list[str]]:
    """``(samples, classes)`` of a ``path,label`` CSV (optional header ``path,label``; see
    :func:`read_label_rows` for the format).

    The label set comes from ``classes``, else from a ``classes.txt`` beside the CSV (one name per line),
    else from the labels themselves: all integers are class indices ``0..max``, all non-integers are class
    names (sorted). A label outside the set, a negative index, or a name among index labels raises
    ``ValueError('<file>:<line>: unknown label ...')``; an unknown label never becomes an extra class.
    Labels are class names; an integer label that is not a name is an index into the class list, unless some
    class names are integers themselves (``3,5,7``): then labels are names only and such a label is unknown
    (``'1'`` is never taken as the second class). Relative paths resolve against ``image_root`` (default: the
    CSV's folder). Raises ``FileNotFoundError`` for a missing CSV or class file.
    """
    base = image_root if image_root is not None else os.path.dirname(os.path.abspath(path))
    rows = [(lineno, p if os.path.isabs(p) else os.path.join(base, p), label)
            for lineno, p, label in read_label_rows(path)]
    if not rows:
        raise ValueError(f"{path}: no 'path,label' rows")
    where = ""
    if classes is None:
        beside = os.path.join(os.path.dirname(os.path.abspath(path)), CLASSES_FILE)
        if os.path.isfile(beside):
            classes, where = _read_classes(beside), f" listed in {beside}"
    if classes is None:
        is_index = [_is_index(label) for _, _, label in rows]
        if all(is_index):
            lineno, _, label = min(rows, key=lambda r: int(r[2]))
            if int(label) < 0:
                raise ValueError(f"{path}:{lineno}: unknown label {label!r} (negative class index)")
            lineno, _, label = max(rows, key=lambda r: int(r[2]))
            if int(label) >= MAX_CLASSES:
                raise ValueError(f"{path}:{lineno}: unknown label {label!r} (class indices above {MAX_CLASSES - 1} "
                                 f"need a class list: the dataset's classes=, zeroshot_eval's --classnames, or "
                                 f"{CLASSES_FILE} beside the CSV)")
            classes = [str(i) for i in range(max(int(r[2]) for r in rows) + 1)]
            return [(p, int(label)) for _, p, label in rows], classes
        if any(is_index):  # indices and names mixed: the minority kind is the odd one out
            odd = not (sum(is_index) * 2 >= len(rows))
            lineno, _, label = next(r for r, k in zip(rows, is_index) if k == odd)
            kind = "class indices" if not odd else "class names"
            raise ValueError(f"{path}:{lineno}: unknown label {label!r} (the other labels are {kind}; "
                             f"fix the class list with the dataset's classes=, zeroshot_eval's --classnames, or "
                             f"{CLASSES_FILE} beside the CSV)")
        classes = sorted({label for _, _, label in rows})
    index = {c: i for i, c in enumerate(classes)}
    # integer class names ('3', '5', '7'): an integer label is a name, never an index (ambiguous otherwise)
    numeric_names = next((c for c in classes if _is_index(c)), None)
    samples = []
    for lineno, p, label in rows:
        if label in index:
            samples.append((p, index[label]))
        elif numeric_names is None and _is_index(label) and 0 <= int(label) < len(classes):
            samples.append((p, int(label)))
        else:
            why = (f"; the class names are integers (e.g. {numeric_names!r}), so an integer label is a class "
                   f"name, not an index" if numeric_names is not None and _is_index(label) else "")
            raise ValueError(f"{path}:{lineno}: unknown label {label!r} (not one of the {len(classes)} "
                             f"classes{where}{why})")
    return samples, list(classes)


@DATASETS.register_module()
class ImageFolderDataset(Dataset):
    """Single-label classification images from a folder tree or a ``path,label`` CSV.

    Args:
        data_root: dataset folder.
        split: sub-folder of ``data_root`` holding ``<class>/<image>`` (e.g. ``'train'``); ignored with
            ``ann_file``.
        ann_file: CSV of ``path,label`` rows (relative to ``data_root``); relative image paths resolve
            against ``data_root``.
        classes: class names in label order (a list or a text file, one per line); default: sorted folder
            names / CSV labels.
        transform: dict for :func:`build_cls_transform` (``image_size``, ``train``, ``mean``, ``std``,
            ``interpolation``, ``resize_mode``) or a callable.
        check_files: verify that every listed image exists when the dataset is built.
        allow_empty: accept class folders without an image (folder layout). By default they are refused, as
            torchvision's ``ImageFolder`` does: an empty folder is more often a failed copy than a choice.

    A class without any sample (an empty folder with ``allow_empty=True``, or a class of the CSV's class list
    that no row names, the documented way to describe a split that lacks a class) gives one ``UserWarning``
    naming the classes: a training split then never shows the head that class, and ``accuracy/mean_recall``
    of an evaluation split averages over fewer classes. ``class_counts`` holds the number of samples per class.

    Raises ``FileNotFoundError`` (a missing folder, CSV, class file or listed image) and ``ValueError`` (bad
    labels, no images, empty class folders without ``allow_empty``, a bad ``transform``), naming the problem.
    """

    def __init__(self, data_root: str, split: Optional[str] = None, ann_file: Optional[str] = None,
                 classes: Union[str, Sequence[str], None] = None, transform: TransformLike = None,
                 check_files: bool = True, allow_empty: bool = False) -> None:
        data_root = os.path.expanduser(os.fspath(data_root))
        names = _read_classes(classes)
        if ann_file is not None:
            source = ann_file if os.path.isabs(ann_file) else os.path.join(data_root, ann_file)
            self.samples, self.classes = read_csv(source, names, image_root=data_root)
        else:
            source = os.path.join(data_root, split) if split else data_root
            self.samples, self.classes = scan_folder(source, names, allow_empty=allow_empty)
        empty = empty_classes(self.samples, self.classes)
        if empty:
            warnings.warn(f"{source}: no samples of {_empty_text(empty)} ({len(self.samples)} samples in "
                          f"{len(self.classes) - len(empty)} of {len(self.classes)} classes): a training split "
                          f"never shows them to the head; an evaluation split scores mean_recall over the other "
                          f"classes", UserWarning, stacklevel=2)
        if check_files:
            for p, _ in self.samples:
                if not os.path.isfile(p):
                    raise FileNotFoundError(f"{p}: image listed in the dataset not found")
                if not is_image_file(p):
                    raise ValueError(f"{p}: not an image file")
        self.transform_cfg = transform if not callable(transform) else None
        self.transform = build_cls_transform(transform)
        self.data_root = data_root

    @property
    def metainfo(self) -> dict:
        return {"classes": tuple(self.classes)}

    @property
    def paths(self) -> list[str]:
        return [p for p, _ in self.samples]

    @property
    def labels(self) -> list[int]:
        return [label for _, label in self.samples]

    @property
    def class_counts(self) -> dict[str, int]:
        """The number of samples of each class, in class order (zero for a class without samples)."""
        counts = dict.fromkeys(self.classes, 0)
        for _, label in self.samples:
            counts[self.classes[label]] += 1
        return counts

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> dict:
        path, label = self.samples[idx]
        try:
            img = load_image(path)
        except Exception as e:  # noqa: BLE001 - name the file
            raise DataError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
        return dict(inputs=self.transform(img), data_samples=dict(gt_label=label, index=idx))


# ---------------------------------------------------------------------------------------------------
# Toy data: scikit-learn's bundled handwritten digits, rendered as RGB images
# ---------------------------------------------------------------------------------------------------
TOY_MANIFEST = "dataset.json"


def _check_toy_split(targets, is_val, val_fraction: float) -> None:
    """Refuse a split that leaves a class without a train or a val image (the split is stratified)."""
    import numpy as np

    n_val = np.bincount(targets[is_val], minlength=10)
    n_train = np.bincount(targets[~is_val], minlength=10)
    short = [(name, c) for name, counts in (("val", n_val), ("train", n_train))
             for c in range(10) if counts[c] == 0]
    if not short:
        return
    smallest = int(np.bincount(targets).min())  # 1 <= round(n * f) <= n - 1 for every class size n
    lo, hi = math.ceil(500 / smallest) / 1000, math.floor(1000 - 500 / smallest) / 1000
    name = short[0][0]
    classes = [str(c) for split, c in short if split == name]
    what = f"the {name} split empty" if len(classes) == 10 else f"{len(classes)} classes without a {name} image"
    raise ValueError(f"val_fraction {val_fraction} (--val-fraction) leaves {what}: {int(n_train.sum())} train / "
                     f"{int(n_val.sum())} val images (no {name} image of class {', '.join(classes)}); every class "
                     f"needs an image in each split: use a value between {lo} and {hi}")


def make_toy_digits(out_dir: str, *, image_size: int = 32, val_fraction: float = 0.2, seed: int = 0,
                    overwrite: bool = False) -> dict:
    """Render scikit-learn's digits (1797 8×8 images, 10 classes) into ``out_dir`` (no download).

    Layout: ``train/<digit>/<id>.png``, ``val/<digit>/<id>.png``, ``train.csv`` / ``val.csv`` (``path,label``)
    and ``classes.txt``; the split is stratified and deterministic (``seed``). The folder is written into a
    temporary sibling and renamed into place. If ``out_dir`` already holds the same dataset (same
    ``dataset.json``) it is kept; a missing or empty folder is written; anything else (another toy dataset,
    any other non-empty folder, a file) raises ``FileExistsError`` unless ``overwrite=True``, which replaces
    it. Returns the manifest.

    Every class gets at least one image in each split: a ``val_fraction`` that would leave a class (or a whole
    split) without images raises ``ValueError`` naming it and the resulting counts, before anything is written;
    ``image_size`` outside 8..1024 and ``val_fraction`` outside (0, 1) raise ``ValueError`` too.
    """
    import numpy as np
    from PIL import Image
    from sklearn.datasets import load_digits

    if not 8 <= image_size <= 1024:
        raise ValueError(f"image_size must be between 8 and 1024, got {image_size}")
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    digits = load_digits()
    images, targets = digits.images, digits.target
    rng = np.random.RandomState(seed)
    split = np.zeros(len(targets), dtype=bool)  # True = val
    for c in range(10):
        idx = np.flatnonzero(targets == c)
        idx = idx[rng.permutation(len(idx))]
        split[idx[: int(round(len(idx) * val_fraction))]] = True
    _check_toy_split(targets, split, val_fraction)

    manifest = dict(name="sklearn-digits", image_size=image_size, val_fraction=val_fraction, seed=seed,
                    classes=[str(i) for i in range(10)])
    out_dir = os.path.abspath(os.path.expanduser(out_dir))
    is_empty_dir = os.path.isdir(out_dir) and not os.path.islink(out_dir) and not os.listdir(out_dir)
    if os.path.lexists(out_dir) and not is_empty_dir:
        try:
            with open(os.path.join(out_dir, TOY_MANIFEST), encoding="utf-8") as f:
                old = json.load(f)
        except (OSError, ValueError):
            old = None
        if old is not None and {k: old.get(k) for k in manifest} == manifest and not overwrite:
            return old
        if not overwrite:
            raise FileExistsError(f"{out_dir}: exists and is not this toy dataset; refusing to replace it "
                                  f"(pass --overwrite / overwrite=True)")

    with atomic_write(out_dir, is_dir=True) as tmp:
        rows = {"train": [], "val": []}
        for i, (img, y) in enumerate(zip(images, targets)):
            name = "val" if split[i] else "train"
            rel = os.path.join(name, str(y), f"{i:04d}.png")
            os.makedirs(os.path.join(tmp, name, str(y)), exist_ok=True)
            grey = (img * (255.0 / 16.0)).round().astype(np.uint8)
            pil = Image.fromarray(grey).resize((image_size, image_size), Image.Resampling.BILINEAR)
            pil.convert("RGB").save(os.path.join(tmp, rel))
            rows[name].append((rel, str(y)))
        for name, items in rows.items():
            with open(os.path.join(tmp, f"{name}.csv"), "w", newline="", encoding="utf-8") as f:
                w = csv.writer(f)
                w.writerow(["path", "label"])
                w.writerows(items)
        with open(os.path.join(tmp, "classes.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(manifest["classes"]) + "\n")
        manifest.update(num_train=len(rows["train"]), num_val=len(rows["val"]))
        with open(os.path.join(tmp, TOY_MANIFEST), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
    return manifest
