"""benchmarks/paper_table.py: its statistics against hand-computed values, its collapse check and
tables on hand-made runs, and one --quick grid end to end (every block, the plot, the JSON line)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import paper_table as pt  # noqa: E402


def test_t_interval_matches_hand_computed_values():
    m, hw, n = pt.mean_ci([1, 2, 3, 4, 5])  # sd = sqrt(2.5) = 1.5811, t(0.975, 4) = 2.7764
    assert (m, n) == (3.0, 5)
    assert hw == pytest.approx(2.7764 * 1.5811388 / math.sqrt(5), abs=1e-4) and hw == pytest.approx(1.963, abs=1e-3)
    m, hw, _ = pt.mean_ci([0.5, 0.7])  # sd = 0.14142, t(0.975, 1) = 12.706
    assert m == pytest.approx(0.6) and hw == pytest.approx(12.7062 * 0.1, abs=1e-4)
    assert math.isnan(pt.mean_ci([0.3])[1]) and pt.mean_ci([0.3])[0] == 0.3


def test_t_quantiles_table_and_beyond():
    assert pt.t_quantile_975(1) == pytest.approx(12.706, abs=1e-3)
    assert pt.t_quantile_975(10) == pytest.approx(2.228, abs=1e-3)
    assert pt.t_quantile_975(30) == pytest.approx(2.042, abs=1e-3)
    assert pt.t_quantile_975(40) == pytest.approx(2.0211, abs=1e-3)
    assert pt.t_quantile_975(120) == pytest.approx(1.9799, abs=1e-3)
    with pytest.raises(ValueError):
        pt.t_quantile_975(0)


def _row(method, seed, final, initial=0.5, table="default", **summary):
    s = {"reward_initial": initial, "reward_final": final, "reward_per_iteration": [final], "annotation_ratio": 0.5,
         "optimizer_steps": 30, "meta_updates": 4, "iterations": 3, "objective": "dpo",
         "seconds": {"prepare": 10.0, "scoring": 1.0, "sampling": 2.0, "annotation": 0.5, "training": 3.0, "total": 20.0}}
    return {"table": table, "setting": table, "variant": "base", "method": method, "seed": seed, "knobs": {},
            "output_dir": f"/x/{table}/{method}/{seed}", "summary": {**s, **summary}}


def test_paired_difference_is_per_seed_against_online_dpo():
    rows = [_row("online_dpo", 1, 0.80), _row("online_dpo", 2, 0.70), _row("online_dpo", 3, 0.90),
            _row("metaapo", 1, 0.82), _row("metaapo", 2, 0.69), _row("metaapo", 3, 0.95), _row("metaapo", 4, 0.99)]
    diffs = pt.paired_differences(rows, "metaapo")
    assert diffs == pytest.approx({1: 0.02, 2: -0.01, 3: 0.05})  # seed 4 has no Online DPO run: left out
    m, hw, n = pt.mean_ci(list(diffs.values()))
    assert n == 3 and m == pytest.approx(0.02)
    sd = math.sqrt(((0.0) ** 2 + 0.03 ** 2 + 0.03 ** 2) / 2)
    assert hw == pytest.approx(4.3027 * sd / math.sqrt(3), abs=1e-6)


def test_collapse_is_a_drop_below_the_best_earlier_reward_from_iteration_two():
    assert pt.collapse_at([0.80, 0.84, 0.86, 0.85]) is None  # small dip
    assert pt.collapse_at([0.80, 0.70, 0.76]) is None  # a fall at iteration 1 alone is not checked
    assert pt.collapse_at([0.80, 0.84, 0.78, 0.60]) == 2  # 0.78 < 0.84 - 0.05
    assert pt.collapse_at([0.80, 0.81, 0.80, 0.40]) == 3
    assert pt.collapse_at([0.80, 0.70, 0.74, 0.76]) == 2  # the start counts as iteration 0: 0.74 < 0.80 - 0.05
    assert pt.collapse_at([0.80, 0.76, 0.755]) is None  # exactly at the limit is not more than 0.05 below
    assert pt.collapse_at([0.80, 0.84, 0.78, 0.60], start=3) == 3


def test_collapse_counts_each_run_once():
    ok = _row("online_dpo", 1, 0.8, reward_per_iteration=[0.82, 0.84, 0.85])
    bad = _row("metaapo", 1, 0.4, reward_per_iteration=[0.82, 0.60, 0.40])
    reused = {**bad, "table": "default_equal_steps", "variant": "equal_steps"}  # same output_dir: one run
    assert pt.collapse_count([ok, bad, reused]) == (1, 2)
    text = "\n".join(pt.stability_section([ok, bad, reused]))
    assert "collapse: 1 of 2 runs" in text and "COLLAPSE at iteration 2" in text and "0.5000 → 0.8200" in text


def test_win_rate_and_new_keys_print_na_when_missing():
    rows = [_row("metaapo", 1, 0.8, win_rate_vs_start=0.6, decisions_changed_by_meta=[0.3, 0.4]),
            _row("metaapo", 2, 0.9, win_rate_vs_start=0.7, decisions_changed_by_meta=[0.1, 0.2])]
    assert pt.mean_of(rows, "win_rate_vs_start") == pytest.approx(0.65)
    assert pt.mean_of(rows, "decisions_changed_by_meta") == pytest.approx(0.5)  # per-iteration lists summed
    assert pt.mean_of([_row("dpo", 1, 0.7)], "win_rate_vs_start") is None
    assert pt.mean_of(rows + [_row("metaapo", 3, 0.7)], "win_rate_vs_start") is None  # one seed lacks it: n/a


def test_table_formatting_on_synthetic_results():
    rows = [_row("online_dpo", s, f, win_rate_vs_start=0.5) for s, f in ((1, 0.80), (2, 0.70), (3, 0.90))]
    rows += [_row("metaapo", s, f, annotation_ratio=0.4) for s, f in ((1, 0.82), (2, 0.69), (3, 0.95))]
    lines = pt.table_rows(rows, ["metaapo", "online_dpo", "dpo"])
    assert [line[0] for line in lines] == ["metaapo", "online_dpo"]  # dpo has no runs: no line
    meta, online = lines
    assert meta[1] == pt.fmt_ci(*pt.mean_ci([0.82, 0.69, 0.95])[:2]) and meta[1].startswith("0.8200 ± ")
    assert meta[2].startswith("+0.3200 ± ") and meta[3].startswith("+0.0200 ± ") and meta[3].endswith("(2/3)")
    assert meta[4] == "n/a" and meta[5] == "0.400" and online[3] == "(baseline)" and online[4] == "0.500"
    assert meta[-5:] == ["1.0", "2.0", "0.5", "3.0", "10.0"]  # phase seconds; total 20 - prepare 10
    table = pt.markdown_table(pt.COLUMNS, lines)
    assert table.splitlines()[0].startswith("| method | held-out reward |") and len(table.splitlines()) == 4
    assert all(line.count("|") == len(pt.COLUMNS) + 1 for line in table.splitlines())
    tables = [{"id": "default", "label": "default setting", "knobs": {"offline_correct": 0.3, "offline_informative": 0.5,
                                                                          "offline_shift": 0.0}, "variant": "base"}]
    md = pt.render_markdown(tables, rows, ["metaapo", "online_dpo"], ["header line"])
    assert "## default setting (correct 0.3, informative 0.5, shift 0)" in md and "header line" in md
    assert "start reward 0.5000 ± 0.0000" in md and "collapse: 0 of 6 runs" in md
    assert pt.headline(tables, rows) == {"default": {"metaapo": 0.82, "online_dpo": 0.8, "online_dpo_random_subset": None,
                                                     "metaapo_annotation_ratio": 0.4}}


def test_the_plot_has_one_panel_per_table(tmp_path):
    rows = [_row(m, s, 0.6 + 0.01 * s) for m in ("metaapo", "online_dpo") for s in (1, 2)]
    rows += [{**r, "table": "q"} for r in rows]
    tables = [{"id": "default", "label": "default setting", "knobs": {}, "variant": "base"},
              {"id": "q", "label": "quality high, shift high", "knobs": {}, "variant": "base"}]
    pt.plot(tables, rows, ["metaapo", "online_dpo"], tmp_path / "p.png")
    assert (tmp_path / "p.png").stat().st_size > 10_000


def _interface_missing():
    from metaapo_nemo.recipes import get_recipe

    return pt.missing_interface(get_recipe("tiny_cpu"), pt.QUICK_METHODS, ["default", "equal_steps", "corners"])


def results_of(tmp_path):
    return json.loads((tmp_path / "out" / "results.json").read_text())


@pytest.mark.skipif(bool(_interface_missing()), reason=f"metaapo_nemo lacks {_interface_missing()}")
def test_quick_grid_end_to_end(tmp_path):
    """--quick with MetaAPO and the ratio-matched random subset (12 runs of the shrunk task): ratio
    matching, equal steps (run or reused), one corner, the tables, the plot and the last JSON line;
    a second call reads every run back instead of running it."""
    command = [sys.executable, "benchmarks/paper_table.py", "--quick", "--out", str(tmp_path / "out"),
               "--methods", "metaapo,online_dpo_random_subset"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    headline = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(headline) == {"default", "default_equal_steps", "quality_high_shift_high"}
    assert all(v["metaapo"] is not None and v["online_dpo_random_subset"] is not None and v["online_dpo"] is None
               and 0 < v["metaapo_annotation_ratio"] < 1 for v in headline.values())
    assert len({(r["setting"], r["variant"], r["method"], r["seed"]) for r in results_of(tmp_path)}) == 12
    results = results_of(tmp_path)
    for r in results:
        if r["method"] == "online_dpo_random_subset":
            meta = next(x for x in results if x["method"] == "metaapo" and x["seed"] == r["seed"] and x["setting"] == r["setting"])
            assert r["random_ratio"] == meta["summary"]["annotation_ratio"]
        if r["variant"] == "equal_steps":
            assert r["summary"]["optimizer_steps"] == r["steps_per_iteration"] * r["summary"]["iterations"]
    md = (tmp_path / "out" / "table.md").read_text()
    assert "## default setting" in md and "equal optimiser steps" in md and "## quality high, shift high" in md
    assert (tmp_path / "out" / "paper_table.png").stat().st_size > 10_000
    again = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert again.returncode == 0 and "0 runs made" in again.stdout, again.stdout[-2000:] + again.stderr[-2000:]
