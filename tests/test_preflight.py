"""Inputs checked before anything heavy loads: checkpoint folders, reward model and data, each
problem one line naming the config key (or file and record) and what to fix."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from metaapo_nemo.config import ConfigError, MetaAPOConfig
from metaapo_nemo.data.schema import DataError
from metaapo_nemo.preflight import CHECKPOINT_FOLDER, Inputs, check_inputs, check_model_folder

ROOT = Path(__file__).resolve().parents[1]
PAIR = {"prompt": "Name a colour.", "chosen": "Blue.", "rejected": "Seven."}


def save_tiny_llama(folder: Path, hidden_size: int = 32) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.data import toy_task

    config = LlamaConfig(vocab_size=64, hidden_size=hidden_size, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=1, intermediate_size=64)
    LlamaForCausalLM(config).save_pretrained(folder)
    toy_task.build_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama") / "sft")


@pytest.fixture
def checkpoint(llama, tmp_path) -> Path:
    """A copy of the tiny checkpoint to break."""
    return Path(shutil.copytree(llama, tmp_path / "ckpt"))


def error_of(call, *args) -> str:
    """The one-line message of the ConfigError ``call(*args)`` raises."""
    with pytest.raises(ConfigError) as error:
        call(*args)
    message = str(error.value)
    assert "\n" not in message
    return message


def folder_error(path, key="policy.hf_path", **kwargs) -> str:
    return error_of(lambda: check_model_folder(str(path), key, **kwargs))


def edit_config(folder: Path, **changes) -> None:
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **changes}))


# ------------------------------------------------------------------ check_model_folder


def test_a_saved_llama_checkpoint_passes_and_gives_its_model_config(llama):
    model = check_model_folder(str(llama), "policy.hf_path")
    assert (model.hidden_size, model.num_layers, model.num_query_groups, model.qkv_bias) == (32, 1, 1, False)


def test_a_missing_folder_is_no_such_folder(tmp_path):
    message = folder_error(tmp_path / "absent")
    assert message == f"policy.hf_path={tmp_path / 'absent'}: no such folder; {CHECKPOINT_FOLDER}"


def test_a_hub_id_is_told_to_download_the_checkpoint_first():
    message = folder_error("meta-llama/Llama-3.1-8B-Instruct-not-here")
    assert message.startswith("policy.hf_path=meta-llama/Llama-3.1-8B-Instruct-not-here: no such folder; it is "
                              "not downloaded from the Hugging Face Hub: download it first")
    assert message.endswith(CHECKPOINT_FOLDER)


def test_a_file_is_not_a_checkpoint_folder(checkpoint):
    assert folder_error(checkpoint / "config.json") == (
        f"policy.hf_path={checkpoint / 'config.json'}: a file, not a folder; {CHECKPOINT_FOLDER}")


def test_a_folder_without_config_json_is_refused(checkpoint):
    (checkpoint / "config.json").unlink()
    assert folder_error(checkpoint) == f"policy.hf_path={checkpoint}: holds no config.json; {CHECKPOINT_FOLDER}"


def test_a_config_json_that_is_not_json_is_refused(checkpoint):
    (checkpoint / "config.json").write_text("{model_type: llama")
    message = folder_error(checkpoint)
    assert message.startswith(f"policy.hf_path={checkpoint}: config.json cannot be read as JSON (")
    assert message.endswith("save the checkpoint again (model.save_pretrained)")


def test_a_model_type_other_than_llama_or_qwen2_is_refused(checkpoint):
    edit_config(checkpoint, model_type="mistral")
    assert folder_error(checkpoint) == (f"policy.hf_path={checkpoint}: config.json has model_type='mistral'; only "
                                        "Llama and Qwen2 checkpoints (model_type llama or qwen2) are supported")


def test_a_reward_model_given_as_policy_is_refused(checkpoint):
    edit_config(checkpoint, architectures=["LlamaForSequenceClassification"])
    assert folder_error(checkpoint) == (f"policy.hf_path={checkpoint}: holds a LlamaForSequenceClassification model; "
                                        "give a causal language model checkpoint (architectures LlamaForCausalLM)")


def test_a_config_the_megatron_model_cannot_reproduce_is_refused_with_the_reason(checkpoint):
    edit_config(checkpoint, hidden_act="gelu")
    message = folder_error(checkpoint)
    assert message.startswith(f"policy.hf_path={checkpoint}: unsupported Hugging Face config: hidden_act='gelu'")
    assert message.endswith("give a Llama or Qwen2 checkpoint this project converts")


def test_a_folder_without_weights_names_what_it_found(checkpoint):
    (checkpoint / "model.safetensors").rename(checkpoint / "model-q4.gguf")
    assert folder_error(checkpoint) == (
        f"policy.hf_path={checkpoint}: holds no weights this project reads (model.safetensors.index.json, "
        f"model.safetensors, pytorch_model.bin) (found model-q4.gguf); {CHECKPOINT_FOLDER}")


def test_sharded_safetensors_with_their_index_and_pytorch_model_bin_pass(checkpoint, tmp_path):
    bin_folder = Path(shutil.copytree(checkpoint, tmp_path / "bin"))
    (bin_folder / "model.safetensors").unlink()
    (bin_folder / "pytorch_model.bin").write_bytes(b"PK\x03\x04")  # a torch.save zip's opening bytes
    check_model_folder(str(bin_folder), "policy.hf_path")
    shard = "model-00001-of-00001.safetensors"
    (checkpoint / "model.safetensors").rename(checkpoint / shard)
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"lm_head.weight": shard}}))
    check_model_folder(str(checkpoint), "policy.hf_path")


def test_an_index_naming_a_missing_shard_is_refused(checkpoint):
    index = {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}
    (checkpoint / "model.safetensors.index.json").write_text(json.dumps(index))
    assert folder_error(checkpoint) == (
        f"policy.hf_path={checkpoint}: model.safetensors.index.json names 2 missing shard(s), e.g. "
        "model-00001-of-00002.safetensors; download the checkpoint again")


def test_a_git_lfs_pointer_instead_of_weights_is_refused(checkpoint):
    (checkpoint / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\n")
    assert folder_error(checkpoint) == (f"policy.hf_path={checkpoint}: model.safetensors is a Git LFS pointer, not "
                                        "the weights; run `git lfs pull` in the folder or download it again")


def test_a_truncated_safetensors_file_is_refused(checkpoint):
    weights = checkpoint / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert folder_error(checkpoint) == (f"policy.hf_path={checkpoint}: model.safetensors is not a complete "
                                        "safetensors file (truncated download?); download it again")


def test_a_folder_without_tokenizer_files_is_refused_unless_no_tokenizer_is_needed(checkpoint):
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (checkpoint / name).unlink(missing_ok=True)
    message = folder_error(checkpoint)
    assert message.startswith(f"policy.hf_path={checkpoint}: holds no tokenizer files (tokenizer.json, ")
    assert "save the tokenizer into the folder (tokenizer.save_pretrained)" in message
    check_model_folder(str(checkpoint), "reference.hf_path", tokenizer=False)


# ------------------------------------------------------------------ check_inputs


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def run_config(tmp_path, llama, pairs=4, **changes) -> MetaAPOConfig:
    config = MetaAPOConfig()
    config.policy.hf_path = str(llama)
    config.data.train = str(write_jsonl(tmp_path / "train.jsonl", [{**PAIR, "prompt_id": i} for i in range(pairs)]))
    config.data.eval = str(write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Hi"}, {"prompt": "Bye"}]))
    config.reward.reward_fn = "metaapo_nemo.data.toy_task:reward"
    config.algo.iterations = 2
    for key, value in changes.items():
        section, name = key.split("__")
        setattr(getattr(config, section), name, value)
    return config


def test_good_inputs_are_returned_loaded_with_where_they_came_from(tmp_path, llama):
    inputs = check_inputs(run_config(tmp_path, llama))
    assert isinstance(inputs, Inputs)
    assert [r.prompt_id for r in inputs.records] == ["0", "1", "2", "3"] and inputs.skipped == 0
    assert inputs.records[0].where == f"{tmp_path / 'train.jsonl'}, line 1"
    assert [p.prompt for p in inputs.eval_prompts] == ["Hi", "Bye"] and inputs.eval_skipped == 0


def test_unset_inputs_are_left_to_validate_and_the_embedded_task(tmp_path):
    config = MetaAPOConfig()
    assert check_inputs(config) == Inputs(None, 0, None, 0)


def test_skip_invalid_from_the_config_skips_and_counts_bad_records(tmp_path, llama):
    config = run_config(tmp_path, llama, data__skip_invalid=True)
    write_jsonl(Path(config.data.train), [PAIR, "not json", {**PAIR, "prompt_id": "b"}, {"prompt": "a", "chosen": "b"}])
    write_jsonl(Path(config.data.eval), [{"prompt": "Hi"}, {"prompt": ""}])
    inputs = check_inputs(config)
    assert (len(inputs.records), inputs.skipped, len(inputs.eval_prompts), inputs.eval_skipped) == (2, 2, 1, 1)


def test_a_bad_record_stops_the_check_with_the_file_and_line(tmp_path, llama):
    config = run_config(tmp_path, llama)
    write_jsonl(Path(config.data.train), [{"prompt": "a", "chosen": "b"}, "not json"])
    message = error_of(check_inputs, config)
    assert message.startswith(f"{config.data.train}, line 1: 'rejected' is missing; ")
    with pytest.raises(DataError):
        check_inputs(config)


def test_a_bad_eval_file_stops_the_check(tmp_path, llama):
    config = run_config(tmp_path, llama, data__eval=str(tmp_path / "absent.jsonl"))
    assert error_of(check_inputs, config) == f"{tmp_path / 'absent.jsonl'}: no such file or folder; check the data path"


def test_a_broken_policy_folder_stops_the_check_naming_its_key(tmp_path, llama):
    config = run_config(tmp_path, llama, policy__hf_path="/nonexistent")
    assert error_of(check_inputs, config) == f"policy.hf_path=/nonexistent: no such folder; {CHECKPOINT_FOLDER}"


def test_a_reference_of_another_architecture_is_refused(tmp_path, llama):
    wider = save_tiny_llama(tmp_path / "wider", hidden_size=64)
    config = run_config(tmp_path, llama, reference__hf_path=str(wider))
    assert error_of(check_inputs, config) == (
        f"reference.hf_path={wider}: a different architecture from policy.hf_path={llama} (hidden_size 64 vs 32); "
        "the reference must be the policy's SFT ancestor")


def test_a_broken_reference_folder_stops_the_check_naming_its_key(tmp_path, llama):
    config = run_config(tmp_path, llama, reference__hf_path=str(tmp_path))
    assert error_of(check_inputs, config) == f"reference.hf_path={tmp_path}: holds no config.json; {CHECKPOINT_FOLDER}"


@pytest.mark.parametrize(("spec", "expected"), [
    ("no_colon", "reward.reward_fn must look like MODULE:FUNCTION (e.g. my_rewards.length:score); got 'no_colon'"),
    ("not_a_module_xyz:score", "cannot import module 'not_a_module_xyz' named in reward.reward_fn "
                               "'not_a_module_xyz:score': No module named 'not_a_module_xyz'; "
                               "is its folder on PYTHONPATH?"),
    ("metaapo_nemo.data.toy_task:no_such_fn", "reward.reward_fn 'metaapo_nemo.data.toy_task:no_such_fn': <module "
                                              "'metaapo_nemo.data.toy_task'"),
    ("metaapo_nemo.data.toy_task:CHARACTERS", "reward.reward_fn 'metaapo_nemo.data.toy_task:CHARACTERS' names str, "
                                              "not a function"),
])
def test_a_reward_fn_that_cannot_be_loaded_is_refused(tmp_path, llama, spec, expected):
    assert error_of(check_inputs, run_config(tmp_path, llama, reward__reward_fn=spec)).startswith(expected)


def test_a_reward_module_that_fails_while_importing_is_refused(tmp_path, llama, monkeypatch):
    (tmp_path / "broken_rewards.py").write_text("raise RuntimeError('needs\\nGPU')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    config = run_config(tmp_path, llama, reward__reward_fn="broken_rewards:score")
    assert error_of(check_inputs, config) == ("reward.reward_fn='broken_rewards:score': importing it raised "
                                              "RuntimeError: needs GPU; fix the module")


def test_a_reward_model_folder_passes_and_a_causal_lm_or_classifier_does_not(tmp_path, llama):
    from tests.reward.fixtures import save_tiny_reward_model

    save_tiny_reward_model(tmp_path / "rm")
    check_inputs(run_config(tmp_path, llama, reward__reward_fn=None, reward__model_dir=str(tmp_path / "rm")))
    config = run_config(tmp_path, llama, reward__reward_fn=None, reward__model_dir=str(llama))
    assert error_of(check_inputs, config) == (
        f"reward.model_dir={llama}: holds a LlamaForCausalLM, not a reward model; give a folder of a "
        "...ForSequenceClassification model with one output (num_labels=1)")
    save_tiny_reward_model(tmp_path / "classifier", num_labels=3)
    config.reward.model_dir = str(tmp_path / "classifier")
    assert error_of(check_inputs, config) == (f"reward.model_dir={tmp_path / 'classifier'}: config.json gives 3 "
                                              "labels; a Bradley-Terry reward model has num_labels=1")


def test_a_reward_model_folder_without_a_tokenizer_is_refused(tmp_path, llama):
    from tests.reward.fixtures import save_tiny_reward_model

    save_tiny_reward_model(tmp_path / "rm")
    (tmp_path / "rm" / "tokenizer.json").unlink()
    config = run_config(tmp_path, llama, reward__reward_fn=None, reward__model_dir=str(tmp_path / "rm"))
    assert error_of(check_inputs, config).startswith(f"reward.model_dir={tmp_path / 'rm'}: holds no tokenizer files")


def test_a_local_reward_server_cannot_serve_both_a_function_and_a_model(tmp_path, llama):
    config = run_config(tmp_path, llama, reward__model_dir=str(tmp_path))
    assert error_of(check_inputs, config) == ("reward.reward_fn and reward.model_dir are both set; the local reward "
                                              "server serves one: set the other to None")


def test_fewer_pairs_than_iterations_are_refused_after_max_train_pairs(tmp_path, llama):
    config = run_config(tmp_path, llama, pairs=1)
    assert error_of(check_inputs, config) == (f"data.train={config.data.train}: 1 preference pairs cannot fill "
                                              "algo.iterations=2 slices; lower algo.iterations or give more pairs")
    config = run_config(tmp_path, llama, pairs=4, data__max_train_pairs=1)
    assert error_of(check_inputs, config) == (
        f"data.train={config.data.train}: 1 preference pairs (data.max_train_pairs=1) cannot fill "
        "algo.iterations=2 slices; lower algo.iterations or give more pairs")


def test_importing_preflight_loads_neither_torch_nor_megatron():
    code = "import sys, metaapo_nemo.preflight; print(sorted({'torch', 'megatron', 'transformers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.strip() == "[]"
