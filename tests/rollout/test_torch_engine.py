"""TorchEngine against Hugging Face transformers: same logits, same greedy tokens, and sampling
that follows the softmax it should."""
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

from metaapo_nemo.models.config import LLAMA3_ROPE, ModelConfig
from metaapo_nemo.rollout.engine import SamplingParams
from metaapo_nemo.rollout.torch_engine import TorchEngine, sample
from tests.helpers import spread_weights

PAD = 0
PROMPTS = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [21], [30, 31, 32, 33, 34]]

LLAMA = ModelConfig(
    vocab_size=50, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, max_position_embeddings=128,
)
QWEN2 = ModelConfig(
    vocab_size=50, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, max_position_embeddings=128, rotary_base=1000.0, norm_epsilon=1e-6,
    qkv_bias=True, tie_word_embeddings=True,
)

LLAMA31 = ModelConfig(  # the Llama-3.1 layout: theta 5e5 and llama3 RoPE scaling
    vocab_size=50, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
    ffn_hidden_size=96, max_position_embeddings=128, rotary_base=500000.0, rope_scaling_factor=8.0,
)


def hf_model(cfg: ModelConfig, seed: int) -> torch.nn.Module:
    """A random HF model of `cfg` whose every parameter (biases and norms included) is drawn large
    enough that greedy choices are far from ties."""
    common = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.ffn_hidden_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_attention_heads, num_key_value_heads=cfg.num_query_groups,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rotary_base, rms_norm_eps=cfg.norm_epsilon,
        tie_word_embeddings=cfg.tie_word_embeddings,
    )
    if cfg.rope_scaling_factor is not None:
        common["rope_scaling"] = {"rope_type": "llama3", "factor": cfg.rope_scaling_factor, **LLAMA3_ROPE}
    if cfg.qkv_bias:
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return spread_weights(model, seed, scale=0.3, norm_scale=0.2)


def engine_for(cfg: ModelConfig, model: torch.nn.Module, eos: int, **kw) -> TorchEngine:
    engine = TorchEngine(cfg, eos_token_id=eos, pad_token_id=PAD, **kw)
    engine.refit(model.state_dict())
    return engine


def hf_greedy(model: torch.nn.Module, prompt: list[int], eos: int | None, max_new: int):
    model.generation_config.eos_token_id = eos
    out = model.generate(
        torch.tensor([prompt]), do_sample=False, max_new_tokens=max_new, pad_token_id=PAD,
        eos_token_id=eos,
    )
    return out[0, len(prompt):].tolist()


@pytest.fixture(scope="module", params=[LLAMA, QWEN2, LLAMA31], ids=["llama", "qwen2_bias_tied", "llama31_rope_scaling"])
def cfg_and_model(request):
    return request.param, hf_model(request.param, seed=0)


def test_prompt_logits_equal_hf_logits_for_prompts_of_different_lengths(cfg_and_model):
    cfg, model = cfg_and_model
    engine = engine_for(cfg, model, eos=1)
    for prompt, logits in zip(PROMPTS, engine.prompt_logits(PROMPTS)):
        with torch.no_grad():
            expected = model(torch.tensor([prompt])).logits[0]
        assert logits.shape == (len(prompt), cfg.vocab_size)
        torch.testing.assert_close(logits, expected, atol=1e-4, rtol=0)


def test_greedy_tokens_equal_hf_generate_with_eos_and_length_cut(cfg_and_model):
    cfg, model = cfg_and_model
    max_new = 12
    # eos = the token prompt 0 says third, so prompt 0 ends early while others run to the cut
    eos = hf_greedy(model, PROMPTS[0], None, max_new)[2]
    expected = [hf_greedy(model, p, eos, max_new) for p in PROMPTS]
    assert expected[0][-1] == eos and len(expected[0]) <= 3
    assert any(len(e) == max_new and eos not in e for e in expected)
    engine = engine_for(cfg, model, eos=eos)
    params = SamplingParams(num_samples=2, greedy=True, max_new_tokens=max_new)
    got = engine.generate(PROMPTS, params)
    assert got == [[e, e] for e in expected]
    assert engine.stats.new_tokens == 2 * sum(len(e) for e in expected)
    assert engine.stats.seconds > 0


