"""The architecture of a Llama-family decoder, in one small record shared by the Megatron
policy, the Hugging Face converter and the rollout engines."""
from __future__ import annotations

from dataclasses import asdict, dataclass

# Llama 3.1's RoPE scaling constants; Megatron's RotaryEmbedding._apply_scaling hard-codes them.
LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@dataclass
class ModelConfig:
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_query_groups: int  # key/value heads (grouped-query attention); = heads for plain MHA
    ffn_hidden_size: int  # SwiGLU inner width
    max_position_embeddings: int = 2048
    rotary_base: float = 10000.0
    norm_epsilon: float = 1e-5
    qkv_bias: bool = False  # Qwen2 puts a bias on q, k and v
    tie_word_embeddings: bool = False
    # Llama 3.1 "llama3" RoPE frequency scaling factor (low/high frequency factors 1 and 4 over
    # 8192 original positions, as Llama 3.1 ships); None = plain RoPE
    rope_scaling_factor: float | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def attention_width(self) -> float:
        """The row width at which a token's attention costs as many FLOPs as its other matrix
        products in a decoder layer: (q, k, v, output projection and SwiGLU weights) over
        (2 x heads x head_dim, scores and context per key). data.batching.collate weighs padding
        against row width with it; 720 for tiny_cpu, ~26600 for Llama 3.1 8B."""
        d, q, kv = self.head_dim, self.num_attention_heads, self.num_query_groups
        weights = self.hidden_size * (q + 2 * kv) * d + q * d * self.hidden_size + 3 * self.hidden_size * self.ffn_hidden_size
        return weights / (2 * q * d)

    def to_dict(self) -> dict:
        return asdict(self)
