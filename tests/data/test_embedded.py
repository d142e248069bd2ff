import contextlib
import json
from pathlib import Path

from metaapo_nemo.config import EmbeddedTaskConfig, apply_overrides
from metaapo_nemo.data.embedded import pair_stats, prepare_embedded_task
from tests.helpers import SHRUNK_TINY_CPU


class RecordingConsole:
    def __init__(self):
        self.lines = []

    def log(self, message):
        self.lines.append(message)

    @contextlib.contextmanager
    def progress(self, description, total):
        yield lambda note="": None


def test_pair_stats_count_right_chosen_answers_rewards_and_inner_spaces():
    pairs = [
        {"prompt": "rev:abcd=", "chosen": "d c b a", "rejected": "dcb"},  # 1.0 and 0.75, 3 and 0 spaces
        {"prompt": "rev:abcd=", "chosen": "dcbb", "rejected": " abcd "},  # 0.75 and 0.0, 0 and 0 spaces
    ]
    assert pair_stats(pairs) == {"offline_chosen_right": 0.5, "offline_chosen_reward": 0.875,
                                 "offline_rejected_reward": 0.375, "offline_inner_spaces": 0.75}


def _task(cache_dir, *overrides):
    task = EmbeddedTaskConfig(enabled=True, cache_dir=str(cache_dir))
    apply_overrides(task, [o.removeprefix("task.") for o in SHRUNK_TINY_CPU if o.startswith("task.")] + list(overrides))
    return task


def _build(task):
    console = RecordingConsole()
    return prepare_embedded_task(task, seed=1234, console=console), console.lines


def test_offline_knobs_reuse_the_cached_sft_model_and_rebuild_the_rest(tmp_path):
    from metaapo_nemo.distributed import init_distributed

    init_distributed()
    legacy, legacy_log = _build(_task(tmp_path))
    sft_weights = Path(legacy.sft_dir) / "model.safetensors"
    sft_written = sft_weights.stat().st_mtime_ns
    shifted, shifted_log = _build(_task(tmp_path, "offline_correct=0.4", "offline_informative=0.8", "offline_shift=1.0"))

    assert any("SFT of a" in line for line in legacy_log)
    assert not any("SFT of a" in line for line in shifted_log)
    assert any("SFT model cached at" in line for line in shifted_log)
    assert shifted.sft_dir == legacy.sft_dir and sft_weights.stat().st_mtime_ns == sft_written
    assert shifted.policy_dir != legacy.policy_dir and shifted.train != legacy.train
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        {Path(legacy.sft_dir).parent.name, Path(legacy.train).parent.name, Path(shifted.train).parent.name})

    for built, spaces in ((legacy, 0.0), (shifted, None)):
        stats = json.loads((Path(built.train).parent / "task_stats.json").read_text())
        pairs = [json.loads(line) for line in open(built.train)]
        assert {k: stats[k] for k in pair_stats(pairs)} == pair_stats(pairs)
        if spaces is not None:
            assert stats["offline_inner_spaces"] == spaces
        assert 0 <= stats["sft_sample_reward"] <= 1 and 0 <= stats["warmup_sample_reward"] <= 1
        assert stats["warmup_logp_per_token_own"] < 0 and stats["warmup_logp_per_token_offline_chosen"] < 0
    shifted_stats = json.loads((Path(shifted.train).parent / "task_stats.json").read_text())
    # A space in every gap: a response of n letters has n - 1 of them, and the policy never saw one.
    assert shifted_stats["offline_inner_spaces"] > 3
    assert shifted_stats["warmup_logp_per_token_offline_chosen"] < shifted_stats["warmup_logp_per_token_own"] - 1

    again, again_log = _build(_task(tmp_path, "offline_correct=0.4", "offline_informative=0.8", "offline_shift=1.0"))
    assert again == shifted
    assert [line for line in again_log if "cached at" in line] == [f"embedded task: cached at {Path(shifted.train).parent}"]
    assert not any("building" in line for line in again_log)


def test_a_missing_sft_model_is_rebuilt_even_when_the_rest_is_cached(tmp_path):
    from metaapo_nemo.distributed import init_distributed

    init_distributed()
    task = _task(tmp_path, "sft_steps=2", "warmup_dpo_steps=0")
    first, _ = _build(task)
    (Path(first.sft_dir).parent / "DONE").unlink()
    second, log = _build(task)
    assert second == first and any("SFT of a" in line for line in log)
    assert (Path(first.sft_dir).parent / "DONE").exists()


def test_the_task_config_defaults_are_the_legacy_offline_pairs():
    task = EmbeddedTaskConfig()
    assert (task.offline_correct, task.offline_informative, task.offline_shift) == (0.04, 0.0, 0.0)


def test_cache_keys_of_the_default_letters_are_those_before_the_letter_keys():
    from metaapo_nemo.data.embedded import task_keys

    # Computed before task.min_letters / task.max_letters existed (default cache_dir): caches built
    # then are found now.
    assert task_keys(EmbeddedTaskConfig(), 1) == ("5d62fe708fc0", "2868a4afb222")
    assert task_keys(EmbeddedTaskConfig(), 1234) == ("efe0c47bedb4", "b6e364e0f2c8")
    longer = EmbeddedTaskConfig(min_letters=64, max_letters=80)
    assert task_keys(longer, 1)[0] != "5d62fe708fc0" and task_keys(longer, 1)[1] != "2868a4afb222"
    assert EmbeddedTaskConfig().max_position_embeddings == 128 and longer.max_position_embeddings == 192


def test_letter_range_is_validated_against_the_length_limits():
    import pytest

    from metaapo_nemo.config import ConfigError
    from metaapo_nemo.recipes import get_recipe

    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["task.min_letters=64", "task.max_letters=80"])
    with pytest.raises(ConfigError) as err:
        config.validate()
    message = str(err.value)
    assert "raise policy.max_prompt_length=64 to at least 86" in message
    assert "raise policy.max_length=96 to at least 167" in message
    assert "raise rollout.max_new_tokens=24 to at least 81" in message
    apply_overrides(config, ["policy.max_prompt_length=96", "policy.max_length=192", "rollout.max_new_tokens=96"])
    config.validate()
    apply_overrides(config, ["rollout.max_new_tokens=120"])
    with pytest.raises(ConfigError, match="lower rollout.max_new_tokens to at most 106"):
        config.validate()
