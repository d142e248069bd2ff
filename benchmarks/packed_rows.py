"""The prompt computed once for the responses that share it (issue 10): packed rows against one
row per sequence, on the tiny_cpu model and the toy task's real sequences, one process.

    OMP_NUM_THREADS=1 python benchmarks/packed_rows.py [--reps 7] [--rounds 3] [--threads 1] [--letters 64 80] [--ops]

Separate rows are the layout before packing: each (prompt, response) right-padded in its own row,
causal attention with no mask. Packed rows are data.batching.collate's: a prompt group
[prompt | response 1 | response 2 | ...] behind a block mask (each response sees its prompt and
itself) with rotary positions that restart after the prompt, several groups to a row in the
layout of ROW_CAPACITIES with the least matrix-product work for the model ("masked rows, least
work", `segments=False`), at a fixed 1.6 times the longest group's tokens ("packed rows, capacity
1.6", an earlier default), or one group per row ("packed rows, one prompt per row",
`row_capacity=0`); or every group in one unpadded row attended by segments (data.batching.Segments:
one causal SDPA over the prompts, one over each response's queries against its prompt and itself;
"one row by segments", `segments=True`); "packed rows" is collate's default, the less work of the
last two by its cost model. Measured, with random weights (the speed does not depend on them),
16 prompts of the task (offline pairs at tiny_cpu's knobs, so spaced offline responses;
toy_task.sft_responses standing in for the policy's online samples); `--letters 64 80`: prompts of
64-80 letters, the generation-heavy variant of benchmarks/metaapo_cost.py (answers as long):

- fwd+bwd of the model and the response log-probs, 16 items x 4 responses (a MetaAPO training
  item: offline chosen/rejected, online chosen/rejected) and x 2 (an Online DPO item, a pair);
  also separate rows with an explicit causal mask: what SDPA's masked path costs by itself;
- one MetaAPO training step as recipe tiny_cpu runs it (MegatronPolicy.train_step, Adam, one
  micro-batch of 16 items: every offline pair, and an online pair for the 9 of 16 annotated, the
  58.5% annotation ratio of benchmarks/README.md's paper table; a DPO loss on each pair);
- one scoring pass of a tiny_cpu iteration's slice (512 offline pairs, MegatronPolicy.score,
  batches of 64 sequences): the pairs' chosen and rejected scored in one call (packed) or in two
  calls, which puts every sequence in a row of its own (the layout before packing).

Runs every variant once in turn, rounds x reps times, and prints the medians of wall time and of
CPU time (one thread: CPU time leaves out the spells another process held the core), and the
largest difference of the per-sequence log-prob sums between the layouts. --ops: the seconds per
aten op of the train step, masked rows against segments (a dispatch-mode timer around each op).
"""
import argparse
import random
import statistics
import time

import torch

