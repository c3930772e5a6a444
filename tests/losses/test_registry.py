"""Tests for losses.registry: the decorator-filled, read-only name -> part mapping."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping

import pytest

from losses import LOSSES, MARGINS, METHODS
from losses.registry import Registry, UnknownNameError


@pytest.fixture
def widgets() -> Registry:
    registry: Registry = Registry("widget")

    @registry.register()
    def spanner() -> str:
        return "spanner"

    @registry.register("hammer")
    def _some_function_name() -> str:
        return "hammer"

    return registry


def test_decorator_registers_under_function_name_or_given_name(widgets):
    assert sorted(widgets) == ["hammer", "spanner"]
    assert widgets["spanner"]() == "spanner"
    assert widgets["hammer"]() == "hammer"
    assert "_some_function_name" not in widgets
    assert len(widgets) == 2


def test_decorator_returns_the_target_unchanged():
    registry: Registry = Registry("widget")

    def wrench() -> int:
        return 3

    assert registry.register()(wrench) is wrench
    assert registry["wrench"] is wrench


def test_duplicate_name_rejected(widgets):
    with pytest.raises(ValueError, match="spanner"):

        @widgets.register("spanner")
        def other() -> str:
            return "other"

    with pytest.raises(ValueError, match="hammer"):
        widgets.add("hammer", object())
    # the original is kept
    assert widgets["spanner"]() == "spanner"
    assert widgets["hammer"]() == "hammer"


def test_nameless_target_rejected():
    registry: Registry = Registry("widget")
    with pytest.raises(ValueError):
        registry.register()(42)


def test_unknown_name_error_lists_names(widgets):
    with pytest.raises(UnknownNameError) as info:
        widgets["saw"]
    error = info.value
    assert isinstance(error, KeyError)
    message = str(error)
    assert "saw" in message and "widget" in message
    assert "hammer" in message and "spanner" in message
    # str() is the plain message, not KeyError's repr with extra quotes
    assert not message.startswith(("'", '"'))


def test_unknown_name_caught_as_key_error(widgets):
    with pytest.raises(KeyError):
        widgets["saw"]
    assert widgets.get("saw") is None
    assert "saw" not in widgets


@pytest.mark.parametrize(
    "registry", [LOSSES, MARGINS, METHODS], ids=["losses", "margins", "methods"]
)
def test_registries_are_read_only_mappings(registry):
    assert isinstance(registry, Mapping)
    assert not isinstance(registry, MutableMapping)
    name = next(iter(registry))
    with pytest.raises(TypeError):
        registry[name] = None
    with pytest.raises(TypeError):
        del registry[name]
    assert name in registry
    assert dict(registry.items())[name] is registry[name]


@pytest.mark.parametrize(
    ("registry", "at_least"),
    [
        (LOSSES, {"logistic", "hinge", "squared", "exponential", "truncated_quadratic", "savage"}),
        (MARGINS, {"difference", "balanced"}),
        (METHODS, {"dpo", "slic", "ipo", "bpo"}),
    ],
    ids=["losses", "margins", "methods"],
)
def test_project_registries_hold_the_contract_names(registry, at_least):
    assert at_least <= set(registry)


def test_project_registry_rejects_duplicate():
    original = LOSSES["logistic"]
    with pytest.raises(ValueError):
        LOSSES.register("logistic")(lambda z: z)
    assert LOSSES["logistic"] is original


def test_repr_names_kind_and_members(widgets):
    text = repr(widgets)
    assert "widget" in text and "hammer" in text and "spanner" in text
