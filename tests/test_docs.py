"""The README and the docs/ pages stay true to the repository: every relative link (and its
#anchor) resolves, the README stays a front page, every docs page is linked from it, and what the
commands in them name exists: each ``python -m <module>`` is a runnable module, each
``make <target>`` a Makefile target, each ``<group>=<option>`` a file in conf/.

The checkers take text, so the tests below also feed them a page with one of each mistake and
check that they catch it.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
MAX_README_LINES = 250

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)
INLINE_CODE = re.compile(r"`([^`\n]+)`")
MODULE = re.compile(r"(?:python -m|torchrun [^`\n]*?-m|--module)\s+([A-Za-z_][\w.]*)")
MAKE = re.compile(r"(?:^|[\s;(])make ([a-z][\w-]*)")
# config groups whose options are files: conf/<group>/<option>.yaml
GROUPS = ("loss", "margin", "method", "model", "data", "deepspeed", "trainer", "benchmark")
OVERRIDE = re.compile(
    r"(?:^|\s)\+?(" + "|".join(GROUPS) + r"|experiment|hydra/launcher)=([\w,\[\]]+)(?=\s|$)"
)


def _code(text: str) -> Iterator[str]:
    """The fenced code blocks and the inline code spans of a Markdown text."""
    yield from (m.group(0) for m in FENCE.finditer(text))
    yield from (m.group(1) for m in INLINE_CODE.finditer(FENCE.sub("", text)))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    """Every heading anchor of a Markdown text (duplicates get GitHub's -1, -2 suffixes)."""
    seen: dict[str, int] = {}
    found = set()
    for line in FENCE.sub("", text).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            base = slug(match.group(1))
            n = seen.get(base, 0)
            seen[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def broken_links(page: Path, text: str) -> list[str]:
    """Relative links of ``text`` (a page at ``page``) whose file or #anchor does not exist."""
    bad = []
    for target in LINK.findall(FENCE.sub("", text)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target} (no file {file})")
        elif (
            anchor
            and file.suffix == ".md"
            and anchor not in anchors(file.read_text(encoding="utf-8"))
        ):
            bad.append(f"{target} (no heading #{anchor} in {file.name})")
    return bad


def missing_modules(text: str) -> list[str]:
    """``python -m X`` (also ``torchrun ... -m X``, ``deepspeed --module X``) that cannot run."""
    bad = []
    for code in _code(text):
        for name in MODULE.findall(code):
            spec = importlib.util.find_spec(name)
            if spec is None:
                bad.append(name)
            elif (  # a package runs its __main__
                spec.submodule_search_locations is not None
                and importlib.util.find_spec(f"{name}.__main__") is None
            ):
                bad.append(f"{name} (a package without __main__)")
    return bad


def make_targets() -> set[str]:
    text = (ROOT / "Makefile").read_text(encoding="utf-8")
    return set(re.findall(r"^([a-z][\w-]*):", text, re.MULTILINE))


def missing_targets(text: str, targets: set[str]) -> list[str]:
    return [t for code in _code(text) for t in MAKE.findall(code) if t not in targets]


def missing_options(text: str) -> list[str]:
    """``group=option`` overrides whose conf/<group>/<option>.yaml does not exist."""
    bad = []
    for code in _code(text):
        for group, value in OVERRIDE.findall(code):
            for option in re.split(r"[,\[\]]", value):
                if option and not (ROOT / "conf" / group / f"{option}.yaml").exists():
                    bad.append(f"{group}={option}")
    return bad


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page):
    assert broken_links(page, page.read_text(encoding="utf-8")) == []


def test_readme_is_a_front_page():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move detail to docs/"


def test_every_docs_page_is_linked_from_the_readme():
    linked = {
        (ROOT / target.partition("#")[0]).resolve()
        for target in LINK.findall(README.read_text(encoding="utf-8"))
    }
    assert [p.name for p in PAGES[1:] if p.resolve() not in linked] == []


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_named_commands_exist(page):
    text = page.read_text(encoding="utf-8")
    assert missing_modules(text) == []
    assert missing_targets(text, make_targets()) == []
    assert missing_options(text) == []


def test_the_checkers_catch_each_mistake(tmp_path):
    (tmp_path / "other.md").write_text("# A heading: `with` code\n\ntext\n")
    page = tmp_path / "page.md"
    text = (
        "[ok](other.md) [ok](other.md#a-heading-with-code) [ok](#here) [web](https://x.org/y)\n"
        "# Here\n[gone](missing.md) [no anchor](other.md#nowhere)\n"
        "```bash\npython -m engine.train loss=hinge,nonexistent_loss model=tiny\n"
        "python -m engine.no_such_module\nmake train && make no-such-target\n```\n"
        "`python -m engine` `make test`\n"
    )
    page.write_text(text)
    assert broken_links(page, text) == [
        f"missing.md (no file {tmp_path / 'missing.md'})",
        "other.md#nowhere (no heading #nowhere in other.md)",
    ]
    assert missing_modules(text) == ["engine.no_such_module", "engine (a package without __main__)"]
    assert missing_targets(text, make_targets()) == ["no-such-target"]
    assert missing_options(text) == ["loss=nonexistent_loss"]
