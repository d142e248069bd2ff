"""Hugging Face (Llama, Qwen2) <-> megatron-core GPTModel: configs, weights, checkpoint folders.

Megatron fuses two pairs of HF matrices:
- linear_qkv stacks, query group by query group, [the group's q heads; its k head; its v head]
  (so a contiguous split over tensor-parallel ranks hands each rank whole groups);
- linear_fc1 stacks [gate_proj; up_proj] (SwiGLU).
Everything else is a rename. hf_to_megatron / megatron_to_hf work on full (unsharded) state
dicts; load_hf_into_model / export_hf_state_dict move them into and out of a live model's
tensor- and pipeline-parallel shards.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch
from torch import Tensor

from metaapo_nemo.models.config import LLAMA3_ROPE, ModelConfig


_LAYER_RENAMES = {  # HF name inside model.layers.{i}. -> megatron name inside decoder.layers.{i}.
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attn.o_proj.weight": "self_attention.linear_proj.weight",
    "post_attention_layernorm.weight": "pre_mlp_layernorm.weight",
    "mlp.down_proj.weight": "mlp.linear_fc2.weight",
}
_TOP_RENAMES = {
    "model.embed_tokens.weight": "embedding.word_embeddings.weight",
    "model.norm.weight": "decoder.final_layernorm.weight",
    "lm_head.weight": "output_layer.weight",
}


# ---------------------------------------------------------------------------------------------
# Configs


def _rope(hf_config) -> tuple[float, dict]:
    """(rope theta, scaling dict) from transformers 5 (`rope_parameters`) or 4.x (`rope_theta`,
    `rope_scaling`) configs."""
    params = getattr(hf_config, "rope_parameters", None)
    if params is not None:
        return float(params.get("rope_theta", 10000.0)), dict(params)
    theta = float(getattr(hf_config, "rope_theta", 10000.0))
    return theta, dict(getattr(hf_config, "rope_scaling", None) or {})


def model_config_from_hf(hf_config) -> ModelConfig:
    """ModelConfig from a transformers LlamaConfig / Qwen2Config; anything this project's
    Megatron model cannot reproduce exactly is refused with the reason."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type not in ("llama", "qwen2"):
        raise ValueError(f"only Llama and Qwen2 checkpoints are supported, got model_type={model_type!r}")
    heads = hf_config.num_attention_heads
    unsupported = []
    if getattr(hf_config, "hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={hf_config.hidden_act!r} (need 'silu')")
    if getattr(hf_config, "head_dim", None) not in (None, hf_config.hidden_size // heads):
        unsupported.append(f"head_dim={hf_config.head_dim} != hidden_size / num_attention_heads")
    if model_type == "llama" and getattr(hf_config, "attention_bias", False):
        unsupported.append("attention_bias=True (bias on o_proj too)")
    if getattr(hf_config, "mlp_bias", False):
        unsupported.append("mlp_bias=True")
    if getattr(hf_config, "use_sliding_window", False):
        unsupported.append("use_sliding_window=True")
    theta, scaling = _rope(hf_config)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type == "llama3":
        got = {k: scaling.get(k) for k in LLAMA3_ROPE}
        if got != LLAMA3_ROPE:
            unsupported.append(f"llama3 RoPE scaling {got} (Megatron implements {LLAMA3_ROPE})")
    elif rope_type != "default":
        unsupported.append(f"RoPE type {rope_type!r} (need 'default' or 'llama3')")
    if unsupported:
        raise ValueError("unsupported Hugging Face config: " + "; ".join(unsupported))
    return ModelConfig(
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=heads,
        num_query_groups=getattr(hf_config, "num_key_value_heads", None) or heads,
        ffn_hidden_size=hf_config.intermediate_size,
        max_position_embeddings=hf_config.max_position_embeddings,
        rotary_base=theta,
        norm_epsilon=hf_config.rms_norm_eps,
        qkv_bias=model_type == "qwen2",
        tie_word_embeddings=bool(getattr(hf_config, "tie_word_embeddings", False)),
        rope_scaling_factor=float(scaling["factor"]) if rope_type == "llama3" else None,
    )


def hf_config_from_model_config(cfg: ModelConfig, **extra):
    """transformers config for `cfg`: Qwen2Config when it has a qkv bias, else LlamaConfig.
    `extra` goes to the config as is (token ids, torch_dtype, architectures, ...)."""
    from transformers import LlamaConfig, Qwen2Config

    rope_scaling = None
    if cfg.rope_scaling_factor is not None:
        rope_scaling = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE}
    common = dict(
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon,
        rope_theta=cfg.rotary_base,
        rope_scaling=rope_scaling,
        tie_word_embeddings=cfg.tie_word_embeddings,
        hidden_act="silu",
    )
    if cfg.qkv_bias:
        return Qwen2Config(**common, **{"architectures": ["Qwen2ForCausalLM"], **extra})
    return LlamaConfig(**common, attention_bias=False, **{"architectures": ["LlamaForCausalLM"], **extra})


