"""Experiment logging (the `logger` keys, metaapo_nemo/loggers.py): what metrics.jsonl holds reaches
TensorBoard and W&B at the row's step; the keys are overridden and validated like every section's."""
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from metaapo_nemo.config import ConfigError, LoggerConfig, MetaAPOConfig, apply_overrides
from metaapo_nemo.loggers import ExperimentLoggers
from metaapo_nemo.metrics import MetricsWriter
from metaapo_nemo.recipes import get_recipe
from tests.algorithm.test_loop_settings import ROOT, _run, user_files  # noqa: F401 (a fixture)

ROWS = [  # (event, step, iteration, values) as the loop writes them
    ("setup", 0, 0, dict(algorithm="metaapo", pairs=24)),
    ("eval", 0, 0, dict(reward=0.25, prompt_rewards=[0.0, 0.5])),
    ("annotation", 0, 1, dict(samples=16, sample_reward_mean=0.375)),
    ("decisions", 0, 1, dict(annotated=["p0", "p3"])),
    ("train_step", 1, 1, dict(loss=0.6931, loss_offline=0.5, loss_online=0.75, meta_weight_mean=0.334, lr=2e-5)),
    ("meta_update", 1, 1, dict(meta_loss=0.125, meta_weight_mean=0.4)),
    ("train_step", 2, 1, dict(loss=0.625, loss_offline=0.4, loss_online=0.7, meta_weight_mean=0.3, lr=2e-5)),
    ("eval", 2, 1, dict(reward=0.5, prompt_rewards=[0.25, 0.75])),
    ("iteration", 2, 1, dict(reward=0.5, annotated=2, considered=24, skipped=float("nan"))),
]


def _config(tmp_path: Path, *overrides: str) -> MetaAPOConfig:
    config = MetaAPOConfig(output_dir=str(tmp_path / "run"))
    apply_overrides(config, list(overrides))
    return config


def _write(config: MetaAPOConfig, rows=ROWS) -> MetricsWriter:
    writer = MetricsWriter(Path(config.output_dir) / "metrics.jsonl", loggers=ExperimentLoggers(config))
    Path(config.output_dir).mkdir(parents=True, exist_ok=True)
    writer.truncate_to(0)
    for event, step, iteration, values in rows:
        writer.write(event, step, iteration, **values)
    return writer


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(log_dir / "tensorboard"))
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def test_tensorboard_gets_every_numeric_scalar_of_metrics_jsonl_at_its_step(tmp_path):
    config = _config(tmp_path, "logger.tensorboard_enabled=true")
    _write(config).close()
    scalars = _scalars(tmp_path / "run" / "logs")
    assert scalars["train_step/loss"] == [(1, pytest.approx(0.6931)), (2, 0.625)]
    assert scalars["train_step/meta_weight_mean"] == [(1, pytest.approx(0.334)), (2, pytest.approx(0.3))]
    assert scalars["meta_update/meta_weight_mean"] == [(1, pytest.approx(0.4))]
    assert scalars["eval/reward"] == [(0, 0.25), (2, 0.5)]
    assert scalars["annotation/sample_reward_mean"] == [(0, 0.375)]
    assert scalars["iteration/annotated"] == [(2, 2.0)] and scalars["setup/pairs"] == [(0, 24.0)]
    # Lists, strings, a NaN (null in metrics.jsonl) and the row's coordinates are not scalars to plot.
    assert not {"eval/prompt_rewards", "decisions/annotated", "setup/algorithm", "iteration/skipped",
                "train_step/step", "train_step/iteration"} & set(scalars)
    rows = MetricsWriter(tmp_path / "run" / "metrics.jsonl").read()
    assert set(scalars) == {f"{r['event']}/{k}" for r in rows for k, v in r.items()
                            if k not in ("event", "step", "iteration") and isinstance(v, (int, float))}


def test_a_resume_drops_what_the_interrupted_run_logged_after_its_checkpoint(tmp_path):
    config = _config(tmp_path, "logger.tensorboard_enabled=true", f"logger.log_dir={tmp_path / 'tb'}")
    writer = _write(config, ROWS[:5])  # the checkpoint: 5 lines, the last at step 1
    writer.write("meta_update", 1, 1, meta_loss=9.0)  # lost with the interrupted run
    writer.write("train_step", 2, 1, loss=9.0)
    writer.close()
    resumed = MetricsWriter(Path(config.output_dir) / "metrics.jsonl", loggers=ExperimentLoggers(config))
    resumed.truncate_to(5)
    for event, step, iteration, values in ROWS[5:]:
        resumed.write(event, step, iteration, **values)
    resumed.close()
    scalars = _scalars(tmp_path / "tb")
    assert scalars["train_step/loss"] == [(1, pytest.approx(0.6931)), (2, 0.625)]
    assert scalars["meta_update/meta_loss"] == [(1, 0.125)]
    assert scalars["eval/reward"] == [(0, 0.25), (2, 0.5)]