PACKED = {"packed rows, one prompt per row": dict(row_capacity=0), "packed rows, capacity 1.6": dict(row_capacity=1.6),
          "masked rows, least work": dict(segments=False), "one row by segments": dict(segments=True), "packed rows": {}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--letters", type=int, nargs=2, metavar=("MIN", "MAX"), default=None,
                        help="letters per prompt (default: the task's own)")
    parser.add_argument("--ops", action="store_true", help="also where a train step's time goes, per aten op")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers import LlamaConfig, LlamaForCausalLM

    from metaapo_nemo.data import toy_task
    from metaapo_nemo.data.batching import collate, encode_prompt, encode_response
    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.models.hf_convert import model_config_from_hf
    from metaapo_nemo.models.logprobs import sequence_logprobs
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    init_distributed()
    tokenizer = toy_task.build_tokenizer()
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=128 if args.letters is None else 256,
                                      bos_token_id=1, eos_token_id=2, pad_token_id=0))
    cfg = model_config_from_hf(hf.config)
    policy = MegatronPolicy(cfg, hf.state_dict(), pad_id=0, optim=OptimConfig(lr=2e-5, clip_grad=1.0))
    model = policy.model

    letters = {} if args.letters is None else dict(min_letters=args.letters[0], max_letters=args.letters[1])
    prompts = toy_task.make_prompts(512, seed=1, **letters)
    pairs = toy_task.offline_pairs(prompts, seed=2, correct=0.4, informative=0.8, shift=0.5)
    online = [toy_task.sft_responses(prompts, seed=s) for s in (3, 4)]
    ids = [encode_prompt(tokenizer, p) for p in prompts]
    off_c = [(q, encode_response(tokenizer, p["chosen"])) for q, p in zip(ids, pairs)]
    off_r = [(q, encode_response(tokenizer, p["rejected"])) for q, p in zip(ids, pairs)]
    on_c, on_r = ([(q, encode_response(tokenizer, r)) for q, r in zip(ids, o)] for o in online)
    items = list(range(16))
    x4 = [s[i] for s in (off_c, off_r, on_c, on_r) for i in items]
    x2 = [s[i] for s in (off_c, off_r) for i in items]

    def mean_len(seqs, part):
        return statistics.fmean(len(s[part]) for s in seqs)
    print(f"CPU: {_cpu()}; torch {torch.__version__}, {args.threads} thread(s); "
          f"{args.rounds} rounds x {args.reps} reps")
    print(f"tokens: prompt {mean_len(off_c, 0):.1f}, offline response {mean_len(off_c + off_r, 1):.1f}, "
          f"online response {mean_len(on_c + on_r, 1):.1f} (mean over the 512 prompts)")

    def pack(seqs, layout):
        return collate(seqs, 0, attention_width=cfg.attention_width, **PACKED[layout])

    def fwd_bwd(batch):
        def run():
            model.zero_grad(set_to_none=True)
            sequence_logprobs(model, batch)[0].sum().backward()
        return run

    # tiny_cpu's real batch: 16 items, each with its offline pair, and an online pair for the ones
    # that were annotated (58.5% of the prompts in the paper-table runs: 9 of these 16 here).
    annotated = sorted(random.Random(0).sample(items, round(0.585 * len(items))))

    def step(layout):
        def make_batch(mb):  # as MetaAPO's make_batch orders them
            on = [i for i in mb if i in annotated]
            seqs = [off_c[i] for i in mb] + [off_r[i] for i in mb] + [on_c[i] for i in on] + [on_r[i] for i in on]
            if layout == "separate rows":
                return separate_rows(seqs, 0)
            return pack(seqs, layout)

        def loss_fn(mb, logp, ntok):
            b, m = len(mb), (len(logp) - 2 * len(mb)) // 2
            # DPO on both pairs against a zero reference: the cost of Eq. 5's loss, not its value.
            loss = -torch.nn.functional.logsigmoid(0.1 * (logp[:b] - logp[b:2 * b])).sum() \
                - torch.nn.functional.logsigmoid(0.1 * (logp[2 * b:2 * b + m] - logp[2 * b + m:])).sum()
            return loss, {}
        return lambda: policy.train_step(items, make_batch, loss_fn, micro_batch_size=len(items))

    def scoring(layout):
        if layout == "packed":
            return lambda: policy.score(off_c + off_r)
        return lambda: (policy.score(off_c), policy.score(off_r))

    variants = {
        "fwd+bwd 16 x 4": {"separate rows": fwd_bwd(separate_rows(x4, 0)),
                           "separate rows, causal mask": fwd_bwd(separate_rows(x4, 0, causal_mask=True)),
                           **{layout: fwd_bwd(pack(x4, layout)) for layout in PACKED}},
        "fwd+bwd 16 x 2": {"separate rows": fwd_bwd(separate_rows(x2, 0)),
                           "separate rows, causal mask": fwd_bwd(separate_rows(x2, 0, causal_mask=True)),
                           **{layout: fwd_bwd(pack(x2, layout)) for layout in PACKED}},
        "train step (16 items)": {"separate rows": step("separate rows"), **{layout: step(layout) for layout in PACKED}},
        "scoring pass (512 pairs)": {"separate rows": scoring("rows"), "packed rows": scoring("packed")},
    }
    # Round-robin, one call of each variant in turn, so a busy spell of the machine hits all alike;
    # CPU time (one thread) besides wall time, as it leaves out the time another process held the core.
    wall = {(w, v): [] for w, vs in variants.items() for v in vs}
    cpu = {key: [] for key in wall}
    for fn in (fn for layouts in variants.values() for fn in layouts.values()):
        fn()  # warm-up
    for _ in range(args.rounds * args.reps):
        for what, layouts in variants.items():
            for layout, fn in layouts.items():
                started, started_cpu = time.perf_counter(), time.process_time()
                fn()
                wall[(what, layout)].append(time.perf_counter() - started)
                cpu[(what, layout)].append(time.process_time() - started_cpu)

    print(f"\n{'what':<26} {'layout':<33} {'shape':>6} {'tokens':>6} {'wall ms':>8} {'speed-up':>8} "
          f"{'cpu ms':>7} {'speed-up':>8}   (medians of {args.rounds * args.reps})")
    step_seqs = x2 + [s[i] for s in (on_c, on_r) for i in annotated]
    shapes = {"fwd+bwd 16 x 4": x4, "fwd+bwd 16 x 2": x2, "train step (16 items)": step_seqs}
    for what, layouts in variants.items():
        base_wall = statistics.median(wall[(what, "separate rows")])
        base_cpu = statistics.median(cpu[(what, "separate rows")])
        for layout in layouts:
            w, c = statistics.median(wall[(what, layout)]), statistics.median(cpu[(what, layout)])
            shape = tokens = ""
            if what in shapes:
                batch = (separate_rows(shapes[what], 0) if layout.startswith("separate") else
                         pack(shapes[what], layout))
                shape, tokens = "x".join(map(str, batch.tokens.shape)), batch.tokens.numel()
            print(f"{what:<26} {layout:<33} {shape:>6} {tokens:>6} {w * 1e3:>8.1f} {base_wall / w:>7.2f}x "
                  f"{c * 1e3:>7.1f} {base_cpu / c:>7.2f}x")

    if args.ops:
        print("\nwhere one train step's time goes, per aten op (seconds inside each call, summed over 3 steps / 3):")
        for layout in ("masked rows, least work", "one row by segments"):
            seconds, total = op_seconds(variants["train step (16 items)"][layout])
            top = sorted(seconds.items(), key=lambda kv: -kv[1])[:8]
            print(f"  {layout}: {total * 1e3:.1f} ms a step; " + ", ".join(f"{op} {t * 1e3:.1f}" for op, t in top))

    policy.model.eval()
    with torch.no_grad():
        diffs = [(sequence_logprobs(model, collate(seqs, 0, segments=by_segments))[0]
                  - sequence_logprobs(model, separate_rows(seqs, 0))[0]).abs().max().item()
                 for seqs in (x4, x2) for by_segments in (True, False)]
        scored = (policy.score(off_c + off_r)[0] - torch.cat([policy.score(off_c)[0], policy.score(off_r)[0]]))
    print(f"\nmax |packed - separate| of the log-prob sums: fwd {max(diffs):.2e}, "
          f"scoring {scored.abs().max().item():.2e}")


