#!/usr/bin/env bash
# The whole CUDA benchmark path in one go (a few minutes on one GPU); installs nothing.
#   bash benchmarks/gpu/gpu_check.sh [--quick] [--iters N] [--budget S]   results in $OUT (else benchmarks/gpu_out)
# Python: $PYTHON if set; otherwise the first of .venv/bin/python, python3, python whose onnxruntime
# offers CUDA (else the first that runs, which then says why nothing was measured). Exits 0 without CUDA.
set -u
cd "$(dirname "$0")/../.." || exit 1  # the repository root: `-m` puts it on sys.path
OUT_DIR="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT_DIR"
has_cuda='import onnxruntime as o, sys; sys.exit(0 if "CUDAExecutionProvider" in o.get_available_providers() else 1)'
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  first=""
  for cand in .venv/bin/python python3 python; do
    if [ -x "$cand" ] || command -v "$cand" >/dev/null 2>&1; then
      "$cand" -c "" 2>/dev/null || continue
      [ -z "$first" ] && first="$cand"
      if "$cand" -c "$has_cuda" 2>/dev/null; then PY="$cand"; break; fi
    fi
  done
  PY="${PY:-$first}"
fi
if [ -z "$PY" ]; then
  echo "gpu_check: no CUDA benchmark: no python found on PATH" | tee "$OUT_DIR/gpu_check.txt"
  exit 0
fi
export ONNX_INHER_QUIET="${ONNX_INHER_QUIET:-1}"
"$PY" -m benchmarks.gpu.gpu_check --out "$OUT_DIR" "$@"
