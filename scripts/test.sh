#!/usr/bin/env bash
# Run the test suite (the fast tests and the slow end-to-end ones; CI runs exactly this).
# Extra arguments go to pytest, e.g.  bash scripts/test.sh -m "not slow"  for the quick subset
# (a bare `pytest` skips the slow tests; -m "" here undoes that, and a later -m wins).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck disable=SC1091
. "$ROOT/scripts/setup_env.sh"
cd "$ROOT"
export WANDB_MODE=offline
started=$(date +%s)
# pytest's folders go under $TMPDIR (default /tmp). The suite keeps only failing tests' folders and
# the session's shared fixtures (tiny models, demo data: ~2 GiB), but a single test's checkpoints
# take up to ~1.5 GiB: the free space is printed so a full disk shows as the cause of a failure.
TMP_ROOT="${TMPDIR:-/tmp}"
free_space() { df -Ph "$TMP_ROOT" | awk 'NR == 2 {print $4 " free on " $6}'; }
echo "[test] $(date -u '+%F %T') UTC: pytest starts ($(free_space))"
set +e
# --durations: the slowest tests, so a slow machine or a slow test shows in the log.
python -m pytest -m "" "$@" --durations=30
rc=$?
echo "[test] $(date -u '+%F %T') UTC: pytest ended ($rc) after $(( $(date +%s) - started )) s ($(free_space))"
set -e
if [ "$rc" = "5" ]; then
  echo "[test] no tests were collected: that is a failure" >&2
  exit 1
fi
exit "$rc"
