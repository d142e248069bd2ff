"""Client of the reward-model HTTP server (one or several, by URL).

Every call is bounded: a try (connect, send, and the whole answer) ends ``timeout_s`` after it
began however slowly the server sends, failed tries are retried after a jittered exponential
backoff (or the server's ``Retry-After``), and the call ends within ``call_timeout_s`` when that is
set. Then a ``RewardServerError`` says which server failed and what to change. An answer is
returned only when it holds one finite number per text.
"""

import logging
import math
import random
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import httpcore
import httpx

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0
MIN_TRY_S = 0.05  # with less of reward.call_timeout_s left, no try could get an answer
WRITE_CHUNK_BYTES = 64 * 1024


class RewardServerError(RuntimeError):
    """The reward server could not be reached, refused the request or answered nonsense."""


class RewardClient:
    """Scores (prompt, response) pairs with remote reward servers.

    Args:
        urls: one server or several; each is ``http(s)://host:port`` or that followed by
            ``/get_reward``. Batches go to the servers round-robin, several at once when there are
            several servers, and a failed try moves on to the next server.
        token: bearer token the servers were started with, if any.
        timeout_s: longest time one try may take, from connecting to the last byte of the answer.
        max_retries: without ``call_timeout_s``, how many further tries a batch gets (so at most
            ``1 + max_retries`` tries); ignored when ``call_timeout_s`` is set.
        batch_size: pairs per request.
        backoff_s: the pause before retry n is drawn uniformly from 0 to ``backoff_s * 2**(n-1)``,
            capped at 8 s ("full jitter", so clients that failed together do not retry together).
            A server's ``Retry-After`` (seconds) replaces the draw.
        call_timeout_s: when set, the longest time one batch may take, retries and pauses
            included: tries go on, whatever ``max_retries`` says, until it is spent (so a server
            restarted within it is waited for); a try ends by it, a backoff is shortened to leave
            the next try half of what is left, and a ``Retry-After`` longer than what is left ends
            the call at once. None: the call takes at most ``1 + max_retries`` tries of
            ``timeout_s`` and the pauses between them (a ``Retry-After`` is then capped at 8 s).

    Retried (scoring is idempotent): connection errors, timeouts, HTTP 5xx, 429, and a 200 answer
    without one finite number per text (a misbehaving replica). Never retried: any other HTTP 4xx,
    as the request itself is wrong.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        batch_size: int = 256,
        backoff_s: float = 0.5,
        call_timeout_s: float | None = None,
    ):
        self.base_urls = [_base_url(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.base_urls:
            raise ValueError("reward.url is empty; give at least one reward server URL")
        if timeout_s <= 0 or max_retries < 0 or batch_size < 1 or backoff_s < 0:
            raise ValueError(
                "reward client settings out of range: need timeout_s > 0, max_retries >= 0, "
                f"batch_size >= 1, backoff_s >= 0; got {timeout_s}, {max_retries}, {batch_size}, {backoff_s}"
            )
        if call_timeout_s is not None and call_timeout_s <= 0:
            raise ValueError(f"reward.call_timeout_s must be positive or None; got {call_timeout_s}")
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        self.call_timeout_s = call_timeout_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: a cluster's HTTP_PROXY must not capture traffic to an internal server.
        self._http = httpx.Client(headers=headers, timeout=timeout_s, trust_env=False, transport=_DeadlineTransport())
        self._next_server = 0
        self._next_server_lock = threading.Lock()

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The reward of each response to its prompt, in order; every reward is checked finite."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses; give one response per prompt")
        for name, texts in (("prompts", prompts), ("responses", responses)):
            if not all(isinstance(text, str) for text in texts):
                raise TypeError(f"{name} must all be strings")
        starts = range(0, len(prompts), self.batch_size)
        with self._next_server_lock:
            first_server = self._next_server
            self._next_server = (first_server + len(starts)) % len(self.base_urls)
        jobs = [
            (
                (first_server + n) % len(self.base_urls),
                prompts[start : start + self.batch_size],
                responses[start : start + self.batch_size],
            )
            for n, start in enumerate(starts)
        ]
        workers = min(len(self.base_urls), len(jobs))
        if workers <= 1:
            batches = [self._score_batch(*job) for job in jobs]
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                batches = list(pool.map(lambda job: self._score_batch(*job), jobs))
        return [reward for batch in batches for reward in batch]

    def _score_batch(self, server: int, prompts: list[str], responses: list[str]) -> list[float]:
        queries = [prompt + response for prompt, response in zip(prompts, responses)]
        payload = {"query": queries, "prompts": prompts}
        started = time.monotonic()
        call_deadline = None if self.call_timeout_s is None else started + self.call_timeout_s
        tried = []
        while True:
            base = self.base_urls[(server + len(tried)) % len(self.base_urls)]
            tried.append(base)
            outcome = self._try(base, payload, len(prompts), call_deadline)
            if not isinstance(outcome, _Failure):
                return outcome
            pause = self._pause(len(tried), outcome.retry_after_s)
            if call_deadline is None:
                retry = len(tried) <= self.max_retries
            else:
                left = call_deadline - time.monotonic()
                # A server asking for more than is left is not asked again; a backoff is shortened
                # so that the last try still gets half of what is left.
                retry = left > MIN_TRY_S and (outcome.retry_after_s is None or outcome.retry_after_s < left)
                pause = pause if outcome.retry_after_s is not None else min(pause, left / 2)
            if not retry:
                break
            log.warning(
                "reward server at %s %s; retrying in %.1f s (try %d)", base, outcome.problem, pause, len(tried) + 1
            )
            time.sleep(pause)
        servers = " and ".join(sorted(set(tried)))
        spent = "" if call_deadline is None else f" in {time.monotonic() - started:.1f} s of reward.call_timeout_s"
        raise RewardServerError(
            f"reward server at {servers} {outcome.problem} ({len(tried)} tries{spent}); {outcome.hint}"
        )

    def _pause(self, tries: int, retry_after_s: float | None) -> float:
        if retry_after_s is not None:
            return retry_after_s if self.call_timeout_s is not None else min(retry_after_s, MAX_BACKOFF_S)
        return random.uniform(0, min(self.backoff_s * 2 ** (tries - 1), MAX_BACKOFF_S))

    def _try(self, base: str, payload: dict, expected: int, call_deadline: float | None) -> "list[float] | _Failure":
        """One POST, ended by its deadline; the rewards, or why to retry (RewardServerError when a
        retry cannot help)."""
        deadline = time.monotonic() + self.timeout_s
        _try_deadline.value = deadline if call_deadline is None else min(deadline, call_deadline)
        try:
            answer = self._http.post(f"{base}/get_reward", json=payload)
        except httpx.TimeoutException:
            return _Failure(
                f"did not answer within {self.timeout_s:g} s",
                "is it running, and is reward.timeout_s long enough for a batch?",
            )
        except httpx.TransportError as err:
            return _Failure(f"could not be reached ({type(err).__name__}: {err})", "is it running? (reward.url)")
        finally:
            _try_deadline.value = None
        if answer.status_code == 429 or answer.status_code >= 500:
            return _Failure(
                f"failed with HTTP {answer.status_code}: {_error_text(answer)}",
                "see the reward server's log",
                _retry_after_s(answer),
            )
        if not 200 <= answer.status_code < 300:
            raise RewardServerError(_refusal_message(base, answer))
        try:
            return _rewards_from(answer, expected)
        except ValueError as err:
            return _Failure(str(err), "is reward.url a metaapo or OpenRLHF reward server?")

    def health(self) -> bool:
        """Whether every server answers ``/health`` with 200 right now."""
        return not self._unhealthy()

    def wait_until_healthy(self, timeout_s: float) -> None:
        """Block until every server is healthy; RewardServerError after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while unhealthy := self._unhealthy():
            if time.monotonic() >= deadline:
                raise RewardServerError(
                    f"reward server at {' and '.join(unhealthy)} was not healthy within {timeout_s:g} s; "
                    "is it running? (reward.url)"
                )
            time.sleep(0.2)

    def reward_identity(self) -> str:
        """What the servers score with, as their /health names it (``function M:F``, ``model DIR``);
        their URLs when a server does not say (an OpenRLHF server) or they disagree."""
        names = set()
        for base in self.base_urls:
            try:
                names.add(self._http.get(f"{base}/health", timeout=min(self.timeout_s, 5.0)).json().get("reward"))
            except (httpx.HTTPError, ValueError, AttributeError):
                names.add(None)
        return names.pop() if len(names) == 1 and None not in names else ",".join(self.base_urls)

    def _unhealthy(self) -> list[str]:
        unhealthy = []
        for base in self.base_urls:
            try:
                healthy = self._http.get(f"{base}/health", timeout=min(self.timeout_s, 5.0)).status_code == 200
            except httpx.HTTPError:
                healthy = False
            if not healthy:
                unhealthy.append(base)
        return unhealthy

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> "RewardClient":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


