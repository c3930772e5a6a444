"""A small name -> object registry with a registering decorator.

Every part of the zoo (loss functions of the margin, margins, named methods) lives in one of these,
so that adding a part is one decorated function and one yaml file, and every consumer (the engine,
the sweeps, the tests) finds parts by iterating the registry instead of repeating names.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterator, Mapping
from functools import cache
from typing import Any, Generic, TypeVar

T = TypeVar("T")


class UnknownNameError(KeyError):
    """Raised for a name that is not registered; the message lists the registered names."""

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return str(self.args[0]) if self.args else ""


class Registry(Mapping[str, T], Generic[T]):
    """A read-only mapping from name to part, filled by the :meth:`register` decorator.

    Args:
        kind: what the registry holds ("loss", "margin", "method"); used in error messages.

    Example:
        >>> GREETINGS: Registry[Callable[[], str]] = Registry("greeting")
        >>> @GREETINGS.register("hello")
        ... def hello() -> str:
        ...     return "hello"
        >>> GREETINGS["hello"]()
        'hello'
    """

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._items: dict[str, T] = {}

    def register(self, name: str | None = None) -> Callable[[T], T]:
        """Decorator registering its target under ``name`` (default: the target's ``__name__``).

        Raises:
            ValueError: if the name is already registered (duplicates are always a bug).
        """

        def decorator(obj: T) -> T:
            key = name if name is not None else getattr(obj, "__name__", None)
            if not isinstance(key, str) or not key:
                raise ValueError(f"cannot register {obj!r} as a {self.kind}: no name given")
            self.add(key, obj)
            return obj

        return decorator

    def add(self, name: str, obj: T) -> None:
        """Register ``obj`` under ``name``; a duplicate name raises ``ValueError``."""
        if name in self._items:
            raise ValueError(
                f"a {self.kind} named {name!r} is already registered "
                f"({self._items[name]!r}); choose another name"
            )
        self._items[name] = obj

    def __getitem__(self, name: str) -> T:
        try:
            return self._items[name]
        except KeyError:
            raise UnknownNameError(
                f"unknown {self.kind} {name!r}; registered {self.kind}s: "
                f"{', '.join(sorted(self._items))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        return f"Registry({self.kind!r}, {sorted(self._items)})"


@cache
def keyword_options(part: Callable[..., Any]) -> frozenset[str]:
    """The option names a registered function takes: its keyword-only parameters (with defaults).

    Parts declare their own options this way (``def robust(z, *, label_smoothing=0.0)``), so a
    caller holding every option passes each part exactly those it names (:func:`pick_options`).
    """
    parameters = inspect.signature(part).parameters.values()
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY)


def pick_options(part: Callable[..., Any], options: Mapping[str, Any]) -> dict[str, Any]:
    """The entries of ``options`` that ``part`` takes (see :func:`keyword_options`)."""
    return {key: options[key] for key in keyword_options(part) if key in options}
