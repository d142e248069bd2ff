"""Hugging Face <-> Megatron conversion: exact weight round trips, logits parity with
transformers, checkpoint folders transformers can load."""
import json

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models import hf_convert
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.logprobs import full_logits
from tests.helpers import spread_weights

SIZES = dict(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)




@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


@pytest.fixture(scope="module")
def hf_models():
    """A Llama (GQA, untied head) and a Qwen2 (qkv bias, tied embeddings)."""
    llama = LlamaForCausalLM(LlamaConfig(**SIZES, rope_theta=500.0, rms_norm_eps=1e-6))
    qwen = Qwen2ForCausalLM(Qwen2Config(**SIZES, tie_word_embeddings=True, rms_norm_eps=1e-5))
    return {"llama": spread_weights(llama, 0), "qwen2": spread_weights(qwen, 1)}


def _canonical(hf_model, cfg):
    """The state dict as Hugging Face saves it: a tied head is not stored twice."""
    sd = hf_model.state_dict()
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight")
    return sd


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_megatron_round_trip_returns_the_hf_weights_exactly(hf_models, kind):
    cfg = hf_convert.model_config_from_hf(hf_models[kind].config)
    sd = _canonical(hf_models[kind], cfg)
    back = hf_convert.megatron_to_hf(hf_convert.hf_to_megatron(sd, cfg), cfg)
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], sd[k]) for k in sd)


def test_linear_qkv_stacks_each_query_group_then_its_key_and_value():
    # 4 query heads in 2 groups, head_dim 1: rows are labelled by value.
    cfg = ModelConfig(vocab_size=8, hidden_size=4, num_layers=1, num_attention_heads=4,
                      num_query_groups=2, ffn_hidden_size=2, qkv_bias=True)
    q, k, v = torch.tensor([0.0, 1, 2, 3]), torch.tensor([10.0, 11]), torch.tensor([20.0, 21])
    hf = {
        "model.embed_tokens.weight": torch.zeros(8, 4), "model.norm.weight": torch.ones(4),
        "lm_head.weight": torch.zeros(8, 4),
        "model.layers.0.input_layernorm.weight": torch.ones(4),
        "model.layers.0.post_attention_layernorm.weight": torch.ones(4),
        "model.layers.0.self_attn.o_proj.weight": torch.zeros(4, 4),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(4, 2),
        "model.layers.0.mlp.gate_proj.weight": torch.full((2, 4), 7.0),
        "model.layers.0.mlp.up_proj.weight": torch.full((2, 4), 8.0),
    }
    for name, t in (("q", q), ("k", k), ("v", v)):
        hf[f"model.layers.0.self_attn.{name}_proj.bias"] = t
        hf[f"model.layers.0.self_attn.{name}_proj.weight"] = t[:, None].expand(-1, 4).clone()
    mega = hf_convert.hf_to_megatron(hf, cfg)
    expected = torch.tensor([0.0, 1, 10, 20, 2, 3, 11, 21])
    assert torch.equal(mega["decoder.layers.0.self_attention.linear_qkv.bias"], expected)
    assert torch.equal(mega["decoder.layers.0.self_attention.linear_qkv.weight"][:, 0], expected)
    fc1 = mega["decoder.layers.0.mlp.linear_fc1.weight"][:, 0]
    assert torch.equal(fc1, torch.tensor([7.0, 7, 8, 8]))  # [gate; up]


def test_tensor_parallel_shards_give_rank_r_its_gate_and_up_rows():
    full = torch.arange(8.0)[:, None]  # fc1 rows: gate 0-3, up 4-7
    param = torch.empty(4, 1)
    param.tensor_model_parallel, param.partition_dim, param.partition_stride = True, 0, 2
    shards = [hf_convert._tp_shard(full, param, rank, 2) for rank in range(2)]
    assert shards[0].flatten().tolist() == [0, 1, 4, 5]
    assert shards[1].flatten().tolist() == [2, 3, 6, 7]
    assert torch.equal(hf_convert._tp_unshard(shards, param), full)


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_megatron_logits_match_transformers_and_export_returns_the_weights(hf_models, kind):
    hf_model = hf_models[kind]
    cfg = hf_convert.model_config_from_hf(hf_model.config)
    model = build_gpt_model(cfg)
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (3, 13), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (full_logits(model, tokens) - hf_model(tokens).logits).abs().max() <= 1e-4
    exported, sd = hf_convert.export_hf_state_dict(model, cfg), _canonical(hf_model, cfg)
    assert exported.keys() == sd.keys()
    assert all(torch.equal(exported[k], sd[k]) for k in sd)


