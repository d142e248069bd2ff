"""Algorithm 1 of MetaAPO, top to bottom, phase by phase.

For each of N sequential slices of the offline data:
  1. score the slice with the policy and the frozen reference (the reference's log-probs of the
     whole offline set computed once and cached on disk, models/reference_cache.py);
  2. w = h_phi(offline score); a prompt gets online samples iff its seeded draw u > w;
  3. refit the rollout engine from the policy and generate K responses per selected prompt;
  4. score the responses with the reward-model server; 5. best/worst -> online pair;
  6. train one epoch on the selected prompts with L = mean[w L_off + (1 - w) L_on] (Eq. 5),
     w recomputed under no_grad at every step; every T_meta optimiser steps h_phi takes a step on
     the meta buffer (Eq. 6);
  7. evaluate on held-out prompts, log, checkpoint.
Checkpoints are also taken after step 5 (what was annotated is kept) and every
trainer.save_every_steps steps of 6, so a resumed run continues inside the iteration; every reward
ever paid for is kept in a ledger (reward/ledger.py) and never asked for again.
The baselines and ablations are `Strategy` settings of this same loop (strategies.py).
"""
from __future__ import annotations

import ast
import json
import os
import random
import re
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from metaapo_nemo import quiet

# Before megatron loads (metaapo_nemo.distributed imports it): its import-time warnings go to the run's
# log file (output_dir/console.log), not the console.
quiet.install()

from metaapo_nemo.algorithm.diagnostics import changed_decisions, probe_order, untrained_meta_learner, win_rate
from metaapo_nemo.algorithm.meta_learner import MetaBuffer, MetaLearner, make_meta_optimizer, meta_update
from metaapo_nemo.algorithm.objectives import Objective, PairLogps, meta_weighted_loss
from metaapo_nemo.algorithm.pairs import build_online_pair, build_selm_pair
from metaapo_nemo.algorithm.sampling import sample_seeds, uniform_draws
from metaapo_nemo.algorithm.strategies import (
    Strategy, TrainItem, loss_weights, offline_weight, resolve_strategy, select_for_sampling, train_items,
)
from metaapo_nemo import faults, stopping
from metaapo_nemo.config import ConfigError, MetaAPOConfig
from metaapo_nemo.distributed import (
    all_gather_objects, all_reduce_sum, barrier, data_parallel_rank, broadcast_module, data_parallel_size, is_loss_rank, world_rank, world_size,
)
from metaapo_nemo.loggers import ExperimentLoggers
from metaapo_nemo.metrics import Console, MetricsWriter, summary_table
from metaapo_nemo.reward.client import RewardServerError


class NothingTrained(ConfigError):
    """Every iteration ended without an optimiser step: the settings selected nothing to train."""


class TrainingDiverged(ConfigError):
    """Too many optimiser steps with a NaN or inf loss or gradient: the user must change something
    (the learning rate, the data), so it ends the run with one line, like a bad config key."""


# Written to output_dir after the checkpoint trainer.checkpoint_signal asked for: the run wants to be
# run again (a Slurm job script requeues itself when it finds it); the next run removes it.
REQUEUE_MARKER = "requeue"
CHECKPOINT_NAME = re.compile(r"iter_\d+(_annotated|_step_\d+)?")
# What summary.json's `tokens` and `tokens_per_second` count, written beside them so that a
# comparison with another trainer's tokens/s (TRL's count padding) compares like with like.
TOKEN_COUNTS = {
    "training": "tokens the policy computed on: every response token (eos included) of the offline and online chosen "
                "and rejected responses trained on, plus each prompt once per micro-batch (its responses are packed "
                "into one row behind it); padding excluded; over seconds.training (forward, backward and optimizer "
                "step; the reference log-probs are in seconds.scoring)",
    "generation": "new tokens of the K samples per annotated prompt, eos included; prompts, padding, evaluation and "
                  "probe samples excluded; over seconds.sampling (refit excluded)",
}
REFERENCE_UNSET = ("reference.hf_path is not set: the reference is the policy's start (policy.hf_path). With a DPO "
                   "warm-up as the policy (the paper's start) every iteration-1 offline score is log sigmoid(0) = "
                   "-0.693 and the sampling decision is uniform; set reference.hf_path to the SFT model")


@dataclass
class Example:
    """One offline tuple (x, y_w, y_l), tokenized, and what the current iteration adds to it."""
    prompt_id: str
    prompt_text: str  # what the reward model sees before the response
    prompt: list[int]
    chosen: list[int]
    rejected: list[int]
    chosen_text: str
    rejected_text: str
    online: tuple[list[int], list[int]] | None = None  # (chosen ids, rejected ids) of the online pair


@dataclass
class RunState:
    """Everything that carries across iterations and into a checkpoint besides the models."""
    iteration: int = 0  # iterations completed
    step: int = 0  # policy optimiser steps taken
    considered: int = 0  # offline prompts that went through the sampling decision
    annotated: int = 0  # prompts sent for online samples
    online_pairs: int = 0
    ties: int = 0
    meta_updates: int = 0
    reward_initial: float | None = None
    rewards: list = field(default_factory=list)  # held-out reward after each iteration
    eval_reward_initial: float | None = None  # and by the eval reward (reward.eval_*), when there is one
    eval_rewards: list = field(default_factory=list)
    seconds: dict = field(default_factory=lambda: dict(prepare=0.0, reference=0.0, scoring=0.0, sampling=0.0,
                                                       annotation=0.0, training=0.0, evaluation=0.0, meta=0.0,
                                                       probe=0.0))
    train_tokens: int = 0
    generated_tokens: int = 0
    skipped_steps: int = 0  # optimiser steps skipped for a NaN or inf loss or gradient
    checkpoints: int = 0  # checkpoints written; the newest has the highest number
    decisions_changed: int = 0  # sampling decisions the trained h_phi flipped against an untrained one (meta sampling)
    probe_annotations: int = 0  # unsampled prompts given K annotated samples only to measure their gain
    prompt_rewards_initial: list = field(default_factory=list)  # per held-out prompt, of the starting policy
    prompt_rewards_final: list = field(default_factory=list)  # and of the latest evaluated policy
    eval_prompt_rewards_initial: list = field(default_factory=list)  # the same by the eval reward, when there is one
    eval_prompt_rewards_final: list = field(default_factory=list)


@dataclass
class IterationState:
    """What iteration t has decided and paid for, saved in the checkpoints taken inside it (after
    the annotation, every trainer.save_every_steps steps) so a resumed run continues mid-iteration
    instead of sampling and annotating again: the sampling decision, the annotated online pairs,
    the cached reference log-probs, and how far training got."""
    selected: list  # per offline pair of the slice: sent for online samples
    online: dict  # prompt_id -> (chosen ids, rejected ids) of its online pair
    ref_off: torch.Tensor | None  # reference log-probs of the slice's offline (chosen..., rejected...)
    ref_on: torch.Tensor | None  # and of the online pairs, in the order of `with_online`
    meta_weight_mean: float | None
    score_offline_mean: float | None
    steps_done: int = 0  # training batches of this iteration already consumed
    meta_updates_before: int = 0  # Eq. 6 steps taken before this iteration's decision
    decisions_changed_by_meta: float | None = None  # share of the slice's decisions h_phi's training flipped
    score_offline_range: list | None = None  # [min, max] offline score of the slice

    def with_online(self, examples: list) -> list[int]:
        return [i for i, sel in enumerate(self.selected) if sel and examples[i].prompt_id in self.online]


def run_metaapo(config: MetaAPOConfig) -> dict:
    return MetaAPORun(config).run()


