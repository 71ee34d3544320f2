#!/usr/bin/env bash
# Qwen3.5-27B (dense, thinks by default; also Qwen3.6-27B): full fine-tuning recipe
# (scripts/qwen3_5_recipe.sh says where every number comes from: ms-swift's published Qwen3.5 recipe).
#
#   MODEL=/models/Qwen3.5-27B DATASETS=my_data%100 OUTPUT_DIR=out/qwen3_5_27b bash scripts/sft_qwen3_5_27b.sh [--flag value ...]
#
# Fast by default (FAST=1): token-budget micro-batches, compiled layers, SHARDING=fsdp2: the bf16
# model (~55 GB) does not leave room on an 80 GB GPU for ZeRO-2, so FSDP2 shards weights,
# gradients and optimizer state (~27B x 16 bytes / 8 GPUs = 54 GB each, float32 master weights).
# If a micro-batch does not fit, BUDGET_ACCUM_STEPS=2; SHARDING=zero3 also fits (slower).
# FAST=0: per-GPU batch x accumulation exactly, gradient checkpointing, ZERO_CONFIG (ZeRO-3).
# ms-swift publishes no separate 27B recipe; its 35B-A3B one is used as it is.
# Everything after the script name overrides these defaults (last value wins).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH="${MODEL_PATH:-${MODEL:-Qwen/Qwen3.5-27B}}"
export OUTPUT_DIR="${OUTPUT_DIR:-./output/qwen3_5_27b}"
LR="${LR:-1e-5}"
BATCH_SIZE="${BATCH_SIZE:-1}"
GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-2}"  # 2 per GPU x 8 GPUs = ms-swift's 16 per step

export LR BATCH_SIZE GRAD_ACCUM_STEPS
export ZERO_CONFIG="${ZERO_CONFIG:-zero3.json}"
export SHARDING="${SHARDING:-fsdp2}"  # fast path (FAST=1); FAST=0 runs ZERO_CONFIG with the recipe's batching
exec bash "$HERE/qwen3_5_recipe.sh" "$@"
