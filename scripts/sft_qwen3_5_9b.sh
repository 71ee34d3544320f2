#!/usr/bin/env bash
# Qwen3.5-9B (dense, thinks by default): full fine-tuning recipe (scripts/qwen3_5_recipe.sh says
# where every number comes from: ms-swift's published Qwen3.5 recipe).
#
#   MODEL=/models/Qwen3.5-9B DATASETS=my_data%100 OUTPUT_DIR=out/qwen3_5_9b bash scripts/sft_qwen3_5_9b.sh [--flag value ...]
#
# MODEL (or MODEL_PATH) is a local copy of Qwen/Qwen3.5-9B (or Qwen3.6 of the same architecture);
# DATASETS names datasets of your dataset_dictionary.json (--dataset_dictionary FILE for another).
# Fast by default (FAST=1): token-budget micro-batches holding the recipe's samples per step on
# average, compiled layers, SHARDING=zero2: the whole bf16 model (~19 GB) fits on each 80 GB GPU
# and ZeRO-2 shards gradients and optimizer state (~9.5B x 14 bytes / 8 GPUs = 17 GB each).
# FAST=0: per-GPU batch x accumulation exactly, gradient checkpointing, ZERO_CONFIG (ZeRO-3).
# ms-swift publishes no separate 9B recipe; its 35B-A3B one (the same family and learning rate
# as the official Qwen3-VL 4B/8B scripts) is used as it is.
# Everything after the script name overrides these defaults (last value wins); MODEL_PATH,
# DATASETS, OUTPUT_DIR, PRECISION, NPROC_PER_NODE, NNODES ... are read by scripts/launch.sh.
# Packed batches (the recipe's token budget) keep samples apart in the Gated DeltaNet layers
# (README, "What the model is trained on"); on Hopper with Triton < 3.7.1 and no tilelang they
# take an exact but slower path (one warning says so).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH="${MODEL_PATH:-${MODEL:-Qwen/Qwen3.5-9B}}"
export OUTPUT_DIR="${OUTPUT_DIR:-./output/qwen3_5_9b}"
LR="${LR:-1e-5}"
BATCH_SIZE="${BATCH_SIZE:-1}"
GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-2}"  # 2 per GPU x 8 GPUs = ms-swift's 16 per step

export LR BATCH_SIZE GRAD_ACCUM_STEPS
export ZERO_CONFIG="${ZERO_CONFIG:-zero3.json}"
export SHARDING="${SHARDING:-zero2}"  # fast path (FAST=1); FAST=0 runs ZERO_CONFIG with the recipe's batching
exec bash "$HERE/qwen3_5_recipe.sh" "$@"
