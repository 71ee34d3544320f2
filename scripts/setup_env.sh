#!/usr/bin/env bash
# Idempotent set-up shared by demo.sh, test.sh and CI: FFmpeg (for torchcodec),
# a virtual environment in .venv with requirements.txt, and this package in editable mode.
# Re-running is cheap: the pip step is skipped while requirements.txt is unchanged.
# Source it (". scripts/setup_env.sh") to get the environment activated.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${QWENVL_VENV:-$ROOT/.venv}"

# FFmpeg: torchcodec's libraries. A C++ compiler: DeepSpeed compiles its CPU Adam on first use (ZeRO with the
# optimizer offloaded; the test suite trains so on the CPU).
MISSING=()
command -v ffmpeg >/dev/null 2>&1 || MISSING+=(ffmpeg)
command -v c++ >/dev/null 2>&1 || MISSING+=(g++)
# ...and Python's headers for that build, where python3 is Debian's own.
PY_INCLUDE="$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"
if [ ! -f "$PY_INCLUDE/Python.h" ] && [ "${PY_INCLUDE#/usr/include/}" != "$PY_INCLUDE" ]; then
  MISSING+=(python3-dev)
fi
if [ "${#MISSING[@]}" -gt 0 ]; then
  WHAT="${MISSING[*]} (FFmpeg: without it torchcodec is skipped, decord and PyAV still work; g++ and python3-dev:"
  WHAT="$WHAT without them DeepSpeed cannot build its CPU Adam for optimizer offload)"
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[setup] installing ${MISSING[*]}"
    { DEBIAN_FRONTEND=noninteractive apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${MISSING[@]}" >/dev/null; } \
      || echo "[setup] could not install $WHAT"
  else
    echo "[setup] not found and cannot be installed here: $WHAT"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating $VENV"
  python3 -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

STAMP="$VENV/.qwenvl-requirements.sha256"
WANT="$(cat "$ROOT/requirements.txt" "$ROOT/pyproject.toml" | sha256sum | cut -d' ' -f1)"
if [ ! -f "$STAMP" ] || [ "$(cat "$STAMP")" != "$WANT" ]; then
  echo "[setup] installing requirements into $VENV (first run: a few minutes)"
  python -m pip install -q --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q -r "$ROOT/requirements.txt" 2>&1 | grep -v "^WARNING: Location" || true
  python -m pip install -q --no-deps -e "$ROOT" 2>&1 | grep -v "^WARNING: Location" || true
  python -c "import torch, torchvision, transformers, qwenvl" || { echo "[setup] install failed"; exit 1; }
  echo "$WANT" > "$STAMP"
fi
export HF_HUB_OFFLINE="${HF_HUB_OFFLINE:-1}"
export TOKENIZERS_PARALLELISM="${TOKENIZERS_PARALLELISM:-false}"
