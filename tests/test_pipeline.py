"""The whole pipeline, for real and shrunk: `nemo llm metaapo --recipe tiny_cpu` builds the
embedded task, starts its reward server process, runs Algorithm 1 on megatron-core, and writes
the output_dir files of CONTRACTS.md; a killed run resumes to the same result as an
uninterrupted one; a finished run is not run again."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[1]
NEMO = Path(sys.executable).with_name("nemo")


def _env():
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}


def _nemo(out_dir, cache, *extra):
    return [str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--yes", f"output_dir={out_dir}",
            f"task.cache_dir={cache}", *SHRUNK_TINY_CPU, *extra]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, cache):
    out = tmp_path_factory.mktemp("run") / "out"
    proc = subprocess.run(_nemo(out, cache), capture_output=True, text=True, timeout=900, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc.stdout


pytestmark = pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")


def test_run_writes_summary_metrics_and_a_transformers_checkpoint(finished_run):
    out, stdout = finished_run
    summary = json.loads((out / "summary.json").read_text())
    assert summary["finished"] and summary["algorithm"] == "metaapo" and summary["iterations"] == 2
    assert summary["prompts_considered"] == 96
    assert summary["annotation_ratio"] == pytest.approx(summary["prompts_annotated"] / 96)
    assert 0 < summary["annotation_ratio"] < 1
    assert 0 <= summary["reward_initial"] <= 1 and 0 <= summary["reward_final"] <= 1
    assert set(summary["seconds"]) >= {"scoring", "sampling", "annotation", "training", "total"}
    assert summary["tokens_per_second"]["training"] > 0 and summary["tokens_per_second"]["generation"] > 0
    assert "held-out reward" in stdout and "annotation ratio" in stdout

    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all("step" in r and "iteration" in r for r in rows)
    steps = [r for r in rows if r["event"] == "train_step"]
    assert [r["step"] for r in steps] == list(range(1, len(steps) + 1))
    assert sum(r["event"] == "meta_update" for r in rows) == summary["meta_updates"] > 0
    assert [r["iteration"] for r in rows if r["event"] == "eval"] == [0, 1, 2]
    # No eval reward asked for: none of its keys or files (tests/data/test_embedded_reward.py has them).
    assert not any(k.startswith("eval_reward") for k in summary) and not (out / "eval_rewards").exists()
    assert not any("eval_reward" in r for r in rows if r["event"] == "eval")
    assert (out / "plots.png").stat().st_size > 10_000

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(out / "final")
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    ids = tokenizer("rev:abcd=", return_tensors="pt").input_ids
    # The vocabulary is rounded up to a multiple of 64 so tensor parallelism can split it.
    assert model(ids).logits.shape[-1] == model.config.vocab_size == 64 >= len(tokenizer)


def test_a_finished_run_is_not_run_again(finished_run, cache):
    out, _ = finished_run
    before = (out / "metrics.jsonl").read_text()
    proc = subprocess.run(_nemo(out, cache), capture_output=True, text=True, timeout=300, env=_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "not running it again" in proc.stdout
    assert (out / "metrics.jsonl").read_text() == before


def test_a_killed_run_resumes_to_the_uninterrupted_result(finished_run, cache, tmp_path):
    reference_out, _ = finished_run
    out = tmp_path / "resumed"
    proc = subprocess.Popen(_nemo(out, cache), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            cwd=ROOT, start_new_session=True)
    deadline = time.time() + 600
    latest = out / "checkpoints" / "latest"
    while not (latest.exists() and latest.read_text() == "iter_1"):
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)  # mid-way through iteration 2, reward server included
    proc.wait()
    assert not json.loads((out / "summary.json").read_text())["finished"]

    again = subprocess.run(_nemo(out, cache), capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resumed" in again.stdout
    resumed, uninterrupted = (json.loads((d / "summary.json").read_text()) for d in (out, reference_out))
    for key in ("reward_initial", "reward_per_iteration", "prompts_annotated", "num_online_pairs", "meta_updates",
                "optimizer_steps"):
        assert resumed[key] == uninterrupted[key], key
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference_out / "final" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train_step"]
    assert steps == list(range(1, len(steps) + 1))
