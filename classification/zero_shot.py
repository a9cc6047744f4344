"""Zero-shot classification (reference-spec §8): class-name metadata, template-ensembled classifiers, evaluation.

Works with InternVL-C/G models (``mode=`` picks the image embedding) and with any open_clip-style model
(``encode_image`` / ``encode_text`` plus a tokenizer callable returning token ids).
"""
from __future__ import annotations

import difflib
import inspect
import json
import os
import re
import unicodedata
import warnings
from typing import Callable, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from internvit.features import nonfinite_hint
from internvit.text import encode_texts, model_device

from .checks import check_labels, check_scores_and_labels

METADATA_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "metadata")
#: languages of the published multilingual ImageNet table, and the CLIP_benchmark spellings accepted too
LANGUAGES = ("en", "zh", "ja", "ar", "it")
_LANG_ALIASES = {"cn": "zh", "jp": "ja"}
#: zero-shot logits are ``100 * image @ classifier`` (not ``exp(logit_scale)``)
ZERO_SHOT_SCALE = 100.0

Template = Union[str, Callable[[str], str]]


# ---------------------------------------------------------------------------------------------------
# Metadata
# ---------------------------------------------------------------------------------------------------
def _lang(lang: str) -> str:
    key = _LANG_ALIASES.get(lang.lower(), lang.lower())
    if key not in LANGUAGES:
        raise ValueError(f"lang must be one of {', '.join(LANGUAGES)} (or cn/jp), got {lang!r}")
    return key


def _read_json(name: str):
    with open(os.path.join(METADATA_DIR, name), encoding="utf-8") as f:
        return json.load(f)


def _canon_dataset(dataset: str) -> str:
    return dataset.strip().lower().replace("imagenet_a", "imagenet-a").replace("imagenet_r", "imagenet-r") \
        .replace("imagenet_o", "imagenet-o")


def list_datasets(lang: str = "en") -> list[str]:
    """Dataset keys :func:`load_classnames` accepts for ``lang``."""
    variants = _read_json("imagenet_variants.json")
    own = _read_json(f"{_lang(lang)}_classnames.json")
    return sorted(set(own) | set(variants["subsets"]) | set(variants["same_classes_as_imagenet1k"]))


def load_classnames(lang: str = "en", dataset: str = "imagenet1k") -> list[str]:
    """Class names shipped for ``dataset`` in ``lang`` (en, zh, ja, ar, it).

    ImageNet-A / -R / -O give their 200-class subsets of the ImageNet-1k names (in ImageNet index order);
    ImageNet-V2 / -Sketch / -ReaL share the 1000 ImageNet-1k names.
    """
    names = _read_json(f"{_lang(lang)}_classnames.json")
    variants = _read_json("imagenet_variants.json")
    key = _canon_dataset(dataset)
    if key in names:
        return list(names[key])
    if key in variants["same_classes_as_imagenet1k"]:
        return list(names["imagenet1k"])
    if key in variants["subsets"]:
        keep = set(variants["subsets"][key])
        return [c for c, w in zip(names["imagenet1k"], variants["imagenet1k_wnids"]) if w in keep]
    known = ", ".join(list_datasets(lang))
    raise ValueError(f"no class names for dataset {dataset!r} in lang {lang!r}; known: {known}")


def _known_datasets() -> set[str]:
    """Every dataset key the shipped metadata names, in any language."""
    variants = _read_json("imagenet_variants.json")
    keys = set(variants["subsets"]) | set(variants["same_classes_as_imagenet1k"])
    for lang in LANGUAGES:
        keys |= set(_read_json(f"{lang}_templates.json")) | set(_read_json(f"{lang}_classnames.json"))
    return keys


def load_templates(lang: str = "en", dataset: str = "imagenet1k") -> list[str]:
    """Prompt templates (format strings with ``{c}``) of a known ``dataset``; known datasets without their own
    list in ``lang`` use ImageNet-1k's (CLIP_benchmark's rule). Raises ``ValueError`` for a dataset key the
    shipped metadata does not know (a typo never silently gives the ImageNet templates)."""
    templates = _read_json(f"{_lang(lang)}_templates.json")
    key = _canon_dataset(dataset)
    if key in templates:
        return list(templates[key])
    if key not in _known_datasets():
        near = difflib.get_close_matches(key, sorted(_known_datasets()), n=3)
        raise ValueError(f"unknown template set / dataset {dataset!r}"
                         + (f" (did you mean {', '.join(near)}?)" if near else "")
                         + "; give a known key or a .txt/.json file of templates")
    return list(templates["imagenet1k"])


def imagenet_wnids(dataset: str = "imagenet1k") -> list[str]:
    """WordNet ids of the classes of ``dataset`` in label order (the ImageFolder order of the ImageNet sets)."""
    variants = _read_json("imagenet_variants.json")
    key = _canon_dataset(dataset)
    if key in variants["subsets"]:
        return list(variants["subsets"][key])
    return list(variants["imagenet1k_wnids"])


# ---------------------------------------------------------------------------------------------------
# Classifier
# ---------------------------------------------------------------------------------------------------
def _format(template: Template, classname: str) -> str:
    # "{c}" (CLIP_benchmark JSON) and "{}" (open_clip strings) both work
    return template(classname) if callable(template) else template.format(classname, c=classname)


def _shown(name: str) -> str:
    """``repr(name)``, or ``ascii(name)`` for a name that is not NFC-normalised or not printable: names that look
    alike but are different strings (NFC vs NFD ``'café'``) are told apart in messages."""
    name = str(name)
    return repr(name) if unicodedata.is_normalized("NFC", name) and name.isprintable() else ascii(name)


def _model_dtype(model) -> torch.dtype:
    return next((p.dtype for p in getattr(model, "parameters", lambda: [])() if p.is_floating_point()),
                torch.float32)


def _in_dtype_hint(dtype: torch.dtype) -> str:
    return f"in {str(dtype).replace('torch.', '')}: {nonfinite_hint(dtype)}"


