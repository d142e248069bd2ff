"""Hugging Face import/export for the two layouts the recipes align: Llama-3.1 (GQA, "llama3" RoPE
scaling with factor 8 over theta 500000, untied head) and Qwen2.5 (q/k/v bias, GQA, theta 1e6,
tied embeddings in the small sizes).

The published configs map onto Megatron. Tiny random models with every feature of each layout
are loaded into Megatron on two gloo ranks, first with TP=2 and then with PP=2: the logits equal
transformers', every rank exports exactly the original weights, and the checkpoint rank 0 saves
reloads in transformers with the original logits. The test launches this file as its own worker
(the `__main__` block), as tests/models/test_parallel.py does.
"""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import (
    AutoConfig,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.hf_convert import (
    hf_config_from_model_config,
    model_config_from_hf,
)
from tests.helpers import run_ranks, spread_weights

REPO = Path(__file__).resolve().parents[2]
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}
# Tiny sizes that split over 2 tensor ranks (heads, groups, vocab, ffn) and 2 pipeline stages.
SIZES = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2)
LAYOUTS = ("llama31", "qwen25")


def tiny_model(layout: str, **changes):
    """A random model with all of `layout`'s features (same weights in every process); `changes`
    override config entries."""
    if layout == "llama31":
        config = dict(rope_theta=500000.0, rope_scaling=dict(LLAMA3_ROPE), max_position_embeddings=131072,
                      rms_norm_eps=1e-5, tie_word_embeddings=False)
        return spread_weights(LlamaForCausalLM(LlamaConfig(**SIZES, **{**config, **changes})), seed=10)
    if layout == "qwen25":
        config = dict(rope_theta=1000000.0, max_position_embeddings=32768, rms_norm_eps=1e-6,
                      tie_word_embeddings=True, use_sliding_window=False)
        return spread_weights(Qwen2ForCausalLM(Qwen2Config(**SIZES, **{**config, **changes})), seed=11)
    raise ValueError(f"unknown layout {layout!r}: use 'llama31' or 'qwen25'")


def _tokens() -> torch.Tensor:
    # 24 positions: enough for the llama3 scaling of the low RoPE frequencies to move the logits.
    return torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(3))


# ------------------------------------------------------------------------------------------
# Published configs (config.json as released, with the keys Megatron does not need)

LLAMA31_8B = {
    "architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009], "hidden_act": "silu",
    "hidden_size": 4096, "initializer_range": 0.02, "intermediate_size": 14336,
    "max_position_embeddings": 131072, "mlp_bias": False, "model_type": "llama",
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "pretraining_tp": 1,
    "rms_norm_eps": 1e-05, "rope_scaling": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                            "original_max_position_embeddings": 8192, "rope_type": "llama3"},
    "rope_theta": 500000.0, "tie_word_embeddings": False, "torch_dtype": "bfloat16", "use_cache": True,
    "vocab_size": 128256,
}
QWEN25_7B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 3584, "initializer_range": 0.02,
    "intermediate_size": 18944, "max_position_embeddings": 32768, "max_window_layers": 28,
    "model_type": "qwen2", "num_attention_heads": 28, "num_hidden_layers": 28, "num_key_value_heads": 4,
    "rms_norm_eps": 1e-06, "rope_theta": 1000000.0, "sliding_window": 131072, "tie_word_embeddings": False,
    "torch_dtype": "bfloat16", "use_cache": True, "use_sliding_window": False, "vocab_size": 152064,
}
QWEN25_05B = {**QWEN25_7B, "hidden_size": 896, "intermediate_size": 4864, "max_window_layers": 21,
              "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2,
              "sliding_window": 32768, "tie_word_embeddings": True, "vocab_size": 151936}


@pytest.mark.parametrize("published, expected", [
    (LLAMA31_8B, ModelConfig(vocab_size=128256, hidden_size=4096, num_layers=32, num_attention_heads=32,
                             num_query_groups=8, ffn_hidden_size=14336, max_position_embeddings=131072,
                             rotary_base=500000.0, norm_epsilon=1e-5, rope_scaling_factor=8.0)),
    (QWEN25_7B, ModelConfig(vocab_size=152064, hidden_size=3584, num_layers=28, num_attention_heads=28,
                            num_query_groups=4, ffn_hidden_size=18944, max_position_embeddings=32768,
                            rotary_base=1e6, norm_epsilon=1e-6, qkv_bias=True)),
    (QWEN25_05B, ModelConfig(vocab_size=151936, hidden_size=896, num_layers=24, num_attention_heads=14,
                             num_query_groups=2, ffn_hidden_size=4864, max_position_embeddings=32768,
                             rotary_base=1e6, norm_epsilon=1e-6, qkv_bias=True, tie_word_embeddings=True)),
], ids=["llama31-8b", "qwen25-7b", "qwen25-0.5b"])
def test_published_config_json_maps_to_megatron_and_back(published, expected, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(published))
    cfg = model_config_from_hf(AutoConfig.from_pretrained(tmp_path))
    assert cfg == expected
    assert model_config_from_hf(hf_config_from_model_config(cfg)) == cfg


