"""Multi-digit addition and subtraction with exact answers, worked solutions and a strict verifier.

The embedded default task (see DESIGN.md): a tiny char-level causal LM is fine-tuned on ``solution``
texts, then sampled; ``verify`` decides which samples are correct, so that a correct sample (chosen)
can be paired with a wrong one (rejected).

Formats, for ``Problem(4721, 958, "+")``::

    prompt    "4721+958="
    solution  "1+8+0=9 c0|2+5+0=7 c0|7+9+0=6 c1|4+0+1=5 c0|#### 5679"

One step per column, least-significant column first, always ``x+y+carry_in=digit cCARRY_OUT|``
(a missing digit of the shorter operand is written ``0``). Subtraction (``a >= b``, so the result is
never negative) is the same with borrows: for ``Problem(5679, 958, "-")``::

    prompt    "5679-958="
    solution  "9-8-0=1 b0|7-5-0=2 b0|6-9-0=7 b1|5-0-1=4 b0|#### 4721"

The answer after ``####`` is the step digits read last-to-first (plus a final carry, if any), with
leading zeros dropped. Every step has the same shape and width (10 characters), which a tiny
transformer learns easily. For the default 2-5 digit operands, responses are 28 to 66 characters
(one token each) and prompts 6 to 12.
Everything here is stdlib-only and pure, apart from ``random.Random`` seeded by the caller.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

ANSWER_MARKER = "####"
STEP_SEPARATOR = "|"
OPS = ("+", "-")

# After the one and only marker: optional whitespace, optional sign, a canonical integer (no
# leading zeros), optional trailing whitespace, then the end of the text. ASCII digits only.
_ANSWER_TAIL = re.compile(r"[ \t\n\r]*([+-]?)(0|[1-9][0-9]*)[ \t\n\r]*")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem ``a op b``, with ``a >= b`` when ``op`` is ``"-"``.

    >>> p = Problem(4721, 958, "+")
    >>> p.prompt, p.answer
    ('4721+958=', 5679)
    """

    a: int
    b: int
    op: str

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"op must be one of {OPS}, got {self.op!r}")
        if self.a < 0 or self.b < 0:
            raise ValueError(f"operands must be non-negative, got {self.a}, {self.b}")
        if self.op == "-" and self.a < self.b:
            raise ValueError(f"subtraction needs a >= b, got {self.a}-{self.b}")

    @property
    def prompt(self) -> str:
        """The text given to the model, e.g. ``"4721+958="``; it always ends with ``"="``."""
        return f"{self.a}{self.op}{self.b}="

    @property
    def answer(self) -> int:
        """The exact result."""
        return self.a + self.b if self.op == "+" else self.a - self.b


def _random_operand(rng: random.Random, num_digits: int) -> int:
    """A uniform integer with exactly ``num_digits`` digits (1 digit includes 0)."""
    low = 0 if num_digits == 1 else 10 ** (num_digits - 1)
    return rng.randint(low, 10**num_digits - 1)


