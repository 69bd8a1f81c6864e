"""A checkpoint that cannot be written ends the run at once, naming the path and the OS error.

Each test runs two ways (the ``lock`` parameter):

- ``chattr``: the checkpoint folder is made immutable (``chattr +i``: refused even to root, which
  ignores permission bits; a non-root user via ``setpriv`` cannot run the interpreter here, it
  lives under /root). Without ``chattr`` support (tmpfs, overlay, not root) this form skips.
- ``oserror``: the write itself raises ``PermissionError`` (EACCES), faked at the point where
  dcjax writes: the ``open`` of ``checkpoint.check_writable``'s probe file, and orbax's
  ``CheckpointManager.save`` under ``checkpoint.save``. It needs nothing of the filesystem, so
  the handlers are covered on every runner.
"""

import builtins
import contextlib
import errno
import os
import subprocess
import time

import orbax.checkpoint as ocp
import pytest

from dcjax.core.errors import UserError
from dcjax.training import checkpoint, loop
from tests.helpers import load_config

# A hang detector, not a speed assertion: orbax's asynchronous saves used to fail only after a
# background timeout of about 5 minutes.
AT_ONCE_S = 60
LOCKS = ("chattr", "oserror")
_OS_ERRORS = "(Operation not permitted|Permission denied)"  # chattr's EPERM, the fake's EACCES


def _denied(path) -> PermissionError:
    return PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(path))


def _chattr_or_skip(path) -> None:
    """``chattr +i`` on ``path`` (undone by ``_unlock``), or skips the test."""
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip(f"chattr +i is not supported under {path}")


def _unlock(path) -> None:
    subprocess.run(["chattr", "-i", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def _unwritable(lock: str, directory, monkeypatch):
    """``directory`` (the checkpoint folder) refuses new files while the block runs."""
    if lock == "chattr":
        _chattr_or_skip(directory)
        try:
            yield
        finally:
            _unlock(directory)
        return

    def fake_open(file, *args, **kwargs):
        if os.path.dirname(os.path.abspath(file)) == os.path.abspath(directory):
            raise _denied(file)
        return builtins.open(file, *args, **kwargs)

    # A module global named `open` shadows the builtin inside dcjax/training/checkpoint.py only.
    with monkeypatch.context() as patch:
        patch.setattr(checkpoint, "open", fake_open, raising=False)
        yield


@pytest.mark.parametrize("lock", LOCKS)
def test_an_unwritable_checkpoint_folder_stops_the_run_before_training(tmp_path, lock, monkeypatch):
    config = load_config("deepcluster", "smoke")
    workdir = tmp_path / "run"
    (workdir / "checkpoints").mkdir(parents=True)
    start = time.perf_counter()
    with _unwritable(lock, workdir / "checkpoints", monkeypatch):
        with pytest.raises(
            UserError, match=f"cannot write checkpoints to .*run/checkpoints: .*{_OS_ERRORS}"
        ):
            loop.run(config, str(workdir))
    assert time.perf_counter() - start < AT_ONCE_S
    assert not (workdir / "metrics.jsonl").exists()  # not a step was trained
    assert not os.listdir(workdir / "checkpoints")  # and nothing was saved


@pytest.mark.parametrize("lock", LOCKS)
def test_a_save_that_fails_mid_run_ends_it_at_once(tmp_path, lock, monkeypatch):
    config = load_config("deepcluster", "smoke")
    workdir = tmp_path / "run"
    checkpoints = workdir / "checkpoints"
    save = checkpoint.save
    manager_save = ocp.CheckpointManager.save
    timings = {}

    def refused_save(manager, step, *args, **kwargs):
        raise _denied(checkpoints / f"{step}.orbax-checkpoint-tmp")

    def save_then_lock(manager, state, *args):
        save(manager, state, *args)  # cycle 1 saves; then the folder turns read-only
        if lock == "chattr":
            subprocess.run(["chattr", "+i", str(checkpoints)], check=False)
        else:
            monkeypatch.setattr(ocp.CheckpointManager, "save", refused_save)
        timings["locked"] = time.perf_counter()
        monkeypatch.setattr(checkpoint, "save", save)

    monkeypatch.setattr(checkpoint, "save", save_then_lock)
    if lock == "chattr":  # probes chattr support; the lock above is on the checkpoints
        _chattr_or_skip(tmp_path)
        _unlock(tmp_path)
    try:
        with pytest.raises(
            UserError,
            match=f"could not save the checkpoint of cycle 2 in .*run/checkpoints: .*{_OS_ERRORS}",
        ):
            loop.run(config, str(workdir))
        assert time.perf_counter() - timings["locked"] < AT_ONCE_S
    finally:
        if lock == "chattr":
            _unlock(checkpoints)
        monkeypatch.setattr(ocp.CheckpointManager, "save", manager_save)
    assert checkpoint.make_manager(str(workdir), 2).latest_step() == 1  # resumable from it
    assert not os.path.exists(workdir / "run.lock")  # the lock is released
