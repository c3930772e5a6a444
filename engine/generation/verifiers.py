"""Answer verifiers: ``VERIFIERS[name](completion, gold) -> bool``.

Registered verifiers:

- ``math``: LaTeX and ``\\boxed{}`` answers through math-verify (rules in
  :mod:`engine.generation.math_answers`). Each check runs in a helper process with a time limit
  (``MathVerifier.timeout_seconds``, default 5 s): a check that exceeds it counts as wrong, is
  counted (``VERIFIERS["math"].timeouts``) and its helper is killed and restarted. So the limit
  holds in any thread and in worker processes, where math-verify's own ``signal.alarm`` timeout
  does not work, and also for a computation stuck in C code. One helper per process (started on
  first use, about a second to import math-verify), shared by its threads under a lock.
- ``gsm8k``: the GSM8K convention: the answer is the number after the last ``####``; in the gold,
  after its last ``####`` when it has one (a whole GSM8K solution), else the gold itself. Numbers
  are compared as numbers: ``1,234`` = ``1234`` = ``1234.0``, ``$5`` = ``5``, ``3/4`` = ``0.75``. A
  completion without ``####`` is wrong.
- ``arithmetic``, registered by the embedded task (:mod:`engine.task.register`): exactly one
  ``####`` followed by a canonical integer equal to the gold.
- ``reasoning_gym``, registered by the reasoning-gym plug-in (:mod:`engine.task.gym.register`):
  the answer a completion states, scored by the dataset's own ``score_answer``.

Every verifier also has ``judge(completion, gold) -> Verdict``, which adds the extracted answer
and whether the time limit was hit (for per-problem records). Adding one: a function
``(completion, gold) -> Verdict`` decorated with ``@register("name")``.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

from losses.registry import Registry

_REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class Verdict:
    """One verification: is the completion right, what answer it states, whether the check
    ran out of time (then ``correct`` is False), and the verifier's graded score when it has one
    (reasoning-gym's ``score_answer`` in [0, 1]; ``correct`` is then ``score >= 1``)."""

    correct: bool
    extracted: str | None
    timed_out: bool = False
    score: float | None = None


class Verifier:
    """A named ``(completion, gold) -> bool`` with a richer :meth:`judge`."""

    def __init__(self, name: str, judge: Callable[[str, str], Verdict]) -> None:
        self.name = name
        self._judge = judge

    def judge(self, completion: str, gold: str) -> Verdict:
        """The full verdict for one completion against its gold answer."""
        return self._judge(completion, gold)

    def __call__(self, completion: str, gold: str) -> bool:
        return self.judge(completion, gold).correct

    @property
    def timeouts(self) -> int:
        """Checks in this process that ran out of time (0 for verifiers without a limit)."""
        return int(getattr(self._judge, "timeouts", 0))

    def __repr__(self) -> str:
        return f"Verifier({self.name!r})"


VERIFIERS: Registry[Verifier] = Registry("verifier")


def register(name: str) -> Callable[[Callable[[str, str], Verdict]], Callable[[str, str], Verdict]]:
    """Decorator: register a ``(completion, gold) -> Verdict`` function as verifier ``name``."""

    def decorator(judge: Callable[[str, str], Verdict]) -> Callable[[str, str], Verdict]:
        VERIFIERS.add(name, Verifier(name, judge))
        return judge

    return decorator


# ---- math: math-verify in a helper process with a time limit ------------------------------------

_HELPER = "from engine.generation.math_answers import serve; serve()"


class _Helper:
    """One ``engine.generation.math_answers.serve`` process and its pipes."""

    def __init__(self, startup_seconds: float = 120.0) -> None:
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(_REPO), *filter(None, [env.get("PYTHONPATH")])])
        # subprocess, not multiprocessing: a daemonic worker (multiprocessing.Pool) may start it
        self.process = subprocess.Popen(
            [sys.executable, "-u", "-c", _HELPER],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=env,
            cwd=str(_REPO),
        )
        self._buffer = b""
        if self.read_line(startup_seconds) != "ready":
            self.kill()
            raise RuntimeError("the math verifier's helper process did not start")

    def read_line(self, seconds: float) -> str | None:
        """The next line, or None after ``seconds`` without one (or at end of output)."""
        deadline = time.monotonic() + seconds
        descriptor = self.process.stdout.fileno()
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([descriptor], [], [], left)[0]:
                return None
            chunk = os.read(descriptor, 65536)
            if not chunk:
                return None
            self._buffer += chunk
        line, self._buffer = self._buffer.split(b"\n", 1)
        return line.decode()

    def kill(self) -> None:
        self.process.kill()
        self.process.wait()


class MathVerifier:
    """The ``math`` verifier's judge: requests to a helper process, killed when over time."""

    def __init__(self, timeout_seconds: float = 5.0) -> None:
        self.timeout_seconds = timeout_seconds
        self.timeouts = 0  # checks that hit the limit in this process
        self._lock = threading.Lock()
        self._helper: _Helper | None = None
        self._pid = os.getpid()
        atexit.register(self.close)

    def __call__(self, completion: str, gold: str) -> Verdict:
        request = (json.dumps({"completion": completion, "gold": gold}) + "\n").encode()
        with self._lock:
            helper = self._running_helper()
            helper.process.stdin.write(request)
            helper.process.stdin.flush()
            line = helper.read_line(self.timeout_seconds)
            if line is None:
                if helper.process.poll() is not None:  # died, not slow: say so
                    self._helper = None
                    raise RuntimeError(
                        f"the math verifier's helper exited with code {helper.process.returncode}"
                    )
                helper.kill()
                self._helper = None
                self.timeouts += 1
                return Verdict(False, None, timed_out=True)
        reply = json.loads(line)
        return Verdict(bool(reply["correct"]), reply["extracted"])

    def _running_helper(self) -> _Helper:
        if self._pid != os.getpid():  # a forked child must not share its parent's pipes
            self._helper, self._pid = None, os.getpid()
        if self._helper is None or self._helper.process.poll() is not None:
            self._helper = _Helper()
        return self._helper

    def close(self) -> None:
        """Stop this process's helper (also at exit)."""
        with self._lock:
            if self._helper is not None and self._pid == os.getpid():
                self._helper.kill()
            self._helper = None


MATH = MathVerifier()
VERIFIERS.add("math", Verifier("math", MATH))


# ---- gsm8k ------------------------------------------------------------------------------------

_NUMBER = re.compile(r"-?\$?\s*\d[\d,]*(?:\.\d+)?(?:\s*/\s*\d+)?|-?\$?\s*\.\d+")


def _number(text: str) -> Fraction | None:
    """The first number in ``text`` (thousands separators, ``$`` and ``a/b`` allowed)."""
    match = _NUMBER.search(text)
    if match is None:
        return None
    token = re.sub(r"[\s$,]", "", match.group())
    try:
        if "/" in token:
            numerator, denominator = token.split("/")
            return Fraction(numerator) / Fraction(denominator) if Fraction(denominator) else None
        return Fraction(token)
    except (ValueError, ZeroDivisionError):
        return None


def _after_marker(text: str) -> str | None:
    return text.rsplit("####", 1)[1] if "####" in text else None


@register("gsm8k")
def gsm8k(completion: str, gold: str) -> Verdict:
    """GSM8K: the number after the completion's last ``####`` equals the gold's number."""
    tail = _after_marker(completion)
    answer = _number(tail) if tail is not None else None
    extracted = None if answer is None else str(answer)
    reference = _number(_after_marker(gold) if "####" in gold else gold)
    return Verdict(answer is not None and answer == reference, extracted)
