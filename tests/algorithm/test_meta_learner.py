import math

import pytest
import torch

from metaapo_nemo.algorithm.meta_learner import (
    MetaBuffer,
    MetaLearner,
    make_meta_optimizer,
    meta_loss,
    meta_update,
)
from metaapo_nemo.algorithm.objectives import Objective, PairLogps, meta_weighted_loss
from metaapo_nemo.algorithm.strategies import loss_weights, resolve_strategy


def untrained_h(s):
    return 1.0 / (1.0 + math.exp(-10.0 * math.tanh(0.1 * s)))


def test_meta_learner_is_1_100_1_mlp_with_reference_init():
    meta = MetaLearner()
    shapes = {name: tuple(p.shape) for name, p in meta.named_parameters()}
    assert shapes == {
        "net.0.weight": (100, 1),
        "net.0.bias": (100,),
        "net.2.weight": (1, 100),
        "net.2.bias": (1,),
    }
    for name, p in meta.named_parameters():
        assert torch.all(p == (0.0 if name.endswith("bias") else 0.1)), name
    assert [type(m).__name__ for m in meta.net] == ["Linear", "Tanh", "Linear", "Sigmoid"]


def test_untrained_meta_learner_is_sigmoid_of_10_tanh_of_tenth_score():
    scores = [-20.0, -5.0, -0.693, -0.05, 0.0, 0.5]
    w = MetaLearner()(torch.tensor(scores))
    assert w.tolist() == pytest.approx([untrained_h(s) for s in scores], rel=1e-5)
    assert w[2].item() == pytest.approx(0.3336, abs=1e-4)  # policy == reference: log sigmoid(0)
    assert w[4].item() == pytest.approx(0.5)


def test_weights_are_detached_and_match_forward():
    meta = MetaLearner()
    scores = torch.tensor([-1.0, -0.1], requires_grad=True)
    w = meta.weights(scores)
    assert not w.requires_grad
    assert torch.equal(w, meta(scores).detach())


def test_forward_rejects_non_vector_scores():
    with pytest.raises(ValueError, match=r"shape \[N\]"):
        MetaLearner()(torch.zeros(3, 1))


def test_meta_optimizer_is_adamw_with_paper_hyperparameters():
    opt = make_meta_optimizer(MetaLearner())
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["lr"] == 5e-3 and opt.defaults["weight_decay"] == 1e-4


def _perturbed_meta(seed=0):
    # Away from the symmetric init so that per-unit gradients differ.
    meta = MetaLearner().double()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in meta.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return meta


def _per_sample_grad_of_h(meta, scores):
    grads = []
    for s in scores:
        h = meta(s.reshape(1)).squeeze()
        grads.append(torch.cat([g.flatten() for g in torch.autograd.grad(h, list(meta.parameters()))]))
    return torch.stack(grads)  # [N, P]


def _flat_grad(loss, meta):
    return torch.cat([g.flatten() for g in torch.autograd.grad(loss, list(meta.parameters()))])


def test_meta_loss_gradient_is_loss_gap_times_grad_h_eq7():
    meta = _perturbed_meta()
    gen = torch.Generator().manual_seed(1)
    score_off = -torch.rand(6, generator=gen, dtype=torch.float64) * 3
    loss_off = torch.rand(6, generator=gen, dtype=torch.float64)
    loss_on = torch.rand(6, generator=gen, dtype=torch.float64)
    grad = _flat_grad(meta_loss(meta, score_off, loss_off, loss_on), meta)
    expected = ((loss_off - loss_on)[:, None] * _per_sample_grad_of_h(meta, score_off)).mean(0)
    torch.testing.assert_close(grad, expected)


def test_meta_gradient_is_score_gap_times_grad_h_for_dpo_with_beta_s_equal_beta():
    objective = Objective("dpo", beta=0.1, beta_s=0.1)
    gen = torch.Generator().manual_seed(2)

    def pairs():
        return PairLogps(*(-torch.rand(5, generator=gen, dtype=torch.float64) * 50 for _ in range(4)))

    off, on = pairs(), pairs()
    score_off, score_on = objective.score(off), objective.score(on)
    meta = _perturbed_meta(3)
    grad = _flat_grad(meta_loss(meta, score_off, objective.loss(off), objective.loss(on)), meta)
    expected = ((score_on - score_off)[:, None] * _per_sample_grad_of_h(meta, score_off)).mean(0)
    torch.testing.assert_close(grad, expected)


