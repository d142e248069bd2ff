"""The paper's Tables 1-2 in miniature: methods x seeds x offline-data settings on the embedded task.

    OMP_NUM_THREADS=1 python benchmarks/paper_table.py [--seeds 1,2,3,4,5] [--out results/paper_table]
        [--cache DIR] [--blocks default,equal_steps,corners] [--methods m1,m2,...] [--quick] [KEY=VALUE ...]

One process, recipe tiny_cpu, 1 torch thread, each run in its own output_dir under --out, the
embedded task cached under --cache (default OUT/cache). Blocks:

- default: the recipe's offline-data knobs, every method of METHODS for every seed. The two
  random-subset controls (online_dpo_random_subset, metaapo_random_sampling) annotate the share
  of prompts MetaAPO annotated on the same seed (algo.random_ratio = its annotation ratio), so
  MetaAPO runs first on each seed.
- equal_steps: every method of the default block again with trainer.steps_per_iteration = S,
  S = MetaAPO's optimiser steps per iteration on that seed (rounded up); a run that already took
  S x iterations steps is reused, not run again.
- corners: offline-data quality low/high x distribution shift low/high (QUALITY, SHIFT below),
  CORNER_METHODS for every seed, the random subset again matched to MetaAPO's ratio.

Writes OUT/table.md (one table per setting in the shape of the paper's Tables 1-2, then every
run's reward per iteration and a collapse check), OUT/results.json (every run's summary with its
seed, setting, method, ratio and steps) and OUT/paper_table.png; the last line printed is a JSON
object of the headline numbers per setting. Interrupted, it continues: a run whose output_dir
holds a finished summary.json with the same overrides is read, not run again.

Intervals are 95% Student t intervals over seeds (n - 1 degrees of freedom). "vs online DPO" is
the per-seed difference to Online DPO on the same seed and setting (same start, same data), the
fair comparison; (k/n) counts the seeds where the method was ahead.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
from dataclasses import fields, is_dataclass
from pathlib import Path

# The knobs of the offline behaviour policy (EmbeddedTaskConfig): chance that a sample is right,
# share of its mistakes that are informative, chance of a space per gap (distribution shift).
KNOBS = ("offline_correct", "offline_informative", "offline_shift")
LEGACY = {"offline_correct": 0.04, "offline_informative": 0.0, "offline_shift": 0.0}
QUALITY = {"low": {"offline_correct": 0.04, "offline_informative": 0.0},
           "high": {"offline_correct": 0.8, "offline_informative": 1.0}}
SHIFT = {"low": {"offline_shift": 0.0}, "high": {"offline_shift": 1.0}}
CORNERS = [(q, s) for q in ("low", "high") for s in ("low", "high")]

METHODS = ["metaapo", "online_dpo", "online_dpo_random_subset", "metaapo_random_sampling", "dpo",
           "metaapo_uniform_weighting", "metaapo_no_meta_learner"]
CORNER_METHODS = ["metaapo", "online_dpo", "online_dpo_random_subset", "dpo"]
RATIO_MATCHED = {"online_dpo_random_subset", "metaapo_random_sampling"}  # algo.random_ratio = MetaAPO's annotation ratio
BASELINE = "online_dpo"
SEEDS = "1,2,3,4,5"

# A fall of more than COLLAPSE_DROP below the best earlier held-out reward (the start included),
# at iteration COLLAPSE_FROM or later, is a collapse (METAAPO.md: DPO was unstable on this task).
COLLAPSE_DROP = 0.05
COLLAPSE_FROM = 2

# --quick: the task and the loop shrunk as the tests shrink them (tests/helpers.py SHRUNK_TINY_CPU).
QUICK_OVERRIDES = ["task.sft_steps=40", "task.sft_examples=1024", "task.num_train_pairs=96", "task.num_eval_prompts=16",
                   "task.warmup_dpo_steps=4", "algo.iterations=2", "algo.meta_interval=1", "trainer.global_batch_size=8",
                   "trainer.micro_batch_size=4", "rollout.eval_samples=2"]
QUICK_SEEDS = "1,2"
QUICK_METHODS = ["metaapo", "online_dpo", "online_dpo_random_subset", "dpo"]
QUICK_CORNERS = [("high", "high")]

# For the up-front estimate (2-core machine, 1 torch thread): seconds per run excluding the task
# build, per seed for the SFT model, per (seed, setting) for the offline pairs and warm-up.
ESTIMATE = {"full": (18.0, 75.0, 5.0), "quick": (3.5, 8.0, 1.0)}

# Student t quantiles t(0.975, df) for df = 1..30.
T975 = [12.7062, 4.3027, 3.1824, 2.7764, 2.5706, 2.4469, 2.3646, 2.3060, 2.2622, 2.2281,
        2.2010, 2.1788, 2.1604, 2.1448, 2.1314, 2.1199, 2.1098, 2.1009, 2.0930, 2.0860,
        2.0796, 2.0739, 2.0687, 2.0639, 2.0595, 2.0555, 2.0518, 2.0484, 2.0452, 2.0423]
Z975 = 1.959964


# ---------------------------------------------------------------- statistics
def t_quantile_975(df: int) -> float:
    """t(0.975, df): the table for df <= 30, beyond it the Cornish-Fisher series in 1/df (error < 1e-4)."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if df <= len(T975):
        return T975[df - 1]
    z = Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_ci(values: list[float]) -> tuple[float, float, int]:
    """(mean, half-width of the 95% t interval, n); the half-width is nan below two values."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        return math.nan, math.nan, 0
    m = sum(xs) / n
    if n < 2:
        return m, math.nan, n
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (n - 1))
    return m, t_quantile_975(n - 1) * sd / math.sqrt(n), n


def paired_differences(rows: list[dict], method: str, baseline: str = BASELINE, key: str = "reward_final") -> dict[int, float]:
    """{seed: method's key - baseline's key} over the seeds both have (rows of one table)."""
    by = {(r["method"], r["seed"]): r["summary"][key] for r in rows}
    return {seed: by[(method, seed)] - by[(baseline, seed)]
            for (m, seed) in sorted(by) if m == method and (baseline, seed) in by}


def collapse_at(rewards: list[float], drop: float = COLLAPSE_DROP, start: int = COLLAPSE_FROM) -> int | None:
    """The first iteration t >= start whose reward is more than `drop` below the best of
    rewards[:t]; rewards[0] is the start, rewards[t] the reward after iteration t. None: stable."""
    for t in range(max(1, start), len(rewards)):
        if rewards[t] < max(rewards[:t]) - drop:
            return t
    return None


def as_number(value) -> float | None:
    """A summary value as one number: a number as is, a list of numbers summed (per iteration), else None."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, list) and value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        return float(sum(value))
    return None


