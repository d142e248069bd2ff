#!/bin/bash
# MetaAPO on N ranks of this machine through NeMo-Run's LocalExecutor with torchrun.
#   launcher_configs/local_torchrun.sh                 # tiny_cpu on 2 CPU ranks (gloo)
#   NTASKS=4 launcher_configs/local_torchrun.sh output_dir=/tmp/run4 trainer.tensor_model_parallel_size=2
#   launcher_configs/local_torchrun.sh --dryrun        # print the torchrun command, run nothing
# Extra arguments are NeMo-Run flags or overrides (key=value), appended to the command.
set -euo pipefail

# Ranks on this machine (torchrun --nproc-per-node). TP x PP must divide it; the rest is data parallel.
NTASKS=${NTASKS:-2}
# tiny_cpu runs on a laptop CPU; llama31_8b / qwen25_7b need GPUs (one rank per GPU).
RECIPE=${RECIPE:-tiny_cpu}

# The executor sets OMP_NUM_THREADS=1 for every rank, so N ranks use N cores, not N x cores.
exec nemo llm metaapo --recipe "$RECIPE" --yes \
    run.executor=local_torchrun run.executor.ntasks_per_node="$NTASKS" \
    "$@"
