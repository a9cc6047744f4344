"""retrieval — FAISS indexes over InternVL-C/G, InternViT and open_clip embeddings.

Build (memory-bounded, resumable, incremental), search by text / image / embedding, and evaluate
(recall@k exactly and through the index, index-quality reports). Embeddings use clip-retrieval's layout.

Public API: :func:`build_index`, :func:`add_to_index`, :func:`remove_from_index`, :func:`choose_index_key`,
:class:`Retriever`, :func:`load_encoder`, :func:`index_images`, :func:`embed_collection`,
:func:`evaluate_retrieval`, :func:`index_quality`, :func:`pre_caption`.
"""
from .embeddings import EmbeddingError, EmbeddingSource, write_embeddings
from .index import (
    IndexMismatchError,
    IndexPlan,
    RetrievalError,
    add_to_index,
    build_index,
    choose_index_key,
    open_index,
    remove_from_index,
    tune_index,
)

__all__ = [
    "EmbeddingError", "EmbeddingSource", "IndexMismatchError", "IndexPlan", "Retriever", "RetrievalError",
    "SearchResult", "add_to_index", "build_index", "choose_index_key", "embed_collection", "evaluate_retrieval",
    "index_images", "index_quality", "load_encoder", "open_index", "pre_caption", "remove_from_index",
    "tune_index", "write_embeddings", "write_html",
]

_LAZY = {
    "Retriever": "search", "SearchResult": "search", "load_encoder": "encoders", "embed_collection": "pipeline",
    "index_images": "pipeline", "evaluate_retrieval": "evaluate", "index_quality": "evaluate",
    "pre_caption": "evaluate", "write_html": "html",
}


def __getattr__(name):  # torch-dependent parts load on first use
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'retrieval' has no attribute {name!r}")
