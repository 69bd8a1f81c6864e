"""The curated mutants (bench/mutants.py) still apply: each bug's line is in its file exactly
once and the tests named to catch it exist, so the mutant run tests what its table says (running
the mutants is not part of the suite: see bench/README.md)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys

import pytest

from tests.helpers import REPO

_SPEC = importlib.util.spec_from_file_location(
    "bench_mutants", os.path.join(REPO, "bench", "mutants.py")
)
MUTANTS = importlib.util.module_from_spec(_SPEC)
sys.modules[_SPEC.name] = MUTANTS  # dataclasses look their module up while it executes
_SPEC.loader.exec_module(MUTANTS)


@pytest.mark.parametrize("mutant", MUTANTS.MUTANTS, ids=lambda m: m.name)
def test_each_mutant_applies_once_and_names_existing_tests(mutant, tmp_path):
    source = os.path.join(REPO, mutant.path)
    copy = tmp_path / mutant.path
    copy.parent.mkdir(parents=True)
    shutil.copy(source, copy)
    MUTANTS.apply(mutant, str(tmp_path))
    with open(source) as f:
        assert copy.read_text() != f.read()
    for test in mutant.tests:
        path, _, name = test.partition("::")
        with open(os.path.join(REPO, path)) as f:
            assert not name or f"def {name.split('[')[0]}(" in f.read(), test


def test_a_line_that_is_not_there_once_is_refused(tmp_path):
    mutant = MUTANTS.MUTANTS[0]
    (tmp_path / mutant.path).parent.mkdir(parents=True)
    (tmp_path / mutant.path).write_text("nothing here\n")
    with pytest.raises(ValueError, match=mutant.name):
        MUTANTS.apply(mutant, str(tmp_path))


def test_names_are_unique():
    names = [m.name for m in MUTANTS.MUTANTS]
    assert len(names) == len(set(names))
