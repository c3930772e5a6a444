"""Tests for the arithmetic task: problem generation, worked solutions and the strict verifier."""

import doctest
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from engine.task import arithmetic
from engine.task.arithmetic import (
    Problem,
    extract_answer,
    generate_problems,
    solution,
    split_problems,
    verify,
)

ADD = Problem(4721, 958, "+")  # 5679
SUB = Problem(5679, 958, "-")  # 4721

STEP = re.compile(r"([0-9])([+-])([0-9])[+-]([01])=([0-9]) ([cb])([01])")

operands = st.integers(min_value=0, max_value=10**7)


@st.composite
def problems(draw: st.DrawFn) -> Problem:
    a, b = draw(operands), draw(operands)
    op = draw(st.sampled_from(["+", "-"]))
    if op == "-" and a < b:
        a, b = b, a
    return Problem(a, b, op)


def test_docstring_examples() -> None:
    assert doctest.testmod(arithmetic).failed == 0


def test_hand_worked_formats() -> None:
    assert ADD.prompt == "4721+958="
    assert solution(ADD) == "1+8+0=9 c0|2+5+0=7 c0|7+9+0=6 c1|4+0+1=5 c0|#### 5679"
    assert SUB.prompt == "5679-958="
    assert solution(SUB) == "9-8-0=1 b0|7-5-0=2 b0|6-9-0=7 b1|5-0-1=4 b0|#### 4721"
    assert solution(Problem(7, 7, "-")) == "7-7-0=0 b0|#### 0"


@pytest.mark.parametrize(
    ("text", "ok"),
    [
        ("#### 5679", True),
        (solution(ADD), True),
        ("junk steps|####5679", True),
        ("#### 5679  \n", True),
        ("#### +5679", True),
        ("#### 5678", False),  # off by one
        ("#### 5680", False),
        ("#### 56790", False),  # extra digit
        ("#### 15679", False),
        ("#### 05679", False),  # leading zero is not canonical
        ("#### 5679 #### 1", False),  # two markers
        ("#### 1 #### 5679", False),
        ("##### 5679", False),
        ("5679", False),  # missing marker
        ("", False),
        ("####", False),
        ("#### ", False),
        ("#### 5679x", False),
        ("#### 5,679", False),
        ("#### 56 79", False),
        ("#### 5679.0", False),
        ("#### ５６７９", False),  # non-ASCII digits
        ("#### -5679", False),
    ],
)
def test_verify_hand_cases(text: str, ok: bool) -> None:
    assert verify(ADD, text) is ok


def test_extract_answer_signs() -> None:
    assert extract_answer("#### -12") == -12
    assert extract_answer("#### +12") == 12
    assert extract_answer("#### 0") == 0
    assert extract_answer("#### --12") is None
    assert extract_answer("#### - 12") is None
    # A subtraction answer is never negative; a negated one is wrong, not equal.
    assert verify(SUB, "#### 4721")
    assert not verify(SUB, "#### -4721")


@given(problems())
def test_solution_verifies_and_every_step_is_correct(problem: Problem) -> None:
    text = solution(problem)
    assert verify(problem, text)
    *steps, final = text.split("|")
    assert final == f"#### {problem.answer}"
    width = max(len(str(problem.a)), len(str(problem.b)))
    assert len(steps) == width
    a_digits = str(problem.a).zfill(width)[::-1]
    b_digits = str(problem.b).zfill(width)[::-1]
    carry, out_digits = 0, []
    for column, step in enumerate(steps):
        match = STEP.fullmatch(step)
        assert match, step
        x, op, y, carry_in, digit, carry_kind, carry_out = match.groups()
        assert op == problem.op and carry_kind == ("c" if op == "+" else "b")
        assert (int(x), int(y), int(carry_in)) == (
            int(a_digits[column]),
            int(b_digits[column]),
            carry,
        )
        sign = 1 if op == "+" else -1
        # digit + 10 * carry_out (with the carry's sign) must equal the column's exact value.
        assert int(x) + sign * (int(y) + carry) == int(digit) + sign * 10 * int(carry_out)
        carry = int(carry_out)
        out_digits.append(digit)
    if carry:
        out_digits.append("1")
    assert int("".join(reversed(out_digits))) == problem.answer


@given(problems(), st.integers(min_value=-(10**8), max_value=10**8))
def test_wrong_answers_fail(problem: Problem, wrong: int) -> None:
    if wrong == problem.answer:
        wrong += 1
    steps = solution(problem).rsplit("####", 1)[0]
    assert not verify(problem, f"{steps}#### {wrong}")
    assert not verify(problem, f"#### {wrong}")


def test_generate_problems_is_deterministic_and_distinct() -> None:
    first = generate_problems(500, seed=3)
    assert first == generate_problems(500, seed=3)
    assert first != generate_problems(500, seed=4)
    assert len({p.prompt for p in first}) == 500
    assert {p.op for p in first} == {"+", "-"}
    for p in first:
        assert 2 <= len(str(p.a)) <= 5 and 2 <= len(str(p.b)) <= 5
        assert p.answer >= 0


def test_generate_problems_respects_arguments() -> None:
    only_add = generate_problems(200, seed=0, min_digits=3, max_digits=3, ops=["+"])
    assert all(p.op == "+" and 100 <= p.b <= p.a + p.b <= 1998 for p in only_add)
    with pytest.raises(ValueError):
        generate_problems(10, seed=0, min_digits=3, max_digits=2)
    with pytest.raises(ValueError):
        generate_problems(10, seed=0, ops=["*"])
    with pytest.raises(ValueError, match="distinct"):
        generate_problems(101, seed=0, min_digits=1, max_digits=1, ops=["+"])  # only 100 exist


def test_split_problems_is_disjoint_and_stable() -> None:
    # A small space (1-2 digit operands) forces many repeats, which must all be removed.
    train, held_out = split_problems(3000, 500, seed=0, min_digits=1, max_digits=2)
    assert len(train) == 3000 and len(held_out) == 500
    assert not {p.prompt for p in train} & {p.prompt for p in held_out}
    bigger_train, same_held_out = split_problems(3500, 500, seed=0, min_digits=1, max_digits=2)
    assert same_held_out == held_out
    assert bigger_train[:3000] == train


def test_problem_rejects_bad_values() -> None:
    with pytest.raises(ValueError):
        Problem(1, 2, "-")
    with pytest.raises(ValueError):
        Problem(1, 2, "*")
    with pytest.raises(ValueError):
        Problem(-1, 2, "+")