def _accepts(fn, name: str) -> bool:
    try:
        return name in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def build_zero_shot_classifier(
    model,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    batch_size: int = 256,
    device: Optional[Union[str, torch.device]] = None,
    num_classes_per_batch: Optional[int] = None,
    use_tqdm: bool = False,
) -> torch.Tensor:
    """``(embed_dim, num_classes)`` fp32 zero-shot weights, as open_clip's function of the same name.

    Every template (a format string with ``{c}`` or a callable) is filled with every class name; all texts
    are encoded in batches of ``batch_size`` across classes and templates; each embedding is L2-normalised,
    averaged over the templates of its class and renormalised. ``num_classes_per_batch`` (open_clip's
    argument) sets ``batch_size = num_classes_per_batch * len(templates)``. ``use_tqdm`` is accepted for
    signature compatibility.

    Raises ``ValueError`` for an empty class-name or template list, and for text embeddings that are not finite
    (NaN or infinity: broken weights or a precision overflow), naming the class names that gave them. Templates
    are checked as :func:`resolve_templates` checks them (``TypeError`` / ``ValueError`` naming the template).
    """
    del use_tqdm
    classnames = list(classnames)
    if not classnames:
        raise ValueError("classnames is empty")
    # the CLI's checks (resolve_templates): a None template was an AttributeError, one without the class name
    # gave every class the same prompt
    templates = resolve_templates(list(templates))
    if num_classes_per_batch:
        batch_size = num_classes_per_batch * len(templates)
    texts = [_format(t, c) for c in classnames for t in templates]
    n_t = len(templates)
    by_template = [range(j, len(texts), n_t) for j in range(n_t)]  # one template, every class: shared prefix
    emb = encode_texts(model, tokenizer, texts, batch_size=batch_size, device=device, groups=by_template)
    bad = (~torch.isfinite(emb).all(dim=1)).reshape(len(classnames), n_t).any(dim=1).nonzero().flatten().tolist()
    if bad:
        shown = ", ".join(_shown(classnames[i]) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"the text embeddings of {len(bad)} of {len(classnames)} class names are not finite "
                         f"(NaN or infinity): {shown}; {_in_dtype_hint(_model_dtype(model))}")
    emb = emb.reshape(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(emb, dim=-1).t().contiguous()


# ---------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------
def encode_images(model, images: torch.Tensor, mode: Optional[str] = None) -> torch.Tensor:
    """``model.encode_image`` (with ``mode=`` for models that take it), L2-normalised, fp32."""
    if mode is not None and _accepts(model.encode_image, "mode"):
        feats = model.encode_image(images, mode=mode)
    else:
        feats = model.encode_image(images)
    return F.normalize(feats.float(), dim=-1)


def classification_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict:
    """``acc1``, ``acc5`` and ``mean_per_class_recall`` (over classes present in ``target``).

    With 5 classes or fewer top-5 says nothing (every image would count as a hit): ``acc5`` is ``None`` and
    ``acc5_note`` says why (CLIP_benchmark reports NaN below 5 classes; JSON has no NaN). Raises ``ValueError``
    (:func:`classification.checks.check_scores_and_labels`) for NaN / infinite logits and for targets that are
    not integers in ``[0, num_classes)``.
    """
    logits, target = check_scores_and_labels(logits, target, "zero-shot metrics")
    n, c = logits.shape
    top = logits.topk(min(5, c), dim=1).indices
    hit = top == target[:, None]
    pred = top[:, 0]
    present = torch.unique(target)
    recalls = torch.stack([(pred[target == k] == k).double().mean() for k in present])
    out = dict(acc1=hit[:, :1].any(1).double().mean().item(), acc5=hit.any(1).double().mean().item() if c > 5 else None,
               mean_per_class_recall=recalls.mean().item())
    if c <= 5:
        out["acc5_note"] = (f"top-5 says nothing with {c} classes (every image is a hit with 5 classes or fewer): "
                            f"acc5 is null")
    return out


def _split_batch(batch) -> tuple[Optional[torch.Tensor], torch.Tensor, list, Optional[list]]:
    if isinstance(batch, dict):
        images = batch.get("pixel_values", batch.get("inputs", batch.get("images")))
        return images, torch.as_tensor(batch["labels"] if "labels" in batch else batch["target"]), [], None
    images, target = batch[0], batch[1]
    errors = list(batch[2]) if len(batch) > 2 and isinstance(batch[2], (list, tuple)) else []
    ids = list(batch[3]) if len(batch) > 3 and isinstance(batch[3], (list, tuple)) else None
    return images, torch.as_tensor(target), errors, ids


def _failed_entry(error, paths: Optional[Sequence[str]]) -> dict:
    """``{'path', 'error'}`` of a skipped item: ``error`` is ``(index, message)`` (or a bare message)."""
    if isinstance(error, (tuple, list)) and len(error) == 2:
        i, msg = error
        return {"path": str(paths[i]) if paths is not None and isinstance(i, int) and 0 <= i < len(paths)
                else str(i), "error": str(msg)}
    return {"path": "?", "error": str(error)}


def check_finite_classifier(classifier: torch.Tensor) -> None:
    """Raises ``ValueError`` naming the classes (columns) of a classifier that hold NaN or infinity."""
    bad = (~torch.isfinite(classifier).all(dim=0)).nonzero().flatten().tolist()
    if bad:
        raise ValueError(f"the classifier has non-finite (NaN or infinity) weights in {len(bad)} of "
                         f"{classifier.shape[1]} classes (first: class {bad[0]})")


class NonFinite:
    """Counts embeddings that hold NaN or infinity over a run, remembering the first one's name."""

    def __init__(self, what: str) -> None:
        self.what, self.count, self.seen, self.first = what, 0, 0, None

    def keep(self, feats: torch.Tensor, names: Optional[Sequence[str]] = None) -> torch.Tensor:
        """The mask of finite rows of ``feats`` (rows named by ``names``, when given, for the message)."""
        finite = torch.isfinite(feats).all(dim=1)
        self.seen += len(feats)
        if not bool(finite.all()):
            self.count += int((~finite).sum())
            if self.first is None and names is not None:
                self.first = names[int((~finite).nonzero()[0])]
        return finite

    def check(self, dtype: torch.dtype) -> None:
        """Raises ``ValueError`` when any embedding was not finite: no metric is computed over them."""
        if self.count:
            first = f"; first: {self.first}" if self.first is not None else ""
            raise ValueError(f"{self.count} of {self.seen} {self.what} gave non-finite embeddings (NaN or "
                             f"infinity){first}; {_in_dtype_hint(dtype)} (no metric is computed over them)")


def zero_shot_evaluate(
    model,
    classifier: torch.Tensor,
    dataloader: Iterable,
    *,
    mode: Optional[str] = "InternVL-C",
    device: Optional[Union[str, torch.device]] = None,
    dtype: Optional[torch.dtype] = None,
    paths: Optional[Sequence[str]] = None,
    labels: Optional[Sequence[int]] = None,
    classnames: Optional[Sequence[str]] = None,
) -> dict:
    """Top-1 / top-5 accuracy and mean per-class recall (fractions in [0, 1]) of a zero-shot classifier.

    ``dataloader`` yields ``(images, targets)``, optionally with a third element, a list of ``(index, message)``
    for items that could not be read, and a fourth, the dataset indices of the images (for messages), or dicts
    with ``pixel_values``/``inputs`` and ``labels``. Skipped items are counted in ``num_failed`` and listed in
    ``failed`` (``[{'path', 'error'}]``; ``paths[index]`` names them). Image embeddings are L2-normalised and
    scored as ``100 * feat @ classifier``. ``dtype`` is the dtype the images are cast to (default: the model's).

    ``labels`` (the label of every dataset index) and ``classnames`` (the classifier's) let skipped images be
    told apart by class: a class whose every listed image was skipped is named in one ``UserWarning`` and in
    ``emptied_classes`` (:func:`warn_emptied_classes`); ``mean_per_class_recall`` leaves it out.

    Raises ``ValueError`` when an image embedding or the classifier is not finite (NaN or infinity; counted and
    refused, never scored), when no image could be read, or a label is not an integer in range.
    """
    device = torch.device(device) if device is not None else model_device(model)
    if dtype is None:
        dtype = _model_dtype(model)
    classifier = classifier.to(device=device, dtype=torch.float32)
    check_finite_classifier(classifier)
    all_logits, all_target, failed = [], [], []
    nonfinite = NonFinite("images")
    with torch.no_grad():
        for batch in dataloader:
            images, target, errors, ids = _split_batch(batch)
            failed.extend(_failed_entry(e, paths) for e in errors)
            if images is None or len(target) == 0:
                continue
            feats = encode_images(model, images.to(device=device, dtype=dtype), mode)
            names = [paths[i] for i in ids] if ids is not None and paths is not None else None
            if not bool(nonfinite.keep(feats, names).all()):
                continue
            all_logits.append((ZERO_SHOT_SCALE * feats @ classifier).cpu())
            all_target.append(check_labels(target.cpu(), what="labels"))
    nonfinite.check(dtype)
    if not all_logits:
        if failed:
            raise ValueError(f"none of the {len(failed)} images could be read (first: {failed[0]['path']}: "
                             f"{failed[0]['error']})")
        raise ValueError("zero_shot_evaluate: the dataloader yielded no images")
    target = torch.cat(all_target)
    out = classification_metrics(torch.cat(all_logits), target)
    out.update(num_samples=int(len(target)), num_failed=len(failed), failed=failed,
               num_classes=int(classifier.shape[1]),
               emptied_classes=warn_emptied_classes(target, labels, classnames, "images"))
    return out


def warn_emptied_classes(scored: torch.Tensor, labels: Optional[Sequence[int]],
                         classnames: Optional[Sequence[str]], what: str) -> list[str]:
    """The classes that have samples in ``labels`` (every listed sample's label) but none among the ``scored``
    labels: all their files were skipped as unreadable. One ``UserWarning`` names them (a recall averaged over
    the other classes, or an accuracy without them, is not the number of the data as listed). Classes are
    named by ``classnames`` (else by index). Returns the names (empty without ``labels``)."""
    if labels is None:
        return []
    present = set(torch.as_tensor(scored).reshape(-1).tolist())
    gone = sorted({int(y) for y in labels} - present)
    names = [str(classnames[i]) if classnames is not None and 0 <= i < len(classnames) else str(i) for i in gone]
    if names:
        from .datasets import _empty_text

        warnings.warn(f"every {what[:-1]} of {_empty_text(names)} was skipped as unreadable: "
                      f"{'those classes have' if len(names) > 1 else 'that class has'} no sample in the metrics "
                      f"(left out of mean_per_class_recall, {len(present)} of {len({int(y) for y in labels})} "
                      f"listed classes scored); fix or remove the unreadable {what}", UserWarning, stacklevel=3)
    return names


# ---------------------------------------------------------------------------------------------------
# Folder / CSV evaluation (tools/zeroshot_eval.py)
# ---------------------------------------------------------------------------------------------------
_WNID = re.compile(r"^n\d{8}$")


_LIST_SUFFIXES = (".txt", ".json")


def _read_list(path: str, what: str = "list") -> list[str]:
    """Lines of a ``.txt`` (:func:`classification.datasets.read_list_lines`: a byte-order mark and the white space
    around each line are not part of an entry; a blank line between entries or a file that is not UTF-8 is
    refused naming the line) or a JSON list of strings; an empty list is an error."""
    if path.lower().endswith(".json"):
        from internvit.cli import read_json

        data = read_json(path)
        if not isinstance(data, list) or not all(isinstance(x, str) for x in data):
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        from .datasets import read_list_lines

        data = read_list_lines(path, what)
    if not data:
        raise ValueError(f"{path}: empty (no entries)")
    return data


def _looks_like_path(spec: str) -> bool:
    return spec.lower().endswith(_LIST_SUFFIXES) or os.sep in spec or (os.altsep or os.sep) in spec


def _list_or_key(spec: str, what: str, by_key: Callable[[str], list]) -> list:
    """A file's entries when ``spec`` names an existing file, a shipped key's otherwise; a path that does not
    exist is ``FileNotFoundError``, never read as a key."""
    if os.path.isfile(spec):
        return _read_list(spec, what)
    if _looks_like_path(spec):
        raise FileNotFoundError(f"{what} file {spec}: not found")
    return by_key(spec)


def _norm_class(name: str) -> str:
    """Class-name matching key: Unicode NFC, case-insensitive, ``_`` read as a space, runs of white space as one."""
    return " ".join(unicodedata.normalize("NFC", str(name)).replace("_", " ").split()).casefold()


def check_class_names(names: Sequence[str], source: str, *, shipped: bool = False,
                      entries: Optional[Sequence[str]] = None) -> None:
    """Refuse (or, for a ``shipped`` list, warn about) class names that are empty or equal after matching
    normalisation (:func:`match_classes`' rule: NFC, case, ``_`` = space): such classes get identical text
    classifiers, so every image ties between them and the first one wins.

    ``source`` names the list in messages; ``entries`` (default: the names) are what each position is shown as,
    e.g. the folder names a list was made from. A shipped list (the upstream metadata, kept unchanged for parity
    with published numbers) gives one ``UserWarning`` naming how many names repeat and the first few, and any
    empty name by index. Otherwise raises ``ValueError`` naming an empty entry or the first two duplicates.
    """
    names = [str(n) for n in names]
    entries = names if entries is None else [str(e) for e in entries]
    at: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        at.setdefault(_norm_class(n), []).append(i)
    twice = [pos for key, pos in at.items() if len(pos) > 1 and key]
    empty = at.get("", [])
    if shipped:
        parts = []
        if twice:
            shown = ", ".join(_shown(names[p[0]]) for p in twice[:3]) + (", ..." if len(twice) > 3 else "")
            parts.append(f"{len(twice)} {'name appears' if len(twice) == 1 else 'names appear'} more than once "
                         f"({sum(map(len, twice))} classes: {shown}); those classes get identical classifiers and "
                         f"tie (the first one wins)")
        if empty:
            parts.append(f"empty class name at index {', '.join(map(str, empty[:5]))}")
        spaced = [i for i, n in enumerate(names) if n != n.strip()]
        if spaced:
            parts.append(f"{len(spaced)} names have leading or trailing white space (first: index {spaced[0]}, "
                         f"{_shown(names[spaced[0]])}), kept in the prompts")
        if parts:
            warnings.warn(f"class names {source} (the upstream list, kept as is for parity): " + "; ".join(parts),
                          UserWarning, stacklevel=3)
        return
    if empty:
        raise ValueError(f"{source}: empty class name at position {empty[0]} ({_shown(entries[empty[0]])})")
    if twice:
        i, j = twice[0][:2]
        more = f" (and {len(twice) - 1} more duplicates)" if len(twice) > 1 else ""
        raise ValueError(f"{source}: duplicate class names: {_shown(entries[i])} (position {i}) and "
                         f"{_shown(entries[j])} (position {j}) are the same name after normalisation (Unicode "
                         f"NFC, case, '_' = space){more}; they would get identical classifiers: name every class "
                         f"once")


def match_classes(names: Sequence[str], data_classes: Sequence[str]) -> list[int]:
    """For each class of a dataset (folder names / CSV labels, in label order), its position in ``names``.

    Rules, in order:

    1. **by name**: every data class equals exactly one name (case-insensitive, ``_`` = space), in any order
       (``names`` may hold more classes than the data); a class that equals no name may be an index
       (``3``: the fourth name); no two classes may land on one name;
    2. **by index**: every data class is an integer (``0``, ``1``, ...) below ``len(names)``;
    3. **by position** (the torchvision ``ImageFolder`` / CLIP_benchmark convention: names listed in the
       data's sorted class order, e.g. EuroSAT's ``AnnualCrop`` → ``annual crop land``): as many names as
       classes, and no data class equals a name at another position.

    Raises ``ValueError`` naming the first class that fits none (a name list in another order than the
    folders is refused, never paired by position: that scores images against the wrong names).
    """
    names, data_classes = [str(n) for n in names], [str(c) for c in data_classes]
    at: dict[str, list[int]] = {}
    for i, n in enumerate(names):
        at.setdefault(_norm_class(n), []).append(i)
    hits = [at.get(_norm_class(c), []) for c in data_classes]
    from .datasets import _is_index

    def as_index(c: str) -> Optional[int]:
        return int(c) if _is_index(c) and 0 <= int(c) < len(names) else None

    by_name = [h[0] if len(h) == 1 else (as_index(c) if not h else None) for c, h in zip(data_classes, hits)]
    if None not in by_name and len(set(by_name)) == len(by_name):
        return by_name
    by_index = [as_index(c) for c in data_classes]
    if None not in by_index:
        return by_index
    if len(names) == len(data_classes) and all(not h or j in h for j, h in enumerate(hits)):
        return list(range(len(names)))
    for j, (c, h) in enumerate(zip(data_classes, hits)):
        if len(h) > 1 and (len(names) != len(data_classes) or j not in h):
            raise ValueError(f"class {c!r} matches {len(h)} class names (positions {h[:3]}): name every class once")
        if h and j not in h and len(names) == len(data_classes):
            raise ValueError(f"class {c!r} (label {j}) is class name {h[0]} ({names[h[0]]!r}), but the name at "
                             f"position {j} is {names[j]!r}: list the class names in the data's class order "
                             f"(sorted folder names) or give names that match every class")
    if all(_is_index(c) for c in data_classes):  # index labels: the classes are 0..max, the max is what overflows
        top = max(int(c) for c in data_classes)
        raise ValueError(f"the data's labels are class indices up to {top}, but {len(names)} class names are given "
                         f"(indices 0..{len(names) - 1}): give a class name for every index")
    missing = [c for c, h in zip(data_classes, hits) if not h]
    shown = ", ".join(map(repr, missing[:3])) + (", ..." if len(missing) > 3 else "")
    raise ValueError(f"{len(names)} class names given but the data has {len(data_classes)} classes, and "
                     f"{len(missing)} of them ({shown}) match no class name "
                     f"(matched by name, case-insensitive, '_' = space, or by index)")


#: a class name that is a number (``3``, ``003``, ``3.0``, ``-1``, ``1e3``): it names nothing for a text prompt
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


def resolve_class_index(spec: Optional[Union[str, Sequence[str]]], data_classes: Sequence[str],
                        lang: str = "en", by_key: Optional[Callable[[str], list]] = None
                        ) -> tuple[list[str], list[int]]:
    """``(names, index)``: the candidate class names and, for each class of the data (label order), its
    position in ``names`` (relabel a sample with ``index[label]``).

    ``spec``: ``None`` (the data's own classes: ImageNet WordNet-id folders such as ``n01440764`` get their
    shipped names in ``lang``, other names are used with ``_`` read as a space; classes that are all numbers,
    index labels or folders ``000/``, ``001/``, are refused: they name nothing), a list, a ``.txt`` / ``.json``
    file, or a shipped key (``by_key``, default :func:`load_classnames` in ``lang``). WordNet-id classes are
    matched to an ImageNet key by id; everything else by :func:`match_classes`. Every list goes through
    :func:`check_class_names`: the data's own classes and lists of your own with an empty name or two names that
    normalise to the same one are refused; a shipped list with such names gives a warning. Raises
    ``ValueError`` / ``FileNotFoundError`` naming the problem.
    """
    data_classes = [str(c) for c in data_classes]
    wnid_data = bool(data_classes) and all(_WNID.match(c) for c in data_classes)
    if spec is None:
        if wnid_data:
            by_wnid = dict(zip(imagenet_wnids("imagenet1k"), load_classnames(lang, "imagenet1k")))
            unknown = [c for c in data_classes if c not in by_wnid]
            if unknown:
                raise ValueError(f"folder classes {unknown[:3]} are not ImageNet-1k WordNet ids; pass --classnames")
            names = [by_wnid[c] for c in data_classes]
            check_class_names(names, f"imagenet1k ({_lang(lang)}) of the WordNet-id folders", shipped=True)
            return names, list(range(len(data_classes)))
        numbers = [c for c in data_classes if _NUMBER.fullmatch(c.strip())]
        if numbers:  # '0', '000', '3.0': indices (or codes), nothing a text prompt can describe
            shown = ", ".join(map(repr, numbers[:3])) + (", ..." if len(numbers) > 3 else "")
            some = "" if len(numbers) == len(data_classes) else f" ({len(numbers)} of {len(data_classes)})"
            raise ValueError(f"the data's classes are numbers{some} ({shown}: folder names / CSV labels), class "
                             f"indices rather than names a text prompt can describe; pass --classnames (a .txt / "
                             f".json list in index order, or a shipped list such as imagenet1k)")
        check_class_names(data_classes, "the data's classes (folder names / CSV labels)")
        return [unicodedata.normalize("NFC", c.replace("_", " ")) for c in data_classes], \
            list(range(len(data_classes)))
    key = None
    if isinstance(spec, str):
        names = _list_or_key(spec, "class names", by_key or (lambda k: load_classnames(lang, k)))
        key = None if os.path.isfile(spec) else spec
    else:
        names = [str(n) for n in spec]
    if not names:
        raise ValueError("class names: empty list")
    if key is None:  # a list of your own: duplicates and empty names are refused
        check_class_names(names, f"class names {spec}" if isinstance(spec, str) else "class names")
    index = None
    if wnid_data and key is not None and by_key is None:
        wnids = imagenet_wnids(key)
        if len(wnids) == len(names):  # an ImageNet key: folders are matched by WordNet id
            pos = {w: i for i, w in enumerate(wnids)}
            unknown = [c for c in data_classes if c not in pos]
            if unknown:
                raise ValueError(f"folder classes {unknown[:3]} are not among the {len(wnids)} WordNet ids of "
                                 f"{key!r}")
            index = [pos[c] for c in data_classes]
    if index is None:
        index = match_classes(names, data_classes)
    if key is not None:  # shipped lists keep their upstream quirks (ImageNet's two 'missile'), with a warning
        check_class_names(names, repr(key) if by_key is not None else f"{key!r} ({_lang(lang)})", shipped=True)
    return names, index


def resolve_classnames(spec: Optional[Union[str, Sequence[str]]], data_classes: Sequence[str],
                       lang: str = "en") -> list[str]:
    """Class names of the classes of a dataset, in label order (see :func:`resolve_class_index` for ``spec``
    and how names are matched to classes)."""
    names, index = resolve_class_index(spec, data_classes, lang)
    return [names[i] for i in index]


def resolve_templates(spec: Optional[Union[str, Sequence[Template]]], lang: str = "en",
                      dataset: str = "imagenet1k") -> list[Template]:
    """Templates from a list, a ``.txt`` / ``.json`` file or a shipped dataset key (default: ``dataset``'s).

    A template names the class as ``{c}``, ``{}`` or ``{0}`` (``a photo of a {0}.``). Raises
    ``FileNotFoundError`` for a path that does not exist, ``ValueError`` for an unknown key, an empty list, a
    template without a class-name field, with any other field (``{1}``, ``{name}``) or one that gives the same
    prompt for two class names (an escaped ``{{c}}``), naming the template; ``TypeError`` for anything else.
    """
    if spec is None:
        return load_templates(lang, dataset)
    if isinstance(spec, str):
        templates = _list_or_key(spec, "templates", lambda key: load_templates(lang, key))
    elif isinstance(spec, (list, tuple)):
        templates = list(spec)
    else:
        raise TypeError(f"templates must be a key, a file or a list, got {type(spec).__name__}")
    if not templates:
        raise ValueError("templates is empty")
    odd = next((k for k, t in enumerate(templates)  # the position: a None template was taken for "none found"
                if not (isinstance(t, str) or callable(t))), None)
    if odd is not None:
        raise TypeError(f"a template must be a format string or a callable, got {type(templates[odd]).__name__} "
                        f"at position {odd}")
    for t in templates:
        if isinstance(t, str):
            _check_template_fields(t)
            try:
                filled = [_format(t, name) for name in _PROBE_NAMES]
            except (KeyError, IndexError, ValueError) as e:  # '{}' and '{0}' mixed
                raise ValueError(f"template {t!r}: {e} ({_PLACEHOLDERS} is filled in)") from None
            hint = " (escaped braces '{{c}}' are not a placeholder)"
        else:  # a callable may change the name (case, articles): its prompts must only differ
            filled, hint = [str(t(name)) for name in _PROBE_NAMES], ""
        if len(set(filled)) < 2 or (isinstance(t, str) and not all(n in f for n, f in zip(_PROBE_NAMES, filled))):
            # '{{c}}' gives the same prompt for every class: identical classifiers, every image a tie
            raise ValueError(f"template {t!r} does not put the class name in the prompt: it gives {filled[0]!r} "
                             f"for every class{hint}, so every class would get the same classifier")
    return templates


#: two class names that a template must put into two different prompts (:func:`resolve_templates`)
_PROBE_NAMES = ("zebra crossing", "tabby cat")
#: the fields a template may hold: the class name as ``{c}`` (CLIP_benchmark), ``{}`` or ``{0}`` (str.format)
TEMPLATE_FIELDS = ("c", "", "0")
_PLACEHOLDERS = "only the class name, as {c}, {} or {0},"


def _check_template_fields(template: str) -> None:
    """Raise ``ValueError`` naming ``template`` when it has no class-name field (``{c}``, ``{}`` or ``{0}``), a field
    of another name or number (``{1}``, ``{name}``, ``{c.upper}``) or an unmatched brace."""
    import string

    try:
        fields = [f for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as e:  # 'a {c} and a {'
        raise ValueError(f"template {template!r}: {e} ({_PLACEHOLDERS} is filled in)") from None
    other = next((f for f in fields if f not in TEMPLATE_FIELDS), None)
    if other is not None:
        raise ValueError(f"template {template!r}: unknown field {{{other}}} ({_PLACEHOLDERS} is filled in)")
    if not fields and "{{" not in template:  # an escaped '{{c}}' is named by resolve_templates' prompt check
        raise ValueError(f"template {template!r} has no '{{c}}' placeholder (nor '{{}}' or '{{0}}') for the class "
                         f"name: every class would get the same prompt")


def _load_labeled(data: str) -> tuple[list[str], list[int], list[str]]:
    """``(paths, labels, classes)`` of an image folder (every class folder, empty ones included: candidate
    classes, with a warning that ``mean_per_class_recall`` leaves them out) or a ``path,label`` CSV (its own
    label set: see :func:`classification.datasets.read_csv`). A CSV row naming a file that does not exist is a
    ``FileNotFoundError`` (a typo or another image root would change the denominator; an existing file that
    does not decode is skipped and counted, as in a folder)."""
    from .datasets import empty_classes, read_csv, scan_folder

    if os.path.isdir(data):
        samples, classes = scan_folder(data)
    elif os.path.isfile(data) and data.lower().endswith(".csv"):
        samples, classes = read_csv(data)
        refuse_missing(data, [p for p, _ in samples], "image")
    else:
        raise FileNotFoundError(f"{data}: not an image folder (<root>/<class>/<image>) or a .csv of path,label")
    warn_empty(data, empty_classes(samples, classes), len(classes), "images")
    return [p for p, _ in samples], [label for _, label in samples], classes


def refuse_missing(data: str, paths: Sequence[str], what: str) -> None:
    """``FileNotFoundError`` naming how many of the ``paths`` a CSV ``data`` lists do not exist, and the first."""
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{data}: {len(missing)} listed {what}{'s' if len(missing) > 1 else ''} not found "
                                f"(first: {missing[0]})")


def warn_empty(data: str, empty: Sequence[str], num_classes: int, what: str) -> None:
    """One warning naming the classes of ``data`` without a sample: candidates, left out of the recall mean."""
    from .datasets import _empty_text

    if empty:
        warnings.warn(f"{data}: no {what} of {_empty_text(empty)}: candidate classes only, left out of "
                      f"mean_per_class_recall ({num_classes - len(empty)} of {num_classes} classes have {what})",
                      UserWarning, stacklevel=3)


class _LabeledImages(torch.utils.data.Dataset):
    def __init__(self, paths, labels, transform) -> None:
        from internvit.data import ImageDataset

        self.images, self.labels = ImageDataset(paths, transform), labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i]

    def collate(self, batch):
        from internvit.data import collate_images

        pixels, ids, errors = collate_images(batch)  # errors: (index, message); paths name them in `failed`
        return pixels, torch.tensor([self.labels[i] for i in ids], dtype=torch.long), errors, ids


