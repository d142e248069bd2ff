"""RewardClient against real server processes, and against scripted answers for the cases a
well-behaved server never produces."""

import json
import logging
import re
import threading
import time

import httpx
import pytest

from metaapo_nemo.reward.client import RewardClient, RewardServerError

from .fixtures import ServerProcess, free_port

TOKEN = "client-test-token"


@pytest.fixture(scope="module")
def servers(tmp_path_factory):
    """Two servers scoring count_letter_a; the first wants a token and takes small bodies only."""
    folder = tmp_path_factory.mktemp("servers")
    spec = ("--reward-fn", "tests.reward.fixtures:misbehave_on_command")
    first = ServerProcess(folder / "first.log", *spec, "--token", TOKEN, "--max-body-bytes", "400")
    second = ServerProcess(folder / "second.log", *spec)
    yield first.wait_healthy(), second.wait_healthy()
    first.kill()
    second.kill()


def scripted_client(answers: list, **settings) -> tuple[RewardClient, list]:
    """A client whose HTTP calls get ``answers`` in turn (a Response, or an exception to raise)."""
    requests = []

    def answer(request: httpx.Request) -> httpx.Response:
        requests.append(request)
        reply = answers[len(requests) - 1]
        if isinstance(reply, Exception):
            raise reply
        return reply

    client = RewardClient("http://reward.test", backoff_s=0.0, **settings)
    client._http = httpx.Client(transport=httpx.MockTransport(answer), headers=client._http.headers)
    return client, requests


def test_rewards_come_back_in_order_across_batches(servers):
    first, _ = servers
    before = first.count_in_log("scored ")
    prompts = ["a? ", "b? ", "a? ", "c? ", "a? "]
    responses = ["banana", "", "a", "xyz", "aa"]
    with RewardClient(first.url, token=TOKEN, batch_size=2) as client:
        assert client.score(prompts, responses) == [3.0, 0.0, 1.0, 0.0, 2.0]
    assert first.count_in_log("scored ") == before + 3


def test_batches_go_round_robin_over_the_servers(servers):
    first, second = servers
    before = first.count_in_log("scored 1 texts"), second.count_in_log("scored 1 texts")
    urls = [first.url, f"{second.url}/get_reward"]  # the endpoint URL, as OpenRLHF users give it
    with RewardClient(urls, token=TOKEN, batch_size=1) as client:
        assert client.score(["p"] * 5, ["a", "aa", "aaa", "aaaa", "aaaaa"]) == [1.0, 2.0, 3.0, 4.0, 5.0]
        assert client.score(["p"], ["b"]) == [0.0]
    after = first.count_in_log("scored 1 texts"), second.count_in_log("scored 1 texts")
    assert (after[0] - before[0], after[1] - before[1]) == (3, 3)


def test_a_missing_token_fails_at_once_without_retries(servers):
    first, _ = servers
    before = first.count_in_log("HTTP 401")
    with RewardClient(first.url, max_retries=3, backoff_s=5.0) as client:
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"HTTP 401.*reward\.token"):
            client.score(["p"], ["a"])
    assert time.monotonic() - started < 2.0
    assert first.count_in_log("HTTP 401") == before + 1


def test_a_batch_too_big_for_the_server_says_to_lower_the_batch_size(servers):
    first, _ = servers
    with RewardClient(first.url, token=TOKEN) as client:
        with pytest.raises(RewardServerError, match=r"HTTP 413.*reward\.batch_size"):
            client.score(["p"] * 10, ["a" * 50] * 10)


def test_a_server_error_is_retried_then_reported_with_its_message(servers):
    _, second = servers
    before = second.count_in_log("reward model failed")
    with RewardClient(second.url, max_retries=2, backoff_s=0.01) as client:
        with pytest.raises(RewardServerError, match=r"HTTP 500: .*told to raise \(3 tries\)"):
            client.score(["p"], ["raise"])
    assert second.count_in_log("reward model failed") == before + 3


def test_health_is_true_for_a_live_server_and_false_for_a_dead_port(servers):
    _, second = servers
    with RewardClient(second.url) as live, RewardClient(f"http://127.0.0.1:{free_port()}") as dead:
        assert live.health() is True
        assert dead.health() is False
        live.wait_until_healthy(1.0)
        started = time.monotonic()
        with pytest.raises(RewardServerError, match="not healthy within 0.5 s"):
            dead.wait_until_healthy(0.5)
        assert time.monotonic() - started < 2.0


def test_a_dead_port_fails_fast_naming_the_url(servers):
    url = f"http://127.0.0.1:{free_port()}"
    with RewardClient(url, max_retries=2, backoff_s=0.05) as client:
        started = time.monotonic()
        with pytest.raises(RewardServerError) as raised:
            client.score(["p"], ["a"])
    assert time.monotonic() - started < 2.0
    message = str(raised.value)
    assert url in message and "could not be reached" in message and "(3 tries)" in message
    assert "reward.url" in message


