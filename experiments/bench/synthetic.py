"""What both sides of ``experiments.bench.throughput`` share: the model, the tokenizer, the
synthetic pairs, the order they are trained in, and the FLOP accounting.

Everything is built in code from fixed seeds (no download): a word-level tokenizer with a 32k
vocabulary (``t4`` ... ``t31999`` plus four special tokens), a randomly initialized Llama saved
once as safetensors (both trainers load the same file), and pairs whose prompt and responses are
runs of random words, so text and token ids correspond one to one.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")  # ids 0..3
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(4)


@dataclass(frozen=True)
class ModelSize:
    """A Llama-style architecture (tied input/output embeddings)."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    vocab_size: int = 32_000

    def body_params(self) -> int:
        """Parameters of the decoder layers and final norm (no embeddings, no LM head)."""
        h, f = self.hidden_size, self.intermediate_size
        per_layer = 4 * h * h + 3 * h * f + 2 * h  # q, k, v, o; gate, up, down; two RMSNorms
        return self.num_layers * per_layer + h

    def head_params(self) -> int:
        """The LM head's multiply-adds per token (tied to the input embedding)."""
        return self.vocab_size * self.hidden_size


SIZES = {
    "small": ModelSize(hidden_size=256, intermediate_size=688, num_layers=4, num_heads=4),
    "large": ModelSize(hidden_size=512, intermediate_size=1376, num_layers=8, num_heads=8),
}


@dataclass(frozen=True)
class PairSpec:
    """Synthetic pair lengths in tokens, uniform in each range (responses include their EOS)."""

    prompt: tuple[int, int] = (64, 256)
    response: tuple[int, int] = (16, 256)
    seed: int = 0


def synthetic_pairs(count: int, spec: PairSpec, vocab_size: int) -> list[dict[str, list[int]]]:
    """``count`` pairs of token ids: ``prompt``, ``chosen``, ``rejected`` (responses end in EOS)."""
    if spec.response[0] < 2 or spec.prompt[0] < 1:
        raise ValueError("responses need >= 2 tokens (a word and EOS), prompts >= 1")
    rng = random.Random(spec.seed)
    words = range(len(SPECIALS), vocab_size)

    def run(low: int, high: int) -> list[int]:
        return [rng.choice(words) for _ in range(rng.randint(low, high))]

    pairs = []
    for _ in range(count):
        prompt = run(*spec.prompt)
        chosen = [*run(spec.response[0] - 1, spec.response[1] - 1), EOS_ID]
        rejected = [*run(spec.response[0] - 1, spec.response[1] - 1), EOS_ID]
        if chosen == rejected:  # vanishingly rare; keep every pair a preference
            rejected = [rng.choice(words), *rejected]
        pairs.append({"prompt": prompt, "chosen": chosen, "rejected": rejected})
    return pairs


def _text(ids: list[int], leading_space: bool) -> str:
    words = [SPECIALS[i] if i < len(SPECIALS) else f"t{i}" for i in ids]
    # the EOS is appended by each trainer itself (ours: load_pairs; TRL: its add-EOS step)
    if words and words[-1] == SPECIALS[EOS_ID]:
        words = words[:-1]
    text = " ".join(words)
    return (" " + text) if leading_space else text


def pair_texts(pair: dict[str, list[int]]) -> dict[str, str]:
    """The text row of a pair (the standard prompt / chosen / rejected format)."""
    return {
        "prompt": _text(pair["prompt"], leading_space=False),
        "chosen": _text(pair["chosen"], leading_space=True),
        "rejected": _text(pair["rejected"], leading_space=True),
    }


