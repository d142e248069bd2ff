"""The rollout-engine interface: what the MetaAPO loop needs from whatever generates the K online
responses per sampled prompt (Algorithm 1, lines 7-8).

An engine is a separate inference model. After every policy update it receives the policy's
weights by `refit`, as a Hugging Face-named state dict, so one Megatron export feeds every engine
(the CPU torch engine here, TensorRT-LLM on GPUs)."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Protocol

from torch import Tensor

from metaapo_nemo.models.config import ModelConfig


@dataclass
class SamplingParams:
    """How to draw responses for one `generate` call."""

    num_samples: int = 8  # K responses per prompt
    temperature: float = 1.0  # logits are divided by it before sampling; ignored when greedy
    top_p: float = 1.0  # nucleus: sample from the smallest top set with probability >= top_p
    max_new_tokens: int = 64  # a response ends at eos or after this many tokens
    seed: int = 0  # same seed + same prompts + same weights -> same responses
    greedy: bool = False  # argmax decoding (every sample of a prompt is then identical)

    def __post_init__(self) -> None:
        if self.num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {self.num_samples}")
        if not self.greedy and not self.temperature > 0:
            raise ValueError(
                f"temperature must be > 0 for sampling, got {self.temperature}; "
                "set greedy=True for argmax decoding"
            )
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.seed < 0:
            raise ValueError(f"seed must be >= 0, got {self.seed}")


def check_prompts(prompts: list[list[int]], vocab_size: int, prompt_seeds: list[int] | None = None) -> None:
    """What every engine asks of a generate call: no empty prompt, token ids inside the
    vocabulary, one seed per prompt when seeds are given."""
    for i, p in enumerate(prompts):
        if not p:
            raise ValueError(f"prompt {i} is empty; every prompt needs at least one token")
        if min(p) < 0 or max(p) >= vocab_size:
            raise ValueError(f"prompt {i} has token ids outside the vocabulary [0, {vocab_size})")
    if prompt_seeds is not None and len(prompt_seeds) != len(prompts):
        raise ValueError(f"got {len(prompt_seeds)} prompt_seeds for {len(prompts)} prompts; give one per prompt")


@dataclass
class GenerationStats:
    """Cost of the last `generate` call, for tokens/s reporting."""

    new_tokens: int = 0  # response tokens returned, eos included
    seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0


class RolloutEngine(Protocol):
    """Optionally also `release() -> None`: free the engine's accelerator memory before training
    resumes (the loop calls it after each generation when the engine has it); the next refit or
    generate takes the memory back."""

    eos_token_id: int
    stats: GenerationStats

    def refit(self, hf_state_dict: Mapping[str, Tensor]) -> None:
        """Load the policy's current weights (Hugging Face names) into the engine."""

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_seeds: list[int] | None = None
    ) -> list[list[list[int]]]:
        """Responses as [prompt][sample] -> token ids; a response ends with eos when eos was
        generated and is cut at params.max_new_tokens otherwise."""


ENGINES = ("torch", "trtllm")


def build_engine(
    name: str,
    cfg: ModelConfig,
    tokenizer,
    *,
    max_prompt_length: int,
    max_new_tokens: int,
    tensor_parallel_size: int = 1,
    device=None,
    dtype=None,
    max_batch_size: int | None = None,
) -> RolloutEngine:
    """The engine `rollout.engine` names: "torch" (TorchEngine, on `device`) or "trtllm"
    (TrtllmEngine over `tensor_parallel_size` GPUs, sized for the run's prompt and response
    lengths). `device`, `dtype` and `max_batch_size` (torch engine) are passed on only when given,
    so each engine keeps its own defaults."""
    if name == "torch":
        from metaapo_nemo.rollout.torch_engine import TorchEngine

        extra = {k: v for k, v in (("device", device), ("dtype", dtype), ("max_batch_size", max_batch_size))
                 if v is not None}
        return TorchEngine(cfg, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **extra)
    if name == "trtllm":
        from metaapo_nemo.rollout.trtllm_engine import TrtllmEngine

        extra = {"dtype": dtype} if dtype is not None else {}
        return TrtllmEngine(cfg, tokenizer, max_prompt_length=max_prompt_length, max_new_tokens=max_new_tokens,
                            tensor_parallel_size=tensor_parallel_size, **extra)
    raise ValueError(f"unknown rollout engine {name!r}: use one of {', '.join(ENGINES)}")
