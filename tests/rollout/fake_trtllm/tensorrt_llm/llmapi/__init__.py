"""The stand-in's `tensorrt_llm.llmapi` (see the package docstring)."""
from dataclasses import dataclass

from tensorrt_llm import LLM, SamplingParams  # noqa: F401  (the real llmapi exports both)


@dataclass(kw_only=True)
class KvCacheConfig:
    free_gpu_memory_fraction: float | None = None
    enable_block_reuse: bool = True
