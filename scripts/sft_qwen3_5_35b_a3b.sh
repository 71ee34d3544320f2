#!/usr/bin/env bash
# Qwen3.5-35B-A3B (MoE: 256 experts, 8 routed + 1 shared; thinks by default; also Qwen3.6-35B-A3B):
# full fine-tuning recipe (scripts/qwen3_5_recipe.sh says where every number comes from: ms-swift's
# published Qwen3.5-35B-A3B recipe, examples/models/qwen3_5/mcore_full.sh).
#
#   MODEL=/models/Qwen3.5-35B-A3B DATASETS=my_data%100 OUTPUT_DIR=out/qwen3_5_35b_a3b bash scripts/sft_qwen3_5_35b_a3b.sh [--flag value ...]
#
# Sharding: 35B parameters x 16 bytes (float32 weight, gradient, two AdamW moments) / 8 GPUs is
# ~70 GB per GPU, more than an 80 GB GPU holds next to activations (ms-swift's own recipe offloads
# the optimizer to the CPU to fit 8 x 80 GB). So the default is SHARDING=zero3 with
# ZERO_CONFIG=zero3_offload_optimizer.json: bf16 weights and gradients sharded on the GPUs
# (35B x 4 bytes / 8 = ~18 GB each), AdamW state and float32 master weights in CPU memory
# (35B x 12 bytes = ~420 GB of host RAM per node, pinned; DeepSpeed builds its CPU Adam on
# first use, which needs a C++ compiler). ZeRO-3 cannot run compiled layers, so FAST=1 keeps gradient checkpointing with
# the token budget. On 8 x 141 GB (H200): SHARDING=fsdp2 (no offload, compiled layers, faster).
# Router: --router_aux_loss_coef 0.001 adds the load-balancing loss (the released config's
# router_aux_loss_coef, and ms-swift's transformers-backend Qwen3.5-35B-A3B example
# examples/models/qwen3_5/transformers.sh: --router_aux_loss_coef 1e-3); without it the
# experts' load is not balanced during fine-tuning. ms-swift's Megatron recipe uses
# --moe_aux_loss_coeff 1e-6, Megatron's per-layer loss on another scale, not this number.
# LoRA (--lora_enable True) adapts attention and the shared expert; the routed experts (fused 3-D weights)
# need --lora_target_parameters experts as well (README, LoRA on MoE).
# Everything after the script name overrides these defaults (last value wins).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export MODEL_PATH="${MODEL_PATH:-${MODEL:-Qwen/Qwen3.5-35B-A3B}}"
export OUTPUT_DIR="${OUTPUT_DIR:-./output/qwen3_5_35b_a3b}"
LR="${LR:-1e-5}"
BATCH_SIZE="${BATCH_SIZE:-1}"
GRAD_ACCUM_STEPS="${GRAD_ACCUM_STEPS:-2}"  # 2 per GPU x 8 GPUs = ms-swift's 16 per step

export LR BATCH_SIZE GRAD_ACCUM_STEPS
export ZERO_CONFIG="${ZERO_CONFIG:-zero3_offload_optimizer.json}"
export SHARDING="${SHARDING:-zero3}"  # FAST=1 and FAST=0 both run ZERO_CONFIG here (see above)
exec bash "$HERE/qwen3_5_recipe.sh" --router_aux_loss_coef 0.001 "$@"
