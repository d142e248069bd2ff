import codecs
import json
import re
from pathlib import Path

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from metaapo_nemo.config import ConfigError
from metaapo_nemo.data.schema import DataError, EvalPrompt, PreferenceRecord, load_eval_prompts, load_preferences

STRING_RECORD = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
CHAT_RECORD = {  # UltraFeedback-binarized layout
    "prompt_id": "abc123",
    "prompt": "Name a colour.",
    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
    "messages": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "score_chosen": 8.0,
    "score_rejected": 2.0,
}
CHAT_PROMPT = [{"role": "user", "content": "Name a colour."}]


def write_jsonl(path, lines):
    path.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n")
    return path


def test_jsonl_string_records_get_their_line_number_as_default_id(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORD, "", {**STRING_RECORD, "chosen": "Red."}])
    records, skipped = load_preferences(path)
    assert skipped == 0
    assert records == [
        PreferenceRecord("1", "Name a colour.", "Blue.", "Seven."),
        PreferenceRecord("3", "Name a colour.", "Red.", "Seven."),
    ]


def test_chat_message_records_take_the_messages_before_the_answer_as_prompt(tmp_path):
    system_turn = {"role": "system", "content": "Be brief."}
    without_prompt = {
        "prompt_id": 7,
        "chosen": [system_turn, *CHAT_RECORD["chosen"]],
        "rejected": [system_turn, *CHAT_RECORD["rejected"]],
    }
    answer_only = {"prompt": "Hi", "chosen": [{"role": "assistant", "content": "Hello"}], "rejected": "Bye"}
    records, _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", [CHAT_RECORD, without_prompt, answer_only]))
    assert records == [
        PreferenceRecord("abc123", CHAT_PROMPT, "Blue.", "Seven."),
        PreferenceRecord("7", [system_turn, *CHAT_PROMPT], "Blue.", "Seven."),
        PreferenceRecord("3", "Hi", "Hello", "Bye"),
    ]


def test_parquet_and_save_to_disk_folders_load_like_jsonl(tmp_path):
    rows = [CHAT_RECORD, {**CHAT_RECORD, "prompt_id": "def456"}]
    expected = [
        PreferenceRecord("abc123", CHAT_PROMPT, "Blue.", "Seven."),
        PreferenceRecord("def456", CHAT_PROMPT, "Blue.", "Seven."),
    ]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), tmp_path / "d.parquet")
    datasets.Dataset.from_list(rows).save_to_disk(tmp_path / "dataset")
    datasets.DatasetDict({"train_prefs": datasets.Dataset.from_list(rows)}).save_to_disk(tmp_path / "dict")
    for path in ("d.parquet", "dataset", "dict"):
        assert load_preferences(tmp_path / path) == (expected, 0)


def test_a_dataset_dict_with_several_splits_asks_for_one(tmp_path):
    split = datasets.Dataset.from_list([STRING_RECORD])
    datasets.DatasetDict({"train": split, "test": split}).save_to_disk(tmp_path / "dict")
    with pytest.raises(DataError, match=r"splits \['test', 'train'\].*one split's folder"):
        load_preferences(tmp_path / "dict")


