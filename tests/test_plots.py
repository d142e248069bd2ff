"""plots.png from metaapo_nemo/plots.py: written from a run's metrics rows, with or without the
potential-gain rows, and from the rows of an older run that has no per-prompt rewards."""
import math

import pytest

from metaapo_nemo.plots import mean_and_interval, plot_run

PNG = b"\x89PNG\r\n\x1a\n"


def _rows(iterations=2, with_gain=True, per_prompt=True):
    rows = [{"event": "setup", "step": 0, "iteration": 0, "algorithm": "metaapo", "pairs": 24, "eval_prompts": 4}]
    step = 0
    for t in range(iterations + 1):
        rewards = [0.2 + 0.05 * t + 0.01 * k for k in range(4)]
        rows.append({"event": "eval", "step": step, "iteration": t, "reward": sum(rewards) / 4,
                     **({"prompt_rewards": rewards} if per_prompt else {})})
        if t == iterations:
            break
        if with_gain:
            rows.append({"event": "gain", "step": step, "iteration": t + 1, "score_offline": [-1.0, -0.5, -0.2],
                         "gain": [0.4, -0.1, 0.05], "sampled": [True, False, False], "probed": 2})
        for _ in range(3):
            step += 1
            rows.append({"event": "train_step", "step": step, "iteration": t + 1, "loss": 0.6, "loss_offline": 0.7,
                         "loss_online": 0.5, "meta_weight_mean": 0.4})
        rows.append({"event": "meta_update", "step": step, "iteration": t + 1, "meta_loss": 0.6, "meta_weight_mean": 0.4})
        rows.append({"event": "iteration", "step": step, "iteration": t + 1, "meta_updates": t + 1,
                     "meta_curve": [[-1.5, -0.7, -0.1], [0.1, 0.2, 0.4]]})
    return rows


@pytest.mark.parametrize("rows", [_rows(), _rows(with_gain=False), _rows(per_prompt=False), _rows(iterations=0)],
                         ids=["with-gain", "probe-off", "older-run", "no-iteration"])
def test_plot_run_writes_a_png(tmp_path, rows):
    path = tmp_path / "plots.png"
    plot_run(rows, path)
    assert path.read_bytes()[:8] == PNG and path.stat().st_size > 10_000


def test_mean_and_interval_is_the_mean_and_1_96_standard_errors():
    mean, half = mean_and_interval([1.0, 2.0, 3.0, 4.0])
    # sample variance 5/3, standard error sqrt(5/3 / 4)
    assert mean == 2.5 and half == pytest.approx(1.96 * math.sqrt(5 / 12))
    assert mean_and_interval([0.7]) == (0.7, 0.0)
