"""Calibration for data-aware (whitened) SVD: each factorised layer's input Gram matrix `X^T X`.

Plain SVD keeps the directions of largest *weight* energy; a layer's inputs, though, are far from
isotropic (MiniLM's hidden states have a few outlier features), so those directions are not the
ones that matter for its *output*. SVD-LLM's fix needs only the Gram matrix of each layer's inputs
on some real data: we run the teacher in ONNX Runtime with those inputs exposed as extra graph
outputs, batch by batch, and accumulate `X^T X` in float64 (the per-layer memory is `in x in`, not
the activations). Padding tokens are left out when the data has an `attention_mask`, since their
hidden states never reach a mask-pooled embedding. `whitened_svd` then uses the matrices.

MatMul/Gemm layers whose weight is on the right (`y = x W`, the activation's last axis is the input
features) are whitened with the Gram matrix of their input rows. A Conv is the same product on its
input *patches* (`y = W_g patches_g(x)` per group, `in = C_in/g x prod(kernel)`), so it is whitened with
the per-group Gram matrix of the patches (`[g, in, in]`), which `conv_patches` gathers in numpy with
the node's own strides, dilations, pads and auto_pad, at a seeded sample of at most `CONV_ROWS` output
positions per batch (bounded memory: rows x C_in x prod(kernel), never the whole im2col matrix).
A ConvTranspose is whitened the same way, its patches computed by the node itself in ORT (see
`TransposedPatches`). A weight on the left (`y = W X`) is whitened with the Gram matrix of `X`'s columns. A
Gemm reading its activation transposed (transA with the weight on the right) keeps plain SVD (said in the
plan's warnings).

A layer with more than MAX_GRAM_FEATURES inputs per group (CREPE's 1,024-channel, 64-tap convs: 65,536) is
whitened on its output side instead (`by_outputs`, `svd.OutputGram`): the Gram matrix of its node output
less bias, `out x out`, read from ORT like any other tensor. It leads to the same truncation at a memory
bounded by the output width, where the input Gram would take tens of GB.
"""

from __future__ import annotations

import tempfile
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from onnx import ModelProto
from tqdm import tqdm

from onnx_inher import _env
from onnx_inher.datasets import input_specs, load_data
from onnx_inher.datasets.text import ATTENTION_MASK as MASK
from onnx_inher.errors import InputError
from onnx_inher.ir.graph import GraphIndex, NotConstant, default_opset
from onnx_inher.ir.layers import LayerView
from onnx_inher.ir.outputs import softmax_axis_attr
from onnx_inher.planning.plan import TOP_BYTES, TOP_SHARE, Plan, Spectra
from onnx_inher.planning.svd import Factors, OutputGram, balanced, data_aware_svd, truncate
from onnx_inher.progress import Heartbeat
from onnx_inher.runtime import runnable_session, with_outputs

SAMPLES = 256
BATCH = 32
LEFT = "left:"  # key of a left-side product's Gram matrix (features on the second last axis)
CONV_ROWS = 4096  # output positions sampled per batch and conv layer (at least 2 x its patch size)
MAX_GRAM_FEATURES = 4096  # inputs per group above which a layer is whitened by its outputs' Gram (`by_outputs`)


def by_outputs(view: LayerView) -> bool:
    """Whiten this layer on its output side (`svd.OutputGram`): its input Gram matrix would be over
    MAX_GRAM_FEATURES square (128 MB in float64; CREPE's 1,024-channel, 64-tap convs: 65,536 inputs, 34 GB, and
    the sampled patch rows twice that) while its outputs' is at most that. Convs, and MatMuls with the weight on
    the right, whose node output is exactly `M x` less a known bias."""
    return (view.in_features > MAX_GRAM_FEATURES and view.out_features <= MAX_GRAM_FEATURES
            and (view.op == "Conv" or (view.op == "MatMul" and view.side == "right")))


