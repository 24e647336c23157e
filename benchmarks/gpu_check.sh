#!/usr/bin/env bash
# The short GPU check of issue 17: one script, at most 8 minutes on one H200.
#
#   bash benchmarks/gpu_check.sh            # on a GPU machine, from the repository root
#   bash benchmarks/gpu_check.sh --tiny     # CPU smoke run (tiny shapes, a few minutes)
#
# Runs `python -m benchmarks.gpu_check` (see its docstring): (a) expert path fwd+bwd, XLA vs
# Triton, time and HBM bandwidth against the card's peak; (b) the PEER layer vs a dense FFW
# of equal FLOPs; (c) a bf16 train step, tokens/s and MFU, of a ~100M dense model and its
# PEER counterpart. The report goes to stdout and to $GPU_CHECK_OUT (default
# /tmp/gpu_check.md). Where JAX sees no GPU or TPU the script runs the tiny mode and says so.
# Environment: PYTHON (default: .venv/bin/python, python or python3, the first with
# jax), GPU_CHECK_TIMEOUT (seconds, default 480).
set -euo pipefail
cd "$(dirname "$0")/.."
ARGS=("$@")
if [[ " ${ARGS[*]-} " == *" --help "* || " ${ARGS[*]-} " == *" -h "* ]]; then
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
  exit 0
fi
# Python: $PYTHON, else the first of the repo's .venv, python, python3 that imports jax.
PY=${PYTHON:-}
if [[ -z "$PY" ]]; then
  for cand in .venv/bin/python python python3; do
    if command -v "$cand" >/dev/null 2>&1 && "$cand" -c "import jax" >/dev/null 2>&1; then
      PY=$cand; break
    fi
  done
fi
if [[ -z "$PY" ]]; then
  echo "gpu_check: no Python with jax found (set PYTHON=/path/to/venv/bin/python)" >&2
  exit 2
fi
LIMIT=${GPU_CHECK_TIMEOUT:-480}
OUT=${GPU_CHECK_OUT:-/tmp/gpu_check.md}
BACKEND=$("$PY" -c "import jax; print(jax.default_backend())" 2>/dev/null || echo cpu)
if [[ "$BACKEND" == "cpu" && " ${ARGS[*]-} " != *" --tiny "* ]]; then
  echo "gpu_check: JAX sees no GPU/TPU (backend: cpu): running the tiny CPU mode instead" >&2
  ARGS+=("--tiny")
fi
# One process holds the card; let XLA take most of its memory (tables of N = 1024² rows).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.92}
echo "gpu_check: backend $BACKEND, limit ${LIMIT}s, report -> $OUT" >&2
exec timeout --signal=INT --kill-after=20 "$LIMIT" "$PY" -m benchmarks.gpu_check \
  --out="$OUT" ${ARGS[@]+"${ARGS[@]}"}
