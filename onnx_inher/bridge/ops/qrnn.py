"""`com.microsoft::DynamicQuantizeLSTM`: the LSTM that `onnxruntime.quantization.quantize_dynamic` writes.

ONNX Runtime's contrib op (`contrib_ops/cpu/quantization/dynamic_quantize_lstm.cc`): W `[num_dir, input,
4*hidden]` and R `[num_dir, hidden, 4*hidden]` are 8-bit (transposed against ONNX LSTM's, gates in ONNX's
i, o, f, c order), with a float scale and an 8-bit zero point per direction (`[num_dir]`) or per output
column (`[num_dir, 4*hidden]`). Every product runs through ORT's quantised GEMM (`rnn_helpers.cc`,
`ComputeGemm` for uint8 weights), which this module follows step for step, because a teacher must be
the same function in torch as in ORT:

* the float operand A is quantised per call to uint8 as `DynamicQuantizeLinear` does (range holding 0,
  scale = range / 255, zero point and values rounded half to even): once for the whole input sequence of
  a direction (the input projection is one GEMM over every step), and once per time step for the
  previous hidden state (the recurrent GEMM);
* the integer product `(A - a_zp) @ (B - b_zp)` is exact (int32 in ORT, float64 here, exact for 8-bit
  operands); the weight zero point is the first of its direction (ORT requires int8 zero points to be 0
  and uint8 ones to be constant);
* the output is `float32(acc) * float32(a_scale * b_scale[col])`; the recurrent product is added to the
  input projection, then the fused bias `Wb + Rb`, then the gates as in ONNX LSTM.

What ORT does not share with torch: its sigmoid and tanh are MLAS's polynomial approximations, a few
float32 ulps from torch's. The hidden state is quantised again at every step, so such an ulp can move
one element to the next quantisation step; `docs/bridge_ops.md` gives the measured agreement. ORT also
splits the batch between threads for the recurrent GEMM (batch >= 2, hidden <= 256) and quantises each
thread's rows on their own; the bridge quantises the whole batch per step, which is what ORT does with
one intra-op thread or a batch of one. With `sequence_lens`, ORT's recurrent GEMM still quantises every
row of the batch: an ended sequence contributes zeros when the node writes Y (ORT reads its zeroed Y
row) and its last state otherwise, and the bridge does the same (`_direction`).

Integer weights and their scales are constants (buffers): the op is a frozen teacher. Gradients reach
its float input through a straight-through estimator (the float product of the dequantised operands).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from onnx_inher.bridge.ops.quant import quantize_dynamic_uint8
from onnx_inher.bridge.ops.rnn import (
    State,
    _full_length,
    _gather_time,
    _initial,
    _reversal_index,
    _run_direction,
    _Spec,
    lstm_update,
)
from onnx_inher.bridge.registry import Ctx, Fn, register

MS_DOMAIN = "com.microsoft"


def quant_matmul(a: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor, w_zero: torch.Tensor) -> torch.Tensor:
    """`a [rows, K] @ w [K, N]` as ORT's quantised GEMM: `a` quantised on the fly, exact integer sum,
    scaled by `float32(a_scale * w_scale)` (one scale, or one per column)."""
    qa, a_scale, a_zero = quantize_dynamic_uint8(a.detach())
    acc = (qa.double() - a_zero.double()) @ (w.double() - w_zero.double())
    out = acc.to(torch.float32) * (a_scale * w_scale)
    if torch.is_grad_enabled() and a.requires_grad:  # straight-through: the float product's gradient
        dense = a @ ((w.to(torch.float32) - w_zero.to(torch.float32)) * w_scale)
        out = out + (dense - dense.detach())
    return out


class _Weights:
    """One direction's integer weight, its scale (scalar or per column) and its zero point."""

    def __init__(self, w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, d: int):
        self.w = w[d]
        self.scale = scale[d].to(torch.float32).reshape(-1)
        self.scale = self.scale.reshape(()) if self.scale.numel() == 1 else self.scale
        self.zero = zero[d].reshape(-1)[0].to(torch.float32)  # ORT reads the first zero point only

    def __call__(self, a: torch.Tensor) -> torch.Tensor:
        return quant_matmul(a, self.w, self.scale, self.zero)


def _bias(b: torch.Tensor | None, d: int, hidden: int, like: torch.Tensor) -> torch.Tensor:
    """ORT's fused bias `Wb + Rb` (added in float32 before the gates see it)."""
    if b is None:
        return like.new_zeros(4 * hidden)
    bd = b[d].to(like.dtype)
    return bd[:4 * hidden] + bd[4 * hidden:]


Cell = Callable[[torch.Tensor, State, torch.Tensor], State]


