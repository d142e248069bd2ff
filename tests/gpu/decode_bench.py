"""Generation speed of the torch rollout engine against transformers' `generate`, same weights.

On one GPU (prepared for an H200; under 90 s): a random Llama of about 1.1B parameters (hidden
2048, 16 layers, 32 heads, 8 key/value heads, SwiGLU 8192, vocabulary 32000) in bfloat16, 32
prompts of 120-136 tokens, K=8 samples each (256 rows), 128 new tokens at temperature 1. The
engine runs its static decode path with and without CUDA graphs; transformers runs
`generate(num_return_sequences=8, do_sample=True)` with top-k off. Each figure is the median of 3
calls after one warm-up call, prefill included on both sides.

Tokens counted: prompts x K x max_new_tokens on both sides. transformers is given no eos, so it
generates all of them; the engine's static path computes every row to the last step (finished
rows keep riding) and the script checks that each call did run to the last step.

Prints one JSON line: engine_tokens_per_s, engine_nograph_tokens_per_s, hf_generate_tokens_per_s,
ratio (engine / transformers). `--cpu-smoke` runs the same code with a tiny model on the CPU in
seconds, so the script cannot rot unnoticed. It imports neither megatron nor anything that does:
the GPU machine has no megatron-core.

    python tests/gpu/decode_bench.py              (needs CUDA)
    python tests/gpu/decode_bench.py --cpu-smoke
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))  # the repository root, without an install

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from metaapo_nemo.models.config import ModelConfig  # noqa: E402
from metaapo_nemo.rollout.engine import SamplingParams  # noqa: E402
from metaapo_nemo.rollout.torch_engine import TorchEngine  # noqa: E402

SIZES = {
    "gpu": dict(vocab_size=32000, hidden_size=2048, num_layers=16, num_attention_heads=32, num_query_groups=8,
                ffn_hidden_size=8192, prompts=32, prompt_len=128, k=8, max_new_tokens=128),
    "cpu-smoke": dict(vocab_size=128, hidden_size=64, num_layers=2, num_attention_heads=4, num_query_groups=2,
                      ffn_hidden_size=96, prompts=4, prompt_len=8, k=2, max_new_tokens=8),
}
PAD = 0


def median_seconds(call, device: torch.device) -> float:
    """Median wall time of 3 calls after one warm-up, the device idle at start and end of each."""
    call()
    times = []
    for _ in range(3):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        call()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU, fp32, a few seconds")
    args = parser.parse_args()
    if not args.cpu_smoke and not torch.cuda.is_available():
        sys.exit("decode_bench: this torch sees no CUDA device; run on a GPU machine or pass --cpu-smoke")
    size = SIZES["cpu-smoke" if args.cpu_smoke else "gpu"]
    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    if args.cpu_smoke:
        torch.set_num_threads(1)

    cfg = ModelConfig(
        vocab_size=size["vocab_size"], hidden_size=size["hidden_size"], num_layers=size["num_layers"],
        num_attention_heads=size["num_attention_heads"], num_query_groups=size["num_query_groups"],
        ffn_hidden_size=size["ffn_hidden_size"], max_position_embeddings=2048, norm_epsilon=1e-5,
    )
    hf_config = LlamaConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.ffn_hidden_size,
        num_hidden_layers=cfg.num_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_query_groups, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.norm_epsilon, rope_theta=cfg.rotary_base, tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device(device):  # initialised where it runs: 1.1B parameters on a CPU take minutes
        hf = LlamaForCausalLM(hf_config).to(dtype).eval()
    print(f"decode_bench: {sum(p.numel() for p in hf.parameters()) / 1e9:.2f}B parameters, {dtype}, {device}",
          file=sys.stderr)

    generator = torch.Generator().manual_seed(0)
    prompt_len, k, max_new = size["prompt_len"], size["k"], size["max_new_tokens"]
    lengths = torch.randint(prompt_len - prompt_len // 16, prompt_len + prompt_len // 16 + 1, (size["prompts"],),
                            generator=generator).tolist()
    prompts = [torch.randint(1, cfg.vocab_size, (n,), generator=generator).tolist() for n in lengths]
    tokens_per_call = len(prompts) * k * max_new
    params = SamplingParams(num_samples=k, temperature=1.0, top_p=1.0, max_new_tokens=max_new, seed=0)

    engine_seconds = {}
    for graphs in (True, False):
        engine = TorchEngine(cfg, eos_token_id=cfg.vocab_size - 1, pad_token_id=PAD, max_batch_size=len(prompts) * k,
                             dtype=dtype, device=device, cuda_graphs=graphs, static_decode=True)
        engine.refit(hf.state_dict())

        def generate() -> None:
            responses = engine.generate(prompts, params)
            if max(len(r) for per_prompt in responses for r in per_prompt) != max_new:
                raise RuntimeError("every row ended before max_new_tokens; the token count would be wrong")

        engine_seconds[graphs] = median_seconds(generate, device)
        del engine

    # transformers pads on the left for batched generation and derives positions from the mask.
    width = max(lengths)
    input_ids = torch.full((len(prompts), width), PAD)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        input_ids[i, width - len(p):] = torch.tensor(p)
        attention_mask[i, width - len(p):] = 1
    input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
    hf.generation_config.eos_token_id = None

    def hf_generate() -> None:
        with torch.inference_mode():
            out = hf.generate(input_ids, attention_mask=attention_mask, do_sample=True, temperature=1.0, top_p=1.0,
                              top_k=0, num_return_sequences=k, max_new_tokens=max_new, eos_token_id=None,
                              pad_token_id=PAD)
        if out.shape != (len(prompts) * k, width + max_new):
            raise RuntimeError(f"transformers returned {tuple(out.shape)}, not all {max_new} new tokens per row")

    hf_seconds = median_seconds(hf_generate, device)
    engine_tps = tokens_per_call / engine_seconds[True]
    hf_tps = tokens_per_call / hf_seconds
    print(json.dumps({
        "engine_tokens_per_s": round(engine_tps, 1),
        "engine_nograph_tokens_per_s": round(tokens_per_call / engine_seconds[False], 1),
        "hf_generate_tokens_per_s": round(hf_tps, 1),
        "ratio": round(engine_tps / hf_tps, 3),
    }))


if __name__ == "__main__":
    main()
