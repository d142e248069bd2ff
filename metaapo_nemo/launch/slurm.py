"""A heterogeneous Slurm job: the MetaAPO trainer (het group 0) beside its reward server (het group 1).

The reward model is a separate server process (CONTRACTS.md; NeMo-Aligner ran its reward model the
same way, as its own het group). NeMo-Run renders a list of tasks with a list of SlurmExecutors as
one sbatch script with `#SBATCH hetjob` between the groups and one `srun --het-group=i` per task.

How the trainer finds the server. The server's host is only known once Slurm has placed the job, so
the sbatch script resolves it, outside the container where `scontrol` exists, from
`$SLURM_JOB_NODELIST_HET_GROUP_1` (`scontrol show hostnames`, one URL per reward node, joined by
commas: the reward client spreads its batches over several servers) and exports it as
`METAAPO_REWARD_URL`; the trainer's command passes `reward.url="$METAAPO_REWARD_URL"`. The trainer
waits for `/health` on every URL (`reward.startup_timeout_s`) before its first request, so the reward group
may start later or load its model for a while.

Why the trainer group is a script calling torchrun itself rather than NeMo-Run's torchrun launcher:
NeMo-Run merges a het job's executors into one and applies the first executor's launcher to every
task, which would start the reward server under torchrun with the trainer's rank count. So no group
has a launcher; the trainer's script runs `torchrun ... -m metaapo_nemo run --recipe R overrides`,
the job without NeMo-Run (the same command as launcher_configs/metaapo.sbatch), with the resolved
configuration written out as overrides. Its rendezvous host is the first node of het group 0
(`METAAPO_RDZV_HOST`), never a reward node.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import os
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import nemo_run as run

from metaapo_nemo import config as C

REWARD_URL_ENV = "METAAPO_REWARD_URL"
RDZV_HOST_ENV = "METAAPO_RDZV_HOST"
TOKEN_ENV = C.REWARD_TOKEN_ENV
# Slurm's warning before the time limit (`--signal=USR1@300`) and the trainer's matching setting: five
# minutes for every rank to reach an optimiser-step boundary and write a checkpoint.
SLURM_SIGNAL, CHECKPOINT_SIGNAL = "USR1@300", "SIGUSR1"
# As NeMo 2.0's NeMo-Run executors set them (DEFAULT_ENV_VARS of its llm recipe examples), plus NCCL
# errors raised as exceptions (a dead peer ends the job instead of hanging it) and no hub downloads
# from compute nodes: every input is a local path.
CLUSTER_ENV = {"TORCH_NCCL_AVOID_RECORD_STREAMS": "1", "NCCL_NVLS_ENABLE": "0", "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
               "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               # srun does not take sbatch's --cpus-per-task from Slurm 22.05 on: without this the one
               # task per node (torchrun and all its ranks) would get one CPU.
               "SRUN_CPUS_PER_TASK": "$SLURM_CPUS_PER_TASK"}
RDZV_PORT = 29500
TRAINER_GROUP, REWARD_GROUP = 0, 1
TASK_NAME = "train"  # job names: metaapo-train (one group), metaapo-train-0 / -1 (het groups)


@dataclass
class RewardGroup:
    """The reward-server het group: `metaapo serve-reward` once on each of `nodes` nodes."""
    nodes: int = 1
    gpus_per_node: Optional[int] = 1  # the server scores on one GPU (cuda:0); None: a CPU-only group
    port: int = 5000
    container_image: Optional[str] = None  # None: the trainer's image


def config_from_partial(task: run.Partial) -> C.MetaAPOConfig:
    """The MetaAPOConfig a `nemo llm metaapo` task (a run.Partial of the entry point) would run."""
    import fiddle as fdl

    built = fdl.build(task)
    return C.MetaAPOConfig(**built.keywords)


def config_overrides(config: C.MetaAPOConfig, recipe: str) -> list[str]:
    """`key=value` overrides that turn recipe `recipe` into `config` (`metaapo run --recipe R ...`).

    Only the keys that differ are written. A string is written bare when `metaapo run` would read it
    back as the same string, else as a Python literal, so every value survives the round trip.
    """
    from metaapo_nemo.recipes import get_recipe

    base = _flatten(dataclasses.asdict(get_recipe(recipe)))
    wanted = _flatten(config.to_dict())
    return [f"{key}={_literal(value)}" for key, value in wanted.items() if base.get(key, object()) != value]


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _literal(value: Any) -> str:
    # C._parse_value is the reader of `metaapo run` overrides (config.apply_overrides).
    if isinstance(value, str) and C._parse_value(value) == value:
        return value
    return repr(value)


def trainer_script(config: C.MetaAPOConfig, recipe: str, *, nodes: int, nproc_per_node: int,
                   reward_group: bool = True) -> str:
    """The trainer group's shell script: torchrun over `nodes` x `nproc_per_node` ranks running
    `metaapo run`, checkpointing on Slurm's USR1; with `reward_group`, pointed at it through $METAAPO_REWARD_URL.

    The token never appears here: the trainer reads $METAAPO_REWARD_TOKEN (exported by the sbatch script)."""
    moved = ("reward.token=", "trainer.checkpoint_signal=")
    if reward_group:  # the reward model's settings go to the server group; the trainer only talks to it
        moved += ("reward.url=", "reward.reward_fn=", "reward.model_dir=")
    overrides = [shlex.quote(o) for o in config_overrides(config, recipe) if not o.startswith(moved)]
    overrides.append(f"trainer.checkpoint_signal={CHECKPOINT_SIGNAL}")
    if reward_group:
        overrides += ["reward.reward_fn=None", "reward.model_dir=None", f'"reward.url=${{{REWARD_URL_ENV}}}"']
    log_dir = f'{shlex.quote(config.output_dir)}/logs/"job-${{SLURM_JOB_ID}}-$(hostname)"'
    lines = [
        f"# MetaAPO trainer (het group {TRAINER_GROUP}): one torchrun agent per node, {nproc_per_node} ranks each.",
        f"# {RDZV_HOST_ENV} (the first trainer node's address) is exported by the sbatch script.",
        "set -euo pipefail",
        "# Slurm's --signal reaches every process of the step, torchrun too, whose default action for USR1",
        "# is to die and take its ranks with it. An ignored signal stays ignored across exec, so torchrun",
        "# lives on; each rank installs its own handler (trainer.checkpoint_signal).",
        "trap '' USR1",
        "# Each rank's output in its own file under output_dir/logs, and on the job's log (--tee 3).",
        f"exec torchrun --nnodes={nodes} --nproc-per-node={nproc_per_node} --rdzv-backend=c10d \\",
        f'    --rdzv-endpoint="${{{RDZV_HOST_ENV}}}:{RDZV_PORT}" --rdzv-id="${{SLURM_JOB_ID}}" \\',
        f"    --log-dir={log_dir} --redirects=3 --tee=3 \\",
        f"    -m metaapo_nemo run --recipe {shlex.quote(recipe)} \\",
    ]
    lines += [f"    {o} \\" for o in overrides[:-1]] + [f"    {overrides[-1]}", ""]
    return "\n".join(lines)


def reward_server_script(reward: C.RewardConfig, port: int) -> str:
    """The reward group's shell script: `metaapo serve-reward`, alive through Slurm's USR1 (it is no rank)."""
    args = " ".join(shlex.quote(a) for a in reward_server_args(reward, port))
    return "\n".join([
        "# Slurm's time-limit USR1 reaches this step too; the server ends when the trainer does, not then.",
        "trap '' USR1",
        f"exec python -m metaapo_nemo {args}",
        ""])


def reward_server_args(reward: C.RewardConfig, port: int) -> list[str]:
    """`metaapo serve-reward` arguments for the reward group, from the run's reward settings."""
    if reward.url is not None:
        raise C.ConfigError(f"reward.url={reward.url!r} names an existing server, so no reward group is started: "
                            "drop reward.url, or drop run.reward_nodes")
    if (reward.model_dir is None) == (reward.reward_fn is None):
        raise C.ConfigError("a reward group serves one reward model: set exactly one of reward.model_dir=DIR "
                            "or reward.reward_fn=MODULE:FUNCTION")
    source = ["--model", reward.model_dir] if reward.model_dir else ["--reward-fn", reward.reward_fn]
    # 0.0.0.0: the trainer connects from other nodes. The server reads the job's token from
    # $METAAPO_REWARD_TOKEN (job_setup), so it never listens without one.
    return ["serve-reward", "--host", "0.0.0.0", "--port", str(port), *source]