def check_dataset(dataset: str) -> str:
    """``dataset`` if the shipped metadata knows it (any language); raises ``ValueError`` listing the known keys."""
    if _canon_dataset(dataset) not in _known_datasets():
        near = difflib.get_close_matches(_canon_dataset(dataset), sorted(_known_datasets()), n=3)
        raise ValueError(f"unknown dataset {dataset!r}" + (f" (did you mean {', '.join(near)}?)" if near else "")
                         + f"; known: {', '.join(sorted(_known_datasets()))}")
    return dataset


#: the most frames per video ``num_frames`` / ``--num-frames`` may ask for (InternVL-style evaluations use 8-32)
MAX_NUM_FRAMES = 1024
#: the input side a frame memory estimate assumes when the model's is not known
_DEFAULT_IMAGE_SIZE = 224


def _image_size_of(model) -> int:
    """The input side of ``model`` (a loaded model, or a path / preset whose config can be read), else 224."""
    cfg = getattr(model, "config", None)
    if cfg is None and isinstance(model, (str, os.PathLike)):
        from internvit.config import get_config

        try:
            cfg = get_config(model)
        except (ValueError, TypeError, OSError):
            cfg = None
    size = getattr(cfg, "image_size", None)
    return int(size) if isinstance(size, int) and size > 0 else _DEFAULT_IMAGE_SIZE


