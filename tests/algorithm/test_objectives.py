import math

import pytest
import torch

from metaapo_nemo.algorithm.objectives import (
    Objective,
    PairLogps,
    dpo_loss,
    dpo_margin,
    ipo_loss,
    meta_weighted_loss,
    preference_score,
    simpo_loss,
    simpo_margin,
)


def t(*values):
    return torch.tensor(values, dtype=torch.float64)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


# One pair: policy gains +1 on the chosen and loses 1 on the rejected vs the reference: m = 2.
# Per-token means: chosen -20/10 = -2, rejected -30/10 = -3, so m_simpo = 2.5 * 1 - 0.6 = 1.9.
PAIR = PairLogps(
    policy_chosen=t(-20.0),
    policy_rejected=t(-30.0),
    ref_chosen=t(-21.0),
    ref_rejected=t(-29.0),
    chosen_tokens=t(10.0),
    rejected_tokens=t(10.0),
)


def test_dpo_margin_is_chosen_log_ratio_minus_rejected_log_ratio():
    assert dpo_margin(PAIR).tolist() == [2.0]


def test_dpo_margin_without_reference_names_the_missing_fields():
    with pytest.raises(ValueError, match="ref_chosen"):
        dpo_margin(PairLogps(policy_chosen=t(-1.0), policy_rejected=t(-2.0)))


def test_simpo_margin_uses_length_normalised_logps_with_defaults_2_5_and_0_6():
    assert simpo_margin(PAIR).item() == pytest.approx(1.9)
    assert simpo_margin(PAIR, beta_simpo=1.0, gamma=0.0).item() == pytest.approx(1.0)


def test_simpo_margin_of_an_empty_response_is_finite():
    logps = PairLogps(
        policy_chosen=t(0.0), policy_rejected=t(-3.0), chosen_tokens=t(0.0), rejected_tokens=t(3.0)
    )
    assert simpo_margin(logps).item() == pytest.approx(2.5 * (0.0 + 1.0) - 0.6)


def test_preference_score_is_log_sigmoid_of_scaled_margin():
    assert preference_score(t(2.0)).item() == pytest.approx(-0.12692801104297)
    assert preference_score(t(2.0), beta_s=0.1).item() == pytest.approx(log_sigmoid(0.2))
    assert preference_score(t(0.0)).item() == pytest.approx(-math.log(2.0))


def test_dpo_loss_values():
    assert dpo_loss(t(2.0), beta=0.1).item() == pytest.approx(0.5981388693815918)
    assert dpo_loss(t(0.0), beta=0.1).item() == pytest.approx(math.log(2.0))


def test_cdpo_loss_mixes_both_label_directions():
    # 0.9 * -logsig(0.2) + 0.1 * -logsig(-0.2) = 0.9 * 0.59814 + 0.1 * 0.79814
    assert dpo_loss(t(2.0), beta=0.1, label_smoothing=0.1).item() == pytest.approx(0.6181388693815918)


def test_ipo_loss_is_squared_distance_to_half_inverse_beta():
    assert ipo_loss(t(2.0), beta=0.1).item() == pytest.approx(9.0)  # (2 - 5)^2
    assert ipo_loss(t(5.0), beta=0.1).item() == pytest.approx(0.0)


def test_simpo_loss_is_negative_log_sigmoid_of_simpo_margin():
    assert simpo_loss(t(1.9)).item() == pytest.approx(0.1393867582829606)


def test_losses_are_per_pair_unreduced():
    margins = t(2.0, 0.0, -1.0)
    assert dpo_loss(margins, beta=0.1).shape == (3,)
    assert ipo_loss(margins, beta=0.1).tolist() == pytest.approx([9.0, 25.0, 36.0])


@pytest.mark.parametrize(
    ("objective", "score", "loss"),
    [
        (Objective("dpo"), log_sigmoid(2.0), 0.5981388693815918),
        (Objective("dpo", beta_s=0.1), log_sigmoid(0.2), 0.5981388693815918),
        (Objective("cdpo", label_smoothing=0.1), log_sigmoid(2.0), 0.6181388693815918),
        (Objective("ipo"), log_sigmoid(2.0), 9.0),
        (Objective("simpo"), log_sigmoid(1.9), 0.1393867582829606),
    ],
)
def test_objective_score_and_loss(objective, score, loss):
    assert objective.score(PAIR).item() == pytest.approx(score)
    assert objective.loss(PAIR).item() == pytest.approx(loss)


def test_simpo_objective_runs_without_reference_and_others_need_it():
    no_ref = PairLogps(
        policy_chosen=t(-20.0), policy_rejected=t(-30.0), chosen_tokens=t(10.0), rejected_tokens=t(10.0)
    )
    assert not Objective("simpo").needs_reference
    assert Objective("simpo").loss(no_ref).item() == pytest.approx(0.1393867582829606)
    for name, kwargs in (("dpo", {}), ("cdpo", {"label_smoothing": 0.1}), ("ipo", {})):
        assert Objective(name, **kwargs).needs_reference


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"name": "kto"}, "dpo, cdpo, ipo, simpo"),
        ({"beta": 0.0}, "beta must be"),
        ({"beta_s": -1.0}, "beta_s must be"),
        ({"name": "cdpo"}, r"label_smoothing in \(0, 0.5\)"),
        ({"name": "dpo", "label_smoothing": 0.1}, "name='cdpo'"),
        ({"name": "simpo", "simpo_gamma": -0.1}, "simpo_gamma"),
    ],
)
def test_objective_rejects_bad_config_saying_what_to_change(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Objective(**kwargs)


def test_meta_weighted_loss_is_plain_mean_of_weighted_pair_losses():
    # pair 1: 0.25 * 2 + 0.75 * 4 = 3.5; pair 2 (no online pair): 1 * 4 + 0 * 0 = 4 -> mean 3.75
    loss = meta_weighted_loss(t(0.25, 1.0), t(0.75, 0.0), t(2.0, 4.0), t(4.0, 0.0))
    assert loss.item() == pytest.approx(3.75)


def test_meta_weighted_loss_refuses_weights_that_carry_grad():
    w = torch.tensor([0.5], requires_grad=True)
    with pytest.raises(ValueError, match="no_grad"):
        meta_weighted_loss(w, 1 - w, torch.ones(1), torch.ones(1))


def test_meta_weighted_loss_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        meta_weighted_loss(torch.ones(2), torch.ones(2), torch.ones(2), torch.ones(3))
