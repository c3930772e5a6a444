"""Tests for the verifier registry: tables of equivalent and non-equivalent answers per verifier,
the math verifier's time limit (in threads, in daemonic worker processes, on a pathological
input), and unknown names."""

from __future__ import annotations

import multiprocessing
from concurrent.futures import ThreadPoolExecutor

import pytest

from engine.generation.math_answers import gold_latex, last_boxed
from engine.generation.verifiers import MATH
from engine.task.arithmetic import Problem, solution, verify
from engine.verifiers import VERIFIERS, Verdict, register

MATH_EQUIVALENT = [
    ("so the answer is \\boxed{0.5}", "\\frac{1}{2}"),
    ("\\boxed{\\frac{1}{2}}", "0.5"),
    ("\\boxed{\\dfrac12}", "0.5"),
    ("\\boxed{\\dfrac12}", "\\frac{1}{2}"),
    ("The answer is \\boxed{27}.", "27.0"),  # AMC 2023 stores answers as floats
    ("\\boxed{\\frac{14}{3}}", "\\frac{14}{3}"),
    ("\\boxed{1+x^2}", "x^2+1"),
    ("\\boxed{(1,2)}", "(1,2)"),
    ("\\boxed{[1,2)}", "$[1,2)$"),  # a gold already in $...$ is read as it is
    ("\\boxed{1,000}", "1000"),
    ("first \\boxed{3}, then finally \\boxed{5}", "5"),  # the last \boxed{} is the answer
    ("\\boxed{\\sqrt{2}/2}", "\\frac{\\sqrt{2}}{2}"),
    ("we get $x = 3$", "3"),  # no \boxed{}: math-verify's own extraction
]
MATH_DIFFERENT = [
    ("\\boxed{0.51}", "\\frac{1}{2}"),
    ("\\boxed{3}", "27.0"),
    ("\\boxed{4.67}", "\\frac{14}{3}"),
    ("\\boxed{x^2-1}", "x^2+1"),
    ("\\boxed{5}, no wait, \\boxed{3}", "5"),  # only the last one counts
    ("no answer here", "5"),
    ("", "5"),
]


@pytest.mark.parametrize(("completion", "gold"), MATH_EQUIVALENT)
def test_math_accepts_equivalent_answers(completion: str, gold: str) -> None:
    verdict = VERIFIERS["math"].judge(completion, gold)
    assert verdict == Verdict(True, verdict.extracted) and verdict.extracted
    assert VERIFIERS["math"](completion, gold) is True


@pytest.mark.parametrize(("completion", "gold"), MATH_DIFFERENT)
def test_math_rejects_other_answers(completion: str, gold: str) -> None:
    verdict = VERIFIERS["math"].judge(completion, gold)
    assert not verdict.correct and not verdict.timed_out


def test_math_records_the_extracted_answer() -> None:
    assert VERIFIERS["math"].judge("... \\boxed{\\dfrac12}.", "0.5").extracted == "\\dfrac12"
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{1}{2}} c") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None
    assert gold_latex(" 27.0 ") == "$27.0$" and gold_latex("$x$") == "$x$"


def test_math_works_outside_the_main_thread() -> None:
    """math-verify's own timeout (signal.alarm) fails outside the main thread; ours does not."""
    cases = MATH_EQUIVALENT[:4] + MATH_DIFFERENT[:4]
    with ThreadPoolExecutor(max_workers=4) as pool:
        verdicts = list(pool.map(lambda case: VERIFIERS["math"](*case), cases))
    assert verdicts == [True] * 4 + [False] * 4


def _verify_in_worker(case: tuple[str, str]) -> bool:
    return VERIFIERS["math"](*case)


def test_math_works_in_daemonic_worker_processes() -> None:
    """A multiprocessing.Pool worker is daemonic (it may not start multiprocessing children)."""
    context = multiprocessing.get_context("fork")
    with context.Pool(2) as pool:
        verdicts = pool.map(_verify_in_worker, [MATH_EQUIVALENT[0], MATH_DIFFERENT[0]])
    assert verdicts == [True, False]


def test_a_pathological_answer_times_out_counts_wrong_and_is_counted(monkeypatch) -> None:
    """9^(9^(9^9)) makes sympy compute an integer of ~10^(10^8) digits in C code, where no
    Python-level timeout reaches: the helper is killed at the limit, the verdict is wrong and
    timed out, the counter says so, and the next check runs on a fresh helper."""
    monkeypatch.setattr(MATH, "timeout_seconds", 2.0)
    before = VERIFIERS["math"].timeouts
    verdict = VERIFIERS["math"].judge("\\boxed{9^{9^{9^{9}}}}", "1")
    assert verdict == Verdict(False, None, timed_out=True)
    assert VERIFIERS["math"].timeouts == before + 1
    assert VERIFIERS["math"]("\\boxed{2}", "2") is True  # restarted


GSM8K_EQUIVALENT = [
    ("Natalia sold 48 + 24 = 72 clips.\n#### 72", "In May... #### 72"),  # a whole gold solution
    ("#### 1,234", "1234"),
    ("#### 1234.0", "1,234"),
    ("#### $5", "5"),
    ("#### -3", "-3"),
    ("#### 3/4", "0.75"),
    ("first #### 1, then #### 18 dollars", "18"),  # the last ####
]
GSM8K_DIFFERENT = [
    ("#### 73", "72"),
    ("The answer is 72.", "72"),  # no #### marker
    ("#### ", "72"),
    ("#### 18 then #### 1", "18"),
    ("#### 1,235", "1234"),
]


@pytest.mark.parametrize(("completion", "gold"), GSM8K_EQUIVALENT)
def test_gsm8k_accepts_equal_numbers(completion: str, gold: str) -> None:
    assert VERIFIERS["gsm8k"](completion, gold) is True


@pytest.mark.parametrize(("completion", "gold"), GSM8K_DIFFERENT)
def test_gsm8k_rejects_other_numbers(completion: str, gold: str) -> None:
    assert VERIFIERS["gsm8k"](completion, gold) is False


def test_arithmetic_is_the_tasks_verifier() -> None:
    problem = Problem(4721, 958, "+")
    right = solution(problem)
    completions = [right, "#### 5679", "#### 56790", "#### 5679 #### 1", "5679", "#### 05679", ""]
    for completion in completions:
        assert VERIFIERS["arithmetic"](completion, str(problem.answer)) == verify(
            problem, completion
        )
    assert VERIFIERS["arithmetic"].judge(right, "5679") == Verdict(True, "5679")


def test_unknown_names_list_the_known_ones_and_duplicates_are_refused() -> None:
    with pytest.raises(KeyError, match="arithmetic, gsm8k, math"):
        VERIFIERS["maths"]
    with pytest.raises(ValueError, match="already registered"):
        register("math")(lambda completion, gold: Verdict(False, None))
