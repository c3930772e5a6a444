"""The errors a user's input raises, in one module every room can import.

:class:`ConfigError` is a config value that is missing or out of range; its message names the key
(``config key trainer.lr: must be a number > 0, got -1``). Data errors name the file and row
(:class:`engine.data.loading.BadRowError`); checkpoint errors the directory
(:class:`engine.checkpoint.CheckpointError`).
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A config value is missing or out of range; the message names the key."""


def require(condition: bool, key: str, message: str) -> None:
    """Raise :class:`ConfigError` ``config key <key>: <message>`` unless ``condition``."""
    if not condition:
        raise ConfigError(f"config key {key}: {message}")
