"""Loading and validating preference data and held-out prompts (CONTRACTS.md, "Preference data
schema", UltraFeedback-binarized compatible).

A file is JSON Lines (``.jsonl`` or ``.json``, one object per line, UTF-8 with or without a BOM),
Parquet (``.parquet``) or a folder written by ``datasets.Dataset.save_to_disk``; or a dataset split
named ``NAME[:SPLIT]`` (a ``DatasetDict.save_to_disk`` folder, a folder of a dataset's files, or a
Hub dataset in the local cache, read offline: see ``hf_datasets``). A preference record holds:

- ``prompt``: a non-empty string;
- ``chosen``, ``rejected``: each a non-empty string (the answer), or a list of chat messages
  ``{"role", "content"}`` whose last message is the assistant's answer; the two answers differ;
- ``prompt_id`` (optional): a non-empty string or an integer of at most 100 digits, unique in
  the file.

Decisions where the schema leaves room:

- When an answer comes as messages, the messages before the answer are the prompt, because they
  carry what the ``prompt`` string cannot (a system message, earlier turns). ``chosen`` and
  ``rejected`` given as messages must share those messages. A ``prompt`` string in the same
  record must then equal (ignoring surrounding whitespace) the content of the last user message,
  which catches columns that were shuffled apart. If the answer's list holds the answer alone, the
  ``prompt`` string is the prompt.
- Message roles are ``system``, ``user``, ``assistant`` and ``tool``: the roles the Llama 3 and
  Qwen2 chat templates render; any other role would fail (or vanish) in the chat template.
- Text holding a NUL character or a lone surrogate (JSON ``"\\ud800"``) is refused: it loads in
  Python but breaks tokenizers, far from the record.
- An answer pair whose two answers are equal (ignoring surrounding whitespace) carries no
  preference and is refused in preference data; eval files read only the prompt, so there it is
  not checked.
- A record without ``prompt_id`` gets its record number (the line for JSON Lines, the 1-based
  row otherwise) as its id: stable for the same file. Two records with the same id are an error
  (the id seeds each prompt's sampling decision, so it must name one prompt). Integers in JSON
  Lines may have at most 100 digits (Python refuses to read more than 4300); give longer ids as
  strings.
- Blank lines in JSON Lines are ignored; fields beyond the schema are ignored; ``null`` counts as
  absent.

Problems of one record raise ``DataError`` naming the file and record, or are skipped and counted
with ``skip_invalid``; problems of the file (missing, unreadable, unknown format, no usable
record) always raise. Every message is one line that says what to fix, so an entry point can print
it as is (``DataError`` is a ``ConfigError``).
"""

import codecs
import dataclasses
import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metaapo_nemo.config import ConfigError, one_line
from metaapo_nemo.data import hf_datasets

Messages = list[dict[str, str]]

ROLES = ("system", "user", "assistant", "tool")
MAX_INTEGER_DIGITS = 100
_UNREADABLE_CHARACTER = re.compile("[\x00\ud800-\udfff]")


class DataError(ConfigError):
    """A data file or one of its records does not follow the schema."""


@dataclass
class PreferenceRecord:
    """One offline preference pair (x, y_w, y_l).

    ``prompt`` is a string, or the chat messages before the answer when the answers came as
    message lists; ``chosen`` and ``rejected`` are the answers' text. ``where`` names the file and
    record it came from, for later stages' messages; it is not part of the pair's value.
    """

    prompt_id: str
    prompt: str | Messages
    chosen: str
    rejected: str
    where: str = dataclasses.field(default="", compare=False)


@dataclass
class EvalPrompt:
    """One held-out prompt: a string, or chat messages ending before the answer; ``where`` as in
    ``PreferenceRecord``."""

    prompt_id: str
    prompt: str | Messages
    where: str = dataclasses.field(default="", compare=False)


class _LongInteger(Exception):
    """A JSON integer with more digits than MAX_INTEGER_DIGITS (raised from inside json.loads)."""


