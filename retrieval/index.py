"""Build, extend, tune and open FAISS indexes (inner-product metric): the public names in one place.

The work is split by concern; this module re-exports it so ``from retrieval.index import ...`` keeps working:

* :mod:`retrieval.index_plan` — parse an ``index_factory`` key, estimate memory, choose a key, check that a key
  can be built from the vectors at hand;
* :mod:`retrieval.index_build` — :func:`build_index`; :mod:`retrieval.index_add` — :func:`add_to_index`,
  :func:`remove_from_index`; each committed through :mod:`internvit.store` (resumable, crash-safe, one writer at a
  time), sharing :mod:`retrieval.index_job` (the add pass, checkpoints, rollback) and :mod:`retrieval.index_source`
  (metadata, row scan, source records and identity);
* :mod:`retrieval.index_tune` — exact ground truth, recall@k, held-out queries, nprobe / efSearch tuning;
* :mod:`retrieval.index_folder` — the committed manifest and :func:`open_index` (what a reader sees);
* :mod:`retrieval.faiss_ops` — the one place faiss is imported, and small faiss operations.
"""
from .faiss_ops import (  # noqa: F401
    GpuHelper,
    IndexMismatchError,
    RetrievalError,
    check_search_params,
    faiss_module,
    gpu_count,
    index_bytes,
    new_index,
    read_index,
    seed_levels,
    set_search_params,
    stored_ids,
    supports_remove,
)
from .index_build import (  # noqa: F401
    _batch_rows,
    _check_compatible,
    _encoder_of,
    _metadata_parts,
    _populate,
    _without_device,
    add_to_index,
    build_index,
    check_build_args,
    check_kind,
    remove_from_index,
)
from .index_folder import (  # noqa: F401
    FORMAT_VERSION,
    INDEX_FILES,
    MANIFEST,
    check_metadata,
    open_index,
    read_manifest,
)
from .index_plan import (  # noqa: F401
    FLAT_MAX,
    HNSW_M,
    HNSW_MAX,
    PQ_CHOICES,
    IndexPlan,
    _parse_key,
    check_index_key,
    choose_index_key,
    default_nlist,
    default_train_size,
    estimate_index_bytes,
    format_bytes,
    minimum_training_vectors,
    needs_training,
    parse_memory,
    plan_index,
)
from .index_tune import (  # noqa: F401
    _drop_self,
    _param_ladder,
    _params_str,
    exact_search,
    holdout_rows,
    indexed_source,
    recall_at_k,
    split_rows,
    tune_index,
)

_GpuHelper = GpuHelper  # the name earlier code used
_faiss = faiss_module
_gpu_count = gpu_count
