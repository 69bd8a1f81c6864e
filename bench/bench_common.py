"""What every benchmark script records about the machine and its own memory."""

from __future__ import annotations

import os
import platform
import subprocess

__all__ = ["cpu_model", "git_commit", "load_averages", "proc_status_bytes", "reset_peak_rss"]

_BENCH_DIR = os.path.dirname(os.path.abspath(__file__))


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo), else what ``platform`` says."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def git_commit() -> str | None:
    """HEAD of the repository holding bench/, ``+uncommitted`` when the tree is dirty."""

    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=_BENCH_DIR, capture_output=True, text=True)

    try:
        head, dirty = git("rev-parse", "HEAD"), git("status", "--porcelain")
    except OSError:
        return None
    if head.returncode:
        return None
    return head.stdout.strip() + ("+uncommitted" if dirty.stdout.strip() else "")


def load_averages(machine: dict) -> tuple[str, str]:
    """A report's ``load_average_at_start`` and ``_at_end`` as "1.00, 0.90, 0.80" strings."""
    return tuple(
        ", ".join(f"{v:.2f}" for v in machine[f"load_average_at_{when}"])
        for when in ("start", "end")
    )


def proc_status_bytes(field: str) -> int | None:
    """A ``/proc/self/status`` field (VmRSS, VmHWM, ...) in bytes, or None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Resets VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False
