"""NeMo-Run executors by name for `nemo llm metaapo`, and the launch of a task on one.

`run.executor=local_torchrun run.executor.ntasks_per_node=N`: N ranks on this machine under torchrun.
`run.executor=slurm run.executor.nodes=M ...`: M nodes, one rank per GPU, in a container (pyxis).
`run.reward_nodes=K` (with slurm): a het group of K nodes serving the reward model beside the trainer
(launch/slurm.py). NeMo-Run resolves `run.executor=NAME` among factories registered for its executor
types, so each factory below is registered under run.LocalExecutor or run.SlurmExecutor. The
executors are plain NeMo-Run classes: NeMo-Run maps executors to schedulers by exact class, so a
subclass carrying the reward settings would not launch; they live on the RunContext instead.
"""
# No `from __future__ import annotations`: NeMo-Run evaluates a factory's return annotation in its own module.
import dataclasses
import functools
import os
import shlex
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Optional

import nemo_run as run

from metaapo_nemo import config as C
from metaapo_nemo.launch import slurm as S
from metaapo_nemo.recipes import RECIPES

# An NGC release image carrying TensorRT-LLM (tags are x.y.z, e.g. 1.0.0, or x.y.zrcN). It is the
# base of containers/Dockerfile, not a runnable image for this job: it lacks metaapo-nemo, megatron-core
# and nemo-run. A real submission with it is refused (check_submission); dry runs note it.
DEFAULT_CONTAINER_IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:1.2.0"
GPUS_PER_NODE = 8
# The one task per node is torchrun with a rank per GPU: it gets the node's CPUs (8-GPU nodes have
# at least 64 cores), for the ranks' data loading and tokenisation.
CPUS_PER_NODE = 64
# NeMo-Run requeues a failed job this many times; after that launch/slurm.py's rule (job_setup)
# requeues only a run that checkpointed during the job.
RETRIES = 3
# Seconds a stopped local job has to end (a rank stops its reward server) before it is killed.
STOP_GRACE_S = 10.0


@run.cli.factory(name="local_torchrun")
def local_torchrun(ntasks_per_node: int = 2) -> run.Config[run.LocalExecutor]:
    """N ranks on this machine: torchrun with a local rendezvous, one torch thread per rank."""
    return run.Config(
        run.LocalExecutor,
        ntasks_per_node=ntasks_per_node,
        launcher="torchrun",
        # The ranks share this machine's cores: one OpenMP thread each, not one per core each.
        # PATH: torchrun and python from the environment that runs `nemo`, even when it is not activated.
        env_vars={"OMP_NUM_THREADS": "1", "PATH": str(Path(sys.executable).parent)},
    )


@run.cli.factory(name="slurm")
def slurm(
    account: Optional[str] = None,
    partition: Optional[str] = None,
    nodes: int = 1,
    gpus_per_node: int = GPUS_PER_NODE,
    time: str = "04:00:00",
    cpus_per_task: int = CPUS_PER_NODE,
    retries: int = RETRIES,
    container_image: str = DEFAULT_CONTAINER_IMAGE,
    container_mounts: Optional[list[str]] = None,
    job_dir: str = "",
    ssh_host: Optional[str] = None,
    ssh_user: Optional[str] = None,
) -> run.Config[run.SlurmExecutor]:
    """Slurm with pyxis containers: `nodes` whole nodes, one torchrun rank per GPU.

    Submits from this machine (`sbatch` on PATH, a login node) unless `ssh_host` is given; job files
    go under `job_dir` (default ~/.nemo_run/experiments), which must be visible to the compute nodes.
    The code runs from the image (containers/Dockerfile), so nothing is packaged. `container_mounts`
    empty: the folders the run reads and writes, each at its own path (default_mounts).

    Time limits: Slurm sends USR1 five minutes before the end (the trainer checkpoints and exits) and
    the job is requeued (`--requeue`, `retries`, launch/slurm.py's job_setup) to resume.
    """
    tunnel = (run.Config(run.SSHTunnel, host=ssh_host, user=ssh_user or os.environ.get("USER", ""), job_dir=job_dir)
              if ssh_host else run.Config(run.LocalTunnel, job_dir=job_dir))
    return run.Config(
        run.SlurmExecutor,
        account=account,
        partition=partition,
        job_name_prefix="metaapo-",
        nodes=nodes,
        ntasks_per_node=gpus_per_node,
        gpus_per_node=gpus_per_node,
        exclusive=True,
        mem="0",  # all of each node's memory
        cpus_per_task=cpus_per_task,
        signal=S.SLURM_SIGNAL,
        retries=retries,
        additional_parameters={"requeue": True},
        time=time,
        container_image=container_image,
        container_mounts=list(container_mounts or []),
        launcher="torchrun",
        packager=run.Config(run.Packager),
        tunnel=tunnel,
    )


