"""Load on the reward server: many concurrent clients on loopback, with dynamic batching and without.

    python benchmarks/reward_load.py [--clients 32] [--requests 50] [--texts 8]
                                     [--call-s 0.01] [--text-s 0.0001]

Starts a real ``metaapo serve-reward`` process whose reward function stands for a model on an
accelerator: each call sleeps ``call_s + text_s * texts`` (a fixed cost per forward plus a cost per
text) and then counts the letter "a". ``--clients`` threads, each with its own RewardClient, send
``--requests`` requests of ``--texts`` texts one after another. Measured twice: with the server's
default batching, and with ``--max-batch-texts`` equal to one request's texts (one call per
request). Prints throughput, latency percentiles and, from /metrics, the calls and mean texts per
call; checks every request got its own rewards and every text was computed exactly once
(``metaapo_reward_texts_scored_total`` == texts sent). The last line is JSON with those numbers.
"""

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from metaapo_nemo.reward.client import RewardClient  # noqa: E402
from metaapo_nemo.reward.server import parse_metrics  # noqa: E402


def simulated_model(prompts: list[str], responses: list[str]) -> list[float]:
    """The benchmark's reward function (loaded by the server as ``reward_load:simulated_model``)."""
    time.sleep(float(os.environ["BENCH_CALL_S"]) + float(os.environ["BENCH_TEXT_S"]) * len(responses))
    return [float(response.count("a")) for response in responses]


def start_server(folder: str, server_args: list[str], call_s: float, text_s: float) -> tuple[subprocess.Popen, str]:
    port_file = os.path.join(folder, "port.json")
    env = {
        **os.environ, "BENCH_CALL_S": str(call_s), "BENCH_TEXT_S": str(text_s),
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "benchmarks")]),
    }  # fmt: skip
    env.pop("METAAPO_REWARD_TOKEN", None)
    command = [
        sys.executable, "-m", "metaapo_nemo.reward.server", "--port", "0", "--port-file", port_file,
        "--reward-fn", "reward_load:simulated_model", *server_args,
    ]  # fmt: skip
    log = open(os.path.join(folder, "server.log"), "wb")
    process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 60
    while not os.path.exists(port_file):
        if process.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"the reward server did not start; see {log.name}")
        time.sleep(0.05)
    with open(port_file) as f:
        url = f"http://127.0.0.1:{json.load(f)['port']}"
    with RewardClient(url) as client:
        client.wait_until_healthy(60)
    return process, url


def run_load(url: str, clients: int, requests: int, texts: int) -> dict:
    latencies, wrong = [], []
    lock = threading.Lock()

    def one_client(n: int) -> None:
        mine = []
        with RewardClient(url, batch_size=texts, timeout_s=60) as client:
            for r in range(requests):
                # Each text's reward (its count of "a") names its client, request and place.
                responses = ["a" * ((n * requests + r) * texts + i) for i in range(texts)]
                started = time.perf_counter()
                rewards = client.score(["p"] * texts, responses)
                mine.append(time.perf_counter() - started)
                if rewards != [float(len(response)) for response in responses]:
                    wrong.append((n, r))
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=one_client, args=(n,)) for n in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    seconds = time.perf_counter() - started
    counts = parse_metrics(httpx.get(f"{url}/metrics", timeout=10).text)
    sent = clients * requests * texts
    latencies.sort()
    return {
        "seconds": round(seconds, 3),
        "texts_per_s": round(sent / seconds, 1),
        "requests_per_s": round(clients * requests / seconds, 1),
        "p50_ms": round(1000 * statistics.median(latencies), 2),
        "p99_ms": round(1000 * latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))], 2),
        "batches": int(counts["metaapo_reward_batches_total"]),
        "mean_batch_texts": round(
            counts["metaapo_reward_batch_texts_sum"] / counts["metaapo_reward_batch_texts_count"], 1
        ),
        "texts_sent": sent,
        "texts_scored": int(counts["metaapo_reward_texts_scored_total"]),
        "requests_ok": int(counts['metaapo_reward_requests_total{outcome="ok"}']),
        "wrong_answers": len(wrong),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--requests", type=int, default=50, help="requests per client")
    parser.add_argument("--texts", type=int, default=8, help="texts per request")
    parser.add_argument("--call-s", type=float, default=0.01, help="simulated cost of one reward call (a forward pass)")
    parser.add_argument("--text-s", type=float, default=0.0001, help="simulated cost per text in a call")
    args = parser.parse_args()
    settings = {"batched": [], "unbatched": ["--max-batch-texts", str(args.texts)]}
    results = {}
    for name, server_args in settings.items():
        with tempfile.TemporaryDirectory(prefix="reward-load-") as folder:
            process, url = start_server(folder, server_args, args.call_s, args.text_s)
            try:
                results[name] = result = run_load(url, args.clients, args.requests, args.texts)
            finally:
                process.send_signal(signal.SIGTERM)
                process.wait(timeout=30)
        print(
            f"{name:9s} {result['texts_per_s']:9.1f} texts/s {result['requests_per_s']:8.1f} requests/s  "
            f"p50 {result['p50_ms']:7.2f} ms  p99 {result['p99_ms']:7.2f} ms  {result['batches']} calls of "
            f"{result['mean_batch_texts']} texts on average  ({result['texts_scored']} texts scored of "
            f"{result['texts_sent']} sent)"
        )
    requests = args.clients * args.requests
    exact = all(
        r["texts_scored"] == r["texts_sent"] and r["requests_ok"] == requests and not r["wrong_answers"]
        for r in results.values()
    )
    speedup = round(results["batched"]["texts_per_s"] / results["unbatched"]["texts_per_s"], 2)
    print(f"dynamic batching: {speedup}x the throughput; every request answered exactly once: {exact}")
    print(json.dumps({**results, "speedup": speedup, "exact": exact, "settings": vars(args)}))
    return 0 if exact else 1


if __name__ == "__main__":
    sys.exit(main())
