#!/usr/bin/env bash
# Example SLURM launch of treg on N nodes x 8 GPUs with DeepSpeed ZeRO-3 (ds_configs/multinode_zero3.yaml).
#   sbatch --nodes 2 ds_configs/slurm_multinode.sh recipes/llama-3-8b-instruct/treg-dpo.yaml [extra treg flags]
# One task per node; each task runs `accelerate launch`, which starts the node's 8 processes. machine rank, main
# process address and port come from SLURM. Run from the repository root (the configs use relative paths). The
# token-reward cache must be on a filesystem all nodes share (TREG_CACHE_DIR below): every node writes its shards of
# the token-reward pass there and the main process gathers them. Keep the global batch at 128: with 16 GPUs and
# per_device_train_batch_size 2, pass --gradient_accumulation_steps 4.
#SBATCH --job-name=treg
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --exclusive
#SBATCH --output=logs/%x-%j.out
set -euo pipefail

RECIPE=${1:?usage: sbatch ds_configs/slurm_multinode.sh RECIPE.yaml [extra treg flags]}
shift
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MAIN_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MAIN_PORT=${MAIN_PORT:-29500}
export TREG_CACHE_DIR=${TREG_CACHE_DIR:-$PWD/.treg-cache}   # shared by all nodes
export TOKENIZERS_PARALLELISM=false
mkdir -p logs

# srun starts one task per node; SLURM_NODEID (0..N-1) is that node's machine rank.
srun --kill-on-bad-exit=1 bash -c "accelerate launch \
  --config_file ds_configs/multinode_zero3.yaml \
  --num_machines $SLURM_NNODES \
  --num_processes $((SLURM_NNODES * GPUS_PER_NODE)) \
  --machine_rank \$SLURM_NODEID \
  --main_process_ip $MAIN_ADDR \
  --main_process_port $MAIN_PORT \
  -m treg train --config $RECIPE $*"
