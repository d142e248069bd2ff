"""The policy and the frozen reference: a megatron-core GPT model behind the three things
Algorithm 1 asks of it: score sequences, take an optimiser step on a loss, hand its weights over.

Training goes through Megatron's forward-backward schedule (`get_forward_backward_func`), so the
same step runs with pipeline stages when the model is split.
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func

from metaapo_nemo.data.batching import SequenceBatch, collate
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.hf_convert import export_hf_state_dict, load_hf_into_model
from metaapo_nemo.models.logprobs import sequence_logprobs

Sequences = Sequence[tuple[list[int], list[int]]]  # (prompt ids, response ids)


@dataclass
class OptimConfig:
    lr: float
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0
    warmup_steps: int = 0
    total_steps: int = 0  # > 0: cosine decay to min_lr_ratio * lr at this step; 0: constant after warm-up
    min_lr_ratio: float = 0.0


class MegatronPolicy:
    def __init__(self, cfg: ModelConfig, hf_state_dict, *, pad_id: int, optim: OptimConfig | None = None,
                 bf16: bool = False):
        self.cfg, self.pad_id, self.bf16 = cfg, pad_id, bf16
        self.model = build_gpt_model(cfg)
        if hf_state_dict is not None:  # None: megatron's own random initialisation
            load_hf_into_model(self.model, cfg, hf_state_dict)
        self.optim = optim
        if optim is None:  # the frozen reference
            self.model.eval()
            self.model.requires_grad_(False)
            self.optimizer = None
        else:
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                               weight_decay=optim.weight_decay)
        self.steps_since_reset = 0
        self.tokens_trained = 0
        self.train_seconds = 0.0

    def _autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16) if self.bf16 else contextlib.nullcontext()

    @torch.no_grad()
    def score(self, sequences: Sequences, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-prob sums and response token counts, [N] each, in the order given.

        Sequences are sorted by length so each batch pads little; no attention mask is ever built.
        """
        self.model.eval()
        order = sorted(range(len(sequences)), key=lambda i: len(sequences[i][0]) + len(sequences[i][1]))
        logps = torch.zeros(len(sequences), dtype=torch.float32)
        ntoks = torch.zeros(len(sequences), dtype=torch.long)
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            batch = collate([sequences[i] for i in idx], self.pad_id)
            with self._autocast():
                logp, ntok = sequence_logprobs(self.model, batch.tokens, batch.prompt_lens, batch.lengths)
            logps[idx] = logp.float()
            ntoks[idx] = ntok
        return logps, ntoks

    def train_step(self, micro_batches: list, loss_fn: Callable, num_examples: int) -> dict:
        """One optimiser step over `micro_batches` (any objects `loss_fn` understands).

        loss_fn(micro_batch, forward) -> (loss_sum, stats): `forward(batch)` runs the policy on a
        SequenceBatch and returns (log-prob sums, token counts) with grad. loss_sum is summed over the
        micro-batch's examples; the step minimises the mean over all `num_examples` of the step.
        Returns the per-micro-batch stats dicts merged by summation, plus grad_norm and lr.
        """
        assert self.optimizer is not None, "the reference model is frozen"
        self.model.train()
        started = time.perf_counter()
        n_micro = len(micro_batches)
        stats_total: dict[str, float] = {}
        tokens = 0

        def forward(batch: SequenceBatch):
            nonlocal tokens
            tokens += int(batch.lengths.sum())
            with self._autocast():
                logp, ntok = sequence_logprobs(self.model, batch.tokens, batch.prompt_lens, batch.lengths)
            return logp.float(), ntok

        def forward_step(data_iterator, model):
            micro = next(data_iterator)
            loss_sum, stats = loss_fn(micro, forward)
            for k, v in stats.items():
                stats_total[k] = stats_total.get(k, 0.0) + float(v)
            # The schedule divides each micro-batch loss by the number of micro-batches; undo that so
            # the gradient is that of the plain mean over the step's examples.
            scaled = loss_sum * (n_micro / num_examples)
            return scaled, lambda output: (output, {})

        self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(micro_batches), model=self.model,
            num_microbatches=n_micro, seq_length=1, micro_batch_size=1, forward_only=False)
        grad_norm = self._clip()
        self.optimizer.step()
        self.steps_since_reset += 1
        self.tokens_trained += tokens
        self.train_seconds += time.perf_counter() - started
        return {**stats_total, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"], "tokens": tokens}

    def _set_lr(self) -> None:
        step, warm, total = self.steps_since_reset, self.optim.warmup_steps, self.optim.total_steps
        if warm > 0 and step < warm:
            scale = (step + 1) / warm
        elif total > 0:
            progress = min(1.0, (step - warm) / max(1, total - warm))
            floor = self.optim.min_lr_ratio
            scale = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        else:
            scale = 1.0
        for group in self.optimizer.param_groups:
            group["lr"] = self.optim.lr * scale

    def _clip(self) -> float:
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.optim.clip_grad if self.optim.clip_grad > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    def reset_schedule(self) -> None:
        """Restart the learning-rate warm-up (each iteration trains on a new slice)."""
        self.steps_since_reset = 0

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The complete weights under Hugging Face names: what the rollout engine is refit from."""
        return export_hf_state_dict(self.model, self.cfg)

    def load_hf_state_dict(self, hf_state_dict) -> None:
        load_hf_into_model(self.model, self.cfg, hf_state_dict)

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict() if self.optimizer else None,
                "steps_since_reset": self.steps_since_reset}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and state["optimizer"] is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.steps_since_reset = state["steps_since_reset"]
