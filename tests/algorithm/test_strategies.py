import math

import pytest
import torch

from metaapo_nemo.algorithm.meta_learner import MetaLearner
from metaapo_nemo.algorithm.strategies import (
    STRATEGIES,
    Strategy,
    TrainItem,
    loss_weights,
    offline_weight,
    resolve_strategy,
    select_for_sampling,
    train_items,
)

# name: (sampling, weighting, pairs, objective, train_unselected_offline, meta_learner_trained)
TABLE = {
    "metaapo": ("meta", "meta", "online", "dpo", False, True),
    "dpo": ("none", "offline_only", "online", "dpo", False, False),
    "cdpo": ("none", "offline_only", "online", "cdpo", False, False),
    "ipo": ("none", "offline_only", "online", "ipo", False, False),
    "simpo": ("none", "offline_only", "online", "simpo", False, False),
    "online_dpo": ("all", "online_only", "online", "dpo", False, False),
    "selm": ("all", "online_only", "selm", "dpo", False, False),
    "adpo": ("adpo", "both", "online", "dpo", False, False),
    "metaapo_random_sampling": ("random", "meta", "online", "dpo", False, True),
    "metaapo_threshold_sampling": ("threshold", "meta", "online", "dpo", False, True),
    "metaapo_all_sampling": ("all", "meta", "online", "dpo", False, True),
    "metaapo_uniform_weighting": ("meta", "uniform", "online", "dpo", False, True),
    "metaapo_no_meta_learner": ("meta", "fixed_sigmoid", "online", "dpo", False, False),
    "metaapo_all_offline": ("meta", "meta", "online", "dpo", True, True),
    "online_dpo_random_subset": ("random", "online_only", "online", "dpo", False, False),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_each_named_strategy_matches_the_papers_table(name):
    assert resolve_strategy(name) == Strategy(*TABLE[name])


def test_every_registered_strategy_is_in_the_table():
    assert set(STRATEGIES) == set(TABLE)


def test_objective_override_changes_only_the_objective():
    assert resolve_strategy("metaapo", "simpo") == Strategy("meta", "meta", "online", "simpo")
    assert resolve_strategy("dpo", "dpo") == resolve_strategy("dpo")


def test_offline_baseline_named_by_another_objective_is_refused():
    with pytest.raises(ValueError, match="algo.name='ipo'"):
        resolve_strategy("dpo", "ipo")


def test_unknown_strategy_lists_valid_names():
    with pytest.raises(ValueError, match="metaapo, dpo, cdpo, ipo, simpo, online_dpo, selm, adpo"):
        resolve_strategy("ppo")


def test_invalid_strategy_settings_are_refused():
    with pytest.raises(ValueError, match="sampling='some'"):
        Strategy("some", "meta", "online", "dpo")
    with pytest.raises(ValueError, match="meta_learner_trained=False"):
        Strategy("meta", "fixed_sigmoid", "online", "dpo")


U = torch.tensor([0.9, 0.2, 0.6, 0.4], dtype=torch.float64)
W = torch.tensor([0.5, 0.1, 0.7, 0.3])
SCORE = torch.tensor([-0.05, -1.2, -0.4, -2.0])
LOSS = torch.tensor([0.05, 1.2, 0.4, 2.0])


@pytest.mark.parametrize(
    ("name", "threshold", "expected"),
    [
        ("metaapo", None, [True, True, False, True]),  # u > w
        ("online_dpo", None, [True, True, True, True]),
        ("dpo", None, [False, False, False, False]),
        ("metaapo_random_sampling", None, [True, False, True, False]),  # u > 0.5
        ("online_dpo_random_subset", None, [True, False, True, False]),
        ("metaapo_threshold_sampling", -0.3, [False, True, True, True]),  # score < -0.3
        ("adpo", 0.5, [True, False, True, False]),  # offline loss < 0.5
    ],
)
def test_select_for_sampling(name, threshold, expected):
    selected = select_for_sampling(resolve_strategy(name), W, U, SCORE, LOSS, threshold, 0.5)
    assert selected.dtype == torch.bool and selected.tolist() == expected


@pytest.mark.parametrize(
    ("ratio", "expected"),
    [(0.25, [True, False, False, False]), (0.7, [True, False, True, True]), (1.0, [True, True, True, True])],
)
def test_random_sampling_sends_random_ratio_of_prompts_by_the_same_draws(ratio, expected):
    # u = 0.9, 0.2, 0.6, 0.4: selected iff u > 1 - ratio
    for name in ("metaapo_random_sampling", "online_dpo_random_subset"):
        assert select_for_sampling(resolve_strategy(name), W, U, SCORE, LOSS, None, ratio).tolist() == expected


def test_threshold_sampling_without_threshold_says_which_setting():
    with pytest.raises(ValueError, match="algo.threshold"):
        select_for_sampling(resolve_strategy("adpo"), None, U, None, LOSS, None, 0.5)


def test_meta_sampling_without_weights_is_refused():
    with pytest.raises(ValueError, match="meta weights"):
        select_for_sampling(resolve_strategy("metaapo"), None, U, SCORE, LOSS, None, 0.5)


@pytest.mark.parametrize(
    ("name", "w_off", "w_on"),
    [
        ("dpo", 1.0, 0.0),
        ("online_dpo", 0.0, 1.0),
        ("selm", 0.0, 1.0),
        ("adpo", 1.0, 1.0),
        ("metaapo_uniform_weighting", 0.5, 0.5),
    ],
)
def test_constant_loss_weights(name, w_off, w_on):
    got_off, got_on = loss_weights(resolve_strategy(name), MetaLearner(), SCORE)
    assert got_off.tolist() == [w_off] * 4 and got_on.tolist() == [w_on] * 4


def test_meta_loss_weights_are_h_and_one_minus_h_without_grad():
    meta = MetaLearner()
    score = SCORE.clone().requires_grad_()
    w_off, w_on = loss_weights(resolve_strategy("metaapo"), meta, score)
    expected = [1 / (1 + math.exp(-10 * math.tanh(0.1 * s))) for s in SCORE.tolist()]
    assert w_off.tolist() == pytest.approx(expected, rel=1e-5)
    assert (w_off + w_on).tolist() == pytest.approx([1.0] * 4)
    assert not w_off.requires_grad and not w_on.requires_grad


def test_no_meta_learner_ablation_weights_and_samples_by_sigmoid_of_score():
    strategy = resolve_strategy("metaapo_no_meta_learner")
    w = offline_weight(strategy, None, SCORE)
    expected = [1 / (1 + math.exp(-s)) for s in SCORE.tolist()]
    assert w.tolist() == pytest.approx(expected, rel=1e-6)
    w_off, w_on = loss_weights(strategy, None, SCORE)
    assert w_off.tolist() == pytest.approx(expected, rel=1e-6)
    assert w_on.tolist() == pytest.approx([1 - e for e in expected], rel=1e-6)
    assert select_for_sampling(strategy, w, U, SCORE, LOSS, None, 0.5).tolist() == (U > w.double()).tolist()


def test_uniform_weighting_ablation_still_samples_by_meta_learner():
    meta = MetaLearner()
    strategy = resolve_strategy("metaapo_uniform_weighting")
    assert torch.equal(offline_weight(strategy, meta, SCORE), meta.weights(SCORE))


def test_meta_weights_without_meta_learner_are_refused():
    with pytest.raises(ValueError, match="pass a MetaLearner"):
        loss_weights(resolve_strategy("metaapo"), None, SCORE)


# Five prompts: 0 and 3 selected with an online pair, 1 selected but its K rewards tied (no online
# pair), 2 and 4 not selected.
SELECTED = [True, True, False, True, False]
HAS_ONLINE = [True, False, False, True, False]
PAIRED = [TrainItem(0, 0, offline_only=False), TrainItem(3, 1, offline_only=False)]


@pytest.mark.parametrize("name", ["metaapo", "metaapo_uniform_weighting", "metaapo_no_meta_learner", "adpo",
                                  "metaapo_random_sampling", "metaapo_threshold_sampling", "metaapo_all_sampling"])
def test_a_selected_prompt_whose_samples_tied_trains_its_offline_pair_with_its_eq5_weight(name):
    # offline_only=False: the Eq. 5 offline weight (w, 0.5, or ADPO's 1); no online pair, so no online term.
    assert train_items(resolve_strategy(name), SELECTED, HAS_ONLINE) == [*PAIRED, TrainItem(1, None, offline_only=False)]


def test_under_all_offline_samples_a_tied_prompt_trains_with_weight_one_like_the_unselected():
    items = train_items(resolve_strategy("metaapo_all_offline"), SELECTED, HAS_ONLINE)
    assert items == [*PAIRED, *(TrainItem(i, None, offline_only=True) for i in (1, 2, 4))]


@pytest.mark.parametrize("name", ["online_dpo", "selm", "online_dpo_random_subset"])
def test_online_only_strategies_train_online_pairs_alone(name):
    assert train_items(resolve_strategy(name), SELECTED, HAS_ONLINE) == PAIRED


def test_offline_baselines_train_every_offline_pair_with_weight_one():
    items = train_items(resolve_strategy("dpo"), [False] * 3, [False] * 3)
    assert items == [TrainItem(i, None, offline_only=True) for i in range(3)]


def test_train_items_need_one_online_flag_per_prompt():
    with pytest.raises(ValueError, match="one per prompt"):
        train_items(resolve_strategy("metaapo"), SELECTED, HAS_ONLINE[:-1])