def job_setup(output_dir: str, reward_group: bool) -> str:
    """Lines the sbatch script runs before its sruns: a per-job reward token, and the requeue rule.

    The requeue rule: the job is requeued when the run asked for it, by leaving output_dir/requeue
    after the checkpoint that Slurm's time-limit signal (trainer.checkpoint_signal) made every rank
    take; the rerun resumes from that checkpoint and removes the file. A crash, a user's error or a
    scancel leave no such file and are not requeued here: failures are NeMo-Run's retries' to
    repeat (its template requeues any failure while SLURM_RESTART_COUNT < retries), and this rule
    acts only once those are spent, so the two never requeue the same ending.
    """
    marker = shlex.quote(f"{output_dir}/requeue")
    lines = []
    if reward_group:
        lines += [
            "# A token per job shared by both groups through the environment; off the log (set +x).",
            "{ set +x; } 2>/dev/null",
            f"export {TOKEN_ENV}=${{{TOKEN_ENV}:-$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n')}}",
            "set -x",
        ]
    lines += [
        f"requeue_marker={marker}",
        "requeue_if_asked() {",
        '    if [ "${TORCHX_MAX_RETRIES:-0}" -le "${SLURM_RESTART_COUNT:-0}" ] && [ -f "$requeue_marker" ]; then',
        '        scontrol requeue "$SLURM_JOB_ID"',
        "    fi",
        "}",
        "trap requeue_if_asked EXIT",
    ]
    return "\n".join(lines)


