"""The ``reasoning_gym`` verifier: the answer a completion states, judged by the dataset itself.

Extraction, first rule that finds something:

1. the content of the last ``\\boxed{...}`` (braces balanced; the paper's rule);
2. the content of the last ``<answer>...</answer>`` (reasoning-gym's own answer format);
3. when the gold answer is a number: the last number in the completion (``-12``, ``3.5``,
   ``1,234`` read as ``1234``); otherwise the last non-empty line, stripped.

No answer found scores 0. The answer and the problem's stored entry (its ``gold`` field,
:func:`engine.task.gym.problems.gold_text`) go to the dataset's own ``score_answer``, built with
the same options the problem was drawn with; a score below 1 (partial credit included) counts as
wrong, and the score is kept in the verdict (``Verdict.score``) and so in per-problem records. A
scorer that raises on a strange answer scores 0 (a wrong answer, not a crashed evaluation).

Cost: microseconds per check for the arithmetic datasets (no helper process, no time limit).
"""

from __future__ import annotations

import json
import logging
import re

from engine.generation.math_answers import last_boxed
from engine.generation.verifiers import Verdict
from engine.task.gym.problems import read_gold, scorer

log = logging.getLogger(__name__)

_ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})+(?:\.\d+)?(?!\d)|-?\d+(?:\.\d+)?")


def _is_number(text: str) -> bool:
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", text.strip().replace(",", "")))


def extract_answer(completion: str, gold_answer: str) -> str | None:
    """The answer ``completion`` states, by the rules of the module docstring."""
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed.strip()
    tagged = _ANSWER_TAG.findall(completion)
    if tagged:
        return tagged[-1].strip()
    if _is_number(gold_answer):
        numbers = _NUMBER.findall(completion)
        return numbers[-1].replace(",", "") if numbers else None
    lines = [line.strip() for line in completion.splitlines() if line.strip()]
    return lines[-1] if lines else None


def judge(completion: str, gold: str) -> Verdict:
    """The verdict on ``completion`` for the problem whose ``gold`` field is ``gold``."""
    name, options, entry = read_gold(gold)
    answer = extract_answer(completion, str(entry.get("answer", "")))
    if answer is None:
        return Verdict(False, None, score=0.0)
    dataset = scorer(name, json.dumps(options, sort_keys=True))
    try:
        score = float(dataset.score_answer(answer, entry))
    except Exception as error:  # the dataset's scorer on an answer it did not expect
        log.warning("%s.score_answer(%r) raised %s: scored 0", name, answer[:40], error)
        score = 0.0
    return Verdict(score >= 1.0, answer, score=score)
