"""benchmarks/reward_hacking.py --quick end to end: both runs (annotated by the exact reward, and by
a reward model trained from the SFT model) in processes of their own, and its last line the JSON of
their numbers, read back here from each run's summary.json and the reward model's summary."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_quick_reward_hacking_benchmark_reports_what_its_two_runs_wrote(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "benchmarks/reward_hacking.py", "--quick", "--out", str(out), "--cache", str(cache)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1200, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["quick"] is True and result["seed"] == 1234 and result["versions"]["torch"]

    programmatic, trained = (json.loads((out / "runs" / r / "summary.json").read_text())
                             for r in ("programmatic", "trained"))
    p, t = result["programmatic"], result["trained"]
    assert p["programmatic_reward"] == [programmatic["reward_initial"], programmatic["reward_final"]]
    assert p["programmatic_win_rate"] == programmatic["win_rate_vs_start"]
    assert t["programmatic_reward"] == [trained["eval_reward_initial"], trained["eval_reward_final"]]
    assert t["programmatic_win_rate"] == trained["eval_win_rate_vs_start"]
    assert t["reward_model_reward"] == [trained["reward_initial"], trained["reward_final"]]
    assert t["reward_model_win_rate"] == trained["win_rate_vs_start"]
    assert (p["annotation_ratio"], t["annotation_ratio"]) == (programmatic["annotation_ratio"], trained["annotation_ratio"])
    # One starting policy and one set of sampling seeds: the first evaluation's programmatic reward is one number.
    assert t["programmatic_reward"][0] == p["programmatic_reward"][0]
    assert t["reward_model_reward"][0] != t["programmatic_reward"][0]

    folders = [d for d in cache.iterdir() if d.name.startswith("tiny_cpu-rm-")]
    assert len(folders) == 1
    rm = json.loads((folders[0] / "reward_model" / "reward_summary.json").read_text())
    assert (result["reward_model_accuracy"], result["reward_model_eval_pairs"]) == (rm["accuracy"], rm["eval_pairs"])
    assert 0 <= rm["accuracy"] <= 1 and rm["eval_pairs"] > 0 and len(rm["epochs"]) - 1 == 1
    assert f"held-out pair accuracy {rm['accuracy']:.3f}" in proc.stdout
    assert "| trained |" in proc.stdout and "| programmatic |" in proc.stdout
