"""A stopped run stops: SIGINT or SIGTERM raises RunStopped in a rank's main thread and a second one
exits at once, the checkpoint signal only raises a flag; Ctrl-C to `nemo llm metaapo` on the local
torchrun executor, SIGTERM to a bare torchrun and Ctrl-C to a single `metaapo run` each end every
rank and the local reward server within seconds."""
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from metaapo_nemo import stopping
from tests.helpers import SHRUNK_TINY_CPU

ROOT = Path(__file__).resolve().parents[2]
NEMO = Path(sys.executable).with_name("nemo")
STOP_BOUND_S = 30  # generous: the job's own grace is 10 s, and this machine's cores are shared
MARKER_ENV = "METAAPO_STOP_TEST"  # inherited by every process of a run: how the test finds them all

# A rank in miniature: installs the signal policy, then waits for a signal the test sends.
CHILD = """
import sys, time
from metaapo_nemo import stopping

stopping.install(None if sys.argv[1] == "None" else sys.argv[1])
try:
    print("ready", flush=True)
    while not stopping.checkpoint_requested():
        time.sleep(0.01)
    stopping.clear()
    print(f"checkpoint requested; after clear: {stopping.checkpoint_requested()}", flush=True)
    raise SystemExit(stopping.EXIT_REQUEUE)
except stopping.RunStopped as e:
    print(f"RunStopped {e.signum}", flush=True)
    if "--slow-cleanup" in sys.argv:
        print("cleaning up", flush=True)
        time.sleep(60)
    raise SystemExit(stopping.exit_status(e))
"""


def _child(checkpoint_signal, *extra):
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(checkpoint_signal), *extra], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.stdout.readline() == "ready\n", proc.communicate()
    return proc


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_signal_raises_run_stopped_and_the_rank_exits_128_plus_signum(sig):
    proc = _child(None)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert out == f"RunStopped {sig}\n" and proc.returncode == 128 + sig, err


def test_a_second_stop_signal_during_cleanup_exits_at_once():
    proc = _child(None, "--slow-cleanup")
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == f"RunStopped {signal.SIGINT}\n"
    assert proc.stdout.readline() == "cleaning up\n"
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - started < 30


@pytest.mark.parametrize("name", ["SIGUSR1", "SIGUSR2", "SIGTERM"])
def test_the_checkpoint_signal_only_raises_the_flag_and_says_so_in_one_line(name):
    proc = _child(name)
    proc.send_signal(signal.Signals[name])
    out, err = proc.communicate(timeout=30)
    assert out == "checkpoint requested; after clear: False\n" and proc.returncode == stopping.EXIT_REQUEUE
    assert len(err.splitlines()) == 1 and name in err and "75" in err


def test_with_sigterm_as_the_checkpoint_signal_sigint_still_stops():
    proc = _child("SIGTERM")
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=30)
    assert out == f"RunStopped {signal.SIGINT}\n" and proc.returncode == 130


# A stop signal whose handler runs inside a finaliser: Python drops the RunStopped raised there with
# an "Exception ignored" line, and the loop must still stop at its next step.
LOST_IN_A_FINALISER = """
import os, signal, sys, time
from metaapo_nemo import stopping

class Finalised:
    def __del__(self):
        os.kill(os.getpid(), signal.SIGINT)  # the handler runs here, before __del__ returns
        sum(range(1000))

stopping.install(None)
try:
    del_me = Finalised()
    del del_me
    print("the exception was lost", flush=True)
    for step in range(500):
        stopping.raise_if_stopped()
        time.sleep(0.01)
    print("not stopped", flush=True)
except stopping.RunStopped as e:
    print(f"RunStopped {e.signum}", flush=True)
    raise SystemExit(stopping.exit_status(e))
"""


def test_a_stop_whose_exception_a_finaliser_swallowed_still_stops_the_loop_at_its_next_step():
    proc = subprocess.run([sys.executable, "-c", LOST_IN_A_FINALISER], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert "Exception ignored" in proc.stderr and "RunStopped" in proc.stderr  # lost, as Python does
    assert proc.stdout == f"the exception was lost\nRunStopped {signal.SIGINT}\n" and proc.returncode == 130


# The same lost stop in a rank that never reaches another step (it waits, as for a peer that left).
LOST_AND_WAITING = LOST_IN_A_FINALISER.replace(
    "stopping.install(None)", "stopping.install(None); stopping.STOP_GRACE_S = 2.0").replace(
    "for step in range(500):", "import threading; threading.Event().wait(60)\n    for step in range(500):")


def test_a_rank_that_lost_its_stop_and_waits_forever_still_exits_128_plus_signum_after_the_grace():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", LOST_AND_WAITING], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert proc.stdout == "the exception was lost\n" and proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert time.monotonic() - started < 30  # the 2 s grace, and a Python start on a busy machine


def test_an_orderly_stop_exits_without_waiting_for_the_grace():
    proc = _child(None)
    started = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=30)
    assert proc.returncode == 128 + signal.SIGTERM and time.monotonic() - started < stopping.STOP_GRACE_S / 2


