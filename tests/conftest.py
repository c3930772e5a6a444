"""Suite-wide fixtures."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

_RENDEZVOUS = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


@pytest.fixture(autouse=True)
def _isolated_rendezvous_env() -> Iterator[None]:
    """An in-process ``train()`` sets the rendezvous variables for its world of one; a later test
    that starts torchrun or a subprocess must not inherit them (its port is still bound here)."""
    saved = {k: os.environ.get(k) for k in _RENDEZVOUS}
    yield
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
