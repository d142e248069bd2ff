"""Checks of a run's inputs before anything heavy loads: checkpoint folders, the reward model and
the data, each problem a ``ConfigError`` of one line naming the config key (or the file and record)
and what to fix.

``check_inputs(config)`` runs them all and returns what it loaded (``Inputs``), so set-up does not
read the data twice. Nothing here imports torch or Megatron at module level: the launcher imports
this module; only the architecture check of a policy checkpoint imports torch and transformers,
when it runs.
"""

import json
from dataclasses import dataclass, fields
from pathlib import Path

from metaapo_nemo.config import ConfigError, MetaAPOConfig, one_line
from metaapo_nemo.data.schema import EvalPrompt, PreferenceRecord, load_eval_prompts, load_preferences
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.reward.models import load_reward_fn

CHECKPOINT_FOLDER = "give a local Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer files)"
MODEL_TYPES = ("llama", "qwen2")  # what hf_convert.model_config_from_hf converts
# Weight files as hf_convert.load_hf_checkpoint reads them, in its order.
POLICY_WEIGHTS = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin")
# transformers' from_pretrained also reads sharded .bin files (the reward model loads through it).
REWARD_WEIGHTS = (*POLICY_WEIGHTS, "pytorch_model.bin.index.json")
# Any of these lets AutoTokenizer build the tokenizer (tokenizer_config.json alone holds no vocabulary).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt")
_LFS_POINTER = b"version https://git-lfs"


@dataclass
class Inputs:
    """What ``check_inputs`` loaded. ``records`` are data.train's pairs as the file holds them
    (before data.max_train_pairs), ``eval_prompts`` data.eval's prompts (before
    data.max_eval_prompts); each is None when its key is unset. ``skipped`` and ``eval_skipped``
    count the invalid records data.skip_invalid skipped."""

    records: list[PreferenceRecord] | None
    skipped: int
    eval_prompts: list[EvalPrompt] | None
    eval_skipped: int


def check_inputs(config: MetaAPOConfig) -> Inputs:
    """Raise ``ConfigError`` (one line) for the first input of ``config`` a run could not use; return
    the loaded data. Keys left unset are not checked here: ``config.validate()`` says which a run
    needs, and the embedded task fills in its own."""
    _check_models(config.policy.hf_path, config.reference.hf_path)
    _check_reward(config)
    skip = config.data.skip_invalid
    records, skipped = (None, 0) if config.data.train is None else load_preferences(config.data.train, skip)
    if records is not None:
        _check_enough_pairs(len(records), config)
    eval_prompts, eval_skipped = (None, 0) if config.data.eval is None else load_eval_prompts(config.data.eval, skip)
    return Inputs(records, skipped, eval_prompts, eval_skipped)


def check_model_folder(path: str, key: str, tokenizer: bool = True) -> ModelConfig:
    """Raise ``ConfigError`` (one line) unless ``path``, the value of config key ``key``, is a local
    Llama or Qwen2 causal-LM checkpoint folder ``hf_convert.load_hf_checkpoint`` loads, with
    tokenizer files unless ``tokenizer`` is False (the reference uses the policy's tokenizer).
    Return the ModelConfig the Megatron model will be built from."""
    folder, hf = _checkpoint_config(path, key)
    model_type = hf.get("model_type")
    if model_type not in MODEL_TYPES:
        raise ConfigError(f"{key}={path}: config.json has model_type={model_type!r}; only Llama and Qwen2 "
                          f"checkpoints (model_type {' or '.join(MODEL_TYPES)}) are supported")
    architecture = next(iter(hf.get("architectures") or []), None)
    if architecture is not None and not architecture.endswith("ForCausalLM"):
        raise ConfigError(f"{key}={path}: holds a {architecture} model; give a causal language model checkpoint "
                          f"(architectures {model_type.capitalize()}ForCausalLM)")
    _check_weights(folder, key, POLICY_WEIGHTS)
    if tokenizer:
        _check_tokenizer(folder, key)
    return _convertible_config(folder, key)


