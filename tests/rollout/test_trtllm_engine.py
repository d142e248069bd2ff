"""TrtllmEngine on CPU, against a stand-in for TensorRT-LLM (tests/rollout/fake_trtllm).

The stand-in is a stand-in: it records the engine's calls (LLM keyword arguments, one
SamplingParams per request, shutdown) and answers with deterministic token ids; it runs no model.
The real TensorRT-LLM engine has not run in this project's CI (no GPU, and tensorrt_llm cannot be
installed here). What these tests prove: our SamplingParams map onto TensorRT-LLM's; the engine is
sized from the run; build -> refit -> generate -> release -> refit -> generate calls TensorRT-LLM
in that order; the checkpoint folder a refit writes holds exactly the policy's HF weights (a
Megatron policy's export of tiny Llama-3.1 and Qwen2.5 models) and reloads in transformers with
the same logits; a refit that fails half-way leaves an engine that refuses to generate; and
validation refuses rollout.engine=trtllm where tensorrt_llm is absent.
"""
import importlib.util
import json
import re
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from metaapo_nemo.config import ConfigError, MetaAPOConfig
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.hf_convert import model_config_from_hf
from metaapo_nemo.models.policy import MegatronPolicy
from metaapo_nemo.rollout.engine import SamplingParams, build_engine
from metaapo_nemo.rollout.torch_engine import TorchEngine
from metaapo_nemo.rollout.trtllm_engine import TRTLLM_IMAGE, TrtllmEngine, export_root, stop_token_ids
from tests.models.test_hf_layouts import SIZES, tiny_model

FAKE = Path(__file__).parent / "fake_trtllm"
ROOT = Path(__file__).resolve().parents[2]
EOS, EOT, IM_END, GEN_EOS = 2, 3, 4, 9  # ids in the test tokenizer; GEN_EOS only in generation_config.json
STOPS = [EOS, GEN_EOS, EOT, IM_END]
PROMPTS = [[1, 10, 11, 12], [1, 20, 21], [1, 30, 31, 32, 33, 34]]


def _forget_tensorrt_llm():
    for name in [m for m in sys.modules if m == "tensorrt_llm" or m.startswith("tensorrt_llm.")]:
        del sys.modules[name]


@pytest.fixture
def trtllm(monkeypatch):
    """The stand-in importable as `tensorrt_llm` for one test, its call log empty."""
    monkeypatch.syspath_prepend(str(FAKE))
    _forget_tensorrt_llm()
    import tensorrt_llm

    tensorrt_llm.CALLS.clear()
    tensorrt_llm.FAIL_BUILD.clear()
    tensorrt_llm.LIKELY_TOKENS[:] = STOPS
    yield tensorrt_llm
    _forget_tensorrt_llm()  # so later tests see the real machine again, where tensorrt_llm is absent


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    """A word-level tokenizer over the tiny models' 96 ids with Llama-3 and Qwen chat end tokens,
    saved beside a generation_config.json that lists one more eos, as Llama-3.1's does."""
    names = ["<pad>", "<s>", "</s>", "<|eot_id|>", "<|im_end|>"] + [f"t{i}" for i in range(5, SIZES["vocab_size"])]
    fast = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({n: i for i, n in enumerate(names)},
                                                                               unk_token="<pad>")),
                                   bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    folder = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [EOS, GEN_EOS]}))
    return AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module", autouse=True)
def _parallel_state():
    init_distributed()


def policy_export(layout: str):
    """(ModelConfig, the HF model, a Megatron policy's HF export of it)."""
    hf = tiny_model(layout)
    cfg = model_config_from_hf(hf.config)
    policy = MegatronPolicy(cfg, hf.state_dict(), pad_id=0)
    return cfg, hf, policy.hf_state_dict()


def engine_for(tmp_path, tokenizer, layout="llama31", **kw):
    cfg, hf, weights = policy_export(layout)
    kw = {"max_prompt_length": 1500, "max_new_tokens": 600, "export_dir": str(tmp_path), **kw}
    return TrtllmEngine(cfg, tokenizer, **kw), weights


