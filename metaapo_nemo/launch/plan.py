"""What a run will take before it starts: the memory per GPU, the plan a dry run prints, and the
refusal to start a run that asks for GPUs (trainer.accelerator=gpu) on a machine without them.

Imports nothing heavy (`nemo llm metaapo --dryrun` prints the plan on a login node).

Memory per GPU, in GB (1e9 bytes), for the pipeline stage that needs most. N is that stage's
parameter count (its layers, plus the embedding on the first stage and the LM head on the last),
divided by TP; the full model has P parameters; DP = ranks / (TP x PP).
  policy weights      2 B x N in bf16 (4 B in fp32)
  policy grads        4 B x N (fp32 main gradients)
  optimizer state     (4 B fp32 main weights in bf16, none in fp32) + 8 B Adam m, v, x N;
                      / DP with the distributed optimizer
  reference weights   2 B x N in bf16 (4 B in fp32)
  rollout engine      the whole model on every rank, 2 B x P in bf16 (4 B in fp32): each rank samples
                      its own share of the prompts with its own engine (TP 1, PP dropped)
  activations         T = micro_batch_size x 4 sequences (offline and online chosen / rejected) x
                      policy.max_length tokens per micro-batch, e = 2 B in bf16 (4 in fp32). Per token
                      and layer a layer keeps A = e x (4h + (2 q_width + 2 kv_width + 4 ffn) / TP): its two
                      norms' inputs and outputs (replicated over TP), q, k, v and the attention output,
                      the SwiGLU fc1 output [gate; up], silu(gate) and the product (split over TP);
                      SDPA keeps no score matrix. The first stage holds min(PP, micro-batches) in
                      flight (1F1B), the last stage one. Without recompute: layers x T x A per
                      micro-batch in flight; "full": each recompute unit keeps its input only
                      (e x h per token) and one unit is recomputed at a time (+ unit layers x T x A).
                      The last stage adds the logits: T x V / TP x (2 B bf16 + 4 B fp32 for the
                      softmax), every token counted as a response token (an upper bound).
  left for the KV cache  GPU memory (80 GB) minus all of the above, CUDA context and NCCL buffers
                      included; a floor, as activations and the KV cache are not live at once.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from metaapo_nemo.config import ConfigError, MetaAPOConfig
from metaapo_nemo.models.config import ModelConfig

GB = 1e9
GPU_MEMORY_GB = 80.0
SEQUENCES_PER_PROMPT = 4  # offline chosen / rejected and online chosen / rejected

# The checkpoints the GPU recipes are for (their config.json values), for dry runs where the
# checkpoint is not reachable.
ARCHITECTURES = {
    "llama31_8b": ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32,
                              num_query_groups=8, ffn_hidden_size=14336, max_position_embeddings=131072,
                              rotary_base=500000.0, rope_scaling_factor=8.0),
    "qwen25_7b": ModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28,
                             num_query_groups=4, ffn_hidden_size=18944, max_position_embeddings=131072,
                             rotary_base=1000000.0, norm_epsilon=1e-6, qkv_bias=True),
}


def model_from_checkpoint(hf_path: Optional[str]) -> Optional[ModelConfig]:
    """The sizes that matter here from `hf_path`/config.json; None when it is not readable."""
    try:
        hf = json.loads((Path(hf_path) / "config.json").read_text())
        heads = hf["num_attention_heads"]
        return ModelConfig(vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"],
                           num_layers=hf["num_hidden_layers"], num_attention_heads=heads,
                           num_query_groups=hf.get("num_key_value_heads") or heads,
                           ffn_hidden_size=hf["intermediate_size"], qkv_bias=hf.get("model_type") == "qwen2",
                           tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)))
    except (TypeError, OSError, ValueError, KeyError):
        return None


def model_for(config: MetaAPOConfig, recipe: Optional[str] = None) -> Optional[ModelConfig]:
    """The policy's architecture: from its checkpoint when readable, else the recipe's known one."""
    return model_from_checkpoint(config.policy.hf_path) or ARCHITECTURES.get(recipe)


def _layer_params(m: ModelConfig) -> int:
    q_width, kv_width = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    attention = m.hidden_size * (q_width + 2 * kv_width) + q_width * m.hidden_size
    bias = q_width + 2 * kv_width if m.qkv_bias else 0
    return attention + bias + 3 * m.hidden_size * m.ffn_hidden_size + 2 * m.hidden_size  # + 2 RMSNorms


def total_params(m: ModelConfig) -> int:
    embedding = m.vocab_size * m.hidden_size
    head = 0 if m.tie_word_embeddings else embedding
    return m.num_layers * _layer_params(m) + embedding + head + m.hidden_size


@dataclass
class _Stage:
    name: str
    params: int  # before the TP split
    in_flight: int  # micro-batches whose activations it holds at once
    has_logits: bool


def _stages(m: ModelConfig, pp: int, in_flight: int) -> list[_Stage]:
    layers = m.num_layers // pp * _layer_params(m)
    embedding = m.vocab_size * m.hidden_size
    if pp == 1:
        return [_Stage("the only stage", total_params(m), 1, True)]
    # Under PP a tied embedding has a copy on the last stage too.
    return [_Stage("the first stage", layers + embedding, in_flight, False),
            _Stage("the last stage", layers + embedding + m.hidden_size, 1, True)]


def _activations(config: MetaAPOConfig, m: ModelConfig, stage: _Stage, tokens: int, elem: int, tp: int,
                 pp: int) -> float:
    t = config.trainer
    h, layers = m.hidden_size, m.num_layers // pp
    q_width, kv_width = m.num_attention_heads * m.head_dim, m.num_query_groups * m.head_dim
    per_layer = elem * (4 * h + (2 * q_width + 2 * kv_width + 4 * m.ffn_hidden_size) / tp)
    if t.recompute_granularity == "full" and t.recompute_method in ("uniform", "block") and isinstance(
            t.recompute_num_layers, int) and t.recompute_num_layers > 0:
        unit = min(t.recompute_num_layers, layers)
        if t.recompute_method == "uniform":
            kept = math.ceil(layers / unit) * tokens * elem * h * stage.in_flight
        else:  # block: the first `unit` layers keep their input, the others everything
            kept = (unit * elem * h + (layers - unit) * per_layer) * tokens * stage.in_flight
        held = kept + (unit if t.recompute_method == "uniform" else 1) * tokens * per_layer
    else:  # None, or "selective": SDPA keeps no score matrix, so recomputing it frees nothing
        held = layers * tokens * per_layer * stage.in_flight
    if stage.has_logits:
        held += tokens * m.vocab_size / tp * (elem + 4)
    return held


def estimate_memory_per_gpu(config: MetaAPOConfig, model: Optional[ModelConfig] = None, *,
                            ranks: Optional[int] = None) -> dict[str, Any]:
    """GB per GPU by part for the stage that needs most (formulas in the module docstring).

    model: the policy's architecture (default: policy.hf_path's config.json). ranks: all ranks of
    the run (default: one model replica, TP x PP, so DP = 1).
    """
    model = model or model_from_checkpoint(config.policy.hf_path)
    if model is None:
        raise ValueError("no architecture: give policy.hf_path a readable checkpoint folder or pass model")
    t = config.trainer
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    dp = max(1, (ranks or tp * pp) // (tp * pp))
    bf16 = config.policy.bf16
    elem = 2 if bf16 else 4
    tokens = t.micro_batch_size * SEQUENCES_PER_PROMPT * config.policy.max_length
    micro_batches = max(1, t.global_batch_size // (t.micro_batch_size * dp))
    engine_params = total_params(model)  # one whole-model engine per rank
    kv_per_token = 2 * model.num_layers * model.num_query_groups * model.head_dim * 2
    best = None
    for stage in _stages(model, pp, min(pp, micro_batches)):
        n = stage.params / tp
        optimizer_bytes = (4 if bf16 else 0) + 8
        parts = {
            "policy_weights": elem * n / GB,
            "policy_grads": 4 * n / GB,
            "optimizer_state": optimizer_bytes * n / (dp if t.use_distributed_optimizer else 1) / GB,
            "reference_weights": elem * n / GB,
            "activations": _activations(config, model, stage, tokens, elem, tp, pp) / GB,
            "rollout_engine_weights": (2 if config.rollout.engine == "trtllm" else elem) * engine_params / GB,
        }
        total = sum(parts.values())
        if best is None or total > best["total"]:
            left = GPU_MEMORY_GB - total
            best = {**parts, "total": total, "gpu": GPU_MEMORY_GB, "left_for_kv_cache": left,
                    "kv_cache_tokens": max(0, int(left * GB // kv_per_token)), "stage": stage.name,
                    "data_parallel": dp, "tokens_per_micro_batch": tokens}
    return best


def require_gpus(config: MetaAPOConfig, cuda_available: bool) -> None:
    """Raise ConfigError (one line) when the run asks for CUDA GPUs (trainer.accelerator=gpu) and there are none."""
    t = config.trainer
    if t.accelerator == "gpu" and not cuda_available:
        tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
        raise ConfigError(f"this run needs CUDA GPUs (trainer.accelerator=gpu; TP={tp} x PP={pp} = {tp * pp} GPUs "
                          "per model replica) and this machine has none: use --recipe tiny_cpu here")


def _executor_ranks(executor) -> tuple[str, int, int]:
    """(name, nodes, ranks per node) of a NeMo-Run executor, read by attribute (no nemo_run import)."""
    per_node = getattr(executor, "ntasks_per_node", 1)
    nodes = getattr(executor, "nodes", None)
    if not isinstance(nodes, int):
        nodes = executor.nnodes() if hasattr(executor, "nnodes") else 1
    return type(executor).__name__, nodes, per_node


def describe_plan(config: MetaAPOConfig, *, recipe: Optional[str] = None, executor=None) -> str:
    """The run's plan as text: executor, ranks, TP/PP/DP, engine, precision, optimizer, recompute,
    and the estimated memory per GPU by part."""
    t = config.trainer
    tp, pp = t.tensor_model_parallel_size, t.pipeline_model_parallel_size
    if executor is None:
        name, nodes, per_node = "none (this process, or torchrun around `metaapo run`)", 1, tp * pp
        ranks_note = " (one model replica; launch more ranks for data parallel)"
    else:
        name, nodes, per_node = _executor_ranks(executor)
        ranks_note = ""
    ranks = nodes * per_node
    if t.recompute_granularity == "full":
        recompute = f"full, {t.recompute_method}, {t.recompute_num_layers} layer(s)"
    else:
        recompute = t.recompute_granularity or "off"
    precision = "bf16 weights, fp32 main grads and main weights" if config.policy.bf16 else "fp32"
    lines = [
        f"executor: {name}",
        f"ranks: {nodes} node(s) x {per_node} = {ranks}{ranks_note}",
        f"parallel: TP={tp} x PP={pp} x DP={ranks // (tp * pp) if ranks % (tp * pp) == 0 else '?'}",
        f"rollout engine: {config.rollout.engine}",
        f"precision: {precision}",
        f"distributed optimizer: {'on' if t.use_distributed_optimizer else 'off'}",
        f"activation recompute: {recompute}",
    ]
    model = model_for(config, recipe)
    if model is None:
        lines.append("memory per GPU: not estimated (policy.hf_path has no readable config.json and the recipe "
                     "names no known architecture)")
        return "\n".join(lines)
    mem = estimate_memory_per_gpu(config, model, ranks=ranks if ranks % (tp * pp) == 0 else None)
    lines += [
        f"memory per GPU ({mem['stage']}, {total_params(model) / 1e9:.2f}B parameters, "
        f"{mem['tokens_per_micro_batch']} tokens per micro-batch), GB:",
        f"  policy weights {mem['policy_weights']:.2f} + grads {mem['policy_grads']:.2f} + optimizer state "
        f"{mem['optimizer_state']:.2f}",
        f"  reference weights {mem['reference_weights']:.2f}, rollout engine weights "
        f"{mem['rollout_engine_weights']:.2f}, activations {mem['activations']:.2f}",
        f"  total {mem['total']:.2f} of {mem['gpu']:.0f}; left for the KV cache {mem['left_for_kv_cache']:.2f} "
        f"(~{mem['kv_cache_tokens']} tokens)",
    ]
    return "\n".join(lines)
