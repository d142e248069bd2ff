"""The policy and the frozen reference: a megatron-core GPT model behind the three things
Algorithm 1 asks of it: score sequences, take an optimiser step on a loss, hand its weights over.

Parallelism is Megatron's: this rank holds its pipeline stage (pre_process / post_process) and its
tensor shard; every forward runs through `get_forward_backward_func()` (1F1B across stages,
variable sequence lengths); gradients are reduced over data-parallel ranks by Megatron's
DistributedDataParallel and stepped by the Megatron optimizer (grad clipping across
model-parallel ranks). A single CPU process is the case TP = PP = DP = 1 of the same code.

Where ranks talk: the schedule's p2p between stages; DDP's all-reduce in finalize_model_grads;
`score` broadcasts log-probs from the last stage (all-reduce over WORLD, one writer per pair);
`train_step` gathers the loss statistics from the loss-computing ranks (all_gather_object) and
all-reduces the gradient norm over model-parallel ranks (get_grad_norm), and every rank skips the
step when either is NaN or inf on any rank;
`save_checkpoint` / `load_checkpoint` plan the reads and writes of every rank's shards together
(Megatron's dist_checkpointing over torch.distributed.checkpoint).
"""
from __future__ import annotations

import math
import queue
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from metaapo_nemo.models import megatron_core  # noqa: F401  (first: megatron-core without TorchInductor)
from megatron.core import dist_checkpointing, parallel_state as ps
from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig
from megatron.core.distributed.finalize_model_grads import finalize_model_grads
from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer
from megatron.core.optimizer import optimizer as megatron_optimizer
from megatron.core.pipeline_parallel import get_forward_backward_func

from metaapo_nemo import stopping
from metaapo_nemo.data.batching import SequenceBatch, collate, group_by_prompt, pad_columns
from metaapo_nemo.distributed import (
    all_gather_objects, all_reduce_sum, data_parallel_rank, data_parallel_size, is_loss_rank,
)
from metaapo_nemo.models.config import ModelConfig
from metaapo_nemo.models.gpt import build_gpt_model
from metaapo_nemo.models.hf_convert import export_hf_state_dict, load_hf_into_model
from metaapo_nemo.models.logprobs import decoder_hidden_states, response_logprobs

Sequences = Sequence[tuple[list[int], list[int]]]  # (prompt ids, response ids)


@dataclass
class OptimConfig:
    lr: float
    # "adam", or "sgd" (plain, momentum 0): tests compare parallel trajectories with it, because
    # Adam's normalised step turns rounding-level gradient differences into lr-sized moves.
    optimizer: str = "adam"
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    clip_grad: float = 1.0  # 0 disables
    warmup_steps: int = 0
    total_steps: int = 0  # > 0: cosine decay to min_lr_ratio * lr at this step; 0: constant after warm-up
    min_lr_ratio: float = 0.0


def _summed_over_ranks(stats: dict[str, float], loss: float) -> tuple[dict[str, float], float]:
    """Every rank's stats and loss, each summed over the ranks (all_gather_object over WORLD)."""
    parts = all_gather_objects((stats, loss))
    total: dict[str, float] = {}
    for part, _ in parts:
        for k, v in part.items():
            total[k] = total.get(k, 0.0) + v
    return total, sum(part_loss for _, part_loss in parts)


# Columns a bf16 batch on the CPU is padded to a multiple of (benchmarks/README.md, "bf16 on the CPU").
COLUMN_MULTIPLE = 32