def calls(trtllm, kind):
    return [c for c in trtllm.CALLS if c[0] == kind]


def test_stop_tokens_are_eos_the_generation_config_list_and_chat_end_tokens(tokenizer):
    assert stop_token_ids(tokenizer) == STOPS


def test_sampling_params_map_onto_tensorrt_llms_one_request_per_sample(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    engine.refit(weights)
    params = SamplingParams(num_samples=3, temperature=0.7, top_p=0.9, max_new_tokens=5)
    out = engine.generate(PROMPTS[:2], params, prompt_seeds=[11, 12])
    [(_, inputs, sampling)] = calls(trtllm, "generate")
    assert inputs == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
    for sp in sampling:
        assert (sp.temperature, sp.top_p, sp.top_k, sp.max_tokens, sp.n) == (0.7, 0.9, None, 5, 1)
        assert sp.end_id == EOS and sp.pad_id == 0 and sp.stop_token_ids == [GEN_EOS, EOT, IM_END]
        assert sp.include_stop_str_in_output and not sp.detokenize
    seeds = [sp.seed for sp in sampling]
    assert len(set(seeds)) == 6
    assert [len(rs) for rs in out] == [3, 3]

    # A prompt's seeds, and so its samples, do not depend on the other prompts of the call.
    alone = engine.generate([PROMPTS[1]], params, prompt_seeds=[12])
    assert [sp.seed for sp in calls(trtllm, "generate")[-1][2]] == seeds[3:]
    assert alone == out[1:]
    other_seed = engine.generate([PROMPTS[1]], params, prompt_seeds=[13])
    assert not {sp.seed for sp in calls(trtllm, "generate")[-1][2]} & set(seeds)
    assert other_seed != alone


def test_greedy_asks_once_per_prompt_with_top_k_1_and_repeats_the_answer(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    engine.refit(weights)
    out = engine.generate(PROMPTS, SamplingParams(num_samples=4, greedy=True, max_new_tokens=6))
    [(_, inputs, sampling)] = calls(trtllm, "generate")
    assert inputs == PROMPTS
    assert all((sp.top_k, sp.top_p, sp.temperature, sp.n) == (1, None, None, 1) for sp in sampling)
    assert all(len(rs) == 4 and all(r == rs[0] for r in rs) for rs in out)


def test_responses_end_with_the_stop_token_that_ended_them(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    engine.refit(weights)
    out = engine.generate(PROMPTS, SamplingParams(num_samples=8, max_new_tokens=12), prompt_seeds=[1, 2, 3])
    responses = [r for rs in out for r in rs]
    ended = [r for r in responses if r[-1] in STOPS]
    # The stand-in drops the end id (eos) from token_ids, as TensorRT-LLM does: the engine puts it back.
    assert {r[-1] for r in ended} == set(STOPS)
    for r in responses:
        assert not set(r[:-1]) & set(STOPS)  # generation stopped at the first stop token
        assert r[-1] in STOPS or len(r) == 12
    assert engine.stats.new_tokens == sum(len(r) for r in responses)


def test_engine_is_sized_from_the_run_not_from_tensorrt_llms_1024_token_default(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer, tensor_parallel_size=2)
    assert trtllm.CALLS == []  # nothing is built before the first refit
    engine.refit(weights)
    [(_, kwargs)] = calls(trtllm, "LLM")
    assert kwargs["max_input_len"] == 1500 and kwargs["max_seq_len"] == 2100 and kwargs["max_num_tokens"] == 8192
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["dtype"] == "bfloat16"
    assert kwargs["skip_tokenizer_init"] and kwargs["sampler_type"] == "TRTLLMSampler"
    assert kwargs["kv_cache_config"].free_gpu_memory_fraction == 0.5 and kwargs["kv_cache_config"].enable_block_reuse
    long_prompt = [1] + [7] * 1199  # over TensorRT-LLM's default max_input_len of 1024
    [[response]] = engine.generate([long_prompt], SamplingParams(num_samples=1, max_new_tokens=600))
    assert 1 <= len(response) <= 600
    with pytest.raises(ValueError, match="prompt 0 has 1501 tokens, more than the engine's max_prompt_length 1500"):
        engine.generate([[1] * 1501], SamplingParams(num_samples=1, max_new_tokens=8))
    with pytest.raises(ValueError, match="max_new_tokens 601 exceeds the 600 the engine was built for"):
        engine.generate([[1]], SamplingParams(num_samples=1, max_new_tokens=601))


def test_lifecycle_build_refit_generate_release_refit_generate(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    params = SamplingParams(num_samples=2, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="call refit"):
        engine.generate(PROMPTS, params)
    engine.refit(weights)
    first = engine.weights_dir
    engine.generate(PROMPTS, params)
    engine.release()
    engine.refit(weights)
    second = engine.weights_dir
    engine.generate(PROMPTS, params)
    engine.release()
    engine.generate(PROMPTS, params)  # released without a new refit: rebuilt from the same folder
    kinds = [c[0] for c in trtllm.CALLS]
    assert kinds == ["LLM", "generate", "shutdown", "LLM", "generate", "shutdown", "LLM", "generate"]
    loaded = [c[1]["model"] for c in calls(trtllm, "LLM")]
    assert loaded == [str(first), str(second), str(second)]
    assert [c[1] for c in calls(trtllm, "shutdown")] == [str(first), str(second)]
    assert not first.exists() and second.is_dir()  # a refit deletes the folder it replaced
    engine.refit(weights)  # a refit while an LLM is live shuts that one down first
    assert [c[0] for c in trtllm.CALLS[-2:]] == ["shutdown", "LLM"]


@pytest.mark.parametrize("layout", ["llama31", "qwen25"])
def test_refit_folder_holds_the_policys_hf_weights_and_reloads_with_the_same_logits(
        trtllm, tokenizer, tmp_path, layout):
    from safetensors.torch import load_file

    cfg, hf, weights = policy_export(layout)
    expected = {k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")}

    bf16 = TrtllmEngine(cfg, tokenizer, max_prompt_length=16, max_new_tokens=8, export_dir=str(tmp_path / "bf16"))
    bf16.refit(weights)
    saved = load_file(bf16.weights_dir / "model.safetensors")
    assert {k: v.shape for k, v in saved.items()} == {k: v.shape for k, v in expected.items()}
    assert all(v.dtype == torch.bfloat16 and torch.equal(v, expected[k].bfloat16()) for k, v in saved.items())

    fp32 = TrtllmEngine(cfg, tokenizer, max_prompt_length=16, max_new_tokens=8, dtype=torch.float32,
                        export_dir=str(tmp_path / "fp32"))
    fp32.refit(weights)
    folder = fp32.weights_dir
    files = {p.name for p in folder.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= files
    reloaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokens = torch.randint(0, SIZES["vocab_size"], (2, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        assert torch.equal(reloaded(tokens).logits, hf(tokens).logits)
    assert AutoTokenizer.from_pretrained(folder).eos_token_id == EOS


def test_refit_refuses_weights_that_do_not_match_and_keeps_the_engine(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    engine.refit(weights)
    bad = dict(weights)
    bad["model.norm.weight"] = torch.ones(3)
    del bad["model.layers.0.mlp.up_proj.weight"]
    wrong = r"missing \['model.layers.0.mlp.up_proj.weight'\].*model.norm.weight: got \(3,\)"
    with pytest.raises(ValueError, match=wrong):
        engine.refit(bad)
    assert [c[0] for c in trtllm.CALLS] == ["LLM"]  # the live engine was not touched
    engine.generate(PROMPTS, SamplingParams(num_samples=2, max_new_tokens=3))


def test_refit_failing_half_way_breaks_the_engine_for_good(trtllm, tokenizer, tmp_path, monkeypatch):
    import safetensors.torch

    engine, weights = engine_for(tmp_path, tokenizer)
    engine.refit(weights)
    params = SamplingParams(num_samples=2, max_new_tokens=3)
    engine.generate(PROMPTS, params)

    def half_written(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"\0" * 100)  # a partial file, then the disk fills up
        raise OSError("No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="No space left"):
        engine.refit(weights)
    assert calls(trtllm, "shutdown")  # the old weights were already unloaded when the write failed
    root = engine.weights_dir.parent
    assert [p.name for p in root.iterdir()] == ["policy-000001"]  # nothing half-written under a final name
    message = "TensorRT-LLM engine is unusable: refit 2 failed (OSError: No space left on device)"
    with pytest.raises(RuntimeError, match=re.escape(message)):
        engine.generate(PROMPTS, params)
    monkeypatch.undo()
    with pytest.raises(RuntimeError, match=re.escape(message)):
        engine.refit(weights)
    assert [c[0] for c in trtllm.CALLS] == ["LLM", "generate", "shutdown"]


def test_refit_whose_llm_build_fails_breaks_the_engine(trtllm, tokenizer, tmp_path):
    engine, weights = engine_for(tmp_path, tokenizer)
    trtllm.FAIL_BUILD.append("CUDA out of memory")
    with pytest.raises(RuntimeError, match="CUDA out of memory"):
        engine.refit(weights)
    with pytest.raises(RuntimeError, match=re.escape("unusable: refit 1 failed (RuntimeError: CUDA out of memory)")):
        engine.generate(PROMPTS, SamplingParams(num_samples=2, max_new_tokens=3))


def test_build_engine_picks_the_engine_rollout_engine_names(tokenizer):
    cfg, _, _ = policy_export("llama31")
    torch_engine = build_engine("torch", cfg, tokenizer, max_prompt_length=16, max_new_tokens=8)
    assert isinstance(torch_engine, TorchEngine) and torch_engine.eos_token_id == EOS
    assert torch_engine.dtype == torch.float32  # its own default when dtype is not given
    bf16 = build_engine("torch", cfg, tokenizer, max_prompt_length=16, max_new_tokens=8, dtype=torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    trt = build_engine("trtllm", cfg, tokenizer, max_prompt_length=16, max_new_tokens=8, tensor_parallel_size=2,
                       dtype=torch.float16)
    assert isinstance(trt, TrtllmEngine) and (trt.tensor_parallel_size, trt.dtype) == (2, torch.float16)
    with pytest.raises(ValueError, match="unknown rollout engine 'vllm': use one of torch, trtllm"):
        build_engine("vllm", cfg, tokenizer, max_prompt_length=16, max_new_tokens=8)


def test_export_goes_to_the_first_folder_with_room(tmp_path):
    assert export_root(1000, (str(tmp_path / "absent"), str(tmp_path))) == str(tmp_path)
    with pytest.raises(OSError, match="no room for the 1048576.0 GiB refit checkpoint"):
        export_root(2**50, (str(tmp_path),))


def test_validation_refuses_trtllm_where_tensorrt_llm_is_absent_with_one_line():
    if importlib.util.find_spec("tensorrt_llm") is not None:
        pytest.skip("tensorrt_llm is installed here")
    config = MetaAPOConfig()
    config.task.enabled = True
    config.rollout.max_new_tokens = 16  # within the embedded model's positions
    config.validate()
    config.rollout.engine = "trtllm"
    with pytest.raises(ConfigError) as refused:
        config.validate()
    [line] = str(refused.value).splitlines()[1:]
    assert line == (f"  - rollout.engine=trtllm: tensorrt_llm is not installed here: run inside {TRTLLM_IMAGE} "
                    "(containers/Dockerfile builds on it) or `pip install tensorrt_llm==1.2.0 --extra-index-url "
                    "https://pypi.nvidia.com` on a CUDA machine; or use rollout.engine=torch")
    config.rollout.engine = "vllm"
    with pytest.raises(ConfigError, match="rollout.engine='vllm': use 'torch' or 'trtllm'"):
        config.validate()


def test_validation_accepts_trtllm_where_tensorrt_llm_imports(trtllm):
    config = MetaAPOConfig()
    config.task.enabled = True
    config.rollout.max_new_tokens = 16  # within the embedded model's positions
    config.rollout.engine = "trtllm"
    config.validate()


def test_dockerfile_pins_the_release_the_engine_names():
    text = (ROOT / "containers" / "Dockerfile").read_text()
    assert re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M).group(1) == TRTLLM_IMAGE
