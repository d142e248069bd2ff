import hashlib
import json
import math
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


# offline_pairs(make_prompts(2000, seed=0), seed=2) computed before the offline_* knobs existed.
LEGACY_PAIRS_SHA256 = "1efcd64ffcc45954fa140d0cc87b8e6992ada6a8d546c2b06f420d9029f482d1"
LEGACY_FIRST_PAIRS = [
    {"prompt": "rev:gaehgeh=", "chosen": "heghea", "rejected": "heghega"},
    {"prompt": "rev:dcecbe=", "chosen": "ebcecd", "rejected": "ebcec"},
    {"prompt": "rev:cebbfhbf=", "chosen": "fbhfbbeec", "rejected": "fbhfbebc"},
    {"prompt": "rev:fdhheaa=", "chosen": "aaaehhdf", "rejected": "aaehhfd"},
    {"prompt": "rev:gahf=", "chosen": "fha", "rejected": "gahf"},
]


def _sha256(pairs):
    return hashlib.sha256(json.dumps(pairs).encode()).hexdigest()


def _right_share(pairs):
    return statistics.mean(pair["chosen"] == toy_task.answer(pair["prompt"]) for pair in pairs)


def test_legacy_knobs_reproduce_the_pairs_of_the_version_before_them_byte_for_byte():
    prompts = make_prompts(2000, seed=0)
    explicit = offline_pairs(prompts, seed=2, correct=0.04, informative=0.0, shift=0.0)
    assert explicit[:5] == LEGACY_FIRST_PAIRS
    assert _sha256(explicit) == _sha256(offline_pairs(prompts, seed=2)) == LEGACY_PAIRS_SHA256


def test_reward_ignores_all_whitespace_in_the_response():
    prompt = "rev:abcd="
    assert reward([prompt] * 4, ["d cb a", "d\tc b\na ", "dc  ba", "d cb b"]) == [1.0, 1.0, 1.0, 0.75]


def test_informative_mistakes_are_one_letter_edits_of_every_kind():
    prompts = make_prompts(500, seed=0)
    pairs = offline_pairs(prompts, seed=2, correct=0.0, informative=1.0)
    responses = [(toy_task.answer(pair["prompt"]), pair[k]) for pair in pairs for k in ("chosen", "rejected")]
    assert all(toy_task._edit_distance(target, response) == 1 for target, response in responses)
    # substitutions keep the length, deletions and insertions change it by one
    assert {len(response) - len(target) for target, response in responses} == {-1, 0, 1}


def test_share_of_right_chosen_answers_follows_offline_correct():
    """With every mistake one edit away (informative=1), a substitution or deletion scores
    1 - 1/L and an insertion 1 - 1/(L+1), so two mistakes differ with d = 2 * 0.2 * 0.8 = 0.32.
    Tied draws (two right answers among them) are redrawn, so the chosen answer is right with
    2q(1-q) / (2q(1-q) + d(1-q)^2) = 2q / (2q + d(1-q)), below 1-(1-q)^2 (which would count the
    both-right draws). 4 binomial standard deviations over 4000 prompts: at most 0.032."""
    prompts = make_prompts(4000, seed=0)
    for q in (0.1, 0.3, 0.6):
        expected = 2 * q / (2 * q + 0.32 * (1 - q))
        tolerance = 4 * math.sqrt(expected * (1 - expected) / len(prompts))
        assert abs(_right_share(offline_pairs(prompts, seed=2, correct=q, informative=1.0)) - expected) <= tolerance
    # With systematic mistakes d <= 1, so the share is at least 2q / (1 + q), and it grows with q.
    shares = [_right_share(offline_pairs(prompts, seed=2, correct=q)) for q in (0.04, 0.3, 0.6)]
    assert shares == sorted(shares)
    assert all(share >= 2 * q / (1 + q) - 0.03 for q, share in zip((0.04, 0.3, 0.6), shares))


def test_offline_shift_spaces_the_gaps_and_changes_nothing_else():
    prompts = make_prompts(1000, seed=0)
    legacy = offline_pairs(prompts, seed=2)
    assert not any(" " in pair[k] for pair in offline_pairs(prompts, seed=2, shift=0.0) for k in ("chosen", "rejected"))
    for pair, old in zip(offline_pairs(prompts, seed=2, shift=1.0), legacy):
        assert (pair["chosen"], pair["rejected"]) == (" ".join(old["chosen"]), " ".join(old["rejected"]))
    half = offline_pairs(prompts, seed=2, shift=0.5)
    assert [{k: v.replace(" ", "") for k, v in pair.items()} for pair in half] == legacy
    gaps = sum(len(old[k]) - 1 for old in legacy for k in ("chosen", "rejected"))
    spaces = sum(pair[k].count(" ") for pair in half for k in ("chosen", "rejected"))
    assert abs(spaces / gaps - 0.5) <= 4 * math.sqrt(0.25 / gaps)


def test_offline_knobs_outside_zero_to_one_are_refused_by_their_key():
    with pytest.raises(ValueError, match="task.offline_shift=1.5"):
        offline_pairs(["rev:ab="], seed=0, shift=1.5)
    with pytest.raises(ValueError, match="task.offline_correct=-0.1"):
        offline_pairs(["rev:ab="], seed=0, correct=-0.1)


def _plain_edit_distance(a: str, b: str) -> int:
    """The dynamic programme toy_task's bit-parallel edit distance replaced."""
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def test_bit_parallel_edit_distance_equals_the_dynamic_programme():
    import random

    rng = random.Random(0)
    assert toy_task._edit_distance("kitten", "sitting") == 3 and toy_task._edit_distance("", "abc") == 3
    for _ in range(3000):  # short and long strings, small alphabets so that matches are frequent
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 100)))
        b = "".join(rng.choice("abcd") for _ in range(rng.randint(0, 100)))
        assert toy_task._edit_distance(a, b) == _plain_edit_distance(a, b), (a, b)


def test_letter_range_sets_the_prompt_lengths_and_the_defaults_draw_the_same_prompts():
    assert make_prompts(200, seed=3) == make_prompts(200, seed=3, min_letters=4, max_letters=8)
    long = make_prompts(200, seed=3, min_letters=64, max_letters=80)
    lengths = [len(toy_task.answer(p)) for p in long]
    assert min(lengths) >= 64 and max(lengths) <= 80 and len(set(lengths)) > 10
    assert reward(long, [toy_task.answer(p) for p in long]) == [1.0] * 200
    with pytest.raises(ValueError, match="task.min_letters <= task.max_letters"):
        make_prompts(3, seed=0, min_letters=9, max_letters=8)