def check_config(config: C.MetaAPOConfig, reward: Optional[S.RewardGroup], on_this_machine: bool = True) -> None:
    """Validate the configuration as the trainer will run it: with a reward group, its reward settings
    go to the server and the trainer gets reward.url (a placeholder here: Slurm places the group).
    on_this_machine=False (Slurm): the job's container, not this login node, must have tensorrt_llm."""
    if reward is None:
        config.validate(on_this_machine)
        return
    S.reward_server_args(config.reward, reward.port)
    trainer_reward = dataclasses.replace(config.reward, url=f"http://reward-group:{reward.port}", reward_fn=None,
                                         model_dir=None)
    dataclasses.replace(config, reward=trainer_reward).validate(on_this_machine)


def check_outputs(executor: run.Executor, config: C.MetaAPOConfig) -> None:
    """Refuse a cluster job whose output_dir would not outlive it: relative (the job runs in NeMo-Run's
    code folder) or, in a container, outside every mount (it would vanish with the container)."""
    if not isinstance(executor, run.SlurmExecutor):
        return
    out = config.output_dir
    if not os.path.isabs(out):
        raise C.ConfigError(
            f"output_dir={out} is relative: under Slurm the job runs in NeMo-Run's code folder; give an absolute "
            "path on the shared filesystem, e.g. output_dir=/lustre/$USER/metaapo")
    mounted = [m.split(":")[1] if ":" in m else m for m in executor.container_mounts or S.default_mounts(config)]
    if executor.container_image and not any(S.is_under(out, dst) for dst in mounted):
        raise C.ConfigError(
            f"output_dir={out} is under none of the container mounts ({', '.join(mounted) or 'none'}): it would "
            f"vanish with the container; mount its folder, e.g. \"run.executor.container_mounts=['{out}:{out}']\"")


def check_reward(executor: run.Executor, config: C.MetaAPOConfig, reward: Optional[S.RewardGroup]) -> None:
    """Refuse a cluster job whose ranks could not reach their reward server, or that would put its
    token on a command line (every user of a node sees those)."""
    if not isinstance(executor, run.SlurmExecutor):
        return
    if config.reward.token:
        raise C.ConfigError("reward.token would be on the trainer's command line, which every user of a node can "
                            "read: unset it and export METAAPO_REWARD_TOKEN before submitting (the job passes it "
                            "by environment; with a reward group one is generated per job)")
    if config.reward.url is None and reward is None and executor.nodes > 1:
        raise C.ConfigError(f"run.executor.nodes={executor.nodes} without reward.url: a local reward server on rank 0's "
                            "node is unreachable from the others; add a reward group (run.reward_nodes=K) or give "
                            "reward.url=URL of a server every node reaches")


