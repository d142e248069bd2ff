"""A reward server started by the training job itself, on this machine, when no reward.url is given.

It runs as a separate process in its own process group (the trainer's Ctrl-C reaches the trainer,
which stops it) and ends with its parent even if the parent is killed. The server binds a free port
itself (``--port 0``) and writes that port and its random instance id to a file; the parent waits
for that file and then for a ``/health`` answer carrying that instance id, so no other process can
take the port in between or answer for the server.
"""

import atexit
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

import metaapo_nemo
from metaapo_nemo.reward.client import RewardServerError
from metaapo_nemo.config import REWARD_TOKEN_ENV as TOKEN_ENV

LOG_TAIL_CHARS = 4000


class LocalRewardServer:
    """A running ``metaapo_nemo.reward.server`` process; ``url`` is where it answers."""

    def __init__(self, process: subprocess.Popen, log_file: str, port_file: str):
        self.process = process
        self.url: str | None = None  # known once the server has written its port file
        self.instance: str | None = None
        self.log_file = log_file
        self.port_file = port_file
        atexit.register(self.stop)

    def stop(self, grace_s: float = 10.0) -> None:
        """Terminate the server's process group; kill it if it has not ended after ``grace_s``."""
        atexit.unregister(self.stop)
        shutil.rmtree(os.path.dirname(self.port_file), ignore_errors=True)
        if self.process.poll() is not None:
            return
        _signal_group(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            _signal_group(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def wait_until_ready(self, timeout_s: float) -> None:
        """Return once the server answers ``/health`` with its own instance id (see start_local_reward_server)."""
        _wait_until_ready(self, timeout_s)

    def log_tail(self) -> str:
        """The end of the server's log, for error messages."""
        try:
            return Path(self.log_file).read_text(errors="replace")[-LOG_TAIL_CHARS:]
        except OSError as err:
            return f"(cannot read {self.log_file}: {err})"

    def __enter__(self) -> "LocalRewardServer":
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop()


def start_local_reward_server(
    reward_fn: str | None = None,
    model_dir: str | None = None,
    token: str | None = None,
    log_file: str | None = None,
    startup_timeout_s: float = 60,
    batch_size: int | None = None,
    wait: bool = True,
) -> LocalRewardServer:
    """Start a reward server on 127.0.0.1 and a free port, serving ``reward_fn`` (MODULE:FUNCTION)
    or the Hugging Face reward model in ``model_dir``; return once it answers ``/health`` at
    ``server.url`` with the instance id it wrote to its port file.

    Raises RewardServerError, quoting the server's log, if it exits or is not healthy within
    ``startup_timeout_s``. Its log goes to ``log_file`` (default: a new file in the temp folder).
    With ``wait=False`` it returns as soon as the process is started, so the caller can do other
    set-up while the server imports its web stack; ``server.wait_until_ready`` then waits.
    """
    if (reward_fn is None) == (model_dir is None):
        raise ValueError("give exactly one of reward_fn (MODULE:FUNCTION) and model_dir")
    port_file = os.path.join(tempfile.mkdtemp(prefix="metaapo-reward-server-"), "port.json")
    command = [
        sys.executable, "-m", "metaapo_nemo.reward.server", "--host", "127.0.0.1", "--port", "0",
        "--port-file", port_file, "--parent-pid", str(os.getpid()),
    ]  # fmt: skip
    command += ["--reward-fn", reward_fn] if reward_fn is not None else ["--model", model_dir]
    if batch_size is not None:
        command += ["--batch-size", str(batch_size)]
    env = dict(os.environ)
    # The child must import this same package even when it is used from a source checkout.
    package_root = str(Path(metaapo_nemo.__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p)
    env.pop(TOKEN_ENV, None)
    if token:
        env[TOKEN_ENV] = token  # not on the command line, where other users could read it
    if log_file is None:
        handle, log_file = tempfile.mkstemp(prefix="metaapo-reward-server-", suffix=".log")
        os.close(handle)
    with open(log_file, "ab") as log:
        process = subprocess.Popen(
            command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    server = LocalRewardServer(process, log_file, port_file)
    if wait:
        server.wait_until_ready(startup_timeout_s)
    return server


def _wait_until_ready(server: LocalRewardServer, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    with httpx.Client(timeout=2.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            if server.process.poll() is not None:
                server.stop()
                raise RewardServerError(
                    f"the local reward server exited with status {server.process.returncode} before it was "
                    f"ready; its log ({server.log_file}) ends with:\n{server.log_tail()}"
                )
            if server.url is None:
                _read_port_file(server)
            elif _answers_as(http, server.url, server.instance):
                return
            time.sleep(0.1)
    server.stop()
    raise RewardServerError(
        f"the local reward server was not healthy within {timeout_s:g} s; raise the startup timeout if "
        f"its model is slow to load. Its log ({server.log_file}) ends with:\n{server.log_tail()}"
    )


def _read_port_file(server: LocalRewardServer) -> None:
    try:
        with open(server.port_file) as f:
            written = json.load(f)
    except FileNotFoundError:  # not listening yet
        return
    server.url, server.instance = f"http://127.0.0.1:{written['port']}", written["instance"]


def _answers_as(http: httpx.Client, url: str, instance: str) -> bool:
    try:
        answer = http.get(f"{url}/health")
        return answer.status_code == 200 and answer.json().get("instance") == instance
    except (httpx.HTTPError, ValueError, AttributeError):
        return False


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        pass