def zero_shot_input_errors(*, classnames=None, templates=None, dataset: Optional[str] = None,
                           lang: Optional[str] = None, video: bool = False, num_frames: Optional[int] = None,
                           batch_size: Optional[int] = None, model=None) -> list[tuple[tuple[str, ...], str, type]]:
    """Every refusal of the zero-shot inputs that needs neither the data nor a loaded model, for images and videos
    alike (``tools/zeroshot_eval.py``, :func:`run_zero_shot` and :func:`classification.video.run_video_zero_shot`
    share it): ``[(options, message, error class)]``, ``options`` being the command-line options a problem is about
    (``('--templates',)``; both for a conflict), in this order: ``--classnames`` (a shipped key, or a readable list
    without empty or duplicate names), ``--templates`` (a key or a readable list whose every template names the
    class as ``{c}``, ``{}`` or ``{0}`` and nothing else: :func:`resolve_templates`), ``--dataset`` (a known key:
    ImageNet-style keys for images, Kinetics keys for videos), ``--dataset`` with ``--templates`` (it would be
    unused), ``--lang`` (images only), ``--num-frames`` (videos: 1..:data:`MAX_NUM_FRAMES`; the message gives the
    memory a batch of ``batch_size`` videos of that many frames would need at ``model``'s input size).
    :func:`check_zero_shot_inputs` raises the first."""
    from . import video as vid

    errors: list[tuple[tuple[str, ...], str, type]] = []

    def attempt(options: tuple, fn: Callable[[], object]) -> None:
        try:
            fn()
        except (ValueError, FileNotFoundError, TypeError) as e:
            errors.append((options, str(e), type(e)))

    lang_ok = lang is None or lang.lower() in LANGUAGES or lang.lower() in _LANG_ALIASES
    key_lang = lang if lang is not None and lang_ok and not video else "en"  # a bad --lang is its own error
    known_dataset = dataset is None or (vid._canon(dataset) in vid.KINETICS if video
                                        else _canon_dataset(dataset) in _known_datasets())
    if classnames is not None:
        def names() -> None:
            if isinstance(classnames, str):
                by_key = vid.load_video_classnames if video else (lambda k: load_classnames(_lang(key_lang), k))
                listed = _list_or_key(classnames, "class names", by_key)
                if os.path.isfile(classnames):
                    check_class_names(listed, f"class names {classnames}")
            else:
                check_class_names([str(n) for n in classnames], "class names")

        attempt(("--classnames",), names)
    if templates is not None:
        attempt(("--templates",), lambda: vid._resolve_video_templates(templates, None) if video
                else resolve_templates(templates, _lang(key_lang)))
    if dataset is not None and not known_dataset:
        attempt(("--dataset",), lambda: vid.load_video_templates(dataset) if video else check_dataset(dataset))
    if dataset is not None and templates is not None:
        errors.append((("--dataset", "--templates"), "only picks the default templates, and templates are given "
                                                     "as well: drop one of them", ValueError))
    if lang is not None:
        if video:
            errors.append((("--lang",), "applies to images only: the video class names and templates are English",
                           ValueError))
        elif not lang_ok:
            errors.append((("--lang",), f"unknown language; known: {', '.join(LANGUAGES)} "
                                        f"({', '.join(_LANG_ALIASES)} accepted)", ValueError))
    if video and num_frames is not None:
        n, b = int(num_frames), int(batch_size or 8)
        if n < 1:
            errors.append((("--num-frames",), f"must be at least 1, got {n}", ValueError))
        elif n > MAX_NUM_FRAMES:
            side = _image_size_of(model)
            gib = b * n * 3 * side * side * 4 / 2**30
            errors.append((("--num-frames",), f"{n} frames per video is more than {MAX_NUM_FRAMES}: a batch of {b} "
                                               f"videos would hold {b * n} frames, {gib:.1f} GiB as float32 "
                                               f"{side}x{side} inputs before the model runs; use at most "
                                               f"{MAX_NUM_FRAMES} (8 to 32 is usual)", ValueError))
    return errors