def mean_of(rows: list[dict], key: str) -> float | None:
    """Mean over rows of summary[key] as a number; None when any row lacks it (printed n/a)."""
    values = [as_number(r["summary"].get(key)) for r in rows]
    return None if not values or any(v is None for v in values) else sum(values) / len(values)


def seconds_excluding_prepare(seconds: dict) -> float:
    """The run's wall-clock without building the task (prepare) or the off-by-default probe diagnostic."""
    return seconds["total"] - seconds.get("prepare", 0.0) - seconds.get("probe", 0.0)


# ---------------------------------------------------------------- formatting
def fmt_ci(m: float, hw: float, signed: bool = False) -> str:
    if math.isnan(m):
        return "n/a"
    s = f"{m:+.4f}" if signed else f"{m:.4f}"
    return s + (" ± n/a" if math.isnan(hw) else f" ± {hw:.4f}")


def fmt_opt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


COLUMNS = ["method", "held-out reward", "gain over start", f"vs {BASELINE} (paired)", "win rate vs start",
           "annot. ratio", "opt. steps", "meta updates", "share of decisions changed by meta",
           "scoring s", "sampling s", "annotation s", "training s", "total s"]


def table_rows(rows: list[dict], methods: list[str]) -> list[list[str]]:
    """One line per method of one table (one setting and variant); rows: that table's runs."""
    lines = []
    for method in methods:
        mine = [r for r in rows if r["method"] == method]
        if not mine:
            continue
        s = [r["summary"] for r in mine]
        reward = mean_ci([x["reward_final"] for x in s])
        gain = mean_ci([x["reward_final"] - x["reward_initial"] for x in s])
        if method == BASELINE:
            paired = "(baseline)"
        else:
            diffs = paired_differences(rows, method)
            paired = "n/a" if not diffs else (fmt_ci(*mean_ci(list(diffs.values()))[:2], signed=True)
                                              + f" ({sum(d > 0 for d in diffs.values())}/{len(diffs)})")
        phases = [sum(x["seconds"].get(p, 0.0) for x in s) / len(s) for p in ("scoring", "sampling", "annotation", "training")]
        total = sum(seconds_excluding_prepare(x["seconds"]) for x in s) / len(s)
        lines.append([method + ("" if len(mine) > 1 else " (1 seed)"), fmt_ci(*reward[:2]), fmt_ci(*gain[:2], signed=True),
                      paired, fmt_opt(mean_of(mine, "win_rate_vs_start"), ".3f"), fmt_opt(mean_of(mine, "annotation_ratio"), ".3f"),
                      fmt_opt(mean_of(mine, "optimizer_steps"), ".1f"), fmt_opt(mean_of(mine, "meta_updates"), ".1f"),
                      fmt_opt(mean_of(mine, "decisions_changed_by_meta"), ".3f"),
                      *[f"{p:.1f}" for p in phases], f"{total:.1f}"])
    return lines


