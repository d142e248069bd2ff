"""The run's self-measurements: how many sampling decisions the meta-learner's training flipped,
the win rate against the starting policy, which unsampled prompts are probed for their potential
gain; and, in a short real run, that summary.json and metrics.jsonl carry them consistently."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from metaapo_nemo.algorithm.diagnostics import changed_decisions, probe_order, untrained_meta_learner, win_rate
from metaapo_nemo.algorithm.meta_learner import MetaLearner
from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[2]
PAIRS = 24
PROBES = 3


def test_changed_decisions_counts_the_prompts_whose_u_gt_w_flips():
    u = torch.tensor([0.1, 0.5, 0.9, 0.3], dtype=torch.float64)
    w0 = torch.tensor([0.2, 0.2, 0.2, 0.2])  # decisions: no, yes, yes, yes
    w = torch.tensor([0.05, 0.6, 0.95, 0.2])  # decisions: yes, no, no, yes
    assert changed_decisions(u, w, w0) == 3
    assert changed_decisions(u, w0, w0) == 0


def test_changed_decisions_refuses_mismatched_shapes():
    with pytest.raises(ValueError, match="one shape"):
        changed_decisions(torch.zeros(3), torch.zeros(3), torch.zeros(2))


def test_the_untrained_meta_learner_is_the_reference_init_and_leaves_the_rng_alone():
    torch.manual_seed(0)
    before = torch.get_rng_state()
    meta = untrained_meta_learner()
    assert torch.equal(torch.get_rng_state(), before)
    s = torch.tensor([-3.0, -0.5, 0.0])
    assert torch.allclose(meta.weights(s), torch.sigmoid(10 * torch.tanh(0.1 * s)))
    assert torch.equal(meta.weights(s), MetaLearner().weights(s))


def test_win_rate_counts_ties_half():
    # wins on prompts 0 and 3, a tie on 1, a loss on 2: (1 + 0.5 + 0 + 1) / 4
    assert win_rate([0.9, 0.5, 0.2, 0.7], [0.8, 0.5, 0.4, 0.1]) == pytest.approx(0.625)
    assert win_rate([0.3, 0.3], [0.3, 0.3]) == 0.5


def test_win_rate_refuses_lists_of_different_prompts():
    with pytest.raises(ValueError, match="equally long"):
        win_rate([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="non-empty"):
        win_rate([], [])


def test_probe_order_takes_the_unsampled_prompts_with_the_lowest_draws():
    u = torch.tensor([0.7, 0.1, 0.4, 0.05, 0.3])
    selected = [False, False, True, True, False]
    assert probe_order(u, selected, 2) == [1, 4]
    assert probe_order(u, selected, 10) == [1, 4, 0]
    assert probe_order(u, selected, 0) == []


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = subprocess.run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
                           f"task.cache_dir={cache}", *SHRUNK_TINY_CPU, "algo.iterations=2",
                           f"data.max_train_pairs={PAIRS}", "trainer.num_threads=1", f"algo.probe_unsampled={PROBES}"],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return json.loads((out / "summary.json").read_text()), rows, proc.stdout


def _events(rows, event):
    return [r for r in rows if r["event"] == event]


def test_the_first_decision_is_the_untrained_one_and_the_counts_add_up(short_run):
    summary, rows, stdout = short_run
    first, second = _events(rows, "iteration")
    # No Eq. 6 step comes before iteration 1's decision: h_phi is still the untrained one.
    assert first["decisions_changed_by_meta"] == 0.0
    assert first["meta_updates"] == first["meta_updates_iteration"] > 0
    assert second["meta_updates"] == summary["meta_updates"] == first["meta_updates"] + second["meta_updates_iteration"]
    changed = sum(r["decisions_changed_by_meta"] * r["considered"] for r in (first, second))
    assert summary["decisions_changed_by_meta"] == pytest.approx(changed / summary["prompts_considered"])
    assert "sampling decisions changed by the meta updates" in stdout


def test_the_win_rate_compares_the_per_prompt_rewards_of_the_start_and_the_end(short_run):
    summary, rows, stdout = short_run
    start, *_, end = _events(rows, "eval")
    assert start["iteration"] == 0 and len(start["prompt_rewards"]) == len(end["prompt_rewards"]) > 0
    assert sum(start["prompt_rewards"]) / len(start["prompt_rewards"]) == pytest.approx(summary["reward_initial"])
    assert sum(end["prompt_rewards"]) / len(end["prompt_rewards"]) == pytest.approx(summary["reward_final"])
    assert summary["win_rate_vs_start"] == win_rate(end["prompt_rewards"], start["prompt_rewards"])
    assert "win rate vs the starting policy" in stdout


def test_probed_prompts_get_a_gain_but_no_training_and_no_annotation_count(short_run):
    summary, rows, _ = short_run
    gains, decisions, iterations = _events(rows, "gain"), _events(rows, "decisions"), _events(rows, "iteration")
    assert len(gains) == 2 and summary["probe_annotations"] == sum(g["probed"] for g in gains) > 0
    for g, d, it in zip(gains, decisions, iterations):
        assert len(g["score_offline"]) == len(g["gain"]) == len(g["sampled"])
        assert sum(g["sampled"]) == it["online_pairs"]  # every sampled prompt with an online pair
        assert len(g["sampled"]) - sum(g["sampled"]) <= g["probed"] <= PROBES
        assert it["annotated"] == len(d["annotated"])
    assert summary["prompts_annotated"] == sum(it["annotated"] for it in iterations)
    assert summary["num_online_pairs"] == sum(it["online_pairs"] for it in iterations)
    assert summary["seconds"]["probe"] > 0
