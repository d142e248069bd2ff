"""The Llama-style GPTModel builder and its SDPA core attention."""
import pytest
import torch

import megatron.core.utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.cpu_compat import TORCH_ON_CPU
from metaapo_nemo.models.gpt import SDPACoreAttention, build_gpt_model, transformer_config

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


# --- Megatron mixed precision and activation recomputation, through MegatronPolicy.train_step ---

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
    return policy


def _step(policy):
    from metaapo_nemo.data.batching import collate

    return policy.train_step(ITEMS, lambda seqs: collate(seqs, 0), _nll, micro_batch_size=2)


@pytest.fixture
def cpu_rng_state_for_recompute(monkeypatch):
    """Megatron's recompute saves and restores the CUDA generator's state (tensor_parallel.random), which
    a CPU-only torch does not have; our models draw no random numbers in the forward pass (no dropout),
    so on the CPU that state is empty. Run time refuses recompute without CUDA (launch.plan.require_gpus)."""
    from megatron.core.tensor_parallel import random

    monkeypatch.setattr(random, "_get_cuda_rng_state", lambda *args, **kwargs: None)
    monkeypatch.setattr(random, "_set_cuda_rng_state", lambda *args, **kwargs: None)
    units = []  # one entry per recomputed unit's forward
    forward = random.CheckpointFunction.forward
    monkeypatch.setattr(random.CheckpointFunction, "forward",
                        staticmethod(lambda ctx, *args: units.append(1) or forward(ctx, *args)))
    return units


@pytest.mark.parametrize("method, layers, units", [("uniform", 1, 2), ("block", 1, 1), ("uniform", 2, 1)])
def test_full_recompute_gives_the_same_loss_and_gradients(cpu_rng_state_for_recompute, method, layers, units):
    kept, recomputed = _policy(), _policy(recompute_granularity="full", recompute_method=method,
                                          recompute_num_layers=layers)
    a = _step(kept)
    assert not cpu_rng_state_for_recompute
    b = _step(recomputed)
    assert len(cpu_rng_state_for_recompute) == units * 2  # recompute units per micro-batch x 2 micro-batches
    # The same operations on the same numbers, once more in the backward pass: equal to fp32 rounding.
    assert abs(a["loss"] - b["loss"]) <= 1e-5 * abs(a["loss"])
    assert abs(a["grad_norm"] - b["grad_norm"]) <= 1e-5 * a["grad_norm"]
    for (name, p), q in zip(kept.model.named_parameters(), recomputed.model.parameters()):
        assert torch.allclose(p.main_grad, q.main_grad, rtol=1e-5, atol=1e-7), name


@pytest.fixture
def cuda_type_names(monkeypatch):
    """Megatron's mixed-precision and distributed optimizers accept a parameter only if its type()
    reads torch.cuda.{BFloat16,Float}Tensor; this lets CPU tensors of those dtypes pass, so the CUDA
    code path (bf16 weights, fp32 main grads and main weights) runs here. Not a run-time patch: on CPU
    runs use bf16 autocast."""
    real = torch.Tensor.type
    names = {torch.bfloat16: "torch.cuda.BFloat16Tensor", torch.float32: "torch.cuda.FloatTensor"}

    def type_(self, *args, **kwargs):
        if args or kwargs or self.dtype not in names:
            return real(self, *args, **kwargs)
        return names[self.dtype]

    monkeypatch.setattr(torch.Tensor, "type", type_)


def test_bf16_mixed_precision_keeps_fp32_main_weights_and_grads_and_tracks_fp32(cuda_type_names):
    from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params

    mixed = _policy(precision="bf16")
    assert {p.dtype for p in mixed.model.parameters()} == {torch.bfloat16}
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
        assert torch.equal(p, w1.to(torch.bfloat16))  # the bf16 weights are the rounded fp32 ones


def test_distributed_optimizer_on_one_rank_steps_like_the_mixed_precision_optimizer(cuda_type_names):
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    plain, sharded = _policy(precision="bf16"), _policy(precision="bf16", distributed_optimizer=True)
    assert isinstance(sharded.optimizer.chained_optimizers[0], DistributedOptimizer)
    for _ in range(2):
        a, b = _step(plain), _step(sharded)
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
    for p, q in zip(plain.model.parameters(), sharded.model.parameters()):
        assert torch.equal(p, q)
