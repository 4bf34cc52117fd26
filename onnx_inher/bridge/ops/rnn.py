"""Recurrent layers: LSTM, GRU and RNN, every attribute of the ONNX ops.

W, R, B (and LSTM's peepholes P) arrive at run time as the module's parameters, so every computation
here stays on the autograd tape and training reaches them. Two ways to compute:

* the fused path: torch's own `torch.lstm` / `torch.gru` / `torch.rnn_*` kernels (what `nn.LSTM` runs),
  taken when the node uses what those kernels compute: default activations, no clip, no peepholes, no
  coupled input/forget gate, GRU with `linear_before_reset=1` (torch's formula), and every sequence at
  full length. The weights are reordered from ONNX's gate order to torch's on each call (a few `cat`s),
  which is what exporters from torch produce and is much faster to train than a Python time loop.
* the general path: one explicit time loop per direction, covering everything else (peepholes, clip,
  other activations with their alpha/beta, `input_forget`, per-sequence lengths, reverse direction).

Layout 1 (batch first) is handled by transposing in and out; the core always sees `[seq, batch, ...]`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from onnx_inher.bridge.registry import Ctx, Fn, register

Act = Callable[[torch.Tensor], torch.Tensor]
State = tuple[torch.Tensor, ...]
# ONNX activation name -> (function of x, alpha, beta; default alpha; default beta; uses alpha; uses beta).
ACTIVATIONS: dict[str, tuple[Callable[[torch.Tensor, float, float], torch.Tensor], float, float, bool, bool]] = {
    "relu": (lambda x, a, b: torch.relu(x), 0.0, 0.0, False, False),
    "tanh": (lambda x, a, b: torch.tanh(x), 0.0, 0.0, False, False),
    "sigmoid": (lambda x, a, b: torch.sigmoid(x), 0.0, 0.0, False, False),
    "softsign": (lambda x, a, b: F.softsign(x), 0.0, 0.0, False, False),
    "softplus": (lambda x, a, b: F.softplus(x), 0.0, 0.0, False, False),
    "affine": (lambda x, a, b: x * a + b, 1.0, 0.0, True, True),
    "leakyrelu": (lambda x, a, b: F.leaky_relu(x, a), 0.01, 0.0, True, False),
    "thresholdedrelu": (lambda x, a, b: torch.where(x > a, x, torch.zeros_like(x)), 1.0, 0.0, True, False),
    "scaledtanh": (lambda x, a, b: a * torch.tanh(b * x), 1.0, 1.0, True, True),
    "hardsigmoid": (lambda x, a, b: torch.clamp(a * x + b, 0.0, 1.0), 0.2, 0.5, True, True),
    "elu": (lambda x, a, b: F.elu(x, a), 1.0, 0.0, True, False),
}


class _Spec:
    """What a recurrent node's attributes say, read once at conversion time."""

    def __init__(self, ctx: Ctx, default_acts: Sequence[str]):
        self.ctx = ctx
        self.direction = ctx.attr("direction", "forward")
        if self.direction not in ("forward", "reverse", "bidirectional"):
            raise ctx.fail(f"direction '{self.direction}' is not forward, reverse or bidirectional")
        self.num_dir = 2 if self.direction == "bidirectional" else 1
        self.layout = int(ctx.attr("layout", 0))
        self.clip = ctx.attr("clip")
        self.n_outputs = len(ctx.node.output)
        names = [a.lower() for a in ctx.attr("activations", [])] or [a.lower() for a in default_acts] * self.num_dir
        if len(names) != len(default_acts) * self.num_dir:
            raise ctx.fail(f"expects {len(default_acts) * self.num_dir} activations for direction "
                           f"'{self.direction}', got {len(names)}")
        self.default_acts = [n.lower() for n in default_acts] * self.num_dir == names
        self.acts = self._activations(names)

    def _activations(self, names: list[str]) -> list[Act]:
        """Bind each activation to its alpha/beta: the lists are consumed in order, each value by the next
        activation that takes one (as ONNX Runtime does); missing values fall back to the op defaults."""
        alphas = list(self.ctx.attr("activation_alpha", []))
        betas = list(self.ctx.attr("activation_beta", []))
        acts: list[Act] = []
        for name in names:
            if name not in ACTIVATIONS:
                raise self.ctx.fail(f"activation '{name}' is not one of {', '.join(sorted(ACTIVATIONS))}")
            fn, alpha, beta, uses_alpha, uses_beta = ACTIVATIONS[name]
            if uses_alpha and alphas:
                alpha = float(alphas.pop(0))
            if uses_beta and betas:
                beta = float(betas.pop(0))
            acts.append(lambda x, fn=fn, a=alpha, b=beta: fn(x, a, b))
        return acts

    def direction_acts(self, d: int) -> list[Act]:
        n = len(self.acts) // self.num_dir
        return self.acts[d * n:(d + 1) * n]

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.clip is None else torch.clamp(x, -float(self.clip), float(self.clip))

    def outputs(self, y: torch.Tensor, finals: Sequence[torch.Tensor]) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """ONNX outputs from `y` [seq, num_dir, batch, hidden] and the final states [num_dir, batch, hidden]."""
        if self.layout:
            y = y.permute(2, 0, 1, 3)
            finals = [f.transpose(0, 1) for f in finals]
        out = (y, *finals)[:self.n_outputs]
        return out[0] if self.n_outputs == 1 else out


