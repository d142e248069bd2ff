"""A user error ends a run in one line on rank 0 and exit status 2 on every rank, never a traceback:
from `metaapo run` (before or during set-up) and from `nemo llm metaapo`, whose task runs in the
launcher process itself when no executor is given."""
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[1]
NEMO = Path(sys.executable).with_name("nemo")

# The loop raising a ConfigError at set-up, as it does for a model folder or data file it cannot use.
FAILING_LOOP = """
import sys
import metaapo_nemo.algorithm.metaapo as loop
from metaapo_nemo import cli
from metaapo_nemo.config import ConfigError

def run_metaapo(config):
    raise ConfigError("x: fix y")

loop.run_metaapo = run_metaapo
sys.exit(cli.main(["run", "--recipe", "tiny_cpu", "output_dir=" + sys.argv[1]]))
"""


def _run(args, tmp_path, **env):
    # -W ignore: megatron warns on import that it found no Apex; this test reads our own lines.
    return subprocess.run(args, capture_output=True, text=True, timeout=300, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore",
                               "NEMORUN_HOME": str(tmp_path / "nemo_run"), **env})


@pytest.mark.parametrize("rank, said", [("0", "error: x: fix y\n"), ("1", "")], ids=["rank0", "rank1"])
def test_a_config_error_from_the_loop_is_one_line_on_rank0_and_status_2_on_every_rank(tmp_path, rank, said):
    proc = _run([sys.executable, "-c", FAILING_LOOP, str(tmp_path / "out")], tmp_path, RANK=rank)
    assert proc.returncode == 2 and proc.stderr == said, proc.stderr


def test_a_broken_data_file_found_at_set_up_is_one_line_without_a_traceback(tmp_path):
    broken = tmp_path / "train.jsonl"
    broken.write_text('{"prompt": "x", "chosen": \n')
    proc = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={tmp_path / 'out'}",
                 f"task.cache_dir={tmp_path / 'cache'}", *SHRUNK_TINY_CPU, f"data.train={broken}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.startswith(f"error: {broken}, line 1: not valid JSON") and proc.stderr.count("\n") == 1, \
        proc.stderr[-3000:]


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_nemo_without_an_executor_ends_a_config_error_in_our_line_and_status_2(tmp_path):
    proc = _run([str(NEMO), "llm", "metaapo", "--recipe", "tiny_cpu", "--yes", "trainer.checkpoint_signal=SIGHUP",
                 f"output_dir={tmp_path / 'out'}"], tmp_path)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stderr.startswith("error: invalid configuration") and "trainer.checkpoint_signal='SIGHUP'" in proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout and "Unexpected error" not in proc.stderr


def test_a_prompt_over_the_length_limit_is_one_line_naming_the_record_before_the_models_load(tmp_path):
    import json

    data = tmp_path / "train.jsonl"
    records = [{"prompt": "rev:" + "ab" * 50 + "=", "chosen": "ba", "rejected": "ab"},
               {"prompt": "rev:ab=", "chosen": "ba", "rejected": "ab"}]
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    proc = _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={tmp_path / 'out'}",
                 f"task.cache_dir={tmp_path / 'cache'}", *SHRUNK_TINY_CPU, f"data.train={data}"], tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith(f"error: {data}, line 1: the prompt has "), proc.stderr
    assert "more than policy.max_prompt_length=64; raise that limit, set data.truncate_long_prompts=true" in proc.stderr


def test_a_local_reward_server_on_a_job_of_two_nodes_is_refused_in_one_line(tmp_path):
    from tests.helpers import free_port

    port, out = free_port(), tmp_path / "out"
    # Two torchrun agents of one rank each, as on two nodes: ranks on node 1 could not reach rank 0's loopback.
    nodes = [subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(i),
                               "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                               "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
                               f"task.cache_dir={tmp_path / 'cache'}", *SHRUNK_TINY_CPU],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}) for i in (0, 1)]
    results = [node.communicate(timeout=600) for node in nodes]
    assert all(node.returncode != 0 for node in nodes)
    errors = [line for _, err in results for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: this job spans 2 nodes and reward.url is not set: a local reward server would answer "
                      "rank 0's node only. Give reward.url=URL of a reward server every node reaches, or start a "
                      "reward group with run.reward_nodes=K (run.executor=slurm)"], results


def test_the_reward_token_travels_by_environment_and_a_wrong_one_ends_in_one_line_with_status_3(tmp_path):
    from tests.reward.fixtures import ServerProcess

    server = ServerProcess(tmp_path / "server.log", "--reward-fn", "metaapo_nemo.data.toy_task:reward",
                           env={"METAAPO_REWARD_TOKEN": "s3cret"}).wait_healthy(60)
    try:
        def run(token, out):
            return _run([sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
                         f"task.cache_dir={tmp_path / 'cache'}", *SHRUNK_TINY_CPU, "algo.iterations=1",
                         f"reward.url={server.url}", "reward.startup_timeout_s=60"], tmp_path,
                        METAAPO_REWARD_TOKEN=token)

        good = run("s3cret", tmp_path / "good")
        assert good.returncode == 0, good.stderr[-3000:]
        bad = run("wrong", tmp_path / "bad")
        assert bad.returncode == 3, bad.stderr[-3000:]
        errors = [line for line in bad.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and "HTTP 401" in errors[0] and "reward.token" in errors[0], bad.stderr[-3000:]
        assert errors[0].endswith("run the same command: it resumes from the start, and rewards already paid for "
                                  "are not asked for again")
        assert "Traceback" not in bad.stderr
    finally:
        server.kill()


def test_a_second_run_on_the_output_dir_of_a_live_one_is_refused_in_one_line(tmp_path):
    out, cache = tmp_path / "out", tmp_path / "cache"
    command = [sys.executable, "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}",
               f"task.cache_dir={cache}", *SHRUNK_TINY_CPU]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([*command, "trainer.epochs_per_iteration=1000"], cwd=ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while not (out / "metrics.jsonl").exists():  # the first run holds the lock by then
            assert first.poll() is None and time.monotonic() < deadline
            time.sleep(0.2)
        second = _run(command, tmp_path)
        assert second.returncode == 2, second.stderr[-3000:]
        assert second.stderr == (f"error: output_dir={out} is in use by another run (pid {first.pid} on "
                                 f"{socket.gethostname()}): wait for it to end, stop it, or give another output_dir\n")
    finally:
        os.killpg(first.pid, signal.SIGKILL)
        first.wait()
