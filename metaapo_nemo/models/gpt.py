"""The policy and the reference model: a Llama / Qwen2-style megatron-core GPTModel.

Built from the local (pure-PyTorch) layer spec, with one change: core attention calls
torch.nn.functional.scaled_dot_product_attention, which on CPU runs a fused kernel where the
local spec's baddbmm + softmax + bmm is the slowest part of a step (ECOSYSTEM.md, speed levers).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from metaapo_nemo.models import megatron_core  # noqa: F401  (first: megatron-core without TorchInductor)
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig

from metaapo_nemo.data.batching import Segments
from metaapo_nemo.distributed import use_cuda
from metaapo_nemo.models.config import ModelConfig


class SDPACoreAttention(MegatronModule):
    """Megatron's core-attention slot filled by torch's scaled_dot_product_attention.

    Tensors arrive per tensor-parallel partition, sequence first: query [sq, b, heads/tp, d],
    key/value [sk, b, groups/tp, d]; the head counts are read from the shapes, so the module is
    the same under any TP size. Returns [sq, b, heads/tp * d] as the local DotProductAttention does.
    """

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not support context parallelism")
        self.attn_mask_type = attn_mask_type
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = 1.0 / math.sqrt(head_dim) if softmax_scale is None else softmax_scale

    def forward(
        self,
        query: Tensor,
        key: Tensor,
        value: Tensor,
        attention_mask: Optional[Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[Tensor] = None,
        packed_seq_params=None,
    ) -> Tensor:
        if query.device.type == "cpu" and query.dtype in (torch.bfloat16, torch.float16):
            # torch's CPU flash kernel runs half precision 5-14x slower than fp32 at these sizes,
            # its backward above all (benchmarks/README.md, "bf16 on the CPU"): attend in fp32.
            # q, k and v are a small share of a layer's activations; the cast back keeps the
            # module's output dtype.
            return self.forward(query.float(), key.float(), value.float(), attention_mask, attn_mask_type,
                                attention_bias, packed_seq_params).to(query.dtype)
        if isinstance(packed_seq_params, SegmentedAttention) and attention_bias is None:
            return self._by_segments(query, key, value, packed_seq_params.segments)
        if packed_seq_params is not None or attention_bias is not None:
            raise ValueError("SDPACoreAttention takes neither packed sequences nor attention bias")
        sq, b, heads, d = query.shape
        sk = key.size(0)
        # [s, b, n, d] -> [b, n, s, d], the layout SDPA wants.
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        is_causal = False
        mask = None
        if attention_mask is not None:
            mask = ~attention_mask  # megatron: True = masked out; SDPA: True = attend
        elif (attn_mask_type or self.attn_mask_type) == AttnMaskType.causal and sq > 1:
            if sq == sk:
                is_causal = True
            else:
                # Queries are the last sq of sk positions (a KV cache); SDPA's is_causal would
                # align them to the first ones.
                mask = torch.ones(sq, sk, dtype=torch.bool, device=query.device).tril(sk - sq)
        context = F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.dropout_p if self.training else 0.0,
            is_causal=is_causal,
            scale=self.softmax_scale,
            enable_gqa=k.size(1) != heads,
        )
        # [b, n, sq, d] -> [sq, b, n * d]
        return context.permute(2, 0, 1, 3).reshape(sq, b, heads * d)

    def _by_segments(self, query: Tensor, key: Tensor, value: Tensor, segments: Segments) -> Tensor:
        """Attention of a batch laid out by data.batching.Segments: one causal SDPA over the
        prompts [G, heads, P, d], one masked SDPA of the responses' queries [N, heads, L, d] over
        their prompt's keys and their own [N, groups, P + L, d]; the outputs gathered back into
        megatron's [sq, b, heads * d]. Gathers and their backward (index_add) cost a copy of q, k
        and v; the attention FLOPs are those a mask keeps."""
        sq, b, heads, d = query.shape
        q, k, v = (t.reshape(sq * b, t.size(2), d) for t in (query, key, value))
        dropout = self.dropout_p if self.training else 0.0

        def take(t: Tensor, index: Tensor) -> Tensor:  # [M, L] flat indices -> [M, n, L, d]
            return t.index_select(0, index.reshape(-1)).view(*index.shape, t.size(1), d).transpose(1, 2)

        gqa = k.size(1) != heads
        prompt = F.scaled_dot_product_attention(take(q, segments.prompt_index), take(k, segments.prompt_index),
                                                take(v, segments.prompt_index), dropout_p=dropout, is_causal=True,
                                                scale=self.softmax_scale, enable_gqa=gqa)
        response = F.scaled_dot_product_attention(take(q, segments.response_index), take(k, segments.key_index),
                                                  take(v, segments.key_index), attn_mask=segments.response_mask,
                                                  dropout_p=dropout, scale=self.softmax_scale, enable_gqa=gqa)
        outputs = torch.cat([prompt.transpose(1, 2).reshape(-1, heads * d), response.transpose(1, 2).reshape(-1, heads * d)])
        return outputs.index_select(0, segments.out_index).view(sq, b, heads * d)


@dataclass
class SegmentedAttention(PackedSeqParams):
    """How a batch laid out by segments (data.batching.Segments) reaches SDPACoreAttention:
    megatron passes packed_seq_params from the decoder to every layer's core attention, and
    treats it as packed sequences only when qkv_format is 'thd' (left None here)."""

    segments: Optional[Segments] = None


def llama_layer_spec() -> ModuleSpec:
    """The local layer spec (RMSNorm, SwiGLU MLP) with SDPA as core attention."""
    spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def transformer_config(
    cfg: ModelConfig,
    dtype: torch.dtype = torch.float32,
    *,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
) -> TransformerConfig:
    """Megatron's TransformerConfig for a Llama / Qwen2 decoder, sized for the current TP/PP.

    dtype: the parameters' dtype (bf16 for Megatron mixed precision: the optimizer then keeps fp32
    main weights). recompute_*: Megatron's activation recomputation, fields of the same names
    ("full" with "uniform" | "block" and a layer count, or "selective"; None keeps every activation).
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    return TransformerConfig(
        num_layers=cfg.num_layers,
        hidden_size=cfg.hidden_size,
        num_attention_heads=cfg.num_attention_heads,
        num_query_groups=cfg.num_query_groups,
        ffn_hidden_size=cfg.ffn_hidden_size,
        kv_channels=cfg.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=cfg.norm_epsilon,
        gated_linear_unit=True,  # SwiGLU: linear_fc1 = [gate; up]
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=cfg.qkv_bias,
        rotary_interleaved=False,  # HF rotates halves, not interleaved pairs
        hidden_dropout=0.0,
        attention_dropout=0.0,
        # Every fused kernel below exists only for CUDA (or apex / transformer-engine).
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        use_cpu_initialization=True,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=tp,
        pipeline_model_parallel_size=pp,
        recompute_granularity=recompute_granularity,
        recompute_method=recompute_method,
        recompute_num_layers=recompute_num_layers,
    )


