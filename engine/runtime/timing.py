"""Where a run's wall time goes: startup, reference pass, training, evaluation, the gradient-weight
diagnostics, export.

:class:`PhaseClock` is the one stopwatch ``engine.train.train`` keeps; each ``lap(phase)`` books
the time since the previous lap to ``phase``, and ``move`` rebooks what was timed inside a lap
(the evaluations and the diagnostics inside the loop's). ``results.json``'s ``timings`` is its
``seconds()``: the phases add up to the run's time in ``train()``. ``experiments.tables.costs``
reads it, so a sweep's report shows which part of a run is slow, and the benchmarks read their
phases from it (``experiments.bench``).
"""

from __future__ import annotations

import time

__all__ = ["PhaseClock"]


class PhaseClock:
    """Seconds per phase of one run, booked lap by lap from ``start`` (a ``time.time()``)."""

    def __init__(self, start: float | None = None) -> None:
        self._last = time.time() if start is None else start
        self._seconds: dict[str, float] = {}

    def lap(self, phase: str) -> None:
        """Book the time since the previous lap (or the start) to ``phase`` (added up when a phase
        comes back)."""
        now = time.time()
        self._seconds[phase] = self._seconds.get(phase, 0.0) + (now - self._last)
        self._last = now

    def move(self, seconds: float, source: str, target: str) -> None:
        """Rebook ``seconds`` of ``source`` to ``target`` (the evaluations timed inside the loop
        out of the loop's lap); never more than ``source`` holds."""
        if seconds < 0:
            raise ValueError(f"PhaseClock.move: seconds must be >= 0, got {seconds}")
        taken = min(seconds, self._seconds.get(source, 0.0))
        self._seconds[source] = self._seconds.get(source, 0.0) - taken
        self._seconds[target] = self._seconds.get(target, 0.0) + taken

    def seconds(self) -> dict[str, float]:
        """``{"<phase>_s": seconds}`` in the order the phases first lapped, rounded to 1 us (the
        diagnostics take milliseconds)."""
        return {f"{k}_s": round(v, 6) for k, v in self._seconds.items()}
