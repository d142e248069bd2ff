"""Everything that exists only to make megatron-core (a CUDA-first library) run on a CPU.

Scope: the code paths this project uses - GPTModel forward/backward under TP/PP on gloo, the
forward-backward schedules with their p2p communication, DDP and the (non-distributed) Megatron
optimizer with gradient clipping, distributed checkpoints (torch_dist). Each patch names the
megatron line it works around. Nothing here runs when CUDA is available: `apply_cpu_patches` is
then a no-op and `seed_model_parallel_rng` is Megatron's own `model_parallel_cuda_manual_seed`.
"""
from __future__ import annotations

import functools
import importlib

import torch

from megatron.core import tensor_parallel


def _cpu_device(device):
    """'cuda', 'cuda:1' or torch.device('cuda') -> the CPU; anything else as is."""
    if device is not None and torch.device(device).type == "cuda":
        return torch.device("cpu")
    return device


class _CudaOnCpu:
    """What a patched megatron module sees as `torch.cuda`: the current device is the CPU and
    synchronisation is free. Other attributes fall through to the real torch.cuda."""

    @staticmethod
    def current_device():
        return "cpu"

    @staticmethod
    def synchronize(*args, **kwargs):
        pass

    def __getattr__(self, name):
        return getattr(torch.cuda, name)


class _TorchOnCpu:
    """What a patched megatron module sees as `torch`: tensor factories asked for device="cuda"
    build on the CPU, `torch.cuda` is `_CudaOnCpu`; every other name is the real torch."""

    cuda = _CudaOnCpu()

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def zeros(*args, device=None, **kwargs):
        return torch.zeros(*args, device=_cpu_device(device), **kwargs)

    @staticmethod
    def tensor(*args, device=None, **kwargs):
        return torch.tensor(*args, device=_cpu_device(device), **kwargs)


TORCH_ON_CPU = _TorchOnCpu()

# Modules whose module-level `torch` becomes TORCH_ON_CPU, and the CUDA-only calls met in each
# (megatron-core 0.16.1; line numbers for orientation).
_MODULES_SEEING_CPU_TORCH = {
    # RotaryEmbedding.get_emb moves inv_freq to torch.cuda.current_device() (l.162).
    "megatron.core.models.common.embeddings.rotary_pos_embedding",
    # _gather_along_last_dim (logits gathered over TP) allocates on torch.cuda.current_device()
    # (l.91).
    "megatron.core.tensor_parallel.mappings",
    # total_num_tokens = torch.zeros(..., device="cuda") in every schedule (l.596, 983, 2138).
    "megatron.core.pipeline_parallel.schedules",
    # Shape exchange and receive buffers on torch.cuda.current_device(), torch.cuda.synchronize
    # after batched isend/irecv (l.190-202, 242, 313-321, 398).
    "megatron.core.pipeline_parallel.p2p_communication",
    # _dummy_overflow_buf / _scale_one / found_inf created with device='cuda' (l.473-485, 907),
    # ChainedOptimizer.get_loss_scale on torch.cuda.current_device() (l.1141).
    "megatron.core.optimizer.optimizer",
    # Grad-norm buffers created with device='cuda' (l.90, 103, 115, 207).
    "megatron.core.optimizer.clip_grads",
    # Bucket buffers on torch.cuda.current_device() (l.783-806).
    "megatron.core.distributed.param_and_grad_buffer",
    # Distributed checkpoints (torch_dist): torch.cuda.synchronize after staging the tensors to
    # be written (FileSystemWriterAsync.preload_tensors, l.230) ...
    "megatron.core.dist_checkpointing.strategies.filesystem_async",
    # ... and the write-failure flag broadcast on torch.cuda.current_device() (l.252).
    "megatron.core.dist_checkpointing.strategies.state_dict_saver",
}


def _multi_tensor_l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
    """megatron.core.utils.local_multi_tensor_l2_norm (the apex-free grad-norm kernel) returns
    its result on device="cuda" (utils.py l.1207); same norm, on the tensors' device."""
    norms = [torch.linalg.vector_norm(t.float()) for tensors in tensor_lists for t in tensors]
    return torch.linalg.vector_norm(torch.stack(norms)).reshape(1), None


def _clip_grad_by_total_norm_fp32(parameters, max_norm, total_norm, use_decoupled_grad=False):
    """Megatron's clip_grad_by_total_norm_fp32 asserts `grad.type() == 'torch.cuda.FloatTensor'`
    (clip_grads.py l.167); same scaling, any device."""
    clip_coeff = max_norm / (total_norm + 1.0e-6)
    if clip_coeff >= 1.0:
        return
    for param in parameters:
        grad = param.decoupled_grad if use_decoupled_grad else param.grad
        if grad is not None:
            grad.detach().mul_(clip_coeff)


def _setup_tied_embeddings_on_cpu(setup):
    """LanguageModule.setup_embeddings_and_output_layer moves the tied embedding to CUDA
    (`weight.data.cuda()`, language_module.py l.244) before all-reducing the first and last
    pipeline stages' copies; a Tensor method, so no module-local torch reaches it: `.cuda()` is
    the identity while that method runs."""

    @functools.wraps(setup)
    def on_cpu(self):
        real_cuda = torch.Tensor.cuda
        torch.Tensor.cuda = lambda tensor, *args, **kwargs: tensor
        try:
            return setup(self)
        finally:
            torch.Tensor.cuda = real_cuda

    return on_cpu


_applied = False


def apply_cpu_patches() -> None:
    """Make megatron-core's CUDA-only calls run on the CPU. Idempotent; no-op with CUDA."""
    global _applied
    if _applied or torch.cuda.is_available():
        return
    for name in _MODULES_SEEING_CPU_TORCH:
        importlib.import_module(name).torch = TORCH_ON_CPU
    optimizer_module = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer_module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    importlib.import_module("megatron.core.optimizer.clip_grads").l2_norm_impl = _multi_tensor_l2_norm
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module"
    ).LanguageModule
    language_module.setup_embeddings_and_output_layer = _setup_tied_embeddings_on_cpu(
        language_module.setup_embeddings_and_output_layer
    )
    _applied = True


def seed_model_parallel_rng(seed: int) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (call after the parallel groups exist).

    On GPU: Megatron's model_parallel_cuda_manual_seed. On CPU that function fails (its tracker
    stores torch.cuda RNG states); the inference tracker instead makes every `tracker.fork()` a
    no-op, so the few places that fork (dropout under sequence parallelism, activation
    recomputation) draw from the CPU generator. Our models have no dropout.
    """
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