class MetaAPORun:
    def __init__(self, config: MetaAPOConfig):
        config.validate()
        self.config = config
        self.out = Path(config.output_dir)
        self.strategy: Strategy = resolve_strategy(config.algo.name, config.algo.loss)
        a = config.algo
        self.objective = Objective(self.strategy.objective, beta=a.beta, beta_s=a.beta_s,
                                   label_smoothing=a.label_smoothing, simpo_beta=a.simpo_beta, simpo_gamma=a.simpo_gamma)

    # ------------------------------------------------------------------ set-up
    def setup(self) -> None:
        from metaapo_nemo.distributed import use_cuda
        from metaapo_nemo.launch.plan import require_gpus

        quiet.install()  # third-party warnings off the console (to output_dir/console.log, attached below)
        # Before anything loads: a run that asks for GPUs on a machine without them stops here, in one line.
        require_gpus(self.config, torch.cuda.is_available())
        from metaapo_nemo.preflight import check_inputs

        # Every path, file and record the user named, checked before megatron and the models load;
        # every rank finds the same problem, so none waits for another in a collective.
        inputs = check_inputs(self.config)
        on_gpu = use_cuda(self.config)  # from here on, every part of the run computes there
        from transformers import AutoTokenizer

        from metaapo_nemo.data.batching import encode_prompt
        from metaapo_nemo.distributed import init_distributed, is_rank0
        from metaapo_nemo.models.hf_convert import load_hf_checkpoint
        from metaapo_nemo.models.policy import MegatronPolicy, OptimConfig
        from metaapo_nemo.reward.client import RewardClient
        from metaapo_nemo.rollout.engine import build_engine

        c = self.config
        if c.trainer.num_threads:
            torch.set_num_threads(c.trainer.num_threads)
        init_distributed(c.trainer.tensor_model_parallel_size, c.trainer.pipeline_model_parallel_size, seed=c.seed,
                         timeout_s=c.trainer.collective_timeout_s)
        nodes = world_size() // int(os.environ.get("LOCAL_WORLD_SIZE", world_size()))
        if c.reward.url is None and nodes > 1:
            # rank 0's local server listens on its own loopback, which the other nodes cannot reach.
            raise ConfigError(f"this job spans {nodes} nodes and reward.url is not set: a local reward server would "
                              "answer rank 0's node only. Give reward.url=URL of a reward server every node reaches, "
                              "or start a reward group with run.reward_nodes=K (run.executor=slurm)")
        from metaapo_nemo.config import REWARD_TOKEN_ENV as TOKEN_ENV

        token = c.reward.token or os.environ.get(TOKEN_ENV) or None  # by environment: never on a command line
        self.rank0 = is_rank0()
        self.console = Console(enabled=self.rank0)
        self.out.mkdir(parents=True, exist_ok=True)
        # Every console line and every third-party warning (rank 0; the other ranks' are the same).
        quiet.attach(self.out / "console.log" if self.rank0 else None)
        self._lock_output_dir()
        if self.rank0:  # left by the run that asked for this one
            (self.out / REQUEUE_MARKER).unlink(missing_ok=True)
        self.metrics = MetricsWriter(self.out / "metrics.jsonl", enabled=self.rank0,
                                     loggers=ExperimentLoggers(c) if self.rank0 else None)
        self.state = RunState()
        self._last_checkpoint = None  # the newest complete checkpoint, kept when the next one is written
        torch.manual_seed(c.seed)
        random.seed(c.seed)

        started = time.perf_counter()
        if c.task.enabled:
            from metaapo_nemo.data.embedded import prepare_embedded_task

            built = prepare_embedded_task(c.task, c.seed, self.console)
            c.policy.hf_path = c.policy.hf_path or built.policy_dir
            c.reference.hf_path = c.reference.hf_path or built.sft_dir
            c.data.train = c.data.train or built.train
            c.data.eval = c.data.eval or built.eval
            if c.task.reward == "trained":  # validate() refused any other annotator beside it
                c.reward.reward_fn, c.reward.model_dir = None, built.reward_model_dir
                if c.reward.eval_url is None:  # what the trained reward is worth on the true one
                    c.reward.eval_reward_fn = c.reward.eval_reward_fn or built.reward_fn
            elif c.reward.url is None and c.reward.model_dir is None:
                c.reward.reward_fn = c.reward.reward_fn or built.reward_fn
            inputs = check_inputs(c)  # now with the task's own files in the keys the user left unset
        self.state.seconds["prepare"] = time.perf_counter() - started
        if c.reward.eval_reward_fn is not None and nodes > 1:  # known only now, with the task's defaults
            raise ConfigError(f"this job spans {nodes} nodes and reward.eval_reward_fn is served locally, on rank "
                              "0's node only: give reward.eval_url=URL of a server every node reaches")
        self.reward_server = None
        urls = _reward_urls(c.reward.url)
        if not urls and self.rank0:
            # Rank 0 starts one local server for every rank, now: it imports its web stack while the
            # tokenizer, the data and the models load here (about 0.8 s of a tiny_cpu run's set-up).
            from metaapo_nemo.reward.local import start_local_reward_server

            self.console.log(f"reward: starting a local reward server ({c.reward.reward_fn or c.reward.model_dir})")
            self.reward_server = start_local_reward_server(reward_fn=c.reward.reward_fn, model_dir=c.reward.model_dir,
                                                           token=token, log_file=str(self.out / "reward_server.log"),
                                                           wait=False)
        self.eval_reward_server = None
        eval_urls = _reward_urls(c.reward.eval_url)
        if c.reward.eval_reward_fn is not None:
            if self.rank0:
                from metaapo_nemo.reward.local import start_local_reward_server

                self.console.log(f"eval reward: starting a local reward server ({c.reward.eval_reward_fn})")
                self.eval_reward_server = start_local_reward_server(
                    reward_fn=c.reward.eval_reward_fn, token=token, log_file=str(self.out / "eval_reward_server.log"),
                    wait=False)
        # Told on the console and kept in summary.json: a run that goes on may still mislead whoever reads it.
        self.warnings = [REFERENCE_UNSET] if self.objective.needs_reference and c.reference.hf_path is None else []
        for warning in self.warnings:
            self.console.log(f"[yellow]warning: {warning}[/yellow]")

        self.tokenizer = AutoTokenizer.from_pretrained(c.policy.hf_path)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        # Tokenized before the models load: a prompt over the length limit is found now.
        records = inputs.records[: c.data.max_train_pairs] if c.data.max_train_pairs else inputs.records
        self.examples, truncated, long_skipped = self._tokenize(records)
        eval_records = inputs.eval_prompts[: c.data.max_eval_prompts]
        eval_ids = [encode_prompt(self.tokenizer, e.prompt) for e in eval_records]
        keep = [i for i, ids in enumerate(eval_ids) if not self._too_long(eval_records[i].where, len(ids))]
        self.eval_prompts = [self._prompt_text(eval_records[i].prompt) for i in keep]
        self.eval_ids = [eval_ids[i][-c.policy.max_prompt_length:] for i in keep]
        skipped, eval_skipped = inputs.skipped + long_skipped, inputs.eval_skipped + len(eval_ids) - len(keep)
        model_cfg, policy_weights = load_hf_checkpoint(c.policy.hf_path)
        ref_path = self.ref_path = c.reference.hf_path or c.policy.hf_path
        ref_cfg, ref_weights = (model_cfg, policy_weights) if ref_path == c.policy.hf_path else load_hf_checkpoint(ref_path)
        if ref_cfg != model_cfg:
            raise ConfigError(f"reference.hf_path={ref_path} has a different architecture from policy.hf_path="
                             f"{c.policy.hf_path}: the reference must be the policy's SFT ancestor")
        self.model_cfg = model_cfg
        p = c.policy
        t = c.trainer
        precision = "bf16" if p.bf16 else "fp32"
        self.policy = MegatronPolicy(model_cfg, policy_weights, pad_id=self.tokenizer.pad_token_id, precision=precision,
                                     optim=OptimConfig(lr=p.lr, weight_decay=p.weight_decay, betas=(p.adam_beta1, p.adam_beta2),
                                                       clip_grad=p.clip_grad, warmup_steps=p.warmup_steps),
                                     distributed_optimizer=t.use_distributed_optimizer,
                                     recompute_granularity=t.recompute_granularity, recompute_method=t.recompute_method,
                                     recompute_num_layers=t.recompute_num_layers)
        self.reference = (MegatronPolicy(model_cfg, ref_weights, pad_id=self.tokenizer.pad_token_id, precision=precision)
                          if self.objective.needs_reference else None)
        del policy_weights, ref_weights
        self.offline_ref = None  # the reference log-probs of every offline pair, once looked up (_offline_reference_logps)
        self._offline_ref_looked_up = False
        self.meta = MetaLearner()
        self.meta_optimizer = make_meta_optimizer(self.meta, lr=c.algo.meta_lr, weight_decay=c.algo.meta_weight_decay)
        self.meta_buffer = MetaBuffer()

        # One engine per rank, holding the whole model on this rank's GPU (8B in bf16 is 16 GB): every
        # rank samples its own share of the selected prompts, so engines do not span ranks.
        self.engine = build_engine(c.rollout.engine, model_cfg, self.tokenizer, max_prompt_length=p.max_prompt_length,
                                   max_new_tokens=c.rollout.max_new_tokens, tensor_parallel_size=1,
                                   device=torch.device("cuda", torch.cuda.current_device()) if on_gpu else None,
                                   dtype=torch.bfloat16 if on_gpu and p.bf16 else None,
                                   max_batch_size=c.rollout.max_batch_size)

        if not urls:  # the local server rank 0 started above
            if self.rank0:
                self.reward_server.wait_until_ready(c.reward.startup_timeout_s)
            urls = [all_gather_objects(self.reward_server.url if self.rank0 else None)[0]]
        self.reward = RewardClient(urls, token=token, timeout_s=c.reward.timeout_s,
                                   max_retries=c.reward.max_retries, batch_size=c.reward.batch_size,
                                   call_timeout_s=c.reward.call_timeout_s)
        self.reward.wait_until_healthy(c.reward.startup_timeout_s)
        from metaapo_nemo.reward.ledger import RewardLedger

        # Rewards are paid once: a resumed run (and a repeated sample) is answered from the ledger,
        # also when a requeued job's reward group comes back on other hosts and ports.
        identity = c.reward.reward_fn or c.reward.model_dir or self.reward.reward_identity()
        self.ledger = RewardLedger(self.out / "rewards", world_rank(), self.reward, identity)
        self.eval_ledger = None  # the eval reward's, paid once as well
        if c.reward.eval_reward_fn is not None or eval_urls:
            if not eval_urls:
                if self.rank0:
                    self.eval_reward_server.wait_until_ready(c.reward.startup_timeout_s)
                eval_urls = [all_gather_objects(self.eval_reward_server.url if self.rank0 else None)[0]]
            self.eval_reward = RewardClient(eval_urls, token=token, timeout_s=c.reward.timeout_s,
                                            max_retries=c.reward.max_retries, batch_size=c.reward.batch_size,
                                            call_timeout_s=c.reward.call_timeout_s)
            self.eval_reward.wait_until_healthy(c.reward.startup_timeout_s)
            self.eval_ledger = RewardLedger(self.out / "eval_rewards", world_rank(), self.eval_reward,
                                            c.reward.eval_reward_fn or self.eval_reward.reward_identity())

        n = len(self.examples)
        if n < c.algo.iterations:
            raise ConfigError(f"{n} preference pairs cannot fill algo.iterations={c.algo.iterations} slices")
        bounds = [round(i * n / c.algo.iterations) for i in range(c.algo.iterations + 1)]
        self.slices = [list(range(bounds[i], bounds[i + 1])) for i in range(c.algo.iterations)]
        n_params = sum(t.numel() for t in self.policy.model.parameters())
        self.console.log(f"{c.algo.name}: {n} pairs ({skipped} skipped, {truncated} truncated) in {c.algo.iterations} "
                         f"iterations, {len(self.eval_prompts)} held-out prompts ({eval_skipped} skipped), "
                         f"policy {n_params / 1e6:.2f}M parameters, reward at {', '.join(urls)}")
        self.setup_info = dict(algorithm=c.algo.name, pairs=n, skipped=skipped, truncated=truncated,
                               eval_prompts=len(self.eval_prompts), parameters=n_params)

    def _lock_output_dir(self) -> None:
        """Hold output_dir/.lock (rank 0, for the run's life; the kernel frees it however the run
        ends): a second run on the same output_dir would interleave checkpoints and metrics, so it
        is refused in one line. Collective."""
        problem = None
        if self.rank0:
            import fcntl
            import socket

            self._lock = open(self.out / ".lock", "a+")
            try:
                fcntl.flock(self._lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                self._lock.seek(0)
                holder = self._lock.read().strip() or "another process"
                problem = (f"output_dir={self.out} is in use by another run ({holder}): wait for it to end, stop it, "
                           "or give another output_dir")
            else:
                self._lock.truncate(0)
                self._lock.write(f"pid {os.getpid()} on {socket.gethostname()}\n")
                self._lock.flush()
        problem = all_gather_objects(problem)[0]
        if problem:
            raise ConfigError(problem)

    def _prompt_text(self, prompt) -> str:
        if isinstance(prompt, str) and not self.tokenizer.chat_template:
            return prompt
        messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def _tokenize(self, records) -> tuple[list[Example], int, int]:
        """The records as Examples; how many had their prompt or responses cut to the length limits
        and how many were skipped for a prompt over policy.max_prompt_length (see _too_long)."""
        from metaapo_nemo.data.batching import encode_prompt, encode_response, truncate

        p, examples, truncated, skipped = self.config.policy, [], 0, 0
        for r in records:
            prompt = encode_prompt(self.tokenizer, r.prompt)
            if self._too_long(r.where, len(prompt)):
                skipped += 1
                continue
            q1, chosen, t1 = truncate(prompt, encode_response(self.tokenizer, r.chosen), p.max_prompt_length, p.max_length)
            q2, rejected, t2 = truncate(prompt, encode_response(self.tokenizer, r.rejected), p.max_prompt_length, p.max_length)
            truncated += int(t1 or t2)
            examples.append(Example(r.prompt_id, self._prompt_text(r.prompt), q1, chosen, rejected, r.chosen, r.rejected))
        return examples, truncated, skipped

    def _too_long(self, where: str, prompt_tokens: int) -> bool:
        """Whether to skip a record whose prompt has `prompt_tokens` tokens: False when it fits or
        data.truncate_long_prompts keeps its end; True (skipped, counted) under data.skip_invalid;
        otherwise ConfigError naming the record."""
        c = self.config
        if prompt_tokens <= c.policy.max_prompt_length or c.data.truncate_long_prompts:
            return False
        if c.data.skip_invalid:
            return True
        raise ConfigError(f"{where}: the prompt has {prompt_tokens} tokens, more than policy.max_prompt_length="
                          f"{c.policy.max_prompt_length}; raise that limit, set data.truncate_long_prompts=true to keep "
                          "the prompt's last tokens, or data.skip_invalid=true to skip such records")

    # ------------------------------------------------------------------ the loop
    def run(self) -> dict:
        summary_path = self.out / "summary.json"
        if summary_path.exists() and json.loads(summary_path.read_text()).get("finished"):
            summary = json.loads(summary_path.read_text())
            if int(os.environ.get("RANK", "0")) == 0:
                print(f"{self.out} holds a finished run; not running it again. Summary:")
                _print_summary(summary)
            return summary
        run_started = time.perf_counter()
        try:
            self.setup()
            c = self.config
            resumed = self._load_checkpoint()
            s = self.state
            if resumed is None:
                self.metrics.truncate_to(0)  # lines of a run that stopped before its first checkpoint
                self.metrics.write("setup", 0, 0, **self.setup_info)
                s.reward_initial = self._evaluate(iteration=0)
                self.console.log(f"held-out reward of the starting policy: {s.reward_initial:.4f}"
                                 + (f" (eval reward {s.eval_reward_initial:.4f})" if self.eval_ledger else ""))
                self._save_checkpoint("iter_0")
            in_progress = resumed if isinstance(resumed, IterationState) else None
            for t in range(s.iteration, c.algo.iterations):
                self._iteration(t, in_progress)
                in_progress = None
                s.iteration = t + 1
                self._save_checkpoint(f"iter_{t + 1}")
            if s.step == 0:  # a finished-looking run that changed nothing would mislead whoever reads it
                raise NothingTrained(f"{c.algo.iterations} iteration(s) took no optimiser step (algo.name={c.algo.name}: "
                                     f"{s.annotated} prompts annotated, {s.online_pairs} online pairs, "
                                     f"{s.skipped_steps} steps skipped): the policy is unchanged. Check the "
                                     "strategy's settings (algo.threshold, algo.keep_ties) and the data")
            self.policy_to_hf(self.out / "final")
            s.seconds["total"] = time.perf_counter() - run_started + s.seconds.get("total_before_resume", 0.0)
            summary = self._summary(finished=True)
            if self.rank0:
                _atomic_write(summary_path, json.dumps(summary, indent=2))
                from metaapo_nemo.plots import plot_run

                plot_run(self.metrics.read(), self.out / "plots.png")
                _print_summary(summary)
            barrier()  # the local reward server stops only when every rank is done with it
            return summary
        except RewardServerError as err:
            last = getattr(self, "_last_checkpoint", None)
            where = f"from {self._checkpoint_dir() / last}" if last else "from the start"
            raise RewardServerError(f"{err}. Once the reward server is back, run the same command: it resumes {where}, "
                                    "and rewards already paid for are not asked for again") from None
        finally:
            for server in (getattr(self, "reward_server", None), getattr(self, "eval_reward_server", None)):
                if server is not None:
                    server.stop()
            for name in ("reward", "eval_reward", "ledger", "eval_ledger"):
                if getattr(self, name, None) is not None:
                    getattr(self, name).close()
            if hasattr(self, "metrics"):
                self.metrics.close()
            quiet.detach()

    def _iteration(self, t: int, resume: IterationState | None) -> None:
        c, s = self.config, self.state
        stopping.raise_if_stopped()
        examples = [self.examples[i] for i in self.slices[t]]
        self.console.log(f"[bold]iteration {t + 1}/{c.algo.iterations}[/bold]: {len(examples)} offline pairs"
                         + (f" (resumed after {resume.steps_done} training steps)" if resume else ""))
        it = resume or self._decide_and_annotate(t, examples)
        for e in examples:
            e.online = it.online.get(e.prompt_id)

        # 6. Train one epoch (Eq. 5; or trainer.steps_per_iteration steps), meta-learner steps every T_meta
        # optimiser steps (Eq. 6). Selected prompts whose samples tied keep their offline pair (train_items).
        n, with_online = len(examples), it.with_online(examples)
        items = train_items(self.strategy, it.selected, [e.prompt_id in it.online for e in examples])
        self._train(t, examples, items, it)

        # 7. Evaluate, log, checkpoint (by the caller).
        reward = self._evaluate(t + 1)
        s.rewards.append(reward)
        self.metrics.write("iteration", s.step, t + 1, reward=reward, annotated=sum(it.selected), considered=n,
                           online_pairs=len(with_online), meta_weight_mean=it.meta_weight_mean,
                           score_offline_mean=it.score_offline_mean,
                           meta_curve=self._meta_curve(it.score_offline_range), annotation_ratio=s.annotated / max(1, s.considered),
                           meta_updates=s.meta_updates, meta_updates_iteration=s.meta_updates - it.meta_updates_before,
                           decisions_changed_by_meta=it.decisions_changed_by_meta)
        self.console.log(f"  held-out reward after iteration {t + 1}: {reward:.4f} (start {s.reward_initial:.4f})"
                         + (f"; eval reward {s.eval_rewards[-1]:.4f} (start {s.eval_reward_initial:.4f})"
                            if s.eval_reward_initial is not None else ""))  # None: added on a resume

    def _decide_and_annotate(self, t: int, examples: list[Example]) -> IterationState:
        """Phases 1-5 of iteration t; ends with the checkpoint that keeps what they paid for."""
        c, s, strategy = self.config, self.state, self.strategy
        if c.reference.roll_forward and t > 0 and self.reference is not None:
            self.reference.load_hf_state_dict(self.policy.hf_state_dict())

        # 1. Score the slice: the reference's log-probs come from the whole data set's, computed once
        # (and cached on disk for later runs), and are kept for training.
        needs_ref_off = self.reference is not None and (strategy.needs_offline_score or strategy.trains_offline_pairs)
        cached = self._offline_reference_logps() if needs_ref_off else None
        started = time.perf_counter()
        offline = [(e.prompt, e.chosen) for e in examples] + [(e.prompt, e.rejected) for e in examples]
        n = len(examples)
        ref_off = None
        if needs_ref_off:
            ref_off = cached.rows(self.slices[t]) if cached is not None else self._reference_logps(offline)
        score_off = loss_off = w = None
        if strategy.needs_offline_score:
            with self.console.phase(f"scoring {len(offline)} offline responses"):
                pol, ntok = self.policy.score(offline)
            logps = PairLogps(pol[:n], pol[n:], *_split(ref_off, n), ntok[:n], ntok[n:])
            score_off, loss_off = self.objective.score(logps), self.objective.loss(logps)
            w = offline_weight(strategy, self.meta, score_off) if strategy.needs_offline_weight else None
        faults.point("scoring")
        s.seconds["scoring"] += time.perf_counter() - started

        # 2. Decide who gets online samples: u drawn per (seed, iteration, prompt id).
        u = uniform_draws(c.seed, t, [e.prompt_id for e in examples])
        selected = select_for_sampling(strategy, w, u, score_off, loss_off, c.algo.threshold, c.algo.random_ratio).tolist()
        chosen_idx = [i for i, sel in enumerate(selected) if sel]
        self.metrics.write("decisions", s.step, t + 1, annotated=[examples[i].prompt_id for i in chosen_idx])
        changed = None
        if strategy.sampling == "meta":  # did the Eq. 6 steps so far matter to who gets sampled?
            changed = changed_decisions(u, w, offline_weight(strategy, untrained_meta_learner(), score_off))
            s.decisions_changed += changed
        s.considered += n
        s.annotated += len(chosen_idx)
        self.console.log(f"  sampling decision: {len(chosen_idx)}/{n} prompts get online samples"
                         + (f" (mean meta weight {float(w.mean()):.3f})" if w is not None else ""))

        # 3-5. Refit, generate K responses, annotate with the reward server, build online pairs.
        online = self._online_pairs(t, [examples[i] for i in chosen_idx]) if chosen_idx else {}
        with_online = [i for i in chosen_idx if examples[i].prompt_id in online]
        ref_on = None
        if with_online:
            started = time.perf_counter()
            pairs = [online[examples[i].prompt_id] for i in with_online]
            ref_on = self._reference_logps([(examples[i].prompt, p[0]) for i, p in zip(with_online, pairs)]
                                           + [(examples[i].prompt, p[1]) for i, p in zip(with_online, pairs)])
            s.seconds["scoring"] += time.perf_counter() - started
        if c.algo.probe_unsampled and score_off is not None:
            self._potential_gain(t, examples, score_off, u, selected, online, ref_on)
        it = IterationState(selected=selected, online=online, ref_off=None if ref_off is None else ref_off[0],
                            ref_on=None if ref_on is None else ref_on[0],
                            meta_weight_mean=float(w.mean()) if w is not None else None,
                            score_offline_mean=float(score_off.mean()) if score_off is not None else None,
                            meta_updates_before=s.meta_updates,
                            decisions_changed_by_meta=None if changed is None else changed / n,
                            score_offline_range=None if score_off is None else [float(score_off.min()),
                                                                                 float(score_off.max())])
        self._save_checkpoint(f"iter_{t + 1}_annotated", it)
        return it

    def _reference_logps(self, sequences):
        if self.reference is None:
            return None
        return self.reference.score(sequences)

    def _offline_reference_logps(self):
        """The reference's log-probs of every offline pair (models/reference_cache.py), looked up at the
        first iteration that needs them and kept for the run: read from reference.logp_cache_dir when
        an earlier run with the same reference and data wrote them, else computed for the whole data
        set at once and written there. Timed as seconds["reference"]. None, and every slice scored
        by the reference in its iteration, when the reference changes (reference.roll_forward), the
        cache is off, or the reference has no checkpoint folder to key it by. Collective."""
        c = self.config
        cache_dir = c.reference_logp_cache_dir()
        if self._offline_ref_looked_up or c.reference.roll_forward or cache_dir is None:
            return self.offline_ref
        from metaapo_nemo.models.reference_cache import offline_reference_logps

        started = time.perf_counter()
        self.offline_ref = offline_reference_logps(self.reference, self.ref_path,
                                                   [(e.prompt, e.chosen, e.rejected) for e in self.examples], cache_dir,
                                                   "bf16" if c.policy.bf16 else "fp32", log=self.console.log)
        self._offline_ref_looked_up = True
        seconds = time.perf_counter() - started
        self.state.seconds["reference"] = self.state.seconds.get("reference", 0.0) + seconds
        r = self.offline_ref
        if r is None:
            self.console.log(f"reference log-probs: {self.ref_path} is no checkpoint folder to key a cache by; "
                             "scoring each iteration's slice")
        else:
            how = "read from" if r.read else "computed and cached in" if r.written else "computed, not cached in"
            self.console.log(f"reference log-probs of {len(self.examples)} offline pairs: {how} {r.path} ({seconds:.1f} s)")
        return r

    def _potential_gain(self, t: int, examples: list[Example], score_off, u, selected: list, online: dict, ref_on) -> None:
        """Paper Figure 2 (middle): the potential online gain l_on - l_off of a prompt, both scores
        under the policy at the decision (where it is positive, Eq. 6 lowers w). Measured for the
        sampled prompts with an online pair (ref_on: their reference log-probs, in slice order) and
        for up to algo.probe_unsampled unsampled ones, whose K samples are annotated only for this.
        Written as the `gain` row and timed apart (seconds["probe"]), so the other phases' seconds
        compare with runs that do not probe. Collective: every rank calls it with the same arguments."""
        s = self.state
        started = time.perf_counter()
        probes = probe_order(u, selected, self.config.algo.probe_unsampled)
        probed = self._probe_pairs(t, [examples[i] for i in probes]) if probes else {}
        sampled_idx = [i for i, sel in enumerate(selected) if sel and examples[i].prompt_id in online]
        probe_idx = [i for i in probes if examples[i].prompt_id in probed]
        idx, m = sampled_idx + probe_idx, len(sampled_idx)
        pairs = [online[examples[i].prompt_id] for i in sampled_idx] + [probed[examples[i].prompt_id] for i in probe_idx]
        gain = []
        if idx:
            chosen = [(examples[i].prompt, p[0]) for i, p in zip(idx, pairs)]
            rejected = [(examples[i].prompt, p[1]) for i, p in zip(idx, pairs)]
            probe_ref = self._reference_logps(chosen[m:] + rejected[m:]) if probe_idx else None
            (on_c, on_r), (probe_c, probe_r) = _split(ref_on, m), _split(probe_ref, len(probe_idx))
            pol, ntok = self.policy.score(chosen + rejected)
            k = len(idx)
            score_on = self.objective.score(PairLogps(pol[:k], pol[k:], _joined(on_c, probe_c), _joined(on_r, probe_r),
                                                      ntok[:k], ntok[k:]))
            gain = (score_on - score_off[idx]).tolist()
        s.probe_annotations += len(probes)
        s.seconds["probe"] = s.seconds.get("probe", 0.0) + time.perf_counter() - started
        self.metrics.write("gain", s.step, t + 1, score_offline=score_off[idx].tolist(), gain=gain,
                           sampled=[True] * m + [False] * len(probe_idx), probed=len(probes))
        self.console.log(f"  potential online gain: {_mean(gain[:m]):.3f} on {m} sampled prompts, {_mean(gain[m:]):.3f} "
                         f"on {len(probe_idx)} unsampled ones ({len(probes)} probed)")

    def _probe_pairs(self, t: int, probes: list[Example]) -> dict:
        """{prompt_id: (chosen ids, rejected ids)} for unsampled prompts, from K samples through the
        same engine, seeds and reward ledger as _online_pairs but none of its counters: these pairs
        only measure a gain and are never trained on. Each rank takes every world_size-th prompt;
        the pairs are gathered to every rank."""
        self.engine.refit(self.policy.hf_state_dict())
        mine = probes[world_rank()::world_size()]
        pairs = self._sample_and_annotate(t, mine)["pairs"] if mine else {}
        if release := getattr(self.engine, "release", None):
            release()
        return {pid: pair for part in all_gather_objects(pairs) for pid, pair in part.items()}

    def _online_pairs(self, t: int, chosen: list[Example]) -> dict:
        """Refit, generate K responses, annotate, build pairs: {prompt_id: (chosen ids, rejected ids)}.
        Each rank takes every world_size-th selected prompt; the pairs are then gathered so every
        rank trains on the same set."""
        c, s = self.config, self.state
        self.engine.refit(self.policy.hf_state_dict())
        mine = chosen[world_rank()::world_size()]
        local = self._sample_and_annotate(t, mine) if mine else {"pairs": {}, "ties": 0, "rewards": [], "gaps": [],
                                                                 "tokens": 0, "sampling": 0.0, "annotation": 0.0}
        if release := getattr(self.engine, "release", None):
            release()  # the engine's GPU memory goes back to training
        parts = all_gather_objects(local)
        pairs = {pid: pair for part in parts for pid, pair in part["pairs"].items()}
        ties = sum(p["ties"] for p in parts)
        rewards = [r for p in parts for r in p["rewards"]]
        gaps = [g for p in parts for g in p["gaps"]]
        tokens = sum(p["tokens"] for p in parts)
        sampling = max(p["sampling"] for p in parts)  # ranks sample in parallel: wall time is the slowest
        s.seconds["sampling"] += sampling
        s.seconds["annotation"] += max(p["annotation"] for p in parts)
        s.generated_tokens += tokens
        s.ties += ties
        s.online_pairs += len(pairs)
        self.console.log(f"  generated {len(chosen)} x {c.algo.num_samples} responses, "
                         f"{tokens / max(sampling, 1e-9):.0f} new tokens/s; {len(pairs)} online pairs, {ties} ties")
        self.metrics.write("annotation", s.step, t + 1, samples=len(rewards), sample_reward_mean=sum(rewards) / max(1, len(rewards)),
                           ties=ties, online_pairs=len(pairs), reward_gap_mean=sum(gaps) / max(1, len(gaps)),
                           sampling_seconds=sampling, generation_tokens_per_s=tokens / max(sampling, 1e-9))
        return pairs

    def _sample_and_annotate(self, t: int, chosen: list[Example]) -> dict:
        from metaapo_nemo.rollout.engine import SamplingParams

        c = self.config
        started = time.perf_counter()
        params = SamplingParams(num_samples=c.algo.num_samples, temperature=c.rollout.temperature, top_p=c.rollout.top_p,
                                max_new_tokens=c.rollout.max_new_tokens)
        seeds = sample_seeds(c.seed, 1 + t, [e.prompt_id for e in chosen])
        with self.console.phase(f"sampling {len(chosen)} x {c.algo.num_samples} responses"):
            samples = self.engine.generate([e.prompt for e in chosen], params, prompt_seeds=seeds)
        sampling, tokens = time.perf_counter() - started, self.engine.stats.new_tokens
        faults.point("sampling")

        started = time.perf_counter()
        texts = [[self.tokenizer.decode(r, skip_special_tokens=True) for r in rs] for rs in samples]
        prompts = [e.prompt_text for e, rs in zip(chosen, texts) for _ in rs]
        flat = [r for rs in texts for r in rs]
        if self.strategy.pairs == "selm":
            prompts += [e.prompt_text for e in chosen for _ in range(2)]
            flat += [x for e in chosen for x in (e.chosen_text, e.rejected_text)]
        with self.console.phase(f"annotating {len(flat)} responses"):
            rewards = self.ledger.score(prompts, flat)
        annotation = time.perf_counter() - started

        k, ties, gaps, pairs = c.algo.num_samples, 0, [], {}
        for j, (e, rs, ids) in enumerate(zip(chosen, texts, samples)):
            rw = rewards[j * k:(j + 1) * k]
            by_text = dict(zip(rs, ids))
            if self.strategy.pairs == "selm":
                off_rw = rewards[len(chosen) * k + 2 * j: len(chosen) * k + 2 * j + 2]
                pair, tie = build_selm_pair(rs, rw, e.chosen_text, e.rejected_text, off_rw[0], off_rw[1],
                                            keep_ties=c.algo.keep_ties)
                by_text.update({e.chosen_text: e.chosen, e.rejected_text: e.rejected})
            else:
                pair, tie = build_online_pair(rs, rw, keep_ties=c.algo.keep_ties)
            ties += tie
            if pair is None:
                continue
            room = c.policy.max_length - len(e.prompt)
            pairs[e.prompt_id] = (by_text[pair[0]][:room], by_text[pair[1]][:room])
            gaps.append(pair[2] - pair[3])
        return {"pairs": pairs, "ties": ties, "rewards": rewards[:len(chosen) * k], "gaps": gaps, "tokens": tokens,
                "sampling": sampling, "annotation": annotation}

    def _train(self, t, examples, items, it: IterationState) -> None:
        from metaapo_nemo.data.batching import collate

        c, s, strategy, obj = self.config, self.state, self.strategy, self.objective
        if not items:
            self.console.log("  nothing to train on in this iteration")
            return
        if it.steps_done == 0:
            self.policy.reset_schedule()
        ref_off, ref_on, n_online = it.ref_off, it.ref_on, sum(1 for item in items if item.on_slot is not None)
        pending_meta = []  # the step's meta-buffer pairs: buffered once the step is known to be finite
        needs_offline = strategy.trains_offline_pairs
        n = len(examples)
        pad = self.tokenizer.pad_token_id

        def slice_ref(ref, idx, half):
            if ref is None:
                return None, None
            return ref[idx], ref[[i + half for i in idx]]

        def make_batch(batch: list[TrainItem]):
            off_idx = [it.example for it in batch]
            online = [examples[it.example] for it in batch if it.on_slot is not None]
            seqs = []
            if needs_offline:
                seqs += [(examples[i].prompt, examples[i].chosen) for i in off_idx]
                seqs += [(examples[i].prompt, examples[i].rejected) for i in off_idx]
            seqs += [(e.prompt, e.online[0]) for e in online] + [(e.prompt, e.online[1]) for e in online]
            return collate(seqs, pad, attention_width=self.model_cfg.attention_width)

        def loss_fn(batch: list[TrainItem], logp, ntok):
            on_items = [k for k, it in enumerate(batch) if it.on_slot is not None]
            b, m = len(batch), len(on_items)
            zeros = torch.zeros(b)
            if needs_offline:
                rc, rr = slice_ref(ref_off, [it.example for it in batch], n)
                off = PairLogps(logp[:b], logp[b:2 * b], rc, rr, ntok[:b], ntok[b:2 * b])
                loss_off, score_off = obj.loss(off), obj.score(off).detach()
                logp, ntok = logp[2 * b:], ntok[2 * b:]
            else:
                loss_off, score_off = zeros, zeros
            loss_on, score_on = zeros.clone(), zeros.clone()
            if m:
                rc, rr = slice_ref(ref_on, [batch[k].on_slot for k in on_items], n_online)
                on = PairLogps(logp[:m], logp[m:2 * m], rc, rr, ntok[:m], ntok[m:2 * m])
                loss_on = loss_on.index_put((torch.tensor(on_items),), obj.loss(on))
                score_on[on_items] = obj.score(on).detach()
            # Eq. 5: w from the CURRENT policy's offline score, recomputed here under no_grad.
            w_off, w_on = loss_weights(strategy, self.meta, score_off)
            offline_only = torch.tensor([it.offline_only for it in batch])
            w_off = torch.where(offline_only, torch.ones_like(w_off), w_off)
            w_on = torch.where(offline_only, torch.zeros_like(w_on), w_on)
            loss = meta_weighted_loss(w_off, w_on, loss_off, loss_on) * b
            # Only for an h_phi that learns from it: else the buffer would grow into every checkpoint.
            if strategy.meta_learner_trained and needs_offline and m and is_loss_rank():
                pending_meta.append((score_off[on_items], loss_off.detach()[on_items], loss_on.detach()[on_items]))
            stats = dict(loss=float(loss.detach()), n=b, n_online=m, loss_offline=float(loss_off.detach().sum()),
                         loss_online=float(loss_on.detach().sum()), meta_weight=float(w_off.sum()),
                         score_offline=float(score_off.sum()), score_online=float(score_on.sum()))
            return loss, stats

        mbs = c.trainer.micro_batch_size
        batches = train_batches(len(items), c.trainer.global_batch_size, c.seed, t, c.trainer.epochs_per_iteration,
                                c.trainer.steps_per_iteration)
        every = c.trainer.log_every if c.trainer.log_every > 1 else None  # None: a plain line every ~10%
        with self.console.progress(f"train it{t + 1}", total=len(batches) - it.steps_done, every=every) as advance:
            for k in range(it.steps_done, len(batches)):
                pending_meta.clear()
                stopping.raise_if_stopped()
                st = self.policy.train_step([items[i] for i in batches[k]], make_batch, loss_fn, mbs)
                it.steps_done = k + 1
                s.seconds["training"] += st["seconds"]
                if st.get("skipped"):
                    self._skipped_step(t, st)
                else:
                    # A data-parallel rank without items of its own (train_step takes items[r::DP]) re-ran
                    # one with weight 0 to join the all-reduce: its pairs are another rank's, already buffered.
                    if data_parallel_rank() < len(batches[k]):
                        for pairs in pending_meta:
                            self.meta_buffer.add(*pairs)
                    s.train_tokens += int(st["tokens"])
                    s.step += 1
                    b, m = st["n"], max(1, st["n_online"])
                    row = dict(loss=st["loss"] / b, loss_offline=st["loss_offline"] / b, loss_online=st["loss_online"] / m,
                               meta_weight_mean=st["meta_weight"] / b, score_offline=st["score_offline"] / b,
                               score_online=st["score_online"] / m, online_gain=(st["score_online"] / m - st["score_offline"] / b),
                               grad_norm=st["grad_norm"], lr=st["lr"], pairs=b, tokens_per_s=st["tokens"] / st["seconds"])
                    self.metrics.write("train_step", s.step, t + 1, **row)
                    advance(f"loss {row['loss']:.4f} w {row['meta_weight_mean']:.3f}")
                    faults.point("training")
                    if strategy.meta_learner_trained and s.step % c.algo.meta_interval == 0:
                        self._meta_step(t)
                if k + 1 < len(batches):
                    every = c.trainer.save_every_steps
                    if every and not st.get("skipped") and s.step % every == 0:
                        self._save_checkpoint(f"iter_{t + 1}_step_{s.step}", it)
                    elif self._checkpoint_requested():
                        self._save_checkpoint(f"iter_{t + 1}_step_{s.step}", it)

    def _skipped_step(self, t: int, st: dict) -> None:
        """A step whose loss or gradient was NaN or inf left the weights as they were; too many stop the run."""
        s, limit = self.state, self.config.trainer.max_skipped_steps
        s.skipped_steps += 1
        self.metrics.write("skipped_step", s.step, t + 1, loss=st.get("loss"), grad_norm=st.get("grad_norm"))
        self.console.log(f"  [yellow]skipped an optimiser step after step {s.step}: the loss or gradient was not finite "
                         f"({s.skipped_steps} skipped of at most {limit})[/yellow]")
        if s.skipped_steps >= limit:
            last = (self._checkpoint_dir() / "latest").read_text().strip() if (self._checkpoint_dir() / "latest").exists() else None
            raise TrainingDiverged(
                f"{s.skipped_steps} optimiser steps had a NaN or inf loss or gradient (the last after step {s.step} of "
                f"iteration {t + 1}); stopping. The last good checkpoint is {self._checkpoint_dir() / last if last else 'none'}: "
                "lower policy.lr, check the data for degenerate pairs, or raise trainer.max_skipped_steps")

    def _meta_step(self, t: int) -> None:
        started = time.perf_counter()
        meta_stats = meta_step_on_rank0(self.meta, self.meta_optimizer if self.rank0 else None, self.meta_buffer)
        if meta_stats is None:
            return
        self.state.meta_updates += 1
        self.state.seconds["meta"] += time.perf_counter() - started
        faults.point("meta")
        if self.rank0:
            self.metrics.write("meta_update", self.state.step, t + 1, **meta_stats)

    def _evaluate(self, iteration: int) -> float:
        """Mean reward-model score of policy samples on the held-out prompts (split over ranks).
        Also keeps each prompt's mean over its rollout.eval_samples samples, in held-out prompt
        order whatever the number of ranks (the `eval` row's prompt_rewards; the win rate), and,
        with an eval reward, the mean score of the same samples by it (the row's eval_reward)."""
        from metaapo_nemo.rollout.engine import SamplingParams

        c, s = self.config, self.state
        started = time.perf_counter()
        self.engine.refit(self.policy.hf_state_dict())
        mine = list(range(world_rank(), len(self.eval_ids), world_size()))
        rewards, lengths, per_prompt, eval_rewards = [], [], [], []
        if mine:
            params = SamplingParams(num_samples=c.rollout.eval_samples, temperature=c.rollout.eval_temperature,
                                    top_p=c.rollout.top_p, max_new_tokens=c.rollout.max_new_tokens)
            with self.console.phase(f"evaluation: {len(mine)} x {c.rollout.eval_samples} held-out samples"):
                samples = self.engine.generate([self.eval_ids[i] for i in mine], params,
                                               prompt_seeds=sample_seeds(c.seed, 0, mine))
                texts = [self.tokenizer.decode(r, skip_special_tokens=True) for rs in samples for r in rs]
                prompts = [self.eval_prompts[i] for i in mine for _ in range(c.rollout.eval_samples)]
                rewards = self.ledger.score(prompts, texts)
                if self.eval_ledger is not None:
                    eval_rewards = self.eval_ledger.score(prompts, texts)
            lengths = [len(r) for rs in samples for r in rs]
        k = c.rollout.eval_samples
        per_prompt = [float(sum(rewards[j * k:(j + 1) * k])) / k for j in range(len(mine))]
        eval_per_prompt = [float(sum(eval_rewards[j * k:(j + 1) * k])) / k for j in range(len(mine))
                           if eval_rewards]
        if release := getattr(self.engine, "release", None):
            release()
        parts = all_gather_objects((rewards, lengths, dict(zip(mine, per_prompt)), eval_rewards,
                                    dict(zip(mine, eval_per_prompt))))
        rewards = [r for part in parts for r in part[0]]
        lengths = [n for part in parts for n in part[1]]
        by_prompt = {i: r for part in parts for i, r in part[2].items()}
        eval_rewards = [r for part in parts for r in part[3]]
        eval_by_prompt = {i: r for part in parts for i, r in part[4].items()}
        prompt_rewards = [by_prompt[i] for i in range(len(self.eval_ids))]
        s.seconds["evaluation"] += time.perf_counter() - started
        reward = sum(rewards) / len(rewards)
        if iteration == 0:
            s.prompt_rewards_initial = prompt_rewards
        s.prompt_rewards_final = prompt_rewards
        extra = {}
        if self.eval_ledger is not None:
            extra["eval_reward"] = sum(eval_rewards) / len(eval_rewards)
            extra["eval_prompt_rewards"] = [eval_by_prompt[i] for i in range(len(self.eval_ids))]
            if iteration == 0:
                s.eval_reward_initial = extra["eval_reward"]
                s.eval_prompt_rewards_initial = extra["eval_prompt_rewards"]
            else:
                s.eval_rewards.append(extra["eval_reward"])
            s.eval_prompt_rewards_final = extra["eval_prompt_rewards"]
        self.metrics.write("eval", s.step, iteration, reward=reward, **extra,
                           response_tokens_mean=sum(lengths) / len(lengths), prompt_rewards=prompt_rewards)
        return reward

    def _meta_curve(self, score_range: list | None) -> list[list[float]]:
        """[scores, h_phi(scores)] over the slice's offline scores [min, max] (-4..0 when it had none)."""
        low, high = score_range or (-4.0, 0.0)
        if high - low < 1e-6:  # one score, or all equal: a curve needs some width around it
            low, high = low - 0.5, high + 0.5
        xs = torch.linspace(low, high, 41)
        return [xs.tolist(), self.meta.weights(xs).tolist()]

    # ------------------------------------------------------------------ outputs
    def policy_to_hf(self, path: Path) -> None:
        from metaapo_nemo.models.hf_convert import save_hf_checkpoint

        weights = self.policy.hf_state_dict()
        if self.rank0:
            save_hf_checkpoint(path, self.model_cfg, weights, self.tokenizer)

    def _summary(self, finished: bool) -> dict:
        s, c = self.state, self.config
        secs = {k: round(v, 3) for k, v in s.seconds.items() if k != "total_before_resume"}
        return {
            "algorithm": c.algo.name, "objective": self.objective.name, "iterations": s.iteration,
            "finished": finished, "annotation_ratio": s.annotated / max(1, s.considered),
            "prompts_considered": s.considered, "prompts_annotated": s.annotated,
            "num_online_pairs": s.online_pairs, "ties": s.ties, "meta_updates": s.meta_updates, "optimizer_steps": s.step,
            "skipped_steps": s.skipped_steps,
            "reward_initial": s.reward_initial, "reward_final": s.rewards[-1] if s.rewards else s.reward_initial,
            "reward_per_iteration": s.rewards, "seconds": secs,
            **({"eval_reward_initial": s.eval_reward_initial,
                "eval_reward_final": s.eval_rewards[-1] if s.eval_rewards else s.eval_reward_initial,
                "eval_reward_per_iteration": s.eval_rewards,
                "eval_win_rate_vs_start": (win_rate(s.eval_prompt_rewards_final, s.eval_prompt_rewards_initial)
                                           if s.eval_rewards and s.eval_prompt_rewards_initial else None)}
               if s.eval_reward_initial is not None else {}),
            "decisions_changed_by_meta": (s.decisions_changed / max(1, s.considered)
                                          if self.strategy.sampling == "meta" else None),
            "win_rate_vs_start": (win_rate(s.prompt_rewards_final, s.prompt_rewards_initial)
                                  if s.rewards and s.prompt_rewards_initial else None),
            "probe_annotations": s.probe_annotations,
            "tokens_per_second": {"training": s.train_tokens / max(1e-9, s.seconds["training"]),
                                  "generation": s.generated_tokens / max(1e-9, s.seconds["sampling"]),
                                  "counts": TOKEN_COUNTS},
            "tokens": {"training": s.train_tokens, "generation": s.generated_tokens},
            "parallel": {"ranks": world_size(), "tensor": c.trainer.tensor_model_parallel_size,
                         "pipeline": c.trainer.pipeline_model_parallel_size, "data": data_parallel_size()},
            "output_dir": str(self.out), "final_checkpoint": str(self.out / "final"),
            "warnings": self.warnings,
        }

    def _checkpoint_dir(self) -> Path:
        return self.out / "checkpoints"

    def _checkpoint_requested(self) -> bool:
        """Whether any rank got trainer.checkpoint_signal (all ranks agree: all-reduce over WORLD)."""
        if self.config.trainer.checkpoint_signal is None:
            return False
        return bool(all_reduce_sum(torch.tensor([float(stopping.checkpoint_requested())]))[0] > 0)

    def _save_checkpoint(self, name: str, iteration: IterationState | None = None) -> None:
        """checkpoints/NAME/: policy/, the policy and its optimizer in Megatron's distributed format
        (every rank writes its shards); run_state.pt from rank 0 (see _run_state); iteration.pt, the
        IterationState of a checkpoint taken inside an iteration; manifest.json, every file's size,
        written last. NAME is iter_N (N iterations done; iter_0: the starting policy evaluated),
        iter_N_annotated or iter_N_step_S (inside iteration N). The reference is not saved: it
        reloads from its HF path, and iteration.pt holds the log-probs it gave this iteration.

        Durable and atomic: written as NAME.tmp, every file fsynced, renamed once every rank is
        done, then `latest` moves (fsynced too); the previous checkpoint stays until the next one
        is complete, so a kill at any point leaves a complete checkpoint to resume from, and a
        damaged newest one falls back to it. Then, if trainer.checkpoint_signal arrived, every
        rank exits with stopping.EXIT_REQUEUE."""
        root = self._checkpoint_dir()
        directory, tmp = root / name, root / f"{name}.tmp"
        self.state.checkpoints += 1
        if self.rank0:
            for stale in root.glob("*.tmp"):  # left by a run killed while saving
                shutil.rmtree(stale, ignore_errors=True)
            (tmp / "policy").mkdir(parents=True)
        barrier()
        self.policy.save_checkpoint(tmp / "policy")
        faults.point("checkpoint_write")
        run_state = self._run_state()
        if self.rank0:
            torch.save(run_state, tmp / "run_state.pt")
            if iteration is not None:
                torch.save(asdict(iteration), tmp / "iteration.pt")
        _fsync_files(tmp)  # each rank flushes what it wrote (on a shared filesystem, from its own node)
        barrier()
        if self.rank0:
            files = {str(f.relative_to(tmp)): f.stat().st_size for f in sorted(tmp.rglob("*")) if f.is_file()}
            _atomic_write(tmp / "manifest.json", json.dumps({"name": name, "number": self.state.checkpoints,
                                                             "files": files}, indent=1))
            shutil.rmtree(directory, ignore_errors=True)  # renamed by a run that died before `latest` moved
            os.replace(tmp, directory)
            _fsync_dir(root)
            _atomic_write(root / "latest", name)
            for old in root.iterdir():  # keep this checkpoint and the complete one before it
                if old.is_dir() and CHECKPOINT_NAME.fullmatch(old.name) and old.name not in (name, self._last_checkpoint):
                    shutil.rmtree(old)
            _atomic_write(self.out / "summary.json", json.dumps(self._summary(finished=False), indent=2))
        self._last_checkpoint = name
        barrier()
        if self._checkpoint_requested():
            if self.rank0:  # what a Slurm job script reads to requeue itself (launch/slurm.py)
                _atomic_write(self.out / REQUEUE_MARKER, f"{name}\n")
            sig = self.config.trainer.checkpoint_signal
            self.console.log(f"{sig}: checkpointed to {directory}; exiting with status {stopping.EXIT_REQUEUE} for a "
                             "requeue. Run the same command to resume.")
            raise SystemExit(stopping.EXIT_REQUEUE)

    def _layout(self) -> dict:
        t = self.config.trainer
        return {"tensor": t.tensor_model_parallel_size, "pipeline": t.pipeline_model_parallel_size,
                "data": data_parallel_size(), "distributed_optimizer": t.use_distributed_optimizer}

    def _run_state(self) -> dict:
        """Everything but the models, on rank 0, as plain tensors, numbers, lists and dicts
        (torch.load(weights_only=True) reads it): the layout it was saved under, the counters, the
        meta-learner and its optimizer, every rank's meta buffer (global rank order), every
        rank's RNG states (keyed by global rank) and the length of metrics.jsonl. Collective
        (gathers over WORLD)."""
        rank_parts = all_gather_objects({"meta_buffer": self.meta_buffer.state_dict(), "rng": _rng_state()})
        return {"layout": self._layout(), "run_state": asdict(self.state), "meta": self.meta.state_dict(),
                "meta_optimizer": self.meta_optimizer.state_dict(),
                "meta_buffers": [part["meta_buffer"] for part in rank_parts],
                "rng": {rank: part["rng"] for rank, part in enumerate(rank_parts)},
                "metrics_lines": self.metrics.line_count()}

    def _choose_checkpoint(self) -> tuple[Path | None, int]:
        """The newest complete checkpoint (by its manifest's number), found on rank 0 and agreed by
        all, and the highest number in use. A damaged one (a file missing or cut short) is passed
        over with a warning naming the damaged file. `latest` must name a checkpoint folder inside
        this run's checkpoints/, since what a checkpoint holds gets unpickled: else ConfigError."""
        root = self._checkpoint_dir()
        choice = problem = None
        highest = 0
        if self.rank0 and root.is_dir():
            latest = _read_latest(root)
            candidates = sorted((d for d in root.iterdir() if CHECKPOINT_NAME.fullmatch(d.name) and d.is_dir()
                                 and not d.is_symlink()), key=_checkpoint_number, reverse=True)
            highest = max([0, *map(_checkpoint_number, candidates)])
            if latest is not None and latest not in {d.name for d in candidates}:
                problem = (f"{root / 'latest'} names {latest!r}, which is not a checkpoint folder inside {root}: "
                           f"restore it (a name like iter_2 or iter_3_step_40 from {root}) or use a new output_dir")
            for directory in candidates if problem is None else []:
                damage = _checkpoint_damage(directory)
                if damage is None:
                    choice = str(directory)
                    break
                self.console.log(f"[yellow]warning: checkpoint {directory} is damaged ({damage}); "
                                 "resuming from the one before it[/yellow]")
            if problem is None and choice is None and candidates:
                problem = (f"no complete checkpoint in {root} (each is damaged, see the warnings): use a new "
                           "output_dir, or delete the checkpoints folder to start over")
        choice, problem, highest = all_gather_objects((choice, problem, highest))[0]
        if problem:
            raise ConfigError(problem)
        return (Path(choice) if choice else None), highest

    def _load_checkpoint(self) -> IterationState | bool | None:
        """Load the newest complete checkpoint: None when there is none (a fresh run), the
        IterationState to continue when it was taken inside an iteration, True otherwise."""
        directory, highest = self._choose_checkpoint()
        if directory is None:
            return None
        saved = torch.load(directory / "run_state.pt", weights_only=True)
        layout = self._layout()
        saved_distributed = saved["layout"].get("distributed_optimizer", False)
        if saved_distributed != layout["distributed_optimizer"]:
            # megatron-core names and keeps the two optimizers' state differently (main weights, step).
            raise ConfigError(f"{directory} was saved with trainer.use_distributed_optimizer="
                              f"{str(saved_distributed).lower()}: resume with the same setting (any TP/PP/DP "
                              "works), or use a new output_dir")
        if saved["layout"] != layout:
            self.console.log("resharding from " + _layout_text(saved["layout"]) + " to " + _layout_text(layout))
        self.policy.load_checkpoint(directory / "policy")
        self.meta.load_state_dict(saved["meta"])
        self.meta_optimizer.load_state_dict(saved["meta_optimizer"])
        # Same world size: every rank gets its own buffer and RNG back, as if never stopped. Otherwise
        # rank 0 holds all buffered pairs (meta_step_on_rank0 joins the buffers there anyway, so the
        # next Eq. 6 step sees the same pairs) and every rank continues from rank 0's RNG state.
        same_world = len(saved["rng"]) == world_size()
        if same_world:
            self.meta_buffer.load_state_dict(saved["meta_buffers"][world_rank()])
        elif self.rank0:
            self.meta_buffer.load_state_dict(_joined_meta_buffers(saved["meta_buffers"]))
        prepare = self.state.seconds["prepare"]
        self.state = RunState(**saved["run_state"])
        self.state.seconds["total_before_resume"] = self.state.seconds.get("total_before_resume", 0.0) + \
            sum(v for k, v in self.state.seconds.items() if k not in ("total_before_resume", "prepare"))
        self.state.seconds["prepare"] += prepare
        self.state.checkpoints = highest  # the next one is numbered above every one on disk, damaged ones too
        self._last_checkpoint = directory.name
        _set_rng_state(saved["rng"][world_rank() if same_world else 0])
        if not same_world:
            self.console.log(f"RNG: rank 0's state on every rank (saved by {len(saved['rng'])} ranks, "
                             f"resumed by {world_size()})")
        self.metrics.truncate_to(saved["metrics_lines"])
        self.console.log(f"resumed from {directory}")
        if (directory / "iteration.pt").exists():
            return IterationState(**torch.load(directory / "iteration.pt", weights_only=True))
        return True


def _read_latest(root: Path) -> str | None:
    try:
        return (root / "latest").read_text().strip()
    except FileNotFoundError:
        return None


def _checkpoint_number(directory: Path) -> int:
    try:
        return int(json.loads((directory / "manifest.json").read_text())["number"])
    except (OSError, ValueError, KeyError, TypeError):
        return -1


def _checkpoint_damage(directory: Path) -> str | None:
    """What is wrong with a checkpoint folder (the first missing or short file), or None."""
    try:
        files = json.loads((directory / "manifest.json").read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{directory / 'manifest.json'} is missing or unreadable: {type(err).__name__}"
    for name, size in files.items():
        path = directory / name
        if not path.is_file():
            return f"{path} is missing"
        if path.stat().st_size != size:
            return f"{path} has {path.stat().st_size} bytes, not {size}"
    return None


def _fsync_files(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    for path in [folder, *(p for p in folder.rglob("*") if p.is_dir())]:
        _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _layout_text(layout: dict) -> str:
    return f"TP={layout['tensor']} PP={layout['pipeline']} DP={layout['data']}"


def _rng_state() -> dict:
    version, internal, gauss_next = random.getstate()
    return {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss_next]}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))


