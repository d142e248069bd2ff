#!/bin/bash
# MetaAPO on Slurm through NeMo-Run as one heterogeneous job: the trainer on NODES GPU nodes
# (het group 0) and `metaapo serve-reward` on REWARD_NODES nodes of their own (het group 1). The
# sbatch script resolves the reward nodes' hostnames and passes them to the trainer as reward.url.
#   ACCOUNT=myacct IMAGE=/lustre/images/metaapo-nemo.sqsh launcher_configs/slurm_reward_group.sh --dryrun \
#     reward.model_dir=/lustre/models/bt-rm-8b \
#     policy.hf_path=/lustre/models/tulu3-8b-dpo reference.hf_path=/lustre/models/tulu3-8b-sft \
#     data.train=/lustre/data/uf.parquet data.eval=/lustre/data/eval.jsonl output_dir=/lustre/runs/llama
# The reward group serves reward.model_dir=DIR (a Bradley-Terry model) or reward.reward_fn=MODULE:FUNCTION;
# leave reward.url unset. Run on the login node; drop --dryrun to submit.
set -euo pipefail

# Reward nodes: one server each, on GPU 0 of the REWARD_GPUS_PER_NODE the group asks for.
REWARD_NODES=${REWARD_NODES:-1}
REWARD_GPUS_PER_NODE=${REWARD_GPUS_PER_NODE:-1}
REWARD_PORT=${REWARD_PORT:-5000}

# Everything else (ACCOUNT, PARTITION, NODES, GPUS_PER_NODE, TIME, IMAGE, MOUNTS, JOB_DIR, RECIPE)
# is slurm.sh's trainer group, with the same environment variables.
exec "$(dirname "$0")/slurm.sh" \
    run.reward_nodes="$REWARD_NODES" run.reward_gpus_per_node="$REWARD_GPUS_PER_NODE" \
    run.reward_port="$REWARD_PORT" \
    "$@"
