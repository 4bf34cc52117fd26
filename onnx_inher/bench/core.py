"""`bench`: time models interleaved in one process and compare each with the first (the baseline).

Round-robin order (A, B, A, B, ...) after a warm-up of every model at every input shape, so slow
drifts of the machine (frequency, other jobs, caches) hit all models alike; one seeded input set
per shape is fed to every model. Every ratio comes with a paired bootstrap interval over rounds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.bench.layers import per_layer_results
from onnx_inher.bench.profile import Profile, feed_shapes, profile
from onnx_inher.bench.sessions import Runner, Settings, create, first_line, interleave
from onnx_inher.bench.stats import Drift, Ratio, Summary, drift, speedup, summarize
from onnx_inher.errors import InputError
from onnx_inher.ir.shapes import Shapes, check_shapes, complete_shapes, format_shapes, graph_inputs
from onnx_inher.runtime import load_inputs, machine_info, sample_inputs

FORMAT = "onnx-inher-bench/1"
DEFAULT_SEQ_LEN = 128
MEMORY_METHOD = ("peak RSS (kernel high-water mark) of a fresh process while it creates the session and runs it "
                 "once at the largest benchmarked shape, minus its RSS before; host memory only")


@dataclass
class Model:
    label: str
    path: Path
    proto: ModelProto  # without external data: only names and dims are read
    peak_rss_bytes: int | None = None
    reference: str | None = None  # what this added model is (the baseline flushed), when bench added it


@dataclass
class Point:
    """One input shape: the feed and, per model, its timings and costs."""

    batch: int
    seq_len: int | None
    feed: dict[str, np.ndarray]
    seconds: list[np.ndarray] = field(default_factory=list)
    summaries: list[Summary] = field(default_factory=list)
    profiles: list[Profile] = field(default_factory=list)
    ratios: list[Ratio | None] = field(default_factory=list)
    drift: Drift | None = None  # the machine's speed changed during this point's rounds


@dataclass
class BenchResult:
    settings: dict[str, Any]
    machine: dict[str, Any]
    models: list[Model]
    points: list[Point]
    skipped: list[str]
    layers: list[dict[str, Any]] = field(default_factory=list)
    layer_profile: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)  # what a reader should know when comparing the models

    def to_dict(self) -> dict[str, Any]:
        base = self.models[0].label
        ref_at = next((j for j, m in enumerate(self.models) if m.reference), None)
        points = []
        for p in self.points:
            rows = []
            for j, m in enumerate(self.models):
                prof, ref = p.profiles[j], p.profiles[0]
                ratio = p.ratios[j]
                ideal_flops = ref.flops / prof.flops if prof.flops else None
                ideal_bytes = ref.weight_bytes / prof.weight_bytes if prof.weight_bytes else None
                latency = p.summaries[j].to_dict()
                rows.append({
                    "model": m.label,
                    "latency_ms": latency,
                    "throughput_items_per_s": latency.pop("throughput"),
                    "flops": prof.flops,
                    "speedup": ratio.to_dict() if ratio else None,
                    "ideal_speedup_flops": ideal_flops,
                    "ideal_speedup_bytes": ideal_bytes,
                    "efficiency_flops": ratio.value / ideal_flops if ratio and ideal_flops else None,
                    "efficiency_bytes": ratio.value / ideal_bytes if ratio and ideal_bytes else None,
                    "speedup_vs_reference": (speedup(p.seconds[ref_at], p.seconds[j]).to_dict()
                                             if ref_at is not None and j not in (0, ref_at) else None),
                })
            points.append({"batch": p.batch, "seq_len": p.seq_len, "items": p.batch,
                           "inputs": {k: list(v) for k, v in feed_shapes(p.feed).items()}, "results": rows,
                           "drift": p.drift.to_dict() if p.drift else None})
        models = []
        for j, m in enumerate(self.models):
            prof = self.points[-1].profiles[j] if self.points else None
            models.append({"label": m.label, "path": None if m.reference else str(m.path), "baseline": j == 0,
                           "params": prof.params if prof else None,
                           "weight_bytes": prof.weight_bytes if prof else None,
                           "file_bytes": prof.file_bytes if prof else None,
                           "flops_unresolved_nodes": prof.unresolved_nodes if prof else None,
                           "session_peak_rss_bytes": m.peak_rss_bytes, "reference": m.reference})
        return {"format": FORMAT, "baseline": base, "settings": self.settings, "machine": self.machine,
                "memory_method": MEMORY_METHOD, "models": models, "points": points, "skipped": self.skipped,
                "layers": self.layers, "layer_profile": self.layer_profile, "notes": self.notes}


def _labels(paths: Sequence[Path]) -> list[str]:
    stems = [p.stem for p in paths]
    return [s if stems.count(s) == 1 else f"{s}#{i + 1}" for i, s in enumerate(stems)]


def _load(path: Path) -> ModelProto:
    if not path.is_file():
        raise InputError(f"{path}: no such file; check the path." if not path.exists()
                         else f"{path}: not a file; pass the .onnx file.")
    try:
        return onnx.load(str(path), load_external_data=False)
    except Exception:  # protobuf decode errors have several types
        raise InputError(f"{path}: not a valid ONNX model (truncated or not ONNX); re-export it.") from None


def _with_external_data(model: Model) -> ModelProto:
    """The model with its external tensors read (the entries keep only names and dims)."""
    if not any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.proto.graph.initializer):
        return model.proto
    try:
        return onnx.load(str(model.path))
    except Exception as err:  # missing or unreadable data file: say which
        raise InputError(f"{model.path}: cannot read its external data ({first_line(err)}); keep the data file "
                         "next to the model.") from None


def _signature(model: ModelProto) -> list[tuple[str, int, int]]:
    inits = {t.name for t in model.graph.initializer}
    return [(i.name, i.type.tensor_type.elem_type, len(i.type.tensor_type.shape.dim))
            for i in model.graph.input if i.name not in inits]


def check_same_inputs(models: list[Model]) -> None:
    base = models[0]
    want = _signature(base.proto)
    for m in models[1:]:
        got = _signature(m.proto)
        if got != want:
            fmt = lambda s: ", ".join(f"{n}:{onnx.TensorProto.DataType.Name(t)}[{r}-D]" for n, t, r in s)  # noqa: E731
            raise InputError(f"{m.path}: its inputs ({fmt(got)}) differ from the baseline {base.path}'s "
                             f"({fmt(want)}); only models with the same inputs can be compared.")


def dynamic_inner_dims(model: ModelProto) -> bool:
    """Whether any input has a dynamic dim after the batch axis (a sequence length, an image size)."""
    inits = {t.name for t in model.graph.initializer}
    return any(not (d.HasField("dim_value") and d.dim_value > 0)
               for i in model.graph.input if i.name not in inits for d in list(i.type.tensor_type.shape.dim)[1:])


def point_dims(model: ModelProto, batch: int, seq_len: int | None) -> tuple[dict[str, int] | None, str | None]:
    """Named-dim values for one shape point, or a reason this point does not fit the model."""
    dims: dict[str, int] = {}
    inits = {t.name for t in model.graph.initializer}
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        for axis, d in enumerate(inp.type.tensor_type.shape.dim):
            fixed = d.dim_value if d.HasField("dim_value") and d.dim_value > 0 else None
            if axis == 0:
                if fixed is not None and fixed != batch:
                    return None, f"batch {batch}: input '{inp.name}' has a fixed batch of {fixed}"
                if d.dim_param:
                    dims[d.dim_param] = batch
            elif d.dim_param and fixed is None:
                dims.setdefault(d.dim_param, seq_len or DEFAULT_SEQ_LEN)
    return dims, None


def with_batch(model: ModelProto, shapes: Shapes, batch: int) -> tuple[Shapes | None, str | None]:
    """`shapes` with axis 0 set to `batch` where the model's axis 0 is dynamic, or why it cannot be."""
    out: Shapes = {}
    dynamic = False
    for inp in graph_inputs(model):
        shape = shapes[inp.name]
        dims = inp.type.tensor_type.shape.dim
        if shape and not (dims[0].HasField("dim_value") and dims[0].dim_value > 0):
            dynamic = True
            shape = (batch, *shape[1:])
        out[inp.name] = shape
    first = next((s[0] for s in shapes.values() if s), None)
    if not dynamic and batch != first:
        return None, f"batch {batch}: no input has a dynamic batch axis (the shapes are {format_shapes(shapes)})"
    return out, None


