"""What a run measures about itself besides the held-out reward: whether the meta-learner's steps
changed any sampling decision, the final policy's win rate against the starting one, and which
unsampled prompts the potential online gain (paper Figure 2, middle) is measured on."""

from __future__ import annotations

import torch
from torch import Tensor

from metaapo_nemo.algorithm.meta_learner import MetaLearner


def untrained_meta_learner() -> MetaLearner:
    """A fresh h_phi (the reference-code init, the same whatever the seed). Built with the global
    RNG forked: nn.Linear draws its own init before ours replaces it, and the run's random stream
    must not depend on whether this diagnostic ran."""
    with torch.random.fork_rng(devices=[]):
        return MetaLearner()


def changed_decisions(u: Tensor, w: Tensor, w_untrained: Tensor) -> int:
    """How many prompts' sampling decisions (u > w, Section 4.1) the trained weights w flip
    relative to the untrained weights w_untrained, with the same draws u."""
    if not u.shape == w.shape == w_untrained.shape:
        raise ValueError(f"u, w and w_untrained need one shape, got {tuple(u.shape)}, {tuple(w.shape)}, "
                         f"{tuple(w_untrained.shape)}")
    u = u.double()
    return int(((u > w.to(u)) != (u > w_untrained.to(u))).sum())


def win_rate(final: list[float], start: list[float]) -> float:
    """Share of held-out prompts where the final policy's mean reward beats the starting
    policy's, ties counting half (the lists are per prompt, in one prompt order)."""
    if len(final) != len(start) or not final:
        raise ValueError(f"win_rate needs two equally long, non-empty per-prompt lists, got {len(final)} and {len(start)}")
    return sum(1.0 if f > s else 0.5 if f == s else 0.0 for f, s in zip(final, start)) / len(final)


def probe_order(u: Tensor, selected: list[bool], limit: int) -> list[int]:
    """Indices of up to `limit` unsampled prompts, lowest draw u first: the seeded draws make the
    choice the same on every rank and in a resumed run, and u does not depend on the offline score."""
    unsampled = [i for i, sel in enumerate(selected) if not sel]
    return sorted(unsampled, key=lambda i: (float(u[i]), i))[:max(0, limit)]
