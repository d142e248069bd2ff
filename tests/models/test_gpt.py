"""The Llama-style GPTModel builder and its SDPA core attention."""
import pytest
import torch

import megatron.core.utils
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.cpu_compat import TORCH_ON_CPU
from metaapo_nemo.models.gpt import SDPACoreAttention, build_gpt_model, transformer_config

CFG = ModelConfig(vocab_size=97, hidden_size=64, num_layers=2, num_attention_heads=4,
                  num_query_groups=2, ffn_hidden_size=96)


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture
def attentions(monkeypatch):
    """(ours, megatron's local DotProductAttention) for 4 query heads over 2 key/value groups."""
    # The reference's score buffer comes from megatron.core.utils' global memory buffer, which
    # allocates on CUDA; our code never uses it, so only this test points it at the CPU.
    monkeypatch.setattr(megatron.core.utils, "torch", TORCH_ON_CPU)
    config = transformer_config(CFG)
    kwargs = dict(config=config, layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self")
    return SDPACoreAttention(**kwargs), DotProductAttention(**kwargs)


def _qkv(sq, sk, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(sq, 2, 4, 16, generator=gen), torch.randn(sk, 2, 2, 16, generator=gen),
            torch.randn(sk, 2, 2, 16, generator=gen))


def test_sdpa_without_mask_equals_local_attention_with_causal_mask(attentions):
    ours, reference = attentions
    q, k, v = _qkv(7, 7)
    causal = torch.ones(7, 7, dtype=torch.bool).triu(1)  # megatron: True = masked
    out = ours(q, k, v, None)
    assert out.shape == (7, 2, 64)
    assert (out - reference(q, k, v, causal)).abs().max() <= 1e-5


def test_sdpa_applies_an_explicit_megatron_mask_like_local_attention(attentions):
    ours, reference = attentions
    q, k, v = _qkv(6, 6, seed=1)
    # causal plus left padding of 2 keys on the second row; every query keeps one key.
    mask = torch.ones(6, 6, dtype=torch.bool).triu(1).expand(2, 1, 6, 6).clone()
    mask[1, :, 2:, :2] = True
    assert (ours(q, k, v, mask) - reference(q, k, v, mask)).abs().max() <= 1e-5


def test_sdpa_aligns_fewer_queries_to_the_last_keys(attentions):
    """Decoding with a KV cache: 3 new queries attend to 7 keys, the queries being the last 3."""
    ours, reference = attentions
    q, k, v = _qkv(3, 7, seed=2)
    bottom_right_causal = torch.ones(3, 7, dtype=torch.bool).triu(7 - 3 + 1)
    assert (ours(q, k, v, None) - reference(q, k, v, bottom_right_causal)).abs().max() <= 1e-5


def test_built_model_has_llama_layout_and_sdpa_attention():
    model = build_gpt_model(CFG)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items() if not k.endswith("_extra_state")}
    assert shapes["decoder.layers.0.self_attention.linear_qkv.weight"] == ((4 + 2 * 2) * 16, 64)
    assert shapes["decoder.layers.0.mlp.linear_fc1.weight"] == (2 * 96, 64)  # [gate; up]
    assert shapes["output_layer.weight"] == (97, 64)
    assert not any(k.endswith("bias") for k in shapes)
    assert isinstance(model.decoder.layers[1].self_attention.core_attention, SDPACoreAttention)
    tied = build_gpt_model(ModelConfig(**{**CFG.to_dict(), "tie_word_embeddings": True, "qkv_bias": True}))
    names = {k for k in tied.state_dict() if not k.endswith("_extra_state")}
    assert "output_layer.weight" not in names
    biases = {k for k in names if k.endswith("bias")}
    assert biases == {f"decoder.layers.{i}.self_attention.linear_qkv.bias" for i in (0, 1)}


def test_bf16_model_gives_bf16_parameters():
    model = build_gpt_model(CFG, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_layout_that_does_not_divide_is_refused_with_what_to_change():
    bad = ModelConfig(**{**CFG.to_dict(), "num_query_groups": 3})
    with pytest.raises(ValueError, match="num_attention_heads 4 is not divisible by num_query_groups 3"):
        build_gpt_model(bad)
