"""Shared fixtures of the zero-shot tests."""
import pytest


@pytest.fixture(scope="module")
def fx():
    """The tiny InternVL-C/G fixture folder (with its tokenizer)."""
    from tests.conftest import fixture_dir

    return fixture_dir("internvl-cg-tiny")