def _check_divisible(cfg: ModelConfig, tp: int, pp: int) -> None:
    problems = [
        f"{name} {value} is not divisible by {what} {size}"
        for name, value, what, size in (
            ("num_attention_heads", cfg.num_attention_heads, "tensor_model_parallel_size", tp),
            ("num_query_groups", cfg.num_query_groups, "tensor_model_parallel_size", tp),
            ("vocab_size", cfg.vocab_size, "tensor_model_parallel_size", tp),
            ("ffn_hidden_size", cfg.ffn_hidden_size, "tensor_model_parallel_size", tp),
            ("num_layers", cfg.num_layers, "pipeline_model_parallel_size", pp),
            ("num_attention_heads", cfg.num_attention_heads, "num_query_groups", cfg.num_query_groups),
        )
        if value % size
    ]
    if cfg.hidden_size % cfg.num_attention_heads:
        problems.append(
            f"hidden_size {cfg.hidden_size} is not divisible by num_attention_heads "
            f"{cfg.num_attention_heads}"
        )
    if problems:
        raise ValueError("model does not fit the parallel layout: " + "; ".join(problems))


def build_gpt_model(
    cfg: ModelConfig,
    *,
    pre_process: bool = True,
    post_process: bool = True,
    dtype: torch.dtype = torch.float32,
    recompute_granularity: Optional[str] = None,
    recompute_method: Optional[str] = None,
    recompute_num_layers: Optional[int] = None,
) -> GPTModel:
    """This rank's part of a Llama / Qwen2 decoder (call after `init_distributed`).

    pre_process / post_process: whether this pipeline stage holds the embedding / the final norm
    and LM head (first / last stage; both for PP=1). The LM head is left tensor-parallel
    (parallel_output=True): log-probs go through vocab_parallel_cross_entropy. dtype and
    recompute_*: as in `transformer_config`.
    """
    tp = parallel_state.get_tensor_model_parallel_world_size()
    pp = parallel_state.get_pipeline_model_parallel_world_size()
    _check_divisible(cfg, tp, pp)
    model = GPTModel(
        config=transformer_config(cfg, dtype, recompute_granularity=recompute_granularity,
                                  recompute_method=recompute_method, recompute_num_layers=recompute_num_layers),
        transformer_layer_spec=llama_layer_spec(),
        vocab_size=cfg.vocab_size,
        max_sequence_length=cfg.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=cfg.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=cfg.rotary_base,
        rope_scaling=cfg.rope_scaling_factor is not None,
        rope_scaling_factor=cfg.rope_scaling_factor or 8.0,  # megatron's default, unused when off
    )
    # The local spec's norms are torch.nn.RMSNorm built in fp32 whatever params_dtype says
    # (Megatron casts with its Float16Module wrapper, whose forward our log-probs bypass).
    # CPU initialisation draws the weights on the host; on a GPU machine they then move over.
    device = torch.cuda.current_device() if use_cuda() else "cpu"
    return model.to(device=device, dtype=dtype)
