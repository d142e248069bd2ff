"""MetaAPO's own cost against Online DPO's, side by side, on the embedded task (issue 10).

    OMP_NUM_THREADS=1 python benchmarks/metaapo_cost.py [--repeats 2] [--out results/metaapo_cost]
        [--cache DIR] [--seed 1] [--quick] [--profile] [KEY=VALUE ...]

Recipe tiny_cpu, 1 torch thread, `algo.probe_unsampled=0` (the potential-gain probe is a
diagnostic, not a cost), the same seed for every run. Two settings:

- default: the embedded task as the recipe builds it (responses of 5-9 tokens);
- generation_heavy: the same task with 64-80 letters per prompt (GENERATION_HEAVY), so responses
  are 65-81 tokens, eos included: generation weighs as it does in the paper's 2048-token runs.

Both tasks are built (or found in --cache, default OUT/cache) before any timer, by a process of
their own. Then every run is its own process (`--run-one`), metaapo and online_dpo alternating,
the order swapped every repeat; its peak resident memory is the ru_maxrss that os.wait4 reports
for it: the largest of the run's process and the processes it waited for (its reward server,
about 90 MiB, among them), not their sum. Printed: per setting the median over
repeats of each phase's seconds (summary.json `seconds`); `other`, the run's total minus the task
build and the phases (set-up, reward server start, checkpoints, refits before sampling, the final
checkpoint); the total without the task build and without `reference` (the offline pairs'
reference log-probs, computed once per data set and reference and cached across runs like the
task build; its own column); the ratio metaapo / online_dpo; the peak RSS; the mean sampled
response length (summary `tokens.generation` over the K samples of the annotated prompts). The
last line is a JSON object: ratio_default, ratio_generation_heavy, per setting and method the
median seconds per phase, the meta-learner's share of the training seconds (seconds.meta /
seconds.training), the mean response length, rewards, the peak RSS and the package versions.

--quick: the task and loop shrunk as the tests shrink them (paper_table.QUICK_OVERRIDES; the
generation-heavy SFT at 120 steps, QUICK_SETTINGS), one repeat: ~1.5 minutes once its tasks are
cached, ~3.5 with the builds on a quiet 2-core machine. --profile: one metaapo run of the default
setting under torch.profiler (CPU activities), printing the top 15 operations by self CPU time
and where the seconds outside the phases go (set-up parts, checkpoints, refits, final export),
timed by wrapping those functions.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from paper_table import QUICK_OVERRIDES, markdown_table, seconds_excluding_prepare  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("metaapo", "online_dpo")
PHASES = ("scoring", "sampling", "annotation", "training", "evaluation", "meta")
# Paid once per data set and reference and cached across runs, like the task build (the reference
# log-probs of every offline pair, models/reference_cache.py): a column of its own, not in the total,
# so the first run of a setting (which computes them) compares with the next (which reads them).
ONCE = "reference"
# Responses of 65-81 tokens: prompts of up to 86 tokens (<bos>rev:...=), 96 new tokens at most,
# which with the prompt fits the embedded model's 2 x 80 + 32 = 192 positions.
GENERATION_HEAVY = ["task.min_letters=64", "task.max_letters=80", "policy.max_prompt_length=96",
                    "policy.max_length=192", "rollout.max_new_tokens=96"]
SETTINGS = {"default": [], "generation_heavy": GENERATION_HEAVY}
# --quick's 40 SFT steps leave a model that stops long answers early (55 tokens on average, seed 1);
# 120 steps learn the length (74.5 tokens), for ~1 minute more of task build.
QUICK_SETTINGS = {"generation_heavy": ["task.sft_steps=120"]}
COMMON = ["trainer.num_threads=1", "algo.probe_unsampled=0"]


# ---------------------------------------------------------------- one run, in its own process
def config_for(overrides: list[str]):
    from metaapo_nemo.config import apply_overrides
    from metaapo_nemo.recipes import get_recipe

    config = get_recipe("tiny_cpu")
    apply_overrides(config, overrides)
    return config


def build_task(overrides: list[str]) -> None:
    """Build (or find) the embedded task of these overrides, so no timed run builds it."""
    import torch

    from metaapo_nemo.data.embedded import prepare_embedded_task
    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.metrics import Console

    config = config_for(overrides)
    torch.set_num_threads(1)
    init_distributed(seed=config.seed)
    prepare_embedded_task(config.task, config.seed, Console())


def run_one(overrides: list[str]) -> None:
    from metaapo_nemo.algorithm.metaapo import run_metaapo

    run_metaapo(config_for(overrides))


def child(mode: str, overrides: list[str], log: Path) -> tuple[int, float]:
    """`metaapo_cost.py --MODE overrides...` as a process of its own, output to `log`: (its peak
    RSS in KiB, its wall seconds). Fails with the log's tail."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, f"--{mode}", *overrides], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
        _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{mode} {' '.join(overrides)} failed; the end of {log}:\n" + log.read_text()[-3000:])
    return usage.ru_maxrss, time.perf_counter() - started