def markdown_table(header: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(out + ["| " + " | ".join(line) + " |" for line in lines])


def knob_text(knobs: dict) -> str:
    return ", ".join(f"{k.removeprefix('offline_')} {knobs[k]:g}" for k in KNOBS if k in knobs)


def table_title(table: dict) -> str:
    title = f"{table['label']} ({knob_text(table['knobs'])})"
    if table["variant"] == "equal_steps":
        title += ", equal optimiser steps"
    return title


def render_markdown(tables: list[dict], results: list[dict], methods: list[str], header_lines: list[str]) -> str:
    """table.md: the header, one table per (setting, variant), then the stability check."""
    parts = ["# MetaAPO and its baselines on the embedded task (Tables 1-2 in miniature)", "", *header_lines, ""]
    for table in tables:
        rows = [r for r in results if r["table"] == table["id"]]
        seeds = sorted({r["seed"] for r in rows})
        parts += [f"## {table_title(table)}", "", f"seeds {','.join(map(str, seeds))}; start reward "
                  f"{fmt_ci(*mean_ci(sorted({r['seed']: r['summary']['reward_initial'] for r in rows}.values()))[:2])}"]
        if table["variant"] == "equal_steps":
            steps = {r["seed"]: r["steps_per_iteration"] for r in rows if r["method"] == "metaapo"}
            parts[-1] += "; steps per iteration S (MetaAPO's, per seed): " + ", ".join(f"{k}: {v}" for k, v in sorted(steps.items()))
        parts += ["", markdown_table(COLUMNS, table_rows(rows, methods)), ""]
    parts += stability_section(results)
    return "\n".join(parts) + "\n"


def stability_section(results: list[dict]) -> list[str]:
    """Every distinct run's reward per iteration and whether it collapsed, then the count."""
    seen, lines, collapsed = set(), [], 0
    for r in results:
        if r["output_dir"] in seen:
            continue
        seen.add(r["output_dir"])
        curve = [r["summary"]["reward_initial"], *r["summary"]["reward_per_iteration"]]
        dpo_family = r["summary"].get("objective", "dpo") == "dpo"
        at = collapse_at(curve) if dpo_family else None
        collapsed += at is not None
        lines.append([r["setting"], r["variant"], r["method"], str(r["seed"]), " → ".join(f"{x:.4f}" for x in curve),
                      "-" if not dpo_family else ("stable" if at is None else f"COLLAPSE at iteration {at}")])
    summary = (f"collapse: {collapsed} of {len(seen)} runs (held-out reward more than {COLLAPSE_DROP} below its best "
               f"earlier value, start included, at iteration {COLLAPSE_FROM} or later)")
    return ["## Stability: held-out reward per iteration (start first)", "", summary, "",
            markdown_table(["setting", "variant", "method", "seed", "reward per iteration", "check"], lines), ""]


def collapse_count(results: list[dict]) -> tuple[int, int]:
    runs = {r["output_dir"]: r for r in results}.values()
    flags = [collapse_at([r["summary"]["reward_initial"], *r["summary"]["reward_per_iteration"]]) is not None
             for r in runs if r["summary"].get("objective", "dpo") == "dpo"]
    return sum(flags), len(flags)


def headline(tables: list[dict], results: list[dict]) -> dict:
    """Per table: mean held-out reward of metaapo, online_dpo and online_dpo_random_subset, and MetaAPO's annotation ratio."""
    out = {}
    for table in tables:
        rows = [r for r in results if r["table"] == table["id"]]
        entry = {}
        for method in ("metaapo", "online_dpo", "online_dpo_random_subset"):
            vals = [r["summary"]["reward_final"] for r in rows if r["method"] == method]
            entry[method] = round(sum(vals) / len(vals), 4) if vals else None
        ratios = [r["summary"]["annotation_ratio"] for r in rows if r["method"] == "metaapo"]
        entry["metaapo_annotation_ratio"] = round(sum(ratios) / len(ratios), 4) if ratios else None
        out[table["id"]] = entry
    return out


def plot(tables: list[dict], results: list[dict], methods: list[str], path: Path) -> None:
    """Per table two panels: held-out reward per method (mean, 95% t interval, each seed a dot; the
    start dashed) and, below it, the per-seed difference to Online DPO (mean, 95% t interval; 0 dashed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tables)
    cols = min(3, n)
    bands = -(-n // cols)
    fig, axes = plt.subplots(2 * bands, cols, figsize=(5.4 * cols, 8.4 * bands), squeeze=False)
    for i, table in enumerate(tables):
        top, bottom = axes[2 * (i // cols)][i % cols], axes[2 * (i // cols) + 1][i % cols]
        rows = [r for r in results if r["table"] == table["id"]]
        present = [m for m in methods if any(r["method"] == m for r in rows)]
        for x, method in enumerate(present):
            color = "C1" if method == "metaapo" else "C0"
            vals = [r["summary"]["reward_final"] for r in rows if r["method"] == method]
            m, hw, _ = mean_ci(vals)
            top.errorbar([x], [m], yerr=None if math.isnan(hw) else [[hw], [hw]], fmt="o", capsize=5, markersize=7, color=color)
            top.plot([x + 0.15] * len(vals), vals, ".", color="grey", alpha=0.7)
            diffs = list(paired_differences(rows, method).values()) if method != BASELINE else []
            if diffs:
                m, hw, _ = mean_ci(diffs)
                bottom.errorbar([x], [m], yerr=None if math.isnan(hw) else [[hw], [hw]], fmt="o", capsize=5,
                                markersize=7, color=color)
                bottom.plot([x + 0.15] * len(diffs), diffs, ".", color="grey", alpha=0.7)
        start = mean_ci(list({r["seed"]: r["summary"]["reward_initial"] for r in rows}.values()))[0]
        top.axhline(start, linestyle="--", color="black", linewidth=1, label=f"starting policy (mean {start:.3f})")
        bottom.axhline(0.0, linestyle="--", color="black", linewidth=1, label=f"same as {BASELINE.replace('_', ' ')}")
        title = table_title(table)
        top.set_title(title if len(title) < 48 else title.replace(" (", "\n("), fontsize=9)
        top.set_ylabel("held-out reward after training")
        bottom.set_title("difference to Online DPO, same seed", fontsize=9)
        bottom.set_ylabel("held-out reward minus Online DPO's")
        for ax in (top, bottom):
            ax.set_xticks(range(len(present)), [m.replace("_", " ") for m in present], rotation=35, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(present) - 0.5)
            ax.legend(fontsize=7, loc="best")
    for i in range(n, bands * cols):
        axes[2 * (i // cols)][i % cols].axis("off")
        axes[2 * (i // cols) + 1][i % cols].axis("off")
    fig.suptitle("Held-out reward per method (upper panels) and its difference to Online DPO on the same seed (lower "
                 "panels): mean over seeds with 95% t interval; grey dots: single seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- the grid
def has_key(config, dotted: str) -> bool:
    target = config
    for part in dotted.split("."):
        if not (is_dataclass(target) and part in {f.name for f in fields(target)}):
            return False
        target = getattr(target, part)
    return True


def missing_interface(config, methods: list[str], blocks: list[str]) -> list[str]:
    """The config keys and algo.names this grid needs that the installed code lacks."""
    from metaapo_nemo.algorithm.strategies import STRATEGIES

    keys = [f"task.{k}" for k in KNOBS]
    if any(m in RATIO_MATCHED for m in methods):
        keys.append("algo.random_ratio")
    if "equal_steps" in blocks:
        keys.append("trainer.steps_per_iteration")
    missing = [k for k in keys if not has_key(config, k)]
    return missing + [f"algo.name={m}" for m in methods if m not in STRATEGIES]


class Grid:
    """Runs (or reads back) one run per (setting, seed, method, variant), in order, with progress."""

    def __init__(self, out: Path, cache: Path, extra: list[str], total: int, seeds: list[int], guess: tuple):
        from metaapo_nemo.recipes import get_recipe

        self.out, self.cache, self.extra, self.total, self.seeds, self.guess = out, cache, extra, total, seeds, guess
        self.build_seconds: dict[int, float] = {}  # per seed: building the embedded task (its runs' prepare seconds)
        self.probe = ["algo.probe_unsampled=0"] if has_key(get_recipe("tiny_cpu"), "algo.probe_unsampled") else []
        self.done, self.ran, self.ran_seconds, self.started = 0, 0, 0.0, time.perf_counter()
        self.memo: dict[str, dict] = {}

    def run(self, knobs: dict, seed: int, method: str, variant: str, ratio: float | None = None,
            steps: int | None = None, label: str = "") -> tuple[dict, Path]:
        from metaapo_nemo.algorithm.metaapo import run_metaapo
        from metaapo_nemo.config import apply_overrides
        from metaapo_nemo.recipes import get_recipe

        name = method if variant == "base" else f"{method}-{variant}"
        out = self.out / "runs" / "-".join(f"{k.removeprefix('offline_')}{knobs[k]:g}" for k in KNOBS) / f"seed{seed}" / name
        # What makes the run (the output and cache folders do not): a read-back run must have been made with it.
        made_with = [f"algo.name={method}", f"seed={seed}", "trainer.num_threads=1", *self.probe, *[f"task.{k}={knobs[k]!r}" for k in KNOBS],
                     *([f"algo.random_ratio={ratio!r}"] if ratio is not None else []),
                     *([f"trainer.steps_per_iteration={steps}"] if steps is not None else []), *self.extra]
        how = "read back"
        if str(out) in self.memo:
            summary = self.memo[str(out)]
        else:
            summary = self._finished(out, made_with)
            if summary is None:
                config = get_recipe("tiny_cpu")
                apply_overrides(config, [*made_with, f"output_dir={out}", f"task.cache_dir={self.cache}"])
                out.mkdir(parents=True, exist_ok=True)
                (out / "paper_table_overrides.json").write_text(json.dumps(made_with))
                t0 = time.perf_counter()
                summary = run_metaapo(config)
                wall = time.perf_counter() - t0
                self.ran += 1
                self.ran_seconds += wall - summary["seconds"].get("prepare", 0.0)
                self.build_seconds[seed] = self.build_seconds.get(seed, 0.0) + summary["seconds"].get("prepare", 0.0)
                how = f"ran in {wall:.0f} s"
            self.memo[str(out)] = summary
            self.done += 1
            self.progress(label, method, seed, variant, summary, how)
        return summary, out

    @staticmethod
    def _finished(out: Path, made_with: list[str]) -> dict | None:
        """The finished summary of a run made with these overrides; a run made with others is removed."""
        saved = out / "paper_table_overrides.json"
        if saved.exists() and json.loads(saved.read_text()) != made_with:
            print(f"{out} was run with other overrides (a changed ratio or step count): running it again", flush=True)
            shutil.rmtree(out)
            return None
        summary = out / "summary.json"
        if saved.exists() and summary.exists() and json.loads(summary.read_text()).get("finished"):
            return json.loads(summary.read_text())
        return None

    def reused(self, label: str, method: str, seed: int, variant: str, summary: dict) -> None:
        self.done += 1
        self.progress(label, method, seed, variant, summary, "reused: already at the step count")

    def progress(self, label, method, seed, variant, summary, how) -> None:
        elapsed = time.perf_counter() - self.started
        # Runs and task builds apart: the first run of a seed also builds its SFT model.
        per_run = self.ran_seconds / self.ran if self.ran else self.guess[0]
        per_build = sum(self.build_seconds.values()) / len(self.build_seconds) if self.build_seconds else self.guess[1]
        unbuilt = len(self.seeds) - 1 - self.seeds.index(seed)  # seeds still to come, each with its build
        eta = max(0, self.total - self.done) * per_run + unbuilt * per_build
        print(f"[{self.done}/{self.total}] {label} {variant} {method} seed {seed}: reward "
              f"{summary['reward_initial']:.4f} -> {summary['reward_final']:.4f}, annot. {summary['annotation_ratio']:.3f}, "
              f"{summary['optimizer_steps']} steps ({how}); elapsed {elapsed / 60:.1f} min, ETA {eta / 60:.1f} min", flush=True)


def plan(settings: list[dict], seeds: list[int], methods: list[str], corner_methods: list[str], blocks: list[str]) -> int:
    """How many runs the grid holds at most (equal-steps runs already at the step count are reused)."""
    runs = set()
    for seed in seeds:
        for s in settings:
            key = tuple(s["knobs"][k] for k in KNOBS)
            for m in (methods if s["id"] == "default" else corner_methods):
                runs.add((key, seed, m, "base"))
                if s["id"] == "default" and "equal_steps" in blocks:
                    runs.add((key, seed, m, "equal_steps"))
    return len(runs)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default=None, help=f"comma-separated seeds (default {SEEDS}; --quick {QUICK_SEEDS})")
    parser.add_argument("--out", default="results/paper_table")
    parser.add_argument("--cache", default=None, help="task.cache_dir shared by every run (default OUT/cache)")
    parser.add_argument("--blocks", default="default,equal_steps,corners")
    parser.add_argument("--methods", default=None, help="the default block's methods (MetaAPO always runs); corners "
                                                        "run those of them in CORNER_METHODS")
    parser.add_argument("--quick", action="store_true", help="CI smoke version: 2 seeds, shrunk task and loop, "
                                                             "4 methods, the default setting and one corner")
    parser.add_argument("overrides", nargs="*", help="extra overrides applied to every run, e.g. algo.iterations=2")
    args = parser.parse_args(argv)
    from metaapo_nemo.recipes import get_recipe

    mode = "quick" if args.quick else "full"
    seeds = [int(s) for s in (args.seeds or (QUICK_SEEDS if args.quick else SEEDS)).split(",")]
    methods = args.methods.split(",") if args.methods else (QUICK_METHODS if args.quick else METHODS)
    methods = ["metaapo", *[m for m in methods if m != "metaapo"]]
    corner_methods = [m for m in CORNER_METHODS if m in methods]
    blocks = args.blocks.split(",")
    unknown = set(blocks) - {"default", "equal_steps", "corners"}
    if unknown:
        parser.error(f"--blocks: unknown {', '.join(sorted(unknown))}; use default, equal_steps, corners")
    if "equal_steps" in blocks and "default" not in blocks:
        parser.error("--blocks: equal_steps repeats the default block's methods at MetaAPO's step count: add default")
    recipe = get_recipe("tiny_cpu")
    missing = missing_interface(recipe, methods, blocks)
    if missing:
        sys.exit(f"paper_table: the installed metaapo_nemo lacks {', '.join(missing)} (needed by this grid)")
    out = Path(args.out)
    cache = Path(args.cache) if args.cache else out / "cache"
    extra = [*(QUICK_OVERRIDES if args.quick else []), *args.overrides]

    default_knobs = {k: getattr(recipe.task, k) for k in KNOBS}
    settings = [{"id": "default", "label": "default setting", "knobs": default_knobs}] if "default" in blocks else []
    if "corners" in blocks:
        settings += [{"id": f"quality_{q}_shift_{s}", "label": f"quality {q}, shift {s}", "knobs": {**QUALITY[q], **SHIFT[s]}}
                     for q, s in (QUICK_CORNERS if args.quick else CORNERS)]
    tables = [{"id": s["id"], "label": s["label"], "knobs": s["knobs"], "variant": "base"} for s in settings]
    if "equal_steps" in blocks:
        tables.insert(1, {"id": "default_equal_steps", "label": "default setting", "knobs": default_knobs, "variant": "equal_steps"})

    total = plan(settings, seeds, methods, corner_methods, blocks)
    per_run, per_seed, per_setting = ESTIMATE[mode]
    estimate = total * per_run + len(seeds) * per_seed + len(seeds) * len(settings) * per_setting
    header = [f"recipe tiny_cpu{' (--quick)' if args.quick else ''}, 1 torch thread; "
              f"seeds {','.join(map(str, seeds))}; blocks {','.join(blocks)}",
              f"offline-data knobs (correct, informative, shift): default {knob_text(default_knobs)}; legacy "
              f"{knob_text(LEGACY)}; quality low {knob_text(QUALITY['low'])} / high {knob_text(QUALITY['high'])}; "
              f"shift low {knob_text(SHIFT['low'])} / high {knob_text(SHIFT['high'])}",
              f"random-subset controls ({', '.join(sorted(RATIO_MATCHED))}): algo.random_ratio = MetaAPO's annotation "
              "ratio on the same seed and setting; equal steps: trainer.steps_per_iteration = ceil(MetaAPO's steps / "
              "iterations) on the same seed",
              "intervals: 95% Student t over seeds; paired: per-seed difference to online_dpo on the same seed "
              "(k/n: seeds ahead); seconds: mean per run, total excludes building the task"]
    if extra:
        header.append("extra overrides: " + " ".join(extra))
    for line in header:
        print(line)
    print(f"plan: {total} runs at most ({len(seeds)} seeds x {len(settings)} settings; equal-steps runs already at the "
          f"step count are reused), expected about {estimate / 60:.0f} min on a 2-core machine", flush=True)

    grid = Grid(out, cache, extra, total, seeds, ESTIMATE[mode])
    results = []

    def record(table_id, setting, variant, method, seed, summary, run_dir, ratio=None, steps=None, reused=False):
        results.append({"table": table_id, "setting": setting["id"], "knobs": setting["knobs"], "variant": variant,
                        "method": method, "seed": seed, "random_ratio": ratio, "steps_per_iteration": steps,
                        "reused": reused, "output_dir": str(run_dir), "summary": summary})

    for seed in seeds:
        for setting in settings:
            knobs, label = setting["knobs"], setting["label"]
            is_default = setting["id"] == "default"
            these = methods if is_default else corner_methods
            anchor, anchor_dir = grid.run(knobs, seed, "metaapo", "base", label=label)
            ratio = anchor["annotation_ratio"]
            base = {"metaapo": (anchor, anchor_dir)}
            for method in these[1:]:
                r = ratio if method in RATIO_MATCHED else None
                base[method] = grid.run(knobs, seed, method, "base", ratio=r, label=label)
            for method in these:
                record(setting["id"], setting, "base", method, seed, *base[method],
                       ratio=ratio if method in RATIO_MATCHED else None)
            if is_default and "equal_steps" in blocks:
                steps = math.ceil(anchor["optimizer_steps"] / max(1, anchor["iterations"]))
                for method in methods:
                    r = ratio if method in RATIO_MATCHED else None
                    prior = base.get(method)
                    if prior is not None and prior[0]["optimizer_steps"] == steps * prior[0]["iterations"]:
                        grid.reused(label, method, seed, "equal_steps", prior[0])
                        summary, run_dir, reused = *prior, True
                    else:
                        summary, run_dir = grid.run(knobs, seed, method, "equal_steps", ratio=r, steps=steps, label=label)
                        reused = False
                    record("default_equal_steps", setting, "equal_steps", method, seed, summary, run_dir,
                           ratio=r, steps=steps, reused=reused)

    out.mkdir(parents=True, exist_ok=True)
    collapsed, checked = collapse_count(results)
    markdown = render_markdown(tables, results, methods, header)
    (out / "table.md").write_text(markdown)
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plot(tables, results, methods, out / "paper_table.png")
    elapsed = time.perf_counter() - grid.started
    print("\n" + markdown)
    print(f"{grid.ran} runs made, {grid.done - grid.ran} read back or reused, in {elapsed / 60:.1f} min; "
          f"collapse: {collapsed} of {checked} runs; wrote {out / 'table.md'}, {out / 'results.json'}, "
          f"{out / 'paper_table.png'}")
    numbers = headline(tables, results)
    print(json.dumps(numbers))
    return numbers


if __name__ == "__main__":
    main()
