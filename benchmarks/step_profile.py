"""Where one offline DPO train step of benchmarks/vs_trl.py's phase (a) spends its time, by function.

    OMP_NUM_THREADS=1 python benchmarks/step_profile.py [--steps 32]
    OMP_NUM_THREADS=1 python benchmarks/step_profile.py --against-hf [--rounds 7] [--shape 32,31]

Builds vs_trl.py's task and our fp32 policy and reference, computes the reference log-probs, runs
`--steps` train steps untimed (one-time costs), then `--steps` more under cProfile and prints
milliseconds per step (cumulative, cProfile's overhead included, so the Python-heavy parts read
high) for the step, its forward and backward, the optimizer, the matrix products of each pass and
the parts of a decoder layer's forward (megatron-core's functions and ours), per layer.

--against-hf: what megatron-core's eager modules cost against transformers' Llama at identical
work: one forward and backward (of the logits' logsumexp summed) of the same batch of --shape
(rows, columns) token ids, causal, no mask, no shared prompts, full LM head, through our fp32
megatron-core model and HF's LlamaForCausalLM holding the same weights (their logits checked equal
first); CPU milliseconds per call, the two alternating, 10 calls a round, the median over --rounds.
"""
from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vs_trl  # noqa: E402

# (label, file suffix, function name, per): per "step" divides by the steps, "layer" by steps x layers.
ROWS = [
    ("train step", "metaapo_nemo/models/policy.py", "train_step", "step"),
    ("  forward", "metaapo_nemo/models/policy.py", "forward_step", "step"),
    ("    matrix products (torch.matmul)", "~", "<built-in method torch.matmul>", "step"),
    ("  backward", "pipeline_parallel/schedules.py", "backward_step", "step"),
    ("    matrix products (Tensor.matmul)", "~", "<method 'matmul' of 'torch._C.TensorBase' objects>", "step"),
    ("  grad clip + AdamW", "metaapo_nemo/models/policy.py", "_clip_and_step", "step"),
    ("layer forward: attention block", "transformer/transformer_layer.py", "_forward_attention", "layer"),
    ("  q, k, v split", "transformer/attention.py", "get_query_key_value_tensors", "layer"),
    ("  rotary (q and k)", "embeddings/rope_utils.py", "_apply_rotary_pos_emb_bshd", "layer"),
    ("  core attention by segments", "metaapo_nemo/models/gpt.py", "_by_segments", "layer"),
    ("layer forward: MLP block", "transformer/transformer_layer.py", "_forward_mlp", "layer"),
    ("  SwiGLU", "transformer/mlp.py", "glu", "layer"),
]


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=32, help="train steps of 16 pairs, untimed, then profiled")
    parser.add_argument("--against-hf", action="store_true", help="megatron-core against HF Llama, same batch")
    parser.add_argument("--rounds", type=int, default=7, help="--against-hf: rounds of 10 calls per side")
    parser.add_argument("--shape", default="32,31", help="--against-hf: the batch's rows,columns")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.against_hf:
        return against_hf(args.rounds, tuple(int(n) for n in args.shape.split(",")))
    from metaapo_nemo.data.batching import encode_prompt, encode_response
    from metaapo_nemo.distributed import init_distributed

    init_distributed()
    batch = 16
    task = vs_trl.Task(vs_trl.Sizes(pairs=2 * args.steps * batch, batch=batch, prompts=1, max_new_tokens=1))
    tok = task.tokenizer
    policy, reference = vs_trl._megatron_models(task, "fp32")
    prompts = [encode_prompt(tok, p["prompt"]) for p in task.pairs]
    chosen = [(q, encode_response(tok, p["chosen"])) for q, p in zip(prompts, task.pairs)]
    rejected = [(q, encode_response(tok, p["rejected"])) for q, p in zip(prompts, task.pairs)]
    n, half = len(chosen), len(chosen) // 2
    ref = reference.score(chosen + rejected, batch_size=2 * batch)[0]

    def epoch(lo: int, hi: int) -> None:
        vs_trl._train_epoch(policy, chosen[lo:hi], rejected[lo:hi], ref[lo:hi], ref[n + lo:n + hi], batch,
                            tok.pad_token_id, task.cfg.attention_width)

    epoch(0, half)
    profiler = cProfile.Profile()
    profiler.enable()
    epoch(half, n)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # (file, line, name) -> (calls, primitive calls, tottime, cumtime, callers)
    out = {}
    for label, suffix, name, per in ROWS:
        seconds = sum(v[3] for (file, _, fn), v in stats.items() if fn == name and file.endswith(suffix))
        out[label.strip()] = 1000 * seconds / args.steps / (task.cfg.num_layers if per == "layer" else 1)
        print(f"{label:<40} {out[label.strip()]:8.2f} ms per {per}")
    return out


def against_hf(rounds: int, shape: tuple[int, int]) -> dict:
    import statistics
    import time

    from metaapo_nemo.distributed import init_distributed

    init_distributed()
    task = vs_trl.Task(vs_trl.SIZES["quick"])
    policy, _ = vs_trl._megatron_models(task, "fp32")
    ours, hf = policy.model.train(), task.hf.train()
    tokens = torch.randint(3, task.cfg.vocab_size, shape, generator=torch.Generator().manual_seed(0))
    positions = torch.arange(tokens.size(1)).expand_as(tokens)
    with torch.no_grad():
        diff = (ours(tokens, positions, None) - hf(input_ids=tokens).logits).abs().max().item()
    if diff > 1e-4:
        raise SystemExit(f"the two models' logits differ by {diff:.2e}: not the same work")
    sides = {"megatron-core GPTModel": lambda: ours(tokens, positions, None).logsumexp(-1).sum().backward(),
             "transformers LlamaForCausalLM": lambda: hf(input_ids=tokens).logits.logsumexp(-1).sum().backward()}
    for call in sides.values():  # one-time costs
        call()
    ms: dict[str, list[float]] = {name: [] for name in sides}
    for _ in range(rounds):
        for name, call in sides.items():
            started = time.process_time()
            for _ in range(10):
                call()
            ms[name].append(100 * (time.process_time() - started))
    out = {name: statistics.median(v) for name, v in ms.items()}
    print(f"forward + backward of a {list(shape)} batch, logits equal to {diff:.1e}, CPU ms per call (median of {rounds}):")
    for name, v in out.items():
        print(f"  {name:<32} {v:8.2f} ms")
    print(f"  megatron-core / transformers     {out['megatron-core GPTModel'] / out['transformers LlamaForCausalLM']:8.3f}")
    return out


if __name__ == "__main__":
    main()
