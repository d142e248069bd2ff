"""Client of the reward-model HTTP server (one or several, by URL).

Every call is bounded: each try waits at most ``timeout_s``, a batch is tried at most
``1 + max_retries`` times with a capped backoff in between, and then a ``RewardServerError`` says
which server failed and what to change.
"""

import logging
import math
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import httpx

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 8.0


class RewardServerError(RuntimeError):
    """The reward server could not be reached, refused the request or answered nonsense."""


class RewardClient:
    """Scores (prompt, response) pairs with remote reward servers.

    Args:
        urls: one server or several; each is ``http(s)://host:port`` or that followed by
            ``/get_reward``. Batches go to the servers round-robin, several at once when there are
            several servers, and a failed try moves on to the next server.
        token: bearer token the servers were started with, if any.
        timeout_s: longest wait for one answer.
        max_retries: further tries of a batch after a connection error, timeout or HTTP 5xx
            (scoring is idempotent). HTTP 4xx is never retried: the request itself is wrong.
        batch_size: pairs per request.
        backoff_s: pause before the first retry; it doubles per retry, up to 8 s.
    """

    def __init__(
        self,
        urls: str | Sequence[str],
        token: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 3,
        batch_size: int = 256,
        backoff_s: float = 0.5,
    ):
        self.base_urls = [_base_url(url) for url in ([urls] if isinstance(urls, str) else urls)]
        if not self.base_urls:
            raise ValueError("reward.url is empty; give at least one reward server URL")
        if timeout_s <= 0 or max_retries < 0 or batch_size < 1 or backoff_s < 0:
            raise ValueError(
                "reward client settings out of range: need timeout_s > 0, max_retries >= 0, "
                f"batch_size >= 1, backoff_s >= 0; got {timeout_s}, {max_retries}, {batch_size}, {backoff_s}"
            )
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.batch_size = batch_size
        self.backoff_s = backoff_s
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # trust_env=False: a cluster's HTTP_PROXY must not capture traffic to an internal server.
        self._http = httpx.Client(headers=headers, timeout=timeout_s, trust_env=False)
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
        tries = self.max_retries + 1
        tried = []
        for attempt in range(tries):
            base = self.base_urls[(server + attempt) % len(self.base_urls)]
            tried.append(base)
            try:
                answer = self._http.post(f"{base}/get_reward", json=payload)
            except httpx.TimeoutException:
                problem = f"did not answer within {self.timeout_s:g} s"
                hint = "is it running, and is reward.timeout_s long enough for a batch?"
            except httpx.TransportError as err:
                problem = f"could not be reached ({type(err).__name__}: {err})"
                hint = "is it running? (reward.url)"
            else:
                if answer.status_code < 400:
                    return _rewards_from(base, answer, len(prompts))
                if answer.status_code < 500:
                    raise RewardServerError(_refusal_message(base, answer))
                problem = f"failed with HTTP {answer.status_code}: {_error_text(answer)}"
                hint = "see the reward server's log"
            if attempt + 1 < tries:
                pause = min(self.backoff_s * 2**attempt, MAX_BACKOFF_S)
                log.warning(
                    "reward server at %s %s; retrying in %.1f s (try %d of %d)",
                    base, problem, pause, attempt + 2, tries,
                )  # fmt: skip
                time.sleep(pause)
        servers = " and ".join(sorted(set(tried)))
        raise RewardServerError(f"reward server at {servers} {problem} ({tries} tries); {hint}")

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


def _refusal_message(base: str, answer: httpx.Response) -> str:
    message = f"reward server at {base} refused the request (HTTP {answer.status_code}: {_error_text(answer)})"
    if answer.status_code == 401:
        return f"{message}; give the token it was started with (reward.token)"
    if answer.status_code == 413:
        return f"{message}; lower reward.batch_size or raise the server's --max-body-bytes"
    return message


def _rewards_from(base: str, answer: httpx.Response, expected: int) -> list[float]:
    try:
        rewards = answer.json()["rewards"]
        values = [float(reward) for reward in rewards]
    except (ValueError, KeyError, TypeError) as err:
        raise RewardServerError(
            f'reward server at {base} answered without a "rewards" list of numbers ({err}); '
            "is reward.url a metaapo or OpenRLHF reward server?"
        ) from err
    if len(values) != expected:
        raise RewardServerError(f"reward server at {base} returned {len(values)} rewards for {expected} texts")
    bad = [i for i, value in enumerate(values) if not math.isfinite(value)]
    if bad:
        raise RewardServerError(f"reward server at {base} returned a non-finite reward at index {bad[0]}")
    return values
