"""Whatever a client sends, the server answers a client error with a 4xx and ``{"error": ...}``,
never a 5xx, and keeps answering /health. Hypothesis drives the ASGI app in this process;
derandomized, so every run tries the same bodies."""

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import TestClient

from metaapo_nemo.reward.server import create_app

from .fixtures import count_letter_a

MAX_BODY_BYTES = 8192
FUZZ = settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])

# Text with everything JSON can carry: NUL, control characters, astral planes and lone surrogates
# (which json.dumps writes as \ud800 escapes).
# st.text never yields surrogates, so the text is joined from characters.
ANY_TEXT = st.lists(st.characters() | st.characters(categories=["Cs"]), max_size=20).map("".join)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | ANY_TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_TEXT, inner, max_size=4),
    max_leaves=12,
)
QUERIES = st.lists(ANY_TEXT | JSON_VALUES, max_size=5)
REQUESTS = st.fixed_dictionaries(
    {},
    optional={
        "query": QUERIES | JSON_VALUES,
        "prompts": QUERIES | JSON_VALUES,
        "labels": st.lists(JSON_VALUES, max_size=5) | JSON_VALUES,
        "extra": JSON_VALUES,
    },
)


@pytest.fixture(scope="module")
def client():
    with TestClient(create_app(count_letter_a, max_body_bytes=MAX_BODY_BYTES)) as test_client:
        yield test_client


def check_answer(answer, expected_texts: int | None = None) -> None:
    """A 200 with one reward per query, or a 4xx saying what is wrong."""
    assert answer.status_code < 500, answer.text
    if answer.status_code == 200:
        rewards = answer.json()["rewards"]
        assert all(isinstance(reward, float) for reward in rewards)
        assert expected_texts is None or len(rewards) == expected_texts
    else:
        assert 400 <= answer.status_code < 500
        assert isinstance(answer.json()["error"], str) and answer.json()["error"]


@FUZZ
@given(body=st.binary(max_size=600))
def test_arbitrary_bytes_get_a_4xx_or_rewards(client, body):
    check_answer(client.post("/get_reward", content=body))


@FUZZ
@given(payload=REQUESTS | JSON_VALUES)
def test_any_json_value_gets_a_4xx_or_one_reward_per_query(client, payload):
    body = json.dumps(payload).encode()
    answer = client.post("/get_reward", content=body, headers={"content-type": "application/json"})
    queries = payload.get("query") if isinstance(payload, dict) else None
    check_answer(answer, len(queries) if isinstance(queries, list) else None)


@FUZZ
@given(queries=st.lists(ANY_TEXT, min_size=1, max_size=5))
def test_text_with_lone_surrogates_gets_400_and_other_text_gets_rewards(client, queries):
    answer = client.post("/get_reward", content=json.dumps({"query": queries}).encode())
    has_surrogate = any(0xD800 <= ord(char) <= 0xDFFF for query in queries for char in query)
    assert answer.status_code == (400 if has_surrogate else 200), answer.text
    if has_surrogate:
        assert "surrogate" in answer.json()["error"]


@settings(max_examples=60, deadline=None, derandomize=True)
@given(size=st.integers(MAX_BODY_BYTES - 40, MAX_BODY_BYTES + 40), depth=st.integers(0, 3))
def test_bodies_around_the_size_limit_get_rewards_below_and_413_above(client, size, depth):
    envelope = "[" * depth + '{"query": ["' + "%s" + '"]}' + "]" * depth
    body = (envelope % ("a" * max(0, size - len(envelope) + 2))).encode()
    answer = client.post("/get_reward", content=body)
    check_answer(answer)
    if len(body) > MAX_BODY_BYTES:
        assert answer.status_code == 413
    elif depth == 0:
        assert answer.status_code == 200


@pytest.mark.parametrize(
    ("body", "status"),
    [
        (b'{"query": ["a\\u0000b", "\\u0000"]}', 200),  # NUL is text like any other
        (b'{"query": ["\\udfff"]}', 400),
        (b'{"query": ["\\ud83d\\ude00 a"]}', 200),  # a surrogate pair is one valid character
        (b'{"query": [], "labels": [' + b"1" * 5000 + b"]}", 400),  # too many digits for Python's int()
        (b'{"query": ["a"]} trailing', 400),
        (b"\xef\xbb\xbf" + b'{"query": ["a"]}', 400),  # a UTF-8 byte-order mark is not JSON
        (b'{"query": ["\xc3\x28"]}', 400),  # invalid UTF-8
        (b"", 400),
        (b"null", 400),
        (b'"query"', 400),
        (b'{"query": null}', 400),
    ],
)
def test_odd_bodies_get_the_answer_they_deserve(client, body, status):
    answer = client.post("/get_reward", content=body)
    assert answer.status_code == status, answer.text
    check_answer(answer)


@pytest.mark.parametrize("depth", [100, 2000, MAX_BODY_BYTES // 2 - 1])
def test_deep_nesting_gets_a_4xx(client, depth):
    check_answer(client.post("/get_reward", content=b"[" * depth + b"]" * depth))
    check_answer(client.post("/get_reward", content=b'{"query": ' + b"[" * depth + b"]" * depth + b"}"))


@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", "foo"]
)
def test_a_body_that_is_not_sent_as_json_gets_415(client, content_type):
    answer = client.post("/get_reward", content=b'{"query": ["a"]}', headers={"content-type": content_type})
    assert answer.status_code == 415 and "application/json" in answer.json()["error"]


def test_json_content_types_with_parameters_are_accepted(client):
    for content_type in ("application/json; charset=utf-8", "Application/JSON", "application/vnd.api+json"):
        answer = client.post("/get_reward", content=b'{"query": ["aa"]}', headers={"content-type": content_type})
        assert answer.json()["rewards"] == [2.0]


def test_health_still_answers_after_the_fuzzing(client):
    answer = client.get("/health")
    assert answer.status_code == 200 and answer.json()["status"] == "ok"