def _given_points(model: ModelProto, batches: Sequence[int] | None, shapes: Mapping[str, Sequence[int]] | None,
                  inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None, seed: int,
                  skipped: list[str]) -> list[Point]:
    """The points of `shapes` (one per batch when `batches` is given) or the one point of `inputs`."""
    if inputs is not None:
        if isinstance(inputs, Mapping):
            feed = {k: np.asarray(v) for k, v in inputs.items()}
            names = [i.name for i in graph_inputs(model)]
            if sorted(feed) != sorted(names):
                raise InputError(f"bench: inputs must be keyed by the model's input names {names}; got {sorted(feed)}")
            check_shapes(model, {k: v.shape for k, v in feed.items()}, source="bench inputs")
        else:
            feed = load_inputs(inputs, model)
        first = next((v.shape[0] for v in feed.values() if v.ndim), 1)
        return [Point(int(first), None, feed)]
    assert shapes is not None
    full = complete_shapes(model, shapes)
    points = []
    for batch in [None] if batches is None else sorted(set(batches)):
        point_shapes, why = (full, None) if batch is None else with_batch(model, full, batch)
        if point_shapes is None:
            skipped.append(str(why))
            continue
        first = next((s[0] for s in point_shapes.values() if s), 1)
        points.append(Point(int(first), None, sample_inputs(model, seed=seed, shapes=point_shapes)))
    return points