def check_layout(executor: run.Executor, config: C.MetaAPOConfig) -> None:
    """Raise ConfigError when the executor's ranks cannot hold the trainer's TP x PP layout."""
    ranks_per_node = executor.ntasks_per_node
    if isinstance(executor, run.SlurmExecutor) and executor.gpus_per_node and ranks_per_node != executor.gpus_per_node:
        raise C.ConfigError(
            f"run.executor.ntasks_per_node={ranks_per_node} but run.executor.gpus_per_node={executor.gpus_per_node}: "
            "one rank per GPU, so set both to the same number")
    nodes = executor.nodes if isinstance(executor, run.SlurmExecutor) else executor.nnodes()
    world = nodes * ranks_per_node
    tp, pp = config.trainer.tensor_model_parallel_size, config.trainer.pipeline_model_parallel_size
    if world % (tp * pp):
        raise C.ConfigError(
            f"{world} ranks ({nodes} node(s) x {ranks_per_node}) is not a multiple of "
            f"trainer.tensor_model_parallel_size={tp} x trainer.pipeline_model_parallel_size={pp}; "
            "change the node or rank count or the parallel sizes")


def check_submission(executor: run.Executor) -> None:
    """Refuse a real Slurm submission with the bare NGC base image, which cannot run this job."""
    if isinstance(executor, run.SlurmExecutor) and executor.container_image == DEFAULT_CONTAINER_IMAGE:
        raise C.ConfigError(
            f"run.executor.container_image is the NGC base image {DEFAULT_CONTAINER_IMAGE}, which lacks "
            "metaapo-nemo: build containers/Dockerfile and set run.executor.container_image=<your image or .sqsh> "
            "(docs/multinode.md)")


def rendered_plan(experiment: run.Experiment) -> list[tuple[str, str]]:
    """(title, text) for each job of a dry-run experiment: the sbatch script, or the local command."""
    plan = []
    for job in experiment.jobs:
        executor = job.executor
        if isinstance(executor, run.SlurmExecutor):
            script = Path(executor.experiment_dir, f"{executor.job_name}_sbatch.sh")
            plan.append((f"sbatch script ({job.id})", script.read_text()))
            # Inline task scripts (the het trainer's torchrun line) run in the container from /nemo_run/scripts.
            for task_script in sorted(Path(executor.job_dir, "scripts").glob("*.sh")):
                plan.append((f"/nemo_run/scripts/{task_script.name}", task_script.read_text()))
        else:
            # The local scheduler's dry-run request: the exact argv and environment it would start.
            for role, replicas in job._dryrun_info.request.role_params.items():
                for replica in replicas:
                    env = {k: v for k, v in replica.env.items() if k in executor.env_vars and k != "PATH"}
                    command = " ".join(shlex.quote(a) for a in replica.args)
                    env_text = " ".join(f"{k}={v}" for k, v in env.items())
                    plan.append((f"local command ({role})", f"{env_text} {command}"))
    return plan


def launch(ctx: run.cli.RunContext, task: run.Partial) -> None:
    """Run (or, with --dryrun, show) `task` on ctx.executor; with ctx.reward_nodes, as a het Slurm job."""
    from rich.console import Console

    console = Console()
    run.dryrun_fn(task, executor=ctx.executor)
    config = S.config_from_partial(task)
    reward = (S.RewardGroup(nodes=ctx.reward_nodes, gpus_per_node=ctx.reward_gpus_per_node, port=ctx.reward_port)
              if ctx.reward_nodes else None)
    # A dry run shows the plan even when it could not run yet, and says why (as `metaapo run --dryrun`).
    problems = []
    remote = isinstance(ctx.executor, run.SlurmExecutor)
    checks = (functools.partial(check_config, config, reward, not remote),
              functools.partial(check_layout, ctx.executor, config), functools.partial(check_outputs, ctx.executor, config),
              functools.partial(check_reward, ctx.executor, config, reward), functools.partial(check_submission, ctx.executor))
    for check in checks:
        try:
            check()
        except C.ConfigError as e:
            if not ctx.dryrun:
                raise
            problems.append(str(e))

    # The het trainer's `metaapo run --recipe` base: the recipe named on the command line (the default
    # factory arrives as a function); any recipe reproduces the configuration.
    recipe = ctx.factory if ctx.factory in RECIPES else "tiny_cpu"
    with S.build_experiment(task, ctx.executor, reward=reward, recipe=recipe, name=ctx.name) as exp:
        if ctx.dryrun:
            exp.dryrun(log=False, delete_exp_dir=False)
            for title, text in rendered_plan(exp):
                console.rule(f"[bold cyan]{title}")
                console.print(text, markup=False, highlight=False, soft_wrap=True)
            shutil.rmtree(exp.jobs[0].executor.experiment_dir, ignore_errors=True)
            for problem in problems:
                console.print(f"note: this plan cannot run yet: {problem}", markup=False, highlight=False,
                              soft_wrap=True)
            console.print(f"[bold cyan]Dry run for {ctx.name}:[/bold cyan] nothing was submitted")
            return
        if ctx._should_continue(ctx.skip_confirmation):
            console.print(f"[bold cyan]Launching {ctx.name}...[/bold cyan]")
            if isinstance(ctx.executor, run.LocalExecutor):
                stop_job_on_signal()
            exp.run(detach=ctx.detach)
    # The local executor waits for the job (the experiment's exit above); NeMo-Run itself exits 0
    # whatever became of it, so a failed run would look like a finished one to a script.
    if isinstance(ctx.executor, run.LocalExecutor):
        from torchx.specs.api import AppState

        for job in exp.jobs:
            if job.launched and job.state != AppState.SUCCEEDED:
                raise SystemExit(f"error: job {job.id} ended {job.state.name}; its output above says why")


