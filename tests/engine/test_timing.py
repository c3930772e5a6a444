"""engine.runtime.timing.PhaseClock: laps booked to their phases, rebooking, the results.json
shape."""

from __future__ import annotations

import pytest

from engine.runtime import timing
from engine.runtime.timing import PhaseClock


def test_laps_book_the_time_since_the_previous_lap(monkeypatch):
    now = iter([12.0, 15.5, 16.0, 20.0])
    monkeypatch.setattr(timing.time, "time", lambda: next(now))
    clock = PhaseClock(start=10.0)
    clock.lap("startup")  # 10 -> 12
    clock.lap("train")  # 12 -> 15.5
    clock.lap("startup")  # 15.5 -> 16, added to the first lap
    clock.move(1.5, "train", "eval")
    clock.move(99.0, "startup", "other")  # never more than the phase holds
    clock.lap("export")  # 16 -> 20
    assert clock.seconds() == {
        "startup_s": 0.0,
        "train_s": 2.0,
        "eval_s": 1.5,
        "other_s": 2.5,
        "export_s": 4.0,
    }
    with pytest.raises(ValueError, match="seconds must be >= 0"):
        clock.move(-1.0, "train", "eval")
