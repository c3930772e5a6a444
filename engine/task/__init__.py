"""The embedded default task: verifiable multi-digit arithmetic and its char-level tokenizer.

The arithmetic is re-exported here (stdlib only); the tokenizer lives in ``engine.task.tokenizer``
so that importing the task does not import ``transformers``.
"""

from engine.task.arithmetic import (
    ANSWER_MARKER,
    Problem,
    extract_answer,
    generate_problems,
    solution,
    split_problems,
    verify,
)

__all__ = [
    "ANSWER_MARKER",
    "Problem",
    "extract_answer",
    "generate_problems",
    "solution",
    "split_problems",
    "verify",
]
