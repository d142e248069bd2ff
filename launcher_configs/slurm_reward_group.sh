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

ACCOUNT=${ACCOUNT:?set ACCOUNT to your Slurm account}
PARTITION=${PARTITION:-batch}
# Trainer nodes; ranks = NODES x GPUS_PER_NODE, a multiple of TP x PP (8 in both paper recipes).
NODES=${NODES:-2}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Reward nodes: one server each, on GPU 0 of the REWARD_GPUS_PER_NODE the group asks for.
REWARD_NODES=${REWARD_NODES:-1}
REWARD_GPUS_PER_NODE=${REWARD_GPUS_PER_NODE:-1}
REWARD_PORT=${REWARD_PORT:-5000}
TIME=${TIME:-04:00:00}
IMAGE=${IMAGE:?set IMAGE to the image built from containers/Dockerfile}
MOUNTS=${MOUNTS:-/lustre:/lustre}
JOB_DIR=${JOB_DIR:-$HOME/.nemo_run/experiments}
RECIPE=${RECIPE:-llama31_8b}

exec nemo llm metaapo --recipe "$RECIPE" --yes \
    run.executor=slurm \
    run.executor.account="$ACCOUNT" run.executor.partition="$PARTITION" \
    run.executor.nodes="$NODES" \
    run.executor.gpus_per_node="$GPUS_PER_NODE" run.executor.ntasks_per_node="$GPUS_PER_NODE" \
    run.executor.time="$TIME" \
    run.executor.container_image="$IMAGE" "run.executor.container_mounts=['$MOUNTS']" \
    run.executor.tunnel.job_dir="$JOB_DIR" \
    run.reward_nodes="$REWARD_NODES" run.reward_gpus_per_node="$REWARD_GPUS_PER_NODE" \
    run.reward_port="$REWARD_PORT" \
    "$@"
