"""Shared test helpers: where the parity fixtures live (../shared/fixtures, read-only)."""
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("INTERNVIT_FIXTURES", os.path.join(os.path.dirname(ROOT), "shared", "fixtures"))
sys.path.insert(0, ROOT)


def fixture_dir(name: str) -> str:
    """Path of a shared fixture folder; skips the test (with the reason) if the folder is absent."""
    path = os.path.join(FIXTURES, name)
    if not os.path.isdir(path):
        pytest.skip(f"parity fixtures not found at {path} (expected ../shared/fixtures next to the repo)")
    return path


@pytest.fixture
def vit_fixture() -> str:
    return fixture_dir("internvit-6b-style-tiny")


@pytest.fixture
def internvl_fixture() -> str:
    return fixture_dir("internvl-cg-tiny")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """One intra-op thread: the tests use tiny models, for which one thread is as fast on an idle machine and far
    faster on a shared, loaded one (OpenMP threads contending with other processes spin-wait on each other)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _forget_mmengine_loggers():
    """mmengine keeps every MMLogger a runner made (named instances, "current" = the newest) with its handlers
    bound to the stderr of the test that made it, which pytest closes afterwards: a later test whose runner is
    refused (its own logger dropped again) logged through an earlier test's closed stream ("--- Logging error
    ---" on stderr; seen when pytest-xdist spread one file over two processes). The loggers a test made are
    closed and forgotten after it, as a new process would have none."""
    logging_module = sys.modules.get("mmengine.logging")
    before = set(logging_module.MMLogger._instance_dict) if logging_module else set()
    yield
    logging_module = sys.modules.get("mmengine.logging")
    if logging_module is None:
        return
    instances = logging_module.MMLogger._instance_dict
    for name in set(instances) - before:
        logger = instances.pop(name)
        for handler in list(logger.handlers):
            handler.close()
            logger.removeHandler(handler)


#: the files that run longest (tens of seconds to minutes each on the 2-core VM: fresh interpreters, torchrun
#: ranks, kill sweeps), longest first. They are scheduled before the others: with ``-n 2 --dist loadfile`` a long
#: file that starts last keeps one worker running alone at the end (the fresh-clone run's last 5 % took minutes).
SLOW_FIRST = (
    "tests/test_cli_sweep.py",
    "tests/test_docs_snippets.py",
    "tests/features/test_distributed.py",
    "tests/retrieval/test_build_distributed.py",
    "tests/core/test_safe_loading.py",
    "tests/store/test_faults_training.py",
    "tests/segmentation/test_toy_training.py",
    "tests/features/test_trial7a_fixes.py",
    "tests/retrieval/test_build_distributed_text.py",
    "tests/core/test_runner_errors.py",
    "tests/classification/test_probe_training.py",
    "tests/retrieval/test_ondisk.py",
    "tests/store/test_faults_features.py",
    "tests/core/test_dist_cpu_runner.py",
)


def pytest_collection_modifyitems(config, items):
    """Run :data:`SLOW_FIRST` files first (a stable sort: the order within a file, and of the other files, is
    the collection order)."""
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.nodeid.split("::", 1)[0], len(rank)))
