"""The reward-model HTTP server: ``metaapo serve-reward`` (or ``python -m metaapo_nemo.reward.server``).

Protocol (compatible with OpenRLHF's remote reward model, see docs/CONTRACTS.md):
``POST /get_reward`` ``{"query": [full text], "prompts": [prompt]?, "labels": [...]?}`` ->
``{"rewards": [float], "scores": [float]}``; ``GET /health`` -> 200 ``{"status": "ok", "instance": ID,
...}`` while it scores, ``"status": "degraded"`` with the ``reason`` when the last reward call failed
(it still takes requests: the next may succeed, and a trainer waiting for health must not wait for
a success only its own requests could bring), 503 ``{"status": "unhealthy", "reason": ...}`` when
the scoring thread has stopped; ``GET /metrics`` -> Prometheus text.

Requests are batched dynamically: one scoring thread takes up to ``--max-batch-texts`` texts from
the queued requests (waiting at most ``--max-wait-ms`` after the oldest arrived for more to come),
calls the reward function once on them all and answers each request with its own slice. When such
a call fails and it held several requests, each request is scored again alone, so one bad request
fails only itself. A request whose client has gone before it is scored is dropped, not computed.
Beyond ``--max-queued-texts`` waiting texts a request gets 503 with ``Retry-After``.

A bad request gets a 4xx answer with ``{"error": ...}``; a failing reward model (an exception, or
an answer that is not a list of one finite int/float per text) gets a 500; neither stops the
server. On SIGTERM or SIGINT it stops accepting, lets the work in flight finish for at most
``--shutdown-timeout-s`` and then exits even if the reward function hangs; a second signal exits
at once.
"""

import argparse
import asyncio
import bisect
import hmac
import ipaddress
import json
import logging
import math
import numbers
import os
import secrets
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect

from metaapo_nemo.config import REWARD_TOKEN_ENV
from metaapo_nemo.reward.models import HFRewardModel, RewardFn, load_reward_fn

log = logging.getLogger("metaapo_nemo.reward.server")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
DEFAULT_MAX_BATCH_TEXTS = 256
DEFAULT_MAX_WAIT_MS = 5.0
DEFAULT_MAX_QUEUED_TEXTS = 8192
DEFAULT_SHUTDOWN_TIMEOUT_S = 10.0
TOKEN_ENV = REWARD_TOKEN_ENV
RETRY_AFTER_S = 1
DISCONNECT_POLL_S = 0.05
LATENCY_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
OUTCOMES = ("ok", "client_error", "server_error", "overloaded", "dropped")


class BadRequest(ValueError):
    """The request cannot be scored; the message tells the caller what is wrong."""


class RewardFailed(RuntimeError):
    """The reward function raised or answered something other than one finite number per text."""


def parse_reward_request(payload: object) -> tuple[list[str], list[str]]:
    """Split a decoded ``/get_reward`` body into (prompts, responses).

    With ``prompts`` each query must start with its prompt and the response is the rest; without
    them the prompt is empty and the whole query is the response.
    """
    if not isinstance(payload, dict):
        raise BadRequest('the body must be a JSON object like {"query": ["text", ...]}')
    queries = payload.get("query")
    if not isinstance(queries, list):
        raise BadRequest('"query" must be a list of strings (each the prompt followed by the response)')
    _check_strings("query", queries)
    labels = payload.get("labels")
    if labels is not None and (not isinstance(labels, list) or len(labels) != len(queries)):
        raise BadRequest(f'"labels" must be absent or a list of {len(queries)} items, one per query')
    prompts = payload.get("prompts")
    if prompts is None:
        return [""] * len(queries), list(queries)
    if not isinstance(prompts, list):
        raise BadRequest('"prompts" must be a list of strings or absent')
    _check_strings("prompts", prompts)
    if len(prompts) != len(queries):
        raise BadRequest(f'"prompts" has {len(prompts)} items but "query" has {len(queries)}')
    for i, (query, prompt) in enumerate(zip(queries, prompts)):
        if not query.startswith(prompt):
            raise BadRequest(f"query[{i}] does not start with prompts[{i}]")
    return list(prompts), [query[len(prompt) :] for query, prompt in zip(queries, prompts)]


