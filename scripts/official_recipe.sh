#!/usr/bin/env bash
# The official qwen-vl-finetune recipe, shared by the sft*.sh wrappers: full fine-tuning of
# the language model and merger (vision tower frozen), data_flatten, 0.5 epoch,
# 50176..784 pixels per image, 8192 tokens, cosine schedule with 3% warmup, no weight
# decay, gradient clipping 1, gradient checkpointing, wandb.  The wrappers set
#   LR, BATCH_SIZE, GRAD_ACCUM_STEPS, ZERO_CONFIG (zero2.json | zero3.json)
# (each overridable from the environment); every flag given after the wrapper's name
# overrides these defaults (last value wins).  Runs scripts/launch.sh.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${LR:?}" "${BATCH_SIZE:?}" "${GRAD_ACCUM_STEPS:?}" "${ZERO_CONFIG:?}"
# wandb: its own default (online when logged in); the training process falls back to offline,
# saying so, only when no credentials exist (qwenvl/train/wandb_mode.py).

exec bash "$HERE/launch.sh" \
  --deepspeed "$HERE/$ZERO_CONFIG" \
  --data_flatten True \
  --tune_mm_vision False \
  --tune_mm_mlp True \
  --tune_mm_llm True \
  --num_train_epochs 0.5 \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --per_device_eval_batch_size "$((BATCH_SIZE * 2))" \
  --gradient_accumulation_steps "$GRAD_ACCUM_STEPS" \
  --max_pixels 50176 \
  --min_pixels 784 \
  --eval_strategy no \
  --save_strategy steps \
  --save_steps 1000 \
  --save_total_limit 1 \
  --learning_rate "$LR" \
  --weight_decay 0 \
  --warmup_steps 0.03 \
  --max_grad_norm 1 \
  --lr_scheduler_type cosine \
  --logging_steps 1 \
  --model_max_length 8192 \
  --gradient_checkpointing True \
  --dataloader_num_workers 4 \
  --report_to wandb \
  "$@"
