"""Retrieval tests run faiss on one thread: HNSW inserts are then deterministic, and OpenMP does not spin on a
shared 2-core machine."""
import pytest

faiss = pytest.importorskip("faiss")
faiss.omp_set_num_threads(1)
