"""A stand-in for TensorRT-LLM's LLM API (1.2), for CPU tests of metaapo_nemo/rollout/trtllm_engine.py.

It is NOT TensorRT-LLM: it runs no model. It keeps the parts of the real API the engine relies on
(the keyword names of LLM and SamplingParams, max_input_len defaulting to 1024, refusing several
greedy returns, the end id dropped from token_ids, stop tokens trimmed unless
include_stop_str_in_output), records every call in CALLS, and answers with token ids drawn from a
generator seeded by (prompt, seed), so equal requests get equal answers. Tokens in LIKELY_TOKENS
come up often, so responses meet stop tokens within a few steps.
"""
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

CALLS: list[tuple] = []  # ("LLM", kwargs) | ("generate", inputs, sampling_params) | ("shutdown", model)
LIKELY_TOKENS: list[int] = []  # set by a test: ids drawn with probability 1/4 at every step
FAIL_BUILD: list[str] = []  # a message here makes the next LLM(...) raise RuntimeError with it

_LLM_KEYWORDS = {"model", "skip_tokenizer_init", "tensor_parallel_size", "dtype", "max_input_len", "max_seq_len",
                 "max_num_tokens", "kv_cache_config", "sampler_type"}


@dataclass(kw_only=True)
class SamplingParams:
    end_id: int | None = None
    pad_id: int | None = None
    max_tokens: int = 32
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    n: int = 1
    best_of: int | None = None
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    temperature: float | None = None
    detokenize: bool = True

    def __post_init__(self):
        self.best_of = self.best_of or self.n
        greedy = (self.top_k in (None, 1)) and (self.top_p in (None, 0.0))
        if greedy and self.best_of > 1:
            raise ValueError("Greedy decoding in the LLM API does not allow multiple returns")


@dataclass
class CompletionOutput:
    index: int
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class RequestOutput:
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]


class LLM:
    def __init__(self, **kwargs):
        unknown = set(kwargs) - _LLM_KEYWORDS
        if unknown:
            raise TypeError(f"LLM got unexpected keyword arguments {sorted(unknown)}")
        CALLS.append(("LLM", dict(kwargs)))
        if FAIL_BUILD:
            raise RuntimeError(FAIL_BUILD.pop())
        folder = Path(kwargs["model"])
        if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
            raise FileNotFoundError(f"{folder} is not a HF checkpoint folder")
        self.model = str(folder)
        self.vocab_size = json.loads((folder / "config.json").read_text())["vocab_size"]
        self.max_input_len = kwargs.get("max_input_len") or 1024
        self.max_seq_len = kwargs.get("max_seq_len")
        self.closed = False

    def generate(self, inputs, sampling_params=None, use_tqdm=True):
        if self.closed:
            raise RuntimeError("generate() on an LLM that was shut down")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(inputs)
        CALLS.append(("generate", [list(p) for p in inputs], list(params)))
        return [RequestOutput(list(p), [self._complete(p, sp, i) for i in range(sp.n)])
                for p, sp in zip(inputs, params)]

    def _complete(self, prompt, sp: SamplingParams, index: int) -> CompletionOutput:
        if len(prompt) > self.max_input_len:
            raise ValueError(f"prompt length ({len(prompt)}) exceeds max_input_len ({self.max_input_len})")
        if self.max_seq_len is not None and len(prompt) + sp.max_tokens > self.max_seq_len:
            raise ValueError("prompt length + max_tokens exceeds max_seq_len")
        greedy = sp.top_k == 1
        rng = random.Random(f"{prompt}|{None if greedy else sp.seed}|{index}")
        stops = set(sp.stop_token_ids or [])
        ids = []
        for _ in range(sp.max_tokens):
            likely = LIKELY_TOKENS and rng.random() < 0.25
            token = rng.choice(LIKELY_TOKENS) if likely else rng.randrange(self.vocab_size)
            if token == sp.end_id:
                return CompletionOutput(index, ids, "stop", None)  # the end id is not returned
            ids.append(token)
            if token in stops:
                kept = ids if sp.include_stop_str_in_output else ids[:-1]
                return CompletionOutput(index, kept, "stop", token)
        return CompletionOutput(index, ids, "length", None)

    def shutdown(self):
        CALLS.append(("shutdown", self.model))
        self.closed = True
