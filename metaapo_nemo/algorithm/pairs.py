"""Online preference pairs from reward-model scores (MetaAPO paper Section 4.1, SELM baseline).

The K sampled responses of a prompt become one pair: the best by reward is chosen, the worst is
rejected. When every reward of the pool a pair is built from is equal (the K samples; for SELM
the K samples and the offline chosen and rejected) the reward model expresses no preference: that
is a tie, which the builders report for the caller to count, and drop or keep (keep_ties).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

OnlinePair = tuple[str, str, float, float]
"""(chosen, rejected, chosen_reward, rejected_reward)."""


def best_worst(rewards: Sequence[float]) -> tuple[int, int] | None:
    """(index of the highest reward, index of the lowest), or None when all rewards are equal.

    Among equal maxima (minima) the lowest index wins, so the pair is deterministic.
    """
    if len(rewards) == 0:
        raise ValueError("best_worst needs at least one reward, got none")
    bad = [r for r in rewards if not math.isfinite(r)]
    if bad:
        raise ValueError(f"rewards must be finite numbers, got {bad[:3]}: check the reward model's output")
    best = max(range(len(rewards)), key=lambda i: (rewards[i], -i))
    worst = min(range(len(rewards)), key=lambda i: (rewards[i], i))
    if rewards[best] == rewards[worst]:
        return None
    return best, worst


def _check_lengths(responses: Sequence[str], rewards: Sequence[float]) -> None:
    if len(responses) != len(rewards):
        raise ValueError(
            f"got {len(responses)} responses but {len(rewards)} rewards: need one reward per response"
        )


def build_online_pair(
    responses: Sequence[str], rewards: Sequence[float], keep_ties: bool
) -> tuple[OnlinePair | None, bool]:
    """(pair, tie): best and worst of the K sampled responses (Online DPO / MetaAPO pairs).

    A tie (all K rewards equal) gives None, or with keep_ties the pair (responses[0],
    responses[-1]), which carries no preference signal beyond keeping the prompt in the training set.
    """
    _check_lengths(responses, rewards)
    indices = best_worst(rewards)
    tie = indices is None
    if tie:
        if not keep_ties:
            return None, tie
        indices = (0, len(responses) - 1)
    chosen, rejected = indices
    return (responses[chosen], responses[rejected], float(rewards[chosen]), float(rewards[rejected])), tie


def build_selm_pair(
    responses: Sequence[str],
    rewards: Sequence[float],
    offline_chosen: str,
    offline_rejected: str,
    reward_chosen: float,
    reward_rejected: float,
    keep_ties: bool,
) -> tuple[OnlinePair | None, bool]:
    """(pair, tie): SELM pair, best and worst by reward over the K samples plus the offline chosen
    and rejected.

    Only a tie over all K + 2 responses is a tie (tied samples beside an offline pair of unequal
    rewards still make a pair); it gives None, or with keep_ties the offline pair itself (its
    human label is the only preference left).
    """
    _check_lengths(responses, rewards)
    pool = [*responses, offline_chosen, offline_rejected]
    pool_rewards = [*rewards, reward_chosen, reward_rejected]
    indices = best_worst(pool_rewards)
    tie = indices is None
    if tie:
        if not keep_ties:
            return None, tie
        indices = (len(pool) - 2, len(pool) - 1)
    chosen, rejected = indices
    return (pool[chosen], pool[rejected], float(pool_rewards[chosen]), float(pool_rewards[rejected])), tie
