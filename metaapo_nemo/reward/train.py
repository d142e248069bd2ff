"""``metaapo train-reward``: train a Bradley-Terry reward model from the SFT model on preference
pairs, as the MetaAPO paper does (METAAPO.md, reward model), and save it as the Hugging Face folder
``metaapo serve-reward --model DIR`` serves.

Read top to bottom: set-up (check the inputs, read and split the pairs, tokenize them as the server
will), then the loop (an epoch of Adam steps on the Bradley-Terry loss, then the held-out pair
accuracy and mean margin), then the checkpoint and ``reward_summary.json`` in it.

One process holds the whole model (tensor and pipeline parallel size 1); a text is the prompt as the
training job sends it to the reward server (its chat template rendered, if the tokenizer has one)
followed by the response, so what is trained is exactly what is served.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from metaapo_nemo.config import ConfigError

SUMMARY_FILE = "reward_summary.json"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init", "--sft", dest="init", required=True, metavar="DIR",
                        help="the SFT model the reward model starts from: a Llama or Qwen2 Hugging Face "
                             "causal-LM folder with its tokenizer")
    parser.add_argument("--data", "--train", dest="data", required=True, metavar="PATH",
                        help="preference pairs (prompt, chosen, rejected): JSON Lines, Parquet or a "
                             "datasets folder, the schema of data.train")
    held_out = parser.add_mutually_exclusive_group()
    held_out.add_argument("--eval", metavar="PATH", help="held-out preference pairs for the accuracy")
    held_out.add_argument("--eval-fraction", type=float, default=0.1,
                          help="without --eval: this share of --data, drawn by --seed, is held out (default 0.1)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="where the reward model is written (replaced if it exists)")
    parser.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (default 1, as the paper)")
    parser.add_argument("--lr", type=float, default=1e-5, help="Adam learning rate, constant (default 1e-5)")
    parser.add_argument("--batch-size", type=int, default=8, help="pairs per optimiser step (default 8)")
    parser.add_argument("--max-length", type=int, default=1024,
                        help="pairs with a text longer than this many tokens are left out and counted (default 1024)")
    parser.add_argument("--seed", type=int, default=1234, help="the held-out draw and the order of the pairs (default 1234)")


def run_from_args(args: argparse.Namespace) -> int:
    from metaapo_nemo.cli import refuse

    try:
        train_reward_model(args.init, args.data, args.out, eval_path=args.eval, eval_fraction=args.eval_fraction,
                           epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, max_length=args.max_length,
                           seed=args.seed)
    except ConfigError as e:
        return refuse(e)
    return 0


def _check_settings(eval_fraction: float, epochs: int, lr: float, batch_size: int, max_length: int) -> None:
    problems = [message for bad, message in (
        (not 0 < eval_fraction < 1, f"--eval-fraction {eval_fraction} must be between 0 and 1"),
        (epochs < 1, f"--epochs {epochs} must be at least 1"),
        (not lr > 0, f"--lr {lr} must be positive"),
        (batch_size < 1, f"--batch-size {batch_size} must be at least 1"),
        (max_length < 2, f"--max-length {max_length} must be at least 2"),
    ) if bad]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        problems.append("train-reward runs as one process (tensor and pipeline parallel size 1); start it "
                        "without torchrun")
    if problems:
        raise ConfigError("; ".join(problems))


def train_reward_model(init: str, data: str, out: str, *, eval_path: str | None = None, eval_fraction: float = 0.1,
                       epochs: int = 1, lr: float = 1e-5, batch_size: int = 8, max_length: int = 1024,
                       seed: int = 1234, log=print) -> dict:
    """Train, evaluate after every epoch, save to ``out``; return the summary written beside it.
    Raises ConfigError (one line) for inputs the user must change."""
    from metaapo_nemo.data.schema import load_preferences
    from metaapo_nemo.preflight import check_model_folder

    _check_settings(eval_fraction, epochs, lr, batch_size, max_length)
    check_model_folder(init, "--init")
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"--out {out}: is a file; give a folder (it is replaced if it exists)")
    if Path(out).resolve() == Path(init).resolve():
        raise ConfigError(f"--out {out} is the --init folder, which it would replace; give another folder")
    records, _ = load_preferences(data)
    rng = random.Random(seed)
    if eval_path is not None:
        held_out, _ = load_preferences(eval_path)
    else:
        if len(records) < 2:
            raise ConfigError(f"--data {data}: {len(records)} pair; holding some out needs at least 2 (or give --eval)")
        records = records[:]
        rng.shuffle(records)
        cut = min(len(records) - 1, max(1, round(eval_fraction * len(records))))
        held_out, records = records[:cut], records[cut:]

    import torch
    from transformers import AutoTokenizer

    from metaapo_nemo.distributed import init_distributed
    from metaapo_nemo.models.hf_convert import load_hf_checkpoint
    from metaapo_nemo.models.reward_model import MegatronRewardModel, bradley_terry_loss

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(init)
    train_pairs, train_dropped = _tokenized(records, tokenizer, max_length, "--data", data)
    eval_pairs, eval_dropped = _tokenized(held_out, tokenizer, max_length, "--eval" if eval_path else "held-out",
                                          eval_path or data)
    log(f"train-reward: {len(train_pairs)} training pairs, {len(eval_pairs)} held out"
        + (f" ({train_dropped + eval_dropped} left out, longer than --max-length {max_length})"
           if train_dropped + eval_dropped else ""))

    init_distributed(seed=seed)
    torch.manual_seed(seed)
    cfg, sft_weights = load_hf_checkpoint(init)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    model = MegatronRewardModel(cfg, sft_weights, pad_id)
    del sft_weights
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    history = [{"epoch": 0, **evaluate(model, eval_pairs)}]
    log(f"train-reward: before training: held-out accuracy {history[0]['accuracy']:.3f}, "
        f"mean margin {history[0]['mean_margin']:.4f}")
    steps_per_epoch = -(-len(train_pairs) // batch_size)
    for epoch in range(1, epochs + 1):
        order = list(range(len(train_pairs)))
        rng.shuffle(order)
        losses = []
        for step, start in enumerate(range(0, len(order), batch_size), start=1):
            batch = [train_pairs[i] for i in order[start : start + batch_size]]
            rewards = model([c for c, _ in batch] + [r for _, r in batch])
            loss = bradley_terry_loss(rewards[: len(batch)], rewards[len(batch) :])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            losses.append(loss.item())
            if step % max(1, steps_per_epoch // 10) == 0 or step == steps_per_epoch:
                log(f"train-reward: epoch {epoch} step {step}/{steps_per_epoch} loss {sum(losses[-10:]) / len(losses[-10:]):.4f}")
        history.append({"epoch": epoch, "train_loss": sum(losses) / len(losses), **evaluate(model, eval_pairs)})
        log(f"train-reward: epoch {epoch}: held-out accuracy {history[-1]['accuracy']:.3f}, "
            f"mean margin {history[-1]['mean_margin']:.4f}")

    model.save_hf(out, tokenizer)
    summary = {"init": init, "data": data, "eval": eval_path, "train_pairs": len(train_pairs),
               "eval_pairs": len(eval_pairs), "left_out_too_long": train_dropped + eval_dropped,
               "epochs": history, "accuracy": history[-1]["accuracy"], "seconds": time.perf_counter() - started}
    (Path(out) / SUMMARY_FILE).write_text(json.dumps(summary, indent=1) + "\n")
    log(f"train-reward: wrote {out} (serve it: metaapo serve-reward --model {out})")
    return summary


def prompt_text(tokenizer, prompt) -> str:
    """The prompt as the training job sends it to the reward server (algorithm.metaapo: its
    ``prompt_text``): a string as is, or chat messages through the tokenizer's chat template."""
    if isinstance(prompt, str) and not tokenizer.chat_template:
        return prompt
    if not tokenizer.chat_template:
        raise ConfigError("the pairs' prompts are chat messages but the --init tokenizer has no chat template")
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def _tokenized(records, tokenizer, max_length: int, flag: str, path: str) -> tuple[list[tuple[list[int], list[int]]], int]:
    """(chosen ids, rejected ids) of every pair whose texts fit ``max_length``; how many did not."""
    from metaapo_nemo.models.reward_model import token_ids

    pairs, dropped = [], 0
    for record in records:
        text = prompt_text(tokenizer, record.prompt)
        chosen, rejected = token_ids(tokenizer, text + record.chosen), token_ids(tokenizer, text + record.rejected)
        if not chosen or not rejected:
            raise ConfigError(f"{record.where}: a text tokenizes to no tokens; the reward model cannot score it")
        if max(len(chosen), len(rejected)) > max_length:
            dropped += 1
        else:
            pairs.append((chosen, rejected))
    if not pairs:
        raise ConfigError(f"{flag} {path}: every pair is longer than --max-length {max_length} tokens; raise it")
    return pairs, dropped


def evaluate(model, pairs: list[tuple[list[int], list[int]]]) -> dict[str, float]:
    """Held-out pair accuracy (r(chosen) > r(rejected); a tie counts half) and the mean margin."""
    rewards = model.score([c for c, _ in pairs] + [r for _, r in pairs])
    margins = [c - r for c, r in zip(rewards[: len(pairs)], rewards[len(pairs) :])]
    accuracy = sum(1.0 if m > 0 else 0.5 if m == 0 else 0.0 for m in margins) / len(margins)
    return {"accuracy": accuracy, "mean_margin": sum(margins) / len(margins)}
