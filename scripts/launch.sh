#!/usr/bin/env bash
# The one launcher of qwenvl/train/train_qwen.py: torchrun with the run's settings from
# the environment, then any flags you pass (they come last, and for a repeated flag the
# last value wins, so your flags override the defaults of the sft*.sh wrappers).
#
#   MODEL_PATH=Qwen/Qwen2.5-VL-3B-Instruct DATASETS=demo_shapes OUTPUT_DIR=out \
#     bash scripts/launch.sh --tune_mm_llm True --tune_mm_mlp True --learning_rate 1e-5
#
# Environment (defaults in brackets):
#   MODEL_PATH      checkpoint directory or hub id                      [required]
#   DATASETS        --dataset_use, e.g. "demo_shapes%50,demo_text"       [required]
#   OUTPUT_DIR      --output_dir; a run resumes from its newest checkpoint-* [./output]
#   RUN_NAME        --run_name (wandb / tensorboard run name)           [basename of OUTPUT_DIR]
#   PRECISION       bf16 | fp16 | fp32 | auto; auto = bf16 when a CUDA GPU is visible,
#                   else fp32 (CPU runs). Choose precision here, not with --bf16/--fp16
#                   flags (--fp16 True after the --bf16 True of auto would set both) [auto]
#   NPROC_PER_NODE  processes (GPUs) on this node   [number of GPUs from nvidia-smi, 1 without GPUs]
#   NNODES          number of nodes                                     [1]
#   NODE_RANK       rank of this node, 0..NNODES-1                      [0]
#   MASTER_ADDR     address of node 0                                   [127.0.0.1]
#   MASTER_PORT     port on node 0             [a free port when NNODES=1, else 29500]
#   TORCH_ELASTIC_SHUTDOWN_TIMEOUT  seconds torchrun gives the ranks after Ctrl-C to save a
#                   checkpoint before it kills them                     [600]
#   DRY_RUN=1       print the command instead of running it
#
# Multi-node: run the same command on every node with the same NNODES, MASTER_ADDR
# (node 0's address, reachable from all nodes) and MASTER_PORT, and NODE_RANK set to
# 0..NNODES-1, e.g. on 2 nodes of 8 GPUs:
#   node 0: NNODES=2 NODE_RANK=0 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash scripts/sft_7b.sh
#   node 1: NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1 MASTER_PORT=29500 bash scripts/sft_7b.sh
# OUTPUT_DIR must be on storage every node sees (checkpoints are written by global rank 0,
# DeepSpeed shards by every rank).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

# torchrun and python come from the project's virtual environment: say so instead of
# "torchrun: not found" when it is not active.
if [[ "${DRY_RUN:-0}" != "1" ]] && ! command -v torchrun >/dev/null 2>&1; then
  echo "launch: torchrun not found: the project's Python environment is not active." >&2
  echo "  Activate it first: source $ROOT/.venv/bin/activate   (created by: bash scripts/setup_env.sh)" >&2
  exit 127
fi

: "${MODEL_PATH:?set MODEL_PATH to a checkpoint directory or hub id}"
: "${DATASETS:?set DATASETS to dataset names of dataset_dictionary.json, e.g. DATASETS=demo_shapes}"
OUTPUT_DIR="${OUTPUT_DIR:-./output}"
RUN_NAME="${RUN_NAME:-$(basename "$OUTPUT_DIR")}"
# Ctrl-C saves a checkpoint at the end of the step; torchrun's default 30 s is short for a 7B save.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${TORCH_ELASTIC_SHUTDOWN_TIMEOUT:-600}"

gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true
  else
    echo 0
  fi
}
GPUS="$(gpu_count)"
if [[ -z "${NPROC_PER_NODE:-}" ]]; then
  if [[ "$GPUS" -gt 0 ]]; then NPROC_PER_NODE="$GPUS"; else NPROC_PER_NODE=1; fi
fi
NNODES="${NNODES:-1}"
NODE_RANK="${NODE_RANK:-0}"
MASTER_ADDR="${MASTER_ADDR:-127.0.0.1}"
if [[ -z "${MASTER_PORT:-}" ]]; then
  if [[ "$NNODES" -eq 1 ]]; then
    # A port nobody listens on now: two single-node runs on one machine do not collide.
    MASTER_PORT="$(python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
  else
    MASTER_PORT=29500  # every node must agree, so no random choice
  fi
fi

if [[ "$GPUS" -eq 0 ]]; then
  # Training still runs (that is how the tests and the demo run), but a real model on the
  # CPU takes days: make that visible before it starts.
  echo "launch: no CUDA GPU visible (nvidia-smi lists none): training runs on the CPU, in fp32 unless" \
       "PRECISION is set; fine for tiny models, far too slow for real ones. On a GPU machine, check" \
       "nvidia-smi and CUDA_VISIBLE_DEVICES." >&2
fi
PRECISION="${PRECISION:-auto}"
if [[ "$PRECISION" == "auto" ]]; then
  if [[ "$GPUS" -gt 0 ]]; then PRECISION=bf16; else PRECISION=fp32; fi
fi
case "$PRECISION" in
  bf16) PRECISION_FLAGS=(--bf16 True --fp16 False) ;;
  fp16) PRECISION_FLAGS=(--fp16 True --bf16 False) ;;
  fp32) PRECISION_FLAGS=(--bf16 False --fp16 False) ;;
  *) echo "PRECISION must be bf16, fp16, fp32 or auto, not '$PRECISION'" >&2; exit 2 ;;
esac

CMD=(torchrun
  --nproc_per_node "$NPROC_PER_NODE" --nnodes "$NNODES" --node_rank "$NODE_RANK"
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT"
  "$ROOT/qwenvl/train/train_qwen.py"
  --model_name_or_path "$MODEL_PATH"
  --dataset_use "$DATASETS"
  --output_dir "$OUTPUT_DIR"
  --run_name "$RUN_NAME"
  "${PRECISION_FLAGS[@]}"
  "$@")

if [[ "${DRY_RUN:-0}" == "1" ]]; then
  printf '%q ' "${CMD[@]}"
  echo
  exit 0
fi
exec "${CMD[@]}"