def user_then(answer):
    return [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": answer}]


def message_list(*roles_and_contents):
    return [{"role": role, "content": content} for role, content in roles_and_contents]


# (broken line, the problem the message names, what it tells to fix)
BROKEN_RECORDS = [
    ('{"prompt": "x", "chosen": "a"', "not valid JSON", "each line must hold one JSON object"),
    ('["x", "a", "b"]', "must be a JSON object, got list", 'write each record as {"prompt"'),
    ("7", "must be a JSON object, got int", 'write each record as {"prompt"'),
    ({"prompt": "x", "rejected": "b"}, "'chosen' is missing", "needs 'chosen' and 'rejected'"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "'chosen' has type int", "give a string or a list of chat"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "'rejected' is empty", "give the answer text"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty", "give the prompt text"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, "'prompt' has type list", "it must be a string"),
    ({"chosen": "a", "rejected": "b"}, "no prompt", "add a 'prompt' string"),
    ({"prompt": "x", "chosen": [], "rejected": "b"}, "empty message list", "give the answer as a string"),
    ({"prompt": "x", "chosen": [{"role": "user"}], "rejected": "b"}, "message 1 of 'chosen'",
     'each message must be {"role"'),
    ({"chosen": user_then("a")[:1], "rejected": user_then("b")}, "last message of 'chosen' has role 'user'",
     "must be the assistant's answer"),
    ({"chosen": user_then(""), "rejected": user_then("b")}, "answer (last message) of 'chosen' is empty",
     "give the answer text"),
    ({"chosen": user_then("a"), "rejected": [{"role": "user", "content": "Other?"}, *user_then("b")[1:]]},
     "differ in the messages before the answer", "must answer the same conversation"),
    ({"prompt": "Name a shape.", "chosen": user_then("a"), "rejected": user_then("b")},
     "does not match the last user message", "fix the record"),
    ({"prompt_id": 1.5, "prompt": "x", "chosen": "a", "rejected": "b"}, "'prompt_id' has type float",
     "give a string or an integer"),
    ({"prompt_id": "", "prompt": "x", "chosen": "a", "rejected": "b"}, "'prompt_id' is empty",
     "give a non-empty id or leave 'prompt_id' out"),
    ('{"prompt_id": ' + "7" * 5000 + ', "prompt": "x", "chosen": "a", "rejected": "b"}',
     "an integer of 5000 digits", "give a long 'prompt_id' as a string"),
    ('{"prompt_id": ' + "7" * 101 + ', "prompt": "x", "chosen": "a", "rejected": "b"}',
     "an integer of 101 digits", "at most 100 digits"),
    ({"prompt": "x", "chosen": "Same. ", "rejected": "Same."}, "'chosen' and 'rejected' are the same answer",
     "fix one or drop the record"),
    ({"chosen": user_then("Same."), "rejected": user_then("Same.")}, "'chosen' and 'rejected' are the same answer",
     "fix one or drop the record"),
    ({"chosen": message_list(("narrator", "Once"), ("assistant", "a")), "rejected": user_then("b")},
     "message 1 of 'chosen' has role 'narrator'", "use one of system, user, assistant, tool"),
    ({"prompt": "x\u0000y", "chosen": "a", "rejected": "b"}, "'prompt' holds a NUL character (\\x00) at character 2",
     "remove it"),
    ({"prompt": "x", "chosen": "a\ud800", "rejected": "b"},
     "'chosen' holds a lone surrogate (\\ud800, not Unicode text)", "fix the text's encoding"),
    ({"chosen": message_list(("user", "\udfff"), ("assistant", "a")), "rejected": user_then("b")},
     "message 1 of 'chosen' holds a lone surrogate (\\udfff, not Unicode text)", "fix the text's encoding"),
    ({"prompt_id": "a\u0000", "prompt": "x", "chosen": "a", "rejected": "b"}, "'prompt_id' holds a NUL character",
     "remove it"),
    ("[" * 100_000 + "]" * 100_000, "JSON nested too deeply", "one flat preference record"),
]


def assert_one_line_error(error, where, problem, fix):
    """The message a user sees: one line, starting with the file and record, naming the problem and the fix."""
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{where}: ")
    assert problem in message and fix in message


@pytest.mark.parametrize(("broken", "problem", "fix"), BROKEN_RECORDS)
def test_a_broken_jsonl_record_is_one_line_naming_file_line_problem_and_fix_or_skipped_and_counted(
    tmp_path, broken, problem, fix
):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORD, broken])
    with pytest.raises(DataError) as error:
        load_preferences(path)
    assert_one_line_error(error, f"{path}, line 2", problem, fix)
    assert load_preferences(path, skip_invalid=True) == ([PreferenceRecord("1", *STRING_RECORD.values())], 1)


