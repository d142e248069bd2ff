"""The reward server the training job starts for itself when no reward.url is given."""

import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from metaapo_nemo.reward.client import RewardClient, RewardServerError
from metaapo_nemo.reward.local import start_local_reward_server

from .fixtures import REPO_ROOT


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_local_server_scores_with_its_token_and_stops(tmp_path):
    log_file = tmp_path / "reward.log"
    server = start_local_reward_server(
        reward_fn="tests.reward.fixtures:count_letter_a", token="local-token", log_file=str(log_file)
    )
    with server:
        assert server.url.startswith("http://127.0.0.1:")
        # The token reaches the server through its environment, not its command line.
        assert "local-token" not in " ".join(server.process.args)
        with RewardClient(server.url, token="local-token") as client:
            assert client.score(["a? "], ["banana"]) == [3.0]
        with RewardClient(server.url, max_retries=0) as client, pytest.raises(RewardServerError, match="401"):
            client.score(["a? "], ["banana"])
    assert server.process.poll() is not None
    with RewardClient(server.url) as client:
        assert not client.health()
    assert "scored 1 texts" in log_file.read_text()


def test_a_server_that_cannot_start_raises_with_its_log():
    started = time.monotonic()
    with pytest.raises(RewardServerError, match=r"exited with status 2[\s\S]*has no attribute 'missing'"):
        start_local_reward_server(reward_fn="tests.reward.fixtures:missing")
    assert time.monotonic() - started < 30


def test_a_server_started_without_waiting_is_ready_after_wait_until_ready():
    started = time.monotonic()
    server = start_local_reward_server(reward_fn="tests.reward.fixtures:count_letter_a", wait=False)
    with server:
        assert server.process.poll() is None  # started, not waited for
        server.wait_until_ready(60)
        with RewardClient(server.url) as client:
            assert client.score(["a? "], ["banana"]) == [3.0]
    assert server.process.poll() is not None
    assert time.monotonic() - started < 60


def test_a_server_that_cannot_start_raises_when_waited_for():
    server = start_local_reward_server(reward_fn="tests.reward.fixtures:missing", wait=False)
    with pytest.raises(RewardServerError, match=r"exited with status 2[\s\S]*has no attribute 'missing'"):
        server.wait_until_ready(30)
    assert server.process.poll() is not None


def test_exactly_one_reward_source_is_needed():
    with pytest.raises(ValueError, match="exactly one"):
        start_local_reward_server()
    with pytest.raises(ValueError, match="exactly one"):
        start_local_reward_server(reward_fn="m:f", model_dir="dir")


def test_the_server_ends_when_the_job_that_started_it_is_killed():
    job = subprocess.run(
        [
            sys.executable, "-c",
            "from metaapo_nemo.reward.local import start_local_reward_server as start; import os\n"
            "server = start(reward_fn='tests.reward.fixtures:count_letter_a')\n"
            "print(server.process.pid, flush=True)\n"
            "os._exit(0)  # no cleanup, as when the job is killed",
        ],
        cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    server_pid = int(job.stdout)
    deadline = time.monotonic() + 10
    while process_alive(server_pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(server_pid)


class AlwaysHealthy(BaseHTTPRequestHandler):
    """Another service on this machine that answers 200 {"status": "ok"} to every GET."""

    def do_GET(self) -> None:
        body = b'{"status": "ok", "instance": "someone-else"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_readiness_is_checked_against_the_server_it_started_not_whoever_answers_200():
    impostor = ThreadingHTTPServer(("127.0.0.1", 0), AlwaysHealthy)
    threading.Thread(target=impostor.serve_forever, daemon=True).start()
    try:
        with start_local_reward_server(reward_fn="tests.reward.fixtures:count_letter_a") as server:
            assert server.url != f"http://127.0.0.1:{impostor.server_port}"
            health = httpx.get(f"{server.url}/health", timeout=5).json()
            assert health["instance"] == server.instance != "someone-else"
            assert "--port 0 --port-file" in " ".join(server.process.args)
            with RewardClient(server.url) as client:
                assert client.score(["a? "], ["banana"]) == [3.0]
    finally:
        impostor.shutdown()
        impostor.server_close()
