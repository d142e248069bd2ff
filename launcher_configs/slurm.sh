#!/bin/bash
# MetaAPO on Slurm through NeMo-Run: one group of GPU nodes, torchrun on each, in a pyxis container.
# The reward model is an existing server every node reaches (reward.url=...; its token, if any, in
# $METAAPO_REWARD_TOKEN, never reward.token=), or a reward group of nodes of its own
# (slurm_reward_group.sh). A local server on rank 0's node is refused on more than one node.
#   ACCOUNT=myacct IMAGE=/lustre/images/metaapo-nemo.sqsh launcher_configs/slurm.sh --dryrun \
#     policy.hf_path=/lustre/models/tulu3-8b-dpo data.train=/lustre/data/uf.parquet \
#     data.eval=/lustre/data/eval.jsonl reward.url=http://rm-host:5000 output_dir=/lustre/runs/llama
# Run it on the cluster's login node (sbatch on PATH); drop --dryrun to submit.
set -euo pipefail

# Slurm account and partition of your allocation.
ACCOUNT=${ACCOUNT:?set ACCOUNT to your Slurm account}
PARTITION=${PARTITION:-batch}
# Trainer nodes; ranks = NODES x GPUS_PER_NODE, a multiple of TP x PP (8 in both paper recipes).
NODES=${NODES:-2}
# One rank per GPU: the executor's ntasks_per_node and gpus_per_node are kept equal.
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
# Wall time; a run cut by it resumes from its last checkpoint when submitted again.
TIME=${TIME:-04:00:00}
# The image built from containers/Dockerfile (an enroot .sqsh path or a registry path).
IMAGE=${IMAGE:?set IMAGE to the image built from containers/Dockerfile}
# Host paths the job reads and writes, SRC:DST; unset: the folders of output_dir, the models, the
# data and $HF_HOME, each at its own path.
MOUNTS=${MOUNTS:-}
# Where NeMo-Run writes the sbatch script, task configs and logs; the compute nodes must see it.
JOB_DIR=${JOB_DIR:-$HOME/.nemo_run/experiments}
RECIPE=${RECIPE:-llama31_8b}

exec nemo llm metaapo --recipe "$RECIPE" --yes \
    run.executor=slurm \
    run.executor.account="$ACCOUNT" run.executor.partition="$PARTITION" \
    run.executor.nodes="$NODES" \
    run.executor.gpus_per_node="$GPUS_PER_NODE" run.executor.ntasks_per_node="$GPUS_PER_NODE" \
    run.executor.time="$TIME" \
    run.executor.container_image="$IMAGE" ${MOUNTS:+"run.executor.container_mounts=['$MOUNTS']"} \
    run.executor.tunnel.job_dir="$JOB_DIR" \
    "$@"
