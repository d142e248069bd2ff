"""Each CPU patch: the megatron path it serves fails without it and gives the right values with
it. (Patches only reachable with several ranks - p2p, TP logit gathering, tied embeddings
across pipeline stages - are exercised by test_parallel.py; distributed checkpoints across
layouts by test_checkpoint_reshard.py; bf16 mixed precision against fp32, recomputation against
none and the distributed optimizer at DP=2 by test_gpt.py.)"""
import pytest
import torch

import megatron.core.models.common.embeddings.rotary_pos_embedding as rotary_module
import megatron.core.utils
from megatron.core import dist_checkpointing, tensor_parallel
from megatron.core.dist_checkpointing.strategies import filesystem_async, state_dict_saver
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed import param_and_grad_buffer
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.models.common.language_module.language_module import LanguageModule
from megatron.core.optimizer import OptimizerConfig, clip_grads, get_megatron_optimizer
from megatron.core.optimizer import distrib_optimizer
from megatron.core.optimizer import optimizer as optimizer_module
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params
from megatron.core.pipeline_parallel import get_forward_backward_func, schedules

from metaapo_nemo.data.batching import collate
from metaapo_nemo import distributed
from metaapo_nemo.config import MetaAPOConfig
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models import cpu_compat
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.logprobs import sequence_logprobs
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

CFG = ModelConfig(vocab_size=61, hidden_size=32, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=48)
CUDA_MISSING = (AssertionError, RuntimeError)  # "Torch not compiled with CUDA enabled" & co.


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


def _batches():
    gen = torch.Generator().manual_seed(0)

    def rows():
        tokens = torch.randint(0, CFG.vocab_size, (2, 8), generator=gen).tolist()
        return [(tokens[0][:2], tokens[0][2:]), (tokens[1][:3], tokens[1][3:6])]
    return [collate(rows(), 0) for _ in range(2)]


def _forward_step(data_iterator, model):
    logp_sum, _ = sequence_logprobs(model, next(data_iterator))
    return logp_sum, lambda out: (-out.mean(), {"loss": -out.mean().detach()})


def _run_schedule(model, batches):
    return get_forward_backward_func()(
        forward_step_func=_forward_step, data_iterator=iter(batches), model=[model],
        num_microbatches=len(batches), seq_length=8, micro_batch_size=2, forward_only=False,
    )


def test_rotary_embedding_is_computed_on_cpu(monkeypatch):
    rope = RotaryEmbedding(kv_channels=8, rotary_percent=1.0, use_cpu_initialization=True)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2) / 8)
    freqs = torch.outer(torch.arange(5.0), inv_freq)
    assert torch.allclose(rope.get_emb(5)[:, 0, 0], torch.cat([freqs, freqs], dim=-1))
    monkeypatch.setattr(rotary_module, "torch", torch)
    with pytest.raises(CUDA_MISSING):
        rope.get_emb(5)


def test_no_pipelining_schedule_runs_and_averages_microbatch_losses(monkeypatch):
    model = build_gpt_model(CFG)
    batches = _batches()
    losses = [out["loss"] for out in _run_schedule(model, batches)]
    with torch.no_grad():
        expected = [-sequence_logprobs(model, b)[0].mean() for b in batches]
    assert torch.allclose(torch.stack(losses), torch.stack(expected))
    monkeypatch.setattr(schedules, "torch", torch)
    with pytest.raises(CUDA_MISSING):
        _run_schedule(model, batches)


def _megatron_training(clip_grad):
    model = build_gpt_model(CFG)
    initial = {k: v.clone() for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    ddp = DistributedDataParallel(model.config, DistributedDataParallelConfig(), model)
    model.config.finalize_model_grads_func = finalize_model_grads
    optimizer = get_megatron_optimizer(
        OptimizerConfig(optimizer="adam", lr=0.01, weight_decay=0.0, clip_grad=clip_grad), [ddp]
    )
    return model, initial, ddp, optimizer


def test_megatron_optimizer_step_equals_adamw_after_grad_clipping():
    model, initial, ddp, optimizer = _megatron_training(clip_grad=0.5)
    batches = _batches()
    _run_schedule(ddp, batches)
    _, grad_norm, _ = optimizer.step()

    reference = build_gpt_model(CFG)
    reference.load_state_dict(initial, strict=False)
    loss = sum(-sequence_logprobs(reference, b)[0].mean() for b in batches) / len(batches)
    loss.backward()
    reference_norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), 0.5)
    torch.optim.AdamW(reference.parameters(), lr=0.01, weight_decay=0.0).step()

    assert reference_norm > 0.5  # clipping really scaled the gradients
    assert grad_norm == pytest.approx(reference_norm.item(), rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6), name


