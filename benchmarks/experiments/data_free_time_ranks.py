"""Could `compress` without data move ranks by time too? A data-free time-priced greedy, as an experiment.

    python -m benchmarks.experiments.data_free_time_ranks crepe.onnx --shape audio_frames=1x1024 -o out/
    python -m benchmarks.experiments.crepe_speech score crepe.onnx out/energy.onnx out/data_free.onnx --data test.npz

`compress`'s default spreads `--param-ratio` by singular-value energy: no data, so no measured damage. The
time-priced sensitivity allocation (`tuning/allocate.py`) needs data for its damage table. This experiment
gives the greedy a data-free damage instead, each layer's absolute truncation energy
`e(r) x params(dense)` (its relative error scaled by the layer's size), and the same time pricing (every layer
timed alone at each rank step, all cores), within the energy plan's params and time. It writes the energy
student and the data-free one (plain SVD factors, no latency check), and prints both plans' ranks and the
layers' time alone. Score them with the model's own scorer.

Not a product path: one model's result chose the damage (benchmarks/RESULTS.md, issue 18).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from onnx_inher import Options, api, parse_policy
from onnx_inher.bench.sessions import Settings
from onnx_inher.planning.plan import Spectra, apply_edits
from onnx_inher.planning.svd import full_svd
from onnx_inher.tuning import allocate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", type=Path)
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=AxBxC")
    parser.add_argument("--param-ratio", type=float, default=0.5)
    parser.add_argument("-o", "--out", type=Path, required=True)
    args = parser.parse_args()
    shapes = {k: [int(d) for d in v.split("x")] for k, v in (s.split("=") for s in args.shape)}
    options = Options(mode="svd", policy=parse_policy(param_ratio=args.param_ratio), shapes=shapes,
                      latency_check=False)
    a = api.analyze(args.model, options.dims, options.shapes)
    spectra = Spectra()
    p = api.plan(args.model, options, _analysis=a, _spectra=spectra)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "energy.plan.json").write_text(p.to_json())
    chosen = [c for c in p.candidates if c.decision == "factorize" and c.dense_classes is None
              and not c.shares_factors_with]
    layers: dict[str, allocate.Layer] = {}
    for c in chosen:
        view = a.views[c.node]
        layer = allocate.Layer(view, full_svd(view.matrices()), int(c.rank or 1),
                               allocate.rank_cap(view, c.heads, options.guard), c.heads)
        # damage(r) = weight x e(r) with weight = sensitivity / e(plan rank): make it e(r) x dense params
        layer.sensitivity = float(view.weight.size) * layer.error(layer.plan_rank)
        layers[c.node] = layer
    step = options.rank_multiple
    said = allocate.time_layers(layers, p, a.loaded.model, a.views,
                                Settings(provider="cpu", threads=os.cpu_count() or 1), step)
    budget = sum((layer.cost(layer.plan_rank) for layer in layers.values()), np.zeros(2, dtype=np.int64))
    ranks = allocate.greedy_ranks(layers, budget, step)
    print(said)
    for n, layer in layers.items():
        line = f"{n}: energy rank {layer.plan_rank} -> {ranks[n]}"
        if layer.times:
            line += f" ({layer.time(layer.plan_rank):.3f} -> {layer.time(ranks[n]):.3f} ms alone)"
        print(line)
    if all(layer.times for layer in layers.values()):
        print(f"layers alone: energy {sum(L.time(L.plan_rank) for L in layers.values()):.3f} ms, data-free "
              f"{sum(L.time(ranks[n]) for n, L in layers.items()):.3f} ms")
    for c in chosen:
        c.rank = ranks[c.node]
    apply_edits(p, a.views, spectra)
    (args.out / "data_free.plan.json").write_text(p.to_json())
    for name in ("energy", "data_free"):
        api.compress(args.model, args.out / f"{name}.onnx", Options(mode="svd", shapes=shapes, latency_check=False),
                     plan_path=args.out / f"{name}.plan.json")
    print(f"wrote {args.out}/energy.onnx and {args.out}/data_free.onnx")


if __name__ == "__main__":
    main()
