"""benchmarks/metaapo_cost.py --quick end to end: both settings run side by side and its last line
is the JSON the issue asks for (ratios, phases per side, meta share, response lengths, versions)."""
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_quick_cost_benchmark_prints_both_ratios_and_every_phase(tmp_path):
    command = [sys.executable, "benchmarks/metaapo_cost.py", "--quick", "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ratio_default"] > 0 and result["ratio_generation_heavy"] > 0
    for setting in ("default", "generation_heavy"):
        for method in ("metaapo", "online_dpo"):
            seconds = result["seconds"][setting][method]
            assert set(seconds) == {"scoring", "sampling", "annotation", "training", "evaluation", "meta", "other", "total",
                                    "reference"}
            assert seconds["total"] > 0 and seconds["training"] > 0 and seconds["sampling"] > 0
            assert result["peak_rss_mib"][setting][method] > 100
        assert 0 < result["meta_share_of_training"][setting] < 1
        assert result["seconds"][setting]["online_dpo"]["meta"] == 0
    lengths = result["response_tokens_mean"]
    assert all(n < 12 for n in lengths["default"].values())  # 4-8 letters and eos
    assert all(n >= 64 for n in lengths["generation_heavy"].values()), lengths
    assert result["versions"]["torch"] and result["quick"] is True
    assert "| generation_heavy | metaapo |" in proc.stdout
