"""The command lines answer bad input in two lines (error, hint) with exit status 2, write
nothing, and show the traceback only with --verbosity=1."""

import subprocess
import sys

import pytest

from tests.helpers import REPO


def _main(tmp_path, *args):
    workdir = tmp_path / "run"
    command = [sys.executable, "-m", "dcjax.main", f"--workdir={workdir}", *args]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    return done, workdir


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--config=configs/deepcluster.py:smoke", "--config.foo=1"],
            "--config.foo=1: the config has no field foo",
        ),
        (
            ["--config=configs/nope.py"],
            "--config: [Errno 2] No such file or directory: 'configs/nope.py'",
        ),
        (
            ["--config=configs/deepcluster.py:smoke,bogus"],
            "unknown variants ['bogus'] for configs/deepcluster.py",
        ),
        (
            ["--config=configs/deepcluster.py:smoke", "--config.num_cycles=abc"],
            "flag --config.num_cycles=abc: invalid literal",
        ),
        (
            ["--config=configs/sela.py:smoke", "--config.method.num_heads=0"],
            "config.method.num_heads=0 must be in [1, 100]",
        ),
        (
            ["--config=configs/deepcluster.py:smoke", "--config.input.image_size=1"],
            "cannot take 1x1x1 inputs",
        ),
    ],
)
def test_bad_input_is_answered_in_one_line(tmp_path, args, message):
    done, workdir = _main(tmp_path, *args)
    lines = [line for line in done.stderr.splitlines() if line.startswith(("error:", "hint:"))]
    assert done.returncode == 2, done.stderr[-2000:]
    assert "Traceback" not in done.stderr and "Traceback" not in done.stdout
    assert len(lines) == 2 and message in lines[0], done.stderr[-2000:]
    assert not workdir.exists()


def test_verbosity_shows_the_traceback(tmp_path):
    args = ["--config=configs/sela.py:smoke", "--config.method.num_heads=0", "--verbosity=1"]
    done, workdir = _main(tmp_path, *args)
    assert done.returncode != 0 and "Traceback" in done.stderr
    assert "ConfigError: config.method.num_heads=0" in done.stderr
    assert not workdir.exists()