@pytest.mark.parametrize("layout, without_the_feature", [
    ("llama31", dict(rope_scaling=None)),
    ("qwen25", dict(rope_theta=10000.0)),
])
def test_the_tiny_layouts_features_move_the_logits(layout, without_the_feature):
    """The parity checks below would catch a converter that dropped the layout's RoPE."""
    model, plain = tiny_model(layout), tiny_model(layout, **without_the_feature)
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), plain.parameters()))
    with torch.no_grad():
        assert (model(_tokens()).logits - plain(_tokens()).logits).abs().max() > 1e-2


def test_layouts_load_compute_and_export_under_tensor_and_pipeline_parallelism(tmp_path):
    run = run_ranks(2, __file__, str(tmp_path), timeout=240)
    assert run.stdout.count("layouts agree") == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        f"{layout}-{split}" for layout in LAYOUTS for split in ("tp2", "pp2")
    )


# ------------------------------------------------------------------------------------------
# The worker: every rank runs everything below.


def _pipeline_logits(model, tokens):
    """Logits [B, S, V] through the PP schedule (forward only): on the last stage, None before."""
    from megatron.core import parallel_state
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from metaapo_nemo.models.logprobs import decoder_hidden_states

    last = parallel_state.is_pipeline_last_stage()
    seen = []

    def forward_step(data_iterator, model):
        hidden = decoder_hidden_states(model, next(data_iterator))
        if not last:
            return hidden, None
        tied = model.shared_embedding_or_output_weight() if model.share_embeddings_and_output_weights else None
        logits, _ = model.output_layer(hidden, weight=tied)
        seen.append(logits.transpose(0, 1))
        return logits, lambda out: (out.sum() * 0, {})

    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([tokens]), model=[model], num_microbatches=1,
        seq_length=tokens.size(1), micro_batch_size=tokens.size(0), forward_only=True,
    )
    return seen[0] if last else None


def _check_layout(layout, split, hf_model, checkpoints):
    """Load under the current TP/PP split, compare logits, export, save from rank 0, reload."""
    import torch.distributed as dist
    from megatron.core import parallel_state

    from metaapo_nemo.models import hf_convert
    from metaapo_nemo.models.gpt import build_gpt_model
    from metaapo_nemo.models.logprobs import full_logits

    cfg = hf_convert.model_config_from_hf(hf_model.config)
    model = build_gpt_model(cfg, pre_process=parallel_state.is_pipeline_first_stage(),
                            post_process=parallel_state.is_pipeline_last_stage()).eval()
    hf_convert.load_hf_into_model(model, cfg, hf_model.state_dict())
    tokens = _tokens()
    with torch.no_grad():
        expected = hf_model(tokens).logits
        logits = full_logits(model, tokens) if split == "tp2" else _pipeline_logits(model, tokens)
    if logits is not None:
        diff = (logits - expected).abs().max().item()
        print(f"rank {dist.get_rank()} {layout} {split}: max |logits - transformers| = {diff:.3g}", flush=True)
        assert diff <= 1e-4, (layout, split, diff)

    exported = hf_convert.export_hf_state_dict(model, cfg)
    original = {k: v for k, v in hf_model.state_dict().items()
                if not (cfg.tie_word_embeddings and k == "lm_head.weight")}
    assert exported.keys() == original.keys(), (layout, split)
    assert all(torch.equal(exported[k], original[k]) for k in original), (layout, split)

    path = checkpoints / f"{layout}-{split}"
    if dist.get_rank() == 0:
        hf_convert.save_hf_checkpoint(path, cfg, exported)
    dist.barrier()
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(reloaded) is type(hf_model)
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, expected), (layout, split)


def _worker(checkpoints: Path):
    import torch.distributed as dist

    from metaapo_nemo.distributed import destroy_distributed, init_distributed

    torch.set_num_threads(1)
    hf_models = {layout: tiny_model(layout) for layout in LAYOUTS}
    for split, sizes in (("tp2", dict(tensor_model_parallel_size=2)),
                         ("pp2", dict(pipeline_model_parallel_size=2))):
        init_distributed(**sizes)
        for layout, hf_model in hf_models.items():
            _check_layout(layout, split, hf_model, checkpoints)
    print(f"rank {dist.get_rank()}: layouts agree", flush=True)
    destroy_distributed()


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