def zero_shot_inputs(data: str, **named) -> list[tuple[str, str]]:
    """``[(name, path)]`` of the files and folders a zero-shot run reads: ``data`` (and the ``classes.txt`` beside a
    CSV, which :func:`classification.datasets.read_csv` reads) and every ``named`` value that is an existing path
    (``classnames``, ``templates``, ``model``, ``tokenizer``; shipped keys are not paths)."""
    from .datasets import CLASSES_FILE

    out = [("data", os.fspath(data))]
    if os.path.isfile(data):
        out.append(("data", os.path.join(os.path.dirname(os.path.abspath(data)), CLASSES_FILE)))
    out += [(k, os.fspath(v)) for k, v in named.items() if isinstance(v, (str, os.PathLike)) and os.fspath(v)]
    return [(k, v) for k, v in out if os.path.exists(v)]


def refuse_output_onto_input(output: str, inputs: Sequence[tuple[str, str]]) -> None:
    """Raise ``ValueError`` when ``output`` is one of the ``inputs`` (``[(name, path)]``, e.g. from
    :func:`zero_shot_inputs`) or an existing file inside an input folder (a model's ``config.json``, an image):
    writing the result would replace a file the run reads, so it is refused before anything is written, even
    with overwriting allowed."""
    out = os.path.realpath(output)
    for name, path in inputs:
        real = os.path.realpath(path)
        inside = os.path.isdir(real) and os.path.isfile(out) and out.startswith(real.rstrip(os.sep) + os.sep)
        same = out == real or (os.path.exists(out) and os.path.exists(real) and os.path.samefile(out, real))
        if same or inside:
            where = "is" if same else "is a file inside"
            raise ValueError(f"{output}: {where} the {name} input {path}; the result would overwrite it: write it "
                             f"elsewhere")


