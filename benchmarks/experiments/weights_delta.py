"""Ship a fine-tuned student as the initializers that changed, and rebuild it elsewhere.

A lent GPU returns at most 16 MiB a file, and a MiniLM student is 69 MB, most of it embedding tables that
distillation leaves alone (`--trainable no-embeddings`). So the GPU side writes only the tensors that differ
from the student it started from, in parts under the limit, with the sha256 of the whole file; this side
puts them back into the same starting student and checks the result is byte-identical.

    python -m benchmarks.experiments.weights_delta extract START.onnx TUNED.onnx OUT_DIR [--prefix arm_a] [--max-mib 15]
    python -m benchmarks.experiments.weights_delta apply START.onnx OUT_DIR/arm_a.manifest.json -o TUNED.onnx
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

from onnx_inher.ir.io import save_model
from onnx_inher.run.stages import file_sha256 as sha256

CONSTANT = "Constant:"


def weights(model: onnx.ModelProto) -> dict[str, onnx.TensorProto]:
    """Every tensor write-back may change: initializers by name, Constant nodes' values by output name."""
    found = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Constant":
            found.update({f"{CONSTANT}{node.output[0]}": a.t for a in node.attribute if a.name == "value"})
    return found


def changed(start: onnx.ModelProto, tuned: onnx.ModelProto) -> dict[str, np.ndarray]:
    """Tensors of `tuned` whose bytes differ from `start`'s (the graphs must be the same one)."""
    before, after = weights(start), weights(tuned)
    if before.keys() != after.keys():
        raise SystemExit("weights_delta: the two models do not hold the same weights; not one graph")
    return {n: numpy_helper.to_array(t) for n, t in after.items() if t.SerializeToString() !=
            before[n].SerializeToString()}


def extract(start_path: Path, tuned_path: Path, out: Path, prefix: str, max_mib: float) -> Path:
    arrays = changed(onnx.load(str(start_path)), onnx.load(str(tuned_path)))
    limit, parts, sizes = max_mib * 2**20, [[]], [0]
    for name in sorted(arrays):  # greedy, in name order: deterministic parts
        if sizes[-1] + arrays[name].nbytes > limit and parts[-1]:
            parts.append([])
            sizes.append(0)
        parts[-1].append(name)
        sizes[-1] += arrays[name].nbytes
    out.mkdir(parents=True, exist_ok=True)
    files = []
    for i, names in enumerate(parts):
        keys = {f"t{j}": arrays[n] for j, n in enumerate(names)}
        path = out / f"{prefix}.part{i}.npz"
        np.savez(path, names=np.array(names), **keys)
        files.append(path.name)
    manifest = {"start_sha256": sha256(start_path), "tuned_sha256": sha256(tuned_path), "parts": files,
                "tensors": len(arrays), "bytes": int(sum(sizes))}
    path = out / f"{prefix}.manifest.json"
    path.write_text(json.dumps(manifest, indent=2) + "\n")
    return path


def apply(start_path: Path, manifest_path: Path, output: Path) -> bool:
    manifest = json.loads(manifest_path.read_text())
    if sha256(start_path) != manifest["start_sha256"]:
        raise SystemExit(f"weights_delta: {start_path} is not the student these weights were trained from")
    model = onnx.load(str(start_path))
    tensors = weights(model)
    for part in manifest["parts"]:
        with np.load(manifest_path.parent / part) as z:
            for j, name in enumerate(z["names"]):
                value, old = z[f"t{j}"], tensors[str(name)]
                if tuple(old.dims) != value.shape:
                    raise SystemExit(f"weights_delta: {name} has shape {value.shape}, expected {tuple(old.dims)}")
                old.CopyFrom(numpy_helper.from_array(value, old.name))
    save_model(model, output)
    same = sha256(output) == manifest["tuned_sha256"]
    print(f"{output}: {'byte-identical to' if same else 'DIFFERS from'} the tuned student "
          f"({manifest['tensors']} tensors replaced)")
    return same


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="verb", required=True)
    e = sub.add_parser("extract")
    e.add_argument("start", type=Path)
    e.add_argument("tuned", type=Path)
    e.add_argument("out", type=Path)
    e.add_argument("--prefix", default="delta")
    e.add_argument("--max-mib", type=float, default=15.0)
    a = sub.add_parser("apply")
    a.add_argument("start", type=Path)
    a.add_argument("manifest", type=Path)
    a.add_argument("-o", "--output", type=Path, required=True)
    args = parser.parse_args()
    if args.verb == "extract":
        print(extract(args.start, args.tuned, args.out, args.prefix, args.max_mib))
    elif not apply(args.start, args.manifest, args.output):
        sys.exit(1)


if __name__ == "__main__":
    main()