@pytest.fixture(scope="module")
def late_server(tmp_path_factory):
    """A server whose process starts only after the client's first try was refused."""
    port = free_port()
    holder = {}
    log = tmp_path_factory.mktemp("late") / "late.log"
    spec = ("--reward-fn", "tests.reward.fixtures:misbehave_on_command")
    starter = threading.Timer(0.3, lambda: holder.setdefault("server", ServerProcess(log, *spec, port=port)))
    starter.start()
    yield f"http://127.0.0.1:{port}"
    starter.join()
    holder["server"].kill()


def test_a_server_started_late_is_retried_until_it_answers(late_server, caplog):
    with RewardClient(late_server, max_retries=8, backoff_s=0.2) as client, caplog.at_level(logging.WARNING):
        assert client.score(["p"], ["banana"]) == [3.0]
    assert "could not be reached" in caplog.text and "retrying" in caplog.text


def test_a_server_slower_than_the_timeout_fails_within_the_timeout_budget(late_server):
    with RewardClient(late_server) as client:
        client.wait_until_healthy(30.0)
    with RewardClient(late_server, timeout_s=0.4, max_retries=1, backoff_s=0.05) as client:
        started = time.monotonic()
        with pytest.raises(RewardServerError, match=r"did not answer within 0\.4 s \(2 tries\)"):
            client.score(["p"], ["sleep:1.5"])
    assert time.monotonic() - started < 2 * 0.4 + 0.05 + 0.5


def test_a_server_error_then_success_returns_the_rewards():
    client, requests = scripted_client(
        [
            httpx.Response(503, json={"error": "busy"}),
            httpx.ConnectError("refused"),
            httpx.Response(200, json={"rewards": [1.5]}),
        ],
        max_retries=2,
    )
    assert client.score(["p"], ["r"]) == [1.5]
    assert len(requests) == 3


def test_the_request_carries_full_texts_and_prompts_and_the_token():
    client, requests = scripted_client([httpx.Response(200, json={"rewards": [1.0, 2.0]})], token="t")
    client.score(["p1 ", "p2 "], ["r1", "r2"])
    sent = requests[0]
    assert sent.url.path == "/get_reward" and sent.headers["authorization"] == "Bearer t"
    assert json.loads(sent.content) == {"query": ["p1 r1", "p2 r2"], "prompts": ["p1 ", "p2 "]}


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"rewards": [1.0]}, "returned 1 rewards for 2 texts"),
        ({"rewards": [1.0, float("nan")]}, "non-finite reward at index 1"),
        ({"rewards": [1.0, 1e400]}, "non-finite reward at index 1"),
        ({"scores": [1.0, 2.0]}, 'without a "rewards" list'),
        ({"rewards": "12"}, 'without a "rewards" list (got str)'),
        ({"rewards": ["1.5", 1.0]}, "returned str '1.5' at index 0, not a number"),
        ({"rewards": [1.0, True]}, "returned bool True at index 1, not a number"),
        ({"rewards": [None, 1.0]}, "returned NoneType None at index 0, not a number"),
        ("<html>", "not JSON"),
    ],
)
def test_a_200_answer_without_one_finite_number_per_text_is_retried_then_an_error(body, message):
    answer = httpx.Response(200, text=body) if isinstance(body, str) else httpx.Response(200, json=body)
    client, requests = scripted_client([answer, answer], max_retries=1)
    with pytest.raises(RewardServerError, match=re.escape(message)) as raised:
        client.score(["p", "q"], ["r", "s"])
    assert len(requests) == 2
    assert "http://reward.test" in str(raised.value) and "(2 tries)" in str(raised.value)


def test_a_refused_request_is_an_error_and_not_retried():
    answer = httpx.Response(400, json={"error": "query[0] does not start with prompts[0]"})
    client, requests = scripted_client([answer, answer], max_retries=1)
    with pytest.raises(RewardServerError, match=re.escape("HTTP 400: query[0] does not start")):
        client.score(["p", "q"], ["r", "s"])
    assert len(requests) == 1


def test_no_pairs_need_no_request():
    client, requests = scripted_client([])
    assert client.score([], []) == []
    assert requests == []


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"urls": "localhost:5000"}, "must start with http"),
        ({"urls": []}, "reward.url is empty"),
        ({"urls": "http://x", "batch_size": 0}, "out of range"),
    ],
)
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        RewardClient(**settings)


def test_prompts_and_responses_must_pair_up():
    with RewardClient("http://x") as client, pytest.raises(ValueError, match="2 prompts but 1 responses"):
        client.score(["a", "b"], ["c"])


def test_the_reward_identity_is_what_the_servers_name_and_their_urls_when_they_do_not(servers):
    first, second = servers
    dead = f"http://127.0.0.1:{free_port()}"
    with RewardClient([first.url, second.url]) as both, RewardClient([second.url, dead]) as one_silent:
        assert both.reward_identity() == "function tests.reward.fixtures:misbehave_on_command"
        assert one_silent.reward_identity() == f"{second.url},{dead}"