# A stop signal that arrives while megatron's checkpoint save forks its writer: the handler runs in
# Python's at-fork callbacks (stood in for by one that signals this process), where RunStopped is lost.
LOST_IN_A_CHECKPOINT_FORK = """
import os, signal, sys, tempfile
from metaapo_nemo import stopping
from metaapo_nemo.distributed import init_distributed
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

init_distributed()
policy = MegatronPolicy(ModelConfig(vocab_size=64, hidden_size=32, num_layers=1, num_attention_heads=2,
                                    num_query_groups=2, ffn_hidden_size=64, max_position_embeddings=64),
                        None, pad_id=0, optim=OptimConfig(lr=1e-3))
stopping.install(None)
sent = []  # one signal, at the first fork
os.register_at_fork(after_in_parent=lambda: sent or (sent.append(1), os.kill(os.getpid(), signal.SIGTERM)))
try:
    policy.save_checkpoint(tempfile.mkdtemp())
    print("saved", flush=True)
except stopping.RunStopped as e:
    print(f"RunStopped {e.signum} after the save", flush=True)
"""


def test_a_stop_lost_in_the_checkpoint_saves_fork_is_raised_when_the_save_returns():
    proc = subprocess.run([sys.executable, "-c", LOST_IN_A_CHECKPOINT_FORK], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}, timeout=120)
    assert "Exception ignored" in proc.stderr and "RunStopped" in proc.stderr, proc.stderr[-3000:]  # lost, as Python does
    assert proc.stdout == f"RunStopped {signal.SIGTERM} after the save\n", proc.stdout + proc.stderr[-3000:]


def test_install_refuses_an_unknown_checkpoint_signal():
    with pytest.raises(ValueError, match="SIGHUP"):
        stopping.install("SIGHUP")


def test_install_off_the_main_thread_leaves_the_handlers_alone():
    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    thread = threading.Thread(target=stopping.install, args=("SIGUSR1",))
    thread.start()
    thread.join()
    assert {s: signal.getsignal(s) for s in before} == before


def test_exit_status_is_128_plus_signum_for_a_stop_and_1_otherwise():
    assert stopping.exit_status(stopping.RunStopped(signal.SIGTERM)) == 143
    assert str(stopping.RunStopped(signal.SIGINT)) == "stopped by SIGINT"
    assert stopping.exit_status(ValueError("x")) == 1


# ---------------------------------------------------------------- whole runs on two local ranks
@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


def _run_processes(marker: str) -> dict[int, str]:
    """pid -> command line of each live process whose environment carries `marker` (zombies excluded)."""
    found = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                continue
            if f"{MARKER_ENV}={marker}".encode() in (entry / "environ").read_bytes().split(b"\0"):
                found[int(entry.name)] = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except (OSError, IndexError):
            pass
    return found


def _wait_for_gone(marker: str, deadline: float) -> list[str]:
    while (left := _run_processes(marker)) and time.monotonic() < deadline:
        time.sleep(0.2)
    return list(left.values())


class _Run:
    """A run started in a session of its own, its output in a file, every process of it marked."""

    def __init__(self, tmp_path: Path, command: list[str]):
        self.marker, self.log = str(tmp_path), tmp_path / "run.log"
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "160",
               "NEMORUN_HOME": str(tmp_path / "nemo_run"), MARKER_ENV: self.marker}
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=env, start_new_session=True)

    def wait_for_training(self, timeout_s: float = 600) -> None:
        deadline = time.monotonic() + timeout_s
        while "iteration 1/2" not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.output()[-3000:]
            time.sleep(0.5)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        for pid in _run_processes(self.marker):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


@pytest.fixture
def started(tmp_path):
    runs = []

    def start(command: list[str]) -> _Run:
        runs.append(_Run(tmp_path, command))
        return runs[-1]

    yield start
    for r in runs:  # a failed test leaves nothing behind for the next one
        r.kill()


def _tiny_cpu(tmp_path: Path, cache: Path) -> list[str]:
    # Many epochs: the run is still training when the signal arrives, however slow the machine.
    return ["--recipe", "tiny_cpu", f"output_dir={tmp_path / 'out'}", f"task.cache_dir={cache}", *SHRUNK_TINY_CPU,
            "trainer.epochs_per_iteration=1000"]