def check_zero_shot_inputs(**kwargs) -> None:
    """Raise the first problem :func:`zero_shot_input_errors` finds (``ValueError``, ``FileNotFoundError`` for a
    missing list file, ``TypeError``), prefixed with the Python argument and its value (``templates=[...]:``)."""
    errors = zero_shot_input_errors(**kwargs)
    if errors:
        options, message, cls = errors[0]
        keyword = options[0][2:].replace("-", "_")
        raise cls(f"{keyword}={kwargs.get(keyword)!r}: {message}")


def load_text_model(model, tokenizer, *, dtype: torch.dtype = torch.float32,
                    device: Union[str, torch.device] = "cpu"):
    """``(model, tokenizer)`` for zero-shot: ``model`` loaded from a directory / weight file / preset (or used as
    given), ``tokenizer`` from its path or the model directory. Raises ``ValueError`` for a model without a text
    tower (``encode_text``: a vision-only InternViT) or without a tokenizer."""
    import internvit

    name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        if tokenizer is None:
            own = os.path.join(os.fspath(model), "tokenizer.model")
            tokenizer = internvit.get_tokenizer(own) if os.path.isfile(own) else None
        model = internvit.load_model(model, dtype=dtype, device=device)
    if not callable(getattr(model, "encode_text", None)):
        raise ValueError(f"model {name} has no text tower (encode_text): zero-shot classification needs an "
                         f"InternVL-C/G (or CLIP-style) model, not a vision-only {type(model).__name__}")
    if tokenizer is None:
        raise ValueError(f"no tokenizer: model {name} is not a directory with tokenizer.model; give --tokenizer "
                         f"(tokenizer= in Python), a tokenizer.model file or its folder")
    if isinstance(tokenizer, (str, os.PathLike)):
        tokenizer = internvit.get_tokenizer(tokenizer)
    if hasattr(model, "eval"):
        model.eval()
    return model, tokenizer


