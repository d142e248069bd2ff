"""Every row of METAAPO.md's baseline table runs through the same loop and trains: one short
iteration of each algo.name, with its defaults (plus the one setting a method cannot do without),
takes optimiser steps and samples whom its row says."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from metaapo_nemo.algorithm.strategies import STRATEGIES
from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[1]
PAIRS = 24
# The settings a method cannot do without, as validate() asks for them (tested below).
NEEDS = {"cdpo": ["algo.label_smoothing=0.1"], "adpo": ["algo.threshold=0.7"]}
OFFLINE = {"dpo", "cdpo", "ipo", "simpo"}
EVERY_PROMPT = {"online_dpo", "selm", "metaapo_all_sampling"}
RANDOM_SHARE = {"metaapo_random_sampling", "online_dpo_random_subset"}  # algo.random_ratio = 0.5 of the prompts


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run(out, cache, *extra):
    return subprocess.run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
                           f"task.cache_dir={cache}", *SHRUNK_TINY_CPU, "algo.iterations=1",
                           f"data.max_train_pairs={PAIRS}", "trainer.num_threads=1", *extra],
                          capture_output=True, text=True, timeout=900, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


@pytest.mark.parametrize("name", list(STRATEGIES))
def test_every_algorithm_trains_and_samples_as_its_row_says(tmp_path, cache, name):
    proc = _run(tmp_path / "out", cache, f"algo.name={name}", *NEEDS.get(name, []))
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["finished"] and summary["optimizer_steps"] > 0 and summary["prompts_considered"] == PAIRS
    annotated = summary["prompts_annotated"]
    if name in OFFLINE:
        assert annotated == 0
    elif name in EVERY_PROMPT:
        assert annotated == PAIRS
    elif name in RANDOM_SHARE:
        assert 0 < annotated < PAIRS
    assert (summary["meta_updates"] > 0) == STRATEGIES[name].meta_learner_trained


@pytest.mark.parametrize("override, problem", [
    ("algo.name=cdpo", "algo.label_smoothing=0.0: the cdpo loss needs its label noise in (0, 0.5)"),
    ("algo.name=adpo", "algo.threshold=-0.5: adpo samples the pairs whose DPO loss is below it"),
], ids=["cdpo", "adpo"])
def test_a_method_without_the_setting_it_needs_is_refused_in_one_line(tmp_path, cache, override, problem):
    proc = _run(tmp_path / "out", cache, override)
    assert proc.returncode == 2 and problem in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]


def test_a_run_that_trained_nothing_does_not_end_as_a_finished_run(tmp_path, cache):
    # A threshold no DPO loss is below: adpo selects no prompt and trains nothing.
    out = tmp_path / "out"
    proc = _run(out, cache, "algo.name=adpo", "algo.threshold=1e-9")
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "1 iteration(s) took no optimiser step (algo.name=adpo: 0 prompts annotated" in proc.stderr
    assert not json.loads((out / "summary.json").read_text())["finished"]
    assert not (out / "final").exists()
