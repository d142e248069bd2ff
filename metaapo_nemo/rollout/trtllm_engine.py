"""A RolloutEngine on TensorRT-LLM's LLM API (PyTorch backend), for GPUs.

Refit reloads. The release pinned in containers/Dockerfile (TensorRT-LLM 1.2.0) updates weights
in place only under its Ray orchestrator (`orchestrator_type="ray"`, a prototype; NeMo-RL and
verl drive it that way). This project launches with torchrun, not Ray, so each refit writes the
policy's full HF weights as a checkpoint folder (config.json, model.safetensors, tokenizer files)
under /dev/shm when it has room, shuts the previous LLM down and builds a new one from the folder.
The LLM API takes unsharded HF tensors and shards them over its own tensor-parallel ranks.

A refit that fails after the old LLM is gone leaves no engine: the engine is marked broken and
every later call raises, so the run stops instead of sampling from a half-loaded model.

`tensorrt_llm` is imported only when an engine is built, so this module imports without it.
"""
from __future__ import annotations

import importlib.util
import json
import random
import shutil
import tempfile
import time
import weakref
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.hf_convert import hf_weight_shapes, save_hf_checkpoint
from metaapo_nemo.rollout.engine import GenerationStats, SamplingParams, check_prompts

TRTLLM_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"  # keep equal to containers/Dockerfile's BASE_IMAGE

# End-of-turn tokens of the chat templates this project aligns (Llama 3, Qwen2, and the older
# </s>-style ones). A tokenizer's eos is often only one of them, so a chat model that closes its
# turn with another would otherwise run on to max_new_tokens.
CHAT_END_TOKENS = ("<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>",
                   "<end_of_turn>", "</s>")


def trtllm_unavailable_reason() -> str | None:
    """None when tensorrt_llm is installed; else one line saying where to get it. The package is
    found, not imported: importing it loads its CUDA libraries, which takes seconds."""
    if importlib.util.find_spec("tensorrt_llm") is not None:
        return None
    return (f"tensorrt_llm is not installed here: run inside {TRTLLM_IMAGE} (containers/Dockerfile "
            "builds on it) or `pip install tensorrt_llm==1.2.0 --extra-index-url https://pypi.nvidia.com` "
            "on a CUDA machine; or use rollout.engine=torch")


def stop_token_ids(tokenizer) -> list[int]:
    """Every id that ends a response: the tokenizer's eos, the eos list of the model's
    generation_config.json (Llama 3.1 lists three), and the known chat end tokens in the vocab."""
    ids = [tokenizer.eos_token_id]
    folder = getattr(tokenizer, "name_or_path", "")  # the checkpoint folder it was loaded from
    generation_config = Path(folder) / "generation_config.json"
    if folder and generation_config.is_file():
        eos = json.loads(generation_config.read_text()).get("eos_token_id")
        ids += eos if isinstance(eos, list) else [eos]
    vocab = tokenizer.get_vocab()
    ids += [vocab[t] for t in CHAT_END_TOKENS if t in vocab]
    return list(dict.fromkeys(i for i in ids if i is not None))


def export_root(nbytes: int, candidates: tuple[str, ...] = ("/dev/shm", tempfile.gettempdir())) -> str:
    """The first candidate folder with room for a checkpoint of `nbytes` (plus 10% and 1 GiB of
    slack); /dev/shm first because it is RAM, so writing and reloading skip the disk."""
    for folder in candidates:
        if Path(folder).is_dir() and shutil.disk_usage(folder).free > nbytes * 1.1 + 2**30:
            return folder
    raise OSError(f"no room for the {nbytes / 2**30:.1f} GiB refit checkpoint in any of {list(candidates)}; "
                  "free space there or pass export_dir=")


