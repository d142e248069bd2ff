"""`metaapo` console script (also `python -m metaapo_nemo`): the job without NeMo-Run, for
containers and sbatch scripts that call torchrun directly, and the reward server."""
from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="metaapo", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    run_p = sub.add_parser("run", help="run MetaAPO: metaapo run --recipe tiny_cpu [key=value ...]")
    run_p.add_argument("--recipe", default="tiny_cpu", help="tiny_cpu | llama31_8b | qwen25_7b")
    run_p.add_argument("--dryrun", action="store_true",
                       help="print the resolved configuration and the plan (ranks, layout, memory per GPU) and exit")
    run_p.add_argument("overrides", nargs="*", help="NeMo-Run style overrides, e.g. algo.beta=0.2 output_dir=out")

    from metaapo_nemo.reward.server import add_arguments, run_from_args

    serve_p = sub.add_parser("serve-reward", help="serve a reward model over HTTP (OpenRLHF protocol)")
    add_arguments(serve_p)

    args = parser.parse_args(argv)
    if args.command == "serve-reward":
        return run_from_args(args)
    return _run(args)


def _run(args: argparse.Namespace) -> int:
    import json

    from metaapo_nemo.config import ConfigError, apply_overrides
    from metaapo_nemo.launch.plan import describe_plan, require_gpus
    from metaapo_nemo.recipes import get_recipe

    try:
        config = get_recipe(args.recipe)
        apply_overrides(config, args.overrides)
        if args.dryrun:  # show the plan even when it could not run yet, and say why
            print(json.dumps(config.to_dict(), indent=2))
            print(describe_plan(config, recipe=args.recipe))
        config.validate()
        if not args.dryrun:
            import torch

            require_gpus(config, torch.cuda.is_available())  # before megatron and the models load
    except ConfigError as e:
        print(f"{'note' if args.dryrun else 'error'}: {e}", file=sys.stderr)
        return 0 if args.dryrun else 2
    except KeyError as e:
        print(f"error: {e.args[0]}", file=sys.stderr)
        return 2
    if args.dryrun:
        return 0
    from metaapo_nemo.algorithm.metaapo import run_metaapo

    try:
        run_metaapo(config)
    except ConfigError as e:  # found at set-up (e.g. a checkpoint the settings cannot resume)
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0
