"""A heterogeneous Slurm job: the MetaAPO trainer (het group 0) beside its reward server (het group 1).

The reward model is a separate server process (CONTRACTS.md; NeMo-Aligner ran its reward model the
same way, as its own het group). NeMo-Run renders a list of tasks with a list of SlurmExecutors as
one sbatch script with `#SBATCH hetjob` between the groups and one `srun --het-group=i` per task.

How the trainer finds the server. The server's host is only known once Slurm has placed the job, so
the sbatch script resolves it, outside the container where `scontrol` exists, from
`$SLURM_JOB_NODELIST_HET_GROUP_1` (`scontrol show hostnames`, one URL per reward node, joined by
commas: the reward client spreads its batches over several servers) and exports it as
`METAAPO_REWARD_URL`; the trainer's command passes `reward.url="$METAAPO_REWARD_URL"`. The trainer
waits for `/health` on every URL (`reward.timeout_s`) before its first request, so the reward group
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
import shlex
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Union

import nemo_run as run

from metaapo_nemo import config as C

REWARD_URL_ENV = "METAAPO_REWARD_URL"
RDZV_HOST_ENV = "METAAPO_RDZV_HOST"
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


def trainer_script(config: C.MetaAPOConfig, recipe: str, *, nodes: int, nproc_per_node: int) -> str:
    """The trainer group's shell script: torchrun over `nodes` x `nproc_per_node` ranks running
    `metaapo run`, pointed at the reward group through $METAAPO_REWARD_URL."""
    # The reward model's settings go to the server group; the trainer only talks to it.
    overrides = [shlex.quote(o) for o in config_overrides(config, recipe)
                 if not o.startswith(("reward.url=", "reward.reward_fn=", "reward.model_dir="))]
    overrides += ["reward.reward_fn=None", "reward.model_dir=None", f'"reward.url=${{{REWARD_URL_ENV}}}"']
    lines = [
        f"# MetaAPO trainer (het group {TRAINER_GROUP}): one torchrun agent per node, {nproc_per_node} ranks each.",
        f"# {RDZV_HOST_ENV} and {REWARD_URL_ENV} are exported by the sbatch script.",
        "set -euo pipefail",
        f"exec torchrun --nnodes={nodes} --nproc-per-node={nproc_per_node} --rdzv-backend=c10d \\",
        f'    --rdzv-endpoint="${{{RDZV_HOST_ENV}}}:{RDZV_PORT}" --rdzv-id="${{SLURM_JOB_ID}}" \\',
        f"    -m metaapo_nemo run --recipe {shlex.quote(recipe)} \\",
    ]
    lines += [f"    {o} \\" for o in overrides[:-1]] + [f"    {overrides[-1]}", ""]
    return "\n".join(lines)


def reward_server_args(reward: C.RewardConfig, port: int) -> list[str]:
    """`metaapo serve-reward` arguments for the reward group, from the run's reward settings."""
    if reward.url is not None:
        raise C.ConfigError(f"reward.url={reward.url!r} names an existing server, so no reward group is started: "
                            "drop reward.url, or drop run.reward_nodes")
    if (reward.model_dir is None) == (reward.reward_fn is None):
        raise C.ConfigError("a reward group serves one reward model: set exactly one of reward.model_dir=DIR "
                            "or reward.reward_fn=MODULE:FUNCTION")
    source = ["--model", reward.model_dir] if reward.model_dir else ["--reward-fn", reward.reward_fn]
    # 0.0.0.0: the trainer connects from other nodes (the server's own default is 127.0.0.1). Without
    # reward.token anyone on the cluster network can call it: the server refuses that unless told.
    no_token = [] if reward.token else ["--allow-no-token"]
    return ["serve-reward", "--host", "0.0.0.0", "--port", str(port), *source, *no_token]


def reward_url_export(port: int) -> str:
    """Shell text, run in the sbatch script, giving `http://host:port` for every reward node, comma-joined."""
    return (f'$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{REWARD_GROUP}" '
            f"| sed 's|.*|http://&:{port}|' | paste -sd, -)")


def rdzv_host_export() -> str:
    """Shell text giving the first trainer node: torchrun's rendezvous host, never a reward node."""
    return f'$(scontrol show hostnames "$SLURM_JOB_NODELIST_HET_GROUP_{TRAINER_GROUP}" | head -n1)'


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

    With `reward`, a two-group het job (trainer, reward server) on a SlurmExecutor; without, one task:
    the `nemo llm metaapo` entry point under the executor's own launcher (torchrun). `executor`
    describes the trainer: nodes, gpus_per_node (one rank per GPU), container image and mounts,
    account, partition, time (executors.slurm makes one). `recipe` is the base the het trainer's
    `metaapo run --recipe` starts from; any recipe reproduces `config`, only the override list's
    length differs. NeMo-Run adds jobs only inside the experiment's context, hence a context manager.
    """
    task = config if isinstance(config, run.Partial) else None
    config = config_from_partial(config) if task is not None else config
    if reward is None:
        if task is None:
            from metaapo_nemo.launch.nemo_cli import to_partial

            task = to_partial(config)
        with run.Experiment(name, executor=executor) as experiment:
            experiment.add(task, executor=executor, name=TASK_NAME, tail_logs=True)
            yield experiment
        return

    if not isinstance(executor, run.SlurmExecutor):
        raise C.ConfigError("a reward group needs the slurm executor (run.executor=slurm), "
                            f"got {type(executor).__name__}")
    serve_args = reward_server_args(config.reward, reward.port)
    nproc = executor.gpus_per_node or executor.ntasks_per_node

    trainer_ex = executor.clone()
    trainer_ex.launcher = None  # the script runs torchrun itself (module docstring)
    trainer_ex.ntasks_per_node, trainer_ex.torchrun_nproc_per_node = 1, None  # one torchrun agent per node
    trainer_ex.heterogeneous = True
    trainer_ex.env_vars = {**executor.env_vars, RDZV_HOST_ENV: rdzv_host_export(),
                           REWARD_URL_ENV: reward_url_export(reward.port)}

    reward_ex = executor.clone()
    reward_ex.launcher = None
    reward_ex.nodes, reward_ex.ntasks_per_node = reward.nodes, 1
    reward_ex.gpus_per_node, reward_ex.gpus_per_task = reward.gpus_per_node, None
    reward_ex.torchrun_nproc_per_node = None
    reward_ex.container_image = reward.container_image or executor.container_image
    reward_ex.env_vars = dict(executor.env_vars)
    if config.reward.token:  # the server reads its token from the environment, not the command line
        reward_ex.env_vars["METAAPO_REWARD_TOKEN"] = config.reward.token

    trainer_task = run.Script(inline=trainer_script(config, recipe, nodes=executor.nodes, nproc_per_node=nproc))
    reward_task = run.Script(path="metaapo_nemo", m=True, entrypoint="python", args=serve_args)
    with run.Experiment(name, executor=trainer_ex) as experiment:
        experiment.add([trainer_task, reward_task], executor=[trainer_ex, reward_ex], name=TASK_NAME, tail_logs=True)
        yield experiment
