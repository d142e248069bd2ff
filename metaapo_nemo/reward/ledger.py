"""The rewards a run has paid for, kept on disk so that no (prompt, response) is sent to the reward
model twice: not after a kill, not after a resume, not when two of a prompt's K samples coincide.

``output_dir/rewards/rank_R.jsonl`` holds one line per scored text, ``{"key": KEY, "reward": R}``,
KEY the SHA-256 of the reward model's identity, the prompt and the response. Each rank appends to
its own file and fsyncs after every request, so a reward that came back is on disk before the run
goes on; at start every rank reads every rank's file (a resume may use another number of ranks).
A last line cut by a kill is ignored: that request is paid again, the one thing the ledger cannot
save.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from metaapo_nemo.reward.client import RewardClient


class RewardLedger:
    def __init__(self, folder: str | Path, rank: int, client: RewardClient, identity: str):
        self.folder, self.client, self.identity = Path(folder), client, identity
        self.folder.mkdir(parents=True, exist_ok=True)
        self.known: dict[str, float] = {}
        for path in sorted(self.folder.glob("rank_*.jsonl")):
            for line in path.read_text(errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    self.known[entry["key"]] = float(entry["reward"])
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut by a kill
        self._file = open(self.folder / f"rank_{rank}.jsonl", "a")
        self.sent = 0  # texts sent to the reward model by this process
        self.reused = 0  # texts answered from the ledger

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        """The reward of each response to its prompt; only texts never paid for reach the server."""
        keys = [self._key(p, r) for p, r in zip(prompts, responses)]
        todo = {}
        for i, key in enumerate(keys):
            if key not in self.known and key not in todo:
                todo[key] = i
        self.reused += len(keys) - len(todo)
        # A request per client batch (times servers, which it scores in parallel): each is on disk
        # before the next is sent, so a kill loses at most the requests in flight.
        order = list(todo.items())
        chunk = self.client.batch_size * len(self.client.base_urls)
        for start in range(0, len(order), chunk):
            part = order[start:start + chunk]
            rewards = self.client.score([prompts[i] for _, i in part], [responses[i] for _, i in part])
            self._file.write("".join(json.dumps({"key": key, "reward": r}) + "\n" for (key, _), r in zip(part, rewards)))
            self._file.flush()
            os.fsync(self._file.fileno())
            self.known.update((key, r) for (key, _), r in zip(part, rewards))
            self.sent += len(part)
        return [self.known[k] for k in keys]

    def _key(self, prompt: str, response: str) -> str:
        text = "\0".join((self.identity, prompt, response)).encode("utf-8", "surrogatepass")
        return hashlib.sha256(text).hexdigest()

    def close(self) -> None:
        self._file.close()
