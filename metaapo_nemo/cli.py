"""`metaapo` console script (also `python -m metaapo_nemo`): the job without NeMo-Run, for
containers and sbatch scripts that call torchrun directly, the reward server, and training the
reward model it serves."""
from __future__ import annotations

import argparse
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaapo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run MetaAPO: metaapo run --recipe tiny_cpu [key=value ...]")
    run_p.add_argument("--recipe", default="tiny_cpu", help="tiny_cpu | llama31_8b | qwen25_7b")
    run_p.add_argument("--dryrun", action="store_true",
                       help="print the resolved configuration and the plan (ranks, layout, memory per GPU) and exit")
    run_p.add_argument("--config", metavar="FILE",
                       help="a YAML file of config keys over the recipe's (plain nested sections, or what "
                            "`nemo llm metaapo --to-yaml` writes); overrides after it win")
    run_p.add_argument("--to-yaml", metavar="FILE",
                       help="write the resolved configuration as a YAML file for --config ('-': stdout) and exit")
    run_p.add_argument("overrides", nargs="*", help="NeMo-Run style overrides, e.g. algo.beta=0.2 output_dir=out")

    from metaapo_nemo.reward.server import add_arguments, run_from_args

    serve_p = sub.add_parser("serve-reward", help="serve a reward model over HTTP (OpenRLHF protocol)")
    add_arguments(serve_p)

    from metaapo_nemo.reward import train as train_reward

    train_p = sub.add_parser("train-reward", help="train a Bradley-Terry reward model for serve-reward --model: "
                                                  "metaapo train-reward --init SFT_DIR --data PAIRS --out DIR")
    train_reward.add_arguments(train_p)

    args = parser.parse_args(argv)
    if args.command == "serve-reward":
        return run_from_args(args)
    if args.command == "train-reward":
        return train_reward.run_from_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import json

    from metaapo_nemo.config import ConfigError, apply_overrides, load_config_file
    from metaapo_nemo.launch.plan import describe_plan
    from metaapo_nemo.recipes import get_recipe

    try:
        config = get_recipe(args.recipe)
        if args.config:
            load_config_file(config, args.config)
        apply_overrides(config, args.overrides)
    except ConfigError as e:
        return refuse(e)
    except KeyError as e:
        return refuse(e.args[0])
    if args.to_yaml:
        return _write_yaml(config, args)
    if not args.dryrun:
        return run_job(config)
    # Show the plan even when it could not run yet, and say why.
    print(json.dumps(config.to_dict(), indent=2))
    print(describe_plan(config, recipe=args.recipe))
    try:
        config.validate()
    except ConfigError as e:
        print(f"note: {e}", file=sys.stderr)
    return 0


def _write_yaml(config, args: argparse.Namespace) -> int:
    """`metaapo run --to-yaml FILE`: the resolved configuration as a file for `--config`."""
    import copy

    from metaapo_nemo.config import REWARD_TOKEN_ENV, ConfigError, dump_config_file

    if config.reward.token:  # a secret stays out of files, as out of command lines
        config = copy.deepcopy(config)
        config.reward.token = None
        print(f"note: reward.token is not written to the file: give it as ${REWARD_TOKEN_ENV}", file=sys.stderr)
    made_from = " ".join([f"--recipe {args.recipe}"] + ([f"--config {args.config}"] if args.config else [])
                         + [o for o in args.overrides if not o.startswith("reward.token=")])
    text = dump_config_file(config, header=f"metaapo run --config FILE [key=value ...]\n"
                                           f"written by: metaapo run {made_from} --to-yaml")
    if args.to_yaml == "-":
        sys.stdout.write(text)
    else:
        try:
            with open(args.to_yaml, "w") as f:
                f.write(text)
        except OSError as e:
            return refuse(f"--to-yaml {args.to_yaml}: cannot write it: {e.strerror or e}")
        print(f"wrote {args.to_yaml}")
    try:  # a starting point may be incomplete (a recipe's paths): say so, as --dryrun does
        config.validate()
    except ConfigError as e:
        print(f"note: {e}", file=sys.stderr)
    return 0


def run_job(config) -> int:
    """Run MetaAPO on this rank and return its exit status: 0 done, 2 a configuration the user must
    change (ConfigError, found before or during set-up), 3 a reward server that failed, 128+N stopped by signal N. A SystemExit of
    the loop (stopping.EXIT_REQUEUE after the checkpoint signal) passes through. Only global rank 0
    says why, so torchrun's N ranks print one line, not N."""
    from metaapo_nemo import stopping
    from metaapo_nemo.config import ConfigError
    from metaapo_nemo.launch.plan import require_gpus
    from metaapo_nemo.reward.client import RewardServerError

    try:
        config.validate()
        stopping.install(config.trainer.checkpoint_signal)
        import torch

        require_gpus(config, torch.cuda.is_available())  # before megatron and the models load
        from metaapo_nemo.algorithm.metaapo import run_metaapo

        run_metaapo(config)
    except ConfigError as e:
        return refuse(e)
    except RewardServerError as e:  # said by the rank that met it: the others fail after it, in a collective
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 3
    except stopping.RunStopped as e:
        _on_rank0(str(e))
        return stopping.exit_status(e)
    return 0


def refuse(problem) -> int:
    """Say `problem` (something the user must change) on rank 0; return the exit status for it."""
    _on_rank0(f"error: {problem}")
    return 2


def _on_rank0(line: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(line, file=sys.stderr, flush=True)