def _check_models(policy: str | None, reference: str | None) -> None:
    policy_model = check_model_folder(policy, "policy.hf_path") if policy is not None else None
    if reference is not None and reference != policy:
        reference_model = check_model_folder(reference, "reference.hf_path", tokenizer=False)
        if policy_model is not None:
            _check_same_architecture(policy_model, reference_model, policy, reference)


def _convertible_config(folder: Path, key: str) -> ModelConfig:
    """What the Megatron model is built from; refusals (sliding window, RoPE types) come from
    ``model_config_from_hf`` so this check and the conversion never disagree."""
    from transformers import AutoConfig

    from metaapo_nemo.models.hf_convert import model_config_from_hf

    try:
        return model_config_from_hf(AutoConfig.from_pretrained(folder))
    except Exception as error:  # transformers raises ValueError, KeyError or TypeError on odd configs
        raise ConfigError(f"{key}={folder}: {one_line(error)}; give a Llama or Qwen2 checkpoint this project "
                          "converts") from error


def _check_reward_folder(path: str, key: str) -> None:
    """A Bradley-Terry reward model folder as ``reward.models.HFRewardModel`` loads it."""
    folder, hf = _checkpoint_config(path, key)
    architecture = next(iter(hf.get("architectures") or []), "")
    if architecture.endswith("ForCausalLM"):
        raise ConfigError(f"{key}={path}: holds a {architecture}, not a reward model; give a folder of a "
                          "...ForSequenceClassification model with one output (num_labels=1)")
    labels = hf.get("id2label")
    if labels is not None and len(labels) != 1:
        raise ConfigError(f"{key}={path}: config.json gives {len(labels)} labels; a Bradley-Terry reward model "
                          "has num_labels=1")
    _check_weights(folder, key, REWARD_WEIGHTS)
    _check_tokenizer(folder, key)


def _checkpoint_config(path: str, key: str) -> tuple[Path, dict]:
    """The folder and its parsed config.json."""
    folder = Path(path)
    if not folder.exists():
        # A Hub id looks like "org/name"; this run only reads local folders.
        hub = ("; it is not downloaded from the Hugging Face Hub: download it first "
               f"(huggingface-cli download {path} --local-dir DIR) and"
               if not folder.is_absolute() and len(folder.parts) == 2 else ";")
        raise ConfigError(f"{key}={path}: no such folder{hub} {CHECKPOINT_FOLDER}")
    if not folder.is_dir():
        raise ConfigError(f"{key}={path}: a file, not a folder; {CHECKPOINT_FOLDER}")
    try:
        next(folder.iterdir(), None)
    except OSError as error:
        raise ConfigError(f"{key}={path}: cannot be read ({error.strerror}); check the folder's permissions") from error
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConfigError(f"{key}={path}: holds no config.json; {CHECKPOINT_FOLDER}")
    try:
        hf = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{key}={path}: config.json cannot be read as JSON ({one_line(error)}); "
                          "save the checkpoint again (model.save_pretrained)") from error
    if not isinstance(hf, dict):
        raise ConfigError(f"{key}={path}: config.json holds a {type(hf).__name__}, not a JSON object; "
                          "save the checkpoint again (model.save_pretrained)")
    return folder, hf


def _check_weights(folder: Path, key: str, accepted: tuple[str, ...]) -> None:
    """The first weight file of ``accepted`` the folder holds, and the shards an index names, exist
    and are not Git LFS pointers or truncated safetensors files."""
    found = next((name for name in accepted if (folder / name).is_file()), None)
    if found is None:
        others = sorted(p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".gguf", ".pt"))
        seen = f" (found {', '.join(others[:4])}{'...' if len(others) > 4 else ''})" if others else ""
        raise ConfigError(f"{key}={folder}: holds no weights this project reads ({', '.join(accepted)}){seen}; "
                          f"{CHECKPOINT_FOLDER}")
    files = [folder / found]
    if found.endswith(".index.json"):
        files = [folder / shard for shard in _index_shards(folder / found, key)]
    for file in files:
        _check_weight_file(file, key)


