"""The run's configuration: one dataclass per concern, every key documented where it is declared.

Recipes (top-level `recipes/`) return a `MetaAPOConfig`; NeMo-Run overrides (`algo.beta=0.2`) and
`python -m metaapo_nemo run` overrides address the same fields. `validate()` checks the whole tree
before anything heavy starts and says what to change.
"""

import ast
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Optional, Union


@dataclass
class PolicyConfig:
    hf_path: Optional[str] = None  # HF Llama/Qwen2 checkpoint folder; None: the embedded task's SFT model
    lr: float = 5e-7  # policy learning rate (paper Table B.4)
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    clip_grad: float = 1.0  # global grad-norm clip; 0 disables
    warmup_steps: int = 0  # linear learning-rate warm-up, in optimiser steps, restarted each iteration
    max_prompt_length: int = 2048  # prompts are left-truncated to this many tokens
    max_length: int = 4096  # prompt + response tokens in training; responses are cut beyond it
    # bf16 for the policy and reference: Megatron mixed precision, bf16 weights with fp32 main
    # gradients and fp32 main weights in the optimizer; the frozen reference holds bf16 weights only.
    # The same code path on CUDA and on CPU.
    bf16: bool = False


@dataclass
class ReferenceConfig:
    # The frozen reference pi_ref: the SFT model the policy's DPO warm-up started from (the paper's
    # reference). None: the policy's starting checkpoint (policy.hf_path), with a warning in the log
    # and summary.json, since with a warm-up as the policy that flattens iteration 1's scores.
    hf_path: Optional[str] = None
    roll_forward: bool = False  # True: reference := current policy at each iteration start (reference code); paper text: off
    # Where the reference's log-probs of the offline pairs are cached (models/reference_cache.py):
    # computed once for the whole data set, keyed by the reference checkpoint's content, the pairs'
    # token ids and policy.bf16 (not output_dir, seed or algo.name), so every iteration, resumed run
    # and ablation on the same data and reference reads them. "auto": <task.cache_dir>/reference_logps
    # (~/.cache/metaapo_nemo/reference_logps unless task.cache_dir is set); "" or None: off, the
    # reference scores each iteration's slice, as it must under roll_forward (which never caches).
    logp_cache_dir: Optional[str] = "auto"


@dataclass
class DataConfig:
    # Preference pairs: .jsonl, .parquet or a datasets.save_to_disk folder, or a dataset split read
    # offline, NAME[:SPLIT] (DIR:SPLIT, OWNER/NAME:SPLIT from the local cache; data/hf_datasets.py).
    train: Optional[str] = None
    eval: Optional[str] = None  # held-out prompts, same forms; `prompt` is enough
    skip_invalid: bool = False  # skip and count records that break the schema instead of stopping
    # A prompt over policy.max_prompt_length tokens: false, the run stops naming the record (or
    # skips it under skip_invalid); true, its last max_prompt_length tokens are kept, as TRL does.
    truncate_long_prompts: bool = False
    max_train_pairs: Optional[int] = None  # use only the first N pairs (quick trials)
    max_eval_prompts: Optional[int] = 256  # evaluate on at most N held-out prompts


@dataclass
class RewardConfig:
    url: Optional[Union[str, list[str]]] = None  # remote reward server(s); None: start `reward_fn` locally
    # Bearer token for the server; None: $METAAPO_REWARD_TOKEN, if set (which keeps it off command
    # lines and out of logs; a Slurm job passes it so).
    token: Optional[str] = None
    reward_fn: Optional[str] = None  # MODULE:FUNCTION served by the local server when url is None
    model_dir: Optional[str] = None  # or a Bradley-Terry reward model folder served locally
    # A second reward the held-out samples are also scored with (the `eval` rows' eval_reward,
    # summary.json's eval_reward_initial / eval_reward_final): what the run's gain on the reward that
    # annotates is worth on another one, e.g. the true reward beside a trained reward model (reward
    # hacking). eval_reward_fn: MODULE:FUNCTION served by a second local server; eval_url: remote
    # server(s), as reward.url. Neither: no eval reward, except with task.reward=trained, whose
    # held-out samples are also scored by the embedded task's programmatic reward.
    eval_reward_fn: Optional[str] = None
    eval_url: Optional[Union[str, list[str]]] = None
    timeout_s: float = 120.0  # one try of one request, answer included
    max_retries: int = 3  # retries on connection errors, timeouts, 429 and 5xx (requests are idempotent)
    # The whole of one request, retries and waits included: a reward server that dies and is
    # restarted within this budget is waited for; None: (1 + max_retries) tries of timeout_s.
    call_timeout_s: Optional[float] = 600.0
    # How long the run waits for its reward servers to answer /health at start (a local one
    # included): loading an 8B reward model takes minutes.
    startup_timeout_s: float = 600.0
    batch_size: int = 256  # (prompt, response) pairs per request


