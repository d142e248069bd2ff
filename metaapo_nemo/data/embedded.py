"""Build the embedded toy task's world (recipe tiny_cpu): tokenizer, SFT model, offline pairs,
DPO warm-up and held-out prompts, cached on disk so a second run starts at once.

Algorithm 1's starting point, in miniature: the SFT model is the reference; the policy is a DPO
warm-up of the SFT model on the offline pairs.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from metaapo_nemo.algorithm.objectives import Objective, PairLogps
from metaapo_nemo.config import EmbeddedTaskConfig
from metaapo_nemo.data import toy_task
from metaapo_nemo.data.batching import collate, encode_prompt, encode_response
from metaapo_nemo.distributed import barrier, is_rank0
from metaapo_nemo.metrics import Console
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.hf_convert import save_hf_checkpoint
from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig

REWARD_FN = "metaapo_nemo.data.toy_task:reward"


@dataclass
class EmbeddedTask:
    sft_dir: str  # the SFT model (reference), a Hugging Face checkpoint with the tokenizer
    policy_dir: str  # the DPO warm-up of the SFT model (Algorithm 1's starting policy)
    train: str  # offline preference pairs, JSON Lines
    eval: str  # held-out prompts, JSON Lines
    reward_fn: str = REWARD_FN


def prepare_embedded_task(task: EmbeddedTaskConfig, seed: int, console: Console) -> EmbeddedTask:
    key = hashlib.sha256(json.dumps({**asdict(task), "seed": seed, "version": 2}, sort_keys=True).encode()).hexdigest()[:12]
    root = Path(os.path.expanduser(task.cache_dir)) / f"tiny_cpu-{key}"
    built = EmbeddedTask(str(root / "sft"), str(root / "warmup"), str(root / "train.jsonl"), str(root / "eval.jsonl"))
    barrier()  # every rank sees the same cache state
    if (root / "DONE").exists():
        console.log(f"embedded task: cached at {root}")
        return built
    # Every rank trains (SFT and warm-up are data-parallel like the rest); rank 0 writes the files.
    started = time.perf_counter()
    console.log(f"embedded task: building tokenizer, SFT model, offline pairs and DPO warm-up in {root}")
    tmp = root.with_name(root.name + ".tmp")
    if is_rank0():
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    barrier()

    tokenizer = toy_task.build_tokenizer()
    train_prompts = toy_task.make_prompts(task.num_train_pairs, seed)
    eval_prompts = toy_task.make_prompts(task.num_eval_prompts, seed + 1, exclude=set(train_prompts))
    sft_prompts = toy_task.make_prompts(task.sft_examples, seed + 2, exclude=set(train_prompts) | set(eval_prompts))
    pairs = toy_task.offline_pairs(train_prompts, seed + 3)
    if is_rank0():
        _write_jsonl(tmp / "train.jsonl", [{"prompt_id": str(i), **p} for i, p in enumerate(pairs)])
        _write_jsonl(tmp / "eval.jsonl", [{"prompt": p} for p in eval_prompts])

    # Rows past the tokenizer's length are never used; rounding up lets tensor parallelism split the vocabulary.
    cfg = ModelConfig(vocab_size=-(-len(tokenizer) // 64) * 64, hidden_size=task.hidden_size, num_layers=task.num_layers,
                      num_attention_heads=task.num_attention_heads, num_query_groups=task.num_query_groups,
                      ffn_hidden_size=task.ffn_hidden_size, max_position_embeddings=128)
    torch.manual_seed(seed)
    policy = MegatronPolicy(cfg, None, pad_id=tokenizer.pad_token_id, optim=OptimConfig(
        lr=task.sft_lr, weight_decay=0.01, clip_grad=1.0, warmup_steps=max(1, task.sft_steps // 20),
        total_steps=task.sft_steps, min_lr_ratio=0.1))
    n_params = sum(p.numel() for p in policy.model.parameters())
    console.log(f"embedded task: SFT of a {n_params / 1e6:.2f}M-parameter Llama (megatron-core) for {task.sft_steps} steps")
    demos = toy_task.sft_responses(sft_prompts, seed + 4)
    sequences = [(encode_prompt(tokenizer, p), encode_response(tokenizer, r)) for p, r in zip(sft_prompts, demos)]
    rng = random.Random(seed + 5)

    def sft_loss(seqs, logp, ntok):
        # One micro-batch per step: scaled so that the step minimises the NLL per response token.
        return -logp.sum() * len(seqs) / ntok.sum(), {"nll": float(-logp.detach().sum()), "response_tokens": float(ntok.sum())}

    with console.progress("SFT", total=task.sft_steps) as advance:
        for step in range(task.sft_steps):
            seqs = rng.sample(sequences, task.sft_batch_size)
            stats = policy.train_step(seqs, lambda s: collate(s, tokenizer.pad_token_id), sft_loss,
                                      micro_batch_size=task.sft_batch_size)
            advance(f"nll/token {stats['nll'] / stats['response_tokens']:.3f}")
    weights = policy.hf_state_dict()
    if is_rank0():
        save_hf_checkpoint(tmp / "sft", cfg, weights, tokenizer)

    warmed = _dpo_warmup(task, cfg, policy, tokenizer, pairs, seed, console)
    weights = warmed.hf_state_dict()
    if is_rank0():
        save_hf_checkpoint(tmp / "warmup", cfg, weights, tokenizer)
        (tmp / "DONE").write_text(f"built in {time.perf_counter() - started:.1f} s\n")
        shutil.rmtree(root, ignore_errors=True)
        tmp.rename(root)
    barrier()
    console.log(f"embedded task: built in {time.perf_counter() - started:.1f} s")
    return built


def _dpo_warmup(task, cfg, sft_policy, tokenizer, pairs, seed, console) -> MegatronPolicy:
    """A DPO warm-up of the SFT model on the offline pairs; the frozen SFT weights are the reference."""
    if task.warmup_dpo_steps == 0:
        return sft_policy
    weights = sft_policy.hf_state_dict()
    reference = MegatronPolicy(cfg, weights, pad_id=tokenizer.pad_token_id)
    policy = MegatronPolicy(cfg, weights, pad_id=tokenizer.pad_token_id,
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
        return collate([chosen[i] for i in idx] + [rejected[i] for i in idx], tokenizer.pad_token_id)

    def dpo_loss(idx, logp, ntok):
        n = len(idx)
        logps = PairLogps(logp[:n], logp[n:], ref_c[idx], ref_r[idx], None, None)
        loss = objective.loss(logps)
        return loss.sum(), {"loss": float(loss.detach().sum()), "score": float(objective.score(logps).detach().sum())}

    with console.progress("DPO warm-up", total=task.warmup_dpo_steps) as advance:
        for _ in range(task.warmup_dpo_steps):
            idx = rng.sample(range(len(pairs)), batch_size)
            stats = policy.train_step(idx, make_batch, dpo_loss, micro_batch_size=batch_size)
            advance(f"loss {stats['loss'] / batch_size:.3f}")
    return policy


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")

