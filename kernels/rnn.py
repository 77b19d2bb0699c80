"""Host launchers of the rnn family's Triton kernels (kernels/rnn_jit.py), registered by
fastdl/ops/rnn.py as the ``fastdl::<op>_triton`` custom ops: each launcher's annotations are its
op's schema, matching csrc/ops.cpp, and the algorithm is csrc/cpu/rnn.cpp's: the input
projection of all steps as one GEMM, then per step the recurrent GEMM (torch.mm, cuBLAS) and one
fused Triton step kernel; the backward's weight gradients and dx as single GEMMs after the loop.
The checks mirror csrc/common/rnn.h. Also AOT, the configurations tests/test_gpu_build.py
compiles ahead of time.
"""

import torch
import triton

from fastdl import _checks, _ext

from . import rnn_jit as jit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# Columns per program: a row of a step's gates in a few programs even at hidden size 1024.
MAX_BLOCK = 256


# ---------------------------------------------------------------- checks (csrc/common/rnn.h)


def _like_x(op, arg, t, x):
    _checks.same_device(op, arg, t, x)
    if t.dtype != x.dtype:
        raise _checks.DtypeError(
            f"{op}: {arg} has dtype {t.dtype} but x has dtype {x.dtype}; all tensors must have "
            "x's dtype"
        )


def _check_index(op, index, w_ih, x):
    """rnn::index: int64 (T, B) rows of the table x (w_ih None)."""
    if w_ih is not None:
        raise RuntimeError(
            f"{op}: index picks rows of a table of input projections: w_ih must be None with it"
        )
    _checks.same_device(op, "index", index, x)
    _checks.dtype(op, "index", index, (torch.int64,))
    if index.dim() != 2:
        raise RuntimeError(f"{op}: index must be (T, B), got shape {list(index.shape)}")
    if x.dim() != 2:
        raise RuntimeError(
            f"{op}: with index, x is the table of input projections (rows, gates * "
            f"hidden_size), got shape {list(x.shape)}"
        )
    if index.numel():
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= x.shape[0]:
            raise RuntimeError(
                f"{op}: index out of range for a table of {x.shape[0]} rows, got "
                f"{lo if lo < 0 else hi}"
            )


def _check_layer(op, gates, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, index):
    """(T, B, IN, H, P, G) of one layer after the checks of rnn::check_layer."""
    _checks.dtype(op, "x", x, DTYPES)
    if x.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got x on {x.device}"
        )
    if index is not None:
        _check_index(op, index, w_ih, x)
    elif x.dim() != 3:
        raise RuntimeError(f"{op}: x must be (T, B, input_size), got shape {list(x.shape)}")
    rows, w = ("w_ih", w_ih) if w_ih is not None else ("w_hh", w_hh)
    if w.dim() != 2 or w.shape[0] % gates or w.shape[0] == 0:
        cols = "input_size" if w_ih is not None else "hidden_size or proj_size"
        raise RuntimeError(
            f"{op}: {rows} must be ({gates} * hidden_size, {cols}), got shape {list(w.shape)}"
        )
    T, B, IN = (*index.shape, x.shape[1]) if index is not None else x.shape
    G = w.shape[0]
    H = G // gates
    P = w_hr.shape[0] if w_hr is not None else H
    for name, t in (("w_ih", w_ih), ("w_hh", w_hh), ("h0", h0)):
        if t is not None:
            _like_x(op, name, t, x)
    if w_ih is None and IN != G:
        raise RuntimeError(
            f"{op}: without w_ih, x holds the input projection "
            f"({'rows' if index is not None else 'T, B'}, {G}) ({gates} * hidden_size), got "
            f"shape {list(x.shape)}"
        )
    if w_ih is not None and w_ih.shape[1] != IN:
        raise RuntimeError(
            f"{op}: input size {IN} of x does not match w_ih of shape {list(w_ih.shape)} "
            f"(expected ({G}, {IN}))"
        )
    if w_hr is not None:
        _like_x(op, "w_hr", w_hr, x)
        if w_hr.dim() != 2 or w_hr.shape[1] != H or not 1 <= P < H:
            raise RuntimeError(
                f"{op}: w_hr must be (proj_size, hidden_size={H}) with 0 < proj_size < "
                f"hidden_size, got shape {list(w_hr.shape)}"
            )
    _checks.shape(op, "w_hh", w_hh, (G, P))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            _like_x(op, name, b, x)
            _checks.shape(op, name, b, (G,))
    _checks.shape(op, "h0", h0, (B, P))
    if c0 is not None:
        _like_x(op, "c0", c0, x)
        _checks.shape(op, "c0", c0, (B, H))
    if lengths is not None:
        _checks.same_device(op, "lengths", lengths, x)
        _checks.dtype(op, "lengths", lengths, (torch.int64,))
        _checks.shape(op, "lengths", lengths, (B,))
        if B:
            lo, hi = int(lengths.min()), int(lengths.max())
            if lo < 1:
                raise RuntimeError(f"{op}: lengths must be >= 1, got a length of {lo}")
            if hi > T:
                raise RuntimeError(
                    f"{op}: lengths must be <= the sequence length {T}, got a length of {hi}"
                )
    return T, B, IN, H, P, G


