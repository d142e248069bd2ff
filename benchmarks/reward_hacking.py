"""MetaAPO annotated by the exact reward against by a trained reward model, on the embedded task
(issue 11): how much of the gain on a reward model is a gain on the true reward.

    OMP_NUM_THREADS=1 python benchmarks/reward_hacking.py [--out results/reward_hacking] [--cache DIR]
        [--seed 1234] [--quick] [KEY=VALUE ...]

Recipe tiny_cpu, 1 torch thread, `algo.probe_unsampled=0` (the potential-gain probe is a
diagnostic), the same seed for both runs, each a process of its own:

- programmatic: `task.reward=programmatic`, the recipe as it is: the exact reward annotates and
  scores the held-out samples;
- trained: `task.reward=trained`: a Bradley-Terry reward model trained (once, cached) from the SFT
  model on the task's offline pairs annotates and scores the held-out samples (`reward`), and the
  programmatic reward scores the same samples beside it (`eval_reward`).

Printed: the reward model's held-out pair accuracy (a tenth of the offline pairs), and per run the
held-out programmatic reward of the starting and the final policy (and the share of held-out
prompts on which the final policy beats the starting one by it, ties half) and, for the trained
run, the reward model's own held-out reward of the same samples (and its win rate); a gain on the reward model that is not a
gain on the programmatic reward is reward hacking. The last line is a JSON object of those numbers
with the package versions. --cache: the embedded task's cache (default: the recipe's
task.cache_dir, so a task built before is reused). --quick: the task and loop shrunk as the tests
shrink them (paper_table.QUICK_OVERRIDES), a reward model of one epoch.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from metaapo_cost import config_for, versions  # noqa: E402
from paper_table import QUICK_OVERRIDES, markdown_table  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
COMMON = ["trainer.num_threads=1", "algo.probe_unsampled=0"]
REWARDS = ("programmatic", "trained")


def run_one(overrides: list[str]) -> None:
    from metaapo_nemo.algorithm.metaapo import run_metaapo

    run_metaapo(config_for(overrides))


def child(overrides: list[str], log: Path) -> float:
    """One run as a process of its own, output to `log`; its wall seconds. Fails with the log's tail."""
    started = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, __file__, "--run-one", *overrides], stdout=out, stderr=subprocess.STDOUT,
                              cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    if proc.returncode != 0:
        raise SystemExit(f"run {' '.join(overrides)} failed; the end of {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - started


def reward_model_summary(overrides: list[str]) -> dict:
    """reward_summary.json of the reward model the trained run used (data/embedded.py's cache layout)."""
    from metaapo_nemo.data.embedded import reward_model_key, task_keys
    from metaapo_nemo.reward.train import SUMMARY_FILE

    config = config_for(overrides)
    folder = Path(os.path.expanduser(config.task.cache_dir)) / (
        f"tiny_cpu-rm-{reward_model_key(config.task, task_keys(config.task, config.seed)[1])}")
    return json.loads((folder / "reward_model" / SUMMARY_FILE).read_text())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="results/reward_hacking", help="runs go to OUT/runs, logs to OUT/logs")
    parser.add_argument("--cache", default=None, help="the embedded task's cache (default: the recipe's task.cache_dir)")
    parser.add_argument("--seed", type=int, default=1234, help="the seed of both runs (default 1234, the recipe's)")
    parser.add_argument("--quick", action="store_true", help="shrunk task and loop (a test)")
    parser.add_argument("overrides", nargs="*", help="more KEY=VALUE overrides for both runs")
    args = parser.parse_args(argv)
    out = Path(args.out).resolve()
    extra = [*COMMON, f"seed={args.seed}", *([f"task.cache_dir={Path(args.cache).resolve()}"] if args.cache else []),
             *(QUICK_OVERRIDES + ["task.reward_epochs=1"] if args.quick else []), *args.overrides]
    (out / "logs").mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    summaries = {}
    for reward in REWARDS:
        run_dir = out / "runs" / reward
        shutil.rmtree(run_dir, ignore_errors=True)  # a finished run would be read back, not run
        wall = child([*extra, f"task.reward={reward}", f"output_dir={run_dir}"], out / "logs" / f"{reward}.log")
        summaries[reward] = json.loads((run_dir / "summary.json").read_text())
        print(f"{reward}: {wall:.0f} s", flush=True)
    rm = reward_model_summary([*extra, "task.reward=trained"])
    programmatic, trained = summaries["programmatic"], summaries["trained"]
    numbers = {
        "reward_model_accuracy": rm["accuracy"], "reward_model_eval_pairs": rm["eval_pairs"],
        "programmatic": {"programmatic_reward": [programmatic["reward_initial"], programmatic["reward_final"]],
                         "programmatic_win_rate": programmatic["win_rate_vs_start"],
                         "annotation_ratio": programmatic["annotation_ratio"]},
        "trained": {"programmatic_reward": [trained["eval_reward_initial"], trained["eval_reward_final"]],
                    "programmatic_win_rate": trained["eval_win_rate_vs_start"],
                    "reward_model_reward": [trained["reward_initial"], trained["reward_final"]],
                    "reward_model_win_rate": trained["win_rate_vs_start"],
                    "annotation_ratio": trained["annotation_ratio"]},
    }

    def change(pair):
        return f"{pair[0]:.4f} -> {pair[1]:.4f} ({pair[1] - pair[0]:+.4f})"

    print(f"\nreward model: held-out pair accuracy {rm['accuracy']:.3f} on {rm['eval_pairs']} offline pairs "
          f"({rm['train_pairs']} trained on, {len(rm['epochs']) - 1} epochs); seed {args.seed}, "
          f"{time.perf_counter() - started:.0f} s in all\n")
    print(markdown_table(["task.reward", "held-out programmatic reward", "its win rate vs start",
                          "held-out reward-model reward", "its win rate vs start", "annot. ratio"], [
        ["programmatic", change(numbers["programmatic"]["programmatic_reward"]),
         f"{programmatic['win_rate_vs_start']:.3f}", "n/a", "n/a", f"{programmatic['annotation_ratio']:.3f}"],
        ["trained", change(numbers["trained"]["programmatic_reward"]), f"{trained['eval_win_rate_vs_start']:.3f}",
         change(numbers["trained"]["reward_model_reward"]), f"{trained['win_rate_vs_start']:.3f}",
         f"{trained['annotation_ratio']:.3f}"]]))
    headline = {**numbers, "seed": args.seed, "quick": args.quick, "versions": versions()}
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--run-one":
        run_one(sys.argv[2:])
    else:
        main()