def default_mounts(config: C.MetaAPOConfig) -> list[str]:
    """`SRC:SRC` for each folder the run reads or writes (output_dir, the models, the data, $HF_HOME),
    a parent covering its children: the container sees the shared filesystem at the same paths."""
    folders = [config.output_dir, config.policy.hf_path, config.reference.hf_path, config.reward.model_dir,
               os.environ.get("HF_HOME")]
    # A data file's folder (a save_to_disk folder is itself one); this machine may not see the paths.
    folders += [d if Path(d).is_dir() else str(Path(d).parent) for d in (config.data.train, config.data.eval) if d]
    folders = sorted({str(Path(f)) for f in folders if f and os.path.isabs(f)})
    kept = [f for f in folders if not any(is_under(f, other) for other in folders if other != f)]
    return [f"{f}:{f}" for f in kept]


def is_under(path: str, folder: str) -> bool:
    return Path(path).is_relative_to(folder)


def job_name(output_dir: str) -> str:
    """One name per output_dir: with --dependency=singleton, two jobs never write it at once."""
    return f"metaapo-{hashlib.sha1(output_dir.encode()).hexdigest()[:8]}"


def reward_url_export(port: int) -> str:
    """Shell text, run in the sbatch script, giving `http://host:port` for every reward node, comma-joined."""
    return (f'$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{REWARD_GROUP}" '
            f"| sed 's|.*|http://&:{port}|' | paste -sd, -)")


def rdzv_host_export(nodelist: str = f"$SLURM_JOB_NODELIST_HET_GROUP_{TRAINER_GROUP}") -> str:
    """Shell text giving the first trainer node's IP address: torchrun's rendezvous host, never a
    reward node. An address, not a name: a node's short name may not resolve from the others."""
    return f'$(getent hosts "$(scontrol show hostnames "{nodelist}" | head -n1)" | awk \'{{print $1; exit}}\')'