def _assert_stops(run: _Run, send) -> str:
    run.wait_for_training()
    send()
    deadline = time.monotonic() + STOP_BOUND_S
    try:
        run.proc.wait(timeout=STOP_BOUND_S)
    except subprocess.TimeoutExpired:
        pytest.fail("the launcher did not exit:\n" + run.output()[-3000:])
    left = _wait_for_gone(run.marker, deadline)
    assert not left, f"still running {STOP_BOUND_S} s after the signal: {left}"
    assert run.proc.returncode != 0
    return run.output()


@pytest.mark.skipif(not NEMO.exists(), reason="the nemo console script is installed with the package")
def test_ctrl_c_to_nemo_on_local_torchrun_stops_every_rank_and_the_reward_server(tmp_path, cache, started):
    run = started([str(NEMO), "llm", "metaapo", "--yes", "run.executor=local_torchrun",
                   "run.executor.ntasks_per_node=2", *_tiny_cpu(tmp_path, cache)])
    output = _assert_stops(run, lambda: os.killpg(run.proc.pid, signal.SIGINT))  # as a terminal's Ctrl-C
    assert run.proc.returncode == 128 + signal.SIGINT
    assert "stopped by SIGINT: sent SIGTERM to the job (1 torchrun agent(s), 2 rank(s))" in output
    assert "stopped by SIGTERM" in output  # rank 0's own line
    assert "inspect this experiment" not in output


def test_sigterm_to_torchrun_stops_every_rank_and_the_reward_server(tmp_path, cache, started):
    run = started([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                   "-m", "metaapo_nemo", "run", *_tiny_cpu(tmp_path, cache)])
    output = _assert_stops(run, lambda: run.proc.send_signal(signal.SIGTERM))
    assert output.count("stopped by SIGTERM") == 1  # rank 0 says it; rank 1 stops as quietly


def test_ctrl_c_to_a_single_metaapo_run_stops_it_and_its_reward_server(tmp_path, cache, started):
    run = started([sys.executable, "-m", "metaapo_nemo", "run", *_tiny_cpu(tmp_path, cache)])
    output = _assert_stops(run, lambda: os.killpg(run.proc.pid, signal.SIGINT))
    assert run.proc.returncode == 128 + signal.SIGINT
    assert output.rstrip().endswith("stopped by SIGINT")


def _rank_pids(marker: str) -> dict[int, int]:
    """RANK -> pid of each rank of the marked run (torchrun's workers carry RANK in their environment)."""
    ranks = {}
    for pid in _run_processes(marker):
        try:
            env = dict(e.split(b"=", 1) for e in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in e)
        except OSError:
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env and b"metaapo_nemo" in Path(f"/proc/{pid}/cmdline").read_bytes():
            ranks[int(env[b"RANK"])] = pid
    return ranks


def test_the_checkpoint_signal_to_one_rank_checkpoints_every_rank_at_a_step_and_the_same_command_resumes(
        tmp_path, cache, started):
    import json
    import re

    out = tmp_path / "out"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "metaapo_nemo", "run", "--recipe", "tiny_cpu", f"output_dir={out}", f"task.cache_dir={cache}",
               *SHRUNK_TINY_CPU, "algo.iterations=1",
               "trainer.epochs_per_iteration=25", "trainer.checkpoint_signal=SIGUSR1"]
    run = started(command)
    deadline = time.monotonic() + 600
    metrics = out / "metrics.jsonl"
    while not (metrics.exists() and '"event": "train_step"' in metrics.read_text()):
        assert run.proc.poll() is None and time.monotonic() < deadline, run.output()[-3000:]
        time.sleep(0.2)
    os.kill(_rank_pids(run.marker)[1], signal.SIGUSR1)  # Slurm signals every rank; one is enough
    run.proc.wait(timeout=120)
    output = run.output()
    assert run.proc.returncode != 0
    assert "rank 1: SIGUSR1 arrived" in output
    assert re.search(rf"exitcode\s*:\s*{stopping.EXIT_REQUEUE}\b", output), output[-3000:]  # torchrun's report
    latest = (out / "checkpoints" / "latest").read_text()
    assert re.fullmatch(r"iter_1_step_\d+", latest), latest
    stopped_at = int(latest.rsplit("_", 1)[1])
    assert (out / "requeue").read_text() == latest + "\n"  # what a Slurm job script requeues itself on
    assert not _wait_for_gone(run.marker, time.monotonic() + STOP_BOUND_S)

    again = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "COLUMNS": "1000"})
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {out / 'checkpoints' / latest}" in again.stdout
    summary = json.loads((out / "summary.json").read_text())
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()
             if json.loads(line)["event"] == "train_step"]
    assert summary["finished"] and steps == list(range(1, summary["optimizer_steps"] + 1))
    assert 0 < stopped_at < summary["optimizer_steps"]
    assert not (out / "requeue").exists()
