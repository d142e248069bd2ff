"""What the reward tests share: the reward functions their servers load by import path
(``tests.reward.fixtures:NAME``), a way to run the server command, and a tiny reward model."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO_ROOT = Path(__file__).resolve().parents[2]
PAD = "[PAD]"


def count_letter_a(prompts: list[str], responses: list[str]) -> list[float]:
    """Reward = how many times "a" occurs in the response (the prompt does not count)."""
    return [float(response.count("a")) for response in responses]


def misbehave_on_command(prompts: list[str], responses: list[str]) -> list[float]:
    """count_letter_a, unless a response is a command: "raise" raises, "nan" gives a NaN reward,
    "drop" returns one reward too few, "sleep:S" sleeps S seconds first."""
    rewards = count_letter_a(prompts, responses)
    for i, response in enumerate(responses):
        if response == "raise":
            raise RuntimeError("the reward function was told to raise")
        if response == "nan":
            rewards[i] = float("nan")
        if response == "drop":
            rewards.pop()
        if response.startswith("sleep:"):
            time.sleep(float(response.removeprefix("sleep:")))
    return rewards


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerProcess:
    """``python -m metaapo_nemo.reward.server --port PORT *args``, its log in ``log_path``."""

    def __init__(self, log_path: Path, *args: str, port: int | None = None, env: dict | None = None):
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = log_path
        command = [sys.executable, "-m", "metaapo_nemo.reward.server", "--port", str(self.port), *args]
        inherited = {name: value for name, value in os.environ.items() if name != "METAAPO_REWARD_TOKEN"}
        full_env = {**inherited, "PYTHONPATH": str(REPO_ROOT), **(env or {})}
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=full_env, cwd=REPO_ROOT)

    def wait_healthy(self, timeout_s: float = 30.0) -> "ServerProcess":
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            assert self.process.poll() is None, f"server exited: {self.log()}"
            try:
                if httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.05)
        raise AssertionError(f"server not healthy in {timeout_s} s: {self.log()}")

    def log(self) -> str:
        return self.log_path.read_text()

    def count_in_log(self, text: str) -> int:
        return self.log().count(text)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()


def save_tiny_reward_model(folder: Path, pad_token_id: int | None = 0, num_labels: int = 1, seed: int = 0) -> None:
    """A random 2-layer LlamaForSequenceClassification and a character-level tokenizer whose id 0 is
    the pad token "[PAD]", saved as a Hugging Face folder."""
    import torch
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForSequenceClassification, PreTrainedTokenizerFast

    vocab = {PAD: 0, "[UNK]": 1, **{char: i + 2 for i, char in enumerate("abcdefghijklmnopqrstuvwxyz ?!.,:\n")}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, pad_token=PAD, unk_token="[UNK]").save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=pad_token_id,
    )  # fmt: skip
    torch.manual_seed(seed)
    model = LlamaForSequenceClassification(config)
    # The default head init (std 0.02) gives rewards near 0, too small for a parity test to see errors.
    torch.nn.init.normal_(model.score.weight, std=1.0)
    model.save_pretrained(folder)


def sleep_one_second(prompts: list[str], responses: list[str]) -> list[float]:
    """count_letter_a after 1 s, whatever the batch size: a model whose cost is per call."""
    time.sleep(1.0)
    return count_letter_a(prompts, responses)


def hang(prompts: list[str], responses: list[str]) -> list[float]:
    """Never answers (a wedged accelerator, a deadlock)."""
    time.sleep(1000)
    return count_letter_a(prompts, responses)


def wrong_types_on_command(prompts: list[str], responses: list[str]) -> object:
    """count_letter_a, unless the first response names a wrong answer: "str" -> ["1.5"], "bool" ->
    [True], "string" -> "123", "nan" -> [nan], "none" -> [None] (one per text)."""
    wrong = {"str": "1.5", "bool": True, "nan": float("nan"), "none": None}
    if responses and responses[0] == "string":
        return "123"
    if responses and responses[0] in wrong:
        return [wrong[responses[0]]] * len(responses)
    return count_letter_a(prompts, responses)


def count_letter_a_with_ledger(prompts: list[str], responses: list[str]) -> list[float]:
    """count_letter_a after 0.2 s; first appends "PID TEXTS" to the file $REWARD_LEDGER, so a test
    knows what a server that was killed had been given."""
    with open(os.environ["REWARD_LEDGER"], "a") as ledger:
        ledger.write(f"{os.getpid()} {len(responses)}\n")
    time.sleep(0.2)
    return count_letter_a(prompts, responses)


def slow_toy_reward(prompts: list[str], responses: list[str]) -> list[float]:
    """The embedded task's reward, 0.2 s per call: an annotation long enough to kill a server in."""
    from metaapo_nemo.data.toy_task import reward

    time.sleep(0.2)
    return reward(prompts, responses)
