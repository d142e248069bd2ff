"""The reward server and client when things go wrong: servers killed and restarted, clients that
give up, slow or misbehaving servers, overload, shutdown with a hung reward function, and unsafe
start-up options. Servers are real processes; the odd servers a client must survive are tiny HTTP
servers in this process."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from metaapo_nemo.reward.client import RewardClient, RewardServerError
from metaapo_nemo.reward.server import parse_metrics

from .fixtures import REPO_ROOT, ServerProcess

MISBEHAVE = ("--reward-fn", "tests.reward.fixtures:misbehave_on_command")


def metrics(server: ServerProcess) -> dict[str, float]:
    return parse_metrics(httpx.get(f"{server.url}/metrics", timeout=5).text)


def post(server: ServerProcess, queries: list[str], **kwargs) -> httpx.Response:
    return httpx.post(f"{server.url}/get_reward", json={"query": queries}, timeout=kwargs.pop("timeout", 10), **kwargs)


def wait_for(condition, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.01)


@pytest.fixture
def start(tmp_path):
    """Start server processes (``start(*args, port=..., env=...)``); all are killed at the end."""
    started = []

    def start_server(*args: str, port: int | None = None, env: dict | None = None) -> ServerProcess:
        server = ServerProcess(tmp_path / f"server{len(started)}.log", *args, port=port, env=env)
        started.append(server)
        return server.wait_healthy()

    yield start_server
    for server in started:
        if server.process.poll() is None:
            server.kill()


def test_a_server_killed_and_restarted_mid_call_is_waited_for_and_every_reward_comes_once(start, tmp_path):
    ledger = tmp_path / "ledger"
    env = {"REWARD_LEDGER": str(ledger)}
    spec = ("--reward-fn", "tests.reward.fixtures:count_letter_a_with_ledger")
    first = start(*spec, env=env)

    def calls() -> list[list[str]]:
        return [line.split() for line in ledger.read_text().splitlines()] if ledger.exists() else []

    def kill_during_the_third_batch_and_restart() -> None:
        wait_for(lambda: len(calls()) >= 3)  # the third batch is in the reward function (for 0.2 s)
        first.kill()
        time.sleep(1.5)
        restarted.append(start(*spec, port=first.port, env=env))

    restarted = []
    chaos = threading.Thread(target=kill_during_the_third_batch_and_restart)
    chaos.start()
    responses = ["a" * n for n in range(10)]
    with RewardClient(first.url, batch_size=1, timeout_s=5, backoff_s=0.1, call_timeout_s=30) as client:
        rewards = client.score(["p"] * 10, responses)
    chaos.join()
    assert rewards == [float(n) for n in range(10)]
    second = restarted[0]
    first_texts = sum(int(n) for pid, n in calls() if int(pid) == first.process.pid)
    second_texts = metrics(second)["metaapo_reward_texts_scored_total"]
    # The second server's counter is exact: it counts what its reward function was given.
    assert second_texts == sum(int(n) for pid, n in calls() if int(pid) == second.process.pid)
    # The first server answered the batches the second did not score (one text each), and was
    # given at most one more: the batch in flight when it died (normally the third; none if the
    # kill landed between batches), which the client sent again. So nothing was computed twice
    # except that batch, and every reward reached the client once, in order.
    answered_by_first = len(responses) - second_texts
    assert answered_by_first >= 2 and first_texts >= 3
    assert first_texts + second_texts - len(responses) in (0, 1)


def test_six_clients_of_a_one_second_reward_all_succeed_and_each_text_is_computed_once(start):
    server = start("--reward-fn", "tests.reward.fixtures:sleep_one_second")
    results, errors = [], []

    def one_client(n: int) -> None:
        try:
            with RewardClient(server.url, timeout_s=2.5, max_retries=0) as client:
                results.append(client.score(["p"] * 4, ["a" * n] * 4))
        except RewardServerError as err:
            errors.append(err)

    clients = [threading.Thread(target=one_client, args=(n,)) for n in range(6)]
    for client in clients:
        client.start()
    for client in clients:
        client.join()
    assert errors == []
    assert sorted(results) == [[float(n)] * 4 for n in range(6)]
    counts = metrics(server)
    assert counts["metaapo_reward_texts_scored_total"] == 24
    assert counts['metaapo_reward_requests_total{outcome="ok"}'] == 6
    assert counts["metaapo_reward_batches_total"] <= 3  # six one-second calls would exceed every timeout


def test_a_request_whose_client_gave_up_before_it_was_scored_is_dropped(start):
    server = start(*MISBEHAVE)
    busy = threading.Thread(target=post, args=(server, ["sleep:1.5"]))
    busy.start()
    wait_for(lambda: metrics(server)["metaapo_reward_batches_total"] == 1)
    with pytest.raises(httpx.ReadTimeout):
        post(server, ["a"] * 5, timeout=0.3)
    busy.join()
    wait_for(lambda: metrics(server)['metaapo_reward_requests_total{outcome="dropped"}'] == 1)
    counts = metrics(server)
    assert counts["metaapo_reward_texts_scored_total"] == 1
    assert counts["metaapo_reward_batches_total"] == 1
    assert counts["metaapo_reward_queued_texts"] == 0


def test_metrics_count_outcomes_texts_batches_and_latency(start):
    server = start(*MISBEHAVE)
    assert post(server, ["a", "aa", "b"]).status_code == 200
    assert httpx.post(f"{server.url}/get_reward", content=b"{", timeout=5).status_code == 400
    assert post(server, ["raise"]).status_code == 500
    answer = httpx.get(f"{server.url}/metrics", timeout=5)
    assert answer.headers["content-type"].startswith("text/plain")
    assert "# TYPE metaapo_reward_requests_total counter" in answer.text
    counts = parse_metrics(answer.text)
    assert {name: counts[name] for name in counts if "requests_total" in name} == {
        'metaapo_reward_requests_total{outcome="ok"}': 1,
        'metaapo_reward_requests_total{outcome="client_error"}': 1,
        'metaapo_reward_requests_total{outcome="server_error"}': 1,
        'metaapo_reward_requests_total{outcome="overloaded"}': 0,
        'metaapo_reward_requests_total{outcome="dropped"}': 0,
    }
    assert counts["metaapo_reward_texts_scored_total"] == 4
    assert counts["metaapo_reward_batches_total"] == 2
    assert (counts["metaapo_reward_batch_texts_sum"], counts["metaapo_reward_batch_texts_count"]) == (4, 2)
    assert counts['metaapo_reward_batch_texts_bucket{le="1"}'] == 1
    assert counts['metaapo_reward_batch_texts_bucket{le="4"}'] == 2
    assert counts["metaapo_reward_request_seconds_count"] == 3
    assert counts['metaapo_reward_request_seconds_bucket{le="+Inf"}'] == 3
    assert 0 < counts["metaapo_reward_request_seconds_sum"] < 5
    assert counts["metaapo_reward_queued_requests"] == counts["metaapo_reward_queued_texts"] == 0


def test_health_is_degraded_with_the_reason_after_a_failed_reward_call_and_ok_after_a_success(start):
    server = start(*MISBEHAVE)
    instance = httpx.get(f"{server.url}/health", timeout=5).json()["instance"]
    post(server, ["raise"])
    answer = httpx.get(f"{server.url}/health", timeout=5)
    assert answer.status_code == 200  # still serving: a trainer waiting for health starts, and may succeed
    assert answer.json()["status"] == "degraded" and answer.json()["instance"] == instance
    assert "told to raise" in answer.json()["reason"]
    post(server, ["a"])
    assert httpx.get(f"{server.url}/health", timeout=5).json()["status"] == "ok"


def test_a_failing_request_batched_with_good_ones_fails_alone(start):
    server = start(*MISBEHAVE, "--max-wait-ms", "300")
    answers = {}
    senders = [
        threading.Thread(target=lambda q=q: answers.__setitem__(q, post(server, [q]))) for q in ("aa", "raise", "a")
    ]
    for sender in senders:
        sender.start()
    for sender in senders:
        sender.join()
    assert answers["aa"].json()["rewards"] == [2.0] and answers["a"].json()["rewards"] == [1.0]
    assert answers["raise"].status_code == 500
    # One call for the three, then one for each alone: 3 + 3 texts given to the reward function.
    assert metrics(server)["metaapo_reward_texts_scored_total"] == 6


def test_beyond_the_queue_limit_a_request_gets_503_with_retry_after(start):
    server = start(*MISBEHAVE, "--max-queued-texts", "3")
    busy = threading.Thread(target=post, args=(server, ["sleep:1"]))
    busy.start()
    wait_for(lambda: metrics(server)["metaapo_reward_batches_total"] == 1)
    queued = threading.Thread(target=post, args=(server, ["a", "a", "a"]))
    queued.start()
    wait_for(lambda: metrics(server)["metaapo_reward_queued_texts"] == 3)
    answer = post(server, ["a"])
    busy.join()
    queued.join()
    assert answer.status_code == 503 and answer.headers["retry-after"] == "1"
    assert "overloaded" in answer.json()["error"]
    assert metrics(server)['metaapo_reward_requests_total{outcome="overloaded"}'] == 1


@pytest.mark.parametrize(
    ("command", "message"),
    [
        ("str", "returned str '1.5' at index 0, not a number"),
        ("bool", "returned bool True at index 0, not a number"),
        ("string", "returned str; it must return a list of floats"),
        ("nan", "non-finite reward (nan) at index 0"),
        ("none", "returned NoneType None at index 0"),
    ],
)
def test_a_reward_function_answering_other_than_numbers_gets_500_and_the_server_keeps_serving(
    start, command, message
):
    server = start("--reward-fn", "tests.reward.fixtures:wrong_types_on_command")
    answer = post(server, [command])
    assert answer.status_code == 500 and message in answer.json()["error"]
    assert post(server, ["aa"]).json()["rewards"] == [2.0]


def test_sigterm_lets_the_work_in_flight_finish_then_exits(start):
    server = start(*MISBEHAVE)
    answers = []
    slow = threading.Thread(target=lambda: answers.append(post(server, ["sleep:1"])))
    slow.start()
    wait_for(lambda: metrics(server)["metaapo_reward_batches_total"] == 1)
    server.process.send_signal(signal.SIGTERM)
    slow.join()
    assert answers[0].json()["rewards"] == [0.0]
    server.process.wait(timeout=10)


def test_sigterm_ends_a_server_with_a_hung_reward_function_within_the_shutdown_timeout(start):
    server = start("--reward-fn", "tests.reward.fixtures:hang", "--shutdown-timeout-s", "1")
    threading.Thread(target=lambda: post(server, ["a"], timeout=30), daemon=True).start()
    wait_for(lambda: metrics(server)["metaapo_reward_batches_total"] == 1)
    started = time.monotonic()
    server.process.send_signal(signal.SIGTERM)
    server.process.wait(timeout=10)
    assert time.monotonic() - started < 1 + 2.0
    assert "did not finish within --shutdown-timeout-s=1 s" in server.log()


def test_a_second_signal_ends_the_server_at_once(start):
    server = start("--reward-fn", "tests.reward.fixtures:hang", "--shutdown-timeout-s", "60")
    threading.Thread(target=lambda: post(server, ["a"], timeout=30), daemon=True).start()
    wait_for(lambda: metrics(server)["metaapo_reward_batches_total"] == 1)
    server.process.send_signal(signal.SIGTERM)
    time.sleep(0.3)
    started = time.monotonic()
    server.process.send_signal(signal.SIGINT)
    server.process.wait(timeout=10)
    assert time.monotonic() - started < 2.0


def run_server_command(*args: str) -> subprocess.CompletedProcess:
    env = {name: value for name, value in os.environ.items() if name != "METAAPO_REWARD_TOKEN"}
    return subprocess.run(
        [sys.executable, "-m", "metaapo_nemo.reward.server", *args],
        cwd=REPO_ROOT, env={**env, "PYTHONPATH": str(REPO_ROOT)}, capture_output=True, text=True, timeout=60,
    )  # fmt: skip


def test_binding_beyond_loopback_without_a_token_is_refused_in_one_line():
    done = run_server_command("--host", "0.0.0.0", "--port", "0", "--reward-fn", "tests.reward.fixtures:count_letter_a")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "METAAPO_REWARD_TOKEN" in lines[0] and "--allow-no-token" in lines[0]


def test_allow_no_token_binds_beyond_loopback_with_a_warning(start):
    server = start("--host", "0.0.0.0", "--allow-no-token", "--reward-fn", "tests.reward.fixtures:count_letter_a")
    assert post(server, ["aa"]).json()["rewards"] == [2.0]
    assert "WARNING serving 0.0.0.0 without a token" in server.log()


def test_port_zero_binds_a_free_port_and_writes_it_with_the_instance_id(tmp_path):
    port_file = tmp_path / "port.json"
    log = tmp_path / "server.log"
    command = [sys.executable, "-m", "metaapo_nemo.reward.server", "--port", "0", "--port-file", str(port_file),
               "--reward-fn", "tests.reward.fixtures:count_letter_a"]  # fmt: skip
    with open(log, "wb") as out:
        process = subprocess.Popen(command, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)},
                                   stdout=out, stderr=subprocess.STDOUT)  # fmt: skip
    try:
        wait_for(port_file.exists, timeout_s=30)
        written = json.loads(port_file.read_text())
        health = httpx.get(f"http://127.0.0.1:{written['port']}/health", timeout=5).json()
        assert health["instance"] == written["instance"] and written["port"] > 0
    finally:
        process.kill()
        process.wait()


class ScriptedHandler(BaseHTTPRequestHandler):
    """Answers POSTs with ``server.script``'s replies in turn: (status, headers, body bytes)."""

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self.server.arrivals.append(time.monotonic())
        status, headers, body = self.server.script[min(len(self.server.arrivals), len(self.server.script)) - 1]
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(body))}.items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def scripted_server():
    """A local HTTP server answering with ``script`` (set by the test); its URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), ScriptedHandler)
    server.arrivals = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("status", [503, 429])
def test_retry_after_is_waited_for_before_the_next_try(scripted_server, status):
    scripted_server.script = [
        (status, {"Retry-After": "1"}, b'{"error": "busy"}'),
        (200, {"Content-Type": "application/json"}, b'{"rewards": [2.0], "scores": [2.0]}'),
    ]
    url = f"http://127.0.0.1:{scripted_server.server_port}"
    with RewardClient(url, backoff_s=0.0, max_retries=1) as client:
        assert client.score(["p"], ["aa"]) == [2.0]
    first, second = scripted_server.arrivals
    assert 0.9 <= second - first < 3.0


def test_a_retry_after_beyond_the_call_timeout_ends_the_call_at_once(scripted_server):
    scripted_server.script = [(503, {"Retry-After": "30"}, b'{"error": "busy"}')]
    url = f"http://127.0.0.1:{scripted_server.server_port}"
    started = time.monotonic()
    with RewardClient(url, call_timeout_s=5, backoff_s=0.0) as client:
        with pytest.raises(RewardServerError, match=r"HTTP 503: busy \(1 tries in .* s of reward.call_timeout_s\)"):
            client.score(["p"], ["aa"])
    assert time.monotonic() - started < 2.0


def test_a_dead_server_is_retried_until_the_call_timeout_is_spent():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: connections are refused
        started = time.monotonic()
        with RewardClient(url, max_retries=0, backoff_s=0.05, call_timeout_s=1.5) as client:
            with pytest.raises(RewardServerError, match="could not be reached") as raised:
                client.score(["p"], ["a"])
    assert 1.0 < time.monotonic() - started < 3.0
    tries = int(re.search(r"\((\d+) tries in", str(raised.value)).group(1))
    assert tries > 3  # max_retries=0 does not cap tries when call_timeout_s is set


def trickling_server(headers_first: bool) -> tuple[socket.socket, threading.Event]:
    """A server that sends its answer one byte per 0.5 s (after sending all headers at once when
    ``headers_first``)."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()
    answer = b'{"rewards": [1.0], "scores": [1.0]}'
    head = f"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {len(answer)}\r\n\r\n".encode()

    def serve() -> None:
        connection, _ = listener.accept()
        with connection:
            connection.recv(65536)
            if headers_first:
                connection.sendall(head)
            for byte in (answer if headers_first else head + answer):
                if stop.wait(0.5):
                    return
                try:
                    connection.sendall(bytes([byte]))
                except OSError:
                    return

    threading.Thread(target=serve, daemon=True).start()
    return listener, stop


