"""Build the embedded toy task's world (recipe tiny_cpu): tokenizer, SFT model, offline pairs,
DPO warm-up and held-out prompts, cached on disk so a second run starts at once.

Algorithm 1's starting point, in miniature: the SFT model is the reference; the policy is a DPO
warm-up of the SFT model on the offline pairs.

Cache layout under ``task.cache_dir``: ``tiny_cpu-sft-<key>/sft`` holds the SFT model, keyed by
only what it depends on (``SFT_KEYS``, ``LATER_KEYS`` and the seed), so a grid over the offline
knobs trains it once; ``tiny_cpu-<key>/`` (every task key and the seed) holds ``warmup/``, ``train.jsonl``,
``eval.jsonl`` and ``task_stats.json``; with ``task.reward=trained``, ``tiny_cpu-rm-<key>/`` (the
task's key and the reward model's settings) holds ``reward_model/`` (with its ``reward_summary.json``)
and ``train_reward.log``. Each folder is built under ``<name>.tmp`` and renamed into
place with a ``DONE`` marker, so a crash never leaves a half-built folder that looks finished.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from metaapo_nemo import stopping
from metaapo_nemo.algorithm.objectives import Objective, PairLogps
from metaapo_nemo.config import EMBEDDED_REWARD_FN, EmbeddedTaskConfig
from metaapo_nemo.data import toy_task
from metaapo_nemo.data.batching import collate, encode_prompt, encode_response
from metaapo_nemo.distributed import barrier, is_rank0
from metaapo_nemo.metrics import Console
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.hf_convert import load_hf_checkpoint, save_hf_checkpoint
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
from metaapo_nemo.reward.train import SUMMARY_FILE
from metaapo_nemo.rollout.engine import SamplingParams
from metaapo_nemo.rollout.torch_engine import TorchEngine

REWARD_FN = EMBEDDED_REWARD_FN


@dataclass
class EmbeddedTask:
    sft_dir: str  # the SFT model (reference), a Hugging Face checkpoint with the tokenizer
    policy_dir: str  # the DPO warm-up of the SFT model (Algorithm 1's starting policy)
    train: str  # offline preference pairs, JSON Lines
    eval: str  # held-out prompts, JSON Lines
    reward_fn: str = REWARD_FN  # the programmatic reward
    reward_model_dir: str | None = None  # with task.reward=trained: the reward model trained on `train`


CACHE_VERSION = 3
# The task keys the SFT model depends on; the train and eval sizes count because the SFT prompts
# are drawn disjoint from those prompts.
SFT_KEYS = ("num_train_pairs", "num_eval_prompts", "sft_examples", "sft_steps", "sft_batch_size", "sft_lr",
            "hidden_size", "num_layers", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
# Task keys added after CACHE_VERSION 3 (the SFT model depends on each): they enter the cache keys
# only away from their defaults, so the caches of the tasks before them stay valid.
LATER_KEYS = ("min_letters", "max_letters")
# Who annotates: no file of the task depends on it, so these keys enter only the reward model's key.
REWARD_KEYS = ("reward", "reward_epochs", "reward_lr")
# The reward model's settings besides task.reward_epochs and task.reward_lr: train-reward's defaults.
REWARD_BATCH_SIZE, REWARD_EVAL_FRACTION = 8, 0.1
# task_stats.json: the policies' own samples on the first STATS_PROMPTS training prompts, at the
# recipe's sampling settings (temperature 1, up to 24 new tokens, more for longer answers); ~1 s on a CPU core.
STATS_PROMPTS, STATS_SAMPLES, STATS_MAX_NEW_TOKENS = 128, 4, 24
# What torchrun tells its ranks; the reward model's training process is not one of them.
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK",
                "ROLE_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps({**fields, "version": CACHE_VERSION}, sort_keys=True).encode()).hexdigest()[:12]


def task_keys(task: EmbeddedTaskConfig, seed: int) -> tuple[str, str]:
    """(the SFT model's cache key, the task's cache key) of a task and seed."""
    defaults = {f.name: f.default for f in fields(EmbeddedTaskConfig) if f.name in LATER_KEYS}
    later = {k: getattr(task, k) for k in LATER_KEYS if getattr(task, k) != defaults[k]}
    task_fields = {k: v for k, v in asdict(task).items() if k not in LATER_KEYS + REWARD_KEYS}
    return (cache_key({**{k: getattr(task, k) for k in SFT_KEYS}, **later, "seed": seed}),
            cache_key({**task_fields, **later, "seed": seed}))


def prepare_embedded_task(task: EmbeddedTaskConfig, seed: int, console: Console) -> EmbeddedTask:
    cache = Path(os.path.expanduser(task.cache_dir))
    sft_key, key = task_keys(task, seed)
    sft_root, root = cache / f"tiny_cpu-sft-{sft_key}", cache / f"tiny_cpu-{key}"
    built = EmbeddedTask(str(sft_root / "sft"), str(root / "warmup"), str(root / "train.jsonl"), str(root / "eval.jsonl"))
    barrier()  # every rank sees the same cache state
    if (root / "DONE").exists() and (sft_root / "DONE").exists():
        console.log(f"embedded task: cached at {root}")
        _log_stats(console, json.loads((root / "task_stats.json").read_text()))
    else:
        _build_task(task, seed, sft_root, root, console)
    if task.reward == "trained":
        rm_root = cache / f"tiny_cpu-rm-{reward_model_key(task, key)}"
        built.reward_model_dir = str(_reward_model(built, task, seed, rm_root, console))
    return built


def reward_model_key(task: EmbeddedTaskConfig, task_key: str) -> str:
    """The cache key of the reward model trained on the task of ``task_key`` (which holds the seed)."""
    return cache_key({"task": task_key, "epochs": task.reward_epochs, "lr": task.reward_lr,
                      "batch_size": REWARD_BATCH_SIZE, "eval_fraction": REWARD_EVAL_FRACTION})


def _build_task(task, seed, sft_root, root, console) -> None:
    """Build the task's folder ``root`` (and the SFT model's, ``sft_root``, unless cached)."""
    # Every rank trains (SFT and warm-up are data-parallel like the rest); rank 0 writes the files.
    started = time.perf_counter()
    console.log(f"embedded task: building offline pairs, DPO warm-up and task stats in {root}")
    tokenizer = toy_task.build_tokenizer()
    letters = dict(min_letters=task.min_letters, max_letters=task.max_letters)
    train_prompts = toy_task.make_prompts(task.num_train_pairs, seed, **letters)
    eval_prompts = toy_task.make_prompts(task.num_eval_prompts, seed + 1, exclude=set(train_prompts), **letters)
    sft_prompts = toy_task.make_prompts(task.sft_examples, seed + 2, exclude=set(train_prompts) | set(eval_prompts),
                                        **letters)
    pairs = toy_task.offline_pairs(train_prompts, seed + 3, correct=task.offline_correct,
                                   informative=task.offline_informative, shift=task.offline_shift)
    # Rows past the tokenizer's length are never used; rounding up lets tensor parallelism split the vocabulary.
    cfg = ModelConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=task.hidden_size, num_layers=task.num_layers,
                      num_attention_heads=task.num_attention_heads, num_query_groups=task.num_query_groups,
                      ffn_hidden_size=task.ffn_hidden_size, max_position_embeddings=task.max_position_embeddings)
    sft_weights = _sft_model(task, cfg, tokenizer, sft_prompts, seed, sft_root, console)

    tmp = _start_building(root)
    if is_rank0():
        _write_jsonl(tmp / "train.jsonl", [{"prompt_id": str(i), **p} for i, p in enumerate(pairs)])
        _write_jsonl(tmp / "eval.jsonl", [{"prompt": p} for p in eval_prompts])
    warmed = _dpo_warmup(task, cfg, sft_weights, tokenizer, pairs, seed, console)
    warm_weights = warmed.hf_state_dict()
    stats = _task_stats(pairs[:STATS_PROMPTS], cfg, tokenizer, sft_weights, warmed, warm_weights, seed,
                        max_new_tokens=max(STATS_MAX_NEW_TOKENS, task.max_letters + 16))
    stats.update(pair_stats(pairs))
    _log_stats(console, stats)
    if is_rank0():
        save_hf_checkpoint(tmp / "warmup", cfg, warm_weights, tokenizer)
        (tmp / "task_stats.json").write_text(json.dumps(stats, indent=1, sort_keys=True) + "\n")
        _finish_building(tmp, root, started)
    barrier()
    console.log(f"embedded task: built in {time.perf_counter() - started:.1f} s")


def _reward_model(built: EmbeddedTask, task, seed, rm_root: Path, console) -> Path:
    """The Bradley-Terry reward model trained from the SFT model on the offline pairs (a share
    held out): from ``rm_root`` when cached, else trained there by rank 0 while the others wait.

    `metaapo train-reward` runs as a process of its own: it holds the whole model in one process
    (TP = PP = 1) whatever this job's layout, and its random draws leave the run's untouched, so a
    run on a cached reward model is the run that trained it."""
    if not (rm_root / "DONE").exists():
        started = time.perf_counter()
        tmp = _start_building(rm_root)
        if is_rank0():
            console.log(f"embedded task: training a reward model ({task.reward_epochs} epochs, lr {task.reward_lr:g}) "
                        f"in {rm_root}")
            command = [sys.executable, "-m", "metaapo_nemo", "train-reward", "--init", built.sft_dir,
                       "--data", built.train, "--out", str(tmp / "reward_model"), "--epochs", str(task.reward_epochs),
                       "--lr", repr(task.reward_lr), "--batch-size", str(REWARD_BATCH_SIZE),
                       "--eval-fraction", repr(REWARD_EVAL_FRACTION), "--seed", str(seed)]
            # Not one of this job's ranks (train-reward refuses to run under torchrun); one thread,
            # so that the model is the same on every machine (and a 0.7M-parameter model needs no more).
            env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_ENV}
            package_root = str(Path(__file__).resolve().parents[2])
            env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(p for p in (package_root, env.get("PYTHONPATH")) if p))
            with open(tmp / "train_reward.log", "w") as log:
                done = subprocess.run(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env)
            if done.returncode != 0:
                tail = (tmp / "train_reward.log").read_text(errors="replace")[-3000:]
                raise RuntimeError(f"training the embedded task's reward model failed (status {done.returncode}); "
                                   f"the end of {tmp / 'train_reward.log'}:\n{tail}")
            _finish_building(tmp, rm_root, started)
        barrier()
    summary = json.loads((rm_root / "reward_model" / SUMMARY_FILE).read_text())
    console.log(f"embedded task: reward model {rm_root / 'reward_model'}: held-out pair accuracy "
                f"{summary['accuracy']:.3f} ({summary['eval_pairs']} pairs; {summary['train_pairs']} trained on)")
    return rm_root / "reward_model"


def _sft_model(task, cfg, tokenizer, sft_prompts, seed, sft_root, console) -> dict[str, torch.Tensor]:
    """The SFT model's weights (Hugging Face names): from ``sft_root`` when cached, else trained on
    the demonstrator's responses and written there."""
    if (sft_root / "DONE").exists():
        console.log(f"embedded task: SFT model cached at {sft_root}")
        return load_hf_checkpoint(sft_root / "sft")[1]
    started = time.perf_counter()
    tmp = _start_building(sft_root)
    torch.manual_seed(seed)
    policy = MegatronPolicy(cfg, None, pad_id=tokenizer.pad_token_id, optim=OptimConfig(
        lr=task.sft_lr, weight_decay=0.01, clip_grad=1.0, warmup_steps=max(1, task.sft_steps // 20),
        total_steps=task.sft_steps, min_lr_ratio=0.1))
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.log(f"embedded task: SFT of a {n_params / 1e6:.2f}M-parameter Llama (megatron-core) for "
                f"{task.sft_steps} steps in {sft_root}")
    demos = toy_task.sft_responses(sft_prompts, seed + 4)
    sequences = [(encode_prompt(tokenizer, p), encode_response(tokenizer, r)) for p, r in zip(sft_prompts, demos)]
    rng = random.Random(seed + 5)

    def sft_loss(seqs, logp, ntok):
        # One micro-batch per step: scaled so that the step minimises the NLL per response token.
        return -logp.sum() * len(seqs) / ntok.sum(), {"nll": float(-logp.detach().sum()), "response_tokens": float(ntok.sum())}

    with console.progress("SFT", total=task.sft_steps) as advance:
        for step in range(task.sft_steps):
            stopping.raise_if_stopped()
            seqs = rng.sample(sequences, task.sft_batch_size)
            stats = policy.train_step(seqs, lambda s: collate(s, tokenizer.pad_token_id), sft_loss,
                                      micro_batch_size=task.sft_batch_size)
            advance(f"nll/token {stats['nll'] / stats['response_tokens']:.3f}")
    weights = policy.hf_state_dict()
    if is_rank0():
        save_hf_checkpoint(tmp / "sft", cfg, weights, tokenizer)
        _finish_building(tmp, sft_root, started)
    barrier()
    return weights


def _start_building(root: Path) -> Path:
    """An empty ``<root>.tmp`` to build into (rank 0 makes it; every rank waits for it)."""
    tmp = root.with_name(root.name + ".tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()
    return tmp


def _finish_building(tmp: Path, root: Path, started: float) -> None:
    """Rank 0: mark ``tmp`` done and rename it to ``root`` (replacing an unfinished one)."""
    (tmp / "DONE").write_text(f"built in {time.perf_counter() - started:.1f} s\n")
    shutil.rmtree(root, ignore_errors=True)
    tmp.rename(root)


def pair_stats(pairs: list[dict[str, str]]) -> dict[str, float]:
    """What the offline pairs are like: how often the chosen answer is right, the mean rewards,
    and the mean count of inner whitespace characters per response (the spacing shift)."""
    prompts = [p["prompt"] for p in pairs]
    chosen = toy_task.reward(prompts, [p["chosen"] for p in pairs])
    rejected = toy_task.reward(prompts, [p["rejected"] for p in pairs])
    return {
        "offline_chosen_right": sum(r == 1.0 for r in chosen) / len(pairs),
        "offline_chosen_reward": statistics.mean(chosen),
        "offline_rejected_reward": statistics.mean(rejected),
        "offline_inner_spaces": statistics.fmean(_inner_spaces(p[k]) for p in pairs for k in ("chosen", "rejected")),
    }


def _inner_spaces(text: str) -> int:
    return sum(char.isspace() for char in text.strip())


def _task_stats(pairs, cfg, tokenizer, sft_weights, warmed, warm_weights, seed, max_new_tokens) -> dict[str, float]:
    """The policies' own samples on the pairs' prompts against the offline chosen responses: their
    rewards, and the off-policy measure, the mean per-token log-prob under the warm-up policy of
    its own samples and of the offline chosen responses (eos included). Collective: ``score``."""
    prompts = [p["prompt"] for p in pairs]
    prompt_ids = [encode_prompt(tokenizer, p) for p in prompts]
    engine = TorchEngine(cfg, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    params = SamplingParams(num_samples=STATS_SAMPLES, temperature=1.0, max_new_tokens=max_new_tokens, seed=seed + 7)
    stats = {"stats_prompts": len(prompts), "stats_samples_per_prompt": STATS_SAMPLES}
    own = {}
    for name, weights in (("sft", sft_weights), ("warmup", warm_weights)):
        engine.refit(weights)
        own[name] = [(ids, r) for ids, rs in zip(prompt_ids, engine.generate(prompt_ids, params)) for r in rs]
        texts = [tokenizer.decode(r, skip_special_tokens=True) for _, r in own[name]]
        stats[f"{name}_sample_reward"] = statistics.mean(toy_task.reward([p for p in prompts for _ in range(STATS_SAMPLES)], texts))
        stats[f"{name}_sample_inner_spaces"] = statistics.fmean(_inner_spaces(t) for t in texts)
    stats["warmup_logp_per_token_own"] = _mean_logp_per_token(warmed, own["warmup"])
    chosen = [(ids, encode_response(tokenizer, p["chosen"])) for ids, p in zip(prompt_ids, pairs)]
    stats["warmup_logp_per_token_offline_chosen"] = _mean_logp_per_token(warmed, chosen)
    return stats


def _mean_logp_per_token(policy: MegatronPolicy, sequences) -> float:
    logps, ntoks = policy.score(sequences)
    return float((logps / ntoks).mean())


def _log_stats(console: Console, stats: dict[str, float]) -> None:
    console.log("embedded task stats: " + ", ".join(
        f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in sorted(stats.items())))


def _dpo_warmup(task, cfg, sft_weights, tokenizer, pairs, seed, console) -> MegatronPolicy:
    """A DPO warm-up of the SFT model on the offline pairs; the frozen SFT weights are the reference."""
    reference = MegatronPolicy(cfg, sft_weights, pad_id=tokenizer.pad_token_id)
    if task.warmup_dpo_steps == 0:
        return reference
    policy = MegatronPolicy(cfg, sft_weights, pad_id=tokenizer.pad_token_id,
                            optim=OptimConfig(lr=task.warmup_dpo_lr, clip_grad=1.0))
    prompts = [encode_prompt(tokenizer, p["prompt"]) for p in pairs]
    chosen = [(q, encode_response(tokenizer, p["chosen"])) for q, p in zip(prompts, pairs)]
    rejected = [(q, encode_response(tokenizer, p["rejected"])) for q, p in zip(prompts, pairs)]
    ref_c, _ = reference.score(chosen)
    ref_r, _ = reference.score(rejected)
    objective = Objective("dpo", beta=0.1)
    rng = random.Random(seed + 6)
    batch_size = min(64, len(pairs))

    def make_batch(idx):
        return collate([chosen[i] for i in idx] + [rejected[i] for i in idx], tokenizer.pad_token_id,
                       attention_width=cfg.attention_width)

    def dpo_loss(idx, logp, ntok):
        n = len(idx)
        logps = PairLogps(logp[:n], logp[n:], ref_c[idx], ref_r[idx], None, None)
        loss = objective.loss(logps)
        return loss.sum(), {"loss": float(loss.detach().sum()), "score": float(objective.score(logps).detach().sum())}

    with console.progress("DPO warm-up", total=task.warmup_dpo_steps) as advance:
        for _ in range(task.warmup_dpo_steps):
            stopping.raise_if_stopped()
            idx = rng.sample(range(len(pairs)), batch_size)
            stats = policy.train_step(idx, make_batch, dpo_loss, micro_batch_size=batch_size)
            advance(f"loss {stats['loss'] / batch_size:.3f}")
    return policy


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