def _joined_meta_buffers(parts: list[dict]) -> dict:
    """The MetaBuffer state holding every part's pairs, in the order given."""
    joined = {k: torch.cat([p[k] for p in parts]) for k in ("score_off", "loss_off", "loss_on")}
    return {**joined, "num_steps": max(p["num_steps"] for p in parts)}


def meta_step_on_rank0(meta: MetaLearner, optimizer, buffer: MetaBuffer) -> dict | None:
    """Eq. 6 over the meta buffers of every rank: gathered to rank 0, one meta-learner step there,
    phi broadcast to all ranks; every buffer is cleared. Returns rank 0's stats ({} elsewhere), or
    None when no rank had anything buffered. Collective: every rank calls it."""
    parts = all_gather_objects(buffer.state_dict() if len(buffer) else None)
    buffer.clear()
    if all(part is None for part in parts):
        return None
    stats = {}
    if world_rank() == 0:
        for part in parts:
            if part is not None:
                other = MetaBuffer()
                other.load_state_dict(part)
                buffer.add(*other.tensors())
        stats = meta_update(meta, optimizer, buffer)
    broadcast_module(meta, src=0)
    return stats


def _split(ref, n):
    if ref is None:
        return None, None
    return ref[0][:n], ref[0][n:]


def _joined(*parts):
    """The non-None tensors concatenated, or None when every part is None (no reference model)."""
    parts = [p for p in parts if p is not None]
    return torch.cat(parts) if parts else None


