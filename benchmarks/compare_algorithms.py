"""MetaAPO against its baselines on the embedded toy task, one process, same cache, same seed.

    python benchmarks/compare_algorithms.py [--algos metaapo,online_dpo,dpo] [--seeds 1234] [--out DIR]

Each algorithm is the same loop with another Strategy (metaapo_nemo/algorithm/strategies.py),
starting from the same warmed-up policy. Prints one row per (algorithm, seed): held-out reward
before/after, annotation ratio, online pairs, and phase seconds (1 torch thread).
"""
import argparse
import json
import shutil
from pathlib import Path

from metaapo_nemo.algorithm.metaapo import run_metaapo
from metaapo_nemo.recipes import get_recipe


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--algos", default="metaapo,online_dpo,dpo")
    parser.add_argument("--seeds", default="1234")
    parser.add_argument("--out", default="results/compare")
    parser.add_argument("overrides", nargs="*", help="extra overrides applied to every run, e.g. algo.iterations=2")
    args = parser.parse_args()
    from metaapo_nemo.config import apply_overrides

    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for algo in args.algos.split(","):
            out = Path(args.out) / f"{algo}-{seed}"
            shutil.rmtree(out, ignore_errors=True)
            config = get_recipe("tiny_cpu")
            apply_overrides(config, [f"algo.name={algo}", f"seed={seed}", f"output_dir={out}", *args.overrides])
            summary = run_metaapo(config)
            rows.append(summary | {"seed": seed})
    header = f"{'algorithm':<12} {'seed':>5} {'reward start':>12} {'reward end':>10} {'annot.':>7} {'pairs':>6} " \
             f"{'scoring s':>9} {'sampling s':>10} {'training s':>10} {'total s':>8}"
    print("\n" + header + "\n" + "-" * len(header))
    for r in rows:
        s = r["seconds"]
        print(f"{r['algorithm']:<12} {r['seed']:>5} {r['reward_initial']:>12.4f} {r['reward_final']:>10.4f} "
              f"{r['annotation_ratio']:>7.3f} {r['num_online_pairs']:>6} {s['scoring']:>9.1f} {s['sampling']:>10.1f} "
              f"{s['training']:>10.1f} {s['total'] - s['prepare']:>8.1f}")
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "table.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
