"""The Llama-style GPTModel builder and its SDPA core attention; through MegatronPolicy, the
Megatron paths the GPU recipes take, run here on CPU (models.cpu_compat): bf16 mixed precision,
full activation recomputation, the distributed optimizer at DP=2 and its checkpoints.

The DP=2 tests launch this file as its own worker (the `__main__` block) on 2 ranks.
"""
import sys
from pathlib import Path

import pytest
import torch

import megatron.core.utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.cpu_compat import TORCH_ON_CPU
from metaapo_nemo.models.gpt import SDPACoreAttention, build_gpt_model, transformer_config
from tests.helpers import run_ranks

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=96)


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture
def attentions(monkeypatch):
    """(ours, megatron's local DotProductAttention) for 4 query heads over 2 key/value groups."""
    # The reference's score buffer comes from megatron.core.utils' global memory buffer, which
    # allocates on CUDA; our code never uses it, so only this test points it at the CPU.
    monkeypatch.setattr(megatron.core.utils, "torch", TORCH_ON_CPU)
    config = transformer_config(CFG)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def _qkv(sq, sk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, 2, 4, 16, generator=gen), torch.randn(sk, 2, 2, 16, generator=gen),
            torch.randn(sk, 2, 2, 16, generator=gen))


def test_sdpa_without_mask_equals_local_attention_with_causal_mask(attentions):
    ours, reference = attentions
    q, k, v = _qkv(7, 7)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # megatron: True = masked
    out = ours(q, k, v, None)
    assert out.shape == (7, 2, 64)
    assert (out - reference(q, k, v, causal)).abs().max() <= 1e-5


def test_sdpa_applies_an_explicit_megatron_mask_like_local_attention(attentions):
    ours, reference = attentions
    q, k, v = _qkv(6, 6, seed=1)
    # causal plus left padding of 2 keys on the second row; every query keeps one key.
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(2, 1, 6, 6).clone()
    mask[1, :, 2:, :2] = True
    assert (ours(q, k, v, mask) - reference(q, k, v, mask)).abs().max() <= 1e-5


def test_sdpa_aligns_fewer_queries_to_the_last_keys(attentions):
    """Decoding with a KV cache: 3 new queries attend to 7 keys, the queries being the last 3."""
    ours, reference = attentions
    q, k, v = _qkv(3, 7, seed=2)
    bottom_right_causal = torch.ones(3, 7, dtype=torch.bool).triu(7 - 3 + 1)
    assert (ours(q, k, v, None) - reference(q, k, v, bottom_right_causal)).abs().max() <= 1e-5


def test_bf16_attention_on_the_cpu_is_the_fp32_attention_of_the_same_inputs(attentions):
    """torch's CPU flash kernel runs bf16 5-14x slower than fp32 at our sizes: SDPACoreAttention
    attends in fp32 there. Its bf16 output is the fp32 attention of the bf16 inputs, rounded once
    (bit for bit: the same kernel on the same values), and gradients come back in bf16."""
    ours, _ = attentions
    q, k, v = (t.to(torch.bfloat16).requires_grad_() for t in _qkv(7, 7, seed=3))
    out = ours(q, k, v, None)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, ours(q.float(), k.float(), v.float(), None).to(torch.bfloat16))
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == torch.bfloat16
    assert q.grad.abs().sum() > 0


def test_built_model_has_llama_layout_and_sdpa_attention():
    model = build_gpt_model(CFG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 96, 64)  # [gate; up]
    assert shapes["output_layer.weight"] == (97, 64)
    assert not any(k.endswith("bias") for k in shapes)
    assert isinstance(model.decoder.layers[1].self_attention.core_attention, SDPACoreAttention)
    tied = build_gpt_model(ModelConfig(**{**CFG.to_dict(), "tie_word_embeddings": True, "qkv_bias": True}))
    names = {k for k in tied.state_dict() if not k.endswith("_extra_state")}
    assert "output_layer.weight" not in names
    biases = {k for k in names if k.endswith("bias")}
    assert biases == {f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in (0, 1)}


def test_bf16_model_gives_bf16_parameters():
    model = build_gpt_model(CFG, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_layout_that_does_not_divide_is_refused_with_what_to_change():
    bad = ModelConfig(**{**CFG.to_dict(), "num_query_groups": 3})
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by num_query_groups 3"):
        build_gpt_model(bad)


# --- Megatron mixed precision, activation recomputation and the distributed optimizer, through
# MegatronPolicy.train_step ---

ITEMS = [([1, 5, 9, 12], [4, 6, 2]), ([1, 7], [8, 9, 10, 11, 2]), ([1, 44, 3], [30, 2]), ([1, 2, 3, 4, 5], [6])]


def _nll(items, logp, ntok):
    loss = -logp.sum()
    return loss, {"loss": loss.item()}


def _policy(**kwargs):
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    torch.manual_seed(0)
    policy = MegatronPolicy(CFG, None, pad_id=0, optim=OptimConfig(lr=1e-3, clip_grad=0.0), **kwargs)
    with torch.no_grad():  # wider than the 0.02-std init, so the loss and gradients depend on every weight
        for p in policy.model.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())).to(p.dtype))
    policy.optimizer.reload_model_params()  # the main weights (bf16) follow
    return policy