def _show(value: Any, limit: int = 60) -> str:
    """A value's repr, cut to ``limit`` characters so one huge field cannot flood the message."""
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(number, where, record)`` for every record of a file: its line (JSON Lines) or
    1-based row, the text naming file and position for messages, and the record (a
    ``DataError`` in its place when the line cannot be read as JSON)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the data path")
    if path.is_dir():
        yield from _dataset_folder_records(path)
    elif path.suffix == ".parquet":
        yield from _parquet_records(path)
    elif path.suffix in (".jsonl", ".json"):
        yield from _json_lines_records(path)
    else:
        raise DataError(
            f"{path}: unknown data format '{path.suffix}'; use JSON Lines (.jsonl), Parquet (.parquet) "
            "or a folder written by datasets' save_to_disk"
        )


def _open(path: Path):
    try:
        return path.open("rb")
    except OSError as error:
        raise DataError(
            f"{path}: cannot be read ({error.strerror or one_line(error)}); check the file's permissions"
        ) from error


def _json_lines_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    with _open(path) as lines:
        for number, line in enumerate(lines, start=1):
            if number == 1:  # editors on Windows start UTF-8 files with a byte order mark
                line = line.removeprefix(codecs.BOM_UTF8)
            if not line.strip():
                continue
            where = f"{path}, line {number}"
            yield number, where, _json_record(line.rstrip(b"\r\n"), where)


def _json_integer(digits: str) -> int:
    # Python's int() refuses more than 4300 digits with a bare ValueError; no id needs 100.
    if len(digits.lstrip("-")) > MAX_INTEGER_DIGITS:
        raise _LongInteger(len(digits.lstrip("-")))
    return int(digits)


