"""Loading and validating preference data and held-out prompts (CONTRACTS.md, "Preference data
schema", UltraFeedback-binarized compatible).

A file is JSON Lines (``.jsonl`` or ``.json``, one object per line), Parquet (``.parquet``) or a
folder written by ``datasets.Dataset.save_to_disk``. A preference record holds:

- ``prompt``: a non-empty string;
- ``chosen``, ``rejected``: each a non-empty string (the answer), or a list of chat messages
  ``{"role", "content"}`` whose last message is the assistant's answer;
- ``prompt_id`` (optional): a string or integer, unique in the file.

Decisions where the schema leaves room:

- When an answer comes as messages, the messages before the answer are the prompt, because they
  carry what the ``prompt`` string cannot (a system message, earlier turns). ``chosen`` and
  ``rejected`` given as messages must share those messages. A ``prompt`` string in the same
  record must then equal (ignoring surrounding whitespace) the content of the last user message,
  which catches columns that were shuffled apart. If the answer's list holds the answer alone, the
  ``prompt`` string is the prompt.
- A record without ``prompt_id`` gets its record number (the line for JSON Lines, the 1-based
  row otherwise) as its id: stable for the same file. Two records with the same id are an error
  (the id seeds each prompt's sampling decision, so it must name one prompt).
- Blank lines in JSON Lines are ignored; fields beyond the schema are ignored; ``null`` counts as
  absent.
"""

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Messages = list[dict[str, str]]


class DataError(ValueError):
    """A data file or one of its records does not follow the schema."""


@dataclass
class PreferenceRecord:
    """One offline preference pair (x, y_w, y_l).

    ``prompt`` is a string, or the chat messages before the answer when the answers came as
    message lists; ``chosen`` and ``rejected`` are the answers' text.
    """

    prompt_id: str
    prompt: str | Messages
    chosen: str
    rejected: str


@dataclass
class EvalPrompt:
    """One held-out prompt: a string, or chat messages ending before the answer."""

    prompt_id: str
    prompt: str | Messages


def _records(path: Path) -> Iterator[tuple[int, str, Any]]:
    """Yield ``(number, where, record)`` for every record of a file: its line (JSON Lines) or
    1-based row, the text naming file and position for messages, and the record (a
    ``DataError`` in its place when the line is not JSON)."""
    if not path.exists():
        raise DataError(f"{path}: no such file or folder; check the data path")
    if path.is_dir():
        yield from _dataset_folder_records(path)
    elif path.suffix == ".parquet":
        import pyarrow.parquet

        try:
            rows = pyarrow.parquet.read_table(path).to_pylist()
        except Exception as error:
            raise DataError(f"{path}: not a readable Parquet file ({error})") from error
        for index, row in enumerate(rows, start=1):
            yield index, f"{path}, record {index}", row
    elif path.suffix in (".jsonl", ".json"):
        with path.open("rb") as lines:
            for number, line in enumerate(lines, start=1):
                if not line.strip():
                    continue
                where = f"{path}, line {number}"
                try:
                    record = json.loads(line.decode("utf-8"))
                except (json.JSONDecodeError, UnicodeDecodeError) as error:
                    record = DataError(
                        f"{where}: not valid UTF-8 JSON ({error}); each line must hold one JSON object (JSON Lines)"
                    )
                yield number, where, record
    else:
        raise DataError(
            f"{path}: unknown data format '{path.suffix}'; use JSON Lines (.jsonl), Parquet (.parquet) "
            "or a folder written by datasets' save_to_disk"
        )


def _dataset_folder_records(path: Path) -> Iterator[tuple[int, str, Any]]:
    import datasets

    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as error:
        raise DataError(
            f"{path}: a folder, but not one written by datasets' save_to_disk ({error}); "
            "give a .jsonl or .parquet file or a save_to_disk folder"
        ) from error
    if isinstance(dataset, datasets.DatasetDict):
        if len(dataset) != 1:
            raise DataError(
                f"{path}: holds the splits {sorted(dataset)}; point the path at one split's folder, "
                f"e.g. {path / sorted(dataset)[0]}"
            )
        (dataset,) = dataset.values()
    for index, row in enumerate(dataset, start=1):
        yield index, f"{path}, record {index}", row


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
                f"{where}: message {position} of '{field}' is {message!r}; "
                'each message must be {"role": <string>, "content": <string>}'
            )
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _answer(record: dict, field: str, where: str) -> tuple[str, Messages | None]:
    """The answer text of ``chosen``/``rejected`` and the messages before it (None for a string)."""
    value = record.get(field)
    if value is None:
        raise DataError(f"{where}: '{field}' is missing; every preference record needs 'chosen' and 'rejected'")
    if isinstance(value, str):
        if not value.strip():
            raise DataError(f"{where}: '{field}' is empty; give the answer text")
        return value, None
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
    return prompt


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
    return str(prompt_id)


def _load(path: str | Path, skip_invalid: bool, parse) -> tuple[list, int]:
    """Read every record of ``path`` through ``parse(record, where, prompt_id)``; handle errors,
    duplicate ids and skipping the same way for preference data and eval prompts."""
    path = Path(path)
    items, skipped, first_seen = [], 0, {}
    for number, where, record in _records(path):
        try:
            if isinstance(record, DataError):
                raise record
            if not isinstance(record, dict):
                raise DataError(f"{where}: a record must be a JSON object, got {type(record).__name__}")
            prompt_id = _prompt_id(record, where, default=str(number))
            if prompt_id in first_seen:
                raise DataError(
                    f"{where}: prompt_id '{prompt_id}' was already used by {first_seen[prompt_id]}; "
                    "prompt ids must be unique"
                )
            items.append(parse(record, where, prompt_id))
            first_seen[prompt_id] = where
        except DataError:
            if not skip_invalid:
                raise
            skipped += 1
    if not items:
        reason = f"all {skipped} records are invalid" if skipped else "it holds no records"
        raise DataError(f"{path}: no usable records: {reason}")
    return items, skipped


def load_preferences(path: str | Path, skip_invalid: bool = False) -> tuple[list[PreferenceRecord], int]:
    """Load offline preference pairs; return them and the number of invalid records skipped.

    Raises ``DataError`` naming the file and record for the first invalid record, unless
    ``skip_invalid`` is set; then invalid records (duplicate ids included) are skipped and counted.
    A file with no usable record is always an error.
    """

    def parse(record: dict, where: str, prompt_id: str) -> PreferenceRecord:
        return PreferenceRecord(prompt_id, *_preference(record, where))

    return _load(path, skip_invalid, parse)


def load_eval_prompts(path: str | Path, skip_invalid: bool = False) -> tuple[list[EvalPrompt], int]:
    """Load held-out prompts; return them and the number of invalid records skipped.

    A record holding ``chosen`` or ``rejected`` is read as a preference record (and must be a
    valid one); any other record needs a ``prompt`` string. Errors and skipping as in
    ``load_preferences``.
    """

    def parse(record: dict, where: str, prompt_id: str) -> EvalPrompt:
        if record.get("chosen") is not None or record.get("rejected") is not None:
            return EvalPrompt(prompt_id, _preference(record, where)[0])
        prompt = _prompt_string(record, where)
        if prompt is None:
            raise DataError(f"{where}: 'prompt' is missing; every eval record needs a 'prompt' string")
        return EvalPrompt(prompt_id, prompt)

    return _load(path, skip_invalid, parse)