# ---------------------------------------------------------------- what a run measured
def run_numbers(out: Path, num_samples: int) -> dict:
    """One run's seconds per phase, other, total (task build excluded), meta share and response length."""
    summary = json.loads((out / "summary.json").read_text())
    secs = summary["seconds"]
    total = seconds_excluding_prepare(secs) - secs.get(ONCE, 0.0)
    numbers = {p: secs.get(p, 0.0) for p in PHASES}
    numbers["other"] = total - sum(numbers.values())
    numbers["total"] = total
    numbers[ONCE] = secs.get(ONCE, 0.0)
    numbers["meta_share"] = secs.get("meta", 0.0) / secs["training"] if secs.get("training") else 0.0
    samples = summary["prompts_annotated"] * num_samples
    numbers["response_tokens_mean"] = summary["tokens"]["generation"] / samples if samples else 0.0
    numbers["reward_initial"], numbers["reward_final"] = summary["reward_initial"], summary["reward_final"]
    numbers["annotation_ratio"] = summary["annotation_ratio"]
    return numbers


def medians(runs: list[dict]) -> dict:
    return {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def versions() -> dict:
    from importlib.metadata import version

    import torch

    return {"python": platform.python_version(), "torch": torch.__version__,
            "megatron-core": version("megatron-core"), "transformers": version("transformers"),
            "machine": platform.machine(), "cpus": os.cpu_count(), "torch_threads": 1}


COLUMNS = ["setting", "method", *[f"{p} s" for p in PHASES], "other s", "total s (no build)", "x online_dpo",
           f"{ONCE} s", "peak RSS MiB", "response tokens", "reward start -> end", "annot. ratio"]


def table(results: dict) -> str:
    lines = []
    for setting, by_method in results.items():
        base = by_method["online_dpo"]["total"]
        for method, m in by_method.items():
            lines.append([setting, method, *[f"{m[p]:.2f}" for p in PHASES], f"{m['other']:.2f}", f"{m['total']:.2f}",
                          f"{m['total'] / base:.3f}", f"{m[ONCE]:.2f}", f"{m['peak_rss_kib'] / 1024:.0f}",
                          f"{m['response_tokens_mean']:.1f}",
                          f"{m['reward_initial']:.3f} -> {m['reward_final']:.3f}", f"{m['annotation_ratio']:.3f}"])
    return markdown_table(COLUMNS, lines)


# ---------------------------------------------------------------- profile
def profile_one(overrides: list[str]) -> None:
    """One run under torch.profiler, with the functions that run outside the phase timers wrapped
    in timers of their own; prints both."""
    from collections import defaultdict

    started = time.perf_counter()
    # Imported here, before the run, so that the wrappers below are what the run calls; a plain run
    # imports them inside its set-up, so this time is part of its `other` seconds.
    from torch.profiler import ProfilerActivity, profile

    from metaapo_nemo.algorithm import metaapo
    from metaapo_nemo import preflight
    from metaapo_nemo.models import hf_convert, policy
    from metaapo_nemo.reward import client, local
    from metaapo_nemo.rollout import engine
    from metaapo_nemo.rollout.torch_engine import TorchEngine

    imports = time.perf_counter() - started
    timers: dict[str, list] = defaultdict(lambda: [0, 0.0])

    def timed(owner, name, label):
        inner = getattr(owner, name)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                timers[label][0] += 1
                timers[label][1] += time.perf_counter() - started
        setattr(owner, name, wrapper)

    # Outside every phase timer: set-up and its parts, checkpoints and their parts, the refit and
    # gather around sampling, the final export.
    for owner, name, label in (
            (metaapo.MetaAPORun, "setup", "set-up (task build included)"),
            (preflight, "check_inputs", "  input checks (preflight)"),
            (local, "start_local_reward_server", "  reward server start"),
            (client.RewardClient, "wait_until_healthy", "  reward server /health wait"),
            (hf_convert, "load_hf_checkpoint", "  HF checkpoints read"),
            (policy.MegatronPolicy, "__init__", "  Megatron policy and reference built"),
            (engine, "build_engine", "  rollout engine built"),
            (metaapo.MetaAPORun, "_tokenize", "  offline pairs tokenized"),
            (metaapo.MetaAPORun, "_save_checkpoint", "checkpoints"),
            (policy.MegatronPolicy, "save_checkpoint", "  policy and optimizer (dist_checkpointing)"),
            (metaapo, "_fsync_files", "  fsync"),
            (metaapo.MetaAPORun, "_online_pairs", "online pairs (refit + sampling + annotation + gather)"),
            (TorchEngine, "refit", "engine refits (4 of them inside evaluation)"),
            (metaapo.MetaAPORun, "_decide_and_annotate", "phases 1-5 with their checkpoint"),
            (metaapo.MetaAPORun, "policy_to_hf", "final HF checkpoint")):
        timed(owner, name, label)
    config = config_for(overrides)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        summary = metaapo.MetaAPORun(config).run()
    secs = summary["seconds"]
    print(f"\nseconds (summary.json): " + ", ".join(f"{k} {v:.2f}" for k, v in secs.items()))
    phases = sum(secs.get(p, 0.0) for p in (*PHASES, ONCE))
    unaccounted = seconds_excluding_prepare(secs) - phases
    print(f"total {secs['total']:.2f} - prepare {secs['prepare']:.2f} - phases and {ONCE} {phases:.2f} = "
          f"{unaccounted:.2f} s outside the phases. The wrapped functions (inclusive wall seconds, calls):")
    print(f"  {'imports before the run (a plain run: inside set-up)':58s} {imports:7.2f} s")
    for label, (calls, seconds) in timers.items():
        print(f"  {label:58s} {seconds:7.2f} s  {calls:3d} calls")
    setup = timers["set-up (task build included)"][1] - secs["prepare"]
    checkpoints = timers["checkpoints"][1]
    around = timers["online pairs (refit + sampling + annotation + gather)"][1] - secs["sampling"] - secs["annotation"]
    final = timers["final HF checkpoint"][1]
    print(f"outside the phases: set-up without the task build {setup:.2f} s, checkpoints {checkpoints:.2f} s, "
          f"refit and gather around sampling {around:.2f} s, final HF checkpoint {final:.2f} s, rest (loop bookkeeping, "
          f"metrics, the summary) {unaccounted - setup - checkpoints - around - final:.2f} s")
    print("\ntop 15 operations by self CPU time (torch.profiler, the whole run):")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


# ---------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=2, help="runs per method and setting (medians printed)")
    parser.add_argument("--out", default="results/metaapo_cost", help="runs go to OUT/runs, logs to OUT/logs")
    parser.add_argument("--cache", default=None, help="the embedded tasks' cache (default OUT/cache)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated, of " + ", ".join(SETTINGS))
    parser.add_argument("--quick", action="store_true", help="shrunk task and loop, one repeat (a test)")
    parser.add_argument("--profile", action="store_true",
                        help="one metaapo run of the default setting under torch.profiler")
    parser.add_argument("overrides", nargs="*", help="more KEY=VALUE overrides for every run")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    cache = Path(args.cache).resolve() if args.cache else out / "cache"
    extra = [*COMMON, f"seed={args.seed}", f"task.cache_dir={cache}", *(QUICK_OVERRIDES if args.quick else []),
             *args.overrides]
    repeats = 1 if args.quick else args.repeats
    settings = {name: SETTINGS[name] + (QUICK_SETTINGS.get(name, []) if args.quick else [])
                for name in ("default" if args.profile else args.settings).split(",")}
    (out / "logs").mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    for name, setting in settings.items():  # before any timer
        rss, wall = child("build-task", [*extra, *setting], out / "logs" / f"build-{name}.log")
        print(f"task {name}: ready in {wall:.0f} s ({cache})", flush=True)
    if args.profile:
        run_dir = out / "runs" / "profile"
        shutil.rmtree(run_dir, ignore_errors=True)
        log = out / "logs" / "profile.log"
        child("profile-one", [*extra, "algo.name=metaapo", f"output_dir={run_dir}"], log)
        text = log.read_text()
        print(text[text.index("\nseconds (summary.json)"):])
        return {}

    runs: dict = {name: {m: [] for m in METHODS} for name in settings}
    num_samples = config_for(extra).algo.num_samples
    for r in range(repeats):
        for name, setting in settings.items():
            for method in (METHODS if r % 2 == 0 else METHODS[::-1]):
                run_dir = out / "runs" / name / f"{method}-r{r}"
                shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would be read back, not run
                rss, wall = child("run-one", [*extra, *setting, f"algo.name={method}", f"output_dir={run_dir}"],
                                  out / "logs" / f"{name}-{method}-r{r}.log")
                numbers = {**run_numbers(run_dir, num_samples), "peak_rss_kib": rss, "process_wall": wall}
                runs[name][method].append(numbers)
                print(f"[repeat {r + 1}/{repeats}] {name} {method}: {numbers['total']:.1f} s without the task build "
                      f"({wall:.1f} s process), peak RSS {rss / 1024:.0f} MiB, responses "
                      f"{numbers['response_tokens_mean']:.1f} tokens", flush=True)
    results = {name: {m: medians(rs) for m, rs in by.items()} for name, by in runs.items()}
    print(f"\nmedians over {repeats} repeat(s), seed {args.seed}, {time.perf_counter() - started:.0f} s in all:\n")
    print(table(results))
    headline = {f"ratio_{name}": results[name]["metaapo"]["total"] / results[name]["online_dpo"]["total"]
                for name in results}
    headline.update({
        "seconds": {name: {m: {k: round(v, 3) for k, v in res.items() if k in (*PHASES, "other", "total", ONCE)}
                           for m, res in by.items()} for name, by in results.items()},
        "meta_share_of_training": {name: round(by["metaapo"]["meta_share"], 5) for name, by in results.items()},
        "response_tokens_mean": {name: {m: round(res["response_tokens_mean"], 2) for m, res in by.items()}
                                 for name, by in results.items()},
        "reward": {name: {m: [round(res["reward_initial"], 4), round(res["reward_final"], 4)] for m, res in by.items()}
                   for name, by in results.items()},
        "peak_rss_mib": {name: {m: round(res["peak_rss_kib"] / 1024, 1) for m, res in by.items()}
                         for name, by in results.items()},
        "repeats": repeats, "seed": args.seed, "quick": args.quick, "versions": versions(),
    })
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("--build-task", "--run-one", "--profile-one"):
        {"--build-task": build_task, "--run-one": run_one, "--profile-one": profile_one}[sys.argv[1]](sys.argv[2:])
    else:
        main()