def _validate(paths: Sequence[Path], batches: Sequence[int], seq_lens: Sequence[int], warmup: int, iters: int,
              threads: int) -> None:
    if not paths:
        raise InputError("bench: give at least one model (the first is the baseline).")
    if iters < 1 or warmup < 0 or threads < 0:
        raise InputError(f"bench: --iters must be >= 1, --warmup and --threads >= 0 "
                         f"(got {iters}, {warmup}, {threads}).")
    if not batches or any(b < 1 for b in batches) or any(s < 1 for s in seq_lens):
        raise InputError("bench: --batch and --seq-len take positive integers, e.g. --batch 1,8,32.")


def bench(models: Sequence[str | os.PathLike[str]], *, provider: str = "auto", batches: Sequence[int] | None = None,
          seq_lens: Sequence[int] = (), shapes: Mapping[str, Sequence[int]] | None = None,
          inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None = None, threads: int = 0,
          warmup: int = 10, iters: int = 100, cuda_graph: bool = False, per_layer: bool = False,
          layer_iters: int | None = None, seed: int = 0, flushed_baseline: bool = True,
          layer_profile: bool = False) -> BenchResult:
    """Time `models` interleaved at every (batch, seq_len); the first model is the baseline.

    `shapes` ({input: dims}, the trtexec `--shapes` convention) or `inputs` (an .npz keyed by input name,
    or the arrays) give the benchmarked shapes instead; they are checked against the baseline. With
    `shapes`, `batches` (when given) replaces the dynamic batch axis, one point per batch; `inputs` are
    fed as they are. `seq_lens` does not combine with either. `batches` defaults to 1.

    `per_layer` also times every factorised layer alone against its dense original (`layer_iters`
    timed runs each, default `iters`); `layer_profile` attributes every factorised layer's time inside the
    running models from ONNX Runtime's profiles (`bench.inmodel`).

    When the baseline's weights hold negligible floats (`ir.tensors`: subnormal, or float32 below 1e-30) and
    `flushed_baseline` is on, the baseline with them zeroed is timed too, as the last model: the share of a
    student's speedup that flushing alone gives."""
    paths = [Path(m) for m in models]
    threads = threads or (os.cpu_count() or 1)
    given = shapes is not None or inputs is not None
    if shapes is not None and inputs is not None:
        raise InputError("bench: give --shape or --inputs, not both (an .npz fixes the shapes).")
    if given and seq_lens:
        raise InputError(f"bench: --seq-len sets dynamic dims, but {'--shape' if shapes is not None else '--inputs'} "
                         "already gives the shapes; drop --seq-len.")
    if inputs is not None and batches is not None:
        raise InputError("bench: --inputs are fed as they are (batch included); drop --batch, or give --shape "
                         "and --batch.")
    _validate(paths, (1,) if batches is None else batches, seq_lens, warmup, iters, threads)
    entries = [Model(label, p, _load(p)) for label, p in zip(_labels(paths), paths, strict=True)]
    check_same_inputs(entries)
    notes: list[str] = []
    with tempfile.TemporaryDirectory(prefix="onnx-inher-bench-") as tmp:
        reference = (_flushed_reference(entries[0], Path(tmp), notes) if flushed_baseline and len(entries) > 1
                     else None)
        if reference is not None:
            entries.append(reference)
        result = _bench(entries, provider, batches, seq_lens, shapes, inputs, threads, warmup, iters, cuda_graph,
                        per_layer, layer_iters, seed, layer_profile)
    result.skipped += notes
    result.notes += strided_note(entries[0].proto) if len(paths) > 1 else []
    return result


