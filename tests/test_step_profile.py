"""benchmarks/step_profile.py --steps 2 end to end: every row is a positive time, and the parts sit
inside what holds them (a profile that missed a function would print 0, one that counted it twice
would exceed its parent)."""
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_two_steps_profile_into_parts_no_larger_than_the_whole():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--steps", "2"], capture_output=True,
                          text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ms = {m[0].strip(): float(m[1]) for m in re.findall(r"^(.+?)\s+([0-9.]+) ms per (?:step|layer)$", proc.stdout, re.M)}
    assert len(ms) == 12 and all(v > 0 for v in ms.values()), ms
    assert ms["forward"] + ms["backward"] + ms["grad clip + AdamW"] <= ms["train step"], ms
    assert ms["matrix products (torch.matmul)"] < ms["forward"] and ms["matrix products (Tensor.matmul)"] < ms["backward"]
    attention = ms["q, k, v split"] + ms["rotary (q and k)"] + ms["core attention by segments"]
    assert attention <= ms["layer forward: attention block"] and ms["SwiGLU"] < ms["layer forward: MLP block"], ms


def test_against_hf_runs_the_same_work_through_both_models_and_prints_both_times():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "benchmarks/step_profile.py", "--against-hf", "--rounds", "1"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    diff = float(re.search(r"logits equal to ([0-9.e+-]+)", proc.stdout)[1])
    ms = dict(re.findall(r"^  (megatron-core GPTModel|transformers LlamaForCausalLM)\s+([0-9.]+) ms$", proc.stdout, re.M))
    ratio = float(re.search(r"megatron-core / transformers\s+([0-9.]+)", proc.stdout)[1])
    assert diff <= 1e-4 and len(ms) == 2 and all(float(v) > 0 for v in ms.values()), proc.stdout
    assert abs(ratio - float(ms["megatron-core GPTModel"]) / float(ms["transformers LlamaForCausalLM"])) < 1e-2
