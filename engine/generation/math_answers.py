"""Math answers through math-verify: the answer a completion states, and whether it equals the gold.

This module holds the math logic of the ``math`` verifier (``engine.generation.verifiers``) and runs
in a helper process: ``python -c "from engine.generation.math_answers import serve; serve()"``
answers one JSON request per line on stdin (``{"completion": ..., "gold": ...}``) with one JSON line
on stdout (``{"correct": bool, "extracted": str | null}``). The verifier kills that process when a
request exceeds its time limit, so math-verify runs here with its own signal-based timeouts switched
off (``parsing_timeout=None``, ``timeout_seconds=None``): those only work in a main thread, and
sympy can hang in C code (a huge power) where no Python-level timeout reaches.

Rules:

- the gold is parsed as the reference: a bare answer (``27.0``, ``\\frac{1}{2}``, ``x^2+1``) is
  read as ``$...$`` LaTeX; one already holding ``$``, ``\\(``, ``\\[`` or ``\\boxed`` is read
  as it is;
- the completion's answer is the content of its last ``\\boxed{}`` (the paper's rule; math-verify
  alone would join every boxed expression into a set); without one, math-verify's extraction of
  LaTeX, then of a plain expression;
- equality is math-verify's ``verify(gold, answer)``: numbers to 6 decimal places, so ``0.5``,
  ``\\frac{1}{2}`` and ``\\dfrac12`` agree; symbolic equality, sets, intervals and matrices.
"""

from __future__ import annotations

import json
import logging
import sys
from functools import lru_cache
from typing import Any

_GOLD_DELIMITERS = ("$", "\\(", "\\[", "\\boxed")


def gold_latex(gold: str) -> str:
    """The gold answer as text math-verify extracts: bare answers are wrapped in ``$...$``."""
    gold = gold.strip()
    return gold if any(mark in gold for mark in _GOLD_DELIMITERS) else f"${gold}$"


@lru_cache(maxsize=4096)
def _parsed_gold(gold: str) -> list[Any]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    config = [LatexExtractionConfig(), ExprExtractionConfig()]
    return parse(gold_latex(gold), extraction_config=config, parsing_timeout=None)


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced;
    None when there is none or it is not closed.

    >>> last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    """
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    opening = text.index("{", start)
    depth = 0
    for position in range(opening, len(text)):
        depth += {"{": 1, "}": -1}.get(text[position], 0)
        if depth == 0:
            return text[opening + 1 : position]
    return None


def _parsed_answer(completion: str) -> tuple[list[Any], str | None]:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    boxed = last_boxed(completion)
    config = [LatexExtractionConfig(boxed_match_priority=0), ExprExtractionConfig()]
    text = completion if boxed is None else f"\\boxed{{{boxed}}}"
    answer = parse(text, extraction_config=config, parsing_timeout=None)
    if boxed is not None:
        return answer, boxed.strip()
    return answer, str(answer[-1]) if answer else None


def judge(completion: str, gold: str) -> tuple[bool, str | None]:
    """``(correct, extracted answer)`` for one completion; no time limit (see the module doc)."""
    from math_verify import verify

    answer, extracted = _parsed_answer(completion)
    reference = _parsed_gold(gold)
    if not answer or not reference:
        return False, extracted
    return bool(verify(reference, answer, timeout_seconds=None)), extracted


def serve() -> None:
    """Answer requests on stdin until it closes (the helper process's main loop).

    Writes ``ready`` once math-verify is imported, so the caller's time limits never include the
    import. A request that raises is answered ``correct: false`` with the error.
    """
    logging.disable(logging.WARNING)  # math-verify warns per unparsable answer
    import math_verify  # noqa: F401  (imported before "ready")

    out = sys.stdout
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        request = json.loads(line)
        try:
            correct, extracted = judge(request["completion"], request["gold"])
            reply: dict[str, Any] = {"correct": correct, "extracted": extracted}
        except Exception as error:  # a malformed answer must not end the helper
            reply = {"correct": False, "extracted": None, "error": repr(error)}
        out.write(json.dumps(reply) + "\n")
        out.flush()
