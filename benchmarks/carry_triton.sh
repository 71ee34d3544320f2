#!/usr/bin/env bash
# Pack a Triton release small enough to carry to a GPU machine that cannot download it (the lent
# H200 machines take at most 64 MiB of files per call). flash-linear-attention 0.6's gated delta
# rule refuses its backward on Hopper with Triton 3.4.0-3.7.0 (fla issue #640); those machines have
# 3.6.0. The wheel is 198 MB; without debug info, its bundled CUDA tools and CUPTI it packs to about
# 43 MB of tar.xz. On the GPU machine the tools come from its own CUDA (ptxas, cuobjdump, nvdisasm).
#
#   bash benchmarks/carry_triton.sh [VERSION] [FOLDER]      # default 3.7.1 into .tri/ (git-ignored)
#
# Then in a device call with carry [".tri"] (and the other wheels installed in /tmp/site):
#   mkdir -p /tmp/tri && tar xJf .tri/triton-3.7.1.tar.xz -C /tmp/tri && \
#   for t in ptxas cuobjdump nvdisasm; do ln -sf "$(command -v $t || echo /usr/local/cuda/bin/$t)" \
#     /tmp/tri/triton/backends/nvidia/bin/$t; done; export PYTHONPATH=/tmp/tri:/tmp/site:$PWD
# Only for programs that need no torch.compile: the machine's torch was built against its own Triton.
set -euo pipefail
VERSION="${1:-3.7.1}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
FOLDER="${2:-$ROOT/.tri}"
WORK="$(mktemp -d)"
trap 'rm -rf "$WORK"' EXIT
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  -d "$WORK" "triton==$VERSION"
(cd "$WORK" && unzip -q triton-*.whl)
rm -rf "$WORK"/triton/backends/nvidia/lib/cupti "$WORK"/triton/instrumentation
rm -f "$WORK"/triton/backends/nvidia/bin/*
find "$WORK/triton" -name "*.so*" -exec strip --strip-debug {} \;
mkdir -p "$FOLDER"
(cd "$WORK" && tar cf - triton "triton-$VERSION.dist-info" | xz -T0 -6 > "$FOLDER/triton-$VERSION.tar.xz")
ls -la "$FOLDER/triton-$VERSION.tar.xz"
grep -qx "/$(basename "$FOLDER")/" "$ROOT/.git/info/exclude" 2>/dev/null || \
  echo "note: add /$(basename "$FOLDER")/ to .git/info/exclude so it travels only when carried" >&2