@dataclass
class AlgoConfig:
    name: str = "metaapo"  # metaapo, dpo, ipo, simpo, cdpo, online_dpo, selm, adpo, metaapo_<ablation>
    loss: Optional[str] = None  # preference loss dpo|cdpo|ipo|simpo; None: the one `name` implies (dpo for metaapo)
    iterations: int = 3  # N sequential slices of the offline data (Algorithm 1)
    num_samples: int = 8  # K policy samples per selected prompt
    beta: float = 0.1  # DPO/IPO beta (SimPO uses simpo_beta)
    beta_s: float = 1.0  # preference-score scale: score = log sigmoid(beta_s * margin) (Eq. 4)
    label_smoothing: float = 0.0  # cDPO epsilon
    simpo_beta: float = 2.5
    simpo_gamma: float = 0.6  # SimPO target margin
    meta_interval: int = 8  # T_meta: meta-learner update every T optimiser steps (Eq. 6)
    meta_lr: float = 5e-3
    meta_weight_decay: float = 1e-4
    threshold: float = -0.5  # score threshold for threshold-sampling ablation / offline-loss threshold for ADPO
    # A tie: every reward of the pool an online pair is built from is equal (the K samples; SELM: and
    # the offline pair), counted in summary.json's `ties`. true: keep an uninformative online pair
    # anyway; false: no online pair (the prompt still trains its offline pair where the strategy
    # trains offline pairs, strategies.py).
    keep_ties: bool = False
    # The share of prompts the random-sampling strategies (metaapo_random_sampling,
    # online_dpo_random_subset) send for online samples: prompt i iff its seeded draw u_i > 1 - random_ratio.
    random_ratio: float = 0.5
    # Potential online gain l_on - l_off (paper Figure 2, middle), measured when > 0: for the sampled
    # prompts and for up to this many unsampled ones per iteration (lowest seeded draw first), which get
    # K samples annotated only for it: never trained on, not counted as annotated, timed as seconds.probe.
    probe_unsampled: int = 0


@dataclass
class RolloutConfig:
    engine: str = "torch"  # torch (CPU/GPU, KV cache) | trtllm (TensorRT-LLM, GPU only)
    temperature: float = 1.0  # Llama setting; Qwen 0.8
    top_p: float = 1.0  # Llama setting; Qwen 0.95
    max_new_tokens: int = 2048
    eval_samples: int = 1  # policy samples per held-out prompt for the reward evaluation
    eval_temperature: float = 1.0
    # torch engine: rows (prompts x K) decoded together. Its own-token KV cache takes layers x 2 x rows
    # x kv_heads x max_new_tokens x head_dim x 2 B in bf16: 17 GB for Llama-3.1-8B at 64 rows x 2048.
    max_batch_size: int = 256


@dataclass
class TrainerConfig:
    # Where the run computes, as Lightning's Trainer(accelerator=...): "auto" CUDA GPUs when the
    # machine has them, else the CPU; "gpu" CUDA GPUs, and a one-line refusal before anything loads
    # on a machine without them; "cpu" the CPU (gloo, CPU tensors) even where CUDA is available.
    accelerator: str = "auto"
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    global_batch_size: int = 128  # prompts per optimiser step (each with its offline and online pair)
    micro_batch_size: int = 2  # prompts per forward/backward
    epochs_per_iteration: int = 1  # passes over an iteration's training set
    # None: an iteration trains epochs_per_iteration passes over its training set. S: exactly S
    # optimiser steps of global_batch_size items per iteration, cut from as many reshuffled passes
    # as they need, so that methods with training sets of different sizes take equal steps.
    steps_per_iteration: Optional[int] = None
    num_threads: Optional[int] = None  # torch intra-op threads; None: torch's default
    log_every: int = 1  # optimiser steps between metric lines on the console
    # Megatron's distributed optimizer: the fp32 main weights and Adam state (12 B/param) are sharded
    # over the data-parallel ranks instead of replicated (ZeRO-1).
    use_distributed_optimizer: bool = False
    # Activation recomputation (Megatron's TransformerConfig fields of the same names). None: keep
    # every activation; "full": keep each recompute unit's input only and recompute the unit in the
    # backward pass, units set by recompute_method "uniform" (recompute_num_layers layers per unit)
    # or "block" (the first recompute_num_layers layers of each pipeline stage); "selective":
    # recompute core attention only (method and layer count unset).
    recompute_granularity: Optional[str] = None
    recompute_method: Optional[str] = None
    recompute_num_layers: Optional[int] = None
    # Checkpoints (README "Operations"): one after the annotation of every iteration, one at every
    # iteration end, and one every save_every_steps optimiser steps in training (None: none).
    save_every_steps: Optional[int] = None
    # "SIGUSR1", "SIGUSR2" or "SIGTERM": this signal makes every rank checkpoint at the next
    # optimiser-step boundary and exit with status 75, for a requeue (Slurm's --signal=USR1@300).
    # None: SIGINT and SIGTERM stop the run at once (the last checkpoint is where it resumes).
    checkpoint_signal: Optional[str] = None
    # Optimiser steps skipped for a NaN or inf loss or gradient before the run stops.
    max_skipped_steps: int = 10
    # Longest wait of a collective (torch.distributed and Megatron's groups): ranks wait for each
    # other across phases of unequal length (sampling, evaluation); torch's default is 10 minutes.
    collective_timeout_s: float = 3600.0


