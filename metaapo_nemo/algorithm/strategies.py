"""MetaAPO, its baselines and its ablations as settings of one loop (METAAPO.md's table).

A Strategy says who gets online samples (sampling), how the offline and online pair are weighted
in Eq. 5 (weighting), how the online pair is built (pairs), the preference objective, whether
unselected offline pairs are trained too, and whether h_phi is trained (Eq. 6).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import Tensor

from metaapo_nemo.algorithm.meta_learner import MetaLearner
from metaapo_nemo.algorithm.objectives import OBJECTIVE_NAMES

SAMPLING = ("meta", "all", "none", "random", "threshold", "adpo")
WEIGHTING = ("meta", "offline_only", "online_only", "both", "uniform", "fixed_sigmoid")
PAIRS = ("online", "selm")


@dataclass(frozen=True)
class Strategy:
    """One row of the comparison table.

    sampling: who gets online samples, see select_for_sampling.
    weighting: the Eq. 5 weights (w_off, w_on), see loss_weights.
    pairs: online = best/worst of the K samples; selm = best/worst of the K samples plus the
        offline chosen and rejected.
    objective: dpo, cdpo, ipo or simpo.
    train_unselected_offline: also train the offline pairs of unselected prompts, with weights
        (1, 0) (paper C.5 "w/ All Offline Samples").
    meta_learner_trained: take Eq. 6 steps on h_phi every T_meta optimiser steps.
    """

    sampling: str
    weighting: str
    pairs: str
    objective: str
    train_unselected_offline: bool = False
    meta_learner_trained: bool = True

    def __post_init__(self) -> None:
        for field, value, valid in (
            ("sampling", self.sampling, SAMPLING),
            ("weighting", self.weighting, WEIGHTING),
            ("pairs", self.pairs, PAIRS),
            ("objective", self.objective, OBJECTIVE_NAMES),
        ):
            if value not in valid:
                raise ValueError(f"Strategy.{field}={value!r} is not one of {', '.join(valid)}")
        if self.meta_learner_trained and self.weighting == "fixed_sigmoid":
            raise ValueError("weighting='fixed_sigmoid' replaces h_phi: set meta_learner_trained=False")

    # What the loop asks of a strategy, answered here so that a new row is one line of STRATEGIES.
    @property
    def needs_offline_score(self) -> bool:
        """The sampling decision needs the policy's offline scores (l_off, L_off) of the slice."""
        return self.sampling in ("meta", "threshold", "adpo")

    @property
    def needs_offline_weight(self) -> bool:
        """w = offline_weight(...) at the decision: for u > w (meta sampling, whatever the Eq. 5
        weighting: the uniform-weighting ablation still samples by h_phi), or to log it."""
        return self.sampling == "meta" or self.weighting in ("meta", "fixed_sigmoid")

    @property
    def trains_offline_pairs(self) -> bool:
        """Training batches carry the offline pairs (their loss has a non-zero weight somewhere)."""
        return self.weighting != "online_only" or self.train_unselected_offline


_METAAPO = Strategy(sampling="meta", weighting="meta", pairs="online", objective="dpo")
_OFFLINE = Strategy(
    sampling="none", weighting="offline_only", pairs="online", objective="dpo", meta_learner_trained=False
)

STRATEGIES: dict[str, Strategy] = {
    "metaapo": _METAAPO,
    "dpo": _OFFLINE,
    "cdpo": replace(_OFFLINE, objective="cdpo"),
    "ipo": replace(_OFFLINE, objective="ipo"),
    "simpo": replace(_OFFLINE, objective="simpo"),
    "online_dpo": Strategy("all", "online_only", "online", "dpo", meta_learner_trained=False),
    "selm": Strategy("all", "online_only", "selm", "dpo", meta_learner_trained=False),
    "adpo": Strategy("adpo", "both", "online", "dpo", meta_learner_trained=False),
    "metaapo_random_sampling": replace(_METAAPO, sampling="random"),
    "metaapo_threshold_sampling": replace(_METAAPO, sampling="threshold"),
    "metaapo_all_sampling": replace(_METAAPO, sampling="all"),
    "metaapo_uniform_weighting": replace(_METAAPO, weighting="uniform"),
    "metaapo_no_meta_learner": replace(_METAAPO, weighting="fixed_sigmoid", meta_learner_trained=False),
    "metaapo_all_offline": replace(_METAAPO, train_unselected_offline=True),
}