@pytest.mark.parametrize("module, name, original", [
    (param_and_grad_buffer, "torch", torch),
    (optimizer_module, "torch", torch),
    (clip_grads, "torch", torch),
    (clip_grads, "l2_norm_impl", megatron.core.utils.local_multi_tensor_l2_norm),
    (optimizer_module, "clip_grad_by_total_norm_fp32", clip_grads.clip_grad_by_total_norm_fp32),
])
def test_megatron_training_step_needs_each_optimizer_patch(monkeypatch, module, name, original):
    monkeypatch.setattr(module, name, original)
    with pytest.raises(CUDA_MISSING):
        _, _, ddp, optimizer = _megatron_training(clip_grad=0.5)
        _run_schedule(ddp, _batches())
        optimizer.step()


def test_distributed_checkpoint_saves_and_loads_on_cpu(tmp_path):
    torch.manual_seed(0)
    model = build_gpt_model(CFG)
    dist_checkpointing.save(model.sharded_state_dict(), str(tmp_path))
    torch.manual_seed(1)
    other = build_gpt_model(CFG)
    other.load_state_dict(dist_checkpointing.load(other.sharded_state_dict(), str(tmp_path)))
    saved, loaded = model.state_dict(), other.state_dict()
    names = [k for k in saved if not k.endswith("_extra_state")]
    assert names and all(torch.equal(saved[k], loaded[k]) for k in names)


@pytest.mark.parametrize("module", [filesystem_async, state_dict_saver])
def test_distributed_checkpoint_save_needs_each_patch(monkeypatch, tmp_path, module):
    monkeypatch.setattr(module, "torch", torch)
    with pytest.raises(CUDA_MISSING):
        dist_checkpointing.save(build_gpt_model(CFG).sharded_state_dict(), str(tmp_path))


def _policy(**kwargs):
    torch.manual_seed(0)
    return MegatronPolicy(CFG, None, pad_id=0, optim=OptimConfig(lr=1e-2), **kwargs)


def _train_step(policy):
    sequences = [([1, 5, 9], [4, 6, 2]), ([1, 7], [8, 9, 10, 2])]
    return policy.train_step([0, 1], lambda idx: collate([sequences[i] for i in idx], 0),
                             lambda idx, logp, ntok: (-logp.sum(), {}), micro_batch_size=1)


@pytest.mark.parametrize("optimizer, kwargs", [
    (Float16OptimizerWithFloat16Params, dict(precision="bf16")),
    (DistributedOptimizer, dict(precision="bf16", distributed_optimizer=True)),
    (DistributedOptimizer, dict(distributed_optimizer=True)),
])
def test_mixed_precision_and_distributed_optimizers_take_cpu_parameters_by_their_cuda_type_names(
        monkeypatch, optimizer, kwargs):
    policy = _policy(**kwargs)
    assert type(policy.optimizer.chained_optimizers[0]) is optimizer
    before = [p.detach().clone() for p in policy.model.parameters()]
    _train_step(policy)
    assert all(not torch.equal(p, q) for p, q in zip(policy.model.parameters(), before))
    monkeypatch.setattr(optimizer, "__init__", optimizer.__init__.__wrapped__)
    with pytest.raises(TypeError, match="Wrapped parameters must be one of torch.cuda.FloatTensor"):
        _policy(**kwargs)


