"""torch.distributed and Megatron parallel state: one entry point for a laptop run (a single
process, no launcher) and for torchrun jobs (TP x PP x DP ranks, gloo on CPU, nccl on GPU)."""
from __future__ import annotations

import datetime
import math
import os

import torch
import torch.distributed as dist

from metaapo_nemo.models import cpu_compat  # first: it quiets megatron's import-time warnings
from megatron.core import parallel_state  # noqa: I001


_accelerator = "auto"


def use_cuda(config=None) -> bool:
    """Whether this process computes on CUDA GPUs, by trainer.accelerator: "gpu" yes, "cpu" no,
    "auto" when CUDA is available. Given a config, its choice holds for the process from then on:
    the process group's backend, the CPU patches, where models are built, the rollout engine's
    device all ask here. Without one: the choice last given ("auto" until then)."""
    global _accelerator
    if config is not None:
        _accelerator = config.trainer.accelerator
    return _accelerator == "gpu" or (_accelerator == "auto" and torch.cuda.is_available())


def _start_process_group(timeout_s: float) -> None:
    backend = "nccl" if use_cuda() else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend=backend, timeout=timeout)  # torchrun's env:// rendezvous
        return
    # No launcher: a world of one, its store in this process (no port to pick, none to lose to a race).
    dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1, timeout=timeout)


def _parallel_sizes() -> tuple[int, int]:
    return (
        parallel_state.get_tensor_model_parallel_world_size(),
        parallel_state.get_pipeline_model_parallel_world_size(),
    )


def init_distributed(
    tensor_model_parallel_size: int = 1, pipeline_model_parallel_size: int = 1, *, seed: int = 1234,
    timeout_s: float = 3600.0,
) -> None:
    """Start torch.distributed (if needed), Megatron's TP/PP/DP groups and the RNG state.

    timeout_s bounds every collective, Megatron's groups' too: ranks wait for each other across
    phases of unequal length (one rank's share of sampling or evaluation can take much longer).

    Idempotent: a second call with the same sizes changes nothing; one with other sizes rebuilds
    the Megatron groups. Data parallel size = world size / (TP x PP). `seed` must be the same on
    every rank: with CPU initialisation each rank draws the full weight and keeps its shard.
    """
    if tensor_model_parallel_size < 1 or pipeline_model_parallel_size < 1:
        raise ValueError(
            f"parallel sizes must be >= 1, got TP={tensor_model_parallel_size} "
            f"PP={pipeline_model_parallel_size}"
        )
    if not use_cuda():
        cpu_compat.apply_cpu_patches()
    if not dist.is_initialized():
        _start_process_group(timeout_s)
    world = dist.get_world_size()
    model_parallel = tensor_model_parallel_size * pipeline_model_parallel_size
    if world % model_parallel:
        raise ValueError(
            f"world size {world} is not a multiple of TP x PP = {tensor_model_parallel_size} x "
            f"{pipeline_model_parallel_size}; launch a multiple of {model_parallel} ranks or "
            "lower the parallel sizes"
        )
    wanted = (tensor_model_parallel_size, pipeline_model_parallel_size)
    if parallel_state.model_parallel_is_initialized():
        if _parallel_sizes() == wanted:
            return
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=tensor_model_parallel_size,
        pipeline_model_parallel_size=pipeline_model_parallel_size,
        distributed_timeout_minutes=math.ceil(timeout_s / 60),
    )
    cpu_compat.seed_model_parallel_rng(seed, cuda=use_cuda())


def is_rank0() -> bool:
    """True on global rank 0, and in a process that never started torch.distributed."""
    return not dist.is_initialized() or dist.get_rank() == 0


def barrier() -> None:
    """All ranks wait here (no-op without torch.distributed)."""
    if dist.is_initialized():
        dist.barrier()


def destroy_distributed() -> None:
    """Tear down Megatron's groups and the default process group (tests, clean exits)."""
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def world_rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def data_parallel_rank() -> int:
    return parallel_state.get_data_parallel_rank() if parallel_state.model_parallel_is_initialized() else 0


def data_parallel_size() -> int:
    return parallel_state.get_data_parallel_world_size() if parallel_state.model_parallel_is_initialized() else 1


def is_loss_rank() -> bool:
    """The one rank per data-parallel replica that reports losses: last pipeline stage, tensor rank 0."""
    if not parallel_state.model_parallel_is_initialized():
        return True
    return parallel_state.is_pipeline_last_stage() and parallel_state.get_tensor_model_parallel_rank() == 0


def all_gather_objects(obj) -> list:
    """Every rank's `obj`, in global rank order, on every rank (WORLD group)."""
    if world_size() == 1:
        return [obj]
    gathered = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def collective_device() -> torch.device:
    """Where tensors must be for a collective: the GPU under nccl, the CPU under gloo."""
    if dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The element-wise sum of `tensor` over every rank (WORLD group), on tensor's device."""
    if world_size() == 1:
        return tensor
    on_device = tensor.to(collective_device())
    dist.all_reduce(on_device)
    return on_device.to(tensor.device)


def broadcast_module(module: torch.nn.Module, src: int = 0) -> None:
    """Copy `module`'s parameters and buffers from global rank `src` to every rank (WORLD group)."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for tensor in list(module.parameters()) + list(module.buffers()):
            on_device = tensor.data.to(collective_device())
            dist.broadcast(on_device, src=src)
            tensor.data.copy_(on_device)
