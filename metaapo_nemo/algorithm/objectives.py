"""Preference scores and per-pair preference losses (MetaAPO paper Eq. 4, Eq. 5, Eq. A.9).

Every function here takes sequence log-probs that the policy/reference already summed over the
response tokens and returns one value per pair (tensors [N]); reductions happen only in
`meta_weighted_loss`, the paper's Eq. 5.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor

OBJECTIVE_NAMES = ("dpo", "cdpo", "ipo", "simpo")


@dataclass
class PairLogps:
    """The sequence log-probs of N preference pairs.

    policy_*/ref_*: log pi(y|x) summed over the response tokens (prompt masked), tensors [N].
    ref_* may be None for SimPO, which needs no reference model.
    chosen_tokens/rejected_tokens: response token counts [N], used only by SimPO's
    length-normalised mean log-prob.
    """

    policy_chosen: Tensor
    policy_rejected: Tensor
    ref_chosen: Tensor | None = None
    ref_rejected: Tensor | None = None
    chosen_tokens: Tensor | None = None
    rejected_tokens: Tensor | None = None


def dpo_margin(logps: PairLogps) -> Tensor:
    """Implicit reward margin m = [log pi(y_w) - log ref(y_w)] - [log pi(y_l) - log ref(y_l)]."""
    if logps.ref_chosen is None or logps.ref_rejected is None:
        raise ValueError(
            "dpo_margin needs the reference log-probs: fill PairLogps.ref_chosen and "
            "PairLogps.ref_rejected (only SimPO runs without a reference model)"
        )
    return (logps.policy_chosen - logps.ref_chosen) - (logps.policy_rejected - logps.ref_rejected)


def simpo_margin(logps: PairLogps, beta_simpo: float = 2.5, gamma: float = 0.6) -> Tensor:
    """SimPO margin (Eq. A.9): beta_simpo * (mean_logp(y_w) - mean_logp(y_l)) - gamma."""
    if logps.chosen_tokens is None or logps.rejected_tokens is None:
        raise ValueError(
            "simpo_margin needs the response lengths: fill PairLogps.chosen_tokens and "
            "PairLogps.rejected_tokens (token counts of the chosen/rejected responses)"
        )
    # An empty response has log-prob sum 0; dividing by 1 keeps its mean at 0 instead of NaN.
    mean_chosen = logps.policy_chosen / logps.chosen_tokens.clamp_min(1)
    mean_rejected = logps.policy_rejected / logps.rejected_tokens.clamp_min(1)
    return beta_simpo * (mean_chosen - mean_rejected) - gamma


def preference_score(margin: Tensor, beta_s: float = 1.0) -> Tensor:
    """Preference score l = log sigmoid(beta_s * m) (Eq. 4), the meta-learner's input."""
    return F.logsigmoid(beta_s * margin)


def dpo_loss(margin: Tensor, beta: float, label_smoothing: float = 0.0) -> Tensor:
    """Per-pair DPO loss -log sigmoid(beta m); label_smoothing eps > 0 gives conservative DPO:
    -(1 - eps) log sigmoid(beta m) - eps log sigmoid(-beta m)."""
    loss = -F.logsigmoid(beta * margin)
    if label_smoothing == 0.0:
        return loss
    return (1.0 - label_smoothing) * loss - label_smoothing * F.logsigmoid(-beta * margin)


def ipo_loss(margin: Tensor, beta: float) -> Tensor:
    """Per-pair IPO loss (m - 1/(2 beta))^2."""
    return (margin - 1.0 / (2.0 * beta)) ** 2


def simpo_loss(simpo_margin: Tensor) -> Tensor:
    """Per-pair SimPO loss -log sigmoid(m_simpo); beta_simpo and gamma are inside the margin."""
    return -F.logsigmoid(simpo_margin)


def _require_positive(name: str, value: float) -> None:
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"Objective.{name} must be a finite number > 0, got {value!r}")


