"""A static HTML page of search results: one row per query, a grid of thumbnails with score and caption.

Images are linked by ``file://`` URI (:meth:`pathlib.Path.as_uri`: absolute and percent-encoded, so names with
``#``, ``?``, ``%`` or spaces resolve, wherever the page is written); nothing is decoded or copied here.
Relative paths in the metadata are resolved against ``image_root`` (default: the current folder).
"""
from __future__ import annotations

import html
import os
import pathlib
from typing import Optional

from .embeddings import atomic_write_bytes
from .search import SearchResult

_CSS = """
body{font-family:system-ui,sans-serif;margin:1.5em;background:#fafafa;color:#222}
h2{font-size:1.05em;margin:1.4em 0 .4em}
.grid{display:flex;flex-wrap:wrap;gap:10px}
.hit{width:180px;background:#fff;border:1px solid #ddd;border-radius:6px;padding:6px;font-size:.8em}
.hit img{width:100%;height:150px;object-fit:cover;border-radius:4px;background:#eee}
.score{font-weight:600}.cap{color:#444;margin-top:3px;word-wrap:break-word}
.meta{color:#888;font-size:.9em;word-break:break-all}
.query img{height:120px;border-radius:4px}
"""


def _src(path: Optional[str], base: str) -> Optional[str]:
    """The ``file://`` URI of an image path (relative paths resolved against ``base``), HTML-escaped."""
    if not path or "::" in path:  # tar members cannot be linked
        return None
    return html.escape(pathlib.Path(os.path.abspath(os.path.join(base, path))).as_uri(), quote=True)


def write_html(result: SearchResult, path: str, *, title: str = "search results",
               image_root: Optional[str] = None) -> str:
    """Write ``result`` as an HTML grid to ``path`` (atomically); returns the path. ``image_root``: the folder
    relative image paths are relative to (default: the current folder)."""
    base = os.path.abspath(image_root or os.getcwd())
    parts = [f"<!doctype html><meta charset='utf-8'><title>{html.escape(title)}</title><style>{_CSS}</style>",
             f"<h1>{html.escape(title)}</h1>"]
    for q, hits in enumerate(result.rows):
        label = result.queries[q] if q < len(result.queries) else q
        qsrc = _src(str(label), base) if isinstance(label, str) and os.path.isfile(label) else None
        head = f"<img src='{qsrc}'> " if qsrc else ""
        parts.append(f"<h2 class='query'>{head}query {q}: {html.escape(str(label))}</h2><div class='grid'>")
        for rank, h in enumerate(hits, 1):
            img_path = h.get("image_path") or h.get("path")
            src = _src(img_path, base)
            img = f"<img src='{src}' loading='lazy'>" if src else ""
            cap = f"<div class='cap'>{html.escape(str(h['caption']))}</div>" if h.get("caption") else ""
            parts.append(f"<div class='hit'>{img}<div><span class='score'>#{rank} {h['score']:.4f}</span> "
                         f"<span class='meta'>id {h['id']}</span></div>{cap}"
                         f"<div class='meta'>{html.escape(str(img_path or ''))}</div></div>")
        if not hits:
            parts.append("<p>(no results)</p>")
        parts.append("</div>")
    atomic_write_bytes(path, "\n".join(parts).encode("utf-8"))
    return path
