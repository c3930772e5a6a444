"""Data sources: the ``data`` config resolved, before the loop, into what training needs.

:func:`prepare_data` returns a :class:`PreparedData`: the model config to start from, the
tokenizer, the tokenized train and eval pairs with their load reports, the evaluators run at
every evaluation (each ``evaluate(model, tokenizer, device) -> {name: value}``, logged as
``eval/<name>``), and extra ``results.json`` sections.

A source is chosen by ``data.kind``. ``files`` (users' preference files, hub names, ``datasets``
dirs) is the plain one. ``math``, the embedded task, registers itself from :mod:`engine.task`: it
builds (or reuses) its SFT model and pairs, then points the model at the SFT model and the data at
its pair files; it adds its greedy accuracy as an evaluator and its SFT summary as
``results.json``'s ``sft``.

Adding a source: one function ``(cfg) -> ResolvedSource`` decorated with
``@SOURCES.register("kind")``, in a module the command imports. Adding
an evaluator (e.g. benchmark accuracy): any object with :class:`Evaluator`'s ``evaluate``,
appended to ``ResolvedSource.evaluators`` by the source that provides it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from omegaconf import DictConfig

from engine.data.loading import DataReport, TokenizedPair, check_rows, load_pairs
from engine.runtime.errors import ConfigError
from losses.registry import Registry


class Evaluator(Protocol):
    """Something measured on the policy at every evaluation (generation accuracy, ...)."""

    def evaluate(self, model: Any, tokenizer: Any, device: torch.device | str) -> dict[str, float]:
        """Metrics of ``model`` (in eval mode), without the ``eval/`` prefix."""
        ...


@dataclass
class ResolvedSource:
    """What a data source makes of the config: the model and data configs to load from, plus
    evaluators and ``results.json`` sections of its own."""

    model_cfg: Any
    data_cfg: Any
    evaluators: list[Evaluator] = field(default_factory=list)
    extra_results: dict[str, Any] = field(default_factory=dict)


@dataclass
class PreparedData:
    """Everything the run needs from its data, loaded."""

    model_cfg: Any
    tokenizer: Any
    train_pairs: list[TokenizedPair]
    eval_pairs: list[TokenizedPair]
    train_report: DataReport
    eval_report: DataReport | None
    evaluators: list[Evaluator] = field(default_factory=list)
    extra_results: dict[str, Any] = field(default_factory=dict)

    def reports(self) -> dict[str, Any]:
        """``results.json``'s ``data`` section: how the train and eval files loaded."""
        return {
            "train": self.train_report.to_dict(),
            "eval": self.eval_report.to_dict() if self.eval_report else None,
        }


def files_source(cfg: DictConfig) -> ResolvedSource:
    """``data=files``: the configured model and preference files, as they are."""
    return ResolvedSource(model_cfg=cfg.model, data_cfg=cfg.data)


#: ``data.kind`` -> the source that resolves it. ``files`` is registered here; the embedded
#: task registers ``math`` when :mod:`engine.task` is imported (the commands import it).
SOURCES: Registry[Callable[[DictConfig], ResolvedSource]] = Registry("data source")
SOURCES.add("files", files_source)


def prepare_data(cfg: DictConfig, tokenizer_loader: Callable[[Any], Any]) -> PreparedData:
    """Resolve ``cfg.data`` through its source (``data.kind``, :data:`SOURCES`), check the rows
    of its local files without a tokenizer (a bad file fails in a second:
    :func:`engine.data.loading.check_rows`), then load the tokenizer of the source's model config
    with ``tokenizer_loader`` (e.g. :func:`engine.model.loading.load_tokenizer`) and the pairs."""
    kind = str(cfg.data.get("kind", "files"))
    try:
        resolve = SOURCES[kind]
    except KeyError as error:
        raise ConfigError(f"config key data.kind: {error}") from None
    source = resolve(cfg)
    data_cfg = source.data_cfg
    for key, split, limit in (
        ("train", data_cfg.split, data_cfg.get("limit")),
        ("eval", data_cfg.eval_split, data_cfg.get("eval_limit")),
    ):
        if data_cfg.get(key):
            check_rows(data_cfg[key], split=split, on_bad_row=data_cfg.on_bad_row, limit=limit)
    tokenizer = tokenizer_loader(source.model_cfg)
    options = {
        "max_length": int(data_cfg.max_length),
        "max_prompt_length": data_cfg.get("max_prompt_length"),
        "on_bad_row": data_cfg.on_bad_row,
    }
    train_pairs, train_report = load_pairs(
        data_cfg.train, tokenizer, split=data_cfg.split, limit=data_cfg.get("limit"), **options
    )
    eval_pairs: list[TokenizedPair] = []
    eval_report = None
    if data_cfg.get("eval"):
        eval_pairs, eval_report = load_pairs(
            data_cfg.eval,
            tokenizer,
            split=data_cfg.eval_split,
            limit=data_cfg.get("eval_limit"),
            **options,
        )
    return PreparedData(
        model_cfg=source.model_cfg,
        tokenizer=tokenizer,
        train_pairs=train_pairs,
        eval_pairs=eval_pairs,
        train_report=train_report,
        eval_report=eval_report,
        evaluators=source.evaluators,
        extra_results=source.extra_results,
    )
