"""The workdir's files: atomic JSON writes."""

import json
import os

from dcjax.training.workdir import write_json


def test_write_json_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = str(tmp_path / "results.json")
    write_json(path, {"a": 1})
    write_json(path, {"a": 2, "b": [1.5]})
    with open(path) as f:
        assert json.load(f) == {"a": 2, "b": [1.5]}
    assert os.listdir(tmp_path) == ["results.json"]
