"""Tests for the progress lines of long work (engine.runtime.progress): their text, how often
they come, and where they go (logging when it is set up, else stdout)."""

from __future__ import annotations

import logging

import pytest

from engine.runtime import progress as progress_module
from engine.runtime.progress import Progress, duration


class Clock:
    """A stand-in for ``time.perf_counter`` that the test advances."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module.time, "perf_counter", fake)
    return fake


def test_duration() -> None:
    assert duration(4.4) == "4 s"
    assert duration(59.4) == "59 s"
    assert duration(65) == "1 min 05 s"
    assert duration(3725) == "1 h 02 min"
    assert duration(-3) == "0 s"


def test_a_line_every_interval_with_rate_eta_and_postfix(clock, capsys) -> None:
    bar = Progress("[task] SFT", 100, "steps", every=10.0, logger=logging.getLogger("nowhere"))
    clock.now += 5
    bar.update(10)  # 5 s in: too early for a line
    assert capsys.readouterr().out == ""
    clock.now += 5
    bar.set_postfix(loss="0.41")
    bar.update(10)  # 10 s in: 20 of 100 at 2 steps/s, 40 s to go
    assert capsys.readouterr().out == (
        "[task] SFT: 20/100 steps (20%) in 10 s, 2.0 steps/s, ETA 40 s | loss=0.41\n"
    )
    clock.now += 2
    bar.update(4)  # 2 s after the last line: none
    assert capsys.readouterr().out == ""
    clock.now += 3
    bar.close()  # stopped early: the closing line says so, with no ETA
    assert capsys.readouterr().out == (
        "[task] SFT: 24/100 steps (24%) in 15 s, 1.6 steps/s, done | loss=0.41\n"
    )
    bar.close()
    assert capsys.readouterr().out == ""


def test_short_work_stays_quiet(clock, capsys) -> None:
    bar = Progress("gen", 256, "sequences", every=10.0, quiet_below=10.0)
    clock.now += 3
    bar.update(256)
    bar.close()
    assert capsys.readouterr().out == ""


def test_lines_go_to_logging_when_it_has_a_handler(clock, capsys, caplog) -> None:
    logger = logging.getLogger("engine.test_progress")
    with caplog.at_level(logging.INFO, logger="engine.test_progress"):
        bar = Progress("[sample_pairs] rank 0", 3, "prompts", every=0.0, logger=logger)
        clock.now += 2
        bar.update(1)
        bar.close()
    assert capsys.readouterr().out == ""
    assert [r.getMessage() for r in caplog.records] == [
        "[sample_pairs] rank 0: 1/3 prompts (33%) in 2 s, 0.5 prompts/s, ETA 4 s",
        "[sample_pairs] rank 0: 1/3 prompts (33%) in 2 s, 0.5 prompts/s, done",
    ]