@dataclass
class EmbeddedTaskConfig:
    """The toy task tiny_cpu builds for itself (metaapo_nemo/data/toy_task.py) when no checkpoint or data is given."""
    enabled: bool = False
    cache_dir: str = "~/.cache/metaapo_nemo"  # tokenizer, SFT and warm-up models, data files
    num_train_pairs: int = 1536
    num_eval_prompts: int = 128
    sft_examples: int = 8192
    sft_steps: int = 600
    sft_batch_size: int = 64
    sft_lr: float = 3e-3
    warmup_dpo_steps: int = 20  # DPO warm-up of the SFT model on the offline pairs (Algorithm 1's start)
    warmup_dpo_lr: float = 5e-5
    # The offline pairs' quality and distribution shift (toy_task's module docstring); the defaults
    # are the task before these keys, byte for byte; recipe tiny_cpu sets the paper's regime.
    offline_correct: float = 0.04  # probability that one behaviour sample is the right answer
    offline_informative: float = 0.0  # share of behaviour mistakes that are one-letter errors (the policy's kind)
    offline_shift: float = 0.0  # probability of a space in each gap between two letters of a behaviour response
    # Letters per prompt, uniform in [min_letters, max_letters]; a response is its letters reversed
    # plus eos, a prompt <bos>rev:<letters>= (letters + 6 tokens). The defaults are the task before
    # these keys, byte for byte (and its cache keys); responses of 64+ tokens, the generation-heavy
    # variant of benchmarks/metaapo_cost.py, take e.g. 64 and 80 with policy.max_prompt_length,
    # policy.max_length and rollout.max_new_tokens raised to fit (validate() says by how much).
    min_letters: int = 4
    max_letters: int = 8
    # Who annotates the online samples: "programmatic", the task's exact reward (toy_task.reward);
    # "trained", a Bradley-Terry reward model that `metaapo train-reward` trains once (cached) from
    # the task's SFT model on its offline pairs (a tenth held out; its accuracy goes to the console
    # and its reward_summary.json), as the paper trains its own. The run then also scores its
    # held-out samples with the programmatic reward (reward.eval_reward_fn): the gap is reward
    # hacking. These three keys stay out of the task's cache keys (data/embedded.py, REWARD_KEYS).
    reward: str = "programmatic"
    reward_epochs: int = 3  # the held-out accuracy peaks at 3 (0.649 at lr 1e-4, seed 1234; README)
    reward_lr: float = 1e-4
    hidden_size: int = 128
    num_layers: int = 4
    num_attention_heads: int = 4
    num_query_groups: int = 2
    ffn_hidden_size: int = 352

    @property
    def max_position_embeddings(self) -> int:
        """The embedded model's position limit: 128 for the default letters (what it always was),
        room for a longest prompt and a generous response beyond; RoPE, so no weight depends on it."""
        return max(128, 2 * self.max_letters + 32)


@dataclass
class WandbConfig:
    project: str = "metaapo"
    name: str = ""  # the W&B run's name; "": the name of output_dir's folder
    entity: str = ""  # team or user; "": W&B's default entity
    # "offline": written under <log_dir>/wandb, no network (`wandb sync` uploads it later);
    # "online": streamed to the W&B server (needs `wandb login`); "disabled": W&B's no-op run.
    mode: str = "offline"