@contextlib.contextmanager
def build_experiment(
    config: Union[C.MetaAPOConfig, run.Partial],
    executor: Union[run.SlurmExecutor, run.LocalExecutor],
    *,
    reward: Optional[RewardGroup] = None,
    recipe: str = "tiny_cpu",
    name: str = "metaapo",
) -> Iterator[run.Experiment]:
    """The MetaAPO job as an entered run.Experiment: `with build_experiment(...) as exp: exp.dryrun()`.

    On a SlurmExecutor: the trainer script (torchrun, trainer_script) as one group, and with `reward`
    the reward server as a second het group. On a LocalExecutor: one task, the `nemo llm metaapo`
    entry point under the executor's own launcher (torchrun). `executor` describes the trainer:
    nodes, gpus_per_node (one rank per GPU), container image and mounts, account, partition, time
    (executors.slurm makes one). `recipe` is the base the trainer's `metaapo run --recipe` starts
    from; any recipe reproduces `config`, only the override list's length differs. NeMo-Run adds jobs
    only inside the experiment's context, hence a context manager.
    """
    task = config if isinstance(config, run.Partial) else None
    config = config_from_partial(config) if task is not None else config
    if not isinstance(executor, run.SlurmExecutor):
        if reward is not None:
            raise C.ConfigError("a reward group needs the slurm executor (run.executor=slurm), "
                                f"got {type(executor).__name__}")
        if task is None:
            from metaapo_nemo.launch.nemo_cli import to_partial

            task = to_partial(config)
        with run.Experiment(name, executor=executor) as experiment:
            experiment.add(task, executor=executor, name=TASK_NAME, tail_logs=True)
            yield experiment
        return

    nproc = executor.gpus_per_node or executor.ntasks_per_node
    trainer_ex = _trainer_executor(executor, config, reward)
    tasks, executors_ = [run.Script(inline=trainer_script(config, recipe, nodes=executor.nodes, nproc_per_node=nproc,
                                                          reward_group=reward is not None))], [trainer_ex]
    if reward is not None:
        tasks.append(run.Script(inline=reward_server_script(config.reward, reward.port)))
        executors_.append(_reward_executor(executor, reward, trainer_ex.container_mounts))
    with run.Experiment(name, executor=trainer_ex) as experiment:
        experiment.add(tasks if reward else tasks[0], executor=executors_ if reward else trainer_ex, name=TASK_NAME,
                       tail_logs=True)
        yield experiment


def _trainer_executor(executor: run.SlurmExecutor, config: C.MetaAPOConfig,
                      reward: Optional[RewardGroup]) -> run.SlurmExecutor:
    trainer_ex = executor.clone()
    trainer_ex.launcher = None  # the script runs torchrun itself (module docstring)
    trainer_ex.ntasks_per_node, trainer_ex.torchrun_nproc_per_node = 1, None  # one torchrun agent per node
    trainer_ex.heterogeneous = reward is not None
    nodelist = f"$SLURM_JOB_NODELIST_HET_GROUP_{TRAINER_GROUP}" if reward else "$SLURM_JOB_NODELIST"
    trainer_ex.env_vars = {**CLUSTER_ENV, **executor.env_vars, RDZV_HOST_ENV: rdzv_host_export(nodelist)}
    if reward is not None:
        trainer_ex.env_vars[REWARD_URL_ENV] = reward_url_export(reward.port)
    trainer_ex.container_mounts = executor.container_mounts or default_mounts(config)
    trainer_ex.job_details.job_name = job_name(config.output_dir)
    trainer_ex.additional_parameters = {**(executor.additional_parameters or {}), "dependency": "singleton"}
    trainer_ex.setup_lines = "\n".join(filter(None, [executor.setup_lines, job_setup(config.output_dir, bool(reward))]))
    return trainer_ex


def _reward_executor(executor: run.SlurmExecutor, reward: RewardGroup, mounts: list[str]) -> run.SlurmExecutor:
    reward_ex = executor.clone()
    reward_ex.container_mounts = mounts
    reward_ex.launcher = None
    reward_ex.nodes, reward_ex.ntasks_per_node = reward.nodes, 1
    reward_ex.gpus_per_node, reward_ex.gpus_per_task = reward.gpus_per_node, None
    reward_ex.torchrun_nproc_per_node = None
    reward_ex.container_image = reward.container_image or executor.container_image
    reward_ex.env_vars = {**CLUSTER_ENV, **executor.env_vars}
    return reward_ex