def _mean(xs: list) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def _derive_seed(seed: int, iteration: int, purpose: int) -> int:
    return (seed * 1_000_003 + (iteration + 1) * 7919 + purpose) % (2**63 - 1)


def train_batches(n: int, batch_size: int, seed: int, iteration: int, epochs: int, steps: int | None) -> list[list[int]]:
    """Iteration `iteration`'s optimiser steps, each a list of indices into its n training items,
    from the seed alone (a resumed run skips IterationState.steps_done of them). steps None:
    `epochs` passes, each reshuffled and cut into batches of batch_size (a pass's last one
    shorter). steps S: exactly S batches of batch_size, cut end to end from as many reshuffled
    passes as they need (an item can then appear twice in a batch, when n < batch_size)."""
    if n == 0:
        return []
    order, passes = list(range(n)), []
    for p in range(epochs if steps is None else -(-steps * batch_size // n)):
        random.Random(_derive_seed(seed, iteration, 2 + p)).shuffle(order)  # pass p reshuffles pass p - 1
        passes.append(list(order))
    if steps is None:
        return [part[start:start + batch_size] for part in passes for start in range(0, n, batch_size)]
    stream = [i for part in passes for i in part]
    return [stream[k * batch_size:(k + 1) * batch_size] for k in range(steps)]


def _reward_urls(url) -> list[str]:
    """reward.url as a list: one URL, a Python/JSON list, or comma-separated URLs."""
    if url is None:
        return []
    if isinstance(url, str):
        text = url.strip()
        if text.startswith("["):
            url = ast.literal_eval(text)
        else:
            url = [u.strip() for u in text.split(",") if u.strip()]
    return [str(u) for u in url]


def _atomic_write(path: Path, text: str) -> None:
    """Replace `path` by `text` so that a kill leaves the old or the new file, never a mix (fsynced)."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _print_summary(summary: dict) -> None:
    secs = summary["seconds"]
    tps = summary.get("tokens_per_second", {})
    text = (
        f"\n{summary['algorithm']} ({summary['iterations']} iterations): held-out reward "
        f"{summary['reward_initial']:.4f} -> {summary['reward_final']:.4f}"
        + (f" (eval reward {summary['eval_reward_initial']:.4f} -> {summary['eval_reward_final']:.4f})"
           if summary.get("eval_reward_initial") is not None else "") + "; annotation ratio "
        f"{summary['annotation_ratio']:.3f} ({summary['prompts_annotated']}/{summary['prompts_considered']} prompts), "
        f"{summary['num_online_pairs']} online pairs, {summary['ties']} ties, {summary['meta_updates']} meta updates\n"
        + _diagnostics_line(summary) +
        f"seconds: " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()) + "\n"
        f"tokens/s: training {tps.get('training', 0):.0f}, generation {tps.get('generation', 0):.0f}\n"
        f"aligned policy: {summary['final_checkpoint']}\n"
    )
    print(text)
    for line in text.splitlines():
        quiet.record(line)
    Console().print_table(summary_table(summary))



def _diagnostics_line(summary: dict) -> str:
    """Whether the meta-learner mattered and the policy improved per prompt; a summary written
    before these keys existed has none of them."""
    parts = []
    changed = summary.get("decisions_changed_by_meta")
    if changed is not None:
        parts.append(f"sampling decisions changed by the meta updates: {changed:.1%} (against an untrained "
                     "meta-learner, same draws)")
    if summary.get("win_rate_vs_start") is not None:
        parts.append(f"win rate vs the starting policy {summary['win_rate_vs_start']:.3f} (held-out prompts, ties half)")
    if summary.get("probe_annotations"):
        parts.append(f"{summary['probe_annotations']} unsampled prompts probed for their potential gain")
    return "; ".join(parts) + "\n" if parts else ""
