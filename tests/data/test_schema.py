import json
import re

import datasets
import pyarrow
import pyarrow.parquet
import pytest

from metaapo_nemo.data.schema import DataError, EvalPrompt, PreferenceRecord, load_eval_prompts, load_preferences

STRING_RECORD = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}
CHAT_RECORD = {  # UltraFeedback-binarized layout
    "prompt_id": "abc123",
    "prompt": "Name a colour.",
    "chosen": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
    "rejected": [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Seven."}],
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


BROKEN_RECORDS = [
    ('{"prompt": "x", "chosen": "a"', "not valid UTF-8 JSON"),
    ('["x", "a", "b"]', "must be a JSON object"),
    ({"prompt": "x", "rejected": "b"}, "'chosen' is missing"),
    ({"prompt": "x", "chosen": 3, "rejected": "b"}, "'chosen' has type int"),
    ({"prompt": "x", "chosen": "a", "rejected": "  "}, "'rejected' is empty"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "'prompt' is empty"),
    ({"prompt": ["x"], "chosen": "a", "rejected": "b"}, "'prompt' has type list"),
    ({"chosen": "a", "rejected": "b"}, "no prompt"),
    ({"prompt": "x", "chosen": [], "rejected": "b"}, "empty message list"),
    ({"prompt": "x", "chosen": [{"role": "user"}], "rejected": "b"}, "message 1 of 'chosen'"),
    ({"chosen": user_then("a")[:1], "rejected": user_then("b")}, "last message of 'chosen' has role 'user'"),
    ({"chosen": user_then(""), "rejected": user_then("b")}, "answer \\(last message\\) of 'chosen' is empty"),
    ({"chosen": user_then("a"), "rejected": [{"role": "user", "content": "Other?"}, *user_then("b")[1:]]},
     "differ in the messages before the answer"),
    ({"prompt": "Name a shape.", "chosen": user_then("a"), "rejected": user_then("b")},
     "does not match the last user message"),
    ({"prompt_id": 1.5, "prompt": "x", "chosen": "a", "rejected": "b"}, "'prompt_id' has type float"),
]


@pytest.mark.parametrize(("broken", "problem"), BROKEN_RECORDS)
def test_a_broken_jsonl_record_is_reported_with_file_line_and_problem(tmp_path, broken, problem):
    path = write_jsonl(tmp_path / "d.jsonl", [STRING_RECORD, broken])
    with pytest.raises(DataError, match=rf"^{re.escape(str(path))}, line 2: .*{problem}"):
        load_preferences(path)
    assert load_preferences(path, skip_invalid=True) == ([PreferenceRecord("1", *STRING_RECORD.values())], 1)


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


def test_files_without_usable_records_are_errors(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(DataError, match="no usable records: it holds no records"):
        load_preferences(empty)
    broken = write_jsonl(tmp_path / "broken.jsonl", ["{", "{"])
    with pytest.raises(DataError, match="all 2 records are invalid"):
        load_preferences(broken, skip_invalid=True)


def test_missing_paths_and_unknown_formats_are_errors(tmp_path):
    with pytest.raises(DataError, match="no such file or folder"):
        load_preferences(tmp_path / "absent.jsonl")
    (tmp_path / "d.csv").write_text("prompt,chosen,rejected\n")
    with pytest.raises(DataError, match="unknown data format '.csv'"):
        load_preferences(tmp_path / "d.csv")
    (tmp_path / "folder").mkdir()
    with pytest.raises(DataError, match="not one written by datasets' save_to_disk"):
        load_preferences(tmp_path / "folder")


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
