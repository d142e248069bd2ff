"""Everything that exists only to make megatron-core (a CUDA-first library) run on a CPU.

Scope: the code paths this project uses - GPTModel forward/backward under TP/PP on gloo, the
forward-backward schedules with their p2p communication, DDP and the Megatron optimizers (fp32,
bf16 mixed precision, distributed) with gradient clipping, full activation recomputation,
distributed checkpoints (torch_dist). With them the CPU runs the GPU code paths, not stand-ins.
Each patch names the megatron line it works around. Nothing here runs when the run computes on
CUDA (metaapo_nemo.distributed.use_cuda): init_distributed then skips `apply_cpu_patches`, and
`seed_model_parallel_rng` is Megatron's own `model_parallel_cuda_manual_seed`.
"""
from __future__ import annotations

import functools
import importlib
import warnings

import torch

# megatron-core warns on import that it falls back to torch without Transformer Engine and Apex:
# true of every CPU run and said in the README, so not repeated on every console.
warnings.filterwarnings("ignore", message=r"(Transformer Engine and Apex are|Apex is) not installed", category=UserWarning)

from metaapo_nemo.models import megatron_core  # noqa: F401  (first: megatron-core without TorchInductor)
from megatron.core import tensor_parallel  # noqa: E402
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import Float16OptimizerWithFloat16Params


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
    # The distributed optimizer's checkpoint state gathered into buffers on
    # torch.cuda.current_device() (get_parameter_state_dp_zero, l.1077).
    "megatron.core.optimizer.distrib_optimizer",
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


def _with_tensor_method(function, name, replacement):
    """`function` with torch.Tensor.<name> replaced while it runs: for CUDA-only Tensor methods,
    which no module-local `torch` reaches."""

    @functools.wraps(function)
    def patched(*args, **kwargs):
        real = getattr(torch.Tensor, name)
        setattr(torch.Tensor, name, replacement)
        try:
            return function(*args, **kwargs)
        finally:
            setattr(torch.Tensor, name, real)

    return patched


def _stays(tensor, *args, **kwargs):
    """Tensor.cuda() that leaves the tensor where it is."""
    return tensor


_tensor_type = torch.Tensor.type
_CUDA_TYPE_NAMES = {torch.float32: "torch.cuda.FloatTensor", torch.float16: "torch.cuda.HalfTensor",
                    torch.bfloat16: "torch.cuda.BFloat16Tensor"}


def _cuda_type_name(tensor, *args, **kwargs):
    """Tensor.type() as CUDA names it. The mixed-precision and distributed optimizers sort their
    parameters by that name into 16-bit ones (which get fp32 main weights) and fp32 ones, and refuse
    any other (`param.type() in ['torch.cuda.HalfTensor', 'torch.cuda.BFloat16Tensor']`,
    optimizer.py l.671-700, distrib_optimizer.py l.361-436, 582); the dtype is what they mean."""
    if args or kwargs or tensor.dtype not in _CUDA_TYPE_NAMES:
        return _tensor_type(tensor, *args, **kwargs)
    return _CUDA_TYPE_NAMES[tensor.dtype]


def _no_cuda_rng_state(*args, **kwargs):
    """Megatron's activation recomputation saves the CUDA generator's state before a unit's forward
    and restores it before recomputing it (CheckpointFunction via _get_all_rng_states /
    _set_all_rng_states, random.py l.446-460); without CUDA there is no such generator. The CPU
    generator's state and the RNG tracker's are saved and restored beside it, as on GPU."""
    return None


def _adam_state_allocated_first(state_dict):
    """DistributedOptimizer.state_dict, on torch's AdamW (megatron's optimizer where neither
    transformer-engine nor apex is installed, as on every CPU), reads the step count from the
    per-parameter state and asserts there is one (distrib_optimizer.py l.640-642): a checkpoint
    saved, or loaded into, an optimizer that has not stepped yet fails. The state allocated first,
    as AdamW allocates it at its first step (step 0, zero moments), is that fresh state."""

    @functools.wraps(state_dict)
    def patched(self):
        for group in self.optimizer.param_groups:
            for param in group["params"]:
                if not self.optimizer.state[param]:
                    self.optimizer.state[param].update(step=torch.tensor(0.0), exp_avg=torch.zeros_like(param),
                                                       exp_avg_sq=torch.zeros_like(param))
        return state_dict(self)

    return patched