def build_tokenizer(vocab_size: int):
    """A word-level fast tokenizer: whitespace-split words ``t<id>``, no BOS added, EOS ``</s>``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(SPECIALS)}
    vocab.update({f"t{i}": i for i in range(len(SPECIALS), vocab_size)})
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
    )
    return tokenizer


def build_model_dir(directory: Path, size: ModelSize, max_positions: int, seed: int = 0) -> Path:
    """Save a randomly initialized Llama of ``size`` and the tokenizer to ``directory``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=size.vocab_size,
        hidden_size=size.hidden_size,
        intermediate_size=size.intermediate_size,
        num_hidden_layers=size.num_layers,
        num_attention_heads=size.num_heads,
        num_key_value_heads=size.num_heads,
        max_position_embeddings=max_positions,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=PAD_ID,
        tie_word_embeddings=True,
        use_cache=False,
    )
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    build_tokenizer(size.vocab_size).save_pretrained(directory)
    return directory


def write_pairs(path: Path, pairs: list[dict[str, list[int]]]) -> Path:
    """The pairs as JSONL text rows (what both trainers read)."""
    path.write_text("".join(json.dumps(pair_texts(p)) + "\n" for p in pairs))
    return path


def tokenized_pairs(pairs: list[dict[str, list[int]]]) -> list[Any]:
    """The pairs as :class:`~engine.data.loading.TokenizedPair` (what the engine's ``load_pairs``
    reads)."""
    from engine.data.loading import TokenizedPair

    return [
        TokenizedPair(p["prompt"], p["chosen"], p["rejected"], f"index {i}")
        for i, p in enumerate(pairs)
    ]


def training_order(
    pairs: list[dict[str, list[int]]], trainer: dict[str, Any], steps: int, seed: int
) -> list[list[int]]:
    """The pair indices of each optimizer step, as ``engine.train`` visits them with this
    ``trainer`` config (one process, grad_accum 1; keys not given: conf/trainer/default.yaml's):
    the engine's own sampler, a pure function of the step."""
    from omegaconf import OmegaConf

    from engine.data.batching import step_sampler

    defaults = OmegaConf.load(Path(__file__).resolve().parents[2] / "conf/trainer/default.yaml")
    sampler = step_sampler(tokenized_pairs(pairs), OmegaConf.merge(defaults, trainer), 1, seed)
    return [sampler.indices(step, 0, 0) for step in range(steps)]


def pair_flops(pair: dict[str, list[int]], size: ModelSize) -> float:
    """Nominal model FLOPs of one DPO training step on ``pair`` (forward + backward = 3 x forward).

    The work of the plain concatenated forward that the objective needs: the body over prompt +
    chosen and prompt + rejected (6 * body params per token), the LM head at the response tokens
    only (6 * vocab * hidden per token), and causal attention scores and values (6 * hidden * T *
    (T + 1) per layer and sequence of T tokens). Every trainer is credited the same FLOPs for the
    same pair, so MFU ratios equal throughput ratios: TRL's extra head work at prompt positions
    is not credited, nor is ours skipped for the shared prompt.
    """
    prompt, chosen, rejected = len(pair["prompt"]), len(pair["chosen"]), len(pair["rejected"])
    body_tokens = 2 * prompt + chosen + rejected
    attention = sum(t * (t + 1) for t in (prompt + chosen, prompt + rejected))
    return (
        6.0 * size.body_params() * body_tokens
        + 6.0 * size.head_params() * (chosen + rejected)
        + 6.0 * size.hidden_size * size.num_layers * attention
    )


def matmul_peak_gflops(n: int = 4096, repeats: int = 5) -> float:
    """This machine's dense float32 matmul rate (GFLOP/s) at torch's thread count: the best of
    ``repeats`` (n x n) @ (n x n) products after a warm-up one."""
    import torch

    if torch.cuda.is_available():
        a = torch.randn(n, n, device="cuda")
        b = torch.randn(n, n, device="cuda")
        a @ b
        torch.cuda.synchronize()
    else:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2.0 * n**3 / best / 1e9


def size_dict(size: ModelSize) -> dict[str, int]:
    """JSON form of a size."""
    return asdict(size)