class TrtllmEngine:
    """RolloutEngine on TensorRT-LLM. `max_prompt_length` and `max_new_tokens` size the engine
    (TensorRT-LLM's max_input_len defaults to 1024 and refuses longer prompts); PP is dropped for
    inference, `tensor_parallel_size` GPUs serve one engine. `kv_cache_fraction` is the share of
    the GPU memory left free after loading the weights that the KV cache may take: the training
    state stays resident beside it. `export_dir` (default: /dev/shm or the temp folder) receives
    one checkpoint folder per refit; the engine deletes its folders when it is garbage-collected."""

    def __init__(
        self,
        cfg: ModelConfig,
        tokenizer,
        *,
        max_prompt_length: int,
        max_new_tokens: int,
        tensor_parallel_size: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        kv_cache_fraction: float = 0.5,
        export_dir: str | None = None,
    ) -> None:
        for name, value in (("max_prompt_length", max_prompt_length), ("max_new_tokens", max_new_tokens),
                            ("tensor_parallel_size", tensor_parallel_size)):
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        if max_prompt_length + max_new_tokens > cfg.max_position_embeddings:
            raise ValueError(f"max_prompt_length {max_prompt_length} + max_new_tokens {max_new_tokens} exceeds the "
                             f"model's max_position_embeddings {cfg.max_position_embeddings}: lower one of them")
        if not 0 < kv_cache_fraction < 1:
            raise ValueError(f"kv_cache_fraction must be in (0, 1), got {kv_cache_fraction}")
        if dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"dtype must be bfloat16, float16 or float32, got {dtype}")
        self.cfg = cfg
        self.tokenizer = tokenizer
        self.eos_token_id = tokenizer.eos_token_id
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_id
        self.stop_token_ids = stop_token_ids(tokenizer)
        self.max_prompt_length = max_prompt_length
        self.max_new_tokens = max_new_tokens
        self.tensor_parallel_size = tensor_parallel_size
        self.dtype = dtype
        self.kv_cache_fraction = kv_cache_fraction
        self.stats = GenerationStats()
        self.weights_dir: Path | None = None  # the folder the current weights were loaded from
        self._export_dir = export_dir
        self._root: Path | None = None
        self._refits = 0
        self._llm = None
        self._broken: str | None = None

    # ------------------------------------------------------------------ lifecycle
    def refit(self, hf_state_dict: Mapping[str, Tensor]) -> None:
        """Write the policy's weights as a HF checkpoint folder and rebuild the LLM from it. A bad
        dict is refused before anything changes; a failure after that breaks the engine."""
        self._check_usable()
        self._check_weights(hf_state_dict)
        self._refits += 1
        try:
            self._shutdown_llm()  # the old weights are gone from here on: any failure must break the engine
            folder = self._root_dir() / f"policy-{self._refits:06d}"
            save_hf_checkpoint(folder, self.cfg, {k: v.detach().to(self.dtype) for k, v in hf_state_dict.items()},
                               self.tokenizer)
            previous, self.weights_dir = self.weights_dir, folder
            self._llm = self._build_llm(folder)
        except BaseException as e:
            self._broken = f"refit {self._refits} failed ({type(e).__name__}: {e})"
            raise
        if previous is not None:
            shutil.rmtree(previous, ignore_errors=True)

    def release(self) -> None:
        """Free the engine's GPU memory before training resumes: shut the LLM down (TensorRT-LLM
        1.2 frees memory in place only under Ray). The weights folder stays, so a generate() without
        a new refit rebuilds the LLM from it."""
        self._shutdown_llm()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def generate(
        self, prompts: list[list[int]], params: SamplingParams, prompt_seeds: list[int] | None = None
    ) -> list[list[list[int]]]:
        """Responses as [prompt][sample] -> token ids; a response ends with the stop token that
        ended it (eos or a chat end token) and is cut at params.max_new_tokens otherwise.

        Each of the K samples of a prompt is its own request with its own seed, drawn from the
        prompt's seed, so a prompt's samples do not depend on which other prompts share the call;
        the K requests share the prompt's KV-cache blocks (block reuse). Greedy asks once and
        repeats the answer K times (TensorRT-LLM refuses several greedy returns)."""
        self._check_usable()
        if self.weights_dir is None:
            raise RuntimeError("the engine has no weights yet: call refit(policy_state_dict) first")
        check_prompts(prompts, self.cfg.vocab_size, prompt_seeds)
        self._check_prompts(prompts, params)
        if prompt_seeds is None:  # one seed for the call, as the torch engine does
            rng = random.Random(params.seed)
            prompt_seeds = [rng.getrandbits(63) for _ in prompts]
        if self._llm is None:
            self._llm = self._build_llm(self.weights_dir)
        start = time.perf_counter()
        requests = 1 if params.greedy else params.num_samples
        inputs, sampling = [], []
        for prompt, seed in zip(prompts, prompt_seeds):
            rng = random.Random(seed)
            for _ in range(requests):
                inputs.append(prompt)
                sampling.append(self._sampling_params(params, rng.getrandbits(63)))
        outputs = self._llm.generate(inputs, sampling_params=sampling, use_tqdm=False)
        responses = [self._response(out.outputs[0]) for out in outputs]
        results = [[responses[i * requests + (0 if params.greedy else k)] for k in range(params.num_samples)]
                   for i in range(len(prompts))]
        self.stats = GenerationStats(new_tokens=sum(len(r) for rs in results for r in rs),
                                     seconds=time.perf_counter() - start)
        return results

    # ------------------------------------------------------------------ TensorRT-LLM calls
    def _build_llm(self, folder: Path):
        try:
            from tensorrt_llm import LLM
            from tensorrt_llm.llmapi import KvCacheConfig
        except ImportError as e:
            raise RuntimeError(f"{trtllm_unavailable_reason() or 'tensorrt_llm does not import'} ({e})") from e
        max_seq_len = self.max_prompt_length + self.max_new_tokens
        return LLM(
            model=str(folder),
            skip_tokenizer_init=True,  # prompts come as token ids and responses go back as ids
            tensor_parallel_size=self.tensor_parallel_size,
            dtype=str(self.dtype).removeprefix("torch."),
            max_input_len=self.max_prompt_length,
            max_seq_len=max_seq_len,
            # Chunked prefill is off, so one iteration must hold a whole prompt; 8192 is the default.
            max_num_tokens=max(8192, max_seq_len),
            kv_cache_config=KvCacheConfig(free_gpu_memory_fraction=self.kv_cache_fraction, enable_block_reuse=True),
            # The C++ sampler honours a per-request seed; 1.2's TorchSampler ignores it.
            sampler_type="TRTLLMSampler",
        )

    def _sampling_params(self, params: SamplingParams, seed: int):
        from tensorrt_llm import SamplingParams as TrtllmSamplingParams

        others = [t for t in self.stop_token_ids if t != self.eos_token_id]
        common = dict(max_tokens=params.max_new_tokens, end_id=self.eos_token_id, pad_id=self.pad_token_id,
                      stop_token_ids=others or None, include_stop_str_in_output=True, detokenize=False, seed=seed)
        if params.greedy:
            return TrtllmSamplingParams(top_k=1, **common)
        return TrtllmSamplingParams(temperature=params.temperature, top_p=params.top_p, **common)

    def _response(self, completion) -> list[int]:
        """Token ids ending with the stop token when generation stopped at one: TensorRT-LLM drops
        the end id from token_ids and reports it only through finish_reason."""
        ids = list(completion.token_ids)
        if completion.finish_reason == "stop" and not (ids and ids[-1] in self.stop_token_ids):
            ids.append(completion.stop_reason if isinstance(completion.stop_reason, int) else self.eos_token_id)
        return ids

    def _shutdown_llm(self) -> None:
        llm, self._llm = self._llm, None
        if llm is not None:
            llm.shutdown()

    # ------------------------------------------------------------------ checks
    def _root_dir(self) -> Path:
        if self._root is None:
            nbytes = sum(torch.Size(s).numel() for s in hf_weight_shapes(self.cfg).values()) * self.dtype.itemsize
            base = self._export_dir or export_root(nbytes)
            Path(base).mkdir(parents=True, exist_ok=True)
            self._root = Path(tempfile.mkdtemp(prefix="metaapo-trtllm-", dir=base))
            weakref.finalize(self, shutil.rmtree, self._root, True)
        return self._root

    def _check_usable(self) -> None:
        if self._broken is not None:
            raise RuntimeError(f"the TensorRT-LLM engine is unusable: {self._broken}; it holds no complete "
                               "weights, so the run stops here (rerun the command to resume from the last checkpoint)")

    def _check_weights(self, hf_state_dict: Mapping[str, Tensor]) -> None:
        expected = hf_weight_shapes(self.cfg)
        given = {k: tuple(v.shape) for k, v in hf_state_dict.items()}
        if self.cfg.tie_word_embeddings:
            given.pop("lm_head.weight", None)  # HF lists the tied head under both names
        missing, unexpected = sorted(expected.keys() - given.keys()), sorted(given.keys() - expected.keys())
        wrong = [f"{k}: got {given[k]}, expected {s}" for k, s in expected.items() if k in given and given[k] != s]
        if missing or unexpected or wrong:
            raise ValueError(f"refit state dict does not match the engine's {self.cfg}: missing {missing[:6]}, "
                             f"unexpected {unexpected[:6]}, wrong shapes {wrong[:6]}")

    def _check_prompts(self, prompts: list[list[int]], params: SamplingParams) -> None:
        if params.max_new_tokens > self.max_new_tokens:
            raise ValueError(f"max_new_tokens {params.max_new_tokens} exceeds the {self.max_new_tokens} the engine "
                             "was built for (rollout.max_new_tokens)")
        for i, p in enumerate(prompts):
            if len(p) > self.max_prompt_length:
                raise ValueError(f"prompt {i} has {len(p)} tokens, more than the engine's max_prompt_length "
                                 f"{self.max_prompt_length} (policy.max_prompt_length): truncate it")