def _cell(spec: _Spec, d: int, r: _Weights, bias: torch.Tensor, p: torch.Tensor | None, input_forget: bool) -> Cell:
    """One step: `xw` (the input projection) + quantised `h @ R`, the fused bias, then ONNX's gates.

    `h_gemm` is the hidden state the recurrent GEMM sees (and quantises as one matrix): the state itself,
    except for sequences that have ended, see `_direction`."""
    peep = p[d].to(bias.dtype).chunk(3) if p is not None else (None, None, None)

    def cell(xw: torch.Tensor, state: State, h_gemm: torch.Tensor) -> State:
        _, c_prev = state
        return lstm_update((xw + r(h_gemm)) + bias, c_prev, spec, d, peep, input_forget)

    return cell


def _direction(cell: Cell, xw: torch.Tensor, state: State, lens: torch.Tensor | None, reverse: bool,
               zero_ended: bool) -> tuple[torch.Tensor, State]:
    """One direction's time loop, as `rnn._run_direction`, plus what ORT feeds its recurrent GEMM for a
    sequence that has ended: when the node writes Y, ORT reads the previous step's Y row, which it has
    zeroed; without Y it reads the last valid state. The quantisation range of the whole batch follows."""
    steps = xw.shape[0]
    if lens is None or _full_length(lens, steps):
        return _run_direction(lambda x, s: cell(x, s, s[0]), xw, state, None, reverse)
    index = _reversal_index(lens, steps, xw.device) if reverse else None
    if index is not None:
        xw = _gather_time(xw, index)
    valid = torch.arange(steps, device=xw.device)[:, None] < lens.to(xw.device)[None, :]
    outs = []
    for t in range(steps):
        h_gemm = state[0]
        if zero_ended and t > 0:
            h_gemm = torch.where(valid[t - 1][:, None], h_gemm, torch.zeros_like(h_gemm))
        new = cell(xw[t], state, h_gemm)
        mask = valid[t][:, None]
        state = tuple(torch.where(mask, n, s) for n, s in zip(new, state, strict=True))
        outs.append(torch.where(mask, new[0], torch.zeros_like(new[0])))
    y = torch.stack(outs)
    return (_gather_time(y, index) if index is not None else y), state


def _project(x: torch.Tensor, w: _Weights, lens: torch.Tensor | None) -> torch.Tensor:
    """The input projection of one direction: one quantised GEMM over the first max(sequence_lens) steps
    (ORT quantises exactly those rows together; the reverse direction sees the same values), zeros after."""
    rows = x.shape[0] if lens is None or lens.numel() == 0 else int(lens.max())
    xw = w(x[:rows].reshape(-1, x.shape[2])).reshape(rows, x.shape[1], -1)
    if rows < x.shape[0]:
        xw = torch.cat([xw, xw.new_zeros(x.shape[0] - rows, *xw.shape[1:])])
    return xw


@register("DynamicQuantizeLSTM", since=1, domain=MS_DOMAIN)
def dynamic_quantize_lstm(ctx: Ctx) -> Fn:
    if ctx.attr("layout", 0):
        raise ctx.fail("layout=1 is not part of ORT's DynamicQuantizeLSTM")
    spec = _Spec(ctx, ("Sigmoid", "Tanh", "Tanh"))
    input_forget = bool(ctx.attr("input_forget", 0))
    writes_y = bool(ctx.node.output and ctx.node.output[0])

    def run(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
            lens: torch.Tensor | None = None, h0: torch.Tensor | None = None, c0: torch.Tensor | None = None,
            p: torch.Tensor | None = None, w_scale: torch.Tensor | None = None, w_zero: torch.Tensor | None = None,
            r_scale: torch.Tensor | None = None, r_zero: torch.Tensor | None = None,
            ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        assert w_scale is not None and w_zero is not None and r_scale is not None and r_zero is not None
        x = x.to(torch.float32)
        hidden = r.shape[1]
        h, c = _initial(h0, spec, x, hidden), _initial(c0, spec, x, hidden)
        ys, hs, cs = [], [], []
        for d in range(spec.num_dir):
            xw = _project(x, _Weights(w, w_scale, w_zero, d), lens)
            step = _cell(spec, d, _Weights(r, r_scale, r_zero, d), _bias(b, d, hidden, x), p, input_forget)
            reverse = spec.direction == "reverse" or d == 1
            y, (hd, cd) = _direction(step, xw, (h[d], c[d]), lens, reverse, writes_y)
            ys.append(y)
            hs.append(hd)
            cs.append(cd)
        return spec.outputs(torch.stack(ys, 1), [torch.stack(hs), torch.stack(cs)])

    return run
