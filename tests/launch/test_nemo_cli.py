"""`nemo llm metaapo` is a NeMo-Run entry point: --recipe is an alias of --factory, overrides use
NeMo-Run syntax, --dryrun shows the plan without running; `metaapo run` reaches the same job."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")


def _run(args, timeout=180):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"}
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT)


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_recipe_alias_and_overrides_dryrun():
    out = _run([str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--dryrun", "algo.beta=0.2",
                "algo.name=online_dpo", "output_dir=/tmp/never"])
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "Dry run for metaapo" in text
    assert "beta=0.2" in text and "name='online_dpo'" in text and "/tmp/never" in text
    assert not Path("/tmp/never").exists()


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_unknown_recipe_lists_the_available_ones():
    out = _run([str(NEMO), "llm", "metaapo", "--recipe=tiny_gpu", "--dryrun"])
    assert out.returncode != 0
    assert "tiny_cpu" in out.stdout + out.stderr and "llama31_8b" in out.stdout + out.stderr


def test_metaapo_run_dryrun_prints_the_resolved_config():
    out = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "qwen25_7b", "--dryrun",
                "policy.hf_path=/models/qwen", "data.train=/d/train.jsonl", "data.eval=/d/eval.jsonl",
                "reward.url=http://rm:5000"])
    assert out.returncode == 0, out.stderr
    assert '"hf_path": "/models/qwen"' in out.stdout and '"top_p": 0.95' in out.stdout


def test_metaapo_run_rejects_an_incomplete_config_with_what_to_set():
    out = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "llama31_8b"])
    assert out.returncode == 2
    assert "policy.hf_path is not set" in out.stderr


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_without_recipe_uses_the_tiny_cpu_default():
    out = _run([str(NEMO), "llm", "metaapo", "--dryrun", "output_dir=/tmp/never"])
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Dry run for metaapo" in out.stdout and "enabled=True" in out.stdout