def test_batches_smaller_than_the_prompt_set_give_the_same_greedy_tokens():
    model = hf_model(LLAMA, seed=1)
    params = SamplingParams(num_samples=3, greedy=True, max_new_tokens=6)
    whole = engine_for(LLAMA, model, eos=1).generate(PROMPTS, params)
    assert engine_for(LLAMA, model, eos=1, max_batch_size=4).generate(PROMPTS, params) == whole


def test_sampling_repeats_for_a_seed_and_changes_with_another_seed():
    engine = engine_for(LLAMA, hf_model(LLAMA, seed=2), eos=1)
    params = SamplingParams(num_samples=4, temperature=1.0, top_p=0.9, max_new_tokens=10, seed=7)
    first = engine.generate(PROMPTS, params)
    assert engine.generate(PROMPTS, params) == first
    params.seed = 8
    assert engine.generate(PROMPTS, params) != first
    assert len({tuple(r) for r in first[1]}) > 1  # the K samples of a prompt differ


def test_responses_end_at_eos_or_at_max_new_tokens():
    # eos = the most likely first token of prompt 0, so sampled responses hit it often
    engine = engine_for(LLAMA, hf_model(LLAMA, seed=3), eos=1)
    eos = int(engine.prompt_logits(PROMPTS[:1])[0][-1].argmax())
    engine.eos_token_id = eos
    responses = engine.generate(PROMPTS, SamplingParams(num_samples=8, max_new_tokens=7, seed=1))
    flat = [r for per_prompt in responses for r in per_prompt]
    assert len(responses) == len(PROMPTS) and all(len(s) == 8 for s in responses)
    assert all(1 <= len(r) <= 7 and eos not in r[:-1] for r in flat)
    assert all(r[-1] == eos for r in flat if len(r) < 7)
    assert any(len(r) < 7 for r in flat) and any(len(r) == 7 for r in flat)


def test_tiny_top_p_decodes_greedily():
    engine = engine_for(QWEN2, hf_model(QWEN2, seed=4), eos=1)
    greedy = engine.generate(PROMPTS, SamplingParams(num_samples=3, greedy=True, max_new_tokens=8))
    params = SamplingParams(num_samples=3, top_p=1e-6, max_new_tokens=8, seed=3)
    nucleus = engine.generate(PROMPTS, params)
    assert nucleus == greedy


def first_token_frequencies(engine: TorchEngine, prompt: list[int], params: SamplingParams):
    first_tokens = torch.tensor([r[0] for r in engine.generate([prompt], params)[0]])
    counts = torch.bincount(first_tokens, minlength=engine.cfg.vocab_size)
    return counts / counts.sum()


def test_first_tokens_follow_the_tempered_softmax():
    n = 4000
    engine = engine_for(LLAMA, hf_model(LLAMA, seed=5), eos=1, max_batch_size=n)
    prompt = PROMPTS[1]
    logits = engine.prompt_logits([prompt])[0][-1]
    probs = (logits / 2.0).softmax(-1)
    params = SamplingParams(n, temperature=2.0, max_new_tokens=1)
    freq = first_token_frequencies(engine, prompt, params)
    # total variation of n draws from probs is about 0.4 * sum(sqrt(p / n)) = 0.035 here
    assert 0.5 * (freq - probs).abs().sum() < 0.06
    assert 0.5 * (freq - logits.softmax(-1)).abs().sum() > 0.4  # temperature 1 would be far off


def test_nucleus_samples_only_the_top_set_in_proportion():
    n = 4000
    engine = engine_for(LLAMA, hf_model(LLAMA, seed=5), eos=1, max_batch_size=n)
    prompt = PROMPTS[1]
    probs = (engine.prompt_logits([prompt])[0][-1] / 2.0).softmax(-1)
    sorted_probs, order = probs.sort(descending=True)
    top = order[: int((sorted_probs.cumsum(0) < 0.6).sum()) + 1]  # smallest set with mass >= 0.6
    assert 1 < len(top) < LLAMA.vocab_size
    freq = first_token_frequencies(
        engine, prompt, SamplingParams(n, temperature=2.0, top_p=0.6, max_new_tokens=1)
    )
    outside = torch.ones(LLAMA.vocab_size, dtype=torch.bool)
    outside[top] = False
    assert freq[outside].sum() == 0
    expected = probs[top] / probs[top].sum()
    assert 0.5 * (freq[top] - expected).abs().sum() < 0.05