# ---------------------------------------------------------------- the time loop


class _Schedule:
    """Positions of each row per processing step (see csrc/ops.cpp), as rnn.cpp's Schedule."""

    def __init__(self, lengths, T, B, reverse, device):
        self.T, self.B, self.reverse, self.device = T, B, reverse, device
        self.lengths = lengths
        self.len = lengths if lengths is not None else torch.full((B,), T, device=device)
        self.min_len = int(self.len.min()) if lengths is not None and B else T

    @property
    def masked(self):
        return self.lengths is not None

    def all_active(self, s):
        return s < self.min_len

    def shared_position(self, s):
        if not self.reverse:
            return s
        return None if self.masked else self.T - 1 - s

    def step(self, s):
        p = self.len - 1 - s if self.reverse else torch.full_like(self.len, s)
        return torch.where(s < self.len, p, -1)


def _f32(t):
    return None if t is None else t.to(torch.float32).contiguous()


def _seq(sch, *sizes, device):
    alloc = torch.zeros if sch.masked else torch.empty
    return alloc(sizes, dtype=torch.float32, device=device)


def _prev_states(seq, init, sch):
    T = seq.shape[0]
    if T == 0:
        return seq.clone()
    if not sch.reverse:
        return torch.cat([init[None], seq[:-1]])
    prev = torch.cat([seq[1:], init[None]])
    if sch.masked:
        b = torch.arange(sch.B, device=seq.device)
        prev[sch.len - 1, b] = init
    return prev


def _step_rows(seq, sch, s, pos):
    p = sch.shared_position(s)
    if p is not None:
        return seq[p]
    b = torch.arange(sch.B, device=seq.device)
    return seq[pos.clamp(min=0), b]


def _set_active(dst, src, pos, seq=False):
    active = pos >= 0
    b = torch.arange(src.shape[0], device=src.device)[active]
    if seq:
        dst[pos[active], b] = src[active]
    else:
        dst[b] = src[active]


def _grid(B, H):
    block = min(MAX_BLOCK, triton.next_power_of_2(max(H, 1)))
    return (B, triton.cdiv(H, block)), block


def _none(x):
    return x.new_empty(0)


def _projection(x, xf, wi, T, B, IN, index):
    """(T * B, G) float32 input projection, a tensor of its own (the launchers add biases to it
    in place): xf W_ih^T, or xf (x in float32) when x is already projected (no w_ih), copied when
    it is x itself, or the rows of the table xf that index picks."""
    if index is not None:
        return xf.index_select(0, index.reshape(-1))
    x2 = xf.reshape(T * B, IN)
    if wi is not None:
        return x2 @ wi.t()
    return x2.clone() if xf is x else x2


def _input_grad(dgx, x, wi, index, T, B, IN):
    """grad_x from the input projection's gradient dgx (T * B, G), as input_grad in
    csrc/cpu/rnn.cpp: through w_ih, dgx itself, or the gradient of index's table."""
    if index is not None:
        grad = torch.ops.aten.embedding_dense_backward(
            dgx, index.reshape(-1), x.shape[0], -1, False
        )
        return grad.to(x.dtype)
    return (dgx @ wi if wi is not None else dgx).view(T, B, IN).to(x.dtype)


