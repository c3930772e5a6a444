"""Generating completions: prompt rendering and two backends behind one ``generate`` call.

- :class:`HFBackend` (the default): a Hugging Face model, batched, prompts left-padded so every
  row's new tokens start in the same column, stopping at EOS. It decodes with
  :func:`engine.generation.decoding.decode` (``generate``'s tokens at the model's own cost per
  token) where that loop knows the model, else with ``model.generate``.
- :class:`VLLMBackend` (optional extra ``vllm``, GPUs; the engine the paper's evaluation used): the
  same prompts, tokenized by the same tokenizer and handed over as token ids; only the generate
  call differs. It has not run on the CPU machine this project is developed on.

Both take the texts of :func:`render_prompt` and return one completion per prompt, decoded without
special tokens. ``temperature == 0`` is greedy decoding; above it, sampling from the full
distribution (no top-k; ``top_p`` 1 unless given), seeded so that the same call gives the same
completions. Decoding settings a model ships in its ``generation_config`` (a repetition penalty,
top-k) are overridden, so a benchmark's decoding is what its config says.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from engine.generation.decoding import decode, unsupported
from engine.runtime.progress import Progress

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class PromptFormat:
    """How a problem becomes a prompt.

    With a chat template (``chat_template`` true and the tokenizer has one): the messages
    ``[system (if any), user]`` rendered with ``add_generation_prompt=True``, tokenized without
    added special tokens (the template writes them). Without one, plain text
    ``"{system}\\n\\n{user}"`` (just ``"{user}"`` when there is no system line), tokenized with the
    tokenizer's special tokens (e.g. BOS), as the preference loader tokenizes plain prompts.
    """

    system: str | None = None
    user: str = "{problem}"  # the user turn; {problem} is the problem text
    chat_template: bool = True  # false: plain text even when the tokenizer has a template

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any] | None) -> PromptFormat:
        """From a config block ``{system, user, chat_template}`` (missing keys: the defaults)."""
        cfg = dict(cfg or {})
        unknown = set(cfg) - {"system", "user", "chat_template"}
        if unknown:
            raise ValueError(
                f"prompt: unknown keys {sorted(unknown)}; valid: system, user, chat_template"
            )
        return cls(
            system=cfg.get("system"),
            user=str(cfg.get("user", "{problem}")),
            chat_template=bool(cfg.get("chat_template", True)),
        )

    def messages(self, problem: str) -> list[dict[str, str]]:
        """The chat messages for ``problem``."""
        user = self.user.replace("{problem}", problem)
        system = [{"role": "system", "content": self.system}] if self.system else []
        return [*system, {"role": "user", "content": user}]

    def uses_template(self, tokenizer: Any) -> bool:
        """Whether prompts for ``tokenizer`` are rendered with its chat template."""
        return self.chat_template and getattr(tokenizer, "chat_template", None) is not None


@dataclass(frozen=True)
class RenderedPrompt:
    """A prompt as the model sees it (``text``), and as a preference file stores it (``row``:
    the message list when a chat template rendered it, else the text)."""

    text: str
    add_special_tokens: bool
    row: str | list[dict[str, str]]


def render_prompt(tokenizer: Any, prompt: PromptFormat, problem: str) -> RenderedPrompt:
    """``problem`` rendered by ``prompt`` for ``tokenizer`` (rules in :class:`PromptFormat`)."""
    messages = prompt.messages(problem)
    if prompt.uses_template(tokenizer):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return RenderedPrompt(text, False, messages)
    user = messages[-1]["content"]
    text = f"{prompt.system}\n\n{user}" if prompt.system else user
    return RenderedPrompt(text, True, text)


def complete(
    backend: Backend,
    tokenizer: Any,
    prompt: PromptFormat,
    problems: Sequence[str],
    *,
    samples_per_prompt: int = 1,
    **decoding: Any,
) -> tuple[list[RenderedPrompt], list[str]]:
    """Render each problem (:func:`render_prompt`) and generate ``samples_per_prompt``
    completions for it (in a row, problem order) with ``decoding`` (``max_new_tokens``,
    ``temperature``, ``top_p``, ``seed``): ``(rendered prompts, completions)``."""
    rendered = [render_prompt(tokenizer, prompt, problem) for problem in problems]
    # one format per call: all chat-templated (no added specials) or all plain text
    special = rendered[0].add_special_tokens if rendered else True
    completions = backend.generate(
        [r.text for r in rendered for _ in range(samples_per_prompt)],
        add_special_tokens=special,
        **decoding,
    )
    return rendered, completions


class Backend(Protocol):
    """What evaluation and pair sampling need from a generation engine."""

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        add_special_tokens: bool = True,
    ) -> list[str]:
        """One completion per prompt, in order (greedy when ``temperature == 0``)."""
        ...


def _eos_ids(model: Any, tokenizer: Any) -> int | list[int]:
    """The tokenizer's EOS plus any the model's generation config names (chat models end turns
    with their own token, e.g. Qwen's ``<|im_end|>``)."""
    ids = [tokenizer.eos_token_id]
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for extra in configured if isinstance(configured, list) else [configured]:
        if extra is not None and extra not in ids:
            ids.append(int(extra))
    return ids[0] if len(ids) == 1 else ids


#: ``HFBackend(decoder=...)`` / ``generation.decoder``: ``auto`` decodes with
#: :func:`engine.generation.decoding.decode` where it knows the model (the same tokens as
#: ``generate``, at a fraction of the cost), ``generate`` always calls ``model.generate``
DECODERS = ("auto", "generate")


class HFBackend:
    """A Hugging Face model: ``batch_size`` prompts at a time, in the order given.

    Sampling seeds torch's generator once per call (and restores the global RNG state after), so
    the completions depend on the seed, the prompts and the batch size only. The model's mode and
    the tokenizer's padding side are given back. ``synced_gpus`` is for a model sharded by ZeRO-3:
    it always decodes with ``generate``, whose ``synced_gpus`` keeps the ranks in step.
    ``decoder``: see :data:`DECODERS`; :attr:`decoder` (``loop`` or ``generate``) is what this
    backend uses and :attr:`decoder_reason` why. ``progress``: the label of the progress lines a
    call longer than ten seconds prints (sequences done, rate, ETA; :mod:`engine.runtime.progress`).
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        device: torch.device | str = "cpu",
        batch_size: int = 256,
        synced_gpus: bool = False,
        decoder: str = "auto",
        progress: str = "generation",
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"generation batch_size must be >= 1, got {batch_size}")
        if decoder not in DECODERS:
            raise ValueError(
                f"generation.decoder: unknown decoder {decoder!r}; valid: {', '.join(DECODERS)}"
            )
        self.model, self.tokenizer = model, tokenizer
        self.device, self.batch_size = device, batch_size
        self.progress = progress
        # ZeRO-3: every rank runs every forward until all are done (parameters are gathered
        # collectively); the caller gives every rank the same number of batches
        self.lockstep = {"synced_gpus": True} if synced_gpus else {}
        if decoder == "generate":
            reason: str | None = "generation.decoder=generate"
        elif synced_gpus:
            reason = "synced_gpus: ZeRO-3 ranks decode in lockstep, which generate keeps"
        else:
            reason = unsupported(model)
        self.decoder = "generate" if reason else "loop"
        self.decoder_reason = reason or "the decode loop knows this model"
        #: tokens generated so far by this backend, each row's up to and including its stop token
        self.generated_tokens = 0

    @torch.no_grad()
    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        add_special_tokens: bool = True,
    ) -> list[str]:
        """See :class:`Backend`."""
        model, tokenizer = self.model, self.tokenizer
        was_training = model.training
        model.eval()
        padding_side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        generator_state = torch.get_rng_state()
        torch.manual_seed(seed)
        progress = Progress(
            self.progress, len(prompts), "sequences", every=10.0, quiet_below=10.0, logger=log
        )
        completions: list[str] = []
        generated = 0
        try:
            for start in range(0, len(prompts), self.batch_size):
                batch = tokenizer(
                    list(prompts[start : start + self.batch_size]),
                    return_tensors="pt",
                    padding=True,
                    add_special_tokens=add_special_tokens,
                ).to(self.device)
                tokens = self._new_tokens(batch, max_new_tokens, temperature, top_p)
                completions += tokenizer.batch_decode(tokens, skip_special_tokens=True)
                generated += _generated(tokens, _eos_ids(model, tokenizer))
                progress.set_postfix(new_tokens_per_s=_rate(generated, progress))
                progress.update(len(batch["input_ids"]))
            progress.close()
        finally:
            self.generated_tokens += generated
            tokenizer.padding_side = padding_side
            torch.set_rng_state(generator_state)
            model.train(was_training)
        return completions

    def _new_tokens(
        self, batch: Mapping[str, Any], max_new_tokens: int, temperature: float, top_p: float
    ) -> torch.Tensor:
        """One batch's new tokens ``(rows, steps)``, rows that stopped padded."""
        model, tokenizer = self.model, self.tokenizer
        eos = _eos_ids(model, tokenizer)
        if self.decoder == "loop":
            return decode(
                model,
                batch["input_ids"],
                batch["attention_mask"],
                max_new_tokens=max_new_tokens,
                eos_token_ids=eos if isinstance(eos, list) else [eos],
                pad_token_id=tokenizer.pad_token_id,
                temperature=temperature,
                top_p=top_p,
            )
        if temperature > 0:
            decoding = {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": top_p}
        else:
            decoding = {"do_sample": False}
        output = model.generate(
            **batch,
            max_new_tokens=max_new_tokens,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            use_cache=True,
            repetition_penalty=1.0,
            **decoding,
            **self.lockstep,
        )
        return output[:, batch["input_ids"].shape[1] :]


def _generated(tokens: torch.Tensor, eos: int | list[int]) -> int:
    """Tokens generated in a batch: each row's up to and including its first stop token."""
    stops = torch.isin(tokens, torch.tensor(eos if isinstance(eos, list) else [eos]))
    steps = tokens.shape[1]
    first = torch.where(stops.any(1), stops.int().argmax(1) + 1, steps)
    return int(first.sum())


def _rate(count: int, progress: Progress) -> str:
    elapsed = max(time.perf_counter() - progress.started, 1e-9)
    return f"{count / elapsed:,.0f}"


class VLLMBackend:
    """vLLM's ``LLM.generate`` on the same token ids (``pip install .[vllm]``, a GPU).

    ``engine_options`` go to ``vllm.LLM`` (e.g. ``tensor_parallel_size``,
    ``gpu_memory_utilization``, ``dtype``). Each request gets its own seed (``seed + index``),
    so sampling is reproducible and independent of how vLLM schedules requests. Not run on this
    project's CPU machine.
    """

    def __init__(self, model_path: str, tokenizer: Any, **engine_options: Any) -> None:
        try:
            from vllm import LLM
        except ImportError as error:
            raise ImportError(
                "generation.backend=vllm needs vLLM: pip install '.[vllm]' (on a machine "
                "with a GPU)"
            ) from error
        self.tokenizer = tokenizer
        self.llm = LLM(model=model_path, tokenizer=model_path, **engine_options)

    def generate(
        self,
        prompts: Sequence[str],
        *,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int = 0,
        add_special_tokens: bool = True,
    ) -> list[str]:
        """See :class:`Backend`."""
        from vllm import SamplingParams, TokensPrompt

        requests = [
            TokensPrompt(
                prompt_token_ids=self.tokenizer(text, add_special_tokens=add_special_tokens)[
                    "input_ids"
                ]
            )
            for text in prompts
        ]
        params = [
            SamplingParams(
                temperature=temperature,
                top_p=top_p if temperature > 0 else 1.0,
                max_tokens=max_new_tokens,
                seed=seed + index,
                skip_special_tokens=True,
            )
            for index in range(len(prompts))
        ]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return [output.outputs[0].text for output in outputs]


def load_backend(generation_cfg: Mapping[str, Any], model_cfg: Any) -> tuple[Backend, Any]:
    """The configured backend for the model of ``model_cfg``, and the tokenizer prompts are
    rendered with.

    ``generation_cfg``: ``backend`` (``hf`` | ``vllm``), ``batch_size`` (hf: prompts per
    ``generate`` call), ``decoder`` (hf: :data:`DECODERS`, default ``auto``) and ``vllm``
    (options for ``vllm.LLM``). The hf model goes to this process's GPU (``LOCAL_RANK``) when
    there is one, else the CPU.
    """
    from engine.model.conversion import resolve_model_config
    from engine.model.loading import load_model, load_tokenizer

    model_cfg = resolve_model_config(model_cfg)  # a bundled GGUF model: its converted directory
    tokenizer = load_tokenizer(model_cfg)
    kind = str(generation_cfg.get("backend", "hf"))
    if kind == "vllm":
        if not model_cfg.get("name_or_path"):
            raise ValueError("generation.backend=vllm needs model.name_or_path (a saved model)")
        options = dict(generation_cfg.get("vllm") or {})
        return VLLMBackend(str(model_cfg.name_or_path), tokenizer, **options), tokenizer
    if kind != "hf":
        raise ValueError(f"generation.backend: unknown backend {kind!r}; valid: hf, vllm")
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    model = load_model(model_cfg, tokenizer).to(device)
    batch_size = int(generation_cfg.get("batch_size", 64))
    decoder = str(generation_cfg.get("decoder") or "auto")
    backend = HFBackend(model, tokenizer, device, batch_size=batch_size, decoder=decoder)
    log.info("generation: %s decoder (%s)", backend.decoder, backend.decoder_reason)
    return backend, tokenizer
