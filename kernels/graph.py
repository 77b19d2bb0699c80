"""Host launchers of the graph family's Triton kernels (kernels/graph_jit.py), with the schemas
of the native ops (csrc/ops.cpp) so fastdl/ops/graph.py registers them as
``fastdl::<op>_triton`` custom ops sharing the native fakes and autograd. Also AOT, the
configurations tests/test_gpu_build.py compiles ahead of time.

A CSR handed to these launchers is validated first (fastdl.graph.check_csr: rowptr starts at 0,
never decreases, ends at nnz; indices in range), before any kernel reads memory.
"""

from dataclasses import dataclass

import torch
import triton

from fastdl import _checks, _ext
from fastdl.graph import check_csr

from . import graph_jit as jit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCK_E = 16
# Features per program in the gather kernels: 128 fp32 = 512 B of each gathered row.
MAX_BLOCK_F = 128


def _require_runnable(op: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got x on {x.device}"
        )


def _features(op: str, name: str, t: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    _checks.same_device(op, name, t, ref)
    _checks.dtype(op, name, t, DTYPES if t is ref else (ref.dtype,))
    if t.dim() != 2:
        raise RuntimeError(f"{op}: {name} must be 2-D (nodes, features), got {list(t.shape)}")
    return t.contiguous()


def _csr(op, rowptr, col, num_cols, x):
    for name, t in (("rowptr", rowptr), ("col", col)):
        _checks.same_device(op, name, t, x)
        if t.dtype != torch.int64:
            raise _checks.DtypeError(f"{op}: {name} must be an int64 index tensor, got {t.dtype}")
    check_csr(op, rowptr, col, num_cols)
    return rowptr.contiguous(), col.contiguous()


def _transpose(op, t_rowptr, t_col, t_perm, num_rows, nnz, x):
    t_rowptr, t_col = _csr(op, t_rowptr, t_col, num_rows, x)
    if t_perm.numel() != nnz or t_col.numel() != nnz:
        raise RuntimeError(f"{op}: the transpose must have {nnz} entries")
    if nnz and (t_perm.min().item() < 0 or t_perm.max().item() >= nnz):
        raise IndexError(f"{op}: t_perm entries must lie in [0, {nnz})")
    return t_rowptr, t_col, t_perm.contiguous()


def _edge_scalars(op, name, w, x, nnz):
    if w is None:
        return None
    _checks.same_device(op, name, w, x)
    if w.dim() != 1 or w.numel() != nnz:
        raise RuntimeError(f"{op}: {name} must have shape ({nnz},), got {list(w.shape)}")
    return w.to(torch.float32).contiguous()


def _block_f(f: int) -> int:
    return min(MAX_BLOCK_F, triton.next_power_of_2(max(f, 1)))


def _gather_sum(rowptr, col, perm, w, cs, rs, ds, x, xd, rows, out):
    f = x.shape[1]
    if rows == 0 or f == 0:
        return out
    bf = _block_f(f)
    jit.gather_sum_kernel[(rows, triton.cdiv(f, bf))](
        rowptr, col, perm if perm is not None else col, w if w is not None else x,
        cs if cs is not None else x, rs if rs is not None else x, ds if ds is not None else x,
        x, xd if xd is not None else x, out, f, HAS_PERM=perm is not None, HAS_W=w is not None,
        HAS_CS=cs is not None, HAS_RS=rs is not None, HAS_DS=ds is not None, BLOCK_E=BLOCK_E,
        BLOCK_F=bf,
    )  # fmt: skip
    return out


def _inv_count(rowptr):
    return (rowptr[1:] - rowptr[:-1]).clamp_min(1).to(torch.float32).reciprocal()


def _reduce(op, reduce):
    names = {"sum": "sum", "add": "sum", "mean": "mean", "max": "max", "amax": "max",
             "min": "min", "amin": "min"}  # fmt: skip
    if reduce not in names:
        raise RuntimeError(f"{op}: reduce must be one of sum, mean, max, min, got '{reduce}'")
    return names[reduce]


def spmm_fwd(
    rowptr: torch.Tensor, col: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor,
    reduce: str, t_rowptr: torch.Tensor | None, t_col: torch.Tensor | None,
    t_perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.spmm"
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    red = _reduce(op, reduce)
    x = _features(op, "x", x, x)
    rowptr, col = _csr(op, rowptr, col, x.shape[0], x)
    rows, f = rowptr.numel() - 1, x.shape[1]
    w = _edge_scalars(op, "edge_weight", weight, x, col.numel())
    out = x.new_empty(rows, f)
    if red in ("max", "min"):
        arg = x.new_empty(rows, f, dtype=torch.int64)
        if rows and f:
            bf = _block_f(f)
            jit.gather_max_kernel[(rows, triton.cdiv(f, bf))](
                rowptr, col, w if w is not None else x, x, out, arg, f, HAS_W=w is not None,
                IS_MIN=red == "min", BLOCK_E=BLOCK_E, BLOCK_F=bf,
            )  # fmt: skip
        return out, arg
    rs = _inv_count(rowptr) if red == "mean" else None
    _gather_sum(rowptr, col, None, w, None, rs, None, x, None, rows, out)
    return out, x.new_empty(0, 0, dtype=torch.int64)


def _edge_dot(rowptr, col, a, b, rs, arg, out):
    rows, f = rowptr.numel() - 1, a.shape[1]
    if rows and col.numel():
        jit.edge_dot_kernel[(rows,)](
            rowptr, col, a, b, rs if rs is not None else a, arg if arg is not None else col, out,
            f, HAS_RS=rs is not None, HAS_ARG=arg is not None, BLOCK_E=BLOCK_E,
            BLOCK_F=_block_f(f),
        )  # fmt: skip
    return out


def spmm_bwd(
    grad_out: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor,
    weight: torch.Tensor | None, x: torch.Tensor, arg: torch.Tensor, t_rowptr: torch.Tensor,
    t_col: torch.Tensor, t_perm: torch.Tensor, reduce: str, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.spmm_backward"
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    red = _reduce(op, reduce)
    x = _features(op, "x", x, x)
    rowptr, col = _csr(op, rowptr, col, x.shape[0], x)
    rows, n, f = rowptr.numel() - 1, x.shape[0], x.shape[1]
    t_rowptr, t_col, t_perm = _transpose(op, t_rowptr, t_col, t_perm, rows, col.numel(), x)
    g = _features(op, "grad_out", grad_out, x)
    _checks.shape(op, "grad_out", g, (rows, f))
    w = _edge_scalars(op, "edge_weight", weight, x, col.numel())
    rs = _inv_count(rowptr) if red == "mean" else None
    maxmin = red in ("max", "min")
    if maxmin:
        _checks.shape(op, "arg", arg, (rows, f))
    arg = arg.contiguous() if maxmin else None
    grad_x = x.new_empty(n if output_mask[0] else 0, f)
    if output_mask[0] and maxmin and n and f:
        bf = _block_f(f)
        jit.gather_max_bwd_kernel[(n, triton.cdiv(f, bf))](
            t_rowptr, t_col, t_perm, w if w is not None else x, g, arg, grad_x, f,
            HAS_W=w is not None, BLOCK_E=BLOCK_E, BLOCK_F=bf,
        )  # fmt: skip
    elif output_mask[0]:
        _gather_sum(t_rowptr, t_col, t_perm, w, rs, None, None, g, None, n, grad_x)
    grad_w = x.new_empty(col.numel() if output_mask[1] else 0, dtype=torch.float32)
    if output_mask[1]:
        _edge_dot(rowptr, col, g, x, rs, arg, grad_w)
    return grad_x, grad_w


def _gcn_dinv(rowptr, w, rows, fill):
    if w is None:
        deg = (rowptr[1:] - rowptr[:-1]).to(torch.float32)
    else:  # a segmented reduction: deterministic, unlike index_add_ on a GPU
        deg = torch.segment_reduce(w, "sum", offsets=rowptr, unsafe=True, initial=0)
    deg = deg + fill
    return torch.where(deg > 0, deg.clamp_min(1e-30).rsqrt(), 0.0)


def _gcn_diag(dinv, eps, fill):
    d = dinv.square() * fill
    return d * (eps.to(d.dtype).reshape(()) + 1) if eps is not None else d


def gcn_fwd(
    rowptr: torch.Tensor, col: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor,
    eps: torch.Tensor | None, fill: float, t_rowptr: torch.Tensor | None,
    t_col: torch.Tensor | None, t_perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.gcn_aggregate"
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    x = _features(op, "x", x, x)
    rowptr, col = _csr(op, rowptr, col, x.shape[0], x)
    rows = rowptr.numel() - 1
    if rows != x.shape[0]:
        raise RuntimeError(f"{op}: a GCN graph is square: rowptr has {rows} rows but x has "
                           f"{x.shape[0]}")  # fmt: skip
    w = _edge_scalars(op, "edge_weight", weight, x, col.numel())
    dinv = _gcn_dinv(rowptr, w, rows, fill)
    ds = _gcn_diag(dinv, eps, fill)
    out = _gather_sum(rowptr, col, None, w, dinv, dinv, ds, x, x, rows, torch.empty_like(x))
    return out, dinv


def gcn_bwd(
    grad_out: torch.Tensor, weight: torch.Tensor | None, x: torch.Tensor, dinv: torch.Tensor,
    eps: torch.Tensor | None, t_rowptr: torch.Tensor, t_col: torch.Tensor,
    t_perm: torch.Tensor, fill: float, output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.gcn_aggregate_backward"
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    x = _features(op, "x", x, x)
    n = x.shape[0]
    g = _features(op, "grad_out", grad_out, x)
    _checks.shape(op, "grad_out", g, tuple(x.shape))
    _checks.shape(op, "dinv", dinv, (n,))
    t_rowptr, t_col, t_perm = _transpose(op, t_rowptr, t_col, t_perm, n, t_col.numel(), x)
    w = _edge_scalars(op, "edge_weight", weight, x, t_col.numel())
    dinv = dinv.contiguous()
    ds = _gcn_diag(dinv, eps, fill)
    grad_x = x.new_empty(n if output_mask[0] else 0, x.shape[1])
    if output_mask[0]:
        _gather_sum(t_rowptr, t_col, t_perm, w, dinv, dinv, ds, g, g, n, grad_x)
    grad_eps = x.new_empty(1 if output_mask[1] else 0, dtype=torch.float32)
    if output_mask[1]:
        rowdot = (g.float() * x.float()).sum(1)
        grad_eps.copy_((rowdot * dinv.square()).sum().reshape(1) * fill)
    return grad_x, grad_eps


def sddmm_fwd(
    rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    t_rowptr: torch.Tensor | None, t_col: torch.Tensor | None, t_perm: torch.Tensor | None,
) -> torch.Tensor:  # fmt: skip
    op = "fastdl.sddmm"
    _checks.dtype(op, "a", a, DTYPES)
    _require_runnable(op, a)
    a, b = _features(op, "a", a, a), _features(op, "b", b, a)
    rowptr, col = _csr(op, rowptr, col, a.shape[0], a)
    _checks.shape(op, "b", b, (rowptr.numel() - 1, a.shape[1]))
    out = torch.empty(col.numel(), dtype=torch.float32, device=a.device)
    return _edge_dot(rowptr, col, b, a, None, None, out).to(a.dtype)


def sddmm_bwd(
    grad_out: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, a: torch.Tensor,
    b: torch.Tensor, t_rowptr: torch.Tensor, t_col: torch.Tensor, t_perm: torch.Tensor,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.sddmm_backward"
    _checks.dtype(op, "a", a, DTYPES)
    _require_runnable(op, a)
    a, b = _features(op, "a", a, a), _features(op, "b", b, a)
    rowptr, col = _csr(op, rowptr, col, a.shape[0], a)
    _checks.shape(op, "b", b, (rowptr.numel() - 1, a.shape[1]))
    nnz = col.numel()
    t_rowptr, t_col, t_perm = _transpose(op, t_rowptr, t_col, t_perm, b.shape[0], nnz, a)
    w = _edge_scalars(op, "grad_out", grad_out, a, nnz)
    grad_a = a.new_empty(a.shape[0] if output_mask[0] else 0, a.shape[1])
    if output_mask[0]:
        _gather_sum(t_rowptr, t_col, t_perm, w, None, None, None, b, None, a.shape[0], grad_a)
    grad_b = b.new_empty(b.shape[0] if output_mask[1] else 0, b.shape[1])
    if output_mask[1]:
        _gather_sum(rowptr, col, None, w, None, None, None, a, None, b.shape[0], grad_b)
    return grad_a, grad_b


def _gat_inputs(op, h, att_src, att_dst, drop, nnz):
    _checks.dtype(op, "h", h, DTYPES)
    _require_runnable(op, h)
    if h.dim() != 3:
        raise RuntimeError(f"{op}: h must be 3-D (nodes, heads, features), got {list(h.shape)}")
    heads, f = h.shape[1], h.shape[2]
    atts = []
    for name, t in (("att_src", att_src), ("att_dst", att_dst)):
        _checks.same_device(op, name, t, h)
        if t.numel() != heads * f:
            raise RuntimeError(f"{op}: {name} must have heads * features = {heads * f} elements")
        atts.append(t.to(torch.float32).contiguous())
    if drop is not None:
        _checks.same_device(op, "dropout_mask", drop, h)
        if drop.numel() != nnz * heads:
            raise RuntimeError(f"{op}: dropout_mask must have (edges, heads) = ({nnz}, {heads})")
        drop = drop.to(torch.float32).contiguous()
    return h.contiguous(), *atts, drop


def gat_fwd(
    rowptr: torch.Tensor, col: torch.Tensor, h: torch.Tensor, att_src: torch.Tensor,
    att_dst: torch.Tensor, negative_slope: float, dropout_mask: torch.Tensor | None,
    t_rowptr: torch.Tensor | None, t_col: torch.Tensor | None, t_perm: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.gat_aggregate"
    h, s, d, drop = _gat_inputs(op, h, att_src, att_dst, dropout_mask, col.numel())
    n, heads, f = h.shape
    rowptr, col = _csr(op, rowptr, col, n, h)
    acc = {"dtype": torch.float32, "device": h.device}
    out = torch.empty_like(h)
    alpha = torch.empty(col.numel(), heads, **acc)
    a_src, a_dst = torch.empty(n, heads, **acc), torch.empty(n, heads, **acc)
    if n and heads and f:
        bh, bf = triton.next_power_of_2(heads), triton.next_power_of_2(f)
        jit.gat_scores_kernel[(n,)](h, s, d, a_src, a_dst, heads, f, BLOCK_H=bh,
                                    BLOCK_F=min(bf, 64))  # fmt: skip
        jit.gat_fwd_kernel[(n, heads)](
            rowptr, col, h, a_src, a_dst, drop if drop is not None else a_src, alpha, out, heads,
            f, negative_slope, HAS_DROP=drop is not None, BLOCK_E=BLOCK_E, BLOCK_F=bf,
        )  # fmt: skip
    return out, alpha, a_src, a_dst


def gat_bwd(
    grad_out: torch.Tensor, rowptr: torch.Tensor, col: torch.Tensor, h: torch.Tensor,
    att_src: torch.Tensor, att_dst: torch.Tensor, alpha: torch.Tensor, a_src: torch.Tensor,
    a_dst: torch.Tensor, dropout_mask: torch.Tensor | None, t_rowptr: torch.Tensor,
    t_col: torch.Tensor, t_perm: torch.Tensor, negative_slope: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    op = "fastdl.gat_aggregate_backward"
    h, s, d, drop = _gat_inputs(op, h, att_src, att_dst, dropout_mask, col.numel())
    n, heads, f = h.shape
    rowptr, col = _csr(op, rowptr, col, n, h)
    nnz = col.numel()
    t_rowptr, t_col, t_perm = _transpose(op, t_rowptr, t_col, t_perm, n, nnz, h)
    _checks.same_device(op, "grad_out", grad_out, h)
    _checks.shape(op, "grad_out", grad_out, tuple(h.shape))
    _checks.shape(op, "alpha", alpha, (nnz, heads))
    for name, t in (("a_src", a_src), ("a_dst", a_dst)):
        _checks.shape(op, name, t, (n, heads))
    g = grad_out.contiguous()
    acc = {"dtype": torch.float32, "device": h.device}
    dz = torch.empty(nnz, heads, **acc)
    g_src, g_dst = torch.empty(n, heads, **acc), torch.empty(n, heads, **acc)
    grad_h = torch.empty_like(h)
    if n and heads and f:
        bf = triton.next_power_of_2(f)
        dummy = drop if drop is not None else a_src
        jit.gat_bwd_rows_kernel[(n, heads)](
            rowptr, col, h, g, a_src.contiguous(), a_dst.contiguous(), dummy, alpha.contiguous(),
            dz, g_dst, heads, f, negative_slope, HAS_DROP=drop is not None, BLOCK_E=BLOCK_E,
            BLOCK_F=bf,
        )  # fmt: skip
        jit.gat_bwd_nodes_kernel[(n, heads)](
            t_rowptr, t_col, t_perm, g, dummy, alpha.contiguous(), dz, s, d, g_dst, g_src, grad_h,
            heads, f, HAS_DROP=drop is not None, BLOCK_E=BLOCK_E, BLOCK_F=bf,
        )  # fmt: skip
    else:
        g_src.zero_()
        g_dst.zero_()
    hh = h.float()
    grad_s = (g_src.unsqueeze(-1) * hh).sum(0).reshape(att_src.shape)
    grad_d = (g_dst.unsqueeze(-1) * hh).sum(0).reshape(att_dst.shape)
    return grad_h, grad_s, grad_d


# ---------------------------------------------------------------- AOT (tests/test_gpu_build.py)


@dataclass(frozen=True)
class AotConfig:
    """One specialization of a kernel for tests/test_gpu_build.py to compile for sm_80/sm_90."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int = 4


_INTS = {"F", "H"}
_INDEX = {"rowptr", "col", "perm", "t_rowptr", "t_col", "t_perm", "arg"}
_DATA = {"x", "xd", "out", "a", "b", "g", "h"}


def _aot(kernel, data: str = "fp32", num_warps: int = 4, **constexprs) -> AotConfig:
    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in _INTS:
            return "i32"
        if name == "slope":
            return "fp32"
        if name in _INDEX:
            return "*i64"
        return "*" + (data if name in _DATA else "fp32")

    return AotConfig(kernel, {a: arg_type(a) for a in kernel.arg_names}, constexprs, num_warps)


_SUM = {"HAS_PERM": False, "HAS_W": True, "HAS_CS": False, "HAS_RS": True, "HAS_DS": False}
_GCN_T = {"HAS_PERM": True, "HAS_W": False, "HAS_CS": True, "HAS_RS": True, "HAS_DS": True}
AOT: list[AotConfig] = [
    _aot(jit.gather_sum_kernel, **_SUM, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.gather_sum_kernel, "bf16", **_GCN_T, BLOCK_E=BLOCK_E, BLOCK_F=128),
    _aot(jit.gather_sum_kernel, "fp16", **_SUM, BLOCK_E=BLOCK_E, BLOCK_F=32),
    _aot(jit.gather_max_kernel, HAS_W=False, IS_MIN=False, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.gather_max_kernel, "bf16", HAS_W=True, IS_MIN=True, BLOCK_E=BLOCK_E, BLOCK_F=128),
    _aot(jit.gather_max_bwd_kernel, HAS_W=True, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.edge_dot_kernel, HAS_RS=True, HAS_ARG=False, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.edge_dot_kernel, "bf16", HAS_RS=False, HAS_ARG=True, BLOCK_E=BLOCK_E, BLOCK_F=128),
    _aot(jit.gat_scores_kernel, BLOCK_H=4, BLOCK_F=64),
    _aot(jit.gat_fwd_kernel, HAS_DROP=False, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.gat_fwd_kernel, "bf16", HAS_DROP=True, BLOCK_E=BLOCK_E, BLOCK_F=16),
    _aot(jit.gat_bwd_rows_kernel, HAS_DROP=True, BLOCK_E=BLOCK_E, BLOCK_F=64),
    _aot(jit.gat_bwd_nodes_kernel, "fp16", HAS_DROP=False, BLOCK_E=BLOCK_E, BLOCK_F=64),
]
