"""The rows of a feature folder's metadata: the text of paths and extra-column values as written, the checks of
``extra_columns`` before any work, and the writing of one shard's metadata file (parquet or JSON lines).

Used by :meth:`internvit.features.FeatureExtractor.write` (through :mod:`internvit.feature_write`); its public names
are re-exported by :mod:`internvit.features`.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping, Optional, Sequence, Union

import numpy as np


def output_text(value: Union[str, bytes, os.PathLike]) -> str:
    """The text written to every output (metadata, ``errors.jsonl``) for a path or other string ``value``.

    A path that is valid UTF-8 is returned unchanged. A file name that is not (Python holds its undecodable
    bytes as lone surrogates, ``os.fsdecode``'s ``surrogateescape``) is written with each undecodable byte as
    ``\\xNN``: ``os.fsencode(p).decode('utf-8', 'backslashreplace')``, so ``b'bad\\xff.png'`` becomes the text
    ``bad\\xff.png``. Other lone surrogates become ``\\uXXXX``. The row keeps its ``id`` (input row), so it
    stays aligned with the inputs, and manifests count such paths (``num_escaped_paths``). Never raises for
    a ``str``/``bytes``/path-like.
    """
    v = os.fspath(value) if isinstance(value, os.PathLike) else value
    if isinstance(v, bytes):
        return v.decode("utf-8", "backslashreplace")
    try:
        v.encode("utf-8")
        return v
    except UnicodeEncodeError:
        pass
    try:
        return v.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:  # a surrogate that is not an escaped byte
        return v.encode("utf-8", "backslashreplace").decode("utf-8")


def _output_value(v: Any) -> Any:
    """An extra-column value as written: strings through :func:`output_text`, the rest unchanged."""
    return output_text(v) if isinstance(v, str) else v


def _to_json_value(v: Any) -> Any:
    return v.item() if isinstance(v, np.generic) else v


def _extra_columns(extra_columns: Optional[Mapping[str, Sequence]], n: int,
                   reserved: Sequence[str] = ("id", "path")) -> dict:
    """The extra metadata columns as lists of ``n`` values; ``ValueError`` for a name among ``reserved`` (the
    columns the job writes itself: ``id``, ``path`` and, with tiles, the tile columns, which took the place of a
    user's column of that name silently) or a column of another length."""
    out = {}
    for name, values in (extra_columns or {}).items():
        if name in reserved:
            raise ValueError(f"extra_columns: {name!r} is a reserved column name (this job writes "
                             f"{', '.join(reserved)} itself); rename it")
        if not isinstance(name, str) or not name:
            raise ValueError(f"extra_columns: column names must be non-empty str, got {name!r}")
        if isinstance(values, (str, bytes)):  # 'ab' for 2 images gave 'a' and 'b', silently
            raise TypeError(f"extra_columns[{name!r}] is a {type(values).__name__}, not one value per image: "
                            f"give a list ([{values!r:.40}] * n for the same value on every row)")
        values = list(values)
        if len(values) != n:
            raise ValueError(f"extra_columns[{name!r}] has {len(values)} values for {n} images")
        out[name] = values
    return out


def _plain(v: Any) -> Any:
    """An extra-column value as it must read back: NumPy scalars and arrays as Python values, tuples as lists,
    strings as written (:func:`output_text`)."""
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    return _output_value(v)


def _kept(want: Any, got: Any) -> bool:
    """Whether ``got`` (read back from Arrow) is ``want`` with its types: ``1`` read back as ``1.0``, ``'a'`` as
    ``b'a'`` or a missing key as ``None`` is not."""
    if type(want) is not type(got):
        return False
    if isinstance(want, list):
        return len(want) == len(got) and all(_kept(a, b) for a, b in zip(want, got))
    if isinstance(want, dict):
        return want.keys() == got.keys() and all(_kept(want[k], got[k]) for k in want)
    return want == got or (want != want and got != got)  # NaN is kept as NaN


def _json_native(v: Any) -> bool:
    """Whether JSON holds ``v`` as it is (``None``, bool, int, float, str, lists and str-keyed dicts of them)."""
    if v is None or isinstance(v, (bool, int, float, str)):
        return True
    if isinstance(v, list):
        return all(_json_native(x) for x in v)
    return isinstance(v, dict) and all(isinstance(k, str) and _json_native(x) for k, x in v.items())


def _check_json_columns(columns: dict) -> None:
    """``ValueError`` naming the column and row of a value JSON lines would store as another (``b'a'`` as the
    text ``"b'a'"``, a path object as text, an int dict key as a str key)."""
    for k, v in columns.items():
        for i, x in enumerate(v):
            x = _plain(x)
            if not _json_native(x):
                raise ValueError(f"extra_columns[{k!r}]: row {i} holds {x!r} ({type(x).__name__}), which a JSON "
                                 f"lines metadata file would store as another value (e.g. its text); give "
                                 f"None, bool, int, float, str, lists or str-keyed dicts of them")


def _arrow_columns(columns: dict) -> dict:
    """Each extra column converted to Arrow once (per shard only the rows are taken: linear in total).

    A parquet column holds one type: a column whose values Arrow would store as another type (ints among floats
    read back as floats, strings among bytes as bytes) or cannot store together (ints and strings) is refused
    with ``ValueError`` naming the column and its first row that would not be kept, never coerced silently."""
    import pyarrow as pa

    out = {}
    for k, v in columns.items():
        values = [_plain(x) for x in v]  # what must read back
        advice = ("give the column values of one type (e.g. all str), or write metadata_format='jsonl', which "
                  "keeps each value's type")
        try:
            arr = pa.array([_output_value(x) for x in v])  # NumPy scalars keep their Arrow type (float32, ...)
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, OverflowError) as e:
            kinds = {}
            for i, x in enumerate(values):
                kinds.setdefault(type(x).__name__, i)
            found = ", ".join(f"{t} (first at row {i})" for t, i in kinds.items())
            raise ValueError(f"extra_columns[{k!r}]: cannot be stored in one parquet column: values of types "
                             f"{found} ({str(e).splitlines()[0]}); {advice}") from None
        back = arr.to_pylist()
        bad = next((i for i, (a, b) in enumerate(zip(values, back)) if not _kept(a, b)), None)
        if bad is not None:
            raise ValueError(f"extra_columns[{k!r}]: row {bad} holds {values[bad]!r} "
                             f"({type(values[bad]).__name__}), which a parquet column of {arr.type} stores as "
                             f"{back[bad]!r}; {advice}")
        out[k] = arr
    return out


def _write_metadata(path: str, fmt: str, ids: list[int], paths: Sequence[str], columns: dict,
                    arrow_columns: Optional[dict] = None, row_columns: Optional[dict] = None) -> None:
    """Write the metadata rows ``ids`` (input rows) to ``path`` (exactly that file).

    ``row_columns`` (tiles): more columns given per written row (aligned with ``ids``), after the others.
    """
    row_columns = row_columns or {}
    if fmt == "jsonl":
        with open(path, "w", encoding="utf-8") as f:
            for j, i in enumerate(ids):
                row = {"id": int(i), "path": output_text(paths[i])}
                row.update({k: _output_value(_to_json_value(v[i])) for k, v in columns.items()})
                row.update({k: _to_json_value(v[j]) for k, v in row_columns.items()})
                f.write(json.dumps(row, ensure_ascii=False, default=str) + "\n")
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    arrow_columns = arrow_columns if arrow_columns is not None else _arrow_columns(columns)
    take = pa.array(ids, pa.int64())
    data = {"id": take, "path": pa.array([output_text(paths[i]) for i in ids], pa.string())}
    for k, full in arrow_columns.items():
        data[k] = full.take(take)
    for k, v in row_columns.items():
        data[k] = pa.array(v)
    pq.write_table(pa.table(data), path)
