"""Offline and online DPO: this project against TRL (the peer), one process, equal work (issue 10).

    OMP_NUM_THREADS=1 python benchmarks/vs_trl.py [--repeats 2] [--threads 1] [--quick]

TRL is not a dependency of the project: when `import trl` fails, the benchmark installs
trl==1.16.0 with pip (and prints that it does). Both sides run in this process on the same tiny
model (the tiny_cpu Llama: vocab 64, hidden 128, 4 layers, GQA 4/2, 0.75M parameters, random
weights), the same toy-task data and sequences (prompts start with <bos>, responses end with
<eos>; TRL is given the same text, so it tokenizes the same ids), the same batch, learning rate,
beta 0.1, one epoch, `--threads` torch threads. Each measurement is the wall time of a whole
phase, from the HF model in memory and the text data to the end of the last optimiser step:
building the trainer (ours: the Megatron policy and reference; TRL: its trainer), tokenizing,
reference log-probs, generation and training. Per repeat the sides alternate (ours, then TRL)
within every phase; an untimed round at --quick sizes first pays one-time costs (imports, lazy
initialisation) for both. Ratios are ours over TRL's speed, i.e. TRL's median seconds over ours.

(a) offline DPO at equal work and precision: fp32 on both; reference log-probs computed once, in
    the timed phase, before training, in batches of 2 x batch sequences (ours: `reference.score`
    of every chosen and rejected sequence; TRL: `precompute_ref_log_probs=True`, batches of `batch`
    pairs, its pass over the dataset inside DPOTrainer's constructor); TRL without
    gradient checkpointing (its default recomputes every layer's forward in the backward pass,
    work ours does not do). Tokens counted: prompt + response tokens of the real, unpadded
    chosen and rejected sequences of the epoch, counted on each side from its own tokenization
    (the JSON carries both counts: they must agree). ratio_dpo_tokens_per_s = ours tokens/s over
    TRL's.
(b) our fastest setting against TRL's defaults: ours fp32 or bf16 (Megatron mixed precision:
    bf16 weights, fp32 main weights and gradients), whichever has the lower median, reference
    log-probs precomputed as in (a), in batches of BEST_REFERENCE_BATCH sequences; TRL's DPOConfig
    defaults: a reference-model forward in every step (the reference model a copy of the policy),
    bf16 autocast (its default also on the CPU), gradient checkpointing. ratio_dpo_best.
(c) one online iteration at equal work, fp32 on both: the same prompts, 2 samples per prompt at
    temperature 1, the same max new tokens, the toy task's programmatic reward as a Python
    callable on both sides, then one epoch of DPO on the resulting pairs. K = 2 on both sides
    because TRL's OnlineDPOTrainer (trl.experimental.online_dpo) always draws 2 completions per
    prompt, so both generate 2 x prompts sequences and train on one pair per prompt; ours keeps
    tied pairs (keep_ties=True) as TRL does. Ours: the torch rollout engine (refit from the
    policy, prompt KV cache shared by a prompt's samples), reward, best/worst pairs, reference
    log-probs of the pairs, then the training steps; TRL: its trainer, which in every step
    generates for `batch` prompts (HF generate, KV cache on since gradient checkpointing is off),
    scores them, runs the policy and the reference on the completions and steps.
    ratio_online_iteration.
(d) one online iteration, each side's best setting: ours fp32 (c) or bf16 (the policy and reference
    in Megatron bf16, the reference pass in batches of BEST_REFERENCE_BATCH sequences, the torch
    engine in fp32 as the pipeline runs it on the CPU), whichever has the lower median; TRL's (c)
    or OnlineDPOConfig's defaults (bf16 autocast, gradient checkpointing), whichever has the lower
    median. ratio_online_best.

Prints the per-repeat seconds and medians as a table (with the median CPU seconds of this process
beside them: on a busy machine wall time also holds the waits for a core, CPU time does not),
where the time goes, and as its last line a JSON object: the four ratios, each side's median
seconds, the settings each side actually ran with, the counts that must agree (pairs, tokens and
steps of (a) and (b); generated sequences, pairs and steps of (c) and (d)), the versions of torch,
transformers and trl.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable

import torch

TRL_VERSION = "1.16.0"
LR, BETA, TEMPERATURE, SAMPLES = 5e-5, 0.1, 1.0, 2


@dataclass
class Sizes:
    pairs: int  # offline pairs: one epoch of (a) and (b)
    batch: int  # pairs per optimiser step (prompts per step in (c)), one micro-batch
    prompts: int  # online prompts of (c)
    max_new_tokens: int


SIZES = {"default": Sizes(pairs=1024, batch=16, prompts=256, max_new_tokens=16),
         "quick": Sizes(pairs=32, batch=8, prompts=16, max_new_tokens=8)}


@dataclass
class Run:
    """One timed phase of one side: whole-phase wall seconds, what it processed, where the time went."""
    seconds: float
    counts: dict
    parts: dict = field(default_factory=dict)
    settings: dict = field(default_factory=dict)  # precision and recomputation as the side actually ran
    cpu_seconds: float = 0.0  # this process's CPU time over the phase: a check on wall time on a busy machine


def import_trl():
    try:
        import trl
    except ImportError:
        print(f"trl is not installed: installing trl=={TRL_VERSION} with pip (the peer of this benchmark, "
              "not a dependency of the project)", flush=True)
        pip = subprocess.run([sys.executable, "-m", "pip", "install", f"trl=={TRL_VERSION}"])
        if pip.returncode:
            raise SystemExit(f"could not install trl=={TRL_VERSION} (pip exited {pip.returncode}, its output is "
                             "above): install it into this environment by hand, then run the benchmark again")
        importlib.invalidate_caches()
        import trl
    if trl.__version__ != TRL_VERSION:
        raise SystemExit(f"trl {trl.__version__} is installed; this benchmark is written against trl=={TRL_VERSION} "
                         f"(its experimental online DPO API changes between releases): pip install trl=={TRL_VERSION}")
    return trl


class Task:
    """The model, tokenizer and data both sides get."""

    def __init__(self, sizes: Sizes):
        from transformers import LlamaConfig, LlamaForCausalLM

        from metaapo_nemo.data import toy_task
        from metaapo_nemo.models.hf_convert import model_config_from_hf

        self.sizes = sizes
        self.tokenizer = toy_task.build_tokenizer()
        torch.manual_seed(0)
        self.hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=64, hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, bos_token_id=1, eos_token_id=2, pad_token_id=0))
        self.cfg = model_config_from_hf(self.hf.config)
        self.pairs = toy_task.offline_pairs(toy_task.make_prompts(sizes.pairs, seed=1), seed=2, correct=0.4,
                                            informative=0.8, shift=0.5)
        self.prompts = toy_task.make_prompts(sizes.prompts, seed=3)
        self.reward = toy_task.reward


# ---------------------------------------------------------------- ours

def _megatron_models(task: Task, precision: str):
    from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

    weights = task.hf.state_dict()
    policy = MegatronPolicy(task.cfg, weights, pad_id=task.tokenizer.pad_token_id, precision=precision,
                            optim=OptimConfig(lr=LR, clip_grad=1.0))
    reference = MegatronPolicy(task.cfg, weights, pad_id=task.tokenizer.pad_token_id, precision=precision)
    return policy, reference


def _train_epoch(policy, chosen: list, rejected: list, ref_c, ref_r, batch: int, pad_id: int,
                 attention_width: float | None = None) -> int:
    """One epoch of DPO steps over the pairs (chosen[i], rejected[i]) in a seeded order; returns the steps."""
    from metaapo_nemo.algorithm.objectives import Objective, PairLogps
    from metaapo_nemo.data.batching import collate

    objective = Objective("dpo", beta=BETA)

    def make_batch(idx):
        return collate([chosen[i] for i in idx] + [rejected[i] for i in idx], pad_id, attention_width=attention_width)

    def loss_fn(idx, logp, ntok):
        n = len(idx)
        return objective.loss(PairLogps(logp[:n], logp[n:], ref_c[idx], ref_r[idx])).sum(), {}

    order = list(range(len(chosen)))
    random.Random(0).shuffle(order)
    steps = [order[s:s + batch] for s in range(0, len(order), batch)]
    for idx in steps:
        policy.train_step(idx, make_batch, loss_fn, micro_batch_size=batch)
    return len(steps)


BEST_REFERENCE_BATCH = 256  # sequences per reference batch in our best settings ((b), (d)): measured fastest in bf16


def ours_offline(task: Task, precision: str, reference_batch: int | None = None) -> Run:
    """reference_batch: sequences per batch of the reference pass (None: 2 x batch, TRL's own in (a))."""
    from metaapo_nemo.data.batching import encode_prompt, encode_response

    b, tok = task.sizes.batch, task.tokenizer
    started = time.perf_counter()
    policy, reference = _megatron_models(task, precision)
    prompts = [encode_prompt(tok, p["prompt"]) for p in task.pairs]
    chosen = [(q, encode_response(tok, p["chosen"])) for q, p in zip(prompts, task.pairs)]
    rejected = [(q, encode_response(tok, p["rejected"])) for q, p in zip(prompts, task.pairs)]
    built = time.perf_counter()
    n = len(chosen)
    reference_batch = reference_batch or 2 * b
    ref = reference.score(chosen + rejected, batch_size=reference_batch)[0]
    scored = time.perf_counter()
    steps = _train_epoch(policy, chosen, rejected, ref[:n], ref[n:], b, tok.pad_token_id, task.cfg.attention_width)
    done = time.perf_counter()
    tokens = sum(len(q) + len(r) for q, r in chosen + rejected)
    return Run(done - started, {"pairs": n, "tokens": tokens, "steps": steps},
               {"setup": built - started, "reference": scored - built, "training": done - scored},
               {"precision": precision, "reference_batch": reference_batch})


def ours_online(task: Task, precision: str = "fp32", reference_batch: int | None = None) -> Run:
    from metaapo_nemo.algorithm.pairs import build_online_pair
    from metaapo_nemo.data.batching import encode_prompt
    from metaapo_nemo.rollout.engine import SamplingParams, build_engine

    s, tok = task.sizes, task.tokenizer
    started = time.perf_counter()
    policy, reference = _megatron_models(task, precision)  # the engine in fp32 on the CPU, as the pipeline runs it
    prompts = [encode_prompt(tok, p) for p in task.prompts]
    engine = build_engine("torch", task.cfg, tok, max_prompt_length=max(map(len, prompts)),
                          max_new_tokens=s.max_new_tokens)
    built = time.perf_counter()
    engine.refit(policy.hf_state_dict())
    samples = engine.generate(prompts, SamplingParams(num_samples=SAMPLES, temperature=TEMPERATURE,
                                                      max_new_tokens=s.max_new_tokens, seed=0))
    generated = time.perf_counter()
    texts = [[tok.decode(r, skip_special_tokens=True) for r in rs] for rs in samples]
    rewards = task.reward([p for p, rs in zip(task.prompts, texts) for _ in rs], [r for rs in texts for r in rs])
    chosen, rejected = [], []
    for j, (q, rs, ids) in enumerate(zip(prompts, texts, samples)):
        pair, _ = build_online_pair(rs, rewards[j * SAMPLES:(j + 1) * SAMPLES], keep_ties=True)
        by_text = dict(zip(rs, ids))
        chosen.append((q, by_text[pair[0]]))
        rejected.append((q, by_text[pair[1]]))
    annotated = time.perf_counter()
    n = len(chosen)
    reference_batch = reference_batch or 2 * s.batch
    ref = reference.score(chosen + rejected, batch_size=reference_batch)[0]
    scored = time.perf_counter()
    steps = _train_epoch(policy, chosen, rejected, ref[:n], ref[n:], s.batch, tok.pad_token_id,
                         task.cfg.attention_width)
    done = time.perf_counter()
    return Run(done - started,
               {"sequences": sum(len(rs) for rs in samples), "pairs": n, "steps": steps,
                "generated_tokens": engine.stats.new_tokens},
               {"setup": built - started, "generation": generated - built, "reward": annotated - generated,
                "reference": scored - annotated, "training": done - scored},
               {"precision": precision, "reference_batch": reference_batch})


# ---------------------------------------------------------------- TRL

@contextlib.contextmanager
def _quiet():
    """TRL's Trainer prints its logs (disable_tqdm swaps the progress bar for a printer): kept off
    the benchmark's output, along with datasets' progress bars."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


def _trl_common(out: str, batch: int) -> dict:
    return dict(output_dir=out, use_cpu=True, per_device_train_batch_size=batch, num_train_epochs=1, learning_rate=LR,
                report_to="none", save_strategy="no", seed=0, disable_tqdm=True)


def _trl_settings(trainer) -> dict:
    mixed = trainer.accelerator.mixed_precision
    return {"precision": "fp32" if mixed == "no" else mixed + " autocast",
            "gradient_checkpointing": trainer.model.is_gradient_checkpointing}


def trl_offline(task: Task, defaults: bool) -> Run:
    """defaults=False: (a), fp32, reference log-probs precomputed, no gradient checkpointing;
    True: (b), DPOConfig's defaults with a reference model."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    class Timed(DPOTrainer):
        """Times the reference pass inside TRL's constructor; changes nothing."""
        reference = 0.0

        def _precompute_ref_logps(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._precompute_ref_logps(*args, **kwargs)
            Timed.reference += time.perf_counter() - started
            return out

    bos = task.tokenizer.bos_token
    data = [{"prompt": bos + p["prompt"], "chosen": p["chosen"], "rejected": p["rejected"]} for p in task.pairs]
    with tempfile.TemporaryDirectory() as out, _quiet():
        started = time.perf_counter()
        if defaults:  # the reference a copy of the policy, as TRL would load it from the policy's path
            config, ref_model = DPOConfig(**_trl_common(out, task.sizes.batch), beta=BETA), copy.deepcopy(task.hf)
        else:
            config = DPOConfig(**_trl_common(out, task.sizes.batch), beta=BETA, bf16=False,
                               gradient_checkpointing=False, precompute_ref_log_probs=True)
            ref_model = None  # precomputing, TRL takes the reference log-probs from the policy before training
        trainer = Timed(model=copy.deepcopy(task.hf), ref_model=ref_model, args=config,
                        train_dataset=Dataset.from_list(data), processing_class=task.tokenizer)
        built = time.perf_counter()
        trainer.train()
        done = time.perf_counter()
    d = trainer.train_dataset
    tokens = sum(2 * len(q) + len(c) + len(r) for q, c, r in zip(d["prompt_ids"], d["chosen_ids"], d["rejected_ids"]))
    return Run(done - started, {"pairs": len(d), "tokens": tokens, "steps": trainer.state.global_step},
               {"setup": built - started - Timed.reference, "reference": Timed.reference, "training": done - built}
               if not defaults else {"setup": built - started,
                                     "training (reference forward in every step)": done - built},
               _trl_settings(trainer))


def trl_online(task: Task, defaults: bool = False) -> Run:
    """defaults=False: (c), fp32, no gradient checkpointing; True: (d), OnlineDPOConfig's defaults
    (bf16 autocast and gradient checkpointing where they are its defaults)."""
    from datasets import Dataset
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    class Counted(OnlineDPOTrainer):
        """Counts and times the generation inside TRL's training steps; changes nothing."""
        sequences = tokens = 0
        generation = 0.0

        def _generate(self, *args, **kwargs):
            started = time.perf_counter()
            out = super()._generate(*args, **kwargs)
            Counted.generation += time.perf_counter() - started
            Counted.sequences += out[2].shape[0]
            Counted.tokens += int(out[3].sum())
            return out

    def reward(prompts, completions, **_):
        return task.reward(prompts, completions)

    s = task.sizes
    bos = task.tokenizer.bos_token
    with tempfile.TemporaryDirectory() as out, _quiet():
        started = time.perf_counter()
        precision = {} if defaults else dict(bf16=False, gradient_checkpointing=False)
        config = OnlineDPOConfig(**_trl_common(out, s.batch), beta=BETA, max_new_tokens=s.max_new_tokens,
                                 temperature=TEMPERATURE, **precision)
        trainer = Counted(model=copy.deepcopy(task.hf), reward_funcs=reward, args=config,
                          train_dataset=Dataset.from_list([{"prompt": bos + p} for p in task.prompts]),
                          processing_class=task.tokenizer)
        built = time.perf_counter()
        trainer.train()
        done = time.perf_counter()
    steps = trainer.state.global_step
    return Run(done - started,
               {"sequences": Counted.sequences, "pairs": Counted.sequences // SAMPLES, "steps": steps,
                "generated_tokens": Counted.tokens},
               {"setup": built - started, "generation": Counted.generation,
                "training (rest of the steps)": done - built - Counted.generation}, _trl_settings(trainer))


# ---------------------------------------------------------------- driver

def timed(run: Callable[[Task], Run], task: Task) -> Run:
    cpu = time.process_time()
    result = run(task)
    result.cpu_seconds = time.process_time() - cpu
    return result


PHASES = (  # (phase, side, what it runs)
    ("a", "ours fp32", lambda t: ours_offline(t, "fp32")),
    ("a", "TRL fp32, precomputed ref", lambda t: trl_offline(t, defaults=False)),
    ("b", "ours bf16", lambda t: ours_offline(t, "bf16", BEST_REFERENCE_BATCH)),
    ("b", "TRL defaults", lambda t: trl_offline(t, defaults=True)),
    ("c", "ours online iteration", ours_online),
    ("c", "TRL OnlineDPOTrainer", trl_online),
    ("d", "ours online iteration bf16", lambda t: ours_online(t, "bf16", BEST_REFERENCE_BATCH)),
    ("d", "TRL OnlineDPOTrainer defaults", lambda t: trl_online(t, defaults=True)),
)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="timed rounds, sides alternating in each")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads for both sides")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, one repeat: a smoke run for the tests")
    parser.add_argument("--count-flops", action="store_true",
                        help="after the timed rounds, run (a) once more per side, untimed, and count its matrix-product "
                             "FLOPs (torch.utils.flop_counter; attention kernels are not counted)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TQDM_DISABLE", "1")
    trl = import_trl()
    import datasets
    import transformers

    from metaapo_nemo.distributed import init_distributed

    datasets.disable_progress_bars()
    # Said once per model built, by megatron about its own defaults: noise here.
    warnings.filterwarnings("ignore", message="full scope is deprecated")
    transformers.logging.set_verbosity_error()
    init_distributed()
    sizes = SIZES["quick" if args.quick else "default"]
    repeats = 1 if args.quick else args.repeats
    print(f"warm-up round at --quick sizes (untimed), then {repeats} timed round(s): {sizes}", flush=True)
    warm = Task(SIZES["quick"])
    for _, _, run in PHASES:
        run(warm)
    task = Task(sizes)
    runs: dict[str, list[Run]] = {side: [] for _, side, _ in PHASES}
    for r in range(repeats):
        for phase, side, run in PHASES:
            runs[side].append(timed(run, task))
            print(f"  round {r + 1} ({phase}) {side:<30} {runs[side][-1].seconds:8.2f} s", flush=True)
    median = {side: statistics.median(x.seconds for x in rs) for side, rs in runs.items()}
    cpu = {side: statistics.median(x.cpu_seconds for x in rs) for side, rs in runs.items()}
    counts = {side: rs[0].counts for side, rs in runs.items()}

    (a_ours, a_trl), (b_bf16, b_trl), (c_ours, c_trl), (d_ours, d_trl) = (
        [side for p, side, _ in PHASES if p == phase] for phase in "abcd")
    best = min((a_ours, b_bf16), key=median.get)
    online_ours, online_trl = min((c_ours, d_ours), key=median.get), min((c_trl, d_trl), key=median.get)
    tokens_per_s = {side: counts[side]["tokens"] / median[side] for side in (a_ours, a_trl)}
    print(f"\n{args.threads} torch thread(s); {sizes.pairs} offline pairs, batch {sizes.batch}; online: "
          f"{sizes.prompts} prompts x {SAMPLES} samples, {sizes.max_new_tokens} new tokens at most")
    print(f"{'phase':<6} {'side':<30} " + " ".join(f"{'run ' + str(i + 1):>8}" for i in range(repeats))
          + f" {'median s':>9} {'cpu s':>6} {'tokens/s':>9}")
    for phase, side, _ in PHASES:
        per_token = f"{counts[side]['tokens'] / median[side]:9.0f}" if "tokens" in counts[side] else f"{'':>9}"
        print(f"{phase:<6} {side:<30} " + " ".join(f"{x.seconds:8.2f}" for x in runs[side])
              + f" {median[side]:9.2f} {cpu[side]:6.2f} {per_token}")
    print("\nwhere the time goes (seconds, last round):")
    for _, side, _ in PHASES:
        print(f"  {side:<30} " + ", ".join(f"{k} {v:.2f}" for k, v in runs[side][-1].parts.items()))
    result = {
        "ratio_dpo_tokens_per_s": tokens_per_s[a_ours] / tokens_per_s[a_trl],
        "ratio_dpo_best": median[b_trl] / median[best],
        "ratio_online_iteration": median[c_trl] / median[c_ours],
        "ratio_online_best": median[online_trl] / median[online_ours],
        "seconds": {"dpo_equal": {"ours": median[a_ours], "trl": median[a_trl]},
                    "dpo_best": {"ours": median[best], "trl": median[b_trl], "ours_fp32": median[a_ours],
                                 "ours_bf16": median[b_bf16], "ours_setting": "bf16" if best == b_bf16 else "fp32"},
                    "online_iteration": {"ours": median[c_ours], "trl": median[c_trl]},
                    "online_best": {"ours": median[online_ours], "trl": median[online_trl],
                                    "ours_setting": runs[online_ours][0].settings["precision"],
                                    "trl_setting": runs[online_trl][0].settings["precision"]}},
        "cpu_seconds": cpu,
        "settings": {side: rs[0].settings for side, rs in runs.items()},
        "dpo_tokens_per_s": {"ours": tokens_per_s[a_ours], "trl": tokens_per_s[a_trl]},
        "dpo_equal_counts": {"ours": counts[a_ours], "trl": counts[a_trl]},
        "dpo_best_counts": {"ours": counts[best], "trl": counts[b_trl]},
        "online_counts": {"ours": counts[c_ours], "trl": counts[c_trl]},
        "online_best_counts": {"ours": counts[online_ours], "trl": counts[online_trl]},
        "threads": args.threads, "repeats": repeats, "sizes": vars(sizes),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
    }
    if args.count_flops:
        result["dpo_equal_matmul_gflop"] = flops = {side: _matmul_gflop(run, task) for phase, side, run in PHASES
                                                    if phase == "a"}
        print("matrix-product GFLOP of (a), untimed run: " + ", ".join(f"{k} {v:.1f}" for k, v in flops.items())
              + f"; TRL's over ours {flops[a_trl] / flops[a_ours]:.2f}")
    print(json.dumps(result))
    return result


def _matmul_gflop(run: Callable[[Task], Run], task: Task) -> float:
    """The matrix-product FLOPs (mm, bmm, addmm, ...) one run of a phase performs, in GFLOP."""
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        run(task)
    return counter.get_total_flops() / 1e9


if __name__ == "__main__":
    main()
