#!/usr/bin/env bash
# Continue a distilled MiniLM student on a lent GPU: one arm per learning rate, side by side on the one GPU,
# the online teacher in torch on the GPU (the lent image's onnxruntime has no CUDA provider), --augment mix.
#
# What travels is teacher (91 MB) + student (69 MB) + tokens; a device call carries at most 64 MiB with the
# repo, so `pack` cuts one checked bundle into three chunks, and three calls in a row stage them (the machine
# stays warm 30 s after each; a later call's tree copy drops the earlier carry, hence the copy to $STAGE).
# A device call returns at most 8 files of 16 MiB: each arm returns its JSON and the weights that changed
# (benchmarks/experiments/weights_delta.py), rebuilt here byte-identically from the same starting student.
#
# Here:      bash benchmarks/gpu/gpu_minilm_continue.sh pack STUDENT.onnx        # -> .gpu/c1 .gpu/c2 .gpu/c3
# Device:    call 1 (carry .gpu/c1):  bash benchmarks/gpu/gpu_minilm_continue.sh stage .gpu/c1
#            call 2 (carry .gpu/c2):  bash benchmarks/gpu/gpu_minilm_continue.sh stage .gpu/c2
#            call 3 (carry .gpu/c3):  bash benchmarks/gpu/gpu_minilm_continue.sh run .gpu/c3 BUDGET_S LR [LR ...]
# Here:      python -m benchmarks.experiments.weights_delta apply STUDENT.onnx OUT/arm_LR.manifest.json -o tuned.onnx
# A rehearsal on this CPU: DEVICE=cpu BATCH=8 OUT=/tmp/o bash ... run .gpu/c3 20 1e-4 (after the stages).
set -eu
cd "$(dirname "$0")/../.."  # the repository root: `python -m` puts it on sys.path
STAGE=${STAGE:-/tmp/onnx_inher_continue}
PY="${PYTHON:-python3}"
mode="$1"; shift
mkdir -p "$STAGE"
case "$mode" in
pack)
  student="$1"
  teacher=$("$PY" -c 'from benchmarks.common import zoo; print(zoo.minilm_torchscript())')
  tmp=$(mktemp -d); trap 'rm -rf "$tmp"' EXIT
  cp "$teacher" "$tmp/teacher.onnx"; cp "$student" "$tmp/student.onnx"
  "$PY" -m benchmarks.distill_minilm --export-tokens "$tmp/tokens.npz" --train-tokens 64
  tar -cf "$tmp/bundle.tar" -C "$tmp" teacher.onnx student.onnx tokens.npz
  size=$(stat -c %s "$tmp/bundle.tar")
  split -b $(( (size + 2) / 3 )) -d -a 1 "$tmp/bundle.tar" "$tmp/bundle.part."
  for i in 1 2 3; do rm -rf ".gpu/c$i"; mkdir -p ".gpu/c$i"; mv "$tmp/bundle.part.$((i - 1))" ".gpu/c$i/"; done
  sha256sum < "$tmp/bundle.tar" | cut -d' ' -f1 > .gpu/c3/bundle.sha256
  ls -la .gpu/c1 .gpu/c2 .gpu/c3
  ;;
stage)
  cp "$1"/* "$STAGE"/ && ls -la "$STAGE"
  ;;
run)
  from="$1"; budget="$2"; shift 2
  cp "$from"/* "$STAGE"/
  cat "$STAGE"/bundle.part.* > "$STAGE/bundle.tar"
  [ "$(sha256sum < "$STAGE/bundle.tar" | cut -d' ' -f1)" = "$(cat "$STAGE/bundle.sha256")" ] || {
    echo "gpu_minilm_continue: bundle checksum mismatch (were all three chunks staged?)"; exit 1; }
  tar -xf "$STAGE/bundle.tar" -C "$STAGE"
  export ONNX_INHER_QUIET=1 PYTHONUNBUFFERED=1
  if ! "$PY" -c "import onnx_inher.passes" 2>/dev/null; then  # not installed: map passes/ as the package does
    ln -sfn "$PWD/passes" onnx_inher/passes && trap 'rm -f onnx_inher/passes' EXIT
  fi
  out="${OUT:-benchmarks/gpu_out}"; mkdir -p "$out" "$STAGE/json"
  nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv,noheader 2>/dev/null || true
  pids=()
  for lr in "$@"; do
    "$PY" -m benchmarks.distill_minilm --student "$STAGE/student.onnx" --teacher "$STAGE/teacher.onnx" \
      --tokens "$STAGE/tokens.npz" --train-tokens 64 --augment mix --features hidden --trainable no-embeddings \
      --val-fraction 0 --no-init-score --device "${DEVICE:-cuda}" --precision "${PRECISION:-fp32}" \
      --teacher-runtime torch --threads "${THREADS:-4}" --batch-size "${BATCH:-256}" --lr "$lr" \
      --budget-seconds "$budget" --time-limit "${TIME_LIMIT:-$(( budget * 3 / 2 ))}" ${TEST_SAMPLES:+--test-samples $TEST_SAMPLES} \
      --save "$STAGE/arm_$lr.onnx" -o "$STAGE/json/arm_$lr.json" 2>&1 | sed -u "s/^/[lr $lr] /" | grep -v '^\[lr [^]]*\]   ' &
    pids+=($!)
  done
  status=0
  for pid in "${pids[@]}"; do wait "$pid" || status=1; done
  for lr in "$@"; do
    [ -f "$STAGE/arm_$lr.onnx" ] || { echo "arm lr $lr: no student"; status=1; continue; }
    cp "$STAGE/json/arm_$lr.json" "$out/"
    "$PY" -m benchmarks.experiments.weights_delta extract "$STAGE/student.onnx" "$STAGE/arm_$lr.onnx" "$out" --prefix "arm_$lr"
    "$PY" -c "import json,sys; d=json.load(open(sys.argv[1])); t=d['distill']; print('arm lr', sys.argv[2], \
'final', d['final'], 'steps', t['steps'], 'of', t['planned_steps'], 's/step', t['seconds_per_step'], \
'out_of_time', t['out_of_time'])" "$out/arm_$lr.json" "$lr"
  done
  exit $status
  ;;
*)
  echo "usage: $0 pack STUDENT.onnx | stage DIR | run DIR BUDGET_S LR [LR ...]"; exit 2
  ;;
esac