def test_data_errors_are_config_errors_so_entry_points_print_them_as_one_line():
    assert issubclass(DataError, ConfigError)


def test_a_utf8_byte_order_mark_at_the_start_of_a_jsonl_file_is_accepted(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(codecs.BOM_UTF8 + json.dumps(STRING_RECORD).encode() + b"\n")
    assert load_preferences(path) == ([PreferenceRecord("1", *STRING_RECORD.values())], 0)
    assert load_preferences(path, skip_invalid=True)[1] == 0


def test_a_line_that_is_not_utf8_names_the_byte_and_is_skipped_and_counted(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(json.dumps(STRING_RECORD).encode() + b"\n" + '{"prompt": "caf\xe9"}'.encode("latin-1") + b"\n")
    with pytest.raises(DataError) as error:
        load_preferences(path)
    assert_one_line_error(error, f"{path}, line 2", "not UTF-8 text (byte 0xe9 at byte 16 of the line)",
                          "save the file as UTF-8")
    assert load_preferences(path, skip_invalid=True)[1] == 1


def test_the_same_answer_twice_is_fine_in_eval_files_which_read_only_the_prompt(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "x", "chosen": "a", "rejected": "a"}])
    assert load_eval_prompts(path) == ([EvalPrompt("1", "x")], 0)


def test_tool_messages_and_integer_ids_up_to_100_digits_load(tmp_path):
    tool_turns = message_list(("system", "Use tools."), ("user", "Time?"), ("assistant", "Let me look."),
                              ("tool", "12:00"))
    record = {"prompt_id": int("9" * 100), "chosen": [*tool_turns, {"role": "assistant", "content": "Noon."}],
              "rejected": [*tool_turns, {"role": "assistant", "content": "Dawn."}]}
    records, _ = load_preferences(write_jsonl(tmp_path / "d.jsonl", [record]))
    assert records == [PreferenceRecord("9" * 100, tool_turns, "Noon.", "Dawn.")]


def test_huge_lines_load(tmp_path):
    answer = "word " * 2_000_000
    path = write_jsonl(tmp_path / "d.jsonl", [{**STRING_RECORD, "chosen": answer}])
    assert load_preferences(path)[0][0].chosen == answer


def test_every_record_names_the_file_and_record_it_came_from(tmp_path):
    jsonl = write_jsonl(tmp_path / "d.jsonl", ["", STRING_RECORD])
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([STRING_RECORD]), tmp_path / "d.parquet")
    assert load_preferences(jsonl)[0][0].where == f"{jsonl}, line 2"
    assert load_eval_prompts(jsonl)[0][0].where == f"{jsonl}, line 2"
    assert load_preferences(tmp_path / "d.parquet")[0][0].where == f"{tmp_path / 'd.parquet'}, record 1"


def test_a_broken_parquet_record_is_reported_with_its_row(tmp_path):
    path = tmp_path / "d.parquet"
    rows = [STRING_RECORD, STRING_RECORD, {**STRING_RECORD, "rejected": None}]
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist(rows), path)
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, record 3: 'rejected' is missing"):
        load_preferences(path)


def test_duplicate_prompt_ids_name_both_records_and_skip_the_second(tmp_path):
    records = [CHAT_RECORD, STRING_RECORD, CHAT_RECORD, {**STRING_RECORD, "prompt_id": "2"}]
    path = write_jsonl(tmp_path / "d.jsonl", records)
    name = re.escape(str(path))
    with pytest.raises(DataError, match=rf"^{name}, line 3: prompt_id 'abc123' was already used by {name}, line 1"):
        load_preferences(path)
    records, skipped = load_preferences(path, skip_invalid=True)
    assert [record.prompt_id for record in records] == ["abc123", "2"]
    assert skipped == 2


def test_skip_invalid_counts_every_skipped_record(tmp_path):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORD, "{", {"prompt": "x"}, STRING_RECORD, "[]"])
    records, skipped = load_preferences(path, skip_invalid=True)
    assert [record.prompt_id for record in records] == ["1", "4"]
    assert skipped == 3