def generate_problems(
    n: int,
    seed: int,
    min_digits: int = 2,
    max_digits: int = 5,
    ops: Sequence[str] = OPS,
) -> list[Problem]:
    """``n`` distinct problems (distinct prompts), deterministic for a given seed and arguments.

    Each problem draws its op uniformly from ``ops`` and the digit count of each operand uniformly
    from ``[min_digits, max_digits]``; for ``"-"`` the operands are swapped so that ``a >= b``.
    Repeated prompts are skipped, so a returned list never holds the same prompt twice.

    Raises:
        ValueError: bad arguments, or fewer than ``n`` distinct problems could be found.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if not 1 <= min_digits <= max_digits:
        raise ValueError(f"need 1 <= min_digits <= max_digits, got {min_digits}, {max_digits}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops!r}")
    rng = random.Random(seed)
    seen: set[str] = set()
    problems: list[Problem] = []
    max_attempts = 100 * n + 1000
    for _ in range(max_attempts):
        if len(problems) == n:
            break
        op = rng.choice(list(ops))
        a = _random_operand(rng, rng.randint(min_digits, max_digits))
        b = _random_operand(rng, rng.randint(min_digits, max_digits))
        if op == "-" and a < b:
            a, b = b, a
        problem = Problem(a, b, op)
        if problem.prompt not in seen:
            seen.add(problem.prompt)
            problems.append(problem)
    if len(problems) < n:
        raise ValueError(
            f"found only {len(problems)} distinct problems of the {n} asked for; "
            "widen the digit range"
        )
    return problems


def split_problems(
    n_train: int,
    n_eval: int,
    seed: int,
    min_digits: int = 2,
    max_digits: int = 5,
    ops: Sequence[str] = OPS,
) -> tuple[list[Problem], list[Problem]]:
    """Disjoint ``(train, held_out)`` lists: no prompt occurs in both.

    Both come from one call of ``generate_problems`` (whose prompts are distinct): the first
    ``n_eval`` problems are held out, the rest are train. So the held-out set depends only on
    ``n_eval``, the seed and the problem distribution, not on ``n_train``, and a larger ``n_train``
    extends a smaller one.
    """
    problems = generate_problems(n_eval + n_train, seed, min_digits, max_digits, ops)
    return problems[n_eval:], problems[:n_eval]


def solution(problem: Problem) -> str:
    """The worked solution: one step per column, least-significant first, then the answer.

    Hand-worked, 4721+958: columns (1,8), (2,5), (7,9), (4,0); 7+9+0=16 gives digit 6, carry 1:

    >>> solution(Problem(4721, 958, "+"))
    '1+8+0=9 c0|2+5+0=7 c0|7+9+0=6 c1|4+0+1=5 c0|#### 5679'
    >>> solution(Problem(95, 7, "+"))
    '5+7+0=2 c1|9+0+1=0 c1|#### 102'
    >>> solution(Problem(100, 99, "-"))
    '0-9-0=1 b1|0-9-1=0 b1|1-0-1=0 b0|#### 1'
    """
    width = max(len(str(problem.a)), len(str(problem.b)))
    a_digits = [int(d) for d in reversed(str(problem.a).zfill(width))]
    b_digits = [int(d) for d in reversed(str(problem.b).zfill(width))]
    steps: list[str] = []
    out_digits: list[int] = []
    carry = 0
    for x, y in zip(a_digits, b_digits, strict=True):
        if problem.op == "+":
            total = x + y + carry
            digit, carry_out = total % 10, total // 10
            steps.append(f"{x}+{y}+{carry}={digit} c{carry_out}")
        else:
            total = x - y - carry
            digit, carry_out = total % 10, int(total < 0)
            steps.append(f"{x}-{y}-{carry}={digit} b{carry_out}")
        out_digits.append(digit)
        carry = carry_out
    if carry:  # only addition can end with a carry, since a >= b for subtraction
        out_digits.append(carry)
    answer = int("".join(str(d) for d in reversed(out_digits)))
    return STEP_SEPARATOR.join([*steps, f"{ANSWER_MARKER} {answer}"])


def extract_answer(text: str) -> int | None:
    """The final answer in ``text``, or ``None`` when it is not stated exactly once and cleanly.

    The rule: ``text`` holds the marker ``####`` exactly once (non-overlapping count, so ``#####``
    fails too), and everything after it is optional whitespace, an optional ``+``/``-`` sign, a
    canonical ASCII integer (``0`` or no leading zero) and optional trailing whitespace. What comes
    before the marker (the worked steps) is not checked.

    >>> extract_answer("7+9+0=6 c1|#### 5679"), extract_answer("#### -12 \\n")
    (5679, -12)
    >>> [extract_answer(t) for t in ["5679", "#### 5679 #### 1", "#### 56x", "#### 05679", ""]]
    [None, None, None, None, None]
    """
    if text.count(ANSWER_MARKER) != 1:
        return None
    match = _ANSWER_TAIL.fullmatch(text.split(ANSWER_MARKER, 1)[1])
    if match is None:
        return None
    sign, digits = match.groups()
    return -int(digits) if sign == "-" else int(digits)


def verify(problem: Problem, response_text: str) -> bool:
    """True iff ``extract_answer(response_text)`` is exactly ``problem.answer``.

    Only the final answer is checked, not the steps: ``"#### 5679"`` passes for 4721+958, while
    ``"#### 56790"``, ``"#### 5679 #### 1"`` and ``"5679"`` fail.
    """
    return extract_answer(response_text) == problem.answer