def op_seconds(fn, steps: int = 3) -> tuple[dict[str, float], float]:
    """Seconds per aten op (the time inside each call, timed by a dispatch mode, so autograd's
    backward ops are caught too) and the wall seconds, each per call of fn, over `steps` calls."""
    from torch.utils._python_dispatch import TorchDispatchMode

    seconds: dict[str, float] = {}

    class Timed(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            started = time.perf_counter()
            out = func(*args, **(kwargs or {}))
            name = func.overloadpacket.__name__
            seconds[name] = seconds.get(name, 0.0) + (time.perf_counter() - started) / steps
            return out

    started = time.perf_counter()
    with Timed():
        for _ in range(steps):
            fn()
    return seconds, (time.perf_counter() - started) / steps


def separate_rows(sequences, pad_id: int, causal_mask: bool = False):
    """The layout before packing: each sequence right-padded in a row of its own."""
    from metaapo_nemo.data.batching import SequenceBatch

    lengths = [len(p) + len(r) for p, r in sequences]
    width = max(lengths)
    tokens = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    for row, (p, r) in enumerate(sequences):
        tokens[row, :lengths[row]] = torch.tensor(p + r)
    prompt_lens = torch.tensor([len(p) for p, _ in sequences])
    mask = ~torch.ones(width, width, dtype=torch.bool).tril().expand(len(sequences), 1, width, width)
    return SequenceBatch(tokens=tokens, position_ids=torch.arange(width).expand_as(tokens),
                         attention_mask=mask if causal_mask else None, rows=torch.arange(len(sequences)),
                         starts=prompt_lens, prompt_lens=prompt_lens, lengths=torch.tensor(lengths),
                         num_tokens=sum(lengths), prompt_starts=torch.zeros(len(sequences), dtype=torch.long))


def _cpu() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), [])
    return name + "".join(f", {f}" for f in ("avx512_bf16", "amx_bf16") if f in flags)


if __name__ == "__main__":
    main()
