"""The uniform draws u of adaptive online sampling (MetaAPO paper Section 4.1: sample iff u > w).

Each draw comes from its own generator seeded by (seed, iteration, sample id) alone, so a
prompt's decision is the same whatever the batch order, the shard it lands on, or the number of
data-parallel ranks.
"""

from __future__ import annotations

import hashlib
import operator
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

# Integer and string ids live in separate entropy streams, so id 5 and id "5" draw differently.
_INT_ID, _STR_ID = 0, 1


def _id_entropy(sample_id: int | str) -> tuple[int, int]:
    if isinstance(sample_id, str):
        # sha256, not hash(): Python salts str hashes per process, which would differ across ranks.
        return _STR_ID, int.from_bytes(hashlib.sha256(sample_id.encode("utf-8")).digest(), "big")
    if isinstance(sample_id, bool):
        raise TypeError(f"sample ids must be ints or strings, got the bool {sample_id!r}")
    try:
        key = operator.index(sample_id)
    except TypeError:
        raise TypeError(
            f"sample ids must be ints or strings, got {type(sample_id).__name__} {sample_id!r}"
        ) from None
    if key < 0:
        raise ValueError(f"integer sample ids must be >= 0, got {key}")
    return _INT_ID, key


def uniform_draws(seed: int, iteration: int, sample_ids: Sequence[int | str]) -> Tensor:
    """u_i ~ U[0, 1) for each sample id, from a generator seeded by (seed, iteration, id) only.

    Returns a float64 tensor [N] in the order of sample_ids.
    """
    if seed < 0 or iteration < 0:
        raise ValueError(f"seed and iteration must be >= 0, got seed={seed}, iteration={iteration}")
    draws = [
        np.random.default_rng([seed, iteration, *_id_entropy(sample_id)]).random() for sample_id in sample_ids
    ]
    return torch.tensor(draws, dtype=torch.float64)


def sample_seeds(seed: int, stream: int, sample_ids: Sequence[int | str]) -> list[int]:
    """One 63-bit generator seed per sample id, from (seed, stream, id) only: the rollout engine
    seeds each prompt's K samples with it, so the samples, like the decisions, do not depend on
    the batch or the rank a prompt lands on. `stream` separates uses (e.g. iteration, evaluation)."""
    if seed < 0 or stream < 0:
        raise ValueError(f"seed and stream must be >= 0, got seed={seed}, stream={stream}")
    return [int(np.random.default_rng([seed, stream, *_id_entropy(sample_id)]).integers(2**63 - 1))
            for sample_id in sample_ids]