@dataclass
class Objective:
    """The preference objective L_pref of Eq. 5 and the score l of Eq. 4, from one config.

    name: dpo, cdpo (DPO with label smoothing), ipo or simpo.
    beta: DPO/cDPO/IPO temperature (paper 0.1).
    beta_s: scale inside the preference score log sigmoid(beta_s * m) (reference code: 1).
    label_smoothing: cDPO's eps in (0, 0.5); must be 0 for the other objectives.
    simpo_beta, simpo_gamma: SimPO's beta and target margin (paper 2.5 and 0.6).
    """

    name: str = "dpo"
    beta: float = 0.1
    beta_s: float = 1.0
    label_smoothing: float = 0.0
    simpo_beta: float = 2.5
    simpo_gamma: float = 0.6

    def __post_init__(self) -> None:
        if self.name not in OBJECTIVE_NAMES:
            raise ValueError(
                f"unknown objective {self.name!r}: set algo.objective to one of {', '.join(OBJECTIVE_NAMES)}"
            )
        _require_positive("beta", self.beta)
        _require_positive("beta_s", self.beta_s)
        _require_positive("simpo_beta", self.simpo_beta)
        if not (math.isfinite(self.simpo_gamma) and self.simpo_gamma >= 0):
            raise ValueError(f"Objective.simpo_gamma must be a finite number >= 0, got {self.simpo_gamma!r}")
        if self.name == "cdpo" and not 0.0 < self.label_smoothing < 0.5:
            raise ValueError(
                f"cdpo needs label_smoothing in (0, 0.5) (e.g. 0.1), got {self.label_smoothing!r}"
            )
        if self.name != "cdpo" and self.label_smoothing != 0.0:
            raise ValueError(
                f"label_smoothing={self.label_smoothing!r} only applies to cDPO: "
                f"set name='cdpo' or label_smoothing=0"
            )

    @property
    def needs_reference(self) -> bool:
        """Whether the objective needs reference-model log-probs (all but SimPO)."""
        return self.name != "simpo"

    def score(self, logps: PairLogps) -> Tensor:
        """The one preference score used for sampling, weighting and the meta buffer (Eq. 4):
        log sigmoid(beta_s * m) for DPO/cDPO/IPO, log sigmoid(m_simpo) for SimPO (Eq. A.9)."""
        if self.name == "simpo":
            return F.logsigmoid(simpo_margin(logps, self.simpo_beta, self.simpo_gamma))
        return preference_score(dpo_margin(logps), self.beta_s)

    def loss(self, logps: PairLogps) -> Tensor:
        """Per-pair preference loss L_pref [N], unreduced."""
        if self.name == "simpo":
            return simpo_loss(simpo_margin(logps, self.simpo_beta, self.simpo_gamma))
        if self.name == "ipo":
            return ipo_loss(dpo_margin(logps), self.beta)
        return dpo_loss(dpo_margin(logps), self.beta, self.label_smoothing)


def meta_weighted_loss(w_off: Tensor, w_on: Tensor, loss_off: Tensor, loss_on: Tensor) -> Tensor:
    """Eq. 5: mean_i [w_off_i * L_pref(off_i) + w_on_i * L_pref(on_i)], with w_on = 1 - w for MetaAPO.

    A plain mean over the N pairs, not normalised by the weights. A pair without an online pair
    carries loss_on = 0 (not NaN: 0 * NaN is NaN) and w_on = 0. The weights must come detached
    (MetaLearner.weights / strategies.loss_weights): Eq. 5 must not push gradients into phi.
    """
    if w_off.requires_grad or w_on.requires_grad:
        raise ValueError(
            "meta_weighted_loss got weights that require grad: compute them with "
            "MetaLearner.weights or strategies.loss_weights (no_grad), Eq. 5 does not train phi"
        )
    shapes = {tuple(t.shape) for t in (w_off, w_on, loss_off, loss_on)}
    if len(shapes) != 1:
        raise ValueError(
            f"meta_weighted_loss needs four tensors of one shape [N], got shapes "
            f"w_off {tuple(w_off.shape)}, w_on {tuple(w_on.shape)}, "
            f"loss_off {tuple(loss_off.shape)}, loss_on {tuple(loss_on.shape)}"
        )
    return (w_off * loss_off + w_on * loss_on).mean()
