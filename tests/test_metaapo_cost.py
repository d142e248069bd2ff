"""benchmarks/metaapo_cost.py --quick end to end, one setting per test: both methods run side by
side and its last line is the JSON the issue asks for (ratio, phases per side, meta share, response
lengths, versions). The generation-heavy setting is marked slow (python -m pytest -q -m slow)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _quick(tmp_path, setting: str) -> tuple[dict, str]:
    command = [sys.executable, "benchmarks/metaapo_cost.py", "--quick", "--settings", setting, "--out", str(tmp_path / "out")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=1500, cwd=ROOT,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    seconds = result["seconds"][setting]
    for method in ("metaapo", "online_dpo"):
        assert set(seconds[method]) == {"scoring", "sampling", "annotation", "training", "evaluation", "meta", "other",
                                        "total", "reference"}
        assert seconds[method]["total"] > 0 and seconds[method]["training"] > 0 and seconds[method]["sampling"] > 0
        assert result["peak_rss_mib"][setting][method] > 100
    assert result[f"ratio_{setting}"] > 0
    assert 0 < result["meta_share_of_training"][setting] < 1
    assert seconds["online_dpo"]["meta"] == 0
    assert result["versions"]["torch"] and result["quick"] is True
    assert f"| {setting} | metaapo |" in proc.stdout
    return result, proc.stdout


def test_quick_cost_benchmark_prints_the_ratio_and_every_phase(tmp_path):
    result, _ = _quick(tmp_path, "default")
    assert all(n < 12 for n in result["response_tokens_mean"]["default"].values())  # 4-8 letters and eos


@pytest.mark.slow  # builds a task of its own (120 SFT steps on 65-81-token answers): ~2 minutes more
def test_quick_generation_heavy_variant_samples_long_responses(tmp_path):
    result, _ = _quick(tmp_path, "generation_heavy")
    lengths = result["response_tokens_mean"]["generation_heavy"]
    assert all(n >= 64 for n in lengths.values()), lengths