def test_refit_with_new_weights_gives_the_new_model_tokens_in_the_same_buffers():
    old, new = hf_model(LLAMA, seed=6), hf_model(LLAMA, seed=7)
    engine = engine_for(LLAMA, old, eos=1)
    params = SamplingParams(num_samples=1, greedy=True, max_new_tokens=8)
    before = engine.generate(PROMPTS, params)
    buffers = [t.data_ptr() for t in engine._slots.values()]
    engine.refit(new.state_dict())
    assert [t.data_ptr() for t in engine._slots.values()] == buffers
    after = engine.generate(PROMPTS, params)
    assert after != before
    assert after == [[hf_greedy(new, p, 1, 8)] for p in PROMPTS]


def test_release_frees_the_weights_until_the_next_refit():
    model = hf_model(LLAMA, seed=6)
    engine = engine_for(LLAMA, model, eos=1)
    params = SamplingParams(num_samples=3, max_new_tokens=8, seed=4)
    before = engine.generate(PROMPTS, params, prompt_seeds=[1, 2, 3, 4])
    engine.release()
    assert engine._slots == {} and engine._layers == [] and engine._embed is None  # nothing left to hold memory
    with pytest.raises(RuntimeError, match="call refit"):
        engine.generate(PROMPTS, params)
    engine.refit(model.state_dict())
    assert engine.generate(PROMPTS, params, prompt_seeds=[1, 2, 3, 4]) == before


def test_refit_rejects_wrong_keys_and_shapes_and_keeps_the_old_weights():
    model = hf_model(LLAMA, seed=8)
    engine = engine_for(LLAMA, model, eos=1)
    logits = engine.prompt_logits(PROMPTS)[1]
    good = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}

    missing = dict(good)
    del missing["model.layers.1.mlp.up_proj.weight"]
    with pytest.raises(ValueError, match=r"missing \['model.layers.1.mlp.up_proj.weight'\]"):
        engine.refit(missing)
    with pytest.raises(ValueError, match=r"unexpected \['model.layers.2.mlp.up_proj.weight'\]"):
        engine.refit({**good, "model.layers.2.mlp.up_proj.weight": torch.zeros(96, 64)})
    with pytest.raises(ValueError, match=r"model.norm.weight: got \(63,\), expected \(64,\)"):
        engine.refit({**good, "model.norm.weight": torch.zeros(63)})
    torch.testing.assert_close(engine.prompt_logits(PROMPTS)[1], logits, atol=0, rtol=0)


def test_refit_with_tied_embeddings_refuses_an_lm_head_that_differs():
    model = hf_model(QWEN2, seed=9)
    engine = TorchEngine(QWEN2, eos_token_id=1, pad_token_id=PAD)
    state = dict(model.state_dict())
    state["lm_head.weight"] = state["lm_head.weight"] + 1
    with pytest.raises(ValueError, match="ties word embeddings but lm_head.weight differs"):
        engine.refit(state)
    del state["lm_head.weight"]
    engine.refit(state)  # a tied export may leave the head out


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(num_samples=0), "num_samples must be >= 1"),
        (dict(temperature=0.0), "temperature must be > 0"),
        (dict(top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(max_new_tokens=0), "max_new_tokens must be >= 1"),
        (dict(seed=-1), "seed must be >= 0"),
    ],
)
def test_sampling_params_reject_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_greedy_params_ignore_temperature():
    assert SamplingParams(temperature=0.0, greedy=True).greedy


def test_generate_rejects_bad_calls_with_what_to_fix():
    engine = TorchEngine(LLAMA, eos_token_id=1, pad_token_id=PAD, max_batch_size=4)
    params = SamplingParams(num_samples=2, max_new_tokens=4)
    with pytest.raises(RuntimeError, match="call refit"):
        engine.generate(PROMPTS, params)
    engine.refit(hf_model(LLAMA, seed=10).state_dict())
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        engine.generate([[3], []], params)
    with pytest.raises(ValueError, match=r"prompt 0 has token ids outside the vocabulary"):
        engine.generate([[50]], params)
    with pytest.raises(ValueError, match="exceeds max_position_embeddings=128"):
        engine.generate([[3] * 125], params)
    with pytest.raises(ValueError, match="num_samples 8 exceeds max_batch_size 4"):
        engine.generate(PROMPTS, SamplingParams(num_samples=8))
    with pytest.raises(ValueError, match="eos_token_id 50 is outside the vocabulary"):
        TorchEngine(LLAMA, eos_token_id=50, pad_token_id=PAD)