def run_zero_shot(
    model,
    data: str,
    *,
    classnames: Optional[Union[str, Sequence[str]]] = None,
    templates: Optional[Union[str, Sequence[Template]]] = None,
    lang: Optional[str] = None,
    dataset: Optional[str] = None,
    mode: str = "InternVL-C",
    tokenizer=None,
    batch_size: int = 64,
    text_batch_size: int = 256,
    dtype: torch.dtype = torch.float32,
    device: Union[str, torch.device] = "cpu",
    num_workers: int = 2,
    output: Optional[str] = None,
) -> dict:
    """Zero-shot classify an image folder (``<root>/<class>/<image>``) or a ``path,label`` CSV.

    ``model`` is an InternVL directory / weight file / preset or a loaded model; the tokenizer defaults to
    the one in the model directory. Images get the classification preprocessing (short-side resize, centre
    crop). ``lang`` (default ``en``) picks the shipped class names / templates; ``dataset`` (default
    ``imagenet1k``) picks the default templates. Returns (and, with ``output``, writes atomically as JSON; an
    ``output`` that is one of the inputs is refused first: :func:`refuse_output_onto_input`)
    ``acc1``, ``acc5`` (``None`` below 5 classes), ``mean_per_class_recall``, ``num_failed`` and ``failed``
    (the unreadable images: ``[{'path', 'error'}]``) plus the settings used (``lang`` is ``None`` when no
    shipped list was used).

    Raises ``ValueError`` for an unknown ``lang`` or ``dataset``, a ``lang`` given but unused (class names and
    templates all from files / folders), a ``dataset`` given with ``templates``, class names that cannot be
    matched to the data (or repeat: :func:`check_class_names`), a model without text tower or tokenizer,
    non-finite embeddings and data none of which can be read; ``FileNotFoundError`` for missing files.
    """
    import internvit
    from internvit.data import collate_images  # noqa: F401 - fail early if the data module is missing
    from internvit.fileio import atomic_write

    check_zero_shot_inputs(classnames=classnames, templates=templates, dataset=dataset, lang=lang)
    if output:
        refuse_output_onto_input(output, zero_shot_inputs(data, classnames=classnames, templates=templates,
                                                          model=model, tokenizer=tokenizer))
    model_name = os.fspath(model) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    paths, labels, data_classes = _load_labeled(data)
    names, index = resolve_class_index(classnames, data_classes, lang or "en")
    labels = [index[label] for label in labels]
    temps = resolve_templates(templates, lang or "en", dataset or "imagenet1k")
    shipped = (lambda spec: isinstance(spec, str) and not os.path.isfile(spec))
    lang_used = templates is None or shipped(templates) or shipped(classnames) or (
        classnames is None and bool(data_classes) and all(_WNID.match(str(c)) for c in data_classes))
    if lang is not None and not lang_used:
        raise ValueError(f"--lang / lang= {lang!r} is not used: the class names come from the data or a file and "
                         f"the templates from a file or a list (drop it)")
    model, tokenizer = load_text_model(model, tokenizer, dtype=dtype, device=device)
    classifier = build_zero_shot_classifier(model, tokenizer, names, temps, batch_size=text_batch_size,
                                            device=device)
    ds = _LabeledImages(paths, labels, internvit.build_transform(model.config, resize_mode="crop"))
    loader = torch.utils.data.DataLoader(ds, batch_size=batch_size, num_workers=num_workers,
                                         collate_fn=ds.collate)
    result = zero_shot_evaluate(model, classifier, loader, mode=mode, device=device, dtype=dtype,
                                paths=ds.images.paths, labels=labels, classnames=names)
    result.update(model=model_name, data=os.fspath(data), mode=mode,
                  lang=_lang(lang or "en") if lang_used else None, num_templates=len(temps),
                  logit_scale_used=ZERO_SHOT_SCALE)
    if output:
        with atomic_write(output) as tmp, open(tmp, "w", encoding="utf-8") as f:  # marked: tools recognise it
            json.dump({"written_by": "classification.zero_shot", **result}, f, indent=2, ensure_ascii=False)
    return result


__all__ = ["LANGUAGES", "ZERO_SHOT_SCALE", "build_zero_shot_classifier", "check_class_names", "check_dataset",
           "classification_metrics", "encode_images", "encode_texts", "imagenet_wnids", "list_datasets",
           "load_classnames", "load_templates", "load_text_model", "match_classes", "resolve_class_index",
           "resolve_classnames", "resolve_templates", "run_zero_shot", "zero_shot_evaluate"]
