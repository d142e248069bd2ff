"""`nemo llm metaapo`: the NeMo-Run entry point and its recipes.

Registered through the `nemo_run.cli` entry point named `llm` (pyproject.toml). NeMo-Run imports
this module on every `nemo llm ...` call, so it imports nothing heavy: torch and megatron load
only when the job runs. `--recipe NAME` is an alias of NeMo-Run's `--factory NAME`; `--yaml F`
loads what `--to-yaml F` writes (RecipeRunContext.parse_fn).
"""

import dataclasses
import os

import nemo_run as run

from metaapo_nemo import config as C
from metaapo_nemo import recipes
from metaapo_nemo.cli import refuse, run_job
from metaapo_nemo.launch import executors  # registers run.executor=local_torchrun / slurm


@dataclasses.dataclass(kw_only=True)
class RecipeRunContext(run.cli.RunContext):
    """NeMo-Run's RunContext with `--recipe NAME` / `--recipe=NAME` mapped onto `--factory`, and a
    reward-server het group for Slurm (`run.reward_nodes=K`, launch/slurm.py)."""

    reward_nodes: int = 0  # with run.executor=slurm: nodes serving reward.model_dir / reward.reward_fn
    reward_gpus_per_node: int = 1
    reward_port: int = 5000

    def cli_execute(self, fn, args, entrypoint_type="task"):
        args = list(args)
        for i, arg in enumerate(args):
            if arg == "--recipe":
                if i + 1 >= len(args):
                    raise run.cli.api.RunContextError("--recipe needs a name: " + ", ".join(recipes.RECIPES))
                self.factory = args[i + 1]
                del args[i : i + 2]
                break
            if arg.startswith("--recipe="):
                self.factory = arg.split("=", 1)[1]
                del args[i]
                break
        if isinstance(self.factory, str) and self.factory not in recipes.RECIPES:
            raise run.cli.api.RunContextError(
                f"unknown recipe {self.factory!r}; available: {', '.join(sorted(recipes.RECIPES))}")
        return super().cli_execute(fn, args, entrypoint_type)

    def parse_fn(self, fn, args, **default_kwargs):
        # `--yaml FILE`: NeMo-Run's --to-yaml writes the run.Partial's `_target_` and `_partial_: true`
        # at the file's root, and its --yaml reader turns every root key into an argument of the
        # entry point; it skips `_target_` only, so `_partial_=True` is refused. Hand it the file's
        # tree without them (a fresh copy per call: NeMo-Run edits the tree it reads).
        path = self.yaml
        if not isinstance(path, (str, os.PathLike)):
            return super().parse_fn(fn, args, **default_kwargs)
        self.yaml = _run_yaml(path)
        try:
            return super().parse_fn(fn, args, **default_kwargs)
        finally:
            self.yaml = path

    def _execute_task(self, fn, task_args):
        # No executor: NeMo-Run runs the task in this process, as before. With one, launch.executors
        # builds the experiment (a het job when reward_nodes is set) and --dryrun prints its scripts.
        if self.executor is None or self.repl or any([self.to_yaml, self.to_toml, self.to_json]):
            if self.reward_nodes:
                raise run.cli.api.RunContextError("run.reward_nodes needs run.executor=slurm")
            super()._execute_task(fn, task_args)
        else:
            try:
                executors.launch(self, self.parse_fn(fn, task_args))
            except C.ConfigError as e:  # NeMo-Run would print it as an "Unexpected error", status 1
                raise SystemExit(refuse(e))
        if self.dryrun:  # NeMo-Run has shown the configuration (and the scripts); add what it will take
            from metaapo_nemo.launch.plan import describe_plan
            from metaapo_nemo.launch.slurm import config_from_partial

            recipe = self.factory if isinstance(self.factory, str) else None
            print(describe_plan(config_from_partial(self.parse_fn(fn, task_args)), recipe=recipe,
                                executor=self.executor))