def strided_note(baseline: ModelProto) -> list[str]:
    """A note when the baseline has convs onnx-inher writes space-to-depth in a student
    (`passes.factorize.strided_convs`): the baseline's own conv runs faster in that form too."""
    from onnx_inher.passes.factorize import strided_convs

    convs = strided_convs(baseline)
    if not convs:
        return []
    named = ", ".join(convs[:3]) + (f" and {len(convs) - 3} more" if len(convs) > 3 else "")
    return [f"the baseline's {named} (one input channel, a strided kernel) would run faster written space-to-depth, "
            "as onnx-inher writes a student's down conv there (CREPE tiny's whole teacher: 1.5x), so part of a "
            "student's speedup over it is that form's"]


def save_flushed(model: ModelProto, folder: Path, stem: str) -> tuple[Path, int, int] | None:
    """`model` with its negligible weights (`ir.tensors`) zeroed, saved in `folder` with its weights in a side
    file, so that no copy stays in memory while it is timed: what students are fairly timed against (bench's
    reference, the latency check's baseline). Returns (path, values zeroed, tensors), or None when it has none."""
    from onnx_inher.passes.flush import FlushNegligible

    flush = FlushNegligible()
    flushed, changed = flush(model)
    if not changed:
        return None
    path = folder / f"{stem}.flushed.onnx"
    onnx.save_model(flushed, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=f"{stem}.flushed.data", size_threshold=1024)
    return path, flush.flushed, flush.tensors


def _flushed_reference(baseline: Model, folder: Path, notes: list[str]) -> Model | None:
    """The baseline flushed (`save_flushed`) as one more model to time (None when it has no negligible weights;
    also when it keeps its weights in external files, which `notes` then says)."""
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in baseline.proto.graph.initializer):
        notes.append("near-dead weights not looked for: the baseline keeps its weights in external files "
                     "(`onnx-inher flush` writes a flushed copy to bench beside it)")
        return None
    saved = save_flushed(baseline.proto, folder, baseline.path.stem)
    if saved is None:
        return None
    path, values, tensors = saved
    return Model(f"{baseline.label} (flushed)", path, _load(path),
                 reference=f"the baseline with its {values:,} negligible weights (subnormal or below 1e-30, in "
                           f"{tensors} tensors) zeroed")


