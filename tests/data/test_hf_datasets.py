"""data.train= / data.eval= naming a dataset split as the `datasets` library does (NAME[:SPLIT]), read
offline: a DatasetDict.save_to_disk folder, a folder of a dataset's files, a Hub dataset in the local
datasets cache (what `load_dataset(NAME)` leaves) or in the Hub cache (what `huggingface-cli download`
leaves). UltraFeedback-binarized's columns and splits load without edits."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import datasets
import huggingface_hub.constants
import pyarrow
import pyarrow.parquet
import pytest

from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.data.schema import DataError, EvalPrompt, PreferenceRecord, load_eval_prompts, load_preferences
from metaapo_nemo.preflight import check_inputs

ROOT = Path(__file__).resolve().parents[2]
NAME = "HuggingFaceH4/ultrafeedback_binarized"
SPLITS = ("train_prefs", "test_prefs", "train_sft", "test_sft", "train_gen", "test_gen")


def turns(prompt, answer):
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def uf_row(i, split, good="Answer A", bad="Answer B"):
    """A row with UltraFeedback-binarized's exact columns."""
    prompt = f"{split} question {i}?"
    return {"prompt": prompt, "prompt_id": f"{split}-{i:04x}", "chosen": turns(prompt, f"{good} to {i}"),
            "rejected": turns(prompt, f"{bad} to {i}"), "messages": turns(prompt, f"{good} to {i}"),
            "score_chosen": 8.5, "score_rejected": 3.0}


def uf_rows(split):
    rows = [uf_row(i, split) for i in range(3)]
    if split == "train_prefs":  # a broken row: chosen and rejected are the same answer
        rows.insert(1, uf_row(9, split, good="Same", bad="Same"))
    return rows


def expected_pairs(split="train_prefs"):
    return [PreferenceRecord(r["prompt_id"], r["chosen"][:1], r["chosen"][-1]["content"], r["rejected"][-1]["content"])
            for r in uf_rows(split) if r["chosen"] != r["rejected"]]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """The same UltraFeedback-shaped dataset as (a) a save_to_disk folder, (b) a folder of its files as the
    Hub holds them, (c) a datasets cache holding it under its Hub name, (d) a Hub cache holding its files."""
    root = tmp_path_factory.mktemp("hf")
    dataset = datasets.DatasetDict({split: datasets.Dataset.from_list(uf_rows(split)) for split in SPLITS})
    dataset.save_to_disk(root / "saved")
    repo = root / "files" / "ultrafeedback_binarized"
    (repo / "data").mkdir(parents=True)
    for split in SPLITS:  # the Hub's layout; datasets maps each file to a split by its name
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(uf_rows(split)),
                                    repo / "data" / f"{split}-00000-of-00001.parquet")
    # (c) load_dataset of the files prepares them under the folder's name; a load from the Hub writes the
    # same layout under OWNER___NAME (what the Cache builder looks for offline).
    cache = root / "datasets_cache"
    datasets.load_dataset(str(repo), cache_dir=str(cache))
    shutil.move(cache / "ultrafeedback_binarized", cache / "HuggingFaceH4___ultrafeedback_binarized")
    small = root / "files" / "tiny"
    (small / "data").mkdir(parents=True)
    for split in ("train", "test"):
        pyarrow.parquet.write_table(pyarrow.Table.from_pylist(uf_rows(split)), small / "data" / f"{split}.parquet")
    datasets.load_dataset(str(small), cache_dir=str(cache))
    shutil.move(cache / "tiny", cache / "someone___tiny")
    # (d) the Hub cache: datasets--OWNER--NAME/snapshots/<commit>/ and refs/main naming the commit.
    hub = root / "hub_cache"
    commit = "0123456789abcdef0123456789abcdef01234567"
    snapshot = hub / "datasets--HuggingFaceH4--ultrafeedback_binarized" / "snapshots" / commit
    shutil.copytree(repo, snapshot)
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(commit)
    return root


@pytest.fixture
def caches(store, tmp_path, monkeypatch):
    """Point datasets and huggingface_hub at the test's caches (they read their variables when imported)."""
    def use(datasets_cache=None, hub_cache=None):
        monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", Path(datasets_cache or tmp_path / "empty_datasets"))
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub_cache or tmp_path / "empty_hub"))
    use()
    return use


def one_line_error(call, *args, **kwargs) -> str:
    with pytest.raises(DataError) as error:
        call(*args, **kwargs)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_a_split_of_a_save_to_disk_folder_loads_ultrafeedback_rows_and_counts_the_broken_one(store, caches):
    value = f"{store / 'saved'}:train_prefs"
    records, skipped = load_preferences(value, skip_invalid=True)
    assert (records, skipped) == (expected_pairs(), 1)
    assert records[0].prompt == [{"role": "user", "content": "train_prefs question 0?"}]
    assert (records[0].chosen, records[0].rejected) == ("Answer A to 0", "Answer B to 0")
    assert records[1].where == f"{value}, record 3"
    message = one_line_error(load_preferences, value)  # without skipping, the broken row stops the load
    assert message.startswith(f"{value}, record 2: 'chosen' and 'rejected' are the same answer")


