"""Reward functions by import path, and the Hugging Face Bradley-Terry reward model in-process and
behind the server."""

import os.path

import httpx
import pytest
import torch

from metaapo_nemo.reward.models import HFRewardModel, load_reward_fn

from .fixtures import PAD, ServerProcess, save_tiny_reward_model

# Different lengths (so batches pad), and the pad token inside and at the end of a text.
PROMPTS = ["what is a cat? ", "hi ", "", "say it: ", "is this ok? ", "a"]
RESPONSES = ["a small animal.", "hello there, friend!", "b", f"x{PAD}y", f"yes{PAD}", "\nzz zz"]


def test_a_reward_function_is_found_by_module_and_attribute_path():
    assert load_reward_fn("os.path:join") is os.path.join
    assert load_reward_fn("os:path.join") is os.path.join


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("os.path.join", "must look like MODULE:FUNCTION"),
        (":join", "must look like MODULE:FUNCTION"),
        ("no_such_module_for_rewards:f", "cannot import module 'no_such_module_for_rewards'"),
        ("os.path:no_such_function", "has no attribute 'no_such_function'"),
        ("os:sep", "names str, not a function"),
    ],
)
def test_a_bad_reward_function_spec_says_what_to_fix(spec, message):
    with pytest.raises(ValueError, match=message):
        load_reward_fn(spec)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_reward_model")
    save_tiny_reward_model(folder)
    return folder


def unbatched_rewards(folder, texts: list[str]) -> list[float]:
    """The reference: Hugging Face's own model called on one text at a time, no padding."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForSequenceClassification.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0, 0].item() for text in texts]


@pytest.fixture(scope="module")
def reference_rewards(model_dir):
    return unbatched_rewards(model_dir, [prompt + response for prompt, response in zip(PROMPTS, RESPONSES)])


def test_batched_rewards_equal_the_model_called_on_each_text_alone(model_dir, reference_rewards):
    rewards = HFRewardModel(str(model_dir), batch_size=4)(PROMPTS, RESPONSES)
    assert rewards == pytest.approx(reference_rewards, abs=1e-5)
    assert max(reference_rewards) - min(reference_rewards) > 1.0  # the rewards tell texts apart


def test_a_model_without_pad_id_is_batched_the_same_as_it_scores_alone(tmp_path):
    save_tiny_reward_model(tmp_path, pad_token_id=None)
    texts = ["abc", "a much longer text", "ok"]
    assert HFRewardModel(str(tmp_path), batch_size=3).score_texts(texts) == pytest.approx(
        unbatched_rewards(tmp_path, texts), abs=1e-5
    )


def test_a_classifier_with_several_labels_is_refused(tmp_path):
    save_tiny_reward_model(tmp_path, num_labels=2)
    with pytest.raises(ValueError, match="num_labels=2"):
        HFRewardModel(str(tmp_path))


def test_the_server_with_a_model_gives_the_in_process_rewards(model_dir, reference_rewards, tmp_path):
    server = ServerProcess(tmp_path / "server.log", "--model", str(model_dir), "--batch-size", "2")
    try:
        server.wait_healthy(60.0)
        queries = [prompt + response for prompt, response in zip(PROMPTS, RESPONSES)]
        with_prompts = httpx.post(f"{server.url}/get_reward", json={"query": queries, "prompts": PROMPTS}, timeout=30)
        without_prompts = httpx.post(f"{server.url}/get_reward", json={"query": queries}, timeout=30)
    finally:
        server.kill()
    assert with_prompts.json()["rewards"] == pytest.approx(reference_rewards, abs=1e-5)
    assert without_prompts.json()["rewards"] == pytest.approx(reference_rewards, abs=1e-5)
