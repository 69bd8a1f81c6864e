"""A checkpoint that cannot be written ends the run at once, naming the path and the OS error.

The checkpoint folder is made immutable (``chattr +i``: refused even to root, which ignores
permission bits; a non-root user via ``setpriv`` cannot run the interpreter here, it lives under
/root). Without ``chattr`` support (tmpfs, overlay) the tests skip.
"""

import contextlib
import os
import subprocess
import time

import pytest

from dcjax.core.errors import UserError
from dcjax.training import checkpoint, loop
from tests.helpers import load_config

# A hang detector, not a speed assertion: orbax's asynchronous saves used to fail only after a
# background timeout of about 5 minutes.
AT_ONCE_S = 60


@contextlib.contextmanager
def _immutable(path):
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i is not supported under {path}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)


def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(tmp_path):
    config = load_config("deepcluster", "smoke")
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    start = time.perf_counter()
    with _immutable(workdir / "checkpoints"):
        with pytest.raises(UserError, match="cannot write checkpoints to .*run/checkpoints"):
            loop.run(config, str(workdir))
    assert time.perf_counter() - start < AT_ONCE_S
    assert not (workdir / "metrics.jsonl").exists()  # not a step was trained


def test_a_save_that_fails_mid_run_ends_it_at_once(tmp_path, monkeypatch):
    config = load_config("deepcluster", "smoke")
    workdir = tmp_path / "run"
    save = checkpoint.save
    timings = {}

    def save_then_lock(manager, state, *args):
        save(manager, state, *args)  # cycle 1 saves; then the folder turns read-only
        subprocess.run(["chattr", "+i", str(workdir / "checkpoints")], check=False)
        timings["locked"] = time.perf_counter()
        monkeypatch.setattr(checkpoint, "save", save)

    monkeypatch.setattr(checkpoint, "save", save_then_lock)
    with _immutable(tmp_path):  # probes chattr support; the lock below is on the checkpoints
        pass
    try:
        with pytest.raises(UserError, match=r"could not save the checkpoint of cycle 2 in .*"):
            loop.run(config, str(workdir))
        assert time.perf_counter() - timings["locked"] < AT_ONCE_S
    finally:
        subprocess.run(["chattr", "-i", str(workdir / "checkpoints")], check=False)
    assert checkpoint.make_manager(str(workdir), 2).latest_step() == 1  # resumable from it
    assert not os.path.exists(workdir / "run.lock")  # the lock is released