@dataclass
class _Failure:
    """A try that failed in a way another try may not: what happened, what to check, and how long
    the server asked us to wait."""

    problem: str
    hint: str
    retry_after_s: float | None = None


# The monotonic time at which this thread's try must end; every socket operation is bounded by it.
_try_deadline = threading.local()


def _bounded(timeout: float | None, expired: type[Exception]) -> float | None:
    deadline = getattr(_try_deadline, "value", None)
    if deadline is None:
        return timeout
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the try's deadline has passed")
    return left if timeout is None else min(timeout, left)


class _DeadlineStream(httpcore.NetworkStream):
    """A socket whose every read and write ends by the try's deadline, so a server that trickles
    bytes cannot stretch a try, as httpx's per-read timeout alone would let it."""

    def __init__(self, stream: httpcore.NetworkStream):
        self._stream = stream

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._stream.read(max_bytes, _bounded(timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        for start in range(0, len(buffer), WRITE_CHUNK_BYTES):
            self._stream.write(buffer[start : start + WRITE_CHUNK_BYTES], _bounded(timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._stream.close()

    def start_tls(self, ssl_context, server_hostname: str | None = None, timeout: float | None = None):
        return _DeadlineStream(
            self._stream.start_tls(ssl_context, server_hostname, _bounded(timeout, httpcore.ConnectTimeout))
        )

    def get_extra_info(self, info: str):
        return self._stream.get_extra_info(info)


class _DeadlineBackend(httpcore.SyncBackend):
    def connect_tcp(self, host, port, timeout=None, local_address=None, socket_options=None):
        bounded = _bounded(timeout, httpcore.ConnectTimeout)
        return _DeadlineStream(super().connect_tcp(host, port, bounded, local_address, socket_options))


class _DeadlineTransport(httpx.HTTPTransport):
    """httpx's transport, with httpx's default limits, over ``_DeadlineBackend`` sockets."""

    def __init__(self):
        super().__init__()
        self._pool = httpcore.ConnectionPool(
            ssl_context=httpx.create_ssl_context(),
            max_connections=100,
            max_keepalive_connections=20,
            keepalive_expiry=5.0,
            network_backend=_DeadlineBackend(),
        )


def _base_url(url: str) -> str:
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"reward.url must start with http:// or https://; got {url!r}")
    url = url.rstrip("/")
    return url.removesuffix("/get_reward")


def _error_text(answer: httpx.Response) -> str:
    try:
        return str(answer.json()["error"])
    except (ValueError, KeyError, TypeError):
        return answer.text[:200]


def _retry_after_s(answer: httpx.Response) -> float | None:
    """The seconds form of ``Retry-After``; None when absent or an HTTP date."""
    try:
        seconds = float(answer.headers.get("retry-after", ""))
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and seconds >= 0 else None


def _refusal_message(base: str, answer: httpx.Response) -> str:
    message = f"reward server at {base} refused the request (HTTP {answer.status_code}: {_error_text(answer)})"
    if answer.status_code == 401:
        return f"{message}; give the token it was started with (reward.token)"
    if answer.status_code == 413:
        return f"{message}; lower reward.batch_size or raise the server's --max-body-bytes"
    return message


def _rewards_from(answer: httpx.Response, expected: int) -> list[float]:
    """The answer's rewards, or ValueError saying what is wrong with them: the answer must be a JSON
    object whose "rewards" is a list of ``expected`` finite JSON numbers (not strings, bools, null)."""
    try:
        body = answer.json()
    except ValueError:
        raise ValueError(f"answered with a body that is not JSON: {answer.text[:80]!r}") from None
    rewards = body.get("rewards") if isinstance(body, dict) else None
    if not isinstance(rewards, list):
        raise ValueError(f'answered without a "rewards" list (got {type(rewards).__name__})')
    if len(rewards) != expected:
        raise ValueError(f"returned {len(rewards)} rewards for {expected} texts")
    values = []
    for i, reward in enumerate(rewards):
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise ValueError(f"returned {type(reward).__name__} {reward!r} at index {i}, not a number")
        try:
            value = float(reward)
        except OverflowError:
            value = math.inf
        if not math.isfinite(value):
            raise ValueError(f"returned a non-finite reward at index {i}")
        values.append(value)
    return values
