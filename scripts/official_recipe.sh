#!/usr/bin/env bash
# The official qwen-vl-finetune recipe, shared by the sft*.sh wrappers: full fine-tuning of
# the language model and merger (vision tower frozen), data_flatten, 0.5 epoch,
# 50176..784 pixels per image, 8192 tokens, cosine schedule with 3% warmup, no weight
# decay, gradient clipping 1, wandb.  The wrappers set
#   LR, BATCH_SIZE, GRAD_ACCUM_STEPS (the official samples per optimizer step and GPU are
#   BATCH_SIZE x GRAD_ACCUM_STEPS), SHARDING (fsdp2 | zero2 | zero3) and ZERO_CONFIG
# (each overridable from the environment); every flag given after the wrapper's name
# overrides these defaults (last value wins).  Runs scripts/launch.sh.
#
# FAST=1 (default): the same optimisation (learning rate, epochs, schedule, samples per step
# on average), run fast:
#   - token-budget micro-batches: one packed micro-batch per step and GPU holding
#     BATCH_SIZE x GRAD_ACCUM_STEPS samples on average (--token_budget_samples; the budget
#     is computed from the data's length cache and printed at the start). If it does not fit
#     in memory, raise BUDGET_ACCUM_STEPS (micro-batches per step; the budget shrinks so the
#     samples per step stay the same);
#   - compiled decoder layers and vision blocks with the compiler's activation budget 0.5
#     instead of gradient checkpointing, and the fused AdamW kernel (fsdp2, zero2); ZeRO-3
#     cannot run compiled layers, so zero3 keeps gradient checkpointing and adamw_torch,
#     with the token budget;
#   - SHARDING: fsdp2 = PyTorch FSDP2 (scripts/fsdp2.json: parameters, gradients and
#     optimizer state sharded, bf16 compute, float32 master weights), zero2 = DeepSpeed
#     ZeRO-2 (scripts/zero2.json: whole bf16 weights on every GPU), zero3 = ZERO_CONFIG.
#     The README's "Which sharding" table says which fits which model and GPU memory.
# FAST=0: the official batching exactly: BATCH_SIZE samples per GPU x GRAD_ACCUM_STEPS
# accumulation, gradient checkpointing, DeepSpeed ZERO_CONFIG (the official zero3.json /
# zero2.json).
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
: "${LR:?}" "${BATCH_SIZE:?}" "${GRAD_ACCUM_STEPS:?}" "${ZERO_CONFIG:?}"
# wandb: its own default (online when logged in); the training process falls back to offline,
# saying so, only when no credentials exist (qwenvl/train/wandb_mode.py).
FAST="${FAST:-1}"
SHARDING="${SHARDING:-zero2}"
BUDGET_ACCUM_STEPS="${BUDGET_ACCUM_STEPS:-1}"

if [[ "$FAST" == "1" ]]; then
  case "$SHARDING" in
    fsdp2) SHARD_FLAGS=(--fsdp "full_shard auto_wrap" --fsdp_config "$HERE/fsdp2.json") ;;
    zero2) SHARD_FLAGS=(--deepspeed "$HERE/zero2.json") ;;
    zero3) SHARD_FLAGS=(--deepspeed "$HERE/$ZERO_CONFIG") ;;
    *) echo "SHARDING must be fsdp2, zero2 or zero3, not '$SHARDING'" >&2; exit 2 ;;
  esac
  if [[ "$SHARDING" == "zero3" ]]; then
    SPEED_FLAGS=(--gradient_checkpointing True)
  else
    # adamw_torch_fused: the same AdamW as the official adamw_torch, one kernel per parameter group
    # instead of per-tensor launches (measured on 2x H200: sft_7b.sh 6,368 -> 7,113 tokens/s per GPU).
    # Not for zero3: its offload configs step the optimizer on the CPU.
    SPEED_FLAGS=(--gradient_checkpointing False --compile_layers True --activation_memory_budget 0.5
                 --optim adamw_torch_fused)
  fi
  BATCH_FLAGS=(--token_budget_samples "$((BATCH_SIZE * GRAD_ACCUM_STEPS))"
               --gradient_accumulation_steps "$BUDGET_ACCUM_STEPS" "${SPEED_FLAGS[@]}")
elif [[ "$FAST" == "0" ]]; then
  SHARD_FLAGS=(--deepspeed "$HERE/$ZERO_CONFIG")
  BATCH_FLAGS=(--gradient_accumulation_steps "$GRAD_ACCUM_STEPS" --gradient_checkpointing True)
else
  echo "FAST must be 1 (token budget, compiled layers) or 0 (the official batching), not '$FAST'" >&2; exit 2
fi

exec bash "$HERE/launch.sh" \
  "${SHARD_FLAGS[@]}" \
  --data_flatten True \
  --tune_mm_vision False \
  --tune_mm_mlp True \
  --tune_mm_llm True \
  --num_train_epochs 0.5 \
  --per_device_train_batch_size "$BATCH_SIZE" \
  --per_device_eval_batch_size "$((BATCH_SIZE * 2))" \
  "${BATCH_FLAGS[@]}" \
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
  --dataloader_num_workers 4 \
  --report_to wandb \
  "$@"
