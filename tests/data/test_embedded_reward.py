"""The embedded task annotated by a trained reward model (task.reward=trained), and the eval reward
that scores the same held-out samples beside it (reward.eval_reward_fn / reward.eval_url)."""
import json
import os
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from metaapo_nemo.config import ConfigError, EmbeddedTaskConfig, apply_overrides
from metaapo_nemo.data.embedded import REWARD_FN, task_keys
from metaapo_nemo.recipes import get_recipe
from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")


def _problems(*overrides) -> str:
    config = get_recipe("tiny_cpu")
    apply_overrides(config, list(overrides))
    with pytest.raises(ConfigError) as err:
        config.validate()
    return str(err.value)


def test_reward_sources_that_cannot_work_are_refused_one_line_each():
    assert "task.reward='exact': use 'programmatic'" in _problems("task.reward=exact")
    assert "task.reward=trained trains a reward model on the embedded task's pairs, but task.enabled is false" in (
        _problems("task.reward=trained", "task.enabled=false", "policy.hf_path=/m", "data.train=/t", "data.eval=/e"))
    message = _problems("task.reward=trained", "reward.url=http://127.0.0.1:5000", "reward.model_dir=/rm")
    assert "reward.url=http://127.0.0.1:5000 and task.reward=trained both name who annotates" in message
    assert "reward.model_dir=/rm and task.reward=trained both name who annotates" in message
    assert "reward.reward_fn=my.module:fn and task.reward=trained" in _problems("task.reward=trained",
                                                                               "reward.reward_fn=my.module:fn")
    assert "task.reward_epochs=0: must be an integer >= 1" in _problems("task.reward=trained", "task.reward_epochs=0")
    assert "reward.eval_reward_fn and reward.eval_url are both set" in _problems(
        f"reward.eval_reward_fn={REWARD_FN}", "reward.eval_url=http://127.0.0.1:5000")
    # The recipe's own reward_fn is the programmatic one, which task.reward=trained replaces.
    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["task.reward=trained"])
    config.validate()


def test_the_reward_keys_leave_the_task_cache_keys_as_they_were():
    # Computed before task.reward, task.reward_epochs and task.reward_lr existed: caches built then
    # are found now, whoever annotates.
    recipe_task = get_recipe("tiny_cpu").task
    assert task_keys(EmbeddedTaskConfig(), 1234) == ("efe0c47bedb4", "b6e364e0f2c8")
    assert task_keys(recipe_task, 1234) == ("efe0c47bedb4", "5e3d65d4860e")
    for override in ("reward=trained", "reward_epochs=7", "reward_lr=0.01"):
        apply_overrides(recipe_task, [override])
        assert task_keys(recipe_task, 1234) == ("efe0c47bedb4", "5e3d65d4860e")


# ---------------------------------------------------------------- two shrunk runs, end to end
def _run(out: Path, cache: Path, *extra: str) -> dict:
    command = [str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--yes", f"output_dir={out}",
               f"task.cache_dir={cache}", *SHRUNK_TINY_CPU, "algo.probe_unsampled=0", *extra]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return {"summary": json.loads((out / "summary.json").read_text()), "log": (out / "console.log").read_text(),
            "evals": [r for r in rows if r["event"] == "eval"]}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    if not NEMO.exists():
        pytest.skip("the nemo console script is installed with the package")
    root, cache = tmp_path_factory.mktemp("runs"), tmp_path_factory.mktemp("cache")
    trained = _run(root / "trained", cache, "task.reward=trained", "task.reward_epochs=1")
    programmatic = _run(root / "programmatic", cache, f"reward.eval_reward_fn={REWARD_FN}")
    return root, cache, trained, programmatic


def _is_programmatic_value(reward: float) -> bool:
    """1 - distance / length, with both at most a few dozen characters."""
    return 0 <= reward <= 1 and Fraction(reward).limit_denominator(128) == Fraction(reward)


def test_the_reward_model_is_trained_once_in_its_own_cache_folder_with_its_accuracy(runs):
    root, cache, trained, _ = runs
    folders = sorted(p.name for p in cache.iterdir() if p.name.startswith("tiny_cpu-rm-"))
    assert len(folders) == 1 and (cache / folders[0] / "DONE").exists()
    summary = json.loads((cache / folders[0] / "reward_model" / "reward_summary.json").read_text())
    assert summary["epochs"][-1]["epoch"] == 1 and 0 <= summary["accuracy"] <= 1
    rm_dir = cache / folders[0] / "reward_model"
    assert f"reward model {rm_dir}: held-out pair accuracy {summary['accuracy']:.3f}" in trained["log"]
    assert f"starting a local reward server ({rm_dir})" in trained["log"]


