"""The workdir's own files: one run at a time (a lock file) and JSON written atomically."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator

from absl import logging

from dcjax.core import distributed
from dcjax.core.errors import UserError

__all__ = ["LOCK_FILE", "WorkdirInUse", "locked", "write_json"]

LOCK_FILE = "run.lock"


class WorkdirInUse(UserError):
    """Another live run holds the workdir's lock."""


def write_json(path: str, value) -> None:
    """Writes ``value`` as JSON to ``path`` atomically: a temporary file, then a rename, so a
    kill mid-write leaves the old file or the new one, never a truncated one."""
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _take(path: str) -> None:
    """Creates the lock file or raises ``WorkdirInUse``; a stale lock (its process gone, on this
    host) is taken over with a warning."""
    host = socket.gethostname()
    record = {"pid": os.getpid(), "host": host, "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                with open(path) as f:
                    holder = json.load(f)
            except (OSError, ValueError):
                holder = {}
            pid, holder_host = holder.get("pid"), holder.get("host")
            if holder_host == host and isinstance(pid, int) and not _alive(pid):
                message = f"{path}: taking over the stale lock of process {pid} (no longer runs)"
                logging.warning(message)
                print(f"warning: {message}")
                os.remove(path)
                continue
            raise WorkdirInUse(
                f"{os.path.dirname(path)} is in use by process {pid} on {holder_host} since "
                f"{holder.get('started')} ({path}); wait for it, or use another --workdir"
            ) from None
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        return
    raise WorkdirInUse(f"{path}: could not take the lock")


@contextlib.contextmanager
def locked(workdir: str) -> Iterator[None]:
    """Holds ``workdir``'s lock file for the block (process 0 of a multi-host run takes it).

    A workdir the block created and left empty (a run refused before writing anything) is
    removed again, so a bad command leaves nothing behind.
    """
    path = os.path.join(workdir, LOCK_FILE)
    main = distributed.is_main()
    created = main and not os.path.exists(workdir)
    refusal = ""
    if main:
        os.makedirs(workdir, exist_ok=True)
        try:
            _take(path)
        except WorkdirInUse as error:
            refusal = str(error)
    # Every process learns process 0's answer, so that all of them stop when it is refused.
    refusal = distributed.broadcast_text(refusal)
    if refusal:  # a held lock means the workdir existed before: nothing to remove
        raise WorkdirInUse(refusal)
    try:
        yield
    finally:
        if main:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
            if created:
                with contextlib.suppress(OSError):  # not empty: the run wrote its files
                    os.rmdir(workdir)
