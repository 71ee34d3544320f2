#!/usr/bin/env bash
# Qwen2.5-VL-32B-Instruct: full fine-tuning recipe (8 x 80 GB GPUs, per the official README).
# Hyperparameters of the official qwen-vl-finetune script sft_32b.sh, as published:
# learning rate 2e-7, batch size 2 per GPU x 8 accumulation steps, DeepSpeed ZeRO-3,
# full fine-tuning of the language model and merger (vision tower frozen), data_flatten,
# 0.5 epoch, 50176..784 pixels per image, 8192 tokens, cosine schedule with 3% warmup,
# no weight decay, gradient clipping 1, gradient checkpointing.
#
#   DATASETS=my_data%100 OUTPUT_DIR=out/qwen2_5_vl_32b bash scripts/sft_32b.sh [--flag value ...]
#
# Fast by default (scripts/official_recipe.sh, FAST=1): token-budget micro-batches holding the
# recipe's samples per step on average, compiled layers, SHARDING=fsdp2 (the model does not fit whole on each GPU, FSDP2 shards everything);
# the learning rate, epochs, schedule and samples per step are the official ones. FAST=0: the
# official batching and DeepSpeed config exactly.
# Everything after the script name overrides these defaults (last value wins); MODEL_PATH,
# DATASETS, OUTPUT_DIR, PRECISION, NPROC_PER_NODE, NNODES ... are read by scripts/launch.sh
# (see its header). Differences from the official script: --warmup_steps 0.03 is the
# transformers 5 spelling of --warmup_ratio 0.03; wandb logs to your project when you are
# logged in (else offline, and the run says where); DATASETS has no default, name your own.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH="${MODEL_PATH:-Qwen/Qwen2.5-VL-32B-Instruct}"
export OUTPUT_DIR="${OUTPUT_DIR:-./output/qwen2_5_vl_32b}"
LR="${LR:-2e-7}"
BATCH_SIZE="${BATCH_SIZE:-2}"
GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-8}"

export LR BATCH_SIZE GRAD_ACCUM_STEPS
export ZERO_CONFIG="${ZERO_CONFIG:-zero3.json}"
export SHARDING="${SHARDING:-fsdp2}"  # fast path (FAST=1); FAST=0 runs ZERO_CONFIG with the official batching
exec bash "$HERE/official_recipe.sh" "$@"
