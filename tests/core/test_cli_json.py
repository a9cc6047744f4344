"""``internvit.cli.write_json``: result files (``--json``) are written whole or not at all."""
import json
import os

import pytest

from internvit.cli import write_json


def test_write_json_replaces_whole_and_leaves_nothing_on_failure(tmp_path):
    path = str(tmp_path / "result.json")
    write_json(path, {"recall": 0.95, "rows": [1, 2]})
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"recall": 0.95, "rows": [1, 2]}
    loop: list = []
    loop.append(loop)  # json cannot encode it: fails after part of the text is written
    with pytest.raises(ValueError, match="Circular"):
        write_json(path, {"first": "x" * 100_000, "bad": loop}, indent=2)
    with open(path, encoding="utf-8") as f:
        assert json.load(f) == {"recall": 0.95, "rows": [1, 2]}  # the previous result, whole
    assert os.listdir(tmp_path) == ["result.json"]  # no temporary file left
