"""The reward server as users run it: a real process answering real HTTP."""

import argparse
import threading
import time

import httpx
import pytest

from metaapo_nemo.reward.server import add_arguments

from .fixtures import ServerProcess

MAX_BODY_BYTES = 2000
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    log = tmp_path_factory.mktemp("server") / "server.log"
    process = ServerProcess(
        log, "--reward-fn", "tests.reward.fixtures:misbehave_on_command", "--max-body-bytes", str(MAX_BODY_BYTES)
    )
    yield process.wait_healthy()
    process.kill()


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    log = tmp_path_factory.mktemp("token_server") / "server.log"
    # The token comes from the environment, as the local launcher passes it.
    process = ServerProcess(
        log, "--reward-fn", "tests.reward.fixtures:count_letter_a", env={"METAAPO_REWARD_TOKEN": TOKEN}
    )
    yield process.wait_healthy()
    process.kill()


def post(server, body, **kwargs) -> httpx.Response:
    if isinstance(body, (dict, list)):
        return httpx.post(f"{server.url}/get_reward", json=body, timeout=10, **kwargs)
    return httpx.post(f"{server.url}/get_reward", content=body, timeout=10, **kwargs)


def test_rewards_score_the_response_after_the_prompt_in_request_order(server):
    body = {"query": ["a: banana", "a: xyz", "b: aaa"], "prompts": ["a: ", "a: ", "b: "], "labels": [0, 1, 2]}
    answer = post(server, body)
    assert answer.status_code == 200
    assert answer.json() == {"rewards": [3.0, 0.0, 3.0], "scores": [3.0, 0.0, 3.0]}


def test_without_prompts_the_whole_query_is_the_response(server):
    assert post(server, {"query": ["a: banana", "xyz"]}).json()["rewards"] == [4.0, 0.0]


def test_an_empty_query_list_gets_empty_rewards(server):
    assert post(server, {"query": []}).json() == {"rewards": [], "scores": []}


def test_health_answers_ok_with_the_servers_instance_id(server):
    answer = httpx.get(f"{server.url}/health", timeout=5)
    assert (answer.status_code, answer.json()["status"]) == (200, "ok")
    instance = answer.json()["instance"]
    assert len(instance) == 16 and httpx.get(f"{server.url}/health", timeout=5).json()["instance"] == instance


def test_each_scored_request_logs_one_line_with_its_count(server):
    before = server.count_in_log("scored 5 texts in ")
    post(server, {"query": ["a"] * 5})
    assert server.count_in_log("scored 5 texts in ") == before + 1


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "not valid JSON"),
        (b'{"query": ["\xff"]}', "not UTF-8 text"),
        (["a"], "JSON object"),
        ({"prompts": ["a"]}, '"query" must be a list'),
        ({"query": "a"}, '"query" must be a list'),
        ({"query": ["a", 3]}, '"query"[1] is int'),
        ({"query": ["ab", "cd"], "prompts": ["a"]}, '"prompts" has 1 items but "query" has 2'),
        ({"query": ["ab"], "prompts": [None]}, '"prompts"[0] is NoneType'),
        ({"query": ["ab", "cd"], "prompts": ["a", "x"]}, "query[1] does not start with prompts[1]"),
        ({"query": ["ab"], "labels": [1, 2]}, '"labels" must be absent or a list of 1 items'),
    ],
)
def test_a_malformed_body_gets_400_saying_what_is_wrong(server, body, message):
    answer = post(server, body)
    assert answer.status_code == 400
    assert message in answer.json()["error"]


def test_a_body_declared_larger_than_the_limit_gets_413(server):
    answer = post(server, {"query": ["a" * MAX_BODY_BYTES]})
    assert answer.status_code == 413
    assert str(MAX_BODY_BYTES) in answer.json()["error"]


def test_a_body_sent_without_length_is_cut_off_at_the_limit_with_413(server):
    chunks = iter([b'{"query": ["', b"a" * 1500, b"a" * 1500, b'"]}'])  # chunked: no Content-Length
    answer = post(server, chunks)
    assert answer.status_code == 413


def test_a_body_just_under_the_limit_is_scored(server):
    text = "a" * (MAX_BODY_BYTES - len('{"query": [""]}'))
    answer = post(server, f'{{"query": ["{text}"]}}'.encode())
    assert answer.json()["rewards"] == [float(len(text))]


@pytest.mark.parametrize(
    ("response", "message"),
    [
        ("raise", "RuntimeError: the reward function was told to raise"),
        ("nan", "non-finite reward (nan) at index 1"),
        ("drop", "returned 1 rewards for 2 texts"),
    ],
)
def test_a_failing_reward_function_gets_500_and_the_server_keeps_serving(server, response, message):
    answer = post(server, {"query": ["aa", response]})
    assert answer.status_code == 500
    assert message in answer.json()["error"]
    assert post(server, {"query": ["aa"]}).json()["rewards"] == [2.0]


def test_health_answers_while_a_slow_batch_is_scored(server):
    slow = threading.Thread(target=post, args=(server, {"query": ["sleep:1.0"]}))
    slow.start()
    time.sleep(0.2)
    started = time.monotonic()
    assert httpx.get(f"{server.url}/health", timeout=5).status_code == 200
    assert time.monotonic() - started < 0.5
    slow.join()


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}])
def test_a_missing_or_wrong_token_gets_401(token_server, headers):
    answer = post(token_server, {"query": ["aa"]}, headers=headers)
    assert answer.status_code == 401
    assert "bearer token" in answer.json()["error"]


def test_the_right_token_gets_rewards(token_server):
    answer = post(token_server, {"query": ["aa"]}, headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.json()["rewards"] == [2.0]


def test_the_server_binds_this_machine_only_by_default():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    assert parser.parse_args(["--reward-fn", "m:f"]).host == "127.0.0.1"


def test_the_command_needs_exactly_one_reward_source():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    with pytest.raises(SystemExit):
        parser.parse_args(["--reward-fn", "m:f", "--model", "dir"])
    with pytest.raises(SystemExit):
        parser.parse_args([])
