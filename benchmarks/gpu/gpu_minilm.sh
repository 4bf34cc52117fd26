#!/usr/bin/env bash
# MiniLM distillation on a lent GPU, in two device calls (one carry is at most 64 MiB; the teacher is 91 MB).
# Here, once:   split -b 45487224 ~/.cache/onnx-inher/zoo/minilm_torchscript-v1-*.onnx .gpu/p1/teacher.part.
#               mv .gpu/p1/teacher.part.ab .gpu/p2/; sha256sum < the teacher | cut -d' ' -f1 > .gpu/p1/teacher.sha256
#               python -m benchmarks.distill_minilm --export-tokens .gpu/p1/fortunes64_pairs3.npz \
#                   --train-tokens 64 --augment-pairs 3
# Device call 1 (carry .gpu/p1):  bash benchmarks/gpu/gpu_minilm.sh stage .gpu/p1
# Device call 2 (carry .gpu/p2), within the machine's idle window:
#                                 bash benchmarks/gpu/gpu_minilm.sh run .gpu/p2 [extra distill_minilm options]
# A later call's tree copy removes the earlier carry, hence the copy to $STAGE in call 1.
set -eu
cd "$(dirname "$0")/../.."  # the repository root: `python -m` puts it on sys.path
STAGE=/tmp/onnx_inher_minilm
mode="$1"; from="$2"; shift 2
mkdir -p "$STAGE"
if [ "$mode" = stage ]; then
  cp "$from"/* "$STAGE"/ && ls -la "$STAGE"
  exit 0
fi
cp "$from"/teacher.part.* "$STAGE"/
cat "$STAGE"/teacher.part.* > "$STAGE/teacher.onnx"
[ "$(sha256sum < "$STAGE/teacher.onnx" | cut -d' ' -f1)" = "$(cat "$STAGE/teacher.sha256")" ] || {
  echo "gpu_minilm: teacher checksum mismatch"; exit 1; }
PY="${PYTHON:-python}"
export ONNX_INHER_QUIET=1 PYTHONUNBUFFERED=1
if ! "$PY" -c "import onnx_inher.passes" 2>/dev/null; then  # not installed: map passes/ as the package does
  ln -sfn "$PWD/passes" onnx_inher/passes && trap 'rm -f onnx_inher/passes' EXIT
fi
OUT_DIR="${OUT:-benchmarks/gpu_out}"
mkdir -p "$OUT_DIR"
"$PY" -m benchmarks.distill_minilm --teacher "$STAGE/teacher.onnx" --tokens "$STAGE/fortunes64_pairs3.npz" \
  --train-tokens 64 --device cuda --precision bf16 --batch-size 64 --features hidden --lr 6e-4 \
  --allocate sensitivity --budget-seconds 150 -o "$OUT_DIR/distill_minilm_gpu.json" "$@"