def _lipschitz_adam(policy):
    """The distributed optimizer takes Adam only (distrib_optimizer.py l.516). Adam's step
    lr * m / (sqrt(v) + eps) with eps = 1 moves a weight by at most lr / eps per unit of gradient
    difference, so two runs whose gradients differ by rounding stay rounding apart (with eps = 1e-8
    a near-zero gradient element's rounding flips an lr-sized step)."""
    for group in policy.optimizer.param_groups:
        group["eps"] = 1.0
    return policy


def _step(policy):
    from metaapo_nemo.data.batching import collate

    return policy.train_step(ITEMS, lambda seqs: collate(seqs, 0), _nll, micro_batch_size=2)


@pytest.mark.parametrize("method, layers, recomputed", [("uniform", 1, 2), ("block", 1, 1), ("uniform", 2, 2)])
def test_full_recompute_gives_the_same_loss_and_main_grads(method, layers, recomputed):
    kept, recomputing = _policy(), _policy(recompute_granularity="full", recompute_method=method,
                                           recompute_num_layers=layers)
    calls = []  # one entry per decoder-layer forward
    for policy in (kept, recomputing):
        for layer in policy.model.decoder.layers:
            layer.register_forward_hook(lambda *args: calls.append(1))
    a = _step(kept)
    assert len(calls) == 2 * 2  # 2 layers x 2 micro-batches
    calls.clear()
    b = _step(recomputing)
    assert len(calls) == (2 + recomputed) * 2  # the recomputed layers run again in the backward pass
    # The same operations on the same numbers, once more in the backward pass: equal to fp32 rounding.
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    for (name, p), q in zip(kept.model.named_parameters(), recomputing.model.parameters()):
        assert torch.allclose(p.main_grad, q.main_grad, rtol=1e-5, atol=1e-7), name


def test_bf16_mixed_precision_keeps_fp32_main_weights_and_grads_and_tracks_fp32():
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    mixed = _policy(precision="bf16")
    assert {p.dtype for p in mixed.model.parameters()} == {torch.bfloat16}
    assert (mixed.column_multiple, _policy().column_multiple) == (32, 1)  # bf16 on the CPU: widths padded
    inner = mixed.optimizer.chained_optimizers[0]
    assert isinstance(inner, Float16OptimizerWithFloat16Params)
    masters = [m for group in inner.fp32_from_float16_groups for m in group]
    assert masters and {m.dtype for m in masters} == {torch.float32}
    before = [m.detach().clone() for m in masters]

    # fp32 on the same (bf16-representable) weights: only the arithmetic's precision differs.
    single = _policy()
    with torch.no_grad():
        for p, q in zip(single.model.parameters(), mixed.model.parameters()):
            p.copy_(q.float())
    a, b = _step(single), _step(mixed)
    # bf16 keeps 8 significant bits (unit roundoff u = 2^-9 = 0.2%); the log-probs are sums of fp32
    # log-softmaxes over bf16 activations, so their relative error stays within a few u (loss 2.5 u,
    # grad norm 5 u here; measured 3e-5 and 1e-4), while a wrong gradient or a missed scale would be
    # off by factors.
    assert abs(a["loss"] - b["loss"]) <= 0.005 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 0.01 * a["grad_norm"]

    model_params = [p for group in inner.float16_groups for p in group]
    for p, w0, w1 in zip(model_params, before, masters):
        g = p.main_grad
        assert g.dtype == torch.float32
        # Adam's first step (bias-corrected, no weight decay): w -= lr * g / (|g| + eps), on the fp32 weights.
        expected = w0.double() - 1e-3 * g.double() / (g.double().abs() + 1e-8)
        assert torch.allclose(w1.double(), expected, rtol=0, atol=2e-7)
        assert not torch.equal(w1, w0)
        assert torch.equal(p, w1.to(torch.bfloat16))  # the bf16 weights are the rounded fp32 ones