def lstm_layer_fwd(
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    w_hr: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hn, cn, gates, cs) of one LSTM layer in one direction; see csrc/ops.cpp."""
    op = "fastdl.lstm"
    T, B, IN, H, P, _ = _check_layer(op, 4, x, h0, c0, w_ih, w_hh, b_ih, b_hh, w_hr, lengths, index)
    dev = x.device
    sch = _Schedule(lengths, T, B, reverse, dev)
    xf, wi, wh, wr = _f32(x), _f32(w_ih), _f32(w_hh), _f32(w_hr)
    h, c = _f32(h0).clone(), _f32(c0).clone()
    y, gates, cs = (
        _seq(sch, T, B, P, device=dev),
        _seq(sch, T, B, 4 * H, device=dev),
        _seq(sch, T, B, H, device=dev),
    )
    if T and B:
        gx = _projection(x, xf, wi, T, B, IN, index)
        for b in (b_ih, b_hh):
            if b is not None:
                gx += b.float()
        r = torch.empty(B, H, dtype=torch.float32, device=dev) if wr is not None else h
        grid, block = _grid(B, H)
        for s in range(T):
            pos = sch.step(s)
            gh = h @ wh.t()
            jit.lstm_step_fwd_kernel[grid](
                gx, gh, pos, c, r, y, gates, cs, B, H, HAS_Y=wr is None, BLOCK=block
            )
            if wr is not None:
                hp = r @ wr.t()
                _set_active(h, hp, pos)
                _set_active(y, hp, pos, seq=True)
    return y.to(x.dtype), h.to(x.dtype), c.to(x.dtype), gates, cs


def lstm_layer_bwd(
    grad_y: torch.Tensor | None,
    grad_hn: torch.Tensor | None,
    grad_cn: torch.Tensor | None,
    x: torch.Tensor,
    h0: torch.Tensor,
    c0: torch.Tensor,
    w_ih: torch.Tensor | None,
    w_hh: torch.Tensor,
    w_hr: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    y: torch.Tensor,
    gates: torch.Tensor,
    cs: torch.Tensor,
    output_mask: list[bool],
    index: torch.Tensor | None = None,
) -> tuple[
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
    torch.Tensor,
]:
    """(grad_x, grad_h0, grad_c0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh, grad_w_hr)."""
    op = "fastdl.lstm"
    T, B, IN, H, P, _ = _check_layer(op, 4, x, h0, c0, w_ih, w_hh, None, None, w_hr, lengths, index)
    dev = x.device
    sch = _Schedule(lengths, T, B, reverse, dev)
    # x only for dw_ih (without w_ih the autograd formula passes a stride-0 stand-in).
    wi, wh, wr, gy = _f32(w_ih), _f32(w_hh), _f32(w_hr), _f32(grad_y)
    gates, cs = gates.contiguous(), cs.contiguous()
    dh = _f32(grad_hn).clone() if grad_hn is not None else torch.zeros(B, P, device=dev)
    dc = _f32(grad_cn).clone() if grad_cn is not None else torch.zeros(B, H, device=dev)
    dg = _seq(sch, T, B, 4 * H, device=dev)
    dhp = _seq(sch, T, B, P, device=dev) if wr is not None else None
    if T and B:
        cprev = _prev_states(cs, _f32(c0), sch)
        grid, block = _grid(B, H)
        for s in range(T - 1, -1, -1):
            pos = sch.step(s)
            dr = dh
            if wr is not None:
                tot = dh if gy is None else dh + _step_rows(gy, sch, s, pos)
                _set_active(dhp, tot, pos, seq=True)
                dr = _step_rows(dhp, sch, s, pos) @ wr
            jit.lstm_step_bwd_kernel[grid](
                dr.contiguous(),
                gy if gy is not None and wr is None else dg,
                gates,
                cs,
                cprev,
                dc,
                dg,
                pos,
                B,
                H,
                HAS_GY=gy is not None and wr is None,
                BLOCK=block,
            )
            dh_new = _step_rows(dg, sch, s, pos) @ wh
            if sch.all_active(s):
                dh = dh_new
            else:
                _set_active(dh, dh_new, pos)
    dg2 = dg.view(T * B, 4 * H)
    gx = _none(x)
    if output_mask[0]:
        gx = _input_grad(dg2, x, wi, index, T, B, IN)
    grads = [_none(x) for _ in range(5)]
    if output_mask[1]:
        hprev = _prev_states(_f32(y), _f32(h0), sch).view(T * B, P)
        db = dg2.sum(0)
        gw_ih = dg2.t() @ _f32(x).view(T * B, IN) if wi is not None else None
        grads = [gw_ih, dg2.t() @ hprev, db, db.clone(), None]
        if wr is not None:
            r = gates[..., 3 * H :] * torch.tanh(cs)
            grads[4] = dhp.view(T * B, P).t() @ r.view(T * B, H)
        grads = [_none(x) if g is None else g.to(x.dtype) for g in grads]
    return gx, dh.to(x.dtype), dc.to(x.dtype), *grads


def gru_layer_fwd(
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor | None,
    w_hh: torch.Tensor,
    b_ih: torch.Tensor | None,
    b_hh: torch.Tensor | None,
    lengths: torch.Tensor | None,
    reverse: bool,
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(y, hn, gates) of one GRU layer in one direction; see csrc/ops.cpp."""
    op = "fastdl.gru"
    T, B, IN, H, _, _ = _check_layer(
        op, 3, x, h0, None, w_ih, w_hh, b_ih, b_hh, None, lengths, index
    )
    dev = x.device
    sch = _Schedule(lengths, T, B, reverse, dev)
    xf, wi, wh, bh = _f32(x), _f32(w_ih), _f32(w_hh), _f32(b_hh)
    h = _f32(h0).clone()
    y, gates = _seq(sch, T, B, H, device=dev), _seq(sch, T, B, 4 * H, device=dev)
    if T and B:
        gx = _projection(x, xf, wi, T, B, IN, index)
        if b_ih is not None:
            gx += b_ih.float()
        grid, block = _grid(B, H)
        for s in range(T):
            pos = sch.step(s)
            gh = h @ wh.t() if bh is None else torch.addmm(bh, h, wh.t())
            jit.gru_step_fwd_kernel[grid](gx, gh, pos, h, y, gates, B, H, BLOCK=block)
    return y.to(x.dtype), h.to(x.dtype), gates


