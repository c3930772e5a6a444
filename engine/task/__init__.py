"""The embedded default task: verifiable multi-digit arithmetic, its char-level tokenizer, its SFT
stage and its cached pairs.

Importing the package registers the task's verifier (``arithmetic``) and data source (``math``)
(:mod:`engine.task.register`), and the reasoning-gym plug-in's (``reasoning_gym``,
:mod:`engine.task.gym`). The arithmetic is re-exported here (stdlib only); the tokenizer lives
in ``engine.task.tokenizer`` so that importing the task does not import ``transformers``.
"""

from engine.task import gym as _gym  # noqa: F401  (reasoning-gym's verifier and data source)
from engine.task import register as _register  # noqa: F401  (the verifier and data source)
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