def _bench(entries: list[Model], provider: str, batches: Sequence[int] | None, seq_lens: Sequence[int],
           shapes: Mapping[str, Sequence[int]] | None, inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None,
           threads: int, warmup: int, iters: int, cuda_graph: bool, per_layer: bool, layer_iters: int | None,
           seed: int, layer_profile: bool) -> BenchResult:
    given = shapes is not None or inputs is not None
    skipped: list[str] = []
    points: list[Point] = []
    sampler = _with_external_data(entries[0])  # token-id bounds read the embedding tables
    if given:
        points = _given_points(sampler, batches, shapes, inputs, seed, skipped)
    else:
        inner = dynamic_inner_dims(entries[0].proto)
        if seq_lens and not inner:
            skipped.append("--seq-len ignored: the baseline's inputs have no dynamic dim after the batch axis")
        seqs: list[int | None] = (list(sorted(set(seq_lens))) or [DEFAULT_SEQ_LEN]) if inner else [None]
        for batch in sorted(set((1,) if batches is None else batches)):
            for seq in seqs:
                dims, why = point_dims(entries[0].proto, batch, seq)
                if dims is None:
                    skipped.append(str(why))
                    continue
                points.append(Point(batch, seq, sample_inputs(sampler, dims, seed)))
    del sampler
    if not points:
        raise InputError(f"bench: no requested shape fits the baseline ({'; '.join(skipped)}); "
                         "pick --batch values the model accepts.")
    settings = Settings(provider=provider, threads=threads, stop_spinning=len(entries) > 1, cuda_graph=cuda_graph)
    chosen = settings.provider_list()  # fail before timing on an unavailable provider
    if cuda_graph and not any(isinstance(p, tuple) and p[0] == "CUDAExecutionProvider" for p in chosen):
        raise InputError("--cuda-graph needs the CUDA provider; drop it or run with --provider cuda on a GPU.")
    used = _run_points(entries, points, settings, warmup, iters, seed)
    result = BenchResult(
        settings={"provider_requested": provider, "provider": used, "threads_intra_op": threads,
                  "threads_inter_op": 1, "spinning": settings.spinning,
                  "spinning_stops_after_run": settings.spinning and settings.stop_spinning, "cuda_graph": cuda_graph,
                  "io_binding": used != "CPUExecutionProvider", "warmup": warmup, "iters": iters,
                  "order": "interleaved round-robin (A, B, A, B, ...) after per-shape warm-up",
                  "ratio": "baseline p50 / model p50; paired percentile bootstrap over rounds",
                  "layer_iters": (layer_iters or iters) if per_layer else None, "seed": seed,
                  "shapes": {k: [int(d) for d in v] for k, v in shapes.items()} if shapes is not None else None,
                  "inputs": _inputs_label(inputs)},
        machine=machine_info(used), models=entries, points=points, skipped=skipped)
    result.notes += [drift_note(p, [e.label for e in entries]) for p in points if p.drift]
    students = [e for e in entries if e.reference is None]
    if per_layer and len(students) > 1:
        result.layers = per_layer_results(students, points, settings, min(warmup, layer_iters or iters),
                                          layer_iters or iters)
    if layer_profile and len(students) > 1:
        from onnx_inher.bench.inmodel import in_model_results

        flushed = next((e for e in entries if e.reference is not None), None)
        result.layer_profile = in_model_results(students, points, settings, min(warmup, layer_iters or iters),
                                                layer_iters or iters, dense=flushed)
    return result


