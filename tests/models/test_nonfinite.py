"""A NaN or inf in a loss or a gradient never reaches the weights: train_step skips the optimiser
step on every rank, reports skipped=True, and leaves no trace (weights, Adam moments, step counts,
learning-rate schedule), so the next finite step is the one a run without the bad step takes.

The two-rank test launches this file as its own worker (the `__main__` block)."""
import math

import pytest
import torch

from metaapo_nemo.data.batching import collate
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
from tests.helpers import run_ranks

CFG = ModelConfig(vocab_size=64, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=48)
SEQUENCES = [([1, 5, 9], [4, 6, 2]), ([1, 7], [8, 9, 10, 2])]
LAYOUTS = [dict(precision="fp32"), dict(precision="bf16"), dict(precision="fp32", distributed_optimizer=True),
           dict(precision="bf16", distributed_optimizer=True)]


def _policy(**kwargs):
    torch.manual_seed(0)
    # Warm-up makes the lr depend on the step count: a skip that advanced the schedule would show.
    return MegatronPolicy(CFG, None, pad_id=0, optim=OptimConfig(lr=1e-2, warmup_steps=3, clip_grad=0.5), **kwargs)


def _nll(idx, logp, ntok):
    loss = -logp.sum()
    return loss, {"loss": float(loss)}


def _nan_loss_on(bad_item, *, grads_too: bool):
    """A loss that is NaN on the micro-batch holding `bad_item`: NaN gradients as well (grads_too),
    or only the reported value (a NaN added as a constant leaves every gradient finite)."""
    def loss_fn(idx, logp, ntok):
        loss = -logp.sum()
        if bad_item in idx:
            loss = loss * math.nan if grads_too else loss + math.nan
        return loss, {"loss": float(loss)}
    return loss_fn


def _step(policy, loss_fn=_nll, items=(0, 1)):
    return policy.train_step(list(items), lambda idx: collate([SEQUENCES[i] for i in idx], 0), loss_fn,
                             micro_batch_size=1)


def _snapshot(policy):
    """The model's weights and every optimizer tensor (main weights, Adam moments and step counts)."""
    optimizers = [opt.optimizer for opt in policy.optimizer.chained_optimizers]
    mains = [(opt, p) for opt in optimizers for group in opt.param_groups for p in group["params"]]
    state = [t for opt, p in mains for t in opt.state.get(p, {}).values()]
    return [t.detach().clone() for t in [*policy.model.parameters(), *(p for _, p in mains), *state]]


def _identical(a, b):
    return len(a) == len(b) and all(x.dtype == y.dtype and torch.equal(x, y) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def _parallel_state():
    init_distributed()


@pytest.mark.usefixtures("_parallel_state")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(str(v) for v in d.values()))
@pytest.mark.parametrize("grads_too", [True, False], ids=["nan-grads", "nan-loss-only"])
def test_a_nan_loss_skips_the_step_and_the_next_step_is_as_if_it_never_happened(layout, grads_too):
    policy = _policy(**layout)
    _step(policy)  # Adam has moments and a step count to keep
    before, lr_before = _snapshot(policy), policy.optimizer.param_groups[0]["lr"]
    bad = _step(policy, _nan_loss_on(1, grads_too=grads_too))
    assert bad["skipped"] is True
    assert math.isnan(bad["loss"])  # as the loss_fn measured it
    assert math.isnan(bad["grad_norm"]) == grads_too
    assert _identical(_snapshot(policy), before)
    assert policy.steps_since_reset == 1
    assert all(p.main_grad.abs().sum() == 0 for p in policy.model.parameters())  # zeroed

    good = _step(policy)
    assert good["skipped"] is False and math.isfinite(good["grad_norm"]) and good["lr"] > lr_before
    assert all(not torch.equal(p, q) for p, q in zip(policy.model.parameters(), before))
    clean = _policy(**layout)
    _step(clean), _step(clean)
    assert _identical(_snapshot(policy), _snapshot(clean))