def test_prompt_seeds_make_each_prompts_samples_independent_of_the_other_prompts_in_the_call():
    cfg = LLAMA
    engine = engine_for(cfg, hf_model(cfg, seed=0), eos=1, max_batch_size=16)
    params = SamplingParams(num_samples=4, max_new_tokens=10, seed=0)
    seeds = [11, 22, 33, 44]
    together = engine.generate(PROMPTS[:4], params, prompt_seeds=seeds)
    # Another order, another split into calls (as over two ranks), another engine batch size.
    reordered = engine.generate([PROMPTS[3], PROMPTS[1]], params, prompt_seeds=[44, 22])
    alone = engine.generate([PROMPTS[2]], params, prompt_seeds=[33])
    small = engine_for(cfg, hf_model(cfg, seed=0), eos=1, max_batch_size=4)
    one_per_batch = small.generate(PROMPTS[:4], params, prompt_seeds=seeds)
    assert reordered == [together[3], together[1]]
    assert alone == [together[2]]
    assert one_per_batch == together
    assert engine.generate(PROMPTS[:4], params, prompt_seeds=[12, 22, 33, 44])[0] != together[0]


def test_sampling_draws_exactly_what_torch_multinomial_draws():
    # sample() uses multinomial's own one-sample rule without its host syncs; on CPU the draws
    # must be bit-identical, per prompt generator and with one generator for all rows.
    logits = torch.randn(12, 50, generator=torch.Generator().manual_seed(0)) * 3
    probs = (logits / 0.7).softmax(-1)
    for rows_per_generator, seeds in ((4, [1, 2, 3]), (12, [9])):
        params = SamplingParams(temperature=0.7)
        got = sample(logits, params, [torch.Generator().manual_seed(s) for s in seeds], rows_per_generator)
        expected = torch.cat([torch.multinomial(block, 1, generator=torch.Generator().manual_seed(s))
                              for block, s in zip(probs.split(rows_per_generator), seeds)]).squeeze(1)
        assert torch.equal(got, expected)


def test_static_decode_gives_hf_greedy_tokens_and_the_dynamic_paths_samples(cfg_and_model):
    cfg, model = cfg_and_model
    max_new = 12
    eos = hf_greedy(model, PROMPTS[0], None, max_new)[2]  # prompt 0 ends early, the others run on
    static = engine_for(cfg, model, eos=eos, static_decode=True)
    assert static.static_decode and not static.cuda_graphs  # cuda_graphs only acts on CUDA
    greedy = SamplingParams(num_samples=2, greedy=True, max_new_tokens=max_new)
    assert static.generate(PROMPTS, greedy) == [[hf_greedy(model, p, eos, max_new)] * 2 for p in PROMPTS]
    # Masked unwritten slots change sums by rounding only, so per-prompt seeded draws agree.
    sampled = SamplingParams(num_samples=4, temperature=1.0, top_p=0.9, max_new_tokens=10)
    seeds = [11, 22, 33, 44]
    dynamic = engine_for(cfg, model, eos=eos)
    assert not dynamic.static_decode  # the CPU default
    expected = dynamic.generate(PROMPTS, sampled, prompt_seeds=seeds)
    assert static.generate(PROMPTS, sampled, prompt_seeds=seeds) == expected


def test_static_decode_replaying_one_captured_step_gives_the_eager_tokens(monkeypatch):
    import metaapo_nemo.rollout.torch_engine as torch_engine

    class ReplayedStep:
        """Stand-in for torch.cuda.CUDAGraph, which needs a GPU: capture leaves the output unset
        (NaN), each replay recomputes the captured step into that same output tensor."""

        def __init__(self, fn):
            self.fn, self.out = fn, torch.full_like(fn(), float("nan"))

        def replay(self):
            self.out.copy_(self.fn())

    captured = []

    def capture(fn, device):
        captured.append(ReplayedStep(fn))
        return captured[-1], captured[-1].out

    monkeypatch.setattr(torch_engine, "capture_cuda_graph", capture)
    model = hf_model(LLAMA, seed=12)
    eager = engine_for(LLAMA, model, eos=1, static_decode=True, max_batch_size=4)
    replayed = engine_for(LLAMA, model, eos=1, static_decode=True, max_batch_size=4)
    replayed.cuda_graphs = True  # forced: on CPU the constructor turns graphs off
    params = SamplingParams(num_samples=2, max_new_tokens=10, seed=3)
    seeds = [11, 22, 33, 44]
    assert replayed.generate(PROMPTS, params, prompt_seeds=seeds) == eager.generate(PROMPTS, params, prompt_seeds=seeds)
    assert len(captured) == 2  # one capture per batch (4 prompts x 2 samples, 4 rows a batch)