def drift_note(point: Point, labels: Sequence[str]) -> str:
    """What a reader needs when the machine changed speed during a point's rounds (`stats.drift`)."""
    assert point.drift is not None
    where = f"b={point.batch}" + (f" s={point.seq_len}" if point.seq_len else "")
    parts = len(point.drift.baseline_ms)
    base = ", ".join(f"{ms:.3g}" for ms in point.drift.baseline_ms)
    each = "; ".join(f"{label} {', '.join(f'{x:.2f}' for x in xs)}x"
                     for label, xs in zip(labels[1:], point.drift.speedups, strict=True))
    return (f"{where}: the machine's speed changed during the timing: the baseline's median over each of "
            f"{parts} consecutive parts of the rounds was {base} ms, and the speedups {each}; the figures above "
            "mix those states: rerun on an idle machine, or read the parts")


def _inputs_label(inputs: str | os.PathLike[str] | Mapping[str, np.ndarray] | None) -> str | None:
    if inputs is None:
        return None
    return "arrays given to bench()" if isinstance(inputs, Mapping) else str(inputs)


def _sessions(entries: list[Model], point: Point, settings: Settings) -> list[Runner]:
    runners = []
    for m in entries:
        runner = Runner(create(m.path, settings, str(m.path)), point.feed, str(m.path))
        if settings.provider in ("cuda", "tensorrt") and not runner.on_device:
            raise InputError(f"{m.path}: {settings.provider} was requested but ONNX Runtime placed the session on "
                             f"{runner.provider} (are the CUDA/cuDNN libraries of onnxruntime-gpu installed?)")
        runner.check()
        runner.prepare()
        runners.append(runner)
    return runners


def session_peak_memory(model: Path, feed: dict[str, np.ndarray], settings: Settings) -> int | None:
    """Peak host memory of the session, from `memprobe.py` in a fresh process (None if it failed)."""
    with tempfile.TemporaryDirectory() as tmp:
        feed_path, config_path = Path(tmp) / "feed.npz", Path(tmp) / "config.json"
        np.savez(feed_path, **feed)
        config = {"threads": settings.threads, "providers": settings.provider_list(),
                  "session_config": settings.session_config()}
        config_path.write_text(json.dumps(config))
        probe = Path(__file__).with_name("memprobe.py")
        try:
            done = subprocess.run([sys.executable, str(probe), str(model), str(feed_path), str(config_path)],
                                  capture_output=True, text=True, timeout=600)
            return int(json.loads(done.stdout.strip().splitlines()[-1])["peak_bytes"]) if done.returncode == 0 else None
        except (subprocess.TimeoutExpired, ValueError, KeyError, IndexError):
            return None


def _run_points(entries: list[Model], points: list[Point], settings: Settings, warmup: int, iters: int,
                seed: int) -> str:
    """Time every point; sessions are reused across shapes (new ones per shape with CUDA graphs,
    which replay one shape). Returns the provider the sessions actually run on."""
    total = len(points) * iters * len(entries)
    runners: list[Runner] = []
    with tqdm(total=total, desc="bench", unit="run", disable=_env.progress_disabled(), leave=False) as bar:
        for point in sorted(points, key=lambda p: -(p.batch * (p.seq_len or 1))):  # largest first: memory peak
            if not runners or settings.cuda_graph:
                runners = []
                runners = _sessions(entries, point, settings)
            else:
                for r, m in zip(runners, entries, strict=True):
                    r.feed = point.feed
                    r.label = str(m.path)
                    r.check()
                    r.prepare()
            for m in entries:
                if m.peak_rss_bytes is None:  # once per model, at the largest shape (points run largest first)
                    m.peak_rss_bytes = session_peak_memory(m.path, point.feed, settings)
            point.seconds = interleave(runners, warmup, iters, bar.update)
            point.summaries = [summarize(s, point.batch) for s in point.seconds]
            point.ratios = [None] + [speedup(point.seconds[0], s, seed) for s in point.seconds[1:]]
            point.drift = drift(point.seconds)
            point.profiles = [profile(m.path, m.proto, point.feed) for m in entries]
    return runners[0].provider if runners else "CPUExecutionProvider"
