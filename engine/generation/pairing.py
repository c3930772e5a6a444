"""Verified on-policy pairs: sample k completions per prompt, verify each, pair a correct one
(chosen) with a wrong one (rejected): how the BPO paper made its math pairs.

The pairing rule, per prompt: among its k samples, the distinct correct completions and the
distinct wrong ones (a wrong one must be non-empty and must not have hit the verifier's time
limit: a timeout says nothing about the answer), each sorted as strings; if both are non-empty, the
chosen is ``rng.choice(correct)`` and the rejected ``rng.choice(wrong)``, with one
``random.Random(seed)`` drawn in prompt order. A prompt with no correct sample counts as
all-wrong; one with correct samples but no usable wrong one as all-correct; neither gives a pair.

Rows are a standard preference file that ``data=files`` reads: ``prompt`` (the rendered text, or
the chat messages when the tokenizer's chat template rendered it), ``chosen`` and ``rejected``
(strings, or one assistant message each), and ``answer`` (the gold, ignored by the loader).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from engine.generation.backends import Backend, PromptFormat, complete
from engine.generation.verifiers import VERIFIERS


@dataclass
class PairCounts:
    """What a round of sampling gave; counts add up over batches."""

    prompts: int = 0
    samples: int = 0
    correct_samples: int = 0
    pairs: int = 0
    all_correct_prompts: int = 0
    all_wrong_prompts: int = 0
    timeouts: int = 0

    def __add__(self, other: PairCounts) -> PairCounts:
        return PairCounts(**{k: v + getattr(other, k) for k, v in asdict(self).items()})

    @property
    def sample_accuracy(self) -> float:
        """Correct samples over all samples (0 when there are none)."""
        return self.correct_samples / max(1, self.samples)

    def to_dict(self) -> dict[str, float]:
        """The counts and the sample accuracy."""
        return {**asdict(self), "sample_accuracy": self.sample_accuracy}


def build_pairs(
    backend: Backend,
    tokenizer: Any,
    problems: Sequence[tuple[str, str]],
    *,
    prompt: PromptFormat,
    verifier: str,
    samples_per_prompt: int,
    temperature: float,
    max_new_tokens: int,
    seed: int,
    top_p: float = 1.0,
) -> tuple[list[dict[str, Any]], PairCounts]:
    """Pairs for ``(problem, gold)`` items: one ``generate`` call seeded with ``seed`` (each
    prompt repeated ``samples_per_prompt`` times in a row), then the rule of the module doc."""
    if samples_per_prompt < 2:
        raise ValueError(
            f"samples_per_prompt must be >= 2 (a pair needs a correct and a wrong sample), "
            f"got {samples_per_prompt}"
        )
    rendered, samples = complete(
        backend,
        tokenizer,
        prompt,
        [problem for problem, _ in problems],
        samples_per_prompt=samples_per_prompt,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        seed=seed,
    )
    judge = VERIFIERS[verifier].judge
    rng = random.Random(seed)
    rows: list[dict[str, Any]] = []
    counts = PairCounts(prompts=len(problems), samples=len(samples))
    for index, (shown, (_, gold)) in enumerate(zip(rendered, problems, strict=True)):
        mine = samples[index * samples_per_prompt : (index + 1) * samples_per_prompt]
        verdicts = [judge(sample, gold) for sample in mine]
        counts.correct_samples += sum(v.correct for v in verdicts)
        counts.timeouts += sum(v.timed_out for v in verdicts)
        correct = sorted({s for s, v in zip(mine, verdicts, strict=True) if v.correct})
        wrong = sorted(
            {
                s
                for s, v in zip(mine, verdicts, strict=True)
                if not v.correct and not v.timed_out and s.strip()
            }
        )
        if not correct:
            counts.all_wrong_prompts += 1
            continue
        if not wrong:
            counts.all_correct_prompts += 1
            continue
        chosen, rejected = rng.choice(correct), rng.choice(wrong)
        if isinstance(shown.row, list):  # a chat prompt: the responses are assistant turns
            chosen = [{"role": "assistant", "content": chosen}]
            rejected = [{"role": "assistant", "content": rejected}]
        rows.append({"prompt": shown.row, "chosen": chosen, "rejected": rejected, "answer": gold})
    counts.pairs = len(rows)
    return rows, counts
