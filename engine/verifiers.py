"""``engine.verifiers.VERIFIERS``: every registered answer verifier, the built-in ones
(:mod:`engine.generation.verifiers`: ``math``, ``gsm8k``) and the embedded task's
(``arithmetic``, :mod:`engine.task.register`), under the name users import it by.
"""

import engine.task  # noqa: F401  (registers the embedded task's verifier)
from engine.generation.verifiers import VERIFIERS, Verdict, Verifier, register

__all__ = ["VERIFIERS", "Verdict", "Verifier", "register"]
