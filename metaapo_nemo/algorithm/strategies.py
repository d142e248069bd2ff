"""MetaAPO, its baselines and its ablations as settings of one loop (METAAPO.md's table).

A Strategy says who gets online samples (sampling), how the offline and online pair are weighted
in Eq. 5 (weighting), how the online pair is built (pairs), the preference objective, whether
unselected offline pairs are trained too, and whether h_phi is trained (Eq. 6).

An iteration's training set (train_items): every selected prompt with an online pair, trained on
both pairs with the Eq. 5 weights. A selected prompt without one (its K rewards tied and
algo.keep_ties=false) keeps its offline pair whenever the strategy trains offline pairs: with its
Eq. 5 offline weight and no online term (w for meta / fixed_sigmoid weighting, 0.5 uniform, 1 for
ADPO's both), or weight 1 under train_unselected_offline (C.5 trains every offline pair, and a pair
without an online partner gets 1 there); online_only strategies (online_dpo, selm) drop it. Having
no online loss, it never enters the meta buffer.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    meta_learner_trained: take Eq. 6 steps on h_phi every T_meta optimiser steps (and only then
        fill the meta buffer).
    A selected prompt whose K rewards tie keeps its offline pair as the module docstring says
    (train_items).
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
    # Online DPO on a random algo.random_ratio of the prompts: the control for MetaAPO's choice of
    # prompts (a benchmark sets random_ratio to MetaAPO's measured annotation ratio).
    "online_dpo_random_subset": Strategy("random", "online_only", "online", "dpo", meta_learner_trained=False),
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
    random_ratio: float,
) -> Tensor:
    """Which prompts get online samples (BoolTensor [N], on u's device).

    meta: u > w (Section 4.1; w from offline_weight). all / none: every / no prompt.
    random: u > 1 - random_ratio, that share of the prompts with the same seeded draws (ablation
    "random sampling" at 0.5; online_dpo_random_subset).
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
        return u > 1.0 - random_ratio
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


@dataclass(frozen=True)
class TrainItem:
    """One prompt of an iteration's training set."""

    example: int  # index into the iteration's slice
    on_slot: int | None  # index of its online pair among the iteration's online pairs, or None
    offline_only: bool  # its offline pair alone with weights (1, 0) (offline baselines, C.5 ablation)


def train_items(strategy: Strategy, selected: Sequence[bool], has_online: Sequence[bool]) -> list[TrainItem]:
    """An iteration's training set, by the rule of the module docstring: the prompts with an
    online pair first (on_slot k = the k-th of them in slice order, the order of their reference
    log-probs), then the offline pairs trained without one, in slice order. `selected[i]`: prompt i
    was sent for online samples; `has_online[i]`: it got an online pair (not a dropped tie)."""
    if len(selected) != len(has_online):
        raise ValueError(f"got {len(selected)} sampling decisions but {len(has_online)} online flags: need one per prompt")
    if strategy.weighting == "offline_only":
        return [TrainItem(i, None, offline_only=True) for i in range(len(selected))]
    paired = [bool(sel and on) for sel, on in zip(selected, has_online)]
    items = [TrainItem(i, k, offline_only=False) for k, i in enumerate(i for i, p in enumerate(paired) if p)]
    for i, sel in enumerate(selected):
        if paired[i]:
            continue
        if strategy.train_unselected_offline:
            items.append(TrainItem(i, None, offline_only=True))
        elif sel and strategy.trains_offline_pairs:  # a tie: its offline pair with its Eq. 5 weight
            items.append(TrainItem(i, None, offline_only=False))
    return items
