"""The progress display: periodic lines on a pipe, one line redrawn in place on a terminal."""

import io

from dcjax.training import console


def _feed(progress: console.Progress, steps: list[int]) -> str:
    progress.start(3, 10)
    for s in steps:
        progress.update(s, loss=1.25)
    return progress.stream.getvalue()


def test_pipe_gets_periodic_lines_and_no_carriage_returns():
    out = _feed(console.Progress(20, 32, io.StringIO(), every_secs=0.0, is_tty=False), [5, 10, 20])
    lines = out.splitlines()
    assert len(lines) == 2 and "\r" not in out  # 5 and 10; the end is the cycle line's job
    assert lines[0].startswith("cycle 3/10 [") and "5/20" in lines[0] and "loss 1.2500" in lines[0]
    assert "img/s" in lines[0] and "ETA" in lines[0]
    quiet = console.Progress(20, 32, io.StringIO(), every_secs=1e9, is_tty=False)
    assert _feed(quiet, [5, 10, 20]) == ""  # within the interval: nothing


def test_terminal_gets_one_line_redrawn_then_erased():
    out = _feed(console.Progress(20, 32, io.StringIO(), is_tty=True), [5, 10, 20])
    assert out.count("\r") == 4 and "\n" not in out
    assert "10/20" in out and out.endswith("\r") and out.rstrip("\r").split("\r")[-1].strip() == ""


def test_cycle_line_shows_what_the_cycle_logged():
    scalars = {"train/loss": 2.0, "cluster/nmi_true": 0.5, "time/cycle_seconds": 3.25}
    assert console.cycle_line(2, 5, scalars) == "cycle 2/5  loss 2.0000  NMI(true) 0.500  3.2 s"


def test_a_cycle_longer_than_estimated_ends_at_its_real_length():
    # An un-truncated sampler draws a few more batches than samples_per_epoch // B.
    progress = console.Progress(20, 32, io.StringIO(), every_secs=0.0, is_tty=False)
    progress.start(1, 2)
    progress.expect(23)
    for s in (10, 20, 23):
        progress.update(s, loss=1.0)
    lines = progress.stream.getvalue().splitlines()
    assert ["10/23" in lines[0], "20/23" in lines[1], len(lines)] == [True, True, 2]