def test_meta_loss_sends_no_gradient_to_its_inputs():
    score_off = torch.tensor([-0.5, -1.0], requires_grad=True)
    loss_off = torch.tensor([0.7, 0.2], requires_grad=True)
    loss_on = torch.tensor([0.3, 0.9], requires_grad=True)
    meta_loss(MetaLearner(), score_off, loss_off, loss_on).backward()
    assert score_off.grad is None and loss_off.grad is None and loss_on.grad is None


def test_policy_loss_eq5_trains_policy_logps_but_never_phi():
    meta = MetaLearner()
    objective = Objective("dpo")
    gen = torch.Generator().manual_seed(4)

    def pairs():
        policy = [(-30 * torch.rand(4, generator=gen)).requires_grad_() for _ in range(2)]
        reference = [-30 * torch.rand(4, generator=gen) for _ in range(2)]
        return PairLogps(*policy, *reference)

    off, on = pairs(), pairs()
    w_off, w_on = loss_weights(resolve_strategy("metaapo"), meta, objective.score(off))
    meta_weighted_loss(w_off, w_on, objective.loss(off), objective.loss(on)).backward()
    for name, p in meta.named_parameters():
        assert p.grad is None, name
    for logp in (off.policy_chosen, off.policy_rejected, on.policy_chosen, on.policy_rejected):
        assert logp.grad is not None and logp.grad.abs().sum() > 0


def test_buffer_collects_steps_detached_on_cpu_and_clears():
    buffer = MetaBuffer()
    score = torch.tensor([-0.1, -0.2], requires_grad=True)
    buffer.add(score, torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    buffer.add(torch.tensor([-0.3]), torch.tensor([5.0]), torch.tensor([6.0]))
    assert len(buffer) == 3 and buffer.num_steps == 2
    score_off, loss_off, loss_on = buffer.tensors()
    assert score_off.tolist() == pytest.approx([-0.1, -0.2, -0.3])
    assert loss_off.tolist() == [1.0, 2.0, 5.0] and loss_on.tolist() == [3.0, 4.0, 6.0]
    assert not score_off.requires_grad and score_off.device.type == "cpu"
    buffer.clear()
    assert len(buffer) == 0 and buffer.num_steps == 0
    assert all(t.numel() == 0 for t in buffer.tensors())


def test_buffer_state_dict_round_trips():
    buffer = MetaBuffer()
    buffer.add(torch.tensor([-0.1, -0.2]), torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0]))
    buffer.add(torch.tensor([-0.3]), torch.tensor([5.0]), torch.tensor([6.0]))
    restored = MetaBuffer()
    restored.load_state_dict(buffer.state_dict())
    assert len(restored) == 3 and restored.num_steps == 2
    for a, b in zip(restored.tensors(), buffer.tensors()):
        assert torch.equal(a, b)
    empty = MetaBuffer()
    empty.load_state_dict(MetaBuffer().state_dict())
    assert len(empty) == 0 and empty.num_steps == 0


def test_buffer_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        MetaBuffer().add(torch.zeros(2), torch.zeros(2), torch.zeros(3))


@pytest.mark.parametrize(("online_better", "direction"), [(True, -1.0), (False, 1.0)])
def test_meta_update_moves_h_by_the_sign_rule_and_clears_buffer(online_better, direction):
    meta = MetaLearner()
    optimizer = make_meta_optimizer(meta)
    scores = torch.tensor([-2.0, -0.7, -0.1])
    good, bad = torch.full((3,), 0.2), torch.full((3,), 0.9)
    buffer = MetaBuffer()
    if online_better:
        buffer.add(scores, bad, good)
    else:
        buffer.add(scores, good, bad)
    before = meta.weights(scores)
    expected_loss = meta_loss(meta, scores, *buffer.tensors()[1:]).item()
    stats = meta_update(meta, optimizer, buffer)
    after = meta.weights(scores)
    assert torch.all(direction * (after - before) > 0)
    assert len(buffer) == 0 and buffer.num_steps == 0
    assert stats["meta_loss"] == pytest.approx(expected_loss)
    assert stats["meta_buffer_pairs"] == 3
    assert stats["meta_weight_mean"] == pytest.approx(after.mean().item())
    assert all(p.grad is None for p in meta.parameters())


def test_meta_update_on_empty_buffer_says_what_to_do():
    meta = MetaLearner()
    with pytest.raises(ValueError, match="empty meta buffer"):
        meta_update(meta, make_meta_optimizer(meta), MetaBuffer())
