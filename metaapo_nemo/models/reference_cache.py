"""The frozen reference's log-probs of every offline pair, computed once per (reference, data) and
cached on disk: every iteration, every resumed run and every ablation run on the same data and
reference reads them instead of running the reference forward again.

A cache entry is `<cache_dir>/<key>.safetensors`: float32 `chosen`, `rejected` (log pi_ref(y|x),
summed over the response) and int64 `chosen_tokens`, `rejected_tokens` (response tokens), one row
per pair in data order, exactly what `reference.score` returned; its safetensors metadata holds
the key and a SHA-256 of the four tensors, which a reader checks. `<key>.json` beside it says what
the key was made of and how the entry was computed, for whoever looks at the folder.

The key is a SHA-256 of: the reference checkpoint's content (config.json and its weight files,
names and bytes, not the folder's path or the files' dates: the same weights copied elsewhere
share the entry), the token ids of every pair (prompt, chosen, rejected, in order: the
policy.max_length truncation, the tokenizer and the chat template are all in them), the precision
the reference computes in, and FORMAT. Not the run's output_dir, seed, algorithm or parallel
layout, so that ablations and resumed runs share it; another layout or device gives the same
numbers up to rounding, and reads the entry written under the first one (`<key>.json` names it).

Cost, once per run, on rank 0 only. The content hash reads every weight byte: the tiny_cpu
reference (3 MB) takes 8-13 ms here; SHA-256 runs at ~1.1 GB/s per core on this machine and each
file is hashed on its own thread, so an 8B reference (16 GB of bf16 in 4 safetensors shards) costs
~4-15 s, or what reading 16 GB takes from its filesystem if that is slower. The token hash takes
~60 ns per token id (40 ms for tiny_cpu's 1536 pairs; ~10 s for 60k pairs of ~1k-token prompts and
responses). Reading an entry is milliseconds. Against that, the reference forward it saves: 1.9 s
for tiny_cpu's 1536 pairs (3072 sequences) on one CPU thread; at 8B, a forward pass over every
offline pair, minutes to hours.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from array import array
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from metaapo_nemo.distributed import all_gather_objects, data_parallel_size, is_rank0, world_size

# Bump when the entry's content changes meaning, or reference.score starts computing other numbers
# (not rounding): older entries then miss instead of answering with stale values.
FORMAT = 1
TENSORS = ("chosen", "rejected", "chosen_tokens", "rejected_tokens")
WEIGHT_FILES = ("config.json", "*.safetensors", "model.safetensors.index.json", "pytorch_model.bin")

Pair = tuple[Sequence[int], Sequence[int], Sequence[int]]  # (prompt ids, chosen ids, rejected ids)


@dataclass
class ReferenceLogps:
    """The reference's log-probs and response token counts of every offline pair, [N] each, in data order."""
    chosen: torch.Tensor
    rejected: torch.Tensor
    chosen_tokens: torch.Tensor
    rejected_tokens: torch.Tensor
    path: Path  # the cache entry
    read: bool  # True: read from the entry; False: computed now
    written: bool = False  # computed now and written to the entry
    warning: str | None = None  # a damaged entry recomputed, or one that could not be written

    def rows(self, idx: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """(log-probs, token counts) of pairs idx, as reference.score gives them for
        [(x, y_w) of idx] + [(x, y_l) of idx]."""
        idx = torch.as_tensor(list(idx), dtype=torch.long)
        return (torch.cat([self.chosen[idx], self.rejected[idx]]),
                torch.cat([self.chosen_tokens[idx], self.rejected_tokens[idx]]))


def checkpoint_fingerprint(folder: str | os.PathLike | None) -> str | None:
    """SHA-256 over a Hugging Face checkpoint folder's config.json and weight files (names, sizes and
    bytes, in sorted order; each file hashed on its own thread), or None when there is no folder
    with weights to fingerprint."""
    if folder is None or not Path(folder).is_dir():
        return None
    folder = Path(folder)
    files = sorted({p for pattern in WEIGHT_FILES for p in folder.glob(pattern) if p.is_file()})
    if not any(p.name != "config.json" for p in files):
        return None

    def digest(path: Path) -> str:
        with open(path, "rb") as f:
            return hashlib.file_digest(f, "sha256").hexdigest()

    with ThreadPoolExecutor(max_workers=min(8, len(files))) as pool:  # hashlib lets go of the GIL
        digests = list(pool.map(digest, files))
    total = hashlib.sha256()
    for path, hexdigest in zip(files, digests):
        total.update(f"{path.name}\0{path.stat().st_size}\0{hexdigest}\n".encode())
    return total.hexdigest()


def pairs_fingerprint(pairs: Sequence[Pair]) -> str:
    """SHA-256 over the token ids of every pair, in order (each list's length, then its ids)."""
    h = hashlib.sha256()
    for pair in pairs:
        for ids in pair:
            h.update(len(ids).to_bytes(8, "little"))
            h.update(array("q", ids).tobytes())
    return h.hexdigest()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def offline_reference_logps(reference, checkpoint: str | os.PathLike | None, pairs: Sequence[Pair],
                            cache_dir: str | os.PathLike, precision: str,
                            log: Callable[[str], None] = lambda message: None) -> ReferenceLogps | None:
    """The reference's log-probs of every pair: read from `cache_dir` when an entry with this key is
    there and sound, else computed with one `reference.score` call over all pairs (chosen..., then
    rejected...) and written there. None when `checkpoint` has no folder of weights to key by (the
    caller then scores as it did without a cache). A damaged entry (unreadable, cut short, another
    key, wrong shapes, checksum off) is recomputed and overwritten, with a warning in the result and
    in `log`; a cache that cannot be written leaves the values computed, with a warning.

    Collective: every rank calls it with the same arguments. Rank 0 alone hashes, reads and writes;
    what it found goes to every rank (all_gather_objects over WORLD, so the filesystem need not be
    shared); then either every rank has the values, or every rank calls reference.score together."""
    found = _look_up(checkpoint, pairs, cache_dir, precision) if is_rank0() else None
    found = all_gather_objects(found)[0]  # rank 0's look-up, on every rank
    if found is None:
        return None
    path, parts, tensors, warning = Path(found["path"]), found["parts"], found["tensors"], found["damage"]
    if tensors is not None:
        return ReferenceLogps(**tensors, path=path, read=True)
    if warning:
        log(f"[yellow]warning: {warning}[/yellow]")
    started = time.perf_counter()
    logps, ntoks = reference.score([(p[0], p[1]) for p in pairs] + [(p[0], p[2]) for p in pairs])
    n = len(pairs)
    tensors = dict(chosen=logps[:n].contiguous(), rejected=logps[n:].contiguous(),
                   chosen_tokens=ntoks[:n].contiguous(), rejected_tokens=ntoks[n:].contiguous())
    written = False
    if is_rank0():
        about = {"reference": str(checkpoint), "pairs": n, "seconds": round(time.perf_counter() - started, 3),
                 "ranks": world_size(), "data_parallel": data_parallel_size(),
                 "device": next(reference.model.parameters()).device.type, "torch": torch.__version__,
                 "written": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            _write_entry(path, parts, tensors, about)
            written = True
        except OSError as err:
            unwritten = f"could not write the reference log-prob cache {path} ({err}); went on without it"
            log(f"[yellow]warning: {unwritten}[/yellow]")
            warning = unwritten if warning is None else f"{warning}; {unwritten}"
    written, warning = all_gather_objects((written, warning))[0]  # every rank's result says what rank 0 did
    return ReferenceLogps(**tensors, path=path, read=False, written=written, warning=warning)


def _look_up(checkpoint, pairs, cache_dir, precision) -> dict | None:
    """Rank 0: the entry's path and key parts, its tensors when it is sound, and what is wrong with it
    when it is there but damaged; None when the checkpoint has no folder to fingerprint."""
    reference = checkpoint_fingerprint(checkpoint)
    if reference is None:
        return None
    parts = {"format": FORMAT, "reference": reference, "pairs": len(pairs), "tokens": pairs_fingerprint(pairs),
             "precision": precision}
    key = cache_key(parts)
    path = Path(os.path.expanduser(cache_dir)) / f"{key}.safetensors"
    tensors = damage = None
    if path.exists():
        try:
            tensors = _read_entry(path, key, len(pairs))
        except Exception as err:  # noqa: BLE001 - whatever a damaged file raises: safetensors', OS, JSON
            damage = f"the reference log-prob cache {path} is damaged ({_one_line(err)}); recomputing it"
    return {"path": str(path), "parts": parts, "tensors": tensors, "damage": damage}


def _read_entry(path: Path, key: str, n: int) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        names = set(f.keys())
        if names != set(TENSORS):
            raise ValueError(f"holds tensors {sorted(names)}, not {list(TENSORS)}")
        tensors = {name: f.get_tensor(name) for name in TENSORS}
    if meta.get("key") != key:
        raise ValueError(f"its key is {meta.get('key')!r}, not {key!r}")
    for name, t in tensors.items():
        dtype = torch.float32 if name in ("chosen", "rejected") else torch.int64
        if t.shape != (n,) or t.dtype != dtype:
            raise ValueError(f"{name} is {tuple(t.shape)} {t.dtype}, not ({n},) {dtype}")
    if meta.get("sha256") != _tensors_digest(tensors):
        raise ValueError("its tensors do not match their checksum")
    return tensors


def _write_entry(path: Path, parts: dict, tensors: dict[str, torch.Tensor], about: dict) -> None:
    """`<key>.safetensors`, then `<key>.json`, each written under a temporary name in the same folder,
    fsynced and renamed: a kill leaves the old entry or the new one, never a part of one (and two
    runs writing the same entry at once leave one of theirs)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    key = path.name.removesuffix(".safetensors")
    meta = {"key": key, "sha256": _tensors_digest(tensors), "parts": json.dumps(parts, sort_keys=True)}
    _replace(path, lambda tmp: save_file(tensors, tmp, metadata=meta))
    text = json.dumps({"key": key, "key_parts": parts, "about": about}, indent=1) + "\n"
    _replace(path.with_suffix(".json"), lambda tmp: Path(tmp).write_text(text))


def _replace(path: Path, write: Callable[[str], None]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    folder = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(folder)
    finally:
        os.close(folder)


def _tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in TENSORS:
        h.update(tensors[name].contiguous().numpy().tobytes())
    return h.hexdigest()


def _one_line(err: BaseException) -> str:
    return " ".join(f"{type(err).__name__}: {err}".split())