def file_error(path, skip_invalid=True):
    """The DataError loading ``path`` raises; file-level problems raise even when records may be skipped."""
    with pytest.raises(DataError) as error:
        load_preferences(path, skip_invalid=skip_invalid)
    return error


@pytest.mark.parametrize("content", [b"", b"\n\n", codecs.BOM_UTF8 + b"\n"], ids=["zero-bytes", "blank", "bom-only"])
def test_a_file_without_records_is_an_error_naming_the_file(tmp_path, content):
    path = tmp_path / "empty.jsonl"
    path.write_bytes(content)
    assert_one_line_error(file_error(path), str(path), "no usable records: it holds no records",
                          "give a file with at least one record")


def test_a_file_whose_records_are_all_invalid_is_an_error_even_when_skipping(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", ["{", "{"])
    assert_one_line_error(file_error(path), str(path), "all 2 records are invalid",
                          "load it without skipping to see the first problem")


def test_a_missing_path_is_an_error(tmp_path):
    path = tmp_path / "absent.jsonl"
    assert_one_line_error(file_error(path), str(path), "no such file or folder", "check the data path")


def test_an_unknown_format_is_an_error(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("prompt,chosen,rejected\n")
    assert_one_line_error(file_error(path), str(path), "unknown data format '.csv'", "use JSON Lines (.jsonl)")


@pytest.mark.parametrize("name", ["d.jsonl", "d.parquet"])
def test_an_unreadable_file_is_an_error_even_when_skipping(tmp_path, monkeypatch, name):
    path = write_jsonl(tmp_path / name, [STRING_RECORD])
    real_open = Path.open

    def open_refused(self, *args, **kwargs):  # the tests run as root, who may read any file
        if self == path:
            raise PermissionError(13, "Permission denied", str(self))
        return real_open(self, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_refused)
    assert_one_line_error(file_error(path), str(path), "cannot be read (Permission denied)",
                          "check the file's permissions")


def test_a_file_that_is_not_parquet_is_an_error(tmp_path):
    path = tmp_path / "d.parquet"
    path.write_text("prompt,chosen,rejected\n")
    assert_one_line_error(file_error(path), str(path), "not a readable Parquet file", "write it again")


def test_a_folder_not_written_by_save_to_disk_is_an_error(tmp_path):
    assert_one_line_error(file_error(tmp_path), str(tmp_path), "not one written by datasets' save_to_disk",
                          "give a .jsonl or .parquet file or a save_to_disk folder")


def test_a_hub_download_folder_of_parquet_files_is_told_to_point_at_one(tmp_path):
    (tmp_path / "data").mkdir()
    shard = tmp_path / "data" / "train_prefs-00000-of-00001.parquet"
    pyarrow.parquet.write_table(pyarrow.Table.from_pylist([CHAT_RECORD]), shard)
    assert_one_line_error(file_error(tmp_path), str(tmp_path), "not one written by datasets' save_to_disk",
                          f"it holds Parquet files: point the path at one, e.g. {shard}")


def test_eval_prompts_come_from_prompt_only_or_preference_records(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "rev:ab="}, CHAT_RECORD, {"prompt_id": "q", "prompt": "Hi"}])
    assert load_eval_prompts(path) == (
        [EvalPrompt("1", "rev:ab="), EvalPrompt("abc123", CHAT_PROMPT), EvalPrompt("q", "Hi")],
        0,
    )


def test_eval_records_without_a_prompt_are_reported_or_skipped(tmp_path):
    path = write_jsonl(tmp_path / "e.jsonl", [{"prompt": "a"}, {"question": "b"}, {"prompt": "c", "chosen": 1}])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, line 2: 'prompt' is missing"):
        load_eval_prompts(path)
    assert load_eval_prompts(path, skip_invalid=True) == ([EvalPrompt("1", "a")], 2)
