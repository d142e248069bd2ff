import pytest

from metaapo_nemo.algorithm.pairs import best_worst, build_online_pair, build_selm_pair


def test_best_worst_picks_highest_and_lowest_reward():
    assert best_worst([0.1, 0.9, -0.3, 0.5]) == (1, 2)


def test_best_worst_of_equal_rewards_is_a_tie():
    assert best_worst([0.5, 0.5, 0.5]) is None
    assert best_worst([2.0]) is None


def test_best_worst_breaks_ties_by_lowest_index():
    assert best_worst([1.0, 3.0, 0.0, 3.0, 0.0]) == (1, 2)


@pytest.mark.parametrize("rewards", [[], [0.1, float("nan")], [float("inf"), 0.0]])
def test_best_worst_rejects_empty_or_non_finite_rewards(rewards):
    with pytest.raises(ValueError):
        best_worst(rewards)


def test_online_pair_is_best_and_worst_response():
    assert build_online_pair(["a", "b", "c"], [0.2, 1.5, -0.7], keep_ties=False) == (("b", "c", 1.5, -0.7), False)


def test_online_pair_tie_is_reported_and_dropped_or_kept_by_config():
    assert build_online_pair(["a", "b", "c"], [1.0, 1.0, 1.0], keep_ties=False) == (None, True)
    assert build_online_pair(["a", "b", "c"], [1.0, 1.0, 1.0], keep_ties=True) == (("a", "c", 1.0, 1.0), True)


def test_online_pair_needs_one_reward_per_response():
    with pytest.raises(ValueError, match="one reward per response"):
        build_online_pair(["a", "b"], [1.0], keep_ties=False)


def test_selm_pair_ranks_samples_together_with_offline_responses():
    # Offline chosen beats every sample; the worst sample is below the offline rejected.
    pair = build_selm_pair(["a", "b"], [0.5, -2.0], "off_w", "off_l", 1.0, -1.0, keep_ties=False)
    assert pair == (("off_w", "b", 1.0, -2.0), False)
    # A sample beats the offline chosen; offline rejected is the worst.
    assert build_selm_pair(["a", "b"], [3.0, 0.0], "off_w", "off_l", 1.0, -1.0, keep_ties=False) == \
        (("a", "off_l", 3.0, -1.0), False)


def test_selm_tie_over_all_responses_is_reported_and_dropped_or_keeps_offline_pair():
    assert build_selm_pair(["a", "b"], [0.0, 0.0], "w", "l", 0.0, 0.0, keep_ties=False) == (None, True)
    assert build_selm_pair(["a", "b"], [0.0, 0.0], "w", "l", 0.0, 0.0, keep_ties=True) == (("w", "l", 0.0, 0.0), True)


@pytest.mark.parametrize("keep_ties", [False, True])
def test_selm_samples_that_tie_beside_unequal_offline_rewards_are_no_tie(keep_ties):
    # The K samples agree, but the pool of K + 2 does not: a pair, and no tie to count.
    pair = build_selm_pair(["a", "b", "c"], [0.5, 0.5, 0.5], "w", "l", 0.9, 0.1, keep_ties=keep_ties)
    assert pair == (("w", "l", 0.9, 0.1), False)
    assert build_selm_pair(["a", "b"], [0.5, 0.5], "w", "l", 0.5, 0.1, keep_ties=keep_ties) == (("a", "l", 0.5, 0.1), False)