@dataclass
class LoggerConfig:
    """Experiment logging under NeMo-RL's key names (metaapo_nemo/loggers.py): every numeric scalar of
    every metrics.jsonl row, tagged <event>/<key> at the row's step, from the rank that writes
    metrics.jsonl. metrics.jsonl is written either way."""
    tensorboard_enabled: bool = False  # event files under <log_dir>/tensorboard (`tensorboard --logdir`)
    wandb_enabled: bool = False  # a W&B run under <log_dir>/wandb; needs `pip install wandb`
    log_dir: str = ""  # "": <output_dir>/logs
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class MetaAPOConfig:
    output_dir: str = "results/metaapo"
    seed: int = 1234
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    task: EmbeddedTaskConfig = field(default_factory=EmbeddedTaskConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def validate(self, on_this_machine: bool = True) -> None:
        """Raise ConfigError naming each bad key and what to set instead. on_this_machine=False: the
        run will start elsewhere (a Slurm job's container), so what only that machine can tell
        (is tensorrt_llm installed?) is not checked here; the job checks it when it starts."""
        from metaapo_nemo.algorithm.strategies import resolve_strategy

        problems = []
        strategy = None
        try:
            strategy = resolve_strategy(self.algo.name, self.algo.loss)
        except ValueError as e:
            problems.append(f"algo.name/algo.loss: {e}")
        if strategy is not None and strategy.objective == "cdpo" and self.algo.label_smoothing == 0:
            problems.append("algo.label_smoothing=0.0: the cdpo loss needs its label noise in (0, 0.5), e.g. "
                            "algo.label_smoothing=0.1 (at 0 it is plain DPO: use algo.name=dpo)")
        if strategy is not None and strategy.sampling == "adpo" and self.algo.threshold <= 0:
            problems.append(f"algo.threshold={self.algo.threshold}: adpo samples the pairs whose DPO loss is below "
                            "it, and a DPO loss is never negative: give a loss, e.g. algo.threshold=0.6 "
                            "(log 2 = 0.693 is the loss at a zero margin)")
        positive = {
            "algo.iterations": self.algo.iterations, "algo.num_samples": self.algo.num_samples,
            "algo.meta_interval": self.algo.meta_interval, "trainer.global_batch_size": self.trainer.global_batch_size,
            "trainer.micro_batch_size": self.trainer.micro_batch_size, "rollout.max_new_tokens": self.rollout.max_new_tokens,
            "trainer.epochs_per_iteration": self.trainer.epochs_per_iteration,
            "rollout.max_batch_size": self.rollout.max_batch_size,
            "trainer.max_skipped_steps": self.trainer.max_skipped_steps,
        }
        problems += [f"{k}={v}: must be a positive integer" for k, v in positive.items() if not (isinstance(v, int) and v > 0)]
        if self.trainer.global_batch_size % self.trainer.micro_batch_size:
            problems.append(f"trainer.global_batch_size={self.trainer.global_batch_size} must be a multiple of "
                            f"trainer.micro_batch_size={self.trainer.micro_batch_size}")
        if isinstance(self.rollout.max_batch_size, int) and self.rollout.max_batch_size < self.algo.num_samples:
            problems.append(f"rollout.max_batch_size={self.rollout.max_batch_size} must be >= algo.num_samples="
                            f"{self.algo.num_samples}: a prompt's K samples decode together")
        if self.algo.num_samples < 2:
            problems.append("algo.num_samples must be >= 2: the online pair is the best and worst of K samples")
        if self.policy.max_prompt_length >= self.policy.max_length:
            problems.append(f"policy.max_prompt_length={self.policy.max_prompt_length} must be below policy.max_length="
                            f"{self.policy.max_length}: a prompt that long leaves no room for its response")
        if self.algo.beta <= 0:
            problems.append(f"algo.beta={self.algo.beta}: must be > 0")
        if not (isinstance(self.algo.probe_unsampled, int) and self.algo.probe_unsampled >= 0):
            problems.append(f"algo.probe_unsampled={self.algo.probe_unsampled}: must be an integer >= 0 "
                            "(0: no potential-gain measurement)")
        if not 0 <= self.algo.label_smoothing < 0.5:
            problems.append(f"algo.label_smoothing={self.algo.label_smoothing}: must be in [0, 0.5)")
        t = self.trainer
        if t.accelerator not in ("auto", "gpu", "cpu"):
            problems.append(f"trainer.accelerator={t.accelerator!r}: use 'auto', 'gpu' or 'cpu'")
        if t.recompute_granularity == "full":
            if t.recompute_method not in ("uniform", "block") or not (isinstance(t.recompute_num_layers, int)
                                                                    and t.recompute_num_layers > 0):
                problems.append("trainer.recompute_granularity=full needs trainer.recompute_method=uniform|block and "
                                f"trainer.recompute_num_layers=N > 0 (got {t.recompute_method!r}, {t.recompute_num_layers!r})")
        elif t.recompute_granularity == "selective":
            if t.recompute_method is not None or t.recompute_num_layers is not None:
                problems.append("trainer.recompute_granularity=selective recomputes core attention only: leave "
                                "trainer.recompute_method and trainer.recompute_num_layers unset (None)")
        elif t.recompute_granularity is not None:
            problems.append(f"trainer.recompute_granularity={t.recompute_granularity!r}: use None, 'selective' or 'full'")
        if t.save_every_steps is not None and not (isinstance(t.save_every_steps, int) and t.save_every_steps > 0):
            problems.append(f"trainer.save_every_steps={t.save_every_steps!r}: a positive integer, or None for no "
                            "checkpoints inside training")
        if t.steps_per_iteration is not None and not (isinstance(t.steps_per_iteration, int)
                                                      and not isinstance(t.steps_per_iteration, bool)
                                                      and t.steps_per_iteration > 0):
            problems.append(f"trainer.steps_per_iteration={t.steps_per_iteration!r}: a positive integer, or None for "
                            "trainer.epochs_per_iteration passes")
        elif t.steps_per_iteration is not None and t.epochs_per_iteration != 1:
            problems.append(f"trainer.steps_per_iteration={t.steps_per_iteration} sets the iteration's length by itself: "
                            f"leave trainer.epochs_per_iteration at 1 (got {t.epochs_per_iteration}), or unset one of them")
        if not (isinstance(self.algo.random_ratio, (int, float)) and not isinstance(self.algo.random_ratio, bool)
                and 0 < self.algo.random_ratio <= 1):
            problems.append(f"algo.random_ratio={self.algo.random_ratio!r}: the share of prompts sampled, in (0, 1]")
        if t.checkpoint_signal not in (None, "SIGUSR1", "SIGUSR2", "SIGTERM"):
            problems.append(f"trainer.checkpoint_signal={t.checkpoint_signal!r}: use SIGUSR1, SIGUSR2, SIGTERM or None")
        r = self.reward
        if not (isinstance(r.timeout_s, (int, float)) and r.timeout_s > 0):
            problems.append(f"reward.timeout_s={r.timeout_s!r}: must be > 0 seconds")
        if r.call_timeout_s is not None and not (isinstance(r.call_timeout_s, (int, float))
                                                 and r.call_timeout_s >= r.timeout_s):
            problems.append(f"reward.call_timeout_s={r.call_timeout_s!r}: must be >= reward.timeout_s ({r.timeout_s}), "
                            "or None")
        for key, value in (("reward.startup_timeout_s", r.startup_timeout_s),
                           ("trainer.collective_timeout_s", t.collective_timeout_s)):
            if not (isinstance(value, (int, float)) and value > 0):
                problems.append(f"{key}={value!r}: must be > 0 seconds")
        if not (isinstance(r.max_retries, int) and r.max_retries >= 0):
            problems.append(f"reward.max_retries={r.max_retries!r}: must be an integer >= 0")
        cache_dir = self.reference.logp_cache_dir
        if not (cache_dir is None or isinstance(cache_dir, str)):
            problems.append(f"reference.logp_cache_dir={cache_dir!r}: a folder, 'auto' (<task.cache_dir>/reference_logps) "
                            "or '' / None (no cache)")
        elif cache_dir and cache_dir != "auto" and os.path.exists(os.path.expanduser(cache_dir)) \
                and not os.path.isdir(os.path.expanduser(cache_dir)):
            problems.append(f"reference.logp_cache_dir={cache_dir}: a file, not a folder; give a folder, 'auto' or '' (no cache)")
        if not isinstance(t.use_distributed_optimizer, bool):
            problems.append(f"trainer.use_distributed_optimizer={t.use_distributed_optimizer!r}: use true or false")
        if not 0 < self.rollout.top_p <= 1:
            problems.append(f"rollout.top_p={self.rollout.top_p}: must be in (0, 1]")
        if self.rollout.temperature <= 0:
            problems.append(f"rollout.temperature={self.rollout.temperature}: must be > 0")
        if self.rollout.engine == "trtllm":
            from metaapo_nemo.rollout.trtllm_engine import trtllm_unavailable_reason

            if on_this_machine and (reason := trtllm_unavailable_reason()) is not None:
                problems.append(f"rollout.engine=trtllm: {reason}")
        elif self.rollout.engine != "torch":
            problems.append(f"rollout.engine={self.rollout.engine!r}: use 'torch' or 'trtllm'")
        problems += _logger_problems(self.logger, on_this_machine)
        problems += _reward_source_problems(self)
        if self.task.enabled:
            problems += _embedded_task_problems(self)
        if not self.task.enabled:
            if self.policy.hf_path is None:
                problems.append("policy.hf_path is not set: give a Hugging Face checkpoint folder (or use --recipe tiny_cpu)")
            if self.data.train is None:
                problems.append("data.train is not set: give a preference file (jsonl/parquet/save_to_disk folder) or NAME:SPLIT")
            if self.data.eval is None:
                problems.append("data.eval is not set: give a file of held-out prompts")
            if self.reward.url is None and self.reward.reward_fn is None and self.reward.model_dir is None:
                problems.append("no reward model: set reward.url=URL, reward.reward_fn=MODULE:FUNCTION or reward.model_dir=DIR")
        if problems:
            raise ConfigError("invalid configuration:\n  - " + "\n  - ".join(problems))

    def reference_logp_cache_dir(self) -> str | None:
        """The folder reference.logp_cache_dir names ("auto" resolved), or None when the cache is off."""
        cache_dir = self.reference.logp_cache_dir
        if not cache_dir:
            return None
        if cache_dir == "auto":
            return os.path.join(os.path.expanduser(self.task.cache_dir), "reference_logps")
        return os.path.expanduser(cache_dir)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _logger_problems(logger: LoggerConfig, on_this_machine: bool) -> list[str]:
    """What the `logger` section needs: booleans, a known W&B mode, and the backends it turns on installed."""
    import importlib.util

    problems = [f"logger.{key}={getattr(logger, key)!r}: use true or false"
                for key in ("tensorboard_enabled", "wandb_enabled") if not isinstance(getattr(logger, key), bool)]
    if not isinstance(logger.log_dir, str):
        problems.append(f"logger.log_dir={logger.log_dir!r}: a folder, or '' for <output_dir>/logs")
    if not isinstance(logger.wandb, WandbConfig):
        return problems + [f"logger.wandb={logger.wandb!r}: a section; set its keys, e.g. logger.wandb.project=NAME"]
    if logger.wandb.mode not in ("offline", "online", "disabled"):
        problems.append(f"logger.wandb.mode={logger.wandb.mode!r}: use 'offline', 'online' or 'disabled'")
    for key in ("project", "name", "entity"):
        if not isinstance(getattr(logger.wandb, key), str):
            problems.append(f"logger.wandb.{key}={getattr(logger.wandb, key)!r}: a string")
    if on_this_machine and logger.tensorboard_enabled is True and importlib.util.find_spec("tensorboard") is None:
        problems.append("logger.tensorboard_enabled=true: tensorboard is not installed; pip install tensorboard, "
                        "or set logger.tensorboard_enabled=false")
    if on_this_machine and logger.wandb_enabled is True and importlib.util.find_spec("wandb") is None:
        problems.append("logger.wandb_enabled=true: wandb is not installed; pip install wandb (or pip install "
                        "'metaapo-nemo[wandb]'), or set logger.wandb_enabled=false")
    return problems


def _reward_source_problems(c: MetaAPOConfig) -> list[str]:
    """Who annotates (task.reward) and who else scores the held-out samples (reward.eval_*)."""
    task, r = c.task, c.reward
    problems = []
    if r.eval_reward_fn is not None and r.eval_url is not None:
        problems.append("reward.eval_reward_fn and reward.eval_url are both set; the eval reward is one of them: "
                        "set the other to None")
    if task.reward not in ("programmatic", "trained"):
        problems.append(f"task.reward={task.reward!r}: use 'programmatic' (the toy task's exact reward) or 'trained' "
                        "(a reward model trained on its offline pairs)")
    elif task.reward == "trained":
        if not task.enabled:
            problems.append("task.reward=trained trains a reward model on the embedded task's pairs, but task.enabled "
                            "is false: use --recipe tiny_cpu, or train one with `metaapo train-reward` and give "
                            "reward.model_dir=DIR")
        for key in ("url", "model_dir"):
            if getattr(r, key) is not None:
                problems.append(f"reward.{key}={getattr(r, key)} and task.reward=trained both name who annotates: "
                                f"unset reward.{key}, or set task.reward=programmatic")
        if r.reward_fn not in (None, EMBEDDED_REWARD_FN):
            problems.append(f"reward.reward_fn={r.reward_fn} and task.reward=trained both name who annotates: unset "
                            "reward.reward_fn, or set task.reward=programmatic")
        if not (isinstance(task.reward_epochs, int) and task.reward_epochs >= 1):
            problems.append(f"task.reward_epochs={task.reward_epochs!r}: must be an integer >= 1")
        if not (isinstance(task.reward_lr, (int, float)) and task.reward_lr > 0):
            problems.append(f"task.reward_lr={task.reward_lr!r}: must be > 0")
    return problems


def _embedded_task_problems(c: MetaAPOConfig) -> list[str]:
    """What the embedded task's letter range needs of the length limits (toy_task.make_prompts)."""
    task = c.task
    if not (isinstance(task.min_letters, int) and isinstance(task.max_letters, int)
            and 1 <= task.min_letters <= task.max_letters):
        return [f"task.min_letters={task.min_letters!r}, task.max_letters={task.max_letters!r}: letters per prompt, "
                "integers with 1 <= task.min_letters <= task.max_letters"]
    problems, prompt, response = [], task.max_letters + 6, task.max_letters + 1  # <bos>rev:...= and letters + eos
    if c.policy.max_prompt_length < prompt:
        problems.append(f"task.max_letters={task.max_letters} makes prompts of up to {prompt} tokens: raise "
                        f"policy.max_prompt_length={c.policy.max_prompt_length} to at least {prompt}")
    if c.policy.max_length < prompt + response:
        problems.append(f"task.max_letters={task.max_letters} makes prompt + answer up to {prompt + response} tokens: "
                        f"raise policy.max_length={c.policy.max_length} to at least {prompt + response}")
    if isinstance(c.rollout.max_new_tokens, int) and c.rollout.max_new_tokens < response:
        problems.append(f"task.max_letters={task.max_letters} needs answers of up to {response} tokens (eos included): "
                        f"raise rollout.max_new_tokens={c.rollout.max_new_tokens} to at least {response}")
    elif isinstance(c.rollout.max_new_tokens, int) and prompt + c.rollout.max_new_tokens > task.max_position_embeddings:
        problems.append(f"a {prompt}-token prompt and rollout.max_new_tokens={c.rollout.max_new_tokens} exceed the "
                        f"embedded model's {task.max_position_embeddings} positions (2 x task.max_letters + 32): lower "
                        f"rollout.max_new_tokens to at most {task.max_position_embeddings - prompt}")
    return problems


# The environment variable that carries the reward server's bearer token (to the server, and to the
# trainer when reward.token is unset), so that it never sits on a command line.
REWARD_TOKEN_ENV = "METAAPO_REWARD_TOKEN"
# The embedded task's programmatic reward (recipe tiny_cpu's reward.reward_fn), MODULE:FUNCTION.
EMBEDDED_REWARD_FN = "metaapo_nemo.data.toy_task:reward"


class ConfigError(ValueError):
    pass


def one_line(error: BaseException) -> str:
    """An exception's message on one line: the entry points print a user's error as one line."""
    return " ".join(str(error).split())


def apply_overrides(config: Any, overrides: list[str]) -> None:
    """Apply `a.b=v` overrides (NeMo-Run syntax, plain assignment) to a dataclass tree in place."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected KEY=VALUE, e.g. algo.beta=0.2")
        target, leaf = _key_owner(config, key.strip(), f"override {item!r}")
        value = _parse_value(raw.strip())
        if not dataclasses.is_dataclass(getattr(target, leaf)):
            import typing

            expected = typing.get_type_hints(type(target)).get(leaf, Any)
            if not _is_of_type(value, expected):
                if str not in _type_members(expected):
                    raise ConfigError(f"override {item!r}: expected {_describe_type(expected)}")
                value = raw.strip()  # a string field given digits or true: the text as typed
        setattr(target, leaf, value)


def _key_owner(config: Any, key: str, what: str) -> tuple[Any, str]:
    """The dataclass that holds dotted `key` of `config`, and the key's last part; a ConfigError
    naming `what` (the override, or the file and key) when a section or key does not exist."""
    *parents, leaf = key.split(".")
    target = config
    for part in parents:
        if not hasattr(target, part):
            raise ConfigError(f"{what}: no config section {part!r}")
        target = getattr(target, part)
    if not dataclasses.is_dataclass(target) or leaf not in {f.name for f in dataclasses.fields(target)}:
        valid = ", ".join(f.name for f in dataclasses.fields(target)) if dataclasses.is_dataclass(target) else ""
        raise ConfigError(f"{what}: unknown key {leaf!r}; valid keys here: {valid}")
    return target, leaf


def _parse_value(raw: str) -> Any:
    lowered = raw.lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        return raw


# Configs as files (`metaapo run --config FILE`, README "Configs as files"). The keys NeMo-Run's
# serialiser writes next to a Partial's and a Config's arguments (`nemo llm metaapo --to-yaml`).
NEMO_RUN_KEYS = ("_target_", "_partial_")


def load_config_file(config: Any, path: str | os.PathLike) -> None:
    """Apply the YAML file `path` (omegaconf) to the dataclass tree `config` in place: nested sections
    as the dataclasses nest (`algo: {beta: 0.2}`, top-level `output_dir`, `seed`), every section and
    key optional (absent ones keep config's values), NeMo-Run's `_target_` / `_partial_` ignored, so
    that the file `nemo llm metaapo --to-yaml` writes loads too. A file that cannot be read or parsed,
    an unknown section or key (the messages of apply_overrides) and a value of the wrong type raise
    a one-line ConfigError naming the file and the key. The caller validates the result."""
    import yaml
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        tree = OmegaConf.load(path)
    except FileNotFoundError:
        raise ConfigError(f"config file {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"config file {path}: cannot read it: {e.strerror or one_line(e)}") from None
    except (yaml.YAMLError, OmegaConfBaseException, UnicodeDecodeError) as e:
        raise ConfigError(f"config file {path}: not valid YAML: {one_line(e)}") from None
    try:
        tree = OmegaConf.to_container(tree, resolve=True)  # ${...} interpolations resolved
    except OmegaConfBaseException as e:
        raise ConfigError(f"config file {path}: {one_line(e)}") from None
    if not tree:  # an empty file: nothing to change
        return
    if not isinstance(tree, dict):
        raise ConfigError(f"config file {path}: expected a mapping of config keys and sections "
                          f"(e.g. `algo: {{beta: 0.2}}`), got a {type(tree).__name__}")
    _apply_tree(config, tree, "", f"config file {path}")


def _apply_tree(target: Any, tree: dict, prefix: str, where: str) -> None:
    import typing

    for name, value in tree.items():
        if name in NEMO_RUN_KEYS:
            continue
        key = f"{prefix}{name}"
        if isinstance(value, dict) and "." not in str(name) and not hasattr(target, str(name)):
            raise ConfigError(f"{where}: {key}: no config section {name!r}")  # as apply_overrides says it
        owner, leaf = _key_owner(target, str(name), f"{where}: {key}")  # a dotted `algo.beta: 0.2` too
        current = getattr(owner, leaf)
        if dataclasses.is_dataclass(current):
            if value is None:  # `section:` with every key commented out
                continue
            if not isinstance(value, dict):
                example = dataclasses.fields(current)[0].name
                raise ConfigError(f"{where}: {key}={value!r}: {key} is a config section: give its keys, "
                                  f"e.g. `{name}: {{{example}: ...}}`")
            _apply_tree(current, value, f"{key}.", where)
            continue
        expected = typing.get_type_hints(type(owner)).get(leaf, Any)
        if not _is_of_type(value, expected):
            hint = " (quote it to make it a string)" if str in _type_members(expected) \
                and isinstance(value, (bool, int, float)) else ""
            raise ConfigError(f"{where}: {key}={value!r}: expected {_describe_type(expected)}{hint}")
        setattr(owner, leaf, value)


def _type_members(tp: Any) -> tuple:
    import typing

    return typing.get_args(tp) if typing.get_origin(tp) is Union else (tp,)


def _is_of_type(value: Any, tp: Any) -> bool:
    """Whether a YAML value fits a config field's annotation (an int fits a float field)."""
    import typing

    origin = typing.get_origin(tp)
    if tp is Any:
        return True
    if origin is Union:
        return any(_is_of_type(value, member) for member in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if tp is bool:
        return isinstance(value, bool)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if tp is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if origin in (list, tuple):  # YAML has lists only; the items are checked against the first argument
        args = typing.get_args(tp)
        return isinstance(value, list) and (not args or all(_is_of_type(v, args[0]) for v in value))
    if origin is dict:
        return isinstance(value, dict)
    if origin is typing.Literal:
        return value in typing.get_args(tp)
    if isinstance(tp, type):
        return isinstance(value, tp)
    return True  # an annotation this reader does not know: validate() has the last word


def _describe_type(tp: Any) -> str:
    import typing

    names = {str: "a string", int: "an integer", float: "a number", bool: "true or false", type(None): "null"}
    members = _type_members(tp)
    if len(members) > 1:
        return " or ".join(_describe_type(m) for m in members)
    if typing.get_origin(tp) in (list, tuple):
        return "a list" + (f" of {_describe_type(typing.get_args(tp)[0]).split(' ', 1)[-1]}s"
                           if typing.get_args(tp) else "")
    if typing.get_origin(tp) is dict:
        return "a mapping"
    return names.get(tp, getattr(tp, "__name__", str(tp)))


def dump_config_file(config: Any, header: str = "") -> str:
    """`config` as the plain nested YAML load_config_file reads (every key, sections as they nest)."""
    from omegaconf import OmegaConf

    text = OmegaConf.to_yaml(OmegaConf.create(dataclasses.asdict(config)))
    return "".join(f"# {line}\n" if line else "#\n" for line in header.splitlines()) + text