def _index_shards(index: Path, key: str) -> list[str]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise ConfigError(f"{key}={index.parent}: {index.name} has no readable 'weight_map' ({one_line(error)}); "
                          "download or save the checkpoint again") from error
    missing = [shard for shard in shards if not (index.parent / shard).is_file()]
    if missing:
        raise ConfigError(f"{key}={index.parent}: {index.name} names {len(missing)} missing shard(s), e.g. "
                          f"{missing[0]}; download the checkpoint again")
    return shards


def _check_weight_file(file: Path, key: str) -> None:
    try:
        weights = file.open("rb")
    except OSError as error:
        raise ConfigError(f"{key}={file.parent}: {file.name} cannot be read ({error.strerror}); "
                          "check the file's permissions") from error
    with weights:
        head = weights.read(len(_LFS_POINTER))
        if head == _LFS_POINTER:
            raise ConfigError(f"{key}={file.parent}: {file.name} is a Git LFS pointer, not the weights; "
                              "run `git lfs pull` in the folder or download it again")
        if file.suffix == ".safetensors" and not _safetensors_header_ok(weights, file.stat().st_size):
            raise ConfigError(f"{key}={file.parent}: {file.name} is not a complete safetensors file "
                              "(truncated download?); download it again")


def _safetensors_header_ok(weights, size: int) -> bool:
    """A safetensors file starts with its header's length (8 bytes, little-endian), then the JSON header."""
    weights.seek(0)
    length = int.from_bytes(weights.read(8), "little")
    if not 0 < length <= size - 8:
        return False
    try:
        return isinstance(json.loads(weights.read(length)), dict)
    except ValueError:
        return False


def _check_tokenizer(folder: Path, key: str) -> None:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ConfigError(f"{key}={folder}: holds no tokenizer files ({', '.join(TOKENIZER_FILES)}); save the "
                          "tokenizer into the folder (tokenizer.save_pretrained) or " + CHECKPOINT_FOLDER)


def _check_same_architecture(policy, reference, policy_path: str, reference_path: str) -> None:
    differences = [f"{f.name} {getattr(reference, f.name)} vs {getattr(policy, f.name)}"
                   for f in fields(policy) if getattr(policy, f.name) != getattr(reference, f.name)]
    if differences:
        raise ConfigError(f"reference.hf_path={reference_path}: a different architecture from policy.hf_path="
                          f"{policy_path} ({'; '.join(differences[:3])}); the reference must be the policy's "
                          "SFT ancestor")


def _check_reward(config: MetaAPOConfig) -> None:
    r = config.reward
    if r.url is None and r.reward_fn is not None and r.model_dir is not None:
        raise ConfigError("reward.reward_fn and reward.model_dir are both set; the local reward server serves one: "
                          "set the other to None")
    if r.model_dir is not None:
        _check_reward_folder(r.model_dir, "reward.model_dir")
    if r.reward_fn is not None:
        _check_reward_fn(r.reward_fn, "reward.reward_fn")
    if r.eval_reward_fn is not None:
        _check_reward_fn(r.eval_reward_fn, "reward.eval_reward_fn")


def _check_reward_fn(spec: str, key: str) -> None:
    try:
        load_reward_fn(spec)
    except ValueError as error:  # the loader's messages name the reward server's flag
        raise ConfigError(one_line(error).replace("--reward-fn", key)) from error
    except Exception as error:  # the module's own code failed while importing
        raise ConfigError(f"{key}={spec!r}: importing it raised {type(error).__name__}: "
                          f"{one_line(error)}; fix the module") from error


def _check_enough_pairs(loaded: int, config: MetaAPOConfig) -> None:
    limit = config.data.max_train_pairs
    usable = min(loaded, limit) if limit else loaded
    if usable < config.algo.iterations:
        after = f" (data.max_train_pairs={limit})" if limit and limit < loaded else ""
        raise ConfigError(f"data.train={config.data.train}: {usable} preference pairs{after} cannot fill "
                          f"algo.iterations={config.algo.iterations} slices; lower algo.iterations or give more pairs")


