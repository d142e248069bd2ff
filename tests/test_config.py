"""Recipes, overrides and validation: bad settings stop the run before anything heavy, naming the
key and what to set."""
import pytest

from metaapo_nemo.config import ConfigError, MetaAPOConfig, apply_overrides
from metaapo_nemo.recipes import RECIPES, get_recipe


def test_every_recipe_is_complete_and_tiny_cpu_validates():
    assert set(RECIPES) >= {"tiny_cpu", "llama31_8b", "qwen25_7b"}
    get_recipe("tiny_cpu").validate()
    assert get_recipe("qwen25_7b").rollout.temperature == 0.8 and get_recipe("qwen25_7b").rollout.top_p == 0.95
    paper = get_recipe("llama31_8b")
    assert (paper.policy.lr, paper.algo.beta, paper.algo.meta_lr, paper.algo.meta_interval, paper.algo.num_samples,
            paper.algo.iterations, paper.trainer.global_batch_size) == (5e-7, 0.1, 5e-3, 8, 8, 3, 128)


def test_overrides_set_nested_keys_with_parsed_types():
    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["algo.beta=0.25", "algo.name=online_dpo", "seed=7", "policy.hf_path=/m",
                             "reward.url=None", "algo.keep_ties=true", "output_dir=out/x"])
    assert config.algo.beta == 0.25 and config.algo.name == "online_dpo" and config.seed == 7
    assert config.policy.hf_path == "/m" and config.reward.url is None and config.algo.keep_ties is True
    assert config.output_dir == "out/x"


@pytest.mark.parametrize("override, message", [
    ("algo.bta=0.1", "unknown key 'bta'"),
    ("algoo.beta=0.1", "no config section 'algoo'"),
    ("beta", "expected KEY=VALUE"),
])
def test_bad_overrides_name_the_key(override, message):
    with pytest.raises(ConfigError, match=message):
        apply_overrides(get_recipe("tiny_cpu"), [override])


@pytest.mark.parametrize("override, message", [
    ("algo.name=metaapo_typo", "unknown algo.name"),
    ("algo.num_samples=1", "algo.num_samples must be >= 2"),
    ("trainer.global_batch_size=10", "multiple of trainer.micro_batch_size"),
    ("rollout.top_p=0", "rollout.top_p=0"),
    ("algo.iterations=0", "algo.iterations=0"),
])
def test_validation_says_what_to_change(override, message):
    config = get_recipe("tiny_cpu")
    apply_overrides(config, [override])
    with pytest.raises(ConfigError, match=message):
        config.validate()


def test_the_reference_logp_cache_sits_under_the_task_cache_by_default_and_is_off_when_empty(tmp_path):
    config = get_recipe("tiny_cpu")
    apply_overrides(config, [f"task.cache_dir={tmp_path}"])
    assert config.reference.logp_cache_dir == "auto"
    assert config.reference_logp_cache_dir() == str(tmp_path / "reference_logps")
    for off in ("reference.logp_cache_dir=", "reference.logp_cache_dir=null"):
        apply_overrides(config, [off])
        config.validate()
        assert config.reference_logp_cache_dir() is None
    (tmp_path / "a_file").write_text("")
    apply_overrides(config, [f"reference.logp_cache_dir={tmp_path / 'a_file'}"])
    with pytest.raises(ConfigError, match="a file, not a folder"):
        config.validate()
    # On the command line a string key's digits stay text: a folder named "3".
    apply_overrides(config, ["reference.logp_cache_dir=3"])
    assert config.reference.logp_cache_dir == "3"
    config.reference.logp_cache_dir = 3  # set from Python, not a string: refused
    with pytest.raises(ConfigError, match="reference.logp_cache_dir=3: a folder"):
        config.validate()


def test_overrides_of_the_wrong_type_are_refused_in_one_line():
    config = MetaAPOConfig()
    with pytest.raises(ConfigError, match=r"^override 'algo.beta=abc': expected a number"):
        apply_overrides(config, ["algo.beta=abc"])
    with pytest.raises(ConfigError, match=r"^override 'algo.iterations=2.5': expected"):
        apply_overrides(config, ["algo.iterations=2.5"])
    apply_overrides(config, ["algo.beta=1", "output_dir=123"])  # an int fits a float; digits fit a string
    assert config.algo.beta == 1 and config.output_dir == "123"


def test_bring_your_own_run_requires_checkpoint_data_and_reward():
    with pytest.raises(ConfigError) as info:
        MetaAPOConfig().validate()
    text = str(info.value)
    for key in ("policy.hf_path", "data.train", "data.eval", "reward.url"):
        assert key in text


@pytest.mark.parametrize("name", ["llama31_8b", "qwen25_7b"])
def test_gpu_recipes_validate_once_the_user_gives_paths_and_use_bf16_sharding_and_recompute(name):
    config = get_recipe(name)
    assert config.rollout.engine == "trtllm" and config.policy.bf16 and config.trainer.use_distributed_optimizer
    assert config.trainer.accelerator == "gpu" and get_recipe("tiny_cpu").trainer.accelerator == "auto"
    assert (config.trainer.recompute_granularity, config.trainer.recompute_method,
            config.trainer.recompute_num_layers) == ("full", "uniform", 1)
    apply_overrides(config, ["policy.hf_path=/m/policy", "reference.hf_path=/m/sft", "data.train=/d/train.jsonl",
                             "data.eval=/d/eval.jsonl", "reward.url=http://rm:5000"])
    try:
        config.validate()
    except ConfigError as e:  # where tensorrt_llm is absent the engine is the only thing refused
        problems = str(e).splitlines()[1:]
        assert problems and all(p.startswith("  - rollout.engine=trtllm") for p in problems), str(e)
    apply_overrides(config, ["rollout.engine=torch"])
    config.validate()


@pytest.mark.parametrize("overrides, message", [
    (["trainer.recompute_granularity=fulll"], "use None, 'selective' or 'full'"),
    (["trainer.recompute_granularity=full"], "needs trainer.recompute_method=uniform|block"),
    (["trainer.recompute_granularity=full", "trainer.recompute_method=uniform", "trainer.recompute_num_layers=0"],
     "trainer.recompute_num_layers=N > 0"),
    (["trainer.recompute_granularity=selective", "trainer.recompute_num_layers=1"], "leave trainer.recompute_method"),
    (["trainer.use_distributed_optimizer=yes"], "override 'trainer.use_distributed_optimizer=yes': expected true or false"),
    (["trainer.accelerator=cuda"], "trainer.accelerator='cuda': use 'auto', 'gpu' or 'cpu'"),
])
def test_bad_recompute_and_optimizer_settings_say_what_to_set(overrides, message):
    config = get_recipe("tiny_cpu")
    with pytest.raises(ConfigError, match=message.replace("|", r"\|").replace("(", r"\(")):
        apply_overrides(config, overrides)  # a wrong type is refused here, the rest by validate
        config.validate()
