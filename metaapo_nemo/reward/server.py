"""The reward-model HTTP server: ``metaapo serve-reward`` (or ``python -m metaapo_nemo.reward.server``).

Protocol (compatible with OpenRLHF's remote reward model, see docs/CONTRACTS.md):
``POST /get_reward`` ``{"query": [full text], "prompts": [prompt]?, "labels": [...]?}`` ->
``{"rewards": [float], "scores": [float]}``; ``GET /health`` -> ``{"status": "ok"}``.
A bad request gets a 4xx answer with ``{"error": ...}``; a failing reward model gets a 500; neither
stops the server.
"""

import argparse
import hmac
import json
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from metaapo_nemo.reward.models import HFRewardModel, RewardFn, load_reward_fn

log = logging.getLogger("metaapo_nemo.reward.server")

DEFAULT_MAX_BODY_BYTES = 16 * 1024 * 1024
TOKEN_ENV = "METAAPO_REWARD_TOKEN"


class BadRequest(ValueError):
    """The request cannot be scored; the message tells the caller what is wrong."""


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


def checked_rewards(rewards: Sequence[float], expected: int) -> list[float]:
    """The reward model's answer as finite floats, or ValueError saying how it misbehaved."""
    values = [float(reward) for reward in rewards]
    if len(values) != expected:
        raise ValueError(f"the reward model returned {len(values)} rewards for {expected} texts")
    for i, value in enumerate(values):
        if not math.isfinite(value):
            raise ValueError(f"the reward model returned a non-finite reward ({value}) at index {i}")
    return values


def create_app(
    reward: RewardFn, token: str | None = None, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The FastAPI application serving ``reward``; requests are scored one at a time."""
    app = FastAPI(title="metaapo reward server", docs_url=None, redoc_url=None, openapi_url=None)
    # Reward functions and models need not be thread-safe, and one forward at a time is fastest on
    # one accelerator anyway; the event loop stays free for /health while a batch is scored.
    reward_lock = threading.Lock()
    expected_authorization = f"Bearer {token}".encode() if token else None

    def score(prompts: list[str], responses: list[str]) -> list[float]:
        with reward_lock:
            return checked_rewards(reward(prompts, responses), len(prompts))

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.post("/get_reward")
    async def get_reward(request: Request) -> JSONResponse:
        started = time.perf_counter()
        if expected_authorization is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected_authorization):
                return _refuse(401, "missing or wrong bearer token (Authorization: Bearer TOKEN)")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return _refuse(413, f"the body has {declared} bytes; this server takes at most {max_body_bytes}")
        body = bytearray()
        # Counting what arrives catches bodies sent without (or with a wrong) Content-Length.
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body_bytes:
                return _refuse(413, f"the body exceeds this server's limit of {max_body_bytes} bytes")
        try:
            prompts, responses = parse_reward_request(json.loads(body.decode("utf-8")))
        except json.JSONDecodeError as err:
            return _refuse(400, f"the body is not valid JSON: {err}")
        except RecursionError:
            return _refuse(400, "the body nests JSON too deeply")
        except UnicodeDecodeError as err:
            return _refuse(400, f"the body is not UTF-8 text: {err}")
        except BadRequest as err:
            return _refuse(400, str(err))
        try:
            rewards = await run_in_threadpool(score, prompts, responses) if prompts else []
        except Exception as err:
            log.exception("reward model failed on %d texts", len(prompts))
            return JSONResponse(
                {"error": f"the reward model failed: {type(err).__name__}: {err}"}, status_code=500
            )
        log.info("scored %d texts in %.3f s", len(rewards), time.perf_counter() - started)
        return JSONResponse({"rewards": rewards, "scores": rewards})

    return app


def _refuse(status: int, message: str) -> JSONResponse:
    log.info("refused a request (HTTP %d): %s", status, message)
    return JSONResponse({"error": message}, status_code=status)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``serve-reward`` options."""
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port to listen on (default: 5000)")
    parser.add_argument(
        "--token",
        default=os.environ.get(TOKEN_ENV),
        help=f"require 'Authorization: Bearer TOKEN' on /get_reward (default: ${TOKEN_ENV}, which "
        "keeps the token out of the process list)",
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
        "--parent-pid",
        type=int,
        help="stop when this process's parent, which has this id, ends (set by the training job that "
        "starts this server, so it never outlives the job)",
    )


def run_from_args(args: argparse.Namespace) -> int:
    """Load the reward model and serve it until interrupted; returns the exit status."""
    import uvicorn

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s reward-server %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False
    try:
        _check_args(args)
        if args.reward_fn:
            reward, source = load_reward_fn(args.reward_fn), f"function {args.reward_fn}"
        else:
            from transformers.utils import logging as transformers_logging

            transformers_logging.disable_progress_bar()  # its bars would clutter the log file
            reward, source = HFRewardModel(args.model, batch_size=args.batch_size), f"model {args.model}"
    except (ValueError, OSError) as err:
        log.error("%s", err)
        return 2
    if args.parent_pid is not None:
        threading.Thread(target=_stop_when_parent_ends, args=(args.parent_pid,), daemon=True).start()
    app = create_app(reward, token=args.token, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning", access_log=False)
    log.info("serving the reward %s on http://%s:%d", source, args.host, args.port)
    uvicorn.Server(config).run()
    return 0


def _check_args(args: argparse.Namespace) -> None:
    if args.token == "":
        raise ValueError(f"the token (--token or ${TOKEN_ENV}) is empty; give a token or leave it out")
    if args.max_body_bytes < 1:
        raise ValueError(f"--max-body-bytes must be positive; got {args.max_body_bytes}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be positive; got {args.batch_size}")
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
