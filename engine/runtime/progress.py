"""Progress of long work as plain lines, readable in a terminal and in a log file.

A tqdm bar redraws one line in a terminal and leaves nothing useful in a log file; a
:class:`Progress` prints a whole line at most every ``every`` seconds (and one at the end):

    [task] SFT: 300/1500 steps (20%) in 24 s, 12.5 steps/s, ETA 1 min 36 s | loss=0.41 val_acc=0.22

Lines go to ``logging`` (the commands' console and their log file under Hydra) when the logger
has a handler, else to stdout (a plain script, a redirect to a file). Costs a clock read per
update.
"""

from __future__ import annotations

import logging
import time
from typing import Any

__all__ = ["Progress", "duration"]


def duration(seconds: float) -> str:
    """``"42 s"``, ``"3 min 05 s"``, ``"1 h 02 min"``."""
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.0f} s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


class Progress:
    """``done / total`` of a unit of work with its rate and ETA, as lines (module doc).

    The interface is tqdm's where it overlaps (``update``, ``set_postfix``, ``close``), so a bar
    can be swapped for it. ``every``: seconds between lines (0: a line per update); the first
    line comes after ``every`` seconds, so work shorter than that prints only its closing line,
    and ``quiet_below`` seconds suppresses even that one.
    """

    def __init__(
        self,
        label: str,
        total: int,
        unit: str,
        *,
        every: float = 10.0,
        quiet_below: float = 0.0,
        logger: logging.Logger | None = None,
    ) -> None:
        self.label, self.total, self.unit = label, int(total), unit
        self.every, self.quiet_below = every, quiet_below
        self.logger = logger or logging.getLogger("engine.progress")
        self.done = 0
        self.started = self._last = time.perf_counter()
        self.postfix: dict[str, Any] = {}
        self.closed = False

    def update(self, n: int = 1) -> None:
        """``n`` more units done; a line when ``every`` seconds have passed since the last."""
        self.done += n
        now = time.perf_counter()
        if now - self._last >= self.every and self.done < self.total:
            self._last = now
            self._emit(now)

    def set_postfix(self, **values: Any) -> None:
        """Values shown after the rate (e.g. ``loss``), kept until replaced."""
        self.postfix.update(values)

    def close(self) -> None:
        """The closing line (total time and rate), unless the work took under ``quiet_below``."""
        if self.closed:
            return
        self.closed = True
        now = time.perf_counter()
        if now - self.started >= self.quiet_below:
            self._emit(now, final=True)

    def line(self, now: float | None = None, final: bool = False) -> str:
        """The text of a progress line at ``now`` (default: the current time)."""
        now = time.perf_counter() if now is None else now
        elapsed = now - self.started
        rate = self.done / elapsed if elapsed > 0 else 0.0
        share = f" ({100 * self.done / self.total:.0f}%)" if self.total else ""
        text = f"{self.label}: {self.done}/{self.total} {self.unit}{share} in {duration(elapsed)}"
        text += f", {_rate(rate)} {self.unit}/s"
        if not final and rate > 0 and self.done < self.total:
            text += f", ETA {duration((self.total - self.done) / rate)}"
        if final:
            text += ", done"
        if self.postfix:
            text += " | " + " ".join(f"{k}={v}" for k, v in self.postfix.items())
        return text

    def _emit(self, now: float, final: bool = False) -> None:
        text = self.line(now, final)
        if self.logger.isEnabledFor(logging.INFO) and self.logger.hasHandlers():
            self.logger.info(text)
        else:
            print(text, flush=True)


def _rate(rate: float) -> str:
    return f"{rate:.1f}" if rate < 100 else f"{rate:,.0f}"
