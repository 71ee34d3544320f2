#!/usr/bin/env bash
# Sharded training side by side on the GPUs of one node (benchmarks/sharded_throughput.py
# says what is measured). Installs the wheels carried in .whl/ (if any) into /tmp/site first,
# as on the lent GPU machines, then runs the benchmark; results land in $OUT (or /tmp).
#   bash benchmarks/sharded_throughput.sh [--runs zero2,fsdp2_fused,...] [--deadline 480]
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$ROOT${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c 'import torch, transformers, accelerate; print("torch", torch.__version__, "transformers", transformers.__version__, "accelerate", accelerate.__version__, "GPUs", torch.cuda.device_count(), flush=True)'
exec python3 -m benchmarks.sharded_throughput --out "${OUT:-/tmp/sharded_throughput}" "$@"