def test_a_split_of_a_folder_of_the_datasets_files_loads_the_same(store, caches):
    assert load_preferences(f"{store / 'files' / 'ultrafeedback_binarized'}:train_prefs", skip_invalid=True) == \
        (expected_pairs(), 1)


def test_a_hub_name_loads_from_the_local_datasets_cache(store, caches):
    caches(datasets_cache=store / "datasets_cache")
    assert load_preferences(f"{NAME}:train_prefs", skip_invalid=True) == (expected_pairs(), 1)
    prompts, skipped = load_eval_prompts(f"{NAME}:test_gen")
    assert skipped == 0
    assert prompts == [EvalPrompt(r["prompt_id"], r["chosen"][:1]) for r in uf_rows("test_gen")]


def test_a_hub_name_loads_from_the_hub_cache_of_a_huggingface_cli_download(store, caches):
    caches(hub_cache=store / "hub_cache")
    assert load_preferences(f"{NAME}:train_prefs", skip_invalid=True) == (expected_pairs(), 1)


def test_without_a_split_train_takes_train_and_eval_takes_test_or_is_told_the_splits(store, caches):
    caches(datasets_cache=store / "datasets_cache")
    assert [r.prompt_id for r in load_preferences("someone/tiny")[0]] == [r["prompt_id"] for r in uf_rows("train")]
    assert [p.prompt_id for p in load_eval_prompts("someone/tiny")[0]] == [r["prompt_id"] for r in uf_rows("test")]
    message = one_line_error(load_preferences, NAME)
    assert message == (f"{NAME}: holds the splits test_gen, test_prefs, test_sft, train_gen, train_prefs, train_sft "
                       f"and no 'train'; name the split: {NAME}:test_gen")


@pytest.mark.parametrize("form", ["saved", "files", "cache"])
def test_a_wrong_split_is_one_line_listing_the_splits(store, caches, form):
    caches(datasets_cache=store / "datasets_cache")
    name = {"saved": str(store / "saved"), "files": str(store / "files" / "ultrafeedback_binarized"),
            "cache": NAME}[form]
    message = one_line_error(load_preferences, f"{name}:train")
    assert message == (f"{name}:train: no split 'train'; {name} has the splits test_gen, test_prefs, test_sft, "
                       f"train_gen, train_prefs, train_sft: give one, e.g. {name}:test_gen")


def test_a_dataset_in_neither_cache_is_one_line_saying_how_to_get_it(caches, tmp_path):
    message = one_line_error(load_preferences, "nobody/absent:train")
    assert message.startswith(f"nobody/absent:train: dataset nobody/absent is not in the local cache "
                              f"({tmp_path / 'empty_datasets'}, nor the Hub cache {tmp_path / 'empty_hub'})")
    assert "datasets.load_dataset('nobody/absent')" in message and "HF_DATASETS_CACHE" in message


def test_file_paths_keep_their_meaning(store, caches, tmp_path):
    absent = tmp_path / "absent.jsonl"
    assert one_line_error(load_preferences, absent) == f"{absent}: no such file or folder; check the data path"
    assert one_line_error(load_preferences, "data/absent.jsonl") == \
        "data/absent.jsonl: no such file or folder; check the data path"
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"prompt": "p", "chosen": "a", "rejected": "b"}\n')
    assert one_line_error(load_preferences, f"{jsonl}:train") == \
        f"{jsonl}:train: {jsonl} is a file, which has no splits; drop ':train'"
    named = tmp_path / "odd:name.jsonl"  # an existing path is read as a path, colon or not
    shutil.copy(jsonl, named)
    assert len(load_preferences(named)[0]) == 1


def test_check_inputs_loads_data_train_and_data_eval_by_name(store, caches):
    caches(datasets_cache=store / "datasets_cache")
    config = MetaAPOConfig()
    config.data.train, config.data.eval, config.data.skip_invalid = f"{NAME}:train_prefs", f"{NAME}:test_gen", True
    config.algo.iterations = 3
    inputs = check_inputs(config)
    assert (inputs.records, inputs.skipped) == (expected_pairs(), 1)
    assert [p.prompt_id for p in inputs.eval_prompts] == [r["prompt_id"] for r in uf_rows("test_gen")]


def test_a_run_naming_an_uncached_dataset_stops_in_one_line_with_status_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={tmp_path / 'out'}",
         f"task.cache_dir={tmp_path / 'cache'}", f"data.train={NAME}:train_prefs"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
             "HF_DATASETS_CACHE": str(tmp_path / "datasets"), "HF_HUB_CACHE": str(tmp_path / "hub"),
             "NEMORUN_HOME": str(tmp_path / "nemo_run")})
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {NAME}:train_prefs: dataset {NAME} is not in the local cache "
                                  f"({tmp_path / 'datasets'}, nor the Hub cache {tmp_path / 'hub'})"), proc.stderr


def test_a_folder_without_a_split_is_told_how_to_name_one(store, tmp_path):
    saved, files = store / "saved", store / "files" / "ultrafeedback_binarized"
    assert one_line_error(load_preferences, saved).endswith(f"or name the split: {saved}:test_gen")
    assert one_line_error(load_preferences, files).endswith(f"or name a split of the folder, e.g. {files}:test_gen")