class MegatronPolicy:
    def __init__(self, cfg: ModelConfig, hf_state_dict, *, pad_id: int, optim: OptimConfig | None = None,
                 precision: str = "fp32", distributed_optimizer: bool = False,
                 recompute_granularity: str | None = None, recompute_method: str | None = None,
                 recompute_num_layers: int | None = None):
        """precision: "fp32"; "bf16", Megatron mixed precision: bf16 weights, and for the trained
        policy fp32 main gradients (reduced in fp32) and fp32 main weights kept by the optimizer
        (on CPU too: models.cpu_compat). distributed_optimizer: Megatron's distributed optimizer,
        main weights and Adam state sharded over data-parallel ranks. recompute_*: activation
        recomputation, as in models.gpt.transformer_config."""
        if precision not in ("fp32", "bf16"):
            raise ValueError(f"precision={precision!r}: use 'fp32' or 'bf16'")
        self.cfg, self.pad_id, self.optim = cfg, pad_id, optim
        dtype = torch.bfloat16 if precision == "bf16" else torch.float32
        self.model = build_gpt_model(cfg, pre_process=ps.is_pipeline_first_stage(),
                                     post_process=ps.is_pipeline_last_stage(), dtype=dtype,
                                     recompute_granularity=recompute_granularity, recompute_method=recompute_method,
                                     recompute_num_layers=recompute_num_layers)
        self.model.config.variable_seq_lengths = True  # micro-batches differ in length: stages exchange shapes
        # bf16 matrix products on the CPU are built per shape on first use: widths padded to a
        # multiple of COLUMN_MULTIPLE keep a run to a few shapes (data.batching.pad_columns).
        self.column_multiple = COLUMN_MULTIPLE if dtype == torch.bfloat16 and not next(self.model.parameters()).is_cuda else 1
        if hf_state_dict is not None:  # None: megatron's own random initialisation
            load_hf_into_model(self.model, cfg, hf_state_dict)
        self.steps_since_reset = 0
        if optim is None:  # the frozen reference
            self.model.eval()
            self.model.requires_grad_(False)
            self.ddp = self.optimizer = None
            return
        mixed = precision == "bf16"
        self.ddp = DistributedDataParallel(self.model.config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=mixed, use_distributed_optimizer=distributed_optimizer), self.model)
        self.model.config.finalize_model_grads_func = finalize_model_grads
        self.optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer=optim.optimizer, sgd_momentum=0.0, lr=optim.lr, weight_decay=optim.weight_decay, adam_beta1=optim.betas[0],
            adam_beta2=optim.betas[1], clip_grad=optim.clip_grad, bf16=mixed, params_dtype=dtype,
            use_distributed_optimizer=distributed_optimizer), [self.ddp])
        self._fuse_adam()

    def _fuse_adam(self) -> None:
        """torch's AdamW (megatron's optimizer without Apex or Transformer Engine) in its fused
        kernel: one call per step instead of a dozen ops per tensor (0.7 against 4.9 ms a step for
        the tiny_cpu model on one CPU core). Its defaults leave it off on the CPU; a loaded
        checkpoint's param groups bring their own flag, so this is applied again after a load."""
        for chained in self.optimizer.chained_optimizers:
            inner = getattr(chained, "optimizer", None)
            if type(inner) in (torch.optim.AdamW, torch.optim.Adam):
                for group in inner.param_groups:
                    group.update(fused=True, foreach=False)

    def _stage_forward(self, model, batch: SequenceBatch):
        """This stage's part of log pi(y|x): hidden states to pass on, or (logp_sum, ntok) on the last
        stage, returned on the CPU where the losses and the cached reference log-probs live. Every
        stage builds the same batch, so each has the mask and positions its layers need."""
        batch = pad_columns(batch, self.column_multiple).to(next(self.model.parameters()).device)
        hidden = decoder_hidden_states(model, batch.tokens, batch.position_ids, batch.attention_mask, batch.segments)
        if not ps.is_pipeline_last_stage():
            return hidden, None
        logp, ntok = response_logprobs(model, hidden, batch)
        return logp.float().cpu(), ntok.cpu()

    @torch.no_grad()
    def score(self, sequences: Sequences, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence log-prob sums and response token counts, [N] each, in the order given, on every rank.

        The sequences that share a prompt (a pair's chosen and rejected) stay together: one row
        of a batch of up to `batch_size` sequences, the prompt computed once. Each data-parallel
        rank scores its share of the prompts, sorted by row length so that batches pad little.
        """
        self.model.eval()
        mine = group_by_prompt(sequences)[data_parallel_rank()::data_parallel_size()]
        mine.sort(key=lambda group: len(sequences[group[0]][0]) + sum(len(sequences[i][1]) for i in group))
        chunks: list[list[int]] = []
        for group in mine:
            if chunks and len(chunks[-1]) + len(group) <= batch_size:
                chunks[-1] += group
            else:
                chunks.append(list(group))
        logps = torch.zeros(len(sequences), dtype=torch.float64)
        ntoks = torch.zeros(len(sequences), dtype=torch.float64)

        def forward_step(data_iterator, model):
            idx = next(data_iterator)
            out, ntok = self._stage_forward(model, collate([sequences[i] for i in idx], self.pad_id,
                                                               attention_width=self.cfg.attention_width))
            if ntok is None:
                return out, None

            def collect(logp):
                if is_loss_rank():  # one writer per pair: the last stage's tensor-parallel rank 0
                    logps[idx] = logp.double()
                    ntoks[idx] = ntok.double()
                return logp.sum() * 0, {}
            return out, collect

        if chunks:
            get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(chunks), model=[self.model],
                                        num_microbatches=len(chunks), seq_length=1, micro_batch_size=1,
                                        forward_only=True)
        logps, ntoks = all_reduce_sum(torch.stack([logps, ntoks]))  # every pair was written by exactly one rank
        return logps.float(), ntoks.long()

    def train_step(self, items: list, make_batch: Callable, loss_fn: Callable, micro_batch_size: int) -> dict:
        """One optimiser step that minimises the mean of `loss_fn` over `items` (the whole step).

        Data-parallel rank r takes items[r::DP]; make_batch(micro_items) -> SequenceBatch;
        loss_fn(micro_items, logp_sum, num_tokens) -> (loss summed over micro_items, stats dict of
        sums), logp_sum and num_tokens [N] in the order of the batch's sequences. Returns the stats
        summed over all data-parallel ranks, with grad_norm, lr, tokens (those the model ran: a
        prompt its responses share counts once) and skipped: True when the loss or a gradient was NaN or inf on any rank, and then no rank
        stepped (weights, optimizer state and schedule as before; gradients zeroed).
        """
        assert self.optimizer is not None, "the reference model is frozen"
        started = time.perf_counter()
        self.model.train()
        dp = data_parallel_size()
        local = items[data_parallel_rank()::dp]
        weight = 1.0
        if not local:  # this rank still joins the gradient all-reduce, with a zero loss
            local, weight = items[:1], 0.0
        micro = [local[j:j + micro_batch_size] for j in range(0, len(local), micro_batch_size)]
        # The schedule divides each micro-batch loss by len(micro) and DDP averages over DP ranks;
        # this factor turns the result into the plain mean over the step's items.
        scale = weight * len(micro) * dp / len(items)
        stats: dict[str, float] = {}
        losses: list[float] = []  # this rank's micro-batch loss sums, for the finite check

        def forward_step(data_iterator, model):
            mb = next(data_iterator)
            batch = make_batch(mb)
            out, ntok = self._stage_forward(model, batch)
            if ntok is None:
                return out, None

            def loss(logp):
                loss_sum, mb_stats = loss_fn(mb, logp, ntok)
                if is_loss_rank() and weight:
                    losses.append(float(loss_sum.detach()))
                    mb_stats["tokens"] = float(batch.num_tokens)
                    for k, v in mb_stats.items():
                        stats[k] = stats.get(k, 0.0) + float(v)
                return loss_sum * scale, {}
            return out, loss

        self._set_lr()
        self.ddp.zero_grad_buffer()
        self.optimizer.zero_grad()
        get_forward_backward_func()(forward_step_func=forward_step, data_iterator=iter(micro), model=[self.ddp],
                                    num_microbatches=len(micro), seq_length=1, micro_batch_size=1, forward_only=False)
        overflow = self.optimizer.prepare_grads()  # megatron's own inf check: only under a loss scaler
        grad_norm = self.optimizer.get_grad_norm()
        total, loss = _summed_over_ranks(stats, sum(losses))
        # Every rank decides alike, or the replicas diverge: each sums the same gathered losses (a
        # NaN or inf on any rank makes the sum so), and get_grad_norm all-reduced the norm over the
        # model-parallel ranks (over all ranks with the distributed optimizer) of gradients DDP had
        # already all-reduced over the data-parallel ranks.
        skipped = overflow or not (math.isfinite(loss) and math.isfinite(grad_norm))
        if skipped:
            self.ddp.zero_grad_buffer()
            self.optimizer.zero_grad()
        else:
            self._clip_and_step(grad_norm)
        total.update(grad_norm=float(grad_norm), lr=self.optimizer.param_groups[0]["lr"], skipped=skipped,
                     seconds=time.perf_counter() - started)
        return total

    def _clip_and_step(self, grad_norm: float) -> None:
        """The rest of megatron's ChainedOptimizer.step after its get_grad_norm: clip by the norm
        train_step already took (no second pass over the gradients), step."""
        for optimizer in self.optimizer.chained_optimizers:
            parameters = optimizer.get_parameters()
            if self.optim.clip_grad > 0 and parameters:
                # Looked up on megatron's optimizer module, as ChainedOptimizer.step finds it
                # (cpu_compat replaces it there on the CPU).
                megatron_optimizer.clip_grad_by_total_norm_fp32(parameters, self.optim.clip_grad, grad_norm)
        self.optimizer.step_with_ready_grads()
        self.steps_since_reset += 1

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

    def reset_schedule(self) -> None:
        """Restart the learning-rate warm-up (each iteration trains on a new slice)."""
        self.steps_since_reset = 0

    def hf_state_dict(self) -> dict[str, torch.Tensor]:
        """The complete weights under Hugging Face names on every rank (stages and shards gathered):
        what the rollout engine is refit from. Collective: every rank must call it."""
        return export_hf_state_dict(self.model, self.cfg)

    def load_hf_state_dict(self, hf_state_dict) -> None:
        load_hf_into_model(self.model, self.cfg, hf_state_dict)

    def sharded_state_dict(self, is_loading: bool = False, with_optimizer: bool = True) -> dict:
        """The model and its optimizer state as Megatron ShardedTensors (each names the slice of
        the full tensor this rank holds, so a checkpoint written under one TP/PP/DP layout loads
        under another), and the schedule position. is_loading: the optimizer's state is allocated
        first, to be loaded into; with_optimizer=False leaves the optimizer out."""
        # The distributed optimizer keeps Adam state in flat buffers laid out for one DP size;
        # "fully_reshardable" writes it per parameter, as the other Megatron optimizers always do.
        # No key prefix for a ChainedOptimizer: the keys do not depend on how the optimizer is split.
        metadata = {"distrib_optim_sharding_type": "fully_reshardable", "chained_optim_avoid_prefix": True}
        model = self.model.sharded_state_dict(metadata=metadata)
        state = {"model": model, "steps_since_reset": self.steps_since_reset}
        if self.optimizer is not None and with_optimizer:
            state["optimizer"] = self.optimizer.sharded_state_dict(model, is_loading=is_loading, metadata=metadata)
        return state

    def save_checkpoint(self, directory) -> None:
        """Write sharded_state_dict() to the existing, empty `directory` in Megatron's distributed
        checkpoint format (torch_dist): each rank writes the shards it is the main replica of.
        Collective: every rank must call it."""
        from megatron.core.dist_checkpointing.strategies import filesystem_async

        # megatron collects its writer processes' results through a multiprocessing Manager: a
        # server process that outlives a SIGKILLed rank (holding its stdout) forever. This save is
        # synchronous, so the results only ever cross threads of this process: a plain queue serves.
        if filesystem_async._results_queue is None:
            filesystem_async._results_queue = queue.Queue()
        dist_checkpointing.save(self.sharded_state_dict(), str(directory))
        # The save forks its writers, and a stop signal that arrives during a fork raises inside
        # Python's at-fork callbacks, where the exception is lost: raise it here, where every rank
        # that took the signal stops together, instead of leaving them for the next step.
        stopping.raise_if_stopped()

    def load_checkpoint(self, directory) -> None:
        """Load what save_checkpoint wrote, resharded to this run's layout. Collective."""
        # Saved before the first optimiser step (an iteration with nothing to train on) or with a
        # stateless optimizer: no moments were written, and the saving run's optimizer was as fresh
        # as this one, its main weights a copy of the model's.
        stepped = any(k.startswith("optimizer.state.exp_avg.")
                      for k in dist_checkpointing.load_tensors_metadata(str(directory)))
        state = dist_checkpointing.load(self.sharded_state_dict(is_loading=True, with_optimizer=stepped), str(directory))
        self.model.load_state_dict(state["model"])
        if self.optimizer is not None and stepped:
            self.optimizer.load_state_dict(state["optimizer"])
            self._fuse_adam()
        elif self.optimizer is not None:
            self.optimizer.reload_model_params()
        self.steps_since_reset = int(state["steps_since_reset"])