def _json_record(line: bytes, where: str) -> Any:
    """One JSON Lines line read as JSON, or the ``DataError`` that says why it cannot be."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as error:
        return DataError(
            f"{where}: not UTF-8 text (byte 0x{line[error.start]:02x} at byte {error.start + 1} of the line); "
            "save the file as UTF-8"
        )
    try:
        return json.loads(text, parse_int=_json_integer)
    except json.JSONDecodeError as error:
        return DataError(
            f"{where}: not valid JSON ({error.msg} at character {error.pos + 1}); "
            "each line must hold one JSON object (JSON Lines)"
        )
    except _LongInteger as error:
        return DataError(
            f"{where}: holds an integer of {error.args[0]} digits; integers may have at most "
            f"{MAX_INTEGER_DIGITS} digits: give a long 'prompt_id' as a string"
        )
    except RecursionError:
        return DataError(f"{where}: JSON nested too deeply to read; each line must hold one flat preference record")


def _parquet_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    import pyarrow
    import pyarrow.parquet

    with _open(path) as file:
        try:
            rows = pyarrow.parquet.read_table(file).to_pylist()
        except (pyarrow.ArrowException, OSError) as error:
            raise DataError(
                f"{path}: not a readable Parquet file ({one_line(error)}); write it again "
                "(e.g. pandas' to_parquet) or use JSON Lines"
            ) from error
    for index, row in enumerate(rows, start=1):
        yield index, f"{path}, record {index}", row


def _dataset_folder_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    import datasets

    try:
        os.listdir(path)
    except OSError as error:
        raise DataError(f"{path}: cannot be read ({error.strerror}); check the folder's permissions") from error
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:  # datasets raises FileNotFoundError, ValueError or Arrow's errors
        parquet = min(path.rglob("*.parquet"), default=None)
        splits = hf_datasets.folder_splits(path) if parquet else []
        split = f", or name a split of the folder, e.g. {path}:{splits[0]}" if splits else ""
        fix = (f"it holds Parquet files: point the path at one, e.g. {parquet}{split}" if parquet
               else "give a .jsonl or .parquet file or a save_to_disk folder")
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk ({one_line(error)}); {fix}"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise DataError(
                f"{path}: holds the splits {sorted(dataset)}; point the path at one split's folder, "
                f"e.g. {path / sorted(dataset)[0]}, or name the split: {path}:{sorted(dataset)[0]}"
            )
        (dataset,) = dataset.values()
    for index, row in enumerate(dataset, start=1):
        yield index, f"{path}, record {index}", row


def _text(text: str, field: str, where: str) -> str:
    """``text`` unless it holds a character that loads in Python but breaks tokenizers."""
    bad = _UNREADABLE_CHARACTER.search(text)
    if bad:
        what = ("a NUL character (\\x00)" if bad.group() == "\x00"
                else f"a lone surrogate (\\u{ord(bad.group()):04x}, not Unicode text)")
        raise DataError(
            f"{where}: {field} holds {what} at character {bad.start() + 1}; remove it or fix the text's encoding"
        )
    return text


def _messages(value: list, field: str, where: str) -> Messages:
    """Check a chat message list and keep only ``role`` and ``content`` of each message."""
    if not value:
        raise DataError(f"{where}: '{field}' is an empty message list; give the answer as a string or as messages")
    messages = []
    for position, message in enumerate(value, start=1):
        if not (
            isinstance(message, dict)
            and isinstance(message.get("role"), str)
            and isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{where}: message {position} of '{field}' is {_show(message)}; "
                'each message must be {"role": <string>, "content": <string>}'
            )
        if message["role"] not in ROLES:
            raise DataError(
                f"{where}: message {position} of '{field}' has role {_show(message['role'])}; "
                f"use one of {', '.join(ROLES)}"
            )
        content = _text(message["content"], f"message {position} of '{field}'", where)
        messages.append({"role": message["role"], "content": content})
    return messages


def _answer(record: dict, field: str, where: str) -> tuple[str, Messages | None]:
    """The answer text of ``chosen``/``rejected`` and the messages before it (None for a string)."""
    value = record.get(field)
    if value is None:
        raise DataError(f"{where}: '{field}' is missing; every preference record needs 'chosen' and 'rejected'")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{field}' is empty; give the answer text")
        return _text(value, f"'{field}'", where), None
    if not isinstance(value, list):
        raise DataError(
            f"{where}: '{field}' has type {type(value).__name__}; give a string or a list of chat messages"
        )
    messages = _messages(value, field, where)
    if messages[-1]["role"] != "assistant":
        raise DataError(
            f"{where}: the last message of '{field}' has role '{messages[-1]['role']}'; "
            "it must be the assistant's answer"
        )
    if not messages[-1]["content"].strip():
        raise DataError(f"{where}: the answer (last message) of '{field}' is empty; give the answer text")
    return messages[-1]["content"], messages[:-1]


def _prompt_string(record: dict, where: str) -> str | None:
    prompt = record.get("prompt")
    if prompt is None:
        return None
    if not isinstance(prompt, str):
        raise DataError(f"{where}: 'prompt' has type {type(prompt).__name__}; it must be a string")
    if not prompt.strip():
        raise DataError(f"{where}: 'prompt' is empty; give the prompt text")
    return _text(prompt, "'prompt'", where)


def _preference(record: dict, where: str) -> tuple[str | Messages, str, str]:
    """Validate one preference record; return its prompt, chosen answer and rejected answer."""
    prompt = _prompt_string(record, where)
    chosen, chosen_context = _answer(record, "chosen", where)
    rejected, rejected_context = _answer(record, "rejected", where)
    if chosen_context is not None and rejected_context is not None and chosen_context != rejected_context:
        raise DataError(
            f"{where}: 'chosen' and 'rejected' differ in the messages before the answer; "
            "both must answer the same conversation"
        )
    context = chosen_context or rejected_context
    if not context:
        if prompt is None:
            raise DataError(
                f"{where}: no prompt: 'prompt' is missing and the answers carry no messages before them; "
                "add a 'prompt' string"
            )
        return prompt, chosen, rejected
    if prompt is not None:
        user_turns = [message["content"] for message in context if message["role"] == "user"]
        if not user_turns or user_turns[-1].strip() != prompt.strip():
            raise DataError(
                f"{where}: 'prompt' does not match the last user message before the answers; "
                "fix the record or drop one of the two"
            )
    return context, chosen, rejected


def _prompt_id(record: dict, where: str, default: str) -> str:
    prompt_id = record.get("prompt_id")
    if prompt_id is None:
        return default
    if isinstance(prompt_id, bool) or not isinstance(prompt_id, (str, int)):
        raise DataError(f"{where}: 'prompt_id' has type {type(prompt_id).__name__}; give a string or an integer")
    if isinstance(prompt_id, str):
        if not prompt_id.strip():
            raise DataError(f"{where}: 'prompt_id' is empty; give a non-empty id or leave 'prompt_id' out")
        _text(prompt_id, "'prompt_id'", where)
    return str(prompt_id)


def _load(path: str | Path, skip_invalid: bool, parse, role: str) -> tuple[list, int]:
    """Read every record of ``path`` through ``parse(record, where, prompt_id)``; handle errors,
    duplicate ids and skipping the same way for preference data and eval prompts. ``path`` may
    also name a dataset split (``hf_datasets``); ``role`` (train or eval) picks its default split."""
    reference = hf_datasets.parse(str(path))
    if reference is None:
        path = Path(path)
        records = _records(path)
    else:
        path = reference.value
        records = hf_datasets.rows(reference, role)
    items, skipped, first_seen = [], 0, {}
    for number, where, record in records:
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(
                    f"{where}: a record must be a JSON object, got {type(record).__name__}; "
                    'write each record as {"prompt": ..., "chosen": ..., "rejected": ...}'
                )
            prompt_id = _prompt_id(record, where, default=str(number))
            if prompt_id in first_seen:
                raise DataError(
                    f"{where}: prompt_id {_show(prompt_id)} was already used by {first_seen[prompt_id]}; "
                    "prompt ids must be unique"
                )
            items.append(parse(record, where, prompt_id))
            first_seen[prompt_id] = where
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    if not items:
        reason = (f"all {skipped} records are invalid; load it without skipping to see the first problem"
                  if skipped else "it holds no records; give a file with at least one record")
        raise DataError(f"{path}: no usable records: {reason}")
    return items, skipped


def load_preferences(path: str | Path, skip_invalid: bool = False) -> tuple[list[PreferenceRecord], int]:
    """Load offline preference pairs; return them and the number of invalid records skipped.

    Raises ``DataError`` naming the file and record for the first invalid record, unless
    ``skip_invalid`` is set; then invalid records (duplicate ids included) are skipped and counted.
    A file with no usable record is always an error.
    """

    def parse(record: dict, where: str, prompt_id: str) -> PreferenceRecord:
        prompt, chosen, rejected = _preference(record, where)
        if chosen.strip() == rejected.strip():
            raise DataError(
                f"{where}: 'chosen' and 'rejected' are the same answer; a preference pair needs two "
                "different answers: fix one or drop the record"
            )
        return PreferenceRecord(prompt_id, prompt, chosen, rejected, where)

    return _load(path, skip_invalid, parse, "train")


def load_eval_prompts(path: str | Path, skip_invalid: bool = False) -> tuple[list[EvalPrompt], int]:
    """Load held-out prompts; return them and the number of invalid records skipped.

    A record holding ``chosen`` or ``rejected`` is read as a preference record (and must be a
    valid one); any other record needs a ``prompt`` string. Errors and skipping as in
    ``load_preferences``.
    """

    def parse(record: dict, where: str, prompt_id: str) -> EvalPrompt:
        if record.get("chosen") is not None or record.get("rejected") is not None:
            return EvalPrompt(prompt_id, _preference(record, where)[0], where)
        prompt = _prompt_string(record, where)
        if prompt is None:
            raise DataError(f"{where}: 'prompt' is missing; every eval record needs a 'prompt' string")
        return EvalPrompt(prompt_id, prompt, where)

    return _load(path, skip_invalid, parse, "eval")
