"""MetaAPO on Slurm from Python (NeMo-Run's API): the same jobs as slurm.sh / slurm_reward_group.sh.

    python launcher_configs/slurm_experiment.py --account myacct --image /lustre/images/metaapo-nemo.sqsh \
        --reward-nodes 1 --dryrun \
        reward.model_dir=/lustre/models/bt-rm-8b policy.hf_path=/lustre/models/tulu3-8b-dpo \
        data.train=/lustre/data/uf.parquet data.eval=/lustre/data/eval.jsonl output_dir=/lustre/runs/llama

Without --dryrun the job is submitted (from a login node, or through --ssh-host) and this script
returns once Slurm has it; `nemo experiment status/logs metaapo_<id>` follows it afterwards.
"""
import argparse
import sys

import fiddle as fdl

from metaapo_nemo.config import ConfigError, apply_overrides
from metaapo_nemo.launch import executors, slurm
from metaapo_nemo.recipes import get_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="llama31_8b", help="llama31_8b | qwen25_7b | tiny_cpu")
    parser.add_argument("--account", default=None, help="Slurm account")
    parser.add_argument("--partition", default=None, help="Slurm partition")
    parser.add_argument("--nodes", type=int, default=2, help="trainer nodes (ranks = nodes x gpus per node)")
    parser.add_argument("--gpus-per-node", type=int, default=executors.GPUS_PER_NODE, help="one rank per GPU")
    parser.add_argument("--time", default="04:00:00", help="wall time; the run resumes when resubmitted")
    parser.add_argument("--image", default=executors.DEFAULT_CONTAINER_IMAGE,
                        help="the image built from containers/Dockerfile (.sqsh path or registry path)")
    parser.add_argument("--mounts", nargs="*", default=None,
                        help="container mounts SRC:DST (default: the folders of output_dir, the models, the data and $HF_HOME)")
    parser.add_argument("--job-dir", default="", help="NeMo-Run job files; must be visible to the compute nodes")
    parser.add_argument("--ssh-host", default=None, help="submit through SSH to this login node")
    parser.add_argument("--reward-nodes", type=int, default=0, help="nodes of a reward-server het group (0: none)")
    parser.add_argument("--reward-gpus-per-node", type=int, default=1)
    parser.add_argument("--reward-port", type=int, default=5000)
    parser.add_argument("--dryrun", action="store_true", help="print the sbatch script, submit nothing")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, as for `metaapo run`")
    args = parser.parse_args(argv)

    config = get_recipe(args.recipe)
    reward = None
    try:
        apply_overrides(config, args.overrides)
        if args.reward_nodes:
            reward = slurm.RewardGroup(nodes=args.reward_nodes, gpus_per_node=args.reward_gpus_per_node,
                                       port=args.reward_port)
        executor = fdl.build(executors.slurm(
            account=args.account, partition=args.partition, nodes=args.nodes, gpus_per_node=args.gpus_per_node,
            time=args.time, container_image=args.image, container_mounts=args.mounts, job_dir=args.job_dir,
            ssh_host=args.ssh_host))
        executors.check_config(config, reward)
        executors.check_layout(executor, config)
        executors.check_outputs(executor, config)
        executors.check_reward(executor, config, reward)
        if not args.dryrun:
            executors.check_submission(executor)
        with slurm.build_experiment(config, executor, reward=reward, recipe=args.recipe) as experiment:
            if args.dryrun:
                experiment.dryrun()
            else:
                experiment.run(detach=True)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