# The offline baselines are named after their objective; any other objective would rename them.
_NAMED_BY_OBJECTIVE = set(OBJECTIVE_NAMES)


def resolve_strategy(name: str, objective: str | None = None) -> Strategy:
    """The Strategy of algo.name; objective (e.g. simpo for MetaAPO-SimPO) replaces its objective."""
    if name not in STRATEGIES:
        raise ValueError(f"unknown algo.name {name!r}: valid names are {', '.join(STRATEGIES)}")
    strategy = STRATEGIES[name]
    if objective is None or objective == strategy.objective:
        return strategy
    if name in _NAMED_BY_OBJECTIVE:
        raise ValueError(
            f"algo.name={name!r} is the offline {name} baseline: use algo.name={objective!r} "
            f"for offline {objective}, or leave the objective unset"
        )
    return replace(strategy, objective=objective)


def offline_weight(strategy: Strategy, meta: MetaLearner | None, score_off: Tensor) -> Tensor:
    """The weight w of the offline pair, detached: h_phi(l_off), or sigmoid(l_off) for the
    w/o-meta-learner ablation. It drives sampling (u > w) and the Eq. 5 weights (w, 1 - w)."""
    if strategy.weighting == "fixed_sigmoid":
        return torch.sigmoid(score_off.detach().float())
    if meta is None:
        raise ValueError(f"strategy {strategy} needs the meta-learner's weights: pass a MetaLearner")
    return meta.weights(score_off)


def select_for_sampling(
    strategy: Strategy,
    w: Tensor | None,
    u: Tensor,
    score_off: Tensor | None,
    loss_off: Tensor | None,
    threshold: float | None,
) -> Tensor:
    """Which prompts get online samples (BoolTensor [N], on u's device).

    meta: u > w (Section 4.1; w from offline_weight). all / none: every / no prompt.
    random: u > 0.5, half of the prompts with the same seeded draws (ablation "random sampling").
    threshold: score_off < threshold (ablation "threshold sampling": poorly aligned pairs).
    adpo: loss_off < threshold, as the paper describes ADPO (Appendix B.3: offline samples whose
    preference loss falls below a fixed threshold get online augmentation).
    """

    def need(tensor: Tensor | None, what: str) -> Tensor:
        if tensor is None:
            raise ValueError(f"sampling={strategy.sampling!r} needs {what}")
        if tensor.shape != u.shape:
            raise ValueError(f"{what} has shape {tuple(tensor.shape)} but u has {tuple(u.shape)}")
        return tensor.detach().to(u.device)

    def need_threshold() -> float:
        if threshold is None:
            raise ValueError(f"sampling={strategy.sampling!r} needs a threshold: set algo.threshold")
        return threshold

    if strategy.sampling == "meta":
        return u > need(w, "the meta weights w").to(u.dtype)
    if strategy.sampling == "all":
        return torch.ones(u.shape, dtype=torch.bool, device=u.device)
    if strategy.sampling == "none":
        return torch.zeros(u.shape, dtype=torch.bool, device=u.device)
    if strategy.sampling == "random":
        return u > 0.5
    if strategy.sampling == "threshold":
        return need(score_off, "the offline scores") < need_threshold()
    return need(loss_off, "the offline losses") < need_threshold()


def loss_weights(strategy: Strategy, meta: MetaLearner | None, score_off: Tensor) -> tuple[Tensor, Tensor]:
    """The Eq. 5 weights (w_off, w_on), float32 on score_off's device, computed without grad.

    meta / fixed_sigmoid: (w, 1 - w) with w = offline_weight; offline_only: (1, 0);
    online_only: (0, 1); both: (1, 1) (ADPO); uniform: (0.5, 0.5).
    """
    with torch.no_grad():
        if strategy.weighting in ("meta", "fixed_sigmoid"):
            w = offline_weight(strategy, meta, score_off).float()
            return w, 1.0 - w
        w_off, w_on = {
            "offline_only": (1.0, 0.0),
            "online_only": (0.0, 1.0),
            "both": (1.0, 1.0),
            "uniform": (0.5, 0.5),
        }[strategy.weighting]
        return (
            torch.full(score_off.shape, w_off, dtype=torch.float32, device=score_off.device),
            torch.full(score_off.shape, w_on, dtype=torch.float32, device=score_off.device),
        )