def _optimizer_state(policy) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's fp32 main weight and Adam moments, flattened, under its Megatron name: the
    plain optimizer holds them whole; the distributed one holds a slice per data-parallel rank,
    gathered here (collective)."""
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    from metaapo_nemo.distributed import all_gather_objects

    inner = policy.optimizer.chained_optimizers[0]
    names = {p: name for name, p in policy.model.named_parameters()}
    if not isinstance(inner, DistributedOptimizer):
        return {names[p]: {"param": p.main_param.flatten(), **{k: v.flatten() for k, v in inner.optimizer.state[
            p.main_param].items() if k != "step"}} for group in inner.float16_groups for p in group}
    mine = []
    for p in inner.model_param_gbuf_map:
        shard = inner._get_main_param_and_optimizer_states(p)
        where = inner._get_model_param_range_map(p)["param"]
        mine.append((names[p], where.start, where.end, {k: v.clone() for k, v in shard.items() if k != "step"}))
    full = {}
    for name, start, end, shard in (s for rank in all_gather_objects(mine) for s in rank):
        numel = dict(policy.model.named_parameters())[name].numel()
        for key, value in shard.items():
            full.setdefault(name, {}).setdefault(key, torch.full((numel,), float("nan")))[start:end] = value
    return full


def _main_weights_held(policy) -> int:
    inner = policy.optimizer.chained_optimizers[0]
    return sum(m.numel() for group in inner.shard_fp32_from_float16_groups for m in group)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """2 ranks, DP=2, distributed optimizer: the directory with their checkpoint, and what `_worker` recorded."""
    directory = tmp_path_factory.mktemp("dp2")
    run_ranks(2, __file__, str(directory), timeout=120)
    return directory, torch.load(directory / "out.pt", weights_only=True)


def test_distributed_optimizer_at_dp2_steps_like_the_plain_optimizer_on_one_rank(two_ranks):
    _, out = two_ranks
    plain = _lipschitz_adam(_policy())
    initial = {k: v.clone() for k, v in plain.model.named_parameters()}
    losses = [_step(plain)["loss"] for _ in range(2)]
    # The same sums in another order (one micro-batch per rank and a reduce-scatter instead of two
    # micro-batches): rounding, ~1e-7 of each value, carried by Lipschitz steps.
    assert out["losses"] == pytest.approx(losses, rel=1e-6)
    for name, p in plain.model.named_parameters():
        moved = (p - initial[name]).abs().max()
        assert moved > 0, name
        assert (out["weights"][name] - p).abs().max() <= 1e-4 * moved, name


def test_distributed_optimizer_at_dp2_holds_half_of_the_main_weights_on_each_rank(two_ranks):
    _, out = two_ranks
    total = sum(p.numel() for p in _policy(precision="bf16").model.parameters())
    held = out["main_weights_held"]
    assert sum(held) == total  # each main weight on exactly one rank
    assert all(0.45 * total <= n <= 0.55 * total for n in held), held


def test_bf16_checkpoint_of_the_dp2_distributed_optimizer_loads_exactly_on_one_rank(two_ranks):
    directory, out = two_ranks
    loaded = _policy(precision="bf16", distributed_optimizer=True)
    loaded.load_checkpoint(directory / "two_ranks")
    state = _optimizer_state(loaded)
    assert state.keys() == out["saved"].keys()
    for name, tensors in out["saved"].items():
        assert tensors.keys() == {"param", "exp_avg", "exp_avg_sq"}
        for key, value in tensors.items():
            assert torch.equal(state[name][key], value), (name, key)
        weight = dict(loaded.model.named_parameters())[name]
        assert torch.equal(weight.flatten(), tensors["param"].to(torch.bfloat16)), name
    assert _step(loaded)["loss"] == pytest.approx(out["loss_of_next_step"], rel=1e-5)  # and it trains on


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _worker(directory: Path) -> None:
    from metaapo_nemo.distributed import all_gather_objects, barrier, data_parallel_size, init_distributed, world_rank

    torch.set_num_threads(1)
    init_distributed()
    assert data_parallel_size() == 2
    sharded = _lipschitz_adam(_policy(distributed_optimizer=True))
    out = {"losses": [_step(sharded)["loss"] for _ in range(2)],
           "weights": {k: v.detach().clone() for k, v in sharded.model.named_parameters()}}
    mixed = _policy(precision="bf16", distributed_optimizer=True)
    out["main_weights_held"] = all_gather_objects(_main_weights_held(mixed))
    _step(mixed), _step(mixed)
    if world_rank() == 0:
        (directory / "two_ranks").mkdir()
    barrier()
    mixed.save_checkpoint(directory / "two_ranks")
    out["saved"] = _optimizer_state(mixed)
    out["loss_of_next_step"] = _step(mixed)["loss"]
    if world_rank() == 0:
        torch.save(out, directory / "out.pt")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    _worker(Path(sys.argv[1]))
