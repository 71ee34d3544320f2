#!/usr/bin/env bash
# Multi-GPU check: the released Qwen2.5-VL-3B architecture (MODEL=7b: the 7B one; random
# weights, saved once to a temporary folder) trained through scripts/launch.sh with ZeRO-2 and
# then ZeRO-3 (ZERO_STAGES="zero3": only that one) on every visible GPU, on the demo mix (images, multi-image, text-only and video samples, so some
# micro-batches carry no image on one rank while another has images: ZeRO-3 must not hang).
# (DATASETS=... overrides the mix, e.g. without demo_video where no video decoder is installed.)
# Prints each run's summary (first/last loss) and its train_runtime; logs go to $OUT or /tmp.
#   bash benchmarks/zero_multi_gpu.sh [steps]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
STEPS="${1:-20}"
LOGS="${OUT:-/tmp}"
WORK="$(mktemp -d)"
MODEL="${MODEL:-3b}"
python3 - "$WORK/model" "$MODEL" <<'PY'
import sys, torch
from pathlib import Path
from benchmarks.train_throughput import write_model_dir
from qwenvl.hf_internals import build_from_config
from qwenvl.train.model import model_class_for
from transformers import AutoConfig
folder = write_model_dir(sys.argv[2], Path(sys.argv[1]))
config = AutoConfig.from_pretrained(folder)
torch.manual_seed(0)
with torch.device("cuda"):
    model = build_from_config(model_class_for("qwen2_5_vl"), config, dtype=torch.bfloat16)
model.save_pretrained(folder)
print(f"random-weight {sys.argv[2].upper()} written to", folder, flush=True)
PY
for zero in ${ZERO_STAGES:-zero2 zero3}; do
  echo "=== $zero ==="
  MODEL_PATH="$WORK/model" DATASETS="${DATASETS:-demo_shapes,demo_multi_image,demo_text,demo_video}" \
  OUTPUT_DIR="$WORK/out_$zero" RUN_NAME="$zero" PRECISION=bf16 \
  bash "$ROOT/scripts/launch.sh" --deepspeed "$ROOT/scripts/$zero.json" \
    --tune_mm_llm True --tune_mm_mlp True --tune_mm_vision False --data_flatten True \
    --per_device_train_batch_size 4 --gradient_accumulation_steps 1 --max_steps "$STEPS" \
    --learning_rate 1e-5 --gradient_checkpointing True --logging_steps 5 --save_strategy no \
    --max_pixels 200704 --min_pixels 3136 --video_max_pixels 50176 --video_min_pixels 3136 \
    --report_to none --dataloader_num_workers 4 --disable_tqdm True > "$LOGS/$zero.log" 2>&1 \
    || { echo "$zero failed"; tail -30 "$LOGS/$zero.log"; exit 1; }
  grep -E "^loss:|train_runtime|model and processor saved" "$LOGS/$zero.log" || true
done
