"""benchmarks/vs_trl.py --quick end to end: the last line is JSON with the four ratios, and the two
sides of each equal-work phase processed the same data.

TRL is the benchmark's peer, not a project dependency: the benchmark installs trl==1.16.0 itself when
it is missing, and where that fails this test fails with the benchmark's message (no skip)."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_run_reports_finite_ratios_with_equal_work_on_both_sides():
    command = [sys.executable, "benchmarks/vs_trl.py", "--quick"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    for key in ("ratio_dpo_tokens_per_s", "ratio_dpo_best", "ratio_online_iteration", "ratio_online_best"):
        assert math.isfinite(result[key]) and result[key] > 0, (key, result[key])
    # (a) and (b): the same pairs, tokens (each side counted from its own tokenization) and steps.
    for phase in ("dpo_equal_counts", "dpo_best_counts"):
        ours, trl = result[phase]["ours"], result[phase]["trl"]
        assert ours == trl and ours["pairs"] == 32 and ours["tokens"] > 0, (phase, ours, trl)
    # (c) and (d): as many generated sequences, pairs and optimiser steps on both sides.
    for phase in ("online_counts", "online_best_counts"):
        ours, trl = result[phase]["ours"], result[phase]["trl"]
        assert all(ours[k] == trl[k] for k in ("sequences", "pairs", "steps")), (phase, ours, trl)
    settings = result["seconds"]["online_best"]
    assert settings["ours_setting"] in ("fp32", "bf16") and settings["trl_setting"] in ("fp32", "bf16 autocast"), settings
    assert ours["sequences"] == 2 * ours["pairs"] == 2 * result["sizes"]["prompts"]
    assert result["versions"]["trl"] == "1.16.0"
    # (a) ran both sides in fp32 without recomputation; (b) ran TRL at its defaults.
    settings = result["settings"]
    assert settings["TRL fp32, precomputed ref"] == {"precision": "fp32", "gradient_checkpointing": False}
    assert settings["TRL defaults"] == {"precision": "bf16 autocast", "gradient_checkpointing": True}
    # (a): our reference pass in TRL's batches (2 x 8 sequences); (b): in our best setting's.
    assert settings["ours fp32"] == {"precision": "fp32", "reference_batch": 16}
    assert settings["ours bf16"] == {"precision": "bf16", "reference_batch": 256}