def test_llama31_rope_scaling_matches_transformers():
    hf_model = spread_weights(LlamaForCausalLM(LlamaConfig(
        **SIZES, max_position_embeddings=16384, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
    )), 3)
    cfg = hf_convert.model_config_from_hf(hf_model.config)
    assert cfg.rope_scaling_factor == 8.0
    model = build_gpt_model(cfg)
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    tokens = torch.randint(0, cfg.vocab_size, (2, 40), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (full_logits(model, tokens) - hf_model(tokens).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("qkv_bias, config_type", [(False, LlamaConfig), (True, Qwen2Config)])
def test_model_config_survives_the_hf_config_round_trip(qkv_bias, config_type):
    cfg = ModelConfig(vocab_size=50, hidden_size=32, num_layers=3, num_attention_heads=4,
                      num_query_groups=1, ffn_hidden_size=80, max_position_embeddings=512,
                      rotary_base=1e6, norm_epsilon=1e-6, qkv_bias=qkv_bias,
                      tie_word_embeddings=qkv_bias, rope_scaling_factor=None if qkv_bias else 8.0)
    hf_config = hf_convert.hf_config_from_model_config(cfg, eos_token_id=3)
    assert type(hf_config) is config_type and hf_config.eos_token_id == 3
    assert hf_convert.model_config_from_hf(hf_config) == cfg


@pytest.mark.parametrize("change, reason", [
    (dict(hidden_act="gelu"), "hidden_act"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "yarn"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_configs_megatron_cannot_reproduce_are_refused_with_the_reason(change, reason):
    with pytest.raises(ValueError, match=reason):
        hf_convert.model_config_from_hf(LlamaConfig(**SIZES, **change))


def test_weights_not_matching_the_config_are_named_in_the_error(hf_models):
    cfg = hf_convert.model_config_from_hf(hf_models["llama"].config)
    sd = dict(hf_models["llama"].state_dict())
    del sd["model.layers.1.mlp.up_proj.weight"]
    sd["model.layers.0.self_attn.o_proj.bias"] = torch.zeros(64)
    with pytest.raises(ValueError, match=r"up_proj.*o_proj\.bias"):
        hf_convert.hf_to_megatron(sd, cfg)


def _char_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {c: i for i, c in enumerate(["<unk>", "<eos>", *"abcdefgh "])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>")


def test_saved_checkpoint_loads_in_transformers_with_the_same_logits(hf_models, tmp_path):
    for kind, hf_model in hf_models.items():
        cfg = hf_convert.model_config_from_hf(hf_model.config)
        model = build_gpt_model(cfg)
        hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
        path = tmp_path / kind
        hf_convert.save_hf_checkpoint(path, cfg, hf_convert.export_hf_state_dict(model, cfg),
                                      tokenizer=_char_tokenizer())
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
        reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
        tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)
        assert AutoTokenizer.from_pretrained(path)("abc").input_ids == [2, 3, 4]
        loaded_cfg, loaded = hf_convert.load_hf_checkpoint(path)
        sd = _canonical(hf_model, cfg)
        assert loaded_cfg == cfg and loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)


def test_saving_over_an_existing_checkpoint_replaces_it(hf_models, tmp_path):
    cfg = hf_convert.model_config_from_hf(hf_models["llama"].config)
    (tmp_path / "ckpt").mkdir()
    (tmp_path / "ckpt" / "stale.bin").write_bytes(b"old")
    hf_convert.save_hf_checkpoint(tmp_path / "ckpt", cfg, hf_models["llama"].state_dict())
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]


def test_load_hf_checkpoint_reads_sharded_safetensors_and_pytorch_bin(hf_models, tmp_path):
    hf_model = hf_models["llama"]
    hf_model.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    hf_model.config.save_pretrained(tmp_path / "bin")
    torch.save(hf_model.state_dict(), tmp_path / "bin" / "pytorch_model.bin")
    sd = hf_model.state_dict()
    for folder in ("sharded", "bin"):
        cfg, loaded = hf_convert.load_hf_checkpoint(tmp_path / folder)
        assert cfg.num_query_groups == 2 and loaded.keys() == sd.keys()
        assert all(torch.equal(loaded[k], sd[k]) for k in sd)
    with pytest.raises(FileNotFoundError, match="config.json"):
        hf_convert.load_hf_checkpoint(tmp_path / "nowhere")