@pytest.mark.parametrize("headers_first", [False, True], ids=["trickled-headers", "trickled-body"])
def test_a_server_trickling_bytes_cannot_hold_a_try_past_its_timeout(headers_first):
    listener, stop = trickling_server(headers_first)
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        started = time.monotonic()
        with RewardClient(url, timeout_s=1, max_retries=0) as client:
            with pytest.raises(RewardServerError, match=r"did not answer within 1 s \(1 tries\)"):
                client.score(["p"], ["a"])
        assert time.monotonic() - started < 3.0
    finally:
        stop.set()
        listener.close()



def test_health_answers_while_a_16_mb_body_is_decoded_and_scored(start):
    server = start("--reward-fn", "tests.reward.fixtures:count_letter_a", "--max-queued-texts", "1000000")
    body = json.dumps({"query": ["abcdefghijklmn"] * 900_000}).encode()  # 15.3 MB of short texts
    answers = []
    big = threading.Thread(target=lambda: answers.append(post_bytes(server, body)))
    big.start()
    latencies = []
    while big.is_alive():
        started = time.monotonic()
        assert httpx.get(f"{server.url}/health", timeout=30).status_code == 200
        latencies.append(time.monotonic() - started)
        time.sleep(0.02)
    assert answers[0].json()["rewards"] == [1.0] * 900_000
    # json.loads holds the GIL while it builds the lists (about 0.3 s here); nothing else may stall
    # the event loop, which used to be held for the whole decoding and rendering.
    assert max(latencies) < 2.0 and len(latencies) >= 3


def post_bytes(server: ServerProcess, body: bytes) -> httpx.Response:
    return httpx.post(f"{server.url}/get_reward", content=body, timeout=60)
