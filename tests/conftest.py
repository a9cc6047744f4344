"""Shared test helpers: where the parity fixtures live (../shared/fixtures, read-only)."""
import os
import sys

import pytest

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