def test_full_recompute_runs_without_a_cuda_generator_state():
    with pytest.raises(CUDA_MISSING):
        torch.cuda.random.get_rng_state()  # what megatron's _get_cuda_rng_state calls
    assert tensor_parallel.random._get_cuda_rng_state is cpu_compat._no_cuda_rng_state
    policy = _policy(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    assert _train_step(policy)["grad_norm"] > 0  # same values as without recompute: test_gpt.py


def _adam_state(policy):
    inner = policy.optimizer.chained_optimizers[0]
    return [{k: v.clone() for k, v in inner.optimizer.state[p].items()} for p in inner.optimizer.param_groups[0]["params"]]


def _adam_groups(policy):
    return [g for chained in policy.optimizer.chained_optimizers for g in chained.optimizer.param_groups]


def test_adamw_runs_in_its_fused_kernel_with_the_same_steps_also_after_a_checkpoint_load(tmp_path):
    fused, plain = _policy(), _policy()
    assert all(g["fused"] for g in _adam_groups(fused))
    for group in _adam_groups(plain):  # torch's CPU default: one op per tensor
        group.update(fused=None, foreach=False)
    for _ in range(3):
        _train_step(fused), _train_step(plain)
    # The same arithmetic in another order: rounding-level differences (2e-7 measured), far below
    # one Adam step here (lr 1e-2).
    for p, q in zip(fused.model.parameters(), plain.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)
    plain.save_checkpoint(tmp_path)  # param groups saved with fused off
    loaded = _policy()
    loaded.load_checkpoint(tmp_path)
    assert all(g["fused"] for g in _adam_groups(loaded))
    _train_step(loaded), _train_step(plain)
    for p, q in zip(loaded.model.parameters(), plain.model.parameters()):
        assert torch.allclose(p, q, rtol=0, atol=1e-5)


def test_distributed_optimizer_checkpoint_saves_and_loads_into_a_fresh_optimizer(tmp_path):
    saved = _policy(precision="bf16", distributed_optimizer=True)
    _train_step(saved), _train_step(saved)
    saved.save_checkpoint(tmp_path)
    loaded = _policy(precision="bf16", distributed_optimizer=True)
    loaded.load_checkpoint(tmp_path)
    for a, b in zip(_adam_state(saved), _adam_state(loaded)):
        assert a.keys() == b.keys() == {"step", "exp_avg", "exp_avg_sq"}
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(torch.equal(p, q) for p, q in zip(saved.model.parameters(), loaded.model.parameters()))


def test_distributed_optimizer_checkpoint_before_the_first_step_is_the_fresh_adam_state(tmp_path):
    _policy(distributed_optimizer=True).save_checkpoint(tmp_path)
    loaded = _policy(distributed_optimizer=True)
    loaded.load_checkpoint(tmp_path)
    for state in _adam_state(loaded):  # what AdamW's first step allocates
        assert state["step"] == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


@pytest.mark.parametrize("target, name, stage", [
    (distrib_optimizer, "torch", "save"),
    (DistributedOptimizer, "get_parameter_state_dp_zero", "save"),
    (DistributedOptimizer, "state_dict", "fresh load"),
    (DistributedOptimizer, "_set_main_param_and_optimizer_states", "load"),
])
def test_distributed_optimizer_checkpoint_needs_each_patch(monkeypatch, tmp_path, target, name, stage):
    policy = _policy(distributed_optimizer=True)
    _train_step(policy)
    if stage != "save":
        policy.save_checkpoint(tmp_path)
    original = torch if name == "torch" else getattr(target, name).__wrapped__
    monkeypatch.setattr(target, name, original)
    with pytest.raises(CUDA_MISSING + (KeyError,)):
        if stage == "save":
            policy.save_checkpoint(tmp_path)
        else:
            _policy(distributed_optimizer=True).load_checkpoint(tmp_path)


def test_seeded_rng_tracker_forks_on_cpu_and_makes_initialisation_reproducible():
    with pytest.raises(CUDA_MISSING):
        tensor_parallel.model_parallel_cuda_manual_seed(3, force_reset_rng=True)  # why the CPU path exists
    cpu_compat.seed_model_parallel_rng(3, cuda=False)
    first = build_gpt_model(CFG).state_dict()
    cpu_compat.seed_model_parallel_rng(3, cuda=False)
    second = build_gpt_model(CFG).state_dict()
    assert all(torch.equal(first[k], second[k]) for k in first if not k.endswith("_extra_state"))
    with tensor_parallel.get_cuda_rng_tracker().fork():
        torch.rand(1)


def test_patches_are_applied_once():
    setup = LanguageModule.setup_embeddings_and_output_layer
    cpu_compat.apply_cpu_patches()
    assert LanguageModule.setup_embeddings_and_output_layer is setup
    assert rotary_module.torch is cpu_compat.TORCH_ON_CPU


@pytest.mark.parametrize("accelerator, cuda_available, patched", [
    ("auto", True, False), ("auto", False, True), ("gpu", True, False), ("cpu", True, True),
])
def test_megatron_is_patched_only_where_the_run_computes_on_the_cpu(monkeypatch, accelerator, cuda_available,
                                                                     patched):
    config = MetaAPOConfig()
    config.trainer.accelerator = accelerator
    monkeypatch.setattr(distributed, "_accelerator", "auto")  # restored after the test
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda_available)
    calls = []
    monkeypatch.setattr(cpu_compat, "apply_cpu_patches", lambda: calls.append(1))
    assert distributed.use_cuda(config) is not patched
    init_distributed()  # the process group and the layout exist already: only the patches are at stake
    assert bool(calls) is patched