def _check_strings(field: str, values: list) -> None:
    for i, value in enumerate(values):
        if not isinstance(value, str):
            raise BadRequest(f'"{field}"[{i}] is {type(value).__name__}, not a string')
        # JSON's \ud800 escapes decode to lone surrogates, which no tokenizer can take.
        if not value.isascii():
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise BadRequest(f'"{field}"[{i}] holds a lone UTF-16 surrogate; send valid Unicode text') from None


def decode_reward_body(body: bytes) -> tuple[list[str], list[str]]:
    """(prompts, responses) from a raw ``/get_reward`` body; BadRequest saying what is wrong."""
    try:
        payload = json.loads(body.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise BadRequest(f"the body is not UTF-8 text: {err}") from None
    except RecursionError:
        raise BadRequest("the body nests JSON too deeply") from None
    except ValueError as err:  # JSONDecodeError, and integers too long to convert
        raise BadRequest(f"the body is not valid JSON: {err}") from None
    return parse_reward_request(payload)


def checked_rewards(rewards: object, expected: int) -> list[float]:
    """The reward model's answer as floats, or RewardFailed saying how it misbehaved: it must be a
    sequence (not a string) of ``expected`` finite ints or floats (not bools)."""
    if isinstance(rewards, (str, bytes)) or not isinstance(rewards, Sequence):
        raise RewardFailed(
            f"the reward model returned {type(rewards).__name__}; it must return a list of floats, one per text"
        )
    if len(rewards) != expected:
        raise RewardFailed(f"the reward model returned {len(rewards)} rewards for {expected} texts")
    values = []
    for i, reward in enumerate(rewards):
        if isinstance(reward, bool) or not isinstance(reward, numbers.Real):
            raise RewardFailed(
                f"the reward model returned {type(reward).__name__} {reward!r} at index {i}, not a number"
            )
        value = float(reward)
        if not math.isfinite(value):
            raise RewardFailed(f"the reward model returned a non-finite reward ({value}) at index {i}")
        values.append(value)
    return values


class Histogram:
    """A Prometheus histogram: cumulative bucket counts, sum and count."""

    def __init__(self, buckets: Sequence[float]):
        self.buckets = tuple(buckets)
        self.counts = [0] * (len(self.buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str) -> list[str]:
        lines, total = [], 0
        for bound, count in zip([*map(_number, self.buckets), "+Inf"], self.counts):
            total += count
            lines.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return [*lines, f"{name}_sum {_number(self.sum)}", f"{name}_count {total}"]


def _number(value: float) -> str:
    return repr(float(value)) if not float(value).is_integer() else str(int(value))


@dataclass
class Metrics:
    """What /metrics reports; updated from the event loop and the scoring thread under ``lock``."""

    requests: dict = field(default_factory=lambda: dict.fromkeys(OUTCOMES, 0))
    texts_scored: int = 0
    batches: int = 0
    batch_texts: Histogram = field(default_factory=lambda: Histogram(BATCH_BUCKETS))
    latency: Histogram = field(default_factory=lambda: Histogram(LATENCY_BUCKETS_S))
    lock: threading.Lock = field(default_factory=threading.Lock)

    def count_request(self, outcome: str, seconds: float) -> None:
        with self.lock:
            self.requests[outcome] += 1
            self.latency.observe(seconds)

    def count_reward_call(self, texts: int) -> None:
        with self.lock:
            self.texts_scored += texts
            self.batches += 1
            self.batch_texts.observe(texts)

    def exposition(self, queued_requests: int, queued_texts: int) -> str:
        """The Prometheus text exposition format (version 0.0.4)."""
        p = "metaapo_reward_"
        with self.lock:
            lines = [
                f"# HELP {p}requests_total Requests to /get_reward by outcome.",
                f"# TYPE {p}requests_total counter",
                *(f'{p}requests_total{{outcome="{outcome}"}} {n}' for outcome, n in self.requests.items()),
                f"# HELP {p}texts_scored_total Texts passed to the reward function (a retried text counts again).",
                f"# TYPE {p}texts_scored_total counter",
                f"{p}texts_scored_total {self.texts_scored}",
                f"# HELP {p}batches_total Calls of the reward function.",
                f"# TYPE {p}batches_total counter",
                f"{p}batches_total {self.batches}",
                f"# HELP {p}batch_texts Texts per call of the reward function.",
                f"# TYPE {p}batch_texts histogram",
                *self.batch_texts.lines(f"{p}batch_texts"),
                f"# HELP {p}request_seconds Time from a /get_reward request's arrival to its answer.",
                f"# TYPE {p}request_seconds histogram",
                *self.latency.lines(f"{p}request_seconds"),
            ]
        lines += [
            f"# HELP {p}queued_requests Requests waiting for the scoring thread.",
            f"# TYPE {p}queued_requests gauge",
            f"{p}queued_requests {queued_requests}",
            f"# HELP {p}queued_texts Texts waiting for the scoring thread.",
            f"# TYPE {p}queued_texts gauge",
            f"{p}queued_texts {queued_texts}",
        ]
        return "\n".join(lines) + "\n"


def parse_metrics(text: str) -> dict[str, float]:
    """``{'name{labels}': value}`` from Prometheus text, e.g. ``'metaapo_reward_batches_total': 3.0``."""
    samples = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            samples[name] = float(value)
    return samples


@dataclass(eq=False)
class Job:
    """One request's texts and the future the scoring thread answers it through."""

    prompts: list[str]
    responses: list[str]
    arrived: float = field(default_factory=time.monotonic)
    future: Future = field(default_factory=Future)

    def __len__(self) -> int:
        return len(self.prompts)


class Overloaded(RuntimeError):
    """Too many texts are waiting; the caller should come back after ``RETRY_AFTER_S``."""


class Batcher:
    """The queue of requests and the one thread that calls the reward function on batches of them
    (reward functions and models need not be thread-safe, and one forward at a time is fastest on
    one accelerator anyway)."""

    def __init__(
        self, reward: RewardFn, metrics: Metrics, max_batch_texts: int, max_wait_s: float, max_queued_texts: int
    ):
        self.reward = reward
        self.metrics = metrics
        self.max_batch_texts = max_batch_texts
        self.max_wait_s = max_wait_s
        self.max_queued_texts = max_queued_texts
        self.queue: deque[Job] = deque()
        self.queued_texts = 0
        self.last_failure: str | None = None
        self.changed = threading.Condition()
        self.thread = threading.Thread(target=self._serve, name="reward-scoring", daemon=True)
        self.thread.start()

    def submit(self, prompts: list[str], responses: list[str]) -> Job:
        """Queue a request; Overloaded when that would exceed ``max_queued_texts`` (an empty queue
        takes any request, so one larger than the limit is still served)."""
        job = Job(prompts, responses)
        with self.changed:
            if self.queue and self.queued_texts + len(job) > self.max_queued_texts:
                raise Overloaded(f"{self.queued_texts} texts are waiting (limit {self.max_queued_texts})")
            self.queue.append(job)
            self.queued_texts += len(job)
            self.changed.notify()
        return job

    def drop(self, job: Job) -> bool:
        """Withdraw a job whose client has gone; False when it is already being scored."""
        with self.changed:
            if not job.future.cancel():
                return False
            self.queue.remove(job)
            self.queued_texts -= len(job)
        return True

    def depth(self) -> tuple[int, int]:
        with self.changed:
            return len(self.queue), self.queued_texts

    def health_problem(self) -> str | None:
        """Why this server cannot score at all, or None."""
        return None if self.thread.is_alive() else "the scoring thread has stopped"

    def _serve(self) -> None:
        while True:
            batch = self._take_batch()
            try:
                self._score(batch)
            except RewardFailed as err:
                if len(batch) == 1:
                    batch[0].future.set_exception(err)
                    continue
                log.warning("a batch of %d requests failed (%s); scoring each alone", len(batch), err)
                for job in batch:
                    try:
                        self._score([job])
                    except RewardFailed as single_err:
                        job.future.set_exception(single_err)

    def _take_batch(self) -> list[Job]:
        with self.changed:
            while True:
                while not self.queue:
                    self.changed.wait()
                # Under load the oldest request has already waited, so a busy server does not wait more.
                deadline = self.queue[0].arrived + self.max_wait_s
                while self.queue and self.queued_texts < self.max_batch_texts:
                    left = deadline - time.monotonic()
                    if left <= 0:
                        break
                    self.changed.wait(left)
                if self.queue:  # else every waiting client went away
                    break
            batch, texts = [], 0
            while self.queue and (not batch or texts + len(self.queue[0]) <= self.max_batch_texts):
                job = self.queue.popleft()
                self.queued_texts -= len(job)
                job.future.set_running_or_notify_cancel()  # from now on drop() cannot withdraw it
                batch.append(job)
                texts += len(job)
            return batch

    def _score(self, batch: list[Job]) -> None:
        prompts = [prompt for job in batch for prompt in job.prompts]
        responses = [response for job in batch for response in job.responses]
        self.metrics.count_reward_call(len(prompts))
        try:
            rewards = checked_rewards(self.reward(prompts, responses), len(prompts))
        except RewardFailed as err:
            log.error("%s (a call of %d texts)", err, len(prompts))
            self.last_failure = f"the last reward call failed: {err}"
            raise
        except Exception as err:
            log.exception("reward model failed on %d texts", len(prompts))
            self.last_failure = f"the last reward call failed: {type(err).__name__}: {err}"
            raise RewardFailed(f"the reward model failed: {type(err).__name__}: {err}") from err
        self.last_failure = None
        start = 0
        for job in batch:
            job.future.set_result(rewards[start : start + len(job)])
            start += len(job)


def create_app(
    reward: RewardFn,
    token: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    max_batch_texts: int = DEFAULT_MAX_BATCH_TEXTS,
    max_wait_ms: float = DEFAULT_MAX_WAIT_MS,
    max_queued_texts: int = DEFAULT_MAX_QUEUED_TEXTS,
    source: str | None = None,
) -> FastAPI:
    """The FastAPI application serving ``reward`` through one scoring thread that batches requests.
    ``source`` names the reward (``function M:F``, ``model DIR``) in /health: the identity under
    which a run keeps the rewards it paid for, whatever host and port the server has this time."""
    app = FastAPI(title="metaapo reward server", docs_url=None, redoc_url=None, openapi_url=None)
    metrics = Metrics()
    batcher = Batcher(reward, metrics, max_batch_texts, max_wait_ms / 1000, max_queued_texts)
    instance = secrets.token_hex(8)  # tells a parent that /health is answered by the server it started
    expected_authorization = f"Bearer {token}".encode() if token else None

    @app.get("/health")
    async def health() -> JSONResponse:
        problem = batcher.health_problem()
        if problem is not None:
            return JSONResponse({"status": "unhealthy", "reason": problem, "instance": instance}, status_code=503)
        queued_requests, queued_texts = batcher.depth()
        state = {"status": "ok"} if batcher.last_failure is None else {"status": "degraded", "reason": batcher.last_failure}
        named = {"reward": source} if source else {}
        return JSONResponse({**state, **named, "instance": instance, "queued_requests": queued_requests,
                             "queued_texts": queued_texts})

    @app.get("/metrics")
    async def metrics_text() -> PlainTextResponse:
        return PlainTextResponse(metrics.exposition(*batcher.depth()), media_type="text/plain; version=0.0.4")

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        started = time.monotonic()
        outcome, answer = await _answer(request)
        metrics.count_request(outcome, time.monotonic() - started)
        return answer

    async def _answer(request: Request) -> tuple[str, JSONResponse]:
        started = time.perf_counter()
        if expected_authorization is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_authorization):
                return _refuse(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type != "application/json" and not content_type.endswith("+json"):
            return _refuse(415, f"the body is sent as {content_type}; send JSON with Content-Type: application/json")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _refuse(413, f"the body has {declared} bytes; this server takes at most {max_body_bytes}")
        body = bytearray()
        try:
            # Counting what arrives catches bodies sent without (or with a wrong) Content-Length.
            async for chunk in request.stream():
                body += chunk
                if len(body) > max_body_bytes:
                    return _refuse(413, f"the body exceeds this server's limit of {max_body_bytes} bytes")
            # A large body takes a while to decode; the event loop must keep answering /health.
            prompts, responses = await run_in_threadpool(decode_reward_body, bytes(body))
        except ClientDisconnect:
            return "dropped", _error(499, "the client went away")
        except BadRequest as err:
            return _refuse(400, str(err))
        if not prompts:
            return "ok", JSONResponse({"rewards": [], "scores": []})
        try:
            job = batcher.submit(prompts, responses)
        except Overloaded as err:
            log.warning("refused a request of %d texts: %s", len(prompts), err)
            answer = _error(503, f"the reward server is overloaded ({err}); retry after {RETRY_AFTER_S} s")
            answer.headers["Retry-After"] = str(RETRY_AFTER_S)
            return "overloaded", answer
        try:
            rewards = await _result_unless_client_leaves(request, job)
        except RewardFailed as err:
            return "server_error", _error(500, str(err))
        if rewards is None:
            log.info("dropped a request of %d texts: its client went away before it was scored", len(prompts))
            return "dropped", _error(499, "the client went away")
        log.info("scored %d texts in %.3f s", len(rewards), time.perf_counter() - started)
        # Rendering a large answer takes a while too.
        return "ok", await run_in_threadpool(JSONResponse, {"rewards": rewards, "scores": rewards})

    async def _result_unless_client_leaves(request: Request, job: Job) -> list[float] | None:
        """The job's rewards, or None when its client disconnected and the job was withdrawn."""
        waiting = asyncio.wrap_future(job.future)
        try:
            while True:
                done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
                if done:
                    return waiting.result()
                if await request.is_disconnected() and batcher.drop(job):
                    return None
        except asyncio.CancelledError:  # the server is shutting down, or the connection is gone
            batcher.drop(job)
            raise

    app.state.instance = instance
    return app


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _refuse(status: int, message: str) -> tuple[str, JSONResponse]:
    log.info("refused a request (HTTP %d): %s", status, message)
    return "client_error", _error(status, message)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve-reward`` options."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on; 0 picks a free one (default: 5000)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'Authorization: Bearer TOKEN' on /get_reward (default: ${TOKEN_ENV}, which "
        "keeps the token out of the process list)",
    )
    parser.add_argument(
        "--allow-no-token",
        action="store_true",
        help="serve a --host other than this machine's loopback without a token (anyone who can reach "
        "the port can then use the reward model)",
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--reward-fn",
        metavar="MODULE:FUNCTION",
        help="a Python function (prompts: list[str], responses: list[str]) -> list[float]",
    )
    source.add_argument(
        "--model",
        metavar="DIR",
        help="a Hugging Face folder holding a Bradley-Terry reward model (sequence classifier with "
        "num_labels=1) and its tokenizer",
    )
    parser.add_argument(
        "--max-body-bytes",
        type=int,
        default=DEFAULT_MAX_BODY_BYTES,
        help=f"largest request body accepted; larger ones get HTTP 413 (default: {DEFAULT_MAX_BODY_BYTES})",
    )
    parser.add_argument(
        "--batch-size", type=int, default=16, help="texts per forward pass of --model (default: 16)"
    )
    parser.add_argument(
        "--max-batch-texts",
        type=int,
        default=DEFAULT_MAX_BATCH_TEXTS,
        help="most texts, from one or several queued requests, given to the reward function in one call "
        f"(a larger request is scored alone) (default: {DEFAULT_MAX_BATCH_TEXTS})",
    )
    parser.add_argument(
        "--max-wait-ms",
        type=float,
        default=DEFAULT_MAX_WAIT_MS,
        help="how long the oldest queued request waits for others to share its call; 0 never waits "
        f"(default: {DEFAULT_MAX_WAIT_MS:g})",
    )
    parser.add_argument(
        "--max-queued-texts",
        type=int,
        default=DEFAULT_MAX_QUEUED_TEXTS,
        help="most texts waiting to be scored; beyond them a request gets HTTP 503 with Retry-After "
        f"(default: {DEFAULT_MAX_QUEUED_TEXTS})",
    )
    parser.add_argument(
        "--shutdown-timeout-s",
        type=float,
        default=DEFAULT_SHUTDOWN_TIMEOUT_S,
        help="on SIGTERM/SIGINT, how long work in flight may take before the server exits anyway "
        f"(default: {DEFAULT_SHUTDOWN_TIMEOUT_S:g})",
    )
    parser.add_argument(
        "--port-file",
        metavar="FILE",
        help='once listening, write {"port": PORT, "instance": ID} to FILE (how a parent learns the port '
        "that --port 0 picked, and which server answers /health there)",
    )
    parser.add_argument(
        "--parent-pid",
        type=int,
        help="stop when this process's parent, which has this id, ends (set by the training job that "
        "starts this server, so it never outlives the job)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Load the reward model and serve it until interrupted; returns the exit status."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s reward-server %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        _check_args(args)
        if args.token is None and not _is_loopback(args.host):
            log.warning("serving %s without a token: anyone who can reach it can use the reward model", args.host)
        if args.reward_fn:
            reward, source = load_reward_fn(args.reward_fn), f"function {args.reward_fn}"
        else:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its bars would clutter the log file
            reward, source = HFRewardModel(args.model, batch_size=args.batch_size), f"model {args.model}"
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    app = create_app(
        reward, token=args.token, max_body_bytes=args.max_body_bytes, max_batch_texts=args.max_batch_texts,
        max_wait_ms=args.max_wait_ms, max_queued_texts=args.max_queued_texts, source=source,
    )  # fmt: skip
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    try:
        # Binding here, not in uvicorn, tells us the port --port 0 got before anyone can connect.
        sock = config.bind_socket()
    except SystemExit:  # uvicorn has logged why (the port is taken, the address is not ours)
        return 2
    port = sock.getsockname()[1]
    if args.port_file:
        _write_port_file(args.port_file, port, app.state.instance)
    if args.parent_pid is not None:
        threading.Thread(target=_stop_when_parent_ends, args=(args.parent_pid,), daemon=True).start()
    log.info("serving the reward %s on http://%s:%d (instance %s)", source, args.host, port, app.state.instance)
    _BoundedShutdownServer(config, args.shutdown_timeout_s).run(sockets=[sock])
    return 0


class _BoundedShutdownServer(uvicorn.Server):
    """uvicorn's server, whose graceful shutdown ends after ``timeout_s`` even if a handler hangs."""

    def __init__(self, config: uvicorn.Config, timeout_s: float):
        super().__init__(config)
        self.timeout_s = timeout_s

    def handle_exit(self, sig: int, frame) -> None:
        if self.should_exit:
            log.warning("second signal %d: exiting now", sig)
            os._exit(128 + sig)
        log.info("signal %d: finishing the work in flight (at most %g s)", sig, self.timeout_s)
        threading.Thread(target=_exit_after, args=(self.timeout_s,), daemon=True).start()
        super().handle_exit(sig, frame)


def _exit_after(timeout_s: float) -> None:
    time.sleep(timeout_s)
    log.warning("the work in flight did not finish within --shutdown-timeout-s=%g s; exiting", timeout_s)
    os._exit(1)


def _write_port_file(path: str, port: int, instance: str) -> None:
    # Written whole and renamed, so a reader never sees half of it.
    partial = f"{path}.partial"
    with open(partial, "w") as f:
        json.dump({"port": port, "instance": instance}, f)
    os.replace(partial, path)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_args(args: argparse.Namespace) -> None:
    if args.token == "":
        raise ValueError(f"the token (--token or ${TOKEN_ENV}) is empty; give a token or leave it out")
    if args.token is None and not _is_loopback(args.host) and not args.allow_no_token:
        raise ValueError(
            f"--host {args.host} is reachable from other machines but no token is set; set ${TOKEN_ENV} "
            "(or --token), or pass --allow-no-token to accept the risk"
        )
    for name in ("max_body_bytes", "batch_size", "max_batch_texts", "max_queued_texts"):
        if getattr(args, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be positive; got {getattr(args, name)}")
    for name in ("max_wait_ms", "shutdown_timeout_s"):
        if getattr(args, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be 0 or more; got {getattr(args, name)}")
    if not 0 <= args.port <= 65535:
        raise ValueError(f"--port must be in 0..65535; got {args.port}")


def _stop_when_parent_ends(parent_pid: int) -> None:
    # Reparenting means the parent is gone, even if it was killed before it could stop us; a
    # SIGTERM to ourselves lets uvicorn shut down as on Ctrl-C.
    while os.getppid() == parent_pid:
        time.sleep(1.0)
    log.info("parent process %d ended; stopping", parent_pid)
    os.kill(os.getpid(), signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaapo serve-reward", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
