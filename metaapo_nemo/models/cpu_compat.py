"""placeholder during development"""
import torch
from megatron.core import tensor_parallel


def apply_cpu_patches():
    pass


def seed_model_parallel_rng(seed):
    torch.manual_seed(seed)
    tensor_parallel.random.initialize_rng_tracker(inference_rng_tracker=True, force_reset=True)