# ---------------------------------------------------------------------------------------------
# Weights


def hf_weight_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """The HF name and shape of every weight of `cfg`'s Llama/Qwen2 model (a tied head omitted)."""
    h, f, v = cfg.hidden_size, cfg.ffn_hidden_size, cfg.vocab_size
    q, kv = cfg.num_attention_heads * cfg.head_dim, cfg.num_query_groups * cfg.head_dim
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head.weight"] = (v, h)
    per_layer = {"input_layernorm.weight": (h,), "self_attn.o_proj.weight": (h, q),
                 "post_attention_layernorm.weight": (h,), "mlp.down_proj.weight": (h, f),
                 "self_attn.q_proj.weight": (q, h), "self_attn.k_proj.weight": (kv, h),
                 "self_attn.v_proj.weight": (kv, h), "mlp.gate_proj.weight": (f, h), "mlp.up_proj.weight": (f, h)}
    if cfg.qkv_bias:
        per_layer |= {"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)}
    for i in range(cfg.num_layers):
        shapes |= {f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()}
    return shapes


def _check_hf_names(hf_state_dict: dict, cfg: ModelConfig) -> None:
    expected = set(hf_weight_shapes(cfg))
    # Not weights of the model: rotary tables some versions save; the tied head's second name.
    ignorable = re.compile(r"(.*rotary_emb\.inv_freq|lm_head\.weight)$")
    missing = sorted(expected - hf_state_dict.keys())
    unexpected = sorted(k for k in hf_state_dict.keys() - expected if not ignorable.match(k))
    if missing or unexpected:
        raise ValueError(
            f"Hugging Face weights do not match the config (layers={cfg.num_layers}, "
            f"qkv_bias={cfg.qkv_bias}, tie_word_embeddings={cfg.tie_word_embeddings}): "
            f"missing {missing[:6]}{'...' if len(missing) > 6 else ''}, "
            f"unexpected {unexpected[:6]}{'...' if len(unexpected) > 6 else ''}"
        )


def _interleave_qkv(q: Tensor, k: Tensor, v: Tensor, cfg: ModelConfig) -> Tensor:
    """[q; k; v] (HF, head-major rows) -> per query group [q heads of the group; k; v]."""
    groups = cfg.num_query_groups
    rest = q.shape[1:]  # (hidden,) for weights, () for biases
    q = q.reshape(groups, -1, *rest)  # [groups, heads_per_group * head_dim, ...]
    k = k.reshape(groups, -1, *rest)
    v = v.reshape(groups, -1, *rest)
    return torch.cat([q, k, v], dim=1).reshape(-1, *rest)


def _split_qkv(qkv: Tensor, cfg: ModelConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of _interleave_qkv."""
    groups, d = cfg.num_query_groups, cfg.head_dim
    q_rows = cfg.num_attention_heads // groups * d
    rest = qkv.shape[1:]
    grouped = qkv.reshape(groups, q_rows + 2 * d, *rest)
    q, k, v = grouped.split([q_rows, d, d], dim=1)
    return tuple(t.reshape(-1, *rest).contiguous() for t in (q, k, v))


def hf_to_megatron(hf_state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """Full Megatron GPTModel state dict (weights only, no `_extra_state`) from HF weights."""
    _check_hf_names(hf_state_dict, cfg)
    out = {
        mega: hf_state_dict[hf]
        for hf, mega in _TOP_RENAMES.items()
        if not (hf == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    for i in range(cfg.num_layers):
        hf, mega = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mega_name in _LAYER_RENAMES.items():
            out[mega + mega_name] = hf_state_dict[hf + hf_name]
        qkv = [hf_state_dict[f"{hf}self_attn.{p}_proj.weight"] for p in "qkv"]
        out[mega + "self_attention.linear_qkv.weight"] = _interleave_qkv(*qkv, cfg)
        if cfg.qkv_bias:
            qkv = [hf_state_dict[f"{hf}self_attn.{p}_proj.bias"] for p in "qkv"]
            out[mega + "self_attention.linear_qkv.bias"] = _interleave_qkv(*qkv, cfg)
        out[mega + "mlp.linear_fc1.weight"] = torch.cat(
            [hf_state_dict[hf + "mlp.gate_proj.weight"], hf_state_dict[hf + "mlp.up_proj.weight"]]
        )
    return out


def megatron_to_hf(megatron_state_dict: dict[str, Tensor], cfg: ModelConfig) -> dict[str, Tensor]:
    """HF weights from a full Megatron GPTModel state dict (`_extra_state` entries ignored).
    A tied model gets no `lm_head.weight`, as Hugging Face saves it."""
    sd = megatron_state_dict
    out = {
        hf: sd[mega]
        for hf, mega in _TOP_RENAMES.items()
        if not (hf == "lm_head.weight" and cfg.tie_word_embeddings)
    }
    for i in range(cfg.num_layers):
        hf, mega = f"model.layers.{i}.", f"decoder.layers.{i}."
        for hf_name, mega_name in _LAYER_RENAMES.items():
            out[hf + hf_name] = sd[mega + mega_name]
        for p, t in zip("qkv", _split_qkv(sd[mega + "self_attention.linear_qkv.weight"], cfg)):
            out[f"{hf}self_attn.{p}_proj.weight"] = t
        if cfg.qkv_bias:
            for p, t in zip("qkv", _split_qkv(sd[mega + "self_attention.linear_qkv.bias"], cfg)):
                out[f"{hf}self_attn.{p}_proj.bias"] = t
        gate, up = sd[mega + "mlp.linear_fc1.weight"].chunk(2)
        out[hf + "mlp.gate_proj.weight"] = gate.contiguous()
        out[hf + "mlp.up_proj.weight"] = up.contiguous()
    return out


# ---------------------------------------------------------------------------------------------
# Live models (this rank's tensor-parallel shard of its pipeline stage)


def _full_name(gpt, local_name: str, cfg: ModelConfig) -> str:
    """Name in the full model's state dict of this stage's parameter `local_name`."""
    layer = re.match(r"decoder\.layers\.(\d+)\.(.*)", local_name)
    if layer:  # a stage numbers its layers from 0; layer_number is global and 1-based
        return f"decoder.layers.{gpt.decoder.layers[int(layer[1])].layer_number - 1}.{layer[2]}"
    if local_name == "output_layer.weight" and cfg.tie_word_embeddings:
        return "embedding.word_embeddings.weight"  # the last stage's copy of the tied embedding
    return local_name


def _tp_shard(full: Tensor, param: Tensor, rank: int, size: int) -> Tensor:
    """This rank's slice of a full tensor, as Megatron splits it: `partition_stride` interleaved
    blocks per rank (fc1 holds [gate_r; up_r] on rank r)."""
    if not getattr(param, "tensor_model_parallel", False) or size == 1:
        return full
    blocks = full.chunk(size * param.partition_stride, dim=param.partition_dim)
    return torch.cat(blocks[rank::size], dim=param.partition_dim)


def _tp_unshard(shards: list[Tensor], param: Tensor) -> Tensor:
    """Inverse of _tp_shard over all ranks' shards (in rank order)."""
    stride, dim = param.partition_stride, param.partition_dim
    per_rank = [shard.chunk(stride, dim=dim) for shard in shards]
    return torch.cat([blocks[j] for j in range(stride) for blocks in per_rank], dim=dim)


def _gather_tensor_parallel(tensor: Tensor, param: Tensor) -> Tensor:
    from megatron.core import parallel_state

    size = parallel_state.get_tensor_model_parallel_world_size()
    if size == 1 or not getattr(param, "tensor_model_parallel", False):
        return tensor
    shards = [torch.empty_like(tensor) for _ in range(size)]
    torch.distributed.all_gather(
        shards, tensor.contiguous(), group=parallel_state.get_tensor_model_parallel_group()
    )
    return _tp_unshard(shards, param)


def _gather_pipeline_stages(stage: dict[str, Tensor]) -> dict[str, Tensor]:
    """Every pipeline stage's tensors on every stage: the layouts are all-gathered, then each
    stage broadcasts its tensors over the pipeline group, stage by stage."""
    from megatron.core import parallel_state

    if parallel_state.get_pipeline_model_parallel_world_size() == 1:
        return stage
    group = parallel_state.get_pipeline_model_parallel_group()
    ranks = torch.distributed.get_process_group_ranks(group)
    layouts: list = [None] * len(ranks)
    torch.distributed.all_gather_object(
        layouts, {name: (t.shape, t.dtype) for name, t in stage.items()}, group=group
    )
    device = next(iter(stage.values())).device
    full: dict[str, Tensor] = {}
    for src, layout in zip(ranks, layouts):
        for name, (shape, dtype) in layout.items():
            t = stage[name].contiguous() if src == torch.distributed.get_rank() else torch.empty(
                shape, dtype=dtype, device=device
            )
            torch.distributed.broadcast(t, src=src, group=group)
            full[name] = t
    return full


def export_hf_state_dict(model, cfg: ModelConfig) -> dict[str, Tensor]:
    """HF weights of a live GPTModel, the full model on every rank (what a rollout-engine refit
    consumes). Collective under TP/PP: every rank of the model-parallel group must call it.

    Tensor-parallel shards are all-gathered over the TP group, then pipeline stages broadcast
    over the PP group. Without TP, tensors are detached views of the live parameters, not
    copies: copy what must outlive the next optimiser step.
    """
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    stage = {}
    for name, param in gpt.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):
            continue
        if name == "output_layer.weight" and cfg.tie_word_embeddings and not gpt.pre_process:
            continue  # the last stage's copy of the embedding: the first stage exports it
        stage[_full_name(gpt, name, cfg)] = _gather_tensor_parallel(param.detach(), param)
    return megatron_to_hf(_gather_pipeline_stages(stage), cfg)


def load_hf_into_model(model, cfg: ModelConfig, hf_state_dict: dict[str, Tensor]) -> None:
    """Copy full HF weights into this rank's shard of a live GPTModel (its pipeline stage's
    layers, its tensor-parallel slice), converting dtype as the parameters need. No collectives:
    every rank reads the full state dict and keeps its part."""
    from megatron.core import parallel_state
    from megatron.core.utils import unwrap_model

    gpt = unwrap_model(model)
    full = hf_to_megatron(hf_state_dict, cfg)
    rank = parallel_state.get_tensor_model_parallel_rank()
    size = parallel_state.get_tensor_model_parallel_world_size()
    local = {}
    for name, param in gpt.state_dict(keep_vars=True).items():
        if name.endswith("_extra_state"):  # Megatron's linear layers carry one; keep the model's
            local[name] = param
        else:
            local[name] = _tp_shard(full[_full_name(gpt, name, cfg)], param, rank, size)
    gpt.load_state_dict(local, strict=True)


# ---------------------------------------------------------------------------------------------
# Checkpoint folders


def load_hf_checkpoint(path: str | os.PathLike) -> tuple[ModelConfig, dict[str, Tensor]]:
    """(ModelConfig, HF state dict) from a folder with config.json and weights in
    model.safetensors, a sharded *.safetensors index, or pytorch_model.bin."""
    from safetensors.torch import load_file
    from transformers import AutoConfig

    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} holds no config.json: not a Hugging Face checkpoint folder")
    cfg = model_config_from_hf(AutoConfig.from_pretrained(path))
    state: dict[str, Tensor] = {}
    index = path / "model.safetensors.index.json"
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            state.update(load_file(path / shard))
    elif (path / "model.safetensors").is_file():
        state = load_file(path / "model.safetensors")
    elif (path / "pytorch_model.bin").is_file():
        state = torch.load(path / "pytorch_model.bin", map_location="cpu", weights_only=True)
    else:
        raise FileNotFoundError(
            f"{path} holds no model.safetensors, model.safetensors.index.json or pytorch_model.bin"
        )
    return cfg, state


def save_hf_checkpoint(
    path: str | os.PathLike, cfg: ModelConfig, hf_state_dict: dict[str, Tensor], tokenizer=None,
    config_extra: dict | None = None,
) -> None:
    """Write a folder `AutoModelForCausalLM.from_pretrained` loads: config.json,
    model.safetensors and (given a tokenizer) its files. Written beside `path` under a temporary
    name and renamed into place, so a crash never leaves a half-written checkpoint at `path`.
    `config_extra`: more config.json fields, as hf_config_from_model_config takes them (a reward
    model's architectures and num_labels)."""
    from safetensors.torch import save_file

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        hf_config_from_model_config(cfg, **(config_extra or {})).save_pretrained(tmp)
        tensors = {k: v.detach().contiguous().cpu() for k, v in hf_state_dict.items()}
        if cfg.tie_word_embeddings:
            tensors.pop("lm_head.weight", None)  # safetensors refuses shared storage
        save_file(tensors, tmp / "model.safetensors", metadata={"format": "pt"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