def test_a_trained_reward_run_annotates_with_the_reward_model(runs):
    root, _, trained, _ = runs
    paid = [json.loads(line)["reward"] for path in (root / "trained" / "rewards").glob("rank_*.jsonl")
            for line in path.read_text().splitlines()]
    assert len(paid) > 100
    # The reward model's scores are any floats; the programmatic reward's are short fractions in [0, 1].
    assert sum(_is_programmatic_value(r) for r in paid) < 0.05 * len(paid)
    assert trained["summary"]["num_online_pairs"] > 0


def test_the_eval_reward_scores_the_same_held_out_samples_beside_the_reward(runs):
    _, _, trained, programmatic = runs
    # The programmatic run's eval reward is its own reward function: equal in every eval row.
    assert [r["eval_reward"] for r in programmatic["evals"]] == [r["reward"] for r in programmatic["evals"]]
    s = programmatic["summary"]
    assert (s["eval_reward_initial"], s["eval_reward_final"]) == (s["reward_initial"], s["reward_final"])
    assert s["eval_reward_per_iteration"] == s["reward_per_iteration"]
    # Both runs start from the same policy and sampling seeds: the trained run's eval reward (the
    # programmatic default) of its starting samples is the programmatic run's reward of them.
    assert trained["evals"][0]["eval_reward"] == programmatic["evals"][0]["reward"]
    assert trained["evals"][0]["reward"] != trained["evals"][0]["eval_reward"]
    t = trained["summary"]
    assert t["eval_reward_initial"] == trained["evals"][0]["eval_reward"]
    assert t["eval_reward_final"] == trained["evals"][-1]["eval_reward"]
    assert [r["iteration"] for r in trained["evals"]] == [0, 1, 2]
    assert f"eval reward {t['eval_reward_initial']:.4f} -> {t['eval_reward_final']:.4f}" in trained["log"]


def _win_rate_by_hand(final, start):
    return sum(1.0 if f > s else 0.5 if f == s else 0.0 for f, s in zip(final, start)) / len(final)


def test_the_eval_win_rate_is_counted_per_prompt_by_the_eval_reward(runs):
    _, _, trained, programmatic = runs
    for run in (trained, programmatic):
        first, last = run["evals"][0]["eval_prompt_rewards"], run["evals"][-1]["eval_prompt_rewards"]
        assert len(first) == len(run["evals"][0]["prompt_rewards"]) > 0
        # Each prompt's mean over its samples: the row's eval_reward is their mean (equal sample counts).
        assert sum(first) / len(first) == pytest.approx(run["evals"][0]["eval_reward"], abs=1e-12)
        assert run["summary"]["eval_win_rate_vs_start"] == pytest.approx(_win_rate_by_hand(last, first), abs=1e-12)
    # With the annotating reward as the eval reward, the two win rates are one.
    assert programmatic["summary"]["eval_win_rate_vs_start"] == programmatic["summary"]["win_rate_vs_start"]
    assert "eval win rate vs start" in trained["log"]  # the final table


def test_a_killed_run_with_an_eval_reward_resumes_to_the_uninterrupted_result_paying_no_eval_text_twice(
        runs, tmp_path):
    import signal
    import time

    root, cache, _, programmatic = runs
    out = tmp_path / "resumed"
    command = [str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--yes", f"output_dir={out}",
               f"task.cache_dir={cache}", *SHRUNK_TINY_CPU, "algo.probe_unsampled=0", f"reward.eval_reward_fn={REWARD_FN}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT,
                            start_new_session=True)
    latest, deadline = out / "checkpoints" / "latest", time.time() + 600
    while not (latest.exists() and latest.read_text() == "iter_1"):  # iteration 1 evaluated, by both rewards
        assert proc.poll() is None and time.time() < deadline, "the run ended before its first checkpoint"
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resumed = _run(out, cache, f"reward.eval_reward_fn={REWARD_FN}")
    assert "resumed" in resumed["log"]
    s, u = resumed["summary"], programmatic["summary"]
    for key in ("eval_reward_initial", "eval_reward_per_iteration", "eval_win_rate_vs_start", "reward_per_iteration"):
        assert s[key] == u[key], key

    def paid(run_dir):  # the keys of the ledger's whole lines (a line cut by the kill is paid again)
        lines = [line for p in sorted((run_dir / "eval_rewards").glob("rank_*.jsonl"))
                 for line in p.read_text().splitlines()]
        return [json.loads(line)["key"] for line in lines if line.endswith("}")]

    # The eval ledger holds each scored text once, as many as the uninterrupted run paid for.
    assert len(paid(out)) == len(set(paid(out))) == len(paid(root / "programmatic"))
