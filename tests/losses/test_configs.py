"""Tests that conf/ and the registries agree: one yaml per registered part, and every
`method=<name>` composes to the same objective as ``METHODS[name]``.

Only the objective's keys (loss, margin, beta, method.*) are read, so the engine's groups can grow.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from losses import LOSSES, MARGINS, METHODS

CONF = Path(__file__).resolve().parents[2] / "conf"

# cfg.method.<key> -> the preference_loss option of the same name
EXTRA_KEYS = [
    "label_smoothing",
    "gamma",
    "dpop_lambda",
    "margin_scale",
    "calibration_weight",
    "nll_weight",
    "preference_weight",
    "reference_free",
]


def stems(group: str) -> set[str]:
    return {path.stem for path in (CONF / group).glob("*.yaml")}


def test_loss_yamls_match_registry():
    assert stems("loss") == set(LOSSES)


def test_margin_yamls_match_registry():
    assert stems("margin") == set(MARGINS)


def test_method_yamls_match_registry():
    assert stems("method") == set(METHODS) | {"none"}


@pytest.mark.parametrize(
    "path",
    sorted(p for group in ("loss", "margin", "method") for p in (CONF / group).glob("*.yaml")),
    ids=lambda p: f"{p.parent.name}/{p.stem}",
)
def test_every_yaml_has_a_comment_and_parses(path):
    text = path.read_text()
    assert any(line.lstrip().startswith("#") for line in text.splitlines())
    data = yaml.safe_load(text)
    assert isinstance(data, dict)
    if path.parent.name in ("loss", "margin"):
        assert data["name"] == path.stem  # the yaml names the registered part it selects
    if path.parent.name == "margin":
        assert 0 < data["alpha"] <= 1


def neutral_extras() -> dict:
    """The neutral values of the method.* extras, read from conf/method/none.yaml."""
    method = yaml.safe_load((CONF / "method" / "none.yaml").read_text())["method"]
    return {key: method[key] for key in [*EXTRA_KEYS, "length_normalized"]}


def test_neutral_extras_are_preference_loss_defaults():
    import inspect

    from losses import preference_loss

    parameters = inspect.signature(preference_loss).parameters
    for key, value in neutral_extras().items():
        if key in parameters:
            assert parameters[key].default == value, key


def values_equal(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or a is None or b is None:
        return a is b or (a == b and type(a) is type(b))
    return math.isclose(float(a), float(b), rel_tol=1e-12)


@pytest.fixture(scope="module")
def composed(compose_config) -> dict:
    """method name -> composed config (composed once per module: Hydra is slow-ish)."""
    pytest.importorskip("hydra")
    return {name: compose_config([f"method={name}"]) for name in [*sorted(METHODS), "none"]}


@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_config_agrees_with_python_definition(name, composed):
    cfg = composed[name]
    method = METHODS[name]
    options = method.options()
    assert cfg.method.name == name
    assert cfg.loss.name == options["loss"]
    assert cfg.margin.name == options["margin"]
    assert values_equal(cfg.margin.alpha, options.get("alpha", 1.0))
    assert values_equal(cfg.beta, options["beta"])
    neutral = neutral_extras()
    for key in EXTRA_KEYS:
        expected = options.get(key, neutral[key])
        assert values_equal(cfg.method[key], expected), (key, cfg.method[key], expected)
    assert cfg.method.length_normalized is method.length_normalized


def test_no_method_is_the_neutral_default_cell(composed):
    cfg = composed["none"]
    assert cfg.method.name is None
    assert cfg.loss.name == "logistic"
    assert cfg.margin.name == "difference"
    for key, value in neutral_extras().items():
        assert values_equal(cfg.method[key], value), key


@pytest.mark.parametrize(("loss", "margin"), [("hinge", "balanced"), ("savage", "difference")])
def test_loss_and_margin_overrides_compose(compose_config, loss, margin):
    pytest.importorskip("hydra")
    cfg = compose_config([f"loss={loss}", f"margin={margin}", "margin.alpha=0.3", "beta=0.05"])
    assert cfg.loss.name == loss
    assert cfg.margin.name == margin
    assert cfg.margin.alpha == 0.3
    assert cfg.beta == 0.05
