"""Killed and resumed for real: a run SIGKILLed at four points (sampling, a meta update, a
checkpoint write, scoring), resumed by the same command each time, ends where an uninterrupted run
ends: the same final weights, the same summary, the same metrics, and the same number of texts
scored, counted at a reward server both runs share. A damaged newest checkpoint falls back to
the one before it; a `latest` that points outside the run's checkpoints is refused; steps gone NaN
are skipped and then stop the run."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load_file

from metaapo_nemo.reward.server import parse_metrics
from tests.helpers import SHRUNK_TINY_CPU
from tests.reward.fixtures import ServerProcess

ROOT = Path(__file__).resolve().parents[1]
# Without a meta step in every training step and a checkpoint after each, the kills below would
# not all land inside training.
SETTINGS = [*SHRUNK_TINY_CPU, "trainer.save_every_steps=1", "trainer.num_threads=1"]
# Each launch dies at its point; the counts are per launch (a resumed process counts from 0).
KILLS = ["sampling:1", "meta:2", "checkpoint_write:3", "scoring:1"]
SUMMARY_KEYS = ["algorithm", "iterations", "finished", "annotation_ratio", "prompts_considered", "prompts_annotated",
                "num_online_pairs", "ties", "meta_updates", "optimizer_steps", "skipped_steps", "reward_initial",
                "reward_final", "reward_per_iteration"]


@pytest.fixture(scope="module")
def reward_server(tmp_path_factory):
    server = ServerProcess(tmp_path_factory.mktemp("server") / "server.log", "--reward-fn",
                           "metaapo_nemo.data.toy_task:reward").wait_healthy(60)
    yield server.url
    server.kill()


def _texts_scored(url: str) -> float:
    return parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)["metaapo_reward_texts_scored_total"]


def _run(out, cache, url, fault=None, extra=(), timeout=900):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "1000"}  # no wrapped lines
    env.pop("METAAPO_FAULT", None)
    if fault:
        env["METAAPO_FAULT"] = fault
    command = [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
               f"task.cache_dir={cache}", f"reward.url={url}", *SETTINGS, *extra]
    logs = Path(out).parent
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "stdout.log", "w+") as stdout, open(logs / "stderr.log", "w+") as stderr:
        proc = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True, env=env, cwd=ROOT,
                                start_new_session=True)
        try:
            proc.wait(timeout=timeout)
        finally:
            try:  # whatever the run left (as a scheduler kills a job's processes with it)
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        stdout.seek(0)
        stderr.seek(0)
        return subprocess.CompletedProcess(command, proc.returncode, stdout.read(), stderr.read())


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, reward_server):
    cache = tmp_path_factory.mktemp("cache")
    _run(tmp_path_factory.mktemp("warm") / "out", cache, reward_server, fault="scoring:1")  # builds the task
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    before = _texts_scored(reward_server)
    proc = _run(out, cache, reward_server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, cache, _texts_scored(reward_server) - before


def _train_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["iteration"], r["loss"], r["grad_norm"]) for r in rows if r["event"] == "train_step"]


def _assert_same_result(out, reference):
    a, b = load_file(out / "final" / "model.safetensors"), load_file(reference / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-6
    resumed, whole = (json.loads((d / "summary.json").read_text()) for d in (out, reference))
    assert {k: resumed[k] for k in SUMMARY_KEYS} == {k: whole[k] for k in SUMMARY_KEYS}
    assert _train_rows(out) == _train_rows(reference)


def test_a_run_killed_four_times_ends_as_the_uninterrupted_run_and_pays_for_no_text_twice(
        uninterrupted, reward_server, tmp_path):
    reference, cache, scored_whole = uninterrupted
    out = tmp_path / "out"
    before = _texts_scored(reward_server)
    for fault in KILLS:
        proc = _run(out, cache, reward_server, fault=fault)
        assert proc.returncode == -9, f"{fault}: the run was not killed there\n" + proc.stdout[-2000:] + proc.stderr[-2000:]
        assert not json.loads((out / "summary.json").read_text())["finished"]
    proc = _run(out, cache, reward_server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    _assert_same_result(out, reference)
    assert _texts_scored(reward_server) - before == scored_whole > 0


def test_a_damaged_newest_checkpoint_falls_back_to_the_one_before_it(uninterrupted, reward_server, tmp_path):
    reference, cache, scored_whole = uninterrupted
    out = tmp_path / "out"
    before = _texts_scored(reward_server)
    proc = _run(out, cache, reward_server, fault="training:2")
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    checkpoints = out / "checkpoints"
    newest = checkpoints / (checkpoints / "latest").read_text()
    shard = max((f for f in (newest / "policy").iterdir() if f.suffix == ".distcp"), key=lambda f: f.stat().st_size)
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # as a disk that filled up would leave it
    proc = _run(out, cache, reward_server)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"checkpoint {newest} is damaged" in proc.stdout and shard.name in proc.stdout
    _assert_same_result(out, reference)
    assert _texts_scored(reward_server) - before == scored_whole


def test_latest_pointing_outside_the_run_is_refused_before_anything_is_unpickled(uninterrupted, reward_server, tmp_path):
    _, cache, _ = uninterrupted
    out = tmp_path / "out"
    evil = tmp_path / "evil"
    evil.mkdir()
    marker = tmp_path / "payload_ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    torch.save({"x": Payload()}, evil / "run_state.pt")
    (out / "checkpoints").mkdir(parents=True)
    (out / "checkpoints" / "latest").write_text("../evil")
    proc = _run(out, cache, reward_server)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "names '../evil', which is not a checkpoint folder inside" in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
    assert not marker.exists()


def test_steps_that_turn_nan_are_skipped_and_then_stop_the_run_naming_the_last_good_checkpoint(
        uninterrupted, reward_server, tmp_path):
    _, cache, _ = uninterrupted
    out = tmp_path / "out"
    # Adam's first step moves every weight by ~lr: 1e30 makes the next forward overflow to inf.
    proc = _run(out, cache, reward_server, extra=["policy.lr=1e30", "trainer.max_skipped_steps=2"])
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "2 optimiser steps had a NaN or inf loss or gradient (the last after step 1 of " \
        "iteration 1)" in errors[0], proc.stderr[-2000:]
    assert f"The last good checkpoint is {out / 'checkpoints' / 'iter_1_step_1'}" in errors[0]
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["event"] for r in rows if r["event"] in ("train_step", "skipped_step")] == \
        ["train_step", "skipped_step", "skipped_step"]


def test_a_reward_server_killed_and_restarted_mid_annotation_is_waited_for_and_no_pair_is_lost_or_doubled(
        uninterrupted, tmp_path):
    import threading

    reference, cache, _ = uninterrupted
    out, slow = tmp_path / "out", ("--reward-fn", "tests.reward.fixtures:slow_toy_reward")
    server = ServerProcess(tmp_path / "server.log", *slow).wait_healthy(60)
    restarted = []
    ledger = out / "rewards" / "rank_0.jsonl"

    def kill_mid_annotation():
        # The held-out evaluation scores 16 x 2 texts; past 64 lines iteration 1's annotation is under way.
        while not (ledger.exists() and len(ledger.read_text().splitlines()) > 64):
            time.sleep(0.05)
        server.kill()
        time.sleep(2.0)  # the run's requests fail meanwhile, and are retried
        restarted.append(ServerProcess(tmp_path / "restarted.log", *slow, port=server.port).wait_healthy(60))

    killer = threading.Thread(target=kill_mid_annotation, daemon=True)
    killer.start()
    try:
        proc = _run(out, cache, server.url, extra=["reward.batch_size=8"])
    finally:
        for p in [server, *restarted]:
            p.kill()
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert restarted, "the server was never killed: the annotation ended before 64 texts were scored"
    assert "retrying" in proc.stderr + proc.stdout
    _assert_same_result(out, reference)  # a lost or doubled pair would change the trajectory