def stop_job_on_signal(grace_s: float = STOP_GRACE_S) -> None:
    """Make SIGINT and SIGTERM to this launcher stop the local job, then exit with 128+signum.

    NeMo-Run alone does not: torchx starts torchrun in a session of its own, so a terminal's Ctrl-C
    never reaches it, and on the KeyboardInterrupt NeMo-Run waits for the job to end (its waiting
    thread pool joins), then prints how to inspect the experiment. Here the launcher sends SIGTERM
    to each of its children's process groups (torchrun, which passes it on to every rank; a rank
    stops its local reward server), and after `grace_s` SIGKILLs whatever of the process tree is
    left: the ranks and the reward server sit in sessions of their own. A second signal kills at once.
    """
    def stop(signum, frame):
        name = signal.Signals(signum).name
        if job_pids:  # the second signal
            _kill(_descendants(os.getpid()) | job_pids)
            os._exit(128 + signum)
        job_pids.update(_descendants(os.getpid()))
        agents = [pid for pid in job_pids if _parent(pid) == os.getpid()]
        for pid in agents:
            _signal_group(pid, signal.SIGTERM)
        ranks = sum(_parent(pid) in agents for pid in job_pids)
        deadline = time.monotonic() + grace_s
        while _alive(job_pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        left = _alive(job_pids | _descendants(os.getpid()))
        _kill(left)
        killed = f"; killed {len(left)} process(es) still running after {grace_s:g} s" if left else ""
        print(f"stopped by {name}: sent SIGTERM to the job ({len(agents)} torchrun agent(s), {ranks} rank(s)){killed}",
              file=sys.stderr, flush=True)
        sys.stdout.flush()
        # Not SystemExit: NeMo-Run would go on to wait for its threads and print its experiment help.
        os._exit(128 + signum)

    job_pids: set[int] = set()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, stop)


def _descendants(root: int) -> set[int]:
    """Every process below `root`, from /proc (no psutil among the dependencies)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (parent := _parent(int(entry.name))) is not None:
            children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _stat(pid: int) -> list[str] | None:
    # /proc/PID/stat: "pid (comm) state ppid ...", and comm may hold spaces and parentheses.
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _parent(pid: int) -> int | None:
    fields = _stat(pid)
    return int(fields[1]) if fields else None


def _alive(pids: set[int]) -> set[int]:
    """The pids still running: not gone and not a zombie waiting for its parent to reap it."""
    return {pid for pid in pids if (fields := _stat(pid)) and fields[0] != "Z"}


def _signal_group(pid: int, signum: int) -> None:
    # NeMo-Run's local scheduler starts each job process as a session (and group) leader.
    try:
        os.killpg(pid, signum) if os.getpgid(pid) == pid else os.kill(pid, signum)
    except ProcessLookupError:
        pass


def _kill(pids: set[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