@pytest.mark.usefixtures("_parallel_state")
@pytest.mark.parametrize("layout", LAYOUTS[:2], ids=lambda d: d["precision"])
def test_an_inf_gradient_under_a_finite_loss_skips_the_step(layout):
    policy = _policy(**layout)
    before = _snapshot(policy)
    weight = policy.model.decoder.layers[0].mlp.linear_fc1.weight

    def inf_in_one_entry(grad):
        grad = grad.clone()
        grad.view(-1)[0] = math.inf
        return grad
    hook = weight.register_hook(inf_in_one_entry)
    stats = _step(policy)
    hook.remove()
    assert stats["skipped"] is True
    assert math.isfinite(stats["loss"]) and stats["grad_norm"] == math.inf
    assert _identical(_snapshot(policy), before)
    assert _step(policy)["skipped"] is False


@pytest.mark.usefixtures("_parallel_state")
@pytest.mark.parametrize("layout", LAYOUTS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_a_finite_step_clips_and_steps_as_megatrons_own_optimizer_step(monkeypatch, layout):
    policy, reference = _policy(**layout), _policy(**layout)

    def megatron_step(grad_norm):
        reference.optimizer.step()  # prepares the grads and takes their norm a second time
        reference.steps_since_reset += 1
    monkeypatch.setattr(reference, "_clip_and_step", megatron_step)
    for _ in range(2):
        stats, expected = _step(policy), _step(reference)
        assert stats["grad_norm"] == expected["grad_norm"] > 0.5  # clipped
    assert _identical(_snapshot(policy), _snapshot(reference))


def test_one_ranks_nan_or_inf_makes_every_rank_skip_under_data_tensor_and_pipeline_parallelism():
    run = run_ranks(2, __file__, timeout=240)
    assert run.stdout.count("every rank skipped") == 2


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _gathered(tensors):
    from metaapo_nemo.distributed import all_gather_objects

    return all_gather_objects([t.float() for t in tensors])


def _data_parallel_checks(grads_too):
    """DP = 2: rank r takes item r, so only rank 1's micro-batch is NaN."""
    policy = _policy(precision="bf16", distributed_optimizer=grads_too)
    _step(policy)
    before = _snapshot(policy)
    bad = _step(policy, _nan_loss_on(1, grads_too=grads_too))
    assert bad["skipped"] is True and math.isnan(bad["loss"])
    assert _identical(_snapshot(policy), before)
    weights = _gathered(policy.model.parameters())
    assert _identical(weights[0], weights[1])  # and so the replicas still agree
    assert _step(policy)["skipped"] is False
    weights = _gathered(policy.model.parameters())
    assert _identical(weights[0], weights[1])


def _model_parallel_checks(inf_grad_here: bool):
    """TP = 2 or PP = 2: an inf in one rank's gradient (its shard, or its stage's layer), the other
    rank's finite; then a NaN loss with finite gradients, which under PP only the last stage sees."""
    policy = _policy(precision="fp32")
    before = _snapshot(policy)
    hook = policy.model.decoder.layers[0].mlp.linear_fc1.weight.register_hook(
        lambda grad: grad * math.inf if inf_grad_here else grad)
    bad = _step(policy)
    hook.remove()
    assert bad["skipped"] is True and math.isfinite(bad["loss"])
    bad = _step(policy, _nan_loss_on(1, grads_too=False))
    assert bad["skipped"] is True and math.isfinite(bad["grad_norm"])
    assert _identical(_snapshot(policy), before)
    assert _step(policy)["skipped"] is False


def _worker():
    import torch.distributed as dist
    from megatron.core import parallel_state

    from metaapo_nemo.distributed import destroy_distributed

    torch.set_num_threads(1)
    init_distributed()
    _data_parallel_checks(grads_too=True)
    _data_parallel_checks(grads_too=False)
    init_distributed(tensor_model_parallel_size=2)
    _model_parallel_checks(inf_grad_here=parallel_state.get_tensor_model_parallel_rank() == 1)
    init_distributed(pipeline_model_parallel_size=2)
    _model_parallel_checks(inf_grad_here=parallel_state.is_pipeline_first_stage())
    print(f"rank {dist.get_rank()}: every rank skipped", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    _worker()