def test_nothing_is_logged_on_a_rank_that_does_not_write_metrics_jsonl(tmp_path):
    config = _config(tmp_path, "logger.tensorboard_enabled=true")
    writer = MetricsWriter(tmp_path / "metrics.jsonl", enabled=False, loggers=ExperimentLoggers(config))
    writer.write("train_step", 1, 1, loss=0.5)
    writer.truncate_to(0)
    writer.close()
    assert not (tmp_path / "run" / "logs").exists()


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed (pip install wandb)")
def test_wandb_offline_writes_a_local_run_with_the_logged_values(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    config = _config(tmp_path, "logger.wandb_enabled=true", "logger.wandb.project=metaapo-test", "reward.token=s3cret")
    writer = _write(config)
    run = writer.loggers._wandb
    assert run.offline and run.name == "run" and run.project == "metaapo-test"
    assert run.config["logger"]["wandb_enabled"] is True and run.config["algo"]["name"] == "metaapo"
    assert run.config["reward"]["token"] == "<set>" and config.reward.token == "s3cret"
    # W&B commits a step's values when a later step starts (step 2's at finish): the latest so far are step 1's.
    summary = dict(run.summary)
    assert summary["_step"] == 1 and summary["train_step/loss"] == 0.6931
    assert summary["meta_update/meta_weight_mean"] == 0.4
    assert summary["eval/reward"] == 0.25 and summary["annotation/sample_reward_mean"] == 0.375
    assert "eval/prompt_rewards" not in summary and "setup/algorithm" not in summary
    writer.close()
    import wandb

    wandb.teardown()  # wandb-core writes the run file out when its service stops (at exit in a run)
    run_files = list((tmp_path / "run" / "logs" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1
    data = run_files[0].read_bytes()
    assert all(tag.encode() in data for tag in ("train_step/loss", "meta_update/meta_weight_mean", "eval/reward"))
    assert b"0.625" in data and b"s3cret" not in data  # step 2's loss, committed by finish


def test_the_nested_logger_keys_take_overrides():
    config = get_recipe("tiny_cpu")
    assert config.logger == LoggerConfig() and config.logger.wandb.mode == "offline"
    apply_overrides(config, ["logger.tensorboard_enabled=true", "logger.wandb.project=x", "logger.wandb.mode=online",
                             "logger.log_dir=/tmp/logs"])
    assert config.logger.tensorboard_enabled is True and config.logger.wandb.project == "x"
    assert config.logger.wandb.mode == "online" and config.logger.log_dir == "/tmp/logs"
    assert config.to_dict()["logger"]["wandb"]["project"] == "x"
    with pytest.raises(ConfigError, match="unknown key 'projct'; valid keys here: project, name, entity, mode"):
        apply_overrides(config, ["logger.wandb.projct=x"])


def test_the_logger_keys_round_trip_through_a_slurm_jobs_overrides():
    from metaapo_nemo.launch.slurm import config_overrides

    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["logger.wandb_enabled=true", "logger.wandb.name=ablation 1"])
    overrides = config_overrides(config, "tiny_cpu")
    assert overrides == ["logger.wandb_enabled=True", "logger.wandb.name=ablation 1"]
    again = get_recipe("tiny_cpu")
    apply_overrides(again, overrides)
    assert again.logger == config.logger


@pytest.mark.parametrize("override, problem", [
    ("logger.tensorboard_enabled=yes", "override 'logger.tensorboard_enabled=yes': expected true or false"),
    ("logger.wandb.mode=cloud", "logger.wandb.mode='cloud': use 'offline', 'online' or 'disabled'"),
    ("logger.wandb=x", "logger.wandb='x': a section; set its keys, e.g. logger.wandb.project=NAME"),
])
def test_bad_logger_settings_are_refused_in_one_line(override, problem):
    config = get_recipe("tiny_cpu")
    with pytest.raises(ConfigError) as raised:
        apply_overrides(config, [override])  # a wrong type is refused here, the rest by validate
        config.validate()
    assert problem in [line.strip().removeprefix("- ") for line in str(raised.value).splitlines()], str(raised.value)


def test_a_logger_name_that_is_not_a_string_is_refused():
    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["logger.wandb.project=7"])  # from the command line: the text "7"
    assert config.logger.wandb.project == "7"
    config.logger.wandb.project = 7  # from Python
    with pytest.raises(ConfigError, match="logger.wandb.project=7: a string"):
        config.validate()


def test_wandb_enabled_without_wandb_installed_says_to_pip_install_it(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    config = get_recipe("tiny_cpu")
    apply_overrides(config, ["logger.wandb_enabled=true"])
    with pytest.raises(ConfigError, match=r"logger.wandb_enabled=true: wandb is not installed; pip install wandb"):
        config.validate()
    config.validate(on_this_machine=False)  # a Slurm job's container is checked where it starts


def test_a_run_logs_each_iteration_and_step_of_metrics_jsonl_to_tensorboard(user_files, tmp_path):
    out = tmp_path / "out"
    summary, rows, _ = _run(user_files, out, "algo.iterations=2", "logger.tensorboard_enabled=true")
    scalars = _scalars(out / "logs")
    steps = [r for r in rows if r["event"] == "train_step"]
    assert summary["optimizer_steps"] == len(steps) > 0
    for key in ("loss", "loss_online", "meta_weight_mean", "grad_norm"):
        assert scalars[f"train_step/{key}"] == [(r["step"], pytest.approx(r[key])) for r in steps]
    iterations = [r for r in rows if r["event"] == "iteration"]
    assert len(iterations) == 2
    assert scalars["iteration/reward"] == [(r["step"], pytest.approx(r["reward"])) for r in iterations]
    rewards = [summary["reward_initial"], *summary["reward_per_iteration"]]
    assert [v for _, v in scalars["eval/reward"]] == pytest.approx(rewards)
    assert len(scalars["annotation/sample_reward_mean"]) == 2


NEMO = Path(sys.executable).with_name("nemo")


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_llm_metaapo_takes_the_nested_logger_keys():
    command = [str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--dryrun", "logger.tensorboard_enabled=true",
               "logger.wandb.project=x", "output_dir=/tmp/never"]
    out = subprocess.run(command, capture_output=True, text=True, timeout=180, cwd=ROOT,
                         env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert out.returncode == 0, out.stdout + out.stderr
    assert "tensorboard_enabled=True" in out.stdout and "project='x'" in out.stdout
