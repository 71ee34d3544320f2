#!/usr/bin/env bash
# The Qwen3.5 / Qwen3.6 full fine-tuning recipe, shared by scripts/sft_qwen3_5_*.sh: the flags in
# which it differs from the official qwen-vl-finetune recipe (scripts/official_recipe.sh, which
# runs it: FAST=1 token budget + compiled layers, SHARDING, FAST=0 ...). The official
# qwen-vl-finetune code never added this family; the published full-parameter recipe is
# ms-swift's (the framework Qwen's documentation points to for fine-tuning):
# examples/models/qwen3_5/mcore_full.sh and packing.sh (full fine-tuning of Qwen3.5-35B-A3B on
# 8 x 80 GiB). Where each number comes from:
#   --learning_rate 1e-5 (the wrappers' LR)   ms-swift: --lr 1e-5
#   cosine down to 10% of it (1e-6)            ms-swift: --min_lr 1e-6 (Megatron's cosine with a floor);
#                                              written as min_lr_rate 0.1: transformers reads an absolute
#                                              min_lr off optimizer.defaults, which DeepSpeed's optimizer lacks
#   --warmup_steps 0.05 (5% of the steps)      ms-swift: --lr_warmup_fraction 0.05
#   --num_train_epochs 1                       ms-swift: --num_train_epochs 1
#   16 samples per optimizer step              ms-swift: --global_batch_size 16 (the wrappers: 2 per GPU
#                                              x 8 GPUs; with fewer GPUs raise GRAD_ACCUM_STEPS)
#   vision tower and merger frozen             ms-swift: --freeze_vit true --freeze_aligner true
#   --model_max_length 16384                   ms-swift: --max_length 16384
#   --max_pixels 1003520                       ms-swift: MAX_PIXELS=1003520 (~980 visual tokens per image:
#                                              Qwen3.5 has 16-pixel patches merged 2x2)
#   --enable_thinking auto                     ms-swift: --add_non_thinking_prefix true: answers without
#                                              reasoning train in non-thinking mode (the empty think
#                                              block is prompt), answers with reasoning train their
#                                              think block. A dataset can override this with
#                                              "enable_thinking" in dataset_dictionary.json.
#   --video_max_frames 12                      ms-swift: FPS_MAX_FRAMES=12
# Not carried from ms-swift's script: VIDEO_MAX_PIXELS=50176 (its video frames' pixel cap; here
# --video_max_pixels, which needs --video_min_pixels lowered to at most the same, since our default
# minimum, 200704, is above it: set both to match it), --group_by_length (the token budget already
# groups samples by length), --mtp_num_layers 1 (multi-token prediction: transformers' Qwen3.5 has no
# MTP head to train), --moe_expert_capacity_factor 2 (Megatron drops tokens past an expert's capacity;
# transformers routes every token), --moe_aux_loss_coeff 1e-6 (see sft_qwen3_5_35b_a3b.sh).
# Kept from the official qwen-vl-finetune recipe (ms-swift's script sets none of them, so its
# framework defaults apply there): no weight decay, gradient clipping 1, save every 1000 steps.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec bash "$HERE/official_recipe.sh" \
  --tune_mm_mlp False \
  --num_train_epochs 1 \
  --warmup_steps 0.05 \
  --lr_scheduler_type cosine_with_min_lr \
  --lr_scheduler_kwargs '{"min_lr_rate": 0.1}' \
  --model_max_length 16384 \
  --max_pixels 1003520 \
  --enable_thinking auto \
  --video_max_frames 12 \
  "$@"