def gru_layer_bwd(
    grad_y: torch.Tensor | None,
    grad_hn: torch.Tensor | None,
    x: torch.Tensor,
    h0: torch.Tensor,
    w_ih: torch.Tensor | None,
    w_hh: torch.Tensor,
    lengths: torch.Tensor | None,
    reverse: bool,
    y: torch.Tensor,
    gates: torch.Tensor,
    output_mask: list[bool],
    index: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_x, grad_h0, grad_w_ih, grad_w_hh, grad_b_ih, grad_b_hh)."""
    op = "fastdl.gru"
    T, B, IN, H, _, G = _check_layer(
        op, 3, x, h0, None, w_ih, w_hh, None, None, None, lengths, index
    )
    dev = x.device
    sch = _Schedule(lengths, T, B, reverse, dev)
    wi, wh, gy = _f32(w_ih), _f32(w_hh), _f32(grad_y)  # x only for dw_ih, as in lstm_layer_bwd
    gates = gates.contiguous()
    dh = _f32(grad_hn).clone() if grad_hn is not None else torch.zeros(B, H, device=dev)
    dg = _seq(sch, T, B, 4 * H, device=dev)
    hprev = _prev_states(_f32(y), _f32(h0), sch)
    if T and B:
        direct = torch.empty(B, H, device=dev)
        grid, block = _grid(B, H)
        for s in range(T - 1, -1, -1):
            pos = sch.step(s)
            jit.gru_step_bwd_kernel[grid](
                dh,
                gy if gy is not None else dg,
                gates,
                hprev,
                dg,
                direct,
                pos,
                B,
                H,
                HAS_GY=gy is not None,
                BLOCK=block,
            )
            dh_new = torch.addmm(direct, _step_rows(dg, sch, s, pos)[:, :G], wh)
            if sch.all_active(s):
                dh = dh_new
            else:
                _set_active(dh, dh_new, pos)
    # Columns of dgates: [r, z] and n_pre multiply w_ih; [r, z] and W_hn h + b_hn multiply w_hh.
    dg2 = dg.view(T * B, 4 * H)
    d_rz, d_n = dg2[:, : 2 * H], dg2[:, 3 * H :]
    gx = _none(x)
    if output_mask[0]:
        if wi is not None:
            gx = torch.addmm(d_rz @ wi[: 2 * H], d_n, wi[2 * H :]).view(T, B, IN).to(x.dtype)
        else:
            gx = _input_grad(torch.cat([d_rz, d_n], 1), x, None, index, T, B, IN)
    grads = [_none(x) for _ in range(4)]
    if output_mask[1]:
        gw_ih = _none(x)
        if wi is not None:
            x2 = _f32(x).view(T * B, IN)
            gw_ih = torch.cat([d_rz.t() @ x2, d_n.t() @ x2])
        db = dg2.sum(0)
        grads = [
            gw_ih,
            dg2[:, :G].t() @ hprev.view(T * B, H),
            torch.cat([db[: 2 * H], db[3 * H :]]),
            db[:G].clone(),
        ]
        grads = [g.to(x.dtype) for g in grads]
    return gx, dh.to(x.dtype), *grads


# ---------------------------------------------------------------- ahead-of-time configurations


def _aot(kernel, num_warps=4, **constexprs):
    signature = {}
    for name in kernel.arg_names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name in ("B", "H"):
            signature[name] = "i32"
        else:
            signature[name] = "*i64" if name == "POS" else "*fp32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(signature)
        if signature[n].startswith("*")
    }
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "num_warps": num_warps,
        "attrs": attrs,
    }


AOT = [
    _aot(jit.lstm_step_fwd_kernel, HAS_Y=True, BLOCK=MAX_BLOCK),
    _aot(jit.lstm_step_fwd_kernel, 2, HAS_Y=False, BLOCK=64),
    _aot(jit.lstm_step_bwd_kernel, HAS_GY=True, BLOCK=MAX_BLOCK),
    _aot(jit.gru_step_fwd_kernel, BLOCK=MAX_BLOCK),
    _aot(jit.gru_step_bwd_kernel, HAS_GY=True, BLOCK=MAX_BLOCK),
]