def _seq_first(spec: _Spec, x: torch.Tensor, *states: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Layout 1 tensors ([batch, seq, ...], initial states [batch, num_dir, hidden]) as layout 0."""
    if not spec.layout:
        return [x, *states]
    return [x.transpose(0, 1), *[s.transpose(0, 1) if s is not None else None for s in states]]


def _initial(state: torch.Tensor | None, spec: _Spec, x: torch.Tensor, hidden: int) -> torch.Tensor:
    if state is not None:
        return state.to(x.dtype)
    return x.new_zeros(spec.num_dir, x.shape[1], hidden)


def _full_length(lens: torch.Tensor | None, steps: int) -> bool:
    """No sequence_lens, or every sequence as long as the input (then masks change nothing)."""
    return lens is None or bool((lens == steps).all())


def _reversal_index(lens: torch.Tensor, steps: int, device: torch.device) -> torch.Tensor:
    """[seq, batch] index reversing each sequence within its own length (padding stays in place).

    The permutation is its own inverse, so the same index puts a reverse pass's outputs back in order."""
    t = torch.arange(steps, device=device)[:, None]
    n = lens.to(device=device, dtype=torch.int64)[None, :]
    return torch.where(t < n, n - 1 - t, t)


def _gather_time(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return x.gather(0, index[:, :, None].expand(-1, -1, x.shape[2]))


def _run_direction(step: Callable[[torch.Tensor, State], State], xw: torch.Tensor, state: State,
                   lens: torch.Tensor | None, reverse: bool) -> tuple[torch.Tensor, State]:
    """One direction's time loop over the projected input `xw` [seq, batch, gates*hidden].

    Returns the hidden state at every step [seq, batch, hidden] (zero past a sequence's length) and
    the final state (each sequence's last valid step)."""
    steps = xw.shape[0]
    if lens is None or _full_length(lens, steps):
        order = range(steps - 1, -1, -1) if reverse else range(steps)
        ys: list[torch.Tensor] = [xw.new_empty(0)] * steps
        for t in order:
            state = step(xw[t], state)
            ys[t] = state[0]
        return torch.stack(ys) if steps else xw.new_zeros(0, *state[0].shape), state
    index = _reversal_index(lens, steps, xw.device) if reverse else None
    if index is not None:
        xw = _gather_time(xw, index)
    valid = torch.arange(steps, device=xw.device)[:, None] < lens.to(xw.device)[None, :]
    outs = []
    for t in range(steps):
        new = step(xw[t], state)
        mask = valid[t][:, None]
        state = tuple(torch.where(mask, n, s) for n, s in zip(new, state, strict=True))
        outs.append(torch.where(mask, new[0], torch.zeros_like(new[0])))
    y = torch.stack(outs)
    return (_gather_time(y, index) if index is not None else y), state


def _split_bias(b: torch.Tensor | None, d: int, size: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """ONNX B [num_dir, 2*size] = [Wb, Rb] for direction d (zeros when the node has no B)."""
    if b is None:
        zero = like.new_zeros(size)
        return zero, zero
    return b[d, :size].to(like.dtype), b[d, size:].to(like.dtype)


def _run_general(spec: _Spec, x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None,
                 lens: torch.Tensor | None, initial: Sequence[torch.Tensor],
                 make_step: Callable[[int, torch.Tensor, torch.Tensor], Callable[[torch.Tensor, State], State]],
                 ) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Every direction through `_run_direction`; `make_step(d, R_d, Rb_d)` builds direction d's cell."""
    ys, finals = [], [[] for _ in initial]
    size = w.shape[1]
    for d in range(spec.num_dir):
        wb, rb = _split_bias(b, d, size, x)
        xw = F.linear(x, w[d].to(x.dtype), wb)
        reverse = spec.direction == "reverse" or d == 1
        state = tuple(s[d] for s in initial)
        y, state = _run_direction(make_step(d, r[d].to(x.dtype), rb), xw, state, lens, reverse)
        ys.append(y)
        for acc, s in zip(finals, state, strict=True):
            acc.append(s)
    return torch.stack(ys, 1), [torch.stack(f) for f in finals]


def _fused_params(w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None, num_dir: int,
                  order: Sequence[int], dtype: torch.dtype) -> list[torch.Tensor]:
    """torch's flat RNN weight list (w_ih, w_hh[, b_ih, b_hh] per direction), gates in torch's order."""
    gates = len(order)

    def reorder(t: torch.Tensor) -> torch.Tensor:
        chunks = t.to(dtype).chunk(gates, 0)
        return torch.cat([chunks[i] for i in order]) if gates > 1 else t.to(dtype)

    params: list[torch.Tensor] = []
    for d in range(num_dir):
        params += [reorder(w[d]), reorder(r[d])]
        if b is not None:
            wb, rb = b[d].chunk(2)
            params += [reorder(wb), reorder(rb)]
    return params


def _run_fused(kernel: Callable[..., tuple[torch.Tensor, ...]], spec: _Spec, x: torch.Tensor,
               params: list[torch.Tensor], hx: torch.Tensor | tuple[torch.Tensor, ...], has_bias: bool,
               ) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """One torch RNN kernel call; `y` comes back as ONNX's [seq, num_dir, batch, hidden]."""
    reverse = spec.direction == "reverse"
    if reverse:
        x = x.flip(0)
    out = kernel(x, hx, params, has_bias, 1, 0.0, False, spec.num_dir == 2, False)
    y, finals = out[0], tuple(out[1:])
    if reverse:
        y = y.flip(0)
    steps, batch = y.shape[0], y.shape[1]
    return y.reshape(steps, batch, spec.num_dir, -1).transpose(1, 2), finals


def lstm_update(gates: torch.Tensor, c_prev: torch.Tensor, spec: _Spec, d: int,
                peep: tuple[torch.Tensor | None, ...], input_forget: bool) -> State:
    """ONNX's LSTM equations from the summed pre-activations `gates` (i, o, f, c order): peepholes, clipping,
    coupled input-forget gate. Shared by the float LSTM and ORT's DynamicQuantizeLSTM (qrnn.py), which differ
    only in how `gates` is computed."""
    f, g, act_h = spec.direction_acts(d)
    pi, po, pf = peep
    i, o, fg, cand = gates.chunk(4, -1)
    if pi is not None:
        i, fg = i + pi * c_prev, fg + pf * c_prev
    i = f(spec.clamp(i))
    fg = 1 - i if input_forget else f(spec.clamp(fg))
    c_new = fg * c_prev + i * g(spec.clamp(cand))
    if po is not None:
        o = o + po * c_new
    return f(spec.clamp(o)) * act_h(c_new), c_new


@register("LSTM", since=1)
def lstm(ctx: Ctx) -> Fn:
    spec = _Spec(ctx, ("Sigmoid", "Tanh", "Tanh"))
    input_forget = bool(ctx.attr("input_forget", 0))
    fused = spec.default_acts and spec.clip is None and not input_forget and not ctx.has_input(7)

    def run(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
            lens: torch.Tensor | None = None, h0: torch.Tensor | None = None, c0: torch.Tensor | None = None,
            p: torch.Tensor | None = None) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x, h0, c0 = _seq_first(spec, x, h0, c0)
        assert x is not None
        hidden = r.shape[-1]
        h, c = _initial(h0, spec, x, hidden), _initial(c0, spec, x, hidden)
        if fused and _full_length(lens, x.shape[0]):
            params = _fused_params(w, r, b, spec.num_dir, (0, 2, 3, 1), x.dtype)
            y, finals = _run_fused(torch.lstm, spec, x, params, (h, c), b is not None)
            return spec.outputs(y, finals)

        def make_step(d: int, rd: torch.Tensor, rb: torch.Tensor) -> Callable[[torch.Tensor, State], State]:
            peep = p[d].to(x.dtype).chunk(3) if p is not None else (None, None, None)

            def cell(xw: torch.Tensor, state: State) -> State:
                h_prev, c_prev = state
                return lstm_update(xw + F.linear(h_prev, rd, rb), c_prev, spec, d, peep, input_forget)

            return cell

        y, finals = _run_general(spec, x, w, r, b, lens, (h, c), make_step)
        return spec.outputs(y, finals)

    return run


@register("GRU", since=1)
def gru(ctx: Ctx) -> Fn:
    spec = _Spec(ctx, ("Sigmoid", "Tanh"))
    before_reset = bool(ctx.attr("linear_before_reset", 0))
    fused = spec.default_acts and spec.clip is None and before_reset

    def run(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
            lens: torch.Tensor | None = None, h0: torch.Tensor | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x, h0 = _seq_first(spec, x, h0)
        assert x is not None
        h = _initial(h0, spec, x, r.shape[-1])
        if fused and _full_length(lens, x.shape[0]):
            params = _fused_params(w, r, b, spec.num_dir, (1, 0, 2), x.dtype)
            y, finals = _run_fused(torch.gru, spec, x, params, h, b is not None)
            return spec.outputs(y, finals)

        def make_step(d: int, rd: torch.Tensor, rb: torch.Tensor) -> Callable[[torch.Tensor, State], State]:
            f, g = spec.direction_acts(d)
            r_zr, r_h = rd.split([2 * rd.shape[1], rd.shape[1]])
            rb_zr, rb_h = rb.split([2 * rd.shape[1], rd.shape[1]])

            def cell(xw: torch.Tensor, state: State) -> State:
                (h_prev,) = state
                x_zr, x_h = xw.split([2 * h_prev.shape[-1], h_prev.shape[-1]], -1)
                z, reset = f(spec.clamp(x_zr + F.linear(h_prev, r_zr, rb_zr))).chunk(2, -1)
                if before_reset:
                    cand = x_h + reset * F.linear(h_prev, r_h, rb_h)
                else:
                    cand = x_h + F.linear(reset * h_prev, r_h, rb_h)
                cand = g(spec.clamp(cand))
                return ((1 - z) * cand + z * h_prev,)

            return cell

        y, finals = _run_general(spec, x, w, r, b, lens, (h,), make_step)
        return spec.outputs(y, finals)

    return run


@register("RNN", since=1)
def rnn(ctx: Ctx) -> Fn:
    spec = _Spec(ctx, ("Tanh",))
    names = [a.lower() for a in ctx.attr("activations", [])] or ["tanh"]
    kernel = {"tanh": torch.rnn_tanh, "relu": torch.rnn_relu}.get(names[0])
    fused = (kernel is not None and spec.clip is None and len(set(names)) == 1
             and not ctx.attr("activation_alpha") and not ctx.attr("activation_beta"))

    def run(x: torch.Tensor, w: torch.Tensor, r: torch.Tensor, b: torch.Tensor | None = None,
            lens: torch.Tensor | None = None, h0: torch.Tensor | None = None
            ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        x, h0 = _seq_first(spec, x, h0)
        assert x is not None
        h = _initial(h0, spec, x, r.shape[-1])
        if fused and _full_length(lens, x.shape[0]):
            params = _fused_params(w, r, b, spec.num_dir, (0,), x.dtype)
            y, finals = _run_fused(kernel, spec, x, params, h, b is not None)
            return spec.outputs(y, finals)

        def make_step(d: int, rd: torch.Tensor, rb: torch.Tensor) -> Callable[[torch.Tensor, State], State]:
            (f,) = spec.direction_acts(d)
            return lambda xw, state: (f(spec.clamp(xw + F.linear(state[0], rd, rb))),)

        y, finals = _run_general(spec, x, w, r, b, lens, (h,), make_step)
        return spec.outputs(y, finals)

    return run
