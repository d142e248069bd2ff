import pytest
import torch

from metaapo_nemo.algorithm.sampling import uniform_draws

IDS = list(range(40)) + [f"prompt-{i}" for i in range(40)]


def test_draws_are_float64_in_unit_interval_and_roughly_uniform():
    u = uniform_draws(seed=0, iteration=0, sample_ids=range(2000))
    assert u.dtype == torch.float64 and u.shape == (2000,)
    assert torch.all((u >= 0) & (u < 1))
    assert u.mean().item() == pytest.approx(0.5, abs=0.03)
    assert (u > 0.334).float().mean().item() == pytest.approx(0.666, abs=0.04)


def test_draws_repeat_exactly_across_reruns():
    assert torch.equal(uniform_draws(3, 1, IDS), uniform_draws(3, 1, IDS))


def test_string_ids_use_a_stable_hash_not_the_salted_builtin():
    # Pinned values: Python's hash() of a str changes with PYTHONHASHSEED between processes.
    assert uniform_draws(1, 0, ["prompt-a", 7]).tolist() == [0.6613561405908732, 0.38909102460769385]


def test_draws_follow_ids_under_a_permutation():
    u = uniform_draws(3, 1, IDS)
    order = torch.randperm(len(IDS), generator=torch.Generator().manual_seed(0)).tolist()
    assert torch.equal(uniform_draws(3, 1, [IDS[i] for i in order]), u[order])


def test_draws_do_not_depend_on_how_ids_are_sharded_across_ranks():
    u = uniform_draws(3, 1, IDS)
    rank0, rank1 = IDS[0::2], IDS[1::2]
    assert torch.equal(uniform_draws(3, 1, rank0), u[0::2])
    assert torch.equal(uniform_draws(3, 1, rank1), u[1::2])


def test_different_seed_or_iteration_give_different_draws():
    base = uniform_draws(3, 1, IDS)
    for other in (uniform_draws(4, 1, IDS), uniform_draws(3, 2, IDS)):
        assert (other != base).float().mean().item() > 0.95


def test_integer_and_string_forms_of_an_id_draw_differently():
    u = uniform_draws(0, 0, [5, "5"])
    assert u[0] != u[1]


def test_numpy_and_tensor_integer_ids_match_python_ints():
    import numpy as np

    u = uniform_draws(0, 0, [1, 2])
    assert torch.equal(uniform_draws(0, 0, np.array([1, 2])), u)
    assert torch.equal(uniform_draws(0, 0, torch.tensor([1, 2])), u)


@pytest.mark.parametrize(("ids", "error"), [([-1], ValueError), ([True], TypeError), ([1.5], TypeError)])
def test_bad_ids_are_rejected(ids, error):
    with pytest.raises(error, match="sample ids|>= 0"):
        uniform_draws(0, 0, ids)