def _step_passed_through(set_states):
    """DistributedOptimizer._set_main_param_and_optimizer_states copies every entry of the
    parameter's optimizer state from `tensors` (l.937-940), "step" included, which torch's AdamW
    keeps per parameter and the fully_reshardable load never passes (l.2098): the step count comes
    back through the param groups (load_state_dict, l.817-826). The state's own step is passed
    along, so that entry is a copy onto itself."""

    @functools.wraps(set_states)
    def patched(self, model_param, tensors):
        group_index, group_order = self.model_param_group_index_map[model_param]
        state = self.optimizer.state[self.optimizer.param_groups[group_index]["params"][group_order]]
        return set_states(self, model_param, {"step": state["step"], **tensors} if "step" in state else tensors)

    return patched


_applied = False


def apply_cpu_patches() -> None:
    """Make megatron-core's CUDA-only calls run on the CPU. Idempotent. For runs that compute on the
    CPU only: init_distributed calls it unless distributed.use_cuda()."""
    global _applied
    if _applied:
        return
    for name in _MODULES_SEEING_CPU_TORCH:
        importlib.import_module(name).torch = TORCH_ON_CPU
    optimizer_module = importlib.import_module("megatron.core.optimizer.optimizer")
    optimizer_module.clip_grad_by_total_norm_fp32 = _clip_grad_by_total_norm_fp32
    importlib.import_module("megatron.core.optimizer.clip_grads").l2_norm_impl = _multi_tensor_l2_norm
    language_module = importlib.import_module(
        "megatron.core.models.common.language_module.language_module"
    ).LanguageModule
    # setup_embeddings_and_output_layer moves the tied embedding to CUDA (`weight.data.cuda()`,
    # language_module.py l.244) before all-reducing the first and last pipeline stages' copies.
    language_module.setup_embeddings_and_output_layer = _with_tensor_method(
        language_module.setup_embeddings_and_output_layer, "cuda", _stays
    )
    # The distributed optimizer's checkpoint state ("fully_reshardable") is all-gathered over the
    # data-parallel group from `send_tensor.cuda()` (get_parameter_state_dp_zero, l.1089).
    DistributedOptimizer.get_parameter_state_dp_zero = _with_tensor_method(
        DistributedOptimizer.get_parameter_state_dp_zero, "cuda", _stays
    )
    DistributedOptimizer.state_dict = _adam_state_allocated_first(DistributedOptimizer.state_dict)
    DistributedOptimizer._set_main_param_and_optimizer_states = _step_passed_through(
        DistributedOptimizer._set_main_param_and_optimizer_states
    )
    for optimizer in (Float16OptimizerWithFloat16Params, DistributedOptimizer):
        optimizer.__init__ = _with_tensor_method(optimizer.__init__, "type", _cuda_type_name)
    tensor_parallel.random._get_cuda_rng_state = _no_cuda_rng_state
    tensor_parallel.random._set_cuda_rng_state = _no_cuda_rng_state
    _applied = True


def seed_model_parallel_rng(seed: int, cuda: bool) -> None:
    """Seed torch and Megatron's model-parallel RNG tracker (call after the parallel groups exist).

    On GPU: Megatron's model_parallel_cuda_manual_seed. On CPU that function fails (its tracker
    stores torch.cuda RNG states); the inference tracker instead makes every `tracker.fork()` a
    no-op, so the few places that fork (dropout under sequence parallelism, activation
    recomputation) draw from the CPU generator. Our models have no dropout.
    """
    torch.manual_seed(seed)
    if cuda:
        tensor_parallel.model_parallel_cuda_manual_seed(seed)
    else:
        tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
