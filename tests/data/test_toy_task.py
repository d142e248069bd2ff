import re
import statistics

import pytest
from transformers import AutoTokenizer

from metaapo_nemo.data import toy_task
from metaapo_nemo.data.toy_task import build_tokenizer, make_prompts, offline_pairs, reward, sft_responses


def test_tokenizer_round_trips_text_and_has_the_special_tokens():
    tokenizer = build_tokenizer()
    text = "rev:abcdefgh=hgfedcba"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.decode([1, *ids[:3], 2], skip_special_tokens=True) == "rev"
    assert 30 <= len(tokenizer) <= 60


def test_tokenizer_saves_and_reloads_with_the_same_ids(tmp_path):
    tokenizer = build_tokenizer()
    tokenizer.save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    text = "rev:hgab=bahg"
    assert reloaded.encode(text, add_special_tokens=False) == tokenizer.encode(text, add_special_tokens=False)
    assert (reloaded.pad_token, reloaded.bos_token, reloaded.eos_token) == ("<pad>", "<bos>", "<eos>")
    assert reloaded.get_vocab() == tokenizer.get_vocab()


def test_reward_of_the_right_answer_is_one_and_errors_cost_their_share():
    prompt = "rev:abcd="
    responses = ["dcba", " dcba\n", "dcbb", "dcb", "dcbaa", "dbbb", "", "xyzxyzxyz"]
    # Edit distances 0, 0, 1, 1, 1, 2, 4, 9 over longest lengths 4, 4, 4, 4, 5, 4, 4, 9.
    assert reward([prompt] * len(responses), responses) == [1.0, 1.0, 0.75, 0.75, 0.8, 0.5, 0.0, 0.0]


def test_reward_reads_the_task_inside_a_wrapped_prompt():
    assert reward(["<bos>rev:ab="], ["ba"]) == [1.0]


def test_reward_rejects_foreign_prompts_and_mismatched_lengths():
    with pytest.raises(ValueError, match="rev:<letters>="):
        reward(["what is 2+2?"], ["4"])
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        reward(["rev:ab=", "rev:ba="], ["ba"])


def test_prompts_are_deterministic_distinct_well_formed_and_respect_exclude():
    prompts = make_prompts(300, seed=3)
    assert prompts == make_prompts(300, seed=3)
    assert prompts != make_prompts(300, seed=4)
    assert len(set(prompts)) == 300
    pattern = re.compile(r"rev:[%s]{4,8}=" % toy_task.LETTERS)
    assert all(pattern.fullmatch(prompt) for prompt in prompts)
    held_out = make_prompts(300, seed=4, exclude=set(prompts))
    assert not set(held_out) & set(prompts)


def test_sequences_fit_in_32_tokens():
    prompts = make_prompts(500, seed=0)
    responses = sft_responses(prompts, seed=0)
    # <bos> + prompt + response + <eos>
    assert max(len(p) + len(r) + 2 for p, r in zip(prompts, responses)) <= 32


def test_sft_demonstrations_are_mostly_right_with_varied_errors():
    prompts = make_prompts(2000, seed=0)
    responses = sft_responses(prompts, seed=1)
    scores = reward(prompts, responses)
    assert responses == sft_responses(prompts, seed=1)
    assert 0.83 <= statistics.mean(scores) <= 0.89
    assert 0.3 <= sum(score == 1.0 for score in scores) / len(scores) <= 0.5
    noisier = reward(prompts, sft_responses(prompts, seed=1, noise=0.3))
    assert statistics.mean(noisier) < statistics.mean(scores) - 0.1


def test_offline_pairs_prefer_the_better_answer_but_rarely_the_perfect_one():
    prompts = make_prompts(2000, seed=0)
    pairs = offline_pairs(prompts, seed=2)
    assert pairs == offline_pairs(prompts, seed=2)
    assert [pair["prompt"] for pair in pairs] == prompts
    chosen = reward(prompts, [pair["chosen"] for pair in pairs])
    rejected = reward(prompts, [pair["rejected"] for pair in pairs])
    assert all(c > r for c, r in zip(chosen, rejected))
    assert sum(score == 1.0 for score in chosen) / len(chosen) < 0.15
    assert 0.78 <= statistics.mean(chosen) <= 0.88
    assert 0.5 <= statistics.mean(rejected) <= 0.6