def _run_yaml(path):
    """The `--yaml` file as the DictConfig NeMo-Run's reader takes: the root's `_target_` (which must
    be this entry point, when given) and `_partial_` left out; a file that cannot be read is one line."""
    from nemo_run.cli.config import ConfigSerializer
    from omegaconf import OmegaConf

    try:
        tree = ConfigSerializer().load_dict(path)
    except Exception as e:  # no such file, not YAML/JSON/TOML, an unknown extension
        raise run.cli.api.RunContextError(f"--yaml {path}: {C.one_line(e)}") from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise run.cli.api.RunContextError(f"--yaml {path}: expected a mapping of config keys and sections, "
                                          f"got a {type(tree).__name__}")
    tree = dict(tree)
    tree.pop("_partial_", None)
    target = tree.pop("_target_", None)
    if target is not None and target != f"{__name__}.metaapo":
        raise run.cli.api.RunContextError(f"--yaml {path}: written for {target}, not for nemo llm metaapo "
                                          f"({__name__}.metaapo)")
    return OmegaConf.create(_quote_strings(tree))


def _quote_strings(tree: dict) -> dict:
    """NeMo-Run passes the file's values on as `key=value` text, where '' is no value at all and
    'None' or '1' would not stay strings: quote every string (its parser takes the quotes off).
    Its own `_target_` / `_factory_` names stay bare."""
    def quote(key, value):
        if isinstance(value, dict):
            return _quote_strings(value)
        if isinstance(value, str) and not (key.startswith("_") and key.endswith("_")):
            return f'"{value}"' if "'" in value else f"'{value}'"
        return value

    return {key: quote(key, value) for key, value in tree.items()}


def metaapo(
    output_dir: str = "results/metaapo",
    seed: int = 1234,
    policy: C.PolicyConfig = None,
    reference: C.ReferenceConfig = None,
    data: C.DataConfig = None,
    reward: C.RewardConfig = None,
    algo: C.AlgoConfig = None,
    rollout: C.RolloutConfig = None,
    trainer: C.TrainerConfig = None,
    task: C.EmbeddedTaskConfig = None,
    logger: C.LoggerConfig = None,
) -> None:
    """MetaAPO: meta-weighted adaptive preference optimisation (Algorithm 1) on megatron-core."""
    sections = dict(policy=policy, reference=reference, data=data, reward=reward, algo=algo,
                    rollout=rollout, trainer=trainer, task=task, logger=logger)
    config = C.MetaAPOConfig(output_dir=output_dir, seed=seed,
                             **{k: v for k, v in sections.items() if v is not None})
    # Raised, not returned: NeMo-Run ignores the task's return value, and would turn an exception
    # into "Unexpected error" (status 1) or, for a KeyboardInterrupt, click's "Aborted!".
    status = run_job(config)
    if status:
        raise SystemExit(status)


def to_partial(config: C.MetaAPOConfig) -> run.Partial:
    """A recipe's dataclass tree as the run.Partial NeMo-Run overrides and serialises."""
    def to_config(obj):
        if dataclasses.is_dataclass(obj):
            return run.Config(type(obj), **{f.name: to_config(getattr(obj, f.name)) for f in dataclasses.fields(obj)})
        return obj

    return run.Partial(metaapo, **{f.name: to_config(getattr(config, f.name)) for f in dataclasses.fields(config)})


@run.cli.factory(target=metaapo, name="tiny_cpu")
def tiny_cpu() -> run.Partial:
    return to_partial(recipes.tiny_cpu())


@run.cli.factory(target=metaapo, name="llama31_8b")
def llama31_8b() -> run.Partial:
    return to_partial(recipes.llama31_8b())


@run.cli.factory(target=metaapo, name="qwen25_7b")
def qwen25_7b() -> run.Partial:
    return to_partial(recipes.qwen25_7b())


metaapo = run.cli.entrypoint(
    metaapo, namespace="llm", run_ctx_cls=RecipeRunContext, default_factory=tiny_cpu,
    help="MetaAPO alignment: nemo llm metaapo --recipe tiny_cpu --yes [overrides]",
)