@pytest.mark.parametrize("static_decode", [False, True], ids=["dynamic", "static"])
def test_own_cache_is_allocated_once_and_written_in_place(static_decode, monkeypatch):
    model = hf_model(LLAMA, seed=11)
    max_new = 9
    engine = engine_for(LLAMA, model, eos=1, static_decode=static_decode)
    greedy = [hf_greedy(model, p, None, max_new) for p in PROMPTS]
    engine.eos_token_id = next(t for t in range(LLAMA.vocab_size) if all(t not in g for g in greedy))
    seen = []
    decode = engine._decode

    def recording(tokens, positions, step, prompt_cache, prompt_bias, own_cache, own_bias=None):
        seen.append((int(step), [(k.data_ptr(), v.data_ptr()) for k, v in own_cache]))
        return decode(tokens, positions, step, prompt_cache, prompt_bias, own_cache, own_bias)

    monkeypatch.setattr(engine, "_decode", recording)
    got = engine.generate(PROMPTS, SamplingParams(num_samples=2, greedy=True, max_new_tokens=max_new))
    assert got == [[g, g] for g in greedy]
    assert [step for step, _ in seen] == list(range(max_new - 1))
    assert all(pointers == seen[0][1] for _, pointers in seen)


def test_bfloat16_on_cpu_keeps_fp32_logits_within_bf16_rounding_and_its_first_tokens():
    cfg, model = LLAMA, hf_model(LLAMA, seed=0)
    fp32 = engine_for(cfg, model, eos=1)
    bf16 = engine_for(cfg, model, eos=1, device="cpu", dtype=torch.bfloat16)
    l32, l16 = fp32.prompt_logits(PROMPTS), bf16.prompt_logits(PROMPTS)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 per stored value); through two layers
    # of about ten rounded stores each, 10% of the largest logit bounds what compounds.
    err = max(float((a - b).abs().max()) for a, b in zip(l32, l16))
    assert err < 0.1 * max(float(a.abs().max()) for a in l32)
    params = SamplingParams(num_samples=2, greedy=True, max_new_tokens=8)
    got, expected = bf16.generate(PROMPTS, params), fp32.generate(PROMPTS, params)
    assert all(0 <= t < cfg.vocab_size for s in got for r in s for t in r)
    assert all(len(r) == 8 or (0 < len(r) < 8 and r[-1] == 1) for s in got for r in s)
    for logits, g, e in zip(l32, got, expected):
        top2 = logits[-1].topk(2).values
        if top2[0] - top2[1] > 2 * err:  # no logit error of size err can flip this argmax
            assert g[0][0] == e[0][0]


def test_constructor_rejects_a_bad_device_or_dtype_in_one_line():
    with pytest.raises(ValueError, match="'gpu0' is not a torch device; give e.g. 'cpu', 'cuda'"):
        TorchEngine(LLAMA, eos_token_id=1, pad_token_id=PAD, device="gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sees no CUDA device; use device='cpu'"):
            TorchEngine(LLAMA, eos_token_id=1, pad_token_id=PAD, device="cuda")
    with pytest.raises(ValueError, match="dtype must be torch.float32, torch.bfloat16 or torch.float16"):
        TorchEngine(LLAMA, eos_token_id=1, pad_token_id=PAD, dtype=torch.int8)


def test_gpu_decode_benchmark_runs_its_cpu_smoke_without_megatron():
    import json
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[2]
    # The GPU machine has no megatron-core: make importing it fail, then run the script.
    code = ("import sys, runpy; sys.modules['megatron'] = None; "
            "sys.argv = ['decode_bench.py', '--cpu-smoke']; "
            "runpy.run_path('tests/gpu/decode_bench.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    keys = {"engine_tokens_per_s", "engine_nograph_tokens_per_s", "hf_generate_tokens_per_s", "ratio"}
    assert set(result) == keys
    assert all(v > 0 for v in result.values())
    assert result["ratio"] == pytest.approx(result["engine_tokens_per_s"] / result["hf_generate_tokens_per_s"], rel=0.01)
