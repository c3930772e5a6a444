"""Users' preference datasets -> tokenized (prompt, chosen, rejected) pairs.

Sources (``source``), tried in this order:

- a ``.jsonl`` / ``.ndjson`` file, read line by line (blank lines are ignored), so a malformed
  line is reported by its 1-based line number: ``data.jsonl: line 17: invalid JSON (...)``;
- a ``.json`` file holding a list of objects or ``{"data": [...]}`` (a ``.json`` file that is really
  JSON Lines is read as JSON Lines);
- a ``.parquet`` file;
- a directory written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk`` (``split`` picks
  the split of a ``DatasetDict``);
- anything else goes to ``datasets.load_dataset(source, split=split)`` (hub names, local data dirs).

Files are UTF-8: a JSONL line that is not is a bad row (``invalid_utf8``, with the byte and its
column); a JSON file that is not fails as a whole, naming the line and byte offset.

Single files and a saved single ``Dataset`` have no splits: ``split`` is ignored for them. Rows are
named ``"<source>: line N"`` (JSONL, 1-based file line) or ``"<source>: index N"`` (everything else,
0-based row index); errors and :class:`TokenizedPair.where` use these names.

Row formats (TRL's): standard ``{"prompt": str, "chosen": str, "rejected": str}``; conversational
(``prompt`` a list of ``{"role", "content"}`` messages, ``chosen`` / ``rejected`` lists of
assistant messages; if one field is a list, string fields are wrapped as a user prompt / assistant
reply); implicit prompt (no ``prompt`` column):

- conversations: the prompt is the leading messages that ``chosen`` and ``rejected`` share;
- strings: an implicit prompt is ambiguous; we take the longest common prefix and cut it back to
  its last whitespace character, which goes to the responses (``"Q: 2+2? A: 4"`` /
  ``"Q: 2+2? A: 5"`` -> prompt ``"Q: 2+2? A:"``, responses ``" 4"`` / ``" 5"``), as TRL does. A
  shared prefix without whitespace (or none) is a bad row. Give a ``prompt`` column when you can.

Extra columns are ignored, except the optional numeric ``score_chosen`` / ``score_rejected``
(UltraFeedback's; ODPO's offsets read them): a row with one needs the other. ``columns={"prompt":
"question", ...}`` reads a field from another column.

Rendering and tokenization:

- Conversational rows need a chat template (else ``ValueError``). The prompt is rendered with
  ``add_generation_prompt=True``, each full conversation without it; the response text is the full
  rendering minus the prompt rendering, which must be its prefix (else a bad row). Both texts are
  tokenized with ``add_special_tokens=False`` (the template writes BOS / end-of-turn tokens itself),
  so response ids are exactly the template's continuation; no EOS is appended.
- String rows are plain text even when the tokenizer has a chat template (TRL's behaviour: a base
  model's tokenizer often ships a template). ``wrap_strings=True`` wraps them as a user message and
  assistant replies when the tokenizer has a template (and is a no-op without one). Plain text:
  ``prompt_ids = tokenizer(prompt)`` (with BOS if the tokenizer adds one) and
  ``response_ids = tokenizer(response, add_special_tokens=False) + [eos_token_id]`` (if any).
- Prompt and response are tokenized separately and concatenated, as TRL does: a joint tokenization
  could merge tokens across the boundary, and then no token position would mark where the
  response starts.

Truncation (after tokenization): a prompt longer than ``max_prompt_length`` keeps its LAST
``max_prompt_length`` tokens (keep_end: the end of the prompt is what the response follows; a
leading BOS may be cut). Each response is then cut on the right to ``max_length - len(prompt)``
tokens (its EOS may be cut). A prompt leaving fewer than ``min_response_tokens`` for the response
is a bad row. ``DataReport.truncated`` counts pairs where anything was cut.

Bad rows (reason keys of ``DataReport.skipped``): ``invalid_utf8``, ``invalid_json``,
``not_an_object``, ``missing_key``, ``wrong_type``, ``empty_prompt``, ``empty_response``,
``no_shared_prompt``, ``identical_responses`` (as given), ``identical_after_truncation`` (no
signal left), ``prompt_too_long``, ``template_mismatch``, ``bad_score``. ``on_bad_row="error"``
raises :class:`BadRowError` at the first one, naming source, row and problem;
``on_bad_row="skip"`` counts them by reason and logs one warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from engine.runtime.fileio import atomic_open

logger = logging.getLogger(__name__)

FIELDS = ("prompt", "chosen", "rejected")
SCORE_FIELDS = ("score_chosen", "score_rejected")  # optional per-response scores (ODPO)
ON_BAD_ROW = ("error", "skip")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
FILE_SUFFIXES = (*JSONL_SUFFIXES, ".json", ".parquet")


@dataclass(frozen=True)
class TokenizedPair:
    """One preference pair as token ids; chosen/rejected ids hold the response tokens only."""

    prompt_ids: list[int]
    chosen_ids: list[int]  # response tokens only (incl. EOS unless truncated away)
    rejected_ids: list[int]
    where: str  # e.g. "data.jsonl: line 3", for error messages and debugging
    score_chosen: float | None = None  # the row's score_chosen column, if it has one (ODPO)
    score_rejected: float | None = None


@dataclass
class DataReport:
    """What :func:`load_pairs` read, kept, skipped (by reason) and truncated."""

    source: str
    rows_read: int
    pairs: int
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> count
    truncated: int = 0  # pairs where the prompt or a response was cut

    def to_dict(self) -> dict:
        """A JSON-serializable copy."""
        return asdict(self)


class BadRowError(ValueError):
    """A row that cannot become a pair; the message names the source, the row and the problem."""

    def __init__(self, where: str, reason: str, detail: str) -> None:
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.reason = reason  # one of the DataReport.skipped keys
        self.detail = detail


@dataclass(frozen=True)
class _Unreadable:
    """Stands in for a row that could not be parsed (so skip mode can count it)."""

    reason: str
    detail: str


# ---- reading sources -----------------------------------------------------------------------------


def read_rows(source: str, *, split: str = "train") -> Iterator[tuple[str, dict]]:
    """Yield ``(where, row)`` for every row of ``source`` (see the module docstring for sources).

    Raises ``FileNotFoundError`` for a missing local file, ``ValueError`` for an unreadable source,
    and :class:`BadRowError` for a JSONL line that is not a JSON object.
    """
    for where, row in _iter_rows(str(source), split):
        if isinstance(row, _Unreadable):
            raise BadRowError(where, row.reason, row.detail)
        yield where, row


def _iter_rows(source: str, split: str) -> Iterator[tuple[str, dict | _Unreadable]]:
    path = Path(source).expanduser()
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_rows(path, source)
        elif suffix == ".json":
            yield from _json_rows(path, source)
        elif suffix == ".parquet":
            yield from _parquet_rows(path, source)
        else:
            raise ValueError(
                f"{source}: unsupported file type {suffix or '(no suffix)'!r}; expected one of "
                f"{', '.join(FILE_SUFFIXES)}, a datasets save_to_disk directory, or a hub name"
            )
    elif path.is_dir() and _is_saved_dataset(path):
        yield from _saved_dataset_rows(path, source, split)
    elif not path.exists() and _looks_like_local_file(source):
        # Do not hand a mistyped local path to load_dataset: it would report a hub lookup failure.
        raise FileNotFoundError(f"{source}: no such file")
    else:
        yield from _load_dataset_rows(source, split)


def _looks_like_local_file(source: str) -> bool:
    return (
        source.lower().endswith(FILE_SUFFIXES)
        or os.path.isabs(source)
        or source.startswith((".", "~"))
    )


def _jsonl_rows(path: Path, source: str) -> Iterator[tuple[str, dict | _Unreadable]]:
    # Bytes, decoded line by line: one line that is not UTF-8 is a bad row named by its number,
    # not a bare UnicodeDecodeError from the middle of the file.
    with _open_bytes(path, source) as lines:
        for number, raw in enumerate(lines, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                yield f"{source}: line {number}", _Unreadable("invalid_utf8", _utf8_detail(exc))
                continue
            if not line.strip():
                continue
            yield f"{source}: line {number}", _parse_object(line)


def _utf8_detail(exc: UnicodeDecodeError) -> str:
    """``not valid UTF-8 (byte 0xff at column 7)`` for a decode error of one line."""
    return f"not valid UTF-8 (byte 0x{exc.object[exc.start]:02x} at column {exc.start + 1})"


def _parse_object(text: str) -> dict | _Unreadable:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        return _Unreadable("invalid_json", f"invalid JSON ({exc})")
    if not isinstance(value, dict):
        return _Unreadable("not_an_object", f"expected a JSON object, got {_type_name(value)}")
    return value


def _json_rows(path: Path, source: str) -> Iterator[tuple[str, dict | _Unreadable]]:
    with _open_bytes(path, source) as handle:
        data = handle.read()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        if _looks_like_json_lines(data):  # JSON Lines: the bad line is a bad row of its own
            yield from _jsonl_rows(path, source)
            return
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ValueError(
            f"{source}: line {line}: not valid UTF-8 (byte 0x{data[exc.start]:02x} at byte "
            f"offset {exc.start}, column {column}); save the file as UTF-8"
        ) from None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        # Hub datasets often name JSON Lines files ".json": read those line by line.
        if _looks_like_json_lines(data):
            yield from _jsonl_rows(path, source)
            return
        raise ValueError(f"{source}: invalid JSON ({exc})") from exc
    if isinstance(value, dict) and isinstance(value.get("data"), list):
        value = value["data"]
    if not isinstance(value, list):
        raise ValueError(
            f'{source}: expected a JSON list of row objects (or {{"data": [...]}}), '
            f"got {_type_name(value)}"
        )
    for index, row in enumerate(value):
        where = f"{source}: index {index}"
        if isinstance(row, dict):
            yield where, row
        else:
            yield where, _Unreadable("not_an_object", f"expected an object, got {_type_name(row)}")


def _looks_like_json_lines(data: bytes) -> bool:
    """Whether the first non-blank line of ``data`` is a whole JSON object (JSON Lines)."""
    first = next((line for line in data.splitlines() if line.strip()), b"")
    try:
        return bool(first) and not isinstance(_parse_object(first.decode("utf-8")), _Unreadable)
    except UnicodeDecodeError:
        return False


def _open_bytes(path: Path, source: str):
    try:
        return open(path, "rb")  # callers use it in a with block
    except OSError as exc:
        raise ValueError(f"{source}: cannot read ({exc})") from exc


def _parquet_rows(path: Path, source: str) -> Iterator[tuple[str, dict]]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowException, OSError) as exc:
        raise ValueError(f"{source}: not a readable Parquet file ({exc})") from exc
    index = 0
    # Batches keep memory flat on large files; rows come back as plain dicts and lists.
    for batch in parquet.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            yield f"{source}: index {index}", row
            index += 1


def _is_saved_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (
        (path / "state.json").is_file() and (path / "dataset_info.json").is_file()
    )


def _saved_dataset_rows(path: Path, source: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises many types; the path is what the user needs
        raise ValueError(f"{source}: cannot load the saved dataset ({exc})") from exc
    name = source
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"{source}: no split {split!r}; available splits: {', '.join(loaded)}")
        loaded, name = loaded[split], f"{source}[{split}]"
    for index, row in enumerate(loaded):
        yield f"{name}: index {index}", row


def _load_dataset_rows(source: str, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        loaded = datasets.load_dataset(source, split=split)
    except Exception as exc:  # hub, builder and split errors all come through here
        raise ValueError(
            f"{source}: not a local file or saved dataset, and "
            f"datasets.load_dataset({source!r}, split={split!r}) failed: {exc}"
        ) from exc
    for index, row in enumerate(loaded):
        yield f"{source}[{split}]: index {index}", row


# ---- rows -> texts -------------------------------------------------------------------------------


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_messages(where: str, key: str, value: list) -> list[dict]:
    """Messages as ``{"role", "content"}`` dicts (extra keys such as Arrow's nulls dropped)."""
    messages = []
    for position, message in enumerate(value):
        if not (
            isinstance(message, Mapping)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise BadRowError(
                where,
                "wrong_type",
                f"{key!r}[{position}] must be a message {{'role': str, 'content': str}}, "
                f"got {message!r:.80}",
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _field(where: str, row: Mapping, key: str, column: str) -> str | list[dict]:
    value = row[column]
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return _check_messages(where, key, value)
    named = repr(key) if key == column else f"{key!r} (column {column!r})"
    raise BadRowError(
        where,
        "wrong_type",
        f"{named} must be a string or a list of messages, got {_type_name(value)}",
    )


def _is_empty(value: str | list[dict]) -> bool:
    if isinstance(value, str):
        return not value.strip()
    return not any(message["content"].strip() for message in value)


def _split_string_prompt(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """``(prompt, chosen_response, rejected_response)``, cut at the common prefix's last space."""
    common = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        common += 1
    cut = next((i for i in range(common - 1, -1, -1) if chosen[i].isspace()), None)
    if cut is None or not chosen[:cut].strip():
        return None
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _split_conversation_prompt(
    chosen: list[dict], rejected: list[dict]
) -> tuple[list[dict], list[dict], list[dict]]:
    shared = 0
    for a, b in zip(chosen, rejected, strict=False):
        if a != b:
            break
        shared += 1
    return chosen[:shared], chosen[shared:], rejected[shared:]


def _texts(
    where: str, row: Mapping, columns: Mapping[str, str]
) -> tuple[str | list[dict], str | list[dict], str | list[dict]]:
    """Validated ``(prompt, chosen, rejected)``: all strings, or all message lists."""
    needed = FIELDS if columns["prompt"] in row else FIELDS[1:]
    missing = [columns[key] for key in needed if columns[key] not in row]
    if missing:
        raise BadRowError(
            where,
            "missing_key",
            f"missing key {missing[0]!r} (row has keys: {', '.join(map(str, row))})",
        )
    chosen = _field(where, row, "chosen", columns["chosen"])
    rejected = _field(where, row, "rejected", columns["rejected"])
    if columns["prompt"] in row:
        prompt = _field(where, row, "prompt", columns["prompt"])
    else:
        if type(chosen) is not type(rejected):
            raise BadRowError(
                where,
                "wrong_type",
                "without a prompt column, 'chosen' and 'rejected' must both be strings or "
                "both conversations",
            )
        if chosen == rejected:
            raise BadRowError(where, "identical_responses", "chosen and rejected are identical")
        if isinstance(chosen, str):
            split = _split_string_prompt(chosen, rejected)
            if split is None:
                raise BadRowError(
                    where,
                    "no_shared_prompt",
                    "no prompt column, and chosen and rejected share no prefix ending at "
                    "whitespace to use as the prompt; add a 'prompt' column",
                )
            prompt, chosen, rejected = split
        else:
            prompt, chosen, rejected = _split_conversation_prompt(chosen, rejected)
            if not prompt:
                raise BadRowError(
                    where,
                    "no_shared_prompt",
                    "no prompt column, and the chosen and rejected conversations share no "
                    "leading messages to use as the prompt; add a 'prompt' column",
                )
    # Mixed rows (e.g. a string prompt with message-list responses) are conversational.
    if any(isinstance(value, list) for value in (prompt, chosen, rejected)):
        prompt = _as_messages(prompt, "user")
        chosen, rejected = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
    if _is_empty(prompt):
        raise BadRowError(where, "empty_prompt", "empty prompt")
    for key, value in (("chosen", chosen), ("rejected", rejected)):
        if _is_empty(value):
            raise BadRowError(where, "empty_response", f"empty {key!r} response")
    if chosen == rejected:
        raise BadRowError(where, "identical_responses", "chosen and rejected are identical")
    return prompt, chosen, rejected


def _as_messages(value: str | list[dict], role: str) -> list[dict]:
    return [{"role": role, "content": value}] if isinstance(value, str) else value


# ---- texts -> ids --------------------------------------------------------------------------------


def _encode(tokenizer, text: str, *, special: bool) -> list[int]:
    return list(tokenizer(text, add_special_tokens=special)["input_ids"])


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=generation_prompt
    )


def _token_ids(
    where: str, tokenizer, prompt, chosen, rejected, wrap_strings: bool
) -> tuple[list[int], list[int], list[int]]:
    has_template = getattr(tokenizer, "chat_template", None) is not None
    if isinstance(prompt, str) and wrap_strings and has_template:
        prompt = _as_messages(prompt, "user")
        chosen, rejected = _as_messages(chosen, "assistant"), _as_messages(rejected, "assistant")
    if isinstance(prompt, str):
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        return (
            _encode(tokenizer, prompt, special=True),
            _encode(tokenizer, chosen, special=False) + eos,
            _encode(tokenizer, rejected, special=False) + eos,
        )
    if not has_template:
        # Every conversational row would fail the same way: a configuration error, not a bad row.
        raise ValueError(
            f"{where}: conversational row, but the tokenizer has no chat_template; "
            "use a tokenizer with a chat template or plain-string prompt/chosen/rejected"
        )
    prompt_text = _render(tokenizer, prompt, generation_prompt=True)
    responses = []
    for key, response in (("chosen", chosen), ("rejected", rejected)):
        full_text = _render(tokenizer, prompt + response, generation_prompt=False)
        if not full_text.startswith(prompt_text):
            raise BadRowError(
                where,
                "template_mismatch",
                f"the chat template's rendering of prompt + {key} does not start with its "
                f"rendering of the prompt (with add_generation_prompt=True): "
                f"{prompt_text[-40:]!r} vs {full_text[len(prompt_text) - 40 : len(prompt_text)]!r}",
            )
        responses.append(_encode(tokenizer, full_text[len(prompt_text) :], special=False))
    return _encode(tokenizer, prompt_text, special=False), responses[0], responses[1]


# ---- the loader ----------------------------------------------------------------------------------


def load_pairs(
    source: str,
    tokenizer,
    *,
    split: str = "train",
    max_length: int = 512,
    max_prompt_length: int | None = None,
    min_response_tokens: int = 1,
    on_bad_row: str = "error",
    limit: int | None = None,
    columns: Mapping[str, str] | None = None,
    wrap_strings: bool = False,
) -> tuple[list[TokenizedPair], DataReport]:
    """Read ``source`` and tokenize its rows into pairs (policies in the module docstring).

    Args:
        source: a file, a ``save_to_disk`` directory, or a ``datasets.load_dataset`` name.
        tokenizer: a Hugging Face tokenizer (its ``chat_template`` renders conversational rows).
        split: the split to read where the source has splits.
        max_length: the most prompt + response tokens per sequence.
        max_prompt_length: prompts keep their last ``max_prompt_length`` tokens (None: no limit).
        min_response_tokens: a prompt leaving less room than this for a response is a bad row.
        on_bad_row: ``"error"`` raises :class:`BadRowError`; ``"skip"`` counts and skips.
        limit: stop after this many pairs (None: all).
        columns: where each field lives, e.g. ``{"prompt": "question"}``; unnamed fields keep
            their own names.
        wrap_strings: render string rows as a user turn and assistant replies when the tokenizer
            has a chat template.

    Returns:
        ``(pairs, report)``.
    """
    if on_bad_row not in ON_BAD_ROW:
        raise ValueError(f"on_bad_row must be one of {', '.join(ON_BAD_ROW)}; got {on_bad_row!r}")
    if max_length < 1 or min_response_tokens < 1:
        raise ValueError(
            f"max_length and min_response_tokens must be >= 1; got {max_length}, "
            f"{min_response_tokens}"
        )
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1 or None; got {limit}")
    if max_prompt_length is not None and max_prompt_length < 1:
        raise ValueError(f"max_prompt_length must be >= 1 or None; got {max_prompt_length}")
    unknown = set(columns or {}) - set(FIELDS)
    if unknown:
        raise ValueError(f"columns: unknown fields {sorted(unknown)}; valid: {', '.join(FIELDS)}")
    columns = {key: (columns or {}).get(key, key) for key in FIELDS}
    source = str(source)

    pairs: list[TokenizedPair] = []
    skipped: Counter[str] = Counter()
    rows_read = truncated = 0
    for where, row in _iter_rows(source, split):
        rows_read += 1
        try:
            (prompt, chosen, rejected), scores = _checked_row(where, row, columns)
            prompt_ids, chosen_ids, rejected_ids = _token_ids(
                where, tokenizer, prompt, chosen, rejected, wrap_strings
            )
            pair, was_cut = _truncate(
                where,
                prompt_ids,
                chosen_ids,
                rejected_ids,
                max_length,
                max_prompt_length,
                min_response_tokens,
            )
        except BadRowError as exc:
            if on_bad_row == "error":
                raise
            skipped[exc.reason] += 1
            continue
        if scores is not None:
            pair = replace(pair, score_chosen=scores[0], score_rejected=scores[1])
        pairs.append(pair)
        truncated += was_cut
        if limit is not None and len(pairs) >= limit:
            break  # before reading more: a limit also bounds the reading time

    report = DataReport(source, rows_read, len(pairs), dict(skipped), truncated)
    if skipped:
        logger.warning(
            "%s: skipped %d of %d rows (%s)",
            source,
            sum(skipped.values()),
            rows_read,
            ", ".join(f"{reason}: {count}" for reason, count in sorted(skipped.items())),
        )
    if not pairs:
        raise _no_pairs(source, rows_read, skipped)
    return pairs, report


def check_rows(
    source: str,
    *,
    split: str = "train",
    on_bad_row: str = "error",
    limit: int | None = None,
    columns: Mapping[str, str] | None = None,
) -> None:
    """The checks of :func:`load_pairs` that need no tokenizer, on a local file: it exists and
    reads, every line is a JSON object with its fields of the right types and not empty, scores
    come in twos, and some row is usable. Raises what :func:`load_pairs` would raise for the
    first bad row (``on_bad_row="error"``) or for a file without pairs, in a fraction of the time:
    no tokenizer, no model classes imported. Rows past ``limit`` usable ones are not read (as
    :func:`load_pairs` does not). Other sources (a ``datasets`` directory, a hub name) are left
    to :func:`load_pairs`."""
    source = str(source)
    path = Path(source).expanduser()
    if not (path.is_file() or (not path.exists() and _looks_like_local_file(source))):
        return
    columns = {key: (columns or {}).get(key, key) for key in FIELDS}
    usable = rows_read = 0
    skipped: Counter[str] = Counter()
    for where, row in _iter_rows(source, split):
        rows_read += 1
        try:
            _checked_row(where, row, columns)
        except BadRowError as exc:
            if on_bad_row == "error":
                raise
            skipped[exc.reason] += 1
            continue
        usable += 1
        if limit is not None and usable >= limit:
            return
    if not usable:
        raise _no_pairs(source, rows_read, skipped)


def _checked_row(
    where: str, row: dict | _Unreadable, columns: Mapping[str, str]
) -> tuple[tuple[str | list[dict], str | list[dict], str | list[dict]], tuple | None]:
    """A row's validated texts (:func:`_texts`) and scores (:func:`_scores`), or
    :class:`BadRowError`: every check that needs no tokenizer."""
    if isinstance(row, _Unreadable):
        raise BadRowError(where, row.reason, row.detail)
    return _texts(where, row, columns), _scores(where, row)


def _no_pairs(source: str, rows_read: int, skipped: Mapping[str, int]) -> ValueError:
    detail = f"; skipped: {dict(skipped)}" if skipped else ""
    return ValueError(f"{source}: no preference pairs ({rows_read} rows read{detail})")


def _scores(where: str, row: Mapping) -> tuple[float, float] | None:
    """The row's ``(score_chosen, score_rejected)``, or None when it has neither column."""
    present = [key for key in SCORE_FIELDS if row.get(key) is not None]
    if not present:
        return None
    if len(present) == 1:
        missing = next(key for key in SCORE_FIELDS if key not in present)
        raise BadRowError(where, "bad_score", f"has {present[0]} but no {missing}")
    values = []
    for key in SCORE_FIELDS:
        value = row[key]
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value):
            raise BadRowError(where, "bad_score", f"{key} must be a finite number, got {value!r}")
        values.append(float(value))
    return values[0], values[1]


def _truncate(
    where: str,
    prompt_ids: list[int],
    chosen_ids: list[int],
    rejected_ids: list[int],
    max_length: int,
    max_prompt_length: int | None,
    min_response_tokens: int,
) -> tuple[TokenizedPair, bool]:
    was_cut = False
    if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
        # keep_end: the response continues the end of the prompt, so the start is what goes.
        prompt_ids, was_cut = prompt_ids[-max_prompt_length:], True
    room = max_length - len(prompt_ids)
    if room < min_response_tokens:
        raise BadRowError(
            where,
            "prompt_too_long",
            f"prompt is {len(prompt_ids)} tokens, leaving {max(room, 0)} of max_length="
            f"{max_length} for the response (min_response_tokens={min_response_tokens}); "
            "set max_prompt_length or raise max_length",
        )
    if len(chosen_ids) > room or len(rejected_ids) > room:
        chosen_ids, rejected_ids, was_cut = chosen_ids[:room], rejected_ids[:room], True
    if chosen_ids == rejected_ids:
        raise BadRowError(
            where,
            "identical_after_truncation",
            f"chosen and rejected are identical after truncation to {room} response tokens "
            f"(max_length={max_length}, prompt {len(prompt_ids)} tokens): no preference left",
        )
    return TokenizedPair(prompt_ids, chosen_ids, rejected_ids, where), was_cut


# ---- writing -------------------------------------------------------------------------------------


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict]) -> None:
    """Write ``rows`` as JSON Lines, atomically: all rows or, on any error, the old file untouched
    (:func:`engine.runtime.fileio.atomic_open`)."""
    with atomic_open(path) as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