def response_rows(view: LayerView, y: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """`[g, rows, out]` float64 of a layer's node output less its bias: a Conv's output channels at every
    position, a right-side MatMul's output rows (padding dropped)."""
    y = np.asarray(y)
    if view.op == "Conv":
        rows = np.moveaxis(y, 1, -1).reshape(-1, y.shape[1]).astype(np.float64)
        if view.bias is not None:
            rows -= view.bias.astype(np.float64).reshape(-1)
    else:
        rows = token_rows(y, mask)
    return np.ascontiguousarray(rows.reshape(len(rows), view.groups, -1).transpose(1, 0, 2))


def activation_input(view: LayerView, model: ModelProto) -> str | None:
    """The tensor whose last axis a right-side MatMul/Gemm contracts with its weight, the input of a Conv,
    or None (nothing to whiten)."""
    if view.op == "Conv":
        return model.graph.node[view.node_index].input[0]
    if view.op not in ("MatMul", "Gemm") or view.side != "right" or view.groups != 1:
        return None
    if view.op == "Gemm" and view.attrs.get("transA"):
        return None
    return model.graph.node[view.node_index].input[1 - view.weight_input]


def gram_source(view: LayerView, model: ModelProto) -> tuple[str, bool] | None:
    """For a MatMul/Gemm: the activation tensor, and whether its features are on the last axis (True: the
    weight is on the right, or on the left of a transposed B) or on the second last (weight on the left).
    None for convolutions and layers with nothing to whiten."""
    if view.op not in ("MatMul", "Gemm") or view.groups != 1:
        return None
    if view.side == "right":
        name = activation_input(view, model)
        return None if name is None else (name, True)
    x = model.graph.node[view.node_index].input[1]
    return x, bool(view.op == "Gemm" and view.attrs.get("transB"))


def left_rows(x: np.ndarray) -> np.ndarray:
    """`[rows, in]` float64 of the right operand of `W @ X` (features on the second last axis)."""
    x = np.asarray(x)
    if x.ndim == 1:
        return x[None, :].astype(np.float64)
    return np.swapaxes(x, -1, -2).reshape(-1, x.shape[-2]).astype(np.float64)


def calibration_feeds(spec: str, model: ModelProto, samples: int = SAMPLES, seed: int = 0,
                      dims: dict[str, int] | None = None) -> dict[str, np.ndarray]:
    """Up to `samples` inputs from a DATA spec (as for `distill --data`), a seeded choice of them."""
    data = load_data(spec, input_specs(model), seed=seed, dims=dims, model=model)
    n = len(data)
    index = np.sort(np.random.default_rng(seed).permutation(n)[:samples]) if n > samples else np.arange(n)
    return data.batch(index)


def token_rows(x: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    """The activation as `[rows, in]` float64, padding positions dropped when the mask lines up."""
    if mask is not None and x.ndim == 3 and x.shape[:2] == mask.shape:
        x = x[mask.astype(bool)]
    return x.reshape(-1, x.shape[-1]).astype(np.float64)


def _dynamic_length(model: ModelProto, feeds: dict[str, np.ndarray]) -> list[str]:
    """Inputs laid out `[sample, token, ...]` like the attention mask, if every one has a free token axis."""
    mask = feeds.get(MASK)
    if mask is None or mask.ndim != 2:
        return []
    keep = mask.astype(bool)
    if not np.array_equal(keep, np.arange(mask.shape[1])[None, :] < keep.sum(1)[:, None]):
        return []  # not right-padded (left padding, holes): cropping the tail would cut real tokens
    names = [k for k, v in feeds.items() if v.ndim >= 2 and v.shape[:2] == mask.shape]
    declared = {i.name: i.type.tensor_type.shape.dim for i in model.graph.input}
    for name in names:
        dims = declared.get(name)
        if dims is None or len(dims) < 2 or dims[1].HasField("dim_value"):
            return []
    return names


def batches(model: ModelProto, feeds: dict[str, np.ndarray], batch_size: int = BATCH) -> list[dict[str, np.ndarray]]:
    """The samples in batches; for padded text with a free token axis, longest first and cropped to the
    batch's longest sentence, which halves the work on fortunes (mean 31 of 64 tokens). Padding never
    reaches a mask-pooled output nor a calibration row, so nothing measured changes but float order."""
    n = len(next(iter(feeds.values())))
    cropped = _dynamic_length(model, feeds)
    lengths = feeds[MASK].astype(bool).sum(1) if cropped else np.zeros(n, dtype=np.int64)
    order = np.argsort(-lengths, kind="stable")
    out = []
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        width = max(int(lengths[idx].max()), 1)
        out.append({k: np.ascontiguousarray(v[idx, :width] if k in cropped else v[idx]) for k, v in feeds.items()})
    return out


def input_grams(model: ModelProto, tensors: Sequence[str], feeds: dict[str, np.ndarray],
                batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """`X^T X` (float64) of each named tensor over every sample of `feeds`, run batch by batch in ORT."""
    return layer_grams(model, tensors, [], feeds, batch_size)[0]


def _add(grams: dict[str, np.ndarray], key: str, gram: np.ndarray) -> None:
    grams[key] = gram if key not in grams else grams[key] + gram


def layer_grams(model: ModelProto, tensors: Sequence[str], convs: Sequence[LayerView], feeds: dict[str, np.ndarray],
                batch_size: int = BATCH, seed: int = 0, lefts: Sequence[str] = (),
                outputs: Sequence[LayerView] = ()) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
    """One pass over the samples: `X^T X` of each named tensor (rows of its last axis), of each of `lefts`
    (the `X` of `W @ X`, features on its second last axis; keyed `LEFT + name`), each Conv's per-group
    Gram matrix of input patches (`[g, in, in]`, by node name), and, for each of `outputs`, the per-group
    Gram matrix of its node output less bias (`[g, out, out]`, by node name), all float64."""
    inputs = {v.node: model.graph.node[v.node_index].input[0] for v in convs}
    produced = {v.node: model.graph.node[v.node_index].output[0] for v in outputs}
    wanted = list(dict.fromkeys([*tensors, *lefts, *inputs.values(), *produced.values()]))
    names = [t for t in wanted if t not in feeds]  # graph inputs are read from the feeds
    by_tensor: dict[str, np.ndarray] = {}
    by_conv: dict[str, np.ndarray] = {}
    runner = None
    transposed: dict[str, TransposedPatches] = {}
    quiet = _env.progress_disabled()
    with tempfile.TemporaryDirectory() as spill:
        if names:
            runner = runnable_session(with_outputs(model, names, Path("calibration model")), Path(spill))
        todo = batches(model, feeds, batch_size)
        beat = Heartbeat("calibrate", len(todo), "batch")
        for b, batch in enumerate(tqdm(todo, desc="calibrate", unit="batch", disable=quiet, leave=False)):
            beat.tick(b)
            mask = batch.get(MASK)
            values = dict(zip(names, runner.run(names, batch), strict=True)) if runner is not None else {}
            for name in dict.fromkeys(tensors):
                x = token_rows(np.asarray(batch[name] if name in batch else values[name]), mask)
                _add(by_tensor, name, x.T @ x)
            for name in dict.fromkeys(lefts):
                x = left_rows(batch[name] if name in batch else values[name])
                _add(by_tensor, LEFT + name, x.T @ x)
            for view in convs:
                x = np.asarray(batch[inputs[view.node]] if inputs[view.node] in batch else values[inputs[view.node]])
                rows = max(CONV_ROWS, 2 * view.in_features)
                rng = np.random.default_rng([seed, b, zlib.crc32(view.node.encode())])
                if view.op == "ConvTranspose":
                    patches = transposed.setdefault(view.node, TransposedPatches(model, view))(x, rows, rng)
                else:
                    patches = conv_patches(x, view, rows, rng)
                p = np.ascontiguousarray(patches.transpose(1, 0, 2))  # [g, rows, in]
                _add(by_conv, view.node, np.swapaxes(p, 1, 2) @ p)
            for view in outputs:
                name = produced[view.node]
                r = response_rows(view, batch[name] if name in batch else values[name], mask)
                _add(by_conv, view.node, np.swapaxes(r, 1, 2) @ r)
    return by_tensor, by_conv


class TransposedPatches:
    """Input "patches" of a ConvTranspose: at each output position, the `C_in/g x prod(kernel)` input values
    that its kernel taps read (0 where no input lands: strides leave gaps), in `LayerView.matrices`' column
    order. Computed exactly by the node itself in ORT, with all its attributes (pads, auto_pad, strides,
    dilations, output_padding, output_shape, group) and a 0/1 weight that copies input channel c, tap j to
    output channel `c x prod(kernel) + j`: the scatter rule is ORT's own, nothing re-derived here."""

    def __init__(self, model: ModelProto, view: LayerView) -> None:
        self.node, self.view = model.graph.node[view.node_index], view
        self.opset = default_opset(model)
        self.ir_version = model.ir_version
        self.session = None

    def _session(self, dtype: np.dtype):
        from onnx import helper, numpy_helper

        v = self.view
        k = int(np.prod(v.kernel))
        cin_g = v.in_features // k
        eye = np.zeros((v.groups * cin_g, cin_g * k, k), dtype=dtype)
        for c in range(cin_g):
            eye[c::cin_g][:, c * k:(c + 1) * k, :] = np.eye(k, dtype=dtype)
        elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
        node = helper.make_node("ConvTranspose", ["x", "e"], ["p"])
        node.attribute.extend(self.node.attribute)
        graph = helper.make_graph([node], "patches", [helper.make_tensor_value_info("x", elem, None)],
                                  [helper.make_tensor_value_info("p", elem, None)],
                                  [numpy_helper.from_array(eye.reshape(len(eye), cin_g * k, *v.kernel), "e")])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset)])
        model.ir_version = self.ir_version
        with tempfile.TemporaryDirectory() as spill:
            return runnable_session(model, Path(spill))

    def __call__(self, x: np.ndarray, rows: int, rng: np.random.Generator) -> np.ndarray:
        """`[rows, g, in]` float64 at up to `rows` output positions: a seeded sample (sorted) of up to
        `rows / N` positions of each of the N samples, run one at a time so that the patch tensor held at
        once is one sample's (`C_in x prod(kernel) x output positions`)."""
        if self.session is None:
            self.session = self._session(x.dtype)
        each = -(-rows // max(len(x), 1))
        out = []
        for i in range(len(x)):
            p = np.asarray(self.session.run(["p"], {"x": x[i:i + 1]})[0])  # [1, g x in, *out]
            flat = np.moveaxis(p, 1, -1).reshape(-1, p.shape[1])
            pick = np.sort(rng.choice(len(flat), size=each, replace=False)) if len(flat) > each else slice(None)
            out.append(flat[pick].astype(np.float64))
        return np.concatenate(out).reshape(-1, self.view.groups, self.view.in_features)


def conv_pads(view: LayerView, spatial: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads of a Conv on an input of `spatial` size, from its pads or auto_pad."""
    d = len(view.kernel)
    strides = list(view.attrs.get("strides") or [1] * d)  # type: ignore[call-overload]
    dilations = list(view.attrs.get("dilations") or [1] * d)  # type: ignore[call-overload]
    auto = view.attrs.get("auto_pad", b"NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else str(auto)
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for n, k, st, dl in zip(spatial, view.kernel, strides, dilations, strict=True):
            total = max(0, (-(-n // st) - 1) * st + (k - 1) * dl + 1 - n)
            small = total // 2
            begin.append(small if auto == "SAME_UPPER" else total - small)
            end.append(total - begin[-1])
        return begin, end
    if auto == "VALID":
        return [0] * d, [0] * d
    pads = list(view.attrs.get("pads") or [0] * (2 * d))  # type: ignore[call-overload]
    return [int(v) for v in pads[:d]], [int(v) for v in pads[d:]]


def conv_patches(x: np.ndarray, view: LayerView, rows: int, rng: np.random.Generator) -> np.ndarray:
    """Input patches `[rows, g, C_in/g x prod(kernel)]` (float64) of a Conv at up to `rows` output positions
    (a seeded sample, sorted, when there are more), in the order of `LayerView.matrices`' columns, so that
    `M[g] @ patch[:, g]` is the conv's output (less bias) at those positions."""
    d = len(view.kernel)
    strides = [int(v) for v in (view.attrs.get("strides") or [1] * d)]  # type: ignore[union-attr]
    dilations = [int(v) for v in (view.attrs.get("dilations") or [1] * d)]  # type: ignore[union-attr]
    begin, end = conv_pads(view, x.shape[2:])
    xp = np.pad(x, [(0, 0), (0, 0), *zip(begin, end, strict=True)])
    out = [(n - (k - 1) * dl - 1) // st + 1
           for n, k, st, dl in zip(xp.shape[2:], view.kernel, strides, dilations, strict=True)]
    total = int(x.shape[0] * np.prod(out))
    pick = np.sort(rng.choice(total, size=rows, replace=False)) if total > rows else np.arange(total)
    where = np.unravel_index(pick, (x.shape[0], *out))
    offsets = np.indices(view.kernel).reshape(d, -1)  # [d, K], C order like the weight's kernel axes
    index = [where[0][:, None]]
    for a in range(d):
        index.append(where[a + 1][:, None] * strides[a] + offsets[a][None, :] * dilations[a])
    patches = xp[(index[0], slice(None), *index[1:])]  # [rows, K, C]: the advanced axes come first
    patches = np.swapaxes(patches, 1, 2).astype(np.float64)  # [rows, C, K]
    return patches.reshape(len(pick), view.groups, -1)


PASS_THROUGH = ("Identity", "Cast")
ROW_FLOOR = 0.01  # share of the uniform probability 1/C every class keeps as its floor weight


@dataclass(frozen=True)
class Head:
    """A classifier head's probabilities: the Softmax/LogSoftmax output, whether it is a log, its axis."""

    tensor: str
    log: bool
    axis: int


def softmax_after(view: LayerView, model: ModelProto, index: GraphIndex | None = None) -> Head | None:
    """The Softmax/LogSoftmax a right-side MatMul/Gemm feeds through at most a constant bias Add and
    Identity/Cast nodes (a classifier head), or None. Whether its axis is the layer's feature axis is
    checked on the values (`output_weights`): shape inference often leaves the rank unknown."""
    if view.op not in ("MatMul", "Gemm") or view.side != "right" or view.groups != 1:
        return None
    index = index or GraphIndex.build(model.graph)
    tensor, added = view.output, False
    for _ in range(8):
        users = index.consumers.get(tensor, [])
        if len(users) != 1 or tensor in index.graph_output_names():
            return None
        node = users[0]
        if node.op_type in ("Softmax", "LogSoftmax"):
            return Head(node.output[0], node.op_type == "LogSoftmax", softmax_axis_attr(node, model))
        bias = [i for i in node.input if i != tensor]
        if node.op_type == "Add" and not added and len(bias) == 1 \
                and not isinstance(index.constant(bias[0]), NotConstant):
            added = True
        elif node.op_type not in PASS_THROUGH:
            return None
        tensor = node.output[0]
    return None


def output_weights(model: ModelProto, heads: dict[str, Head], features: dict[str, int],
                   feeds: dict[str, np.ndarray], batch_size: int = BATCH) -> dict[str, np.ndarray]:
    """Per-class weights `sqrt(mean p_c + floor)` of each classifier head's logits, by node.

    A head's output error costs what it does to the softmax: to second order the KL divergence of a
    logit error `e` is `e^T (diag p - p p^T) e / 2`, so errors on classes the teacher gives probability
    matter and errors on classes it never predicts hardly do. Weighting the rows of the whitened SVD by
    the diagonal of that Fisher matrix keeps the rows that carry probability: PP-OCR's CTC blank row,
    which holds little weight energy but most of the probability, lost 81% of its output under plain SVD
    and all frames turned blank. The floor (`ROW_FLOOR / C`) keeps rarely-predicted classes from
    drifting into false maxima, and keeps full rank exact (every weight positive). A head whose softmax
    is not over its last axis with the layer's `features` classes is left out.
    """
    names = sorted({h.tensor for h in heads.values()})
    logs = {h.tensor: h.log for h in heads.values()}
    fits = dict.fromkeys(names, True)
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as spill:
        runner = runnable_session(with_outputs(model, names, Path("calibration model")), Path(spill))
        for batch in batches(model, feeds, batch_size):
            for name, value in zip(names, runner.run(names, batch), strict=True):
                p = np.asarray(value, dtype=np.float64)
                for node, head in heads.items():
                    if head.tensor == name and (p.ndim < 2 or head.axis not in (-1, p.ndim - 1)
                                                or p.shape[-1] != features[node]):
                        fits[name] = False
                if not fits[name]:
                    continue
                p = p.reshape(-1, p.shape[-1])
                p = np.exp(p) if logs[name] else p
                sums[name] = sums.get(name, 0) + p.sum(0)
                counts[name] = counts.get(name, 0) + len(p)
    weights = {}
    for node, head in heads.items():
        if not fits[head.tensor] or head.tensor not in sums:
            continue
        mean = sums[head.tensor] / max(counts[head.tensor], 1)
        weights[node] = np.sqrt(mean + ROW_FLOOR / len(mean))
    return weights


class CalibratedSpectra(Spectra):
    """`Spectra` whose SVDs are whitened by each layer's input Gram matrix, at the plan's rank.

    The plan's singular values (`values`) stay the plain ones: ranks are decided from the weights
    alone, so a plan file gives the same ranks with or without calibration (a fair comparison at
    equal size) and `plan`/`inspect` need no data. Only the factors change. Because `balanced`
    factors depend on the rank (QR of the kept rows), `svd` returns the layer's rank-r factors in
    SVD form (`u * s = up`, `s` = up's column norms, `vt = down`), which `truncate` at r reproduces.
    """

    def __init__(self, grams: dict[str, np.ndarray], ranks: dict[str, int],
                 rows: dict[str, np.ndarray] | None = None,
                 fitted: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
                 remember: bool = False) -> None:
        super().__init__(remember)
        self.grams, self.ranks, self.rows, self.fitted = grams, ranks, rows or {}, fitted or {}
        self._kept: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._kept_bytes = 0

    def _whitened(self, view: LayerView) -> bool:
        return view.node in self.ranks and (view.shared_key in self.fitted or layer_gram(view, self.grams) is not None)

    def top_svd(self, view: LayerView, rank: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """A whitened layer's rank-r factors cut to `rank`; with `remember`, kept (up to a quarter of the
        weight's size, `TOP_BYTES` in all) for the latency check's rebuilds: whitening solves an `in x in`
        eigenproblem per layer."""
        if not self._whitened(view):
            return super().top_svd(view, rank)
        got = self._kept.get(view.shared_key) or self.svd(view)
        size = sum(a.nbytes for a in got)
        if self.remember and view.shared_key not in self._kept and size <= view.weight.nbytes * TOP_SHARE \
                and self._kept_bytes + size <= TOP_BYTES:
            self._kept[view.shared_key] = got
            self._kept_bytes += size
        u, s, vt = got
        return u[:, :, :rank], s[:, :rank], vt[:, :rank]

    def svd(self, view: LayerView) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if view.shared_key in self.fitted and view.node in self.ranks:
            return self.fitted[view.shared_key]  # already rank-r factors (`sequential`)
        gram = layer_gram(view, self.grams)
        if gram is None or view.node not in self.ranks:
            return super().svd(view)
        rows = self.rows.get(view.shared_key)
        return as_svd(balanced(truncate(data_aware_svd(view.matrices(), gram, rows=rows), self.ranks[view.node])))

    def split_svd(self, view: LayerView, rest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The class-split head's other classes, whitened like the whole head (their class-row weights kept)."""
        gram = self.grams.get(view.shared_key)
        if gram is None or isinstance(gram, OutputGram) or view.node not in self.ranks:
            return super().split_svd(view, rest)
        rows = self.rows.get(view.shared_key)
        m = np.ascontiguousarray(view.matrices()[:, rest, :])
        svd = data_aware_svd(m, gram, rows=None if rows is None else rows[rest])
        return as_svd(balanced(truncate(svd, self.ranks[view.node])))


def layer_gram(view: LayerView, grams: dict[str, np.ndarray | OutputGram]) -> np.ndarray | OutputGram | None:
    """The Gram matrix that whitens `view`'s SVD, None for plain SVD: its weight's, or for a `kernel_up` view
    (`[C_out k, C_in]`, per-pixel inputs) the tap-average of the patch Gram, `mean_t C[(c, t), (c', t)]`.

    Why an average: the kernel-up pair's error is `sum_t (W_t - A_t B) x_t` over the k taps; dropping the
    correlations between taps leaves `sum_t |(W_t - A_t B) S|^2` with `S S^T` the per-pixel Gram, a whitened
    SVD of `[C_out k, C_in]`. An output-side Gram (`OutputGram`, `[C_out, C_out]`) has no such form: plain."""
    gram = grams.get(view.base_key)
    if gram is None or not view.kernel_up:
        return gram
    if isinstance(gram, OutputGram):
        return None
    k = view.window
    c = view.in_features // k
    return np.einsum("atbt->ab", np.asarray(gram, dtype=np.float64).reshape(c, k, c, k)) / k  # [1, ...] or [...]


def as_svd(f: Factors) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rank-r factors as an `(u, s, vt)` triple with r columns, so that `truncate(.., r)` gives them back."""
    norms = np.linalg.norm(f.up.astype(np.float64), axis=1)
    safe = np.where(norms > 0, norms, 1.0)
    return (f.up / safe[:, None, :]).astype(np.float32), norms.astype(np.float32), f.down


@dataclass
class Calibration:
    """What the calibration samples gave: the samples themselves, input Grams per shared weight, notes."""

    feeds: dict[str, np.ndarray]
    grams: dict[str, np.ndarray | OutputGram]  # input Grams; an `OutputGram` for layers `by_outputs`
    notes: list[str]
    rows: dict[str, np.ndarray] = field(default_factory=dict)


def calibrate(model: ModelProto, views: dict[str, LayerView], the_plan: Plan, spec: str,
              dims: dict[str, int] | None = None, feeds: dict[str, np.ndarray] | None = None) -> Calibration:
    """Grams of the plan's factorised layers (summed over layers sharing one weight), and notes. `feeds`:
    the samples of `spec` when the caller already loaded them (`calibration_feeds`)."""
    factorised = [views[c.node] for c in the_plan.candidates if c.decision == "factorize" and c.node in views]
    # a layer inside an If/Loop/Scan body reads tensors no graph output can expose: plain SVD
    chosen = [v for v in factorised if not v.scope]
    inner = [v.node for v in factorised if v.scope]
    outputs = [v for v in chosen if by_outputs(v)]
    sources = {v.node: gram_source(v, model) for v in chosen if v not in outputs}
    convs = [v for v in chosen if v.op in ("Conv", "ConvTranspose") and v not in outputs]
    plain = [v.node for v in chosen if v not in convs and v not in outputs and sources[v.node] is None]
    wanted = sorted({src[0] for src in sources.values() if src and src[1]})
    lefts = sorted({src[0] for src in sources.values() if src and not src[1]})
    if not wanted and not lefts and not convs and not outputs and the_plan.options.allocate != "sensitivity":
        raise InputError(f"--calibration {spec}: no factorised layer is a Conv or a MatMul/Gemm, so there is "
                         "nothing to whiten; drop --calibration.")
    feeds = feeds if feeds is not None else calibration_feeds(spec, model, dims=dims)
    by_tensor, by_conv = layer_grams(model, wanted, convs, feeds, lefts=lefts, outputs=outputs) \
        if wanted or lefts or convs or outputs else ({}, {})
    grams: dict[str, np.ndarray] = {}
    responses: dict[str, np.ndarray] = {}
    for v in chosen:
        if v in outputs:
            _add(responses, v.shared_key, by_conv[v.node])
        elif v.op in ("Conv", "ConvTranspose"):
            _add(grams, v.shared_key, by_conv[v.node])
        elif (src := sources[v.node]) is not None:
            _add(grams, v.shared_key, by_tensor[src[0] if src[1] else LEFT + src[0]])
    grams.update({key: OutputGram(gram) for key, gram in responses.items()})  # type: ignore[misc]
    notes = [f"calibration '{spec}': {len(chosen) - len(plain)} layer(s) factorised by whitened SVD on "
             f"{len(next(iter(feeds.values())))} samples"]
    index = GraphIndex.build(model.graph)
    users = Counter(v.shared_key for v in chosen)  # a weight shared by several layers has no single head
    heads = {v.node: head for v in chosen
             if v.shared_key in grams and not isinstance(grams[v.shared_key], OutputGram)
             and users[v.shared_key] == 1 and (head := softmax_after(v, model, index))}
    rows: dict[str, np.ndarray] = {}
    if heads:
        features = {n: views[n].out_features for n in heads}
        rows = {views[n].shared_key: w for n, w in output_weights(model, heads, features, feeds).items()}
    if outputs:
        notes.append(f"calibration: {len(outputs)} layer(s) with over {MAX_GRAM_FEATURES} inputs per group "
                     "whitened by their outputs' Gram matrix (their inputs' would not fit in memory): "
                     f"{', '.join(v.node for v in outputs[:3])}{' ...' if len(outputs) > 3 else ''}")
    if rows:
        named = sorted(n for n in heads if views[n].shared_key in rows)
        notes.append(f"calibration: {len(rows)} classifier head(s) weighted by the teacher's class "
                     f"probabilities: {', '.join(named[:3])}")
    if plain:
        notes.append(f"calibration: {len(plain)} layer(s) keep plain SVD (a transposed Gemm input): "
                     f"{', '.join(plain[:3])}{' ...' if len(plain) > 3 else ''}")
    if inner:
        notes.append(f"calibration: {len(inner)} layer(s) inside If/Loop/Scan subgraphs keep plain SVD: "
                     f"{', '.join(inner[:3])}{' ...' if len(inner) > 3 else ''}")
    return Calibration(feeds, grams, notes, rows)


def plan_ranks(the_plan: Plan) -> dict[str, int]:
    return {c.node: int(c.rank) for c in the_plan.candidates if c.decision == "factorize" and c.rank}

