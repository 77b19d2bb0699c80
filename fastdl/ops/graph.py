"""Graph family: sparse aggregation for GNNs over a fastdl.Graph (CSR by destination node).

spmm (sum/mean/max/min), Kipf-normalized GCN aggregation with an optional learnable (1 + eps)
self weight, fused multi-head GAT attention, and SDDMM (per-edge dot products). The native ops
(C++ on CPU; schemas in csrc/ops.cpp) run forward over the CSR and gradients of gathered inputs
over the cached transpose: no atomics, bit-identical results from run to run.
"""

import math
from types import SimpleNamespace

import torch

from fastdl import _backend, _checks, _ext
from fastdl.graph import Graph
from fastdl.ops import _library

OPS = (
    "spmm_fwd",
    "spmm_bwd",
    "gcn_fwd",
    "gcn_bwd",
    "sddmm_fwd",
    "sddmm_bwd",
    "gat_fwd",
    "gat_bwd",
)
REDUCES = ("sum", "mean", "max", "min")


def _acc(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------- fake kernels (all backends)


def _spmm_fwd_fake(rowptr, col, weight, x, reduce, t_rowptr, t_col, t_perm):
    rows, f = rowptr.shape[0] - 1, x.shape[1]
    arg_shape = (rows, f) if reduce in ("max", "min") else (0, 0)
    return x.new_empty(rows, f), x.new_empty(arg_shape, dtype=torch.int64)


def _spmm_bwd_fake(grad_out, rowptr, col, weight, x, arg, t_rowptr, t_col, t_perm, reduce, mask):
    gx = x.new_empty(x.shape[0] if mask[0] else 0, x.shape[1])
    return gx, x.new_empty(col.shape[0] if mask[1] else 0, dtype=_acc(x))


def _gcn_fwd_fake(rowptr, col, weight, x, eps, fill, t_rowptr, t_col, t_perm):
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(
        x.shape[0], dtype=_acc(x)
    )


def _gcn_bwd_fake(grad_out, weight, x, dinv, eps, t_rowptr, t_col, t_perm, fill, mask):
    gx = x.new_empty(x.shape[0] if mask[0] else 0, x.shape[1])
    return gx, x.new_empty(1 if mask[1] else 0, dtype=_acc(x))


def _sddmm_fwd_fake(rowptr, col, a, b, t_rowptr, t_col, t_perm):
    return a.new_empty(col.shape[0])


def _sddmm_bwd_fake(grad_out, rowptr, col, a, b, t_rowptr, t_col, t_perm, mask):
    ga = a.new_empty(a.shape[0] if mask[0] else 0, a.shape[1])
    return ga, b.new_empty(b.shape[0] if mask[1] else 0, b.shape[1])


def _gat_fwd_fake(rowptr, col, h, att_src, att_dst, slope, drop, t_rowptr, t_col, t_perm):
    n, heads = h.shape[0], h.shape[1]
    acc = _acc(h)
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        h.new_empty(col.shape[0], heads, dtype=acc),
        h.new_empty(n, heads, dtype=acc),
        h.new_empty(n, heads, dtype=acc),
    )


def _gat_bwd_fake(g, rowptr, col, h, att_src, att_dst, alpha, a_src, a_dst, drop, tr, tc, tp, s):
    acc = _acc(h)
    return (
        torch.empty_like(h, memory_format=torch.contiguous_format),
        att_src.new_empty(att_src.shape, dtype=acc),
        att_dst.new_empty(att_dst.shape, dtype=acc),
    )


# ---------------------------------------------------------------- autograd (all backends)


def _transpose(ctx, op):
    t = ctx.saved_tensors[-3:]
    if any(v is None for v in t):
        raise RuntimeError(f"{op}: backward needs the graph's transpose (t_rowptr, t_col, t_perm)")
    return t


def _cast(grad, like, wanted):
    return grad.reshape(like.shape).to(like.dtype) if wanted else None


def _spmm_setup(ctx, inputs, output):
    rowptr, col, weight, x, reduce, t_rowptr, t_col, t_perm = inputs
    ctx.reduce = reduce
    ctx.save_for_backward(rowptr, col, weight, x, output[1], t_rowptr, t_col, t_perm)


def _spmm_backward(bwd):
    def backward(ctx, g_out, _g_arg):
        rowptr, col, weight, x, arg = ctx.saved_tensors[:5]
        nw, nx = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        t = _transpose(ctx, "fastdl.spmm")
        gx, gw = bwd(g_out, rowptr, col, weight, x, arg, *t, ctx.reduce, [nx, nw])
        return None, None, _cast(gw, weight, nw), gx if nx else None, None, None, None, None

    return backward


def _gcn_setup(ctx, inputs, output):
    _rowptr, _col, weight, x, eps, fill, t_rowptr, t_col, t_perm = inputs
    ctx.fill = fill
    ctx.save_for_backward(weight, x, output[1], eps, t_rowptr, t_col, t_perm)


def _gcn_backward(bwd):
    def backward(ctx, g_out, _g_dinv):
        weight, x, dinv, eps = ctx.saved_tensors[:4]
        if ctx.needs_input_grad[2]:
            raise RuntimeError("fastdl.gcn_aggregate: edge_weight takes no gradient")
        nx, ne = ctx.needs_input_grad[3], ctx.needs_input_grad[4]
        t = _transpose(ctx, "fastdl.gcn_aggregate")
        gx, ge = bwd(g_out, weight, x, dinv, eps, *t, ctx.fill, [nx, ne])
        return None, None, None, gx if nx else None, _cast(ge, eps, ne), None, None, None, None

    return backward


def _sddmm_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _sddmm_backward(bwd):
    def backward(ctx, g_out):
        rowptr, col, a, b = ctx.saved_tensors[:4]
        na, nb = ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        t = _transpose(ctx, "fastdl.sddmm")
        ga, gb = bwd(g_out.contiguous(), rowptr, col, a, b, *t, [na, nb])
        return None, None, ga if na else None, gb if nb else None, None, None, None

    return backward


def _gat_setup(ctx, inputs, output):
    rowptr, col, h, att_src, att_dst, slope, drop, t_rowptr, t_col, t_perm = inputs
    ctx.slope = slope
    ctx.save_for_backward(
        rowptr, col, h, att_src, att_dst, *output[1:], drop, t_rowptr, t_col, t_perm
    )


def _gat_backward(bwd):
    def backward(ctx, g_out, _g_alpha, _g_src, _g_dst):
        rowptr, col, h, att_src, att_dst, alpha, a_src, a_dst, drop = ctx.saved_tensors[:9]
        t = _transpose(ctx, "fastdl.gat_aggregate")
        gh, gs, gd = bwd(
            g_out, rowptr, col, h, att_src, att_dst, alpha, a_src, a_dst, drop, *t, ctx.slope
        )
        n = ctx.needs_input_grad
        return (
            None,
            None,
            gh if n[2] else None,
            _cast(gs, att_src, n[3]),
            _cast(gd, att_dst, n[4]),
            None,
            None,
            None,
            None,
            None,
        )

    return backward


_FAKE = {
    "spmm_fwd": _spmm_fwd_fake,
    "spmm_bwd": _spmm_bwd_fake,
    "gcn_fwd": _gcn_fwd_fake,
    "gcn_bwd": _gcn_bwd_fake,
    "sddmm_fwd": _sddmm_fwd_fake,
    "sddmm_bwd": _sddmm_bwd_fake,
    "gat_fwd": _gat_fwd_fake,
    "gat_bwd": _gat_bwd_fake,
}
_AUTOGRAD = {
    "spmm": (_spmm_setup, _spmm_backward),
    "gcn": (_gcn_setup, _gcn_backward),
    "sddmm": (_sddmm_setup, _sddmm_backward),
    "gat": (_gat_setup, _gat_backward),
}


def _register(ops: SimpleNamespace) -> SimpleNamespace:
    return _library.register(ops, _FAKE, _AUTOGRAD)


def _native_ops() -> SimpleNamespace | None:
    if _ext._C is None:
        return None
    return _register(SimpleNamespace(**{n: getattr(torch.ops.fastdl, n).default for n in OPS}))


def _triton_ops() -> SimpleNamespace | None:
    if not _ext.HAS_TRITON:
        return None
    from fastdl.kernels import graph as launchers

    return _register(
        SimpleNamespace(
            **{
                n: torch.library.custom_op(
                    f"fastdl::{n}_triton", getattr(launchers, n), mutates_args=()
                )
                for n in OPS
            }
        )
    )


NATIVE = _native_ops()
TRITON = _triton_ops()


def _ops(op: str, x: torch.Tensor) -> SimpleNamespace:
    return _backend.namespace("graph", op, x, NATIVE, TRITON)


# ---------------------------------------------------------------- public functions


def _graph_args(op: str, graph: Graph, x: torch.Tensor, name: str = "x") -> None:
    if not isinstance(graph, Graph):
        raise TypeError(f"{op}: graph must be a fastdl.Graph, got {type(graph).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a tensor, got {type(x).__name__}")
    if x.device != graph.device:
        raise RuntimeError(
            f"{op}: {name} is on {x.device} but the graph is on {graph.device}; all tensors must "
            "be on the same device"
        )
    if x.dim() < 1 or x.shape[0] != graph.num_nodes:
        raise RuntimeError(
            f"{op}: {name} must have num_nodes={graph.num_nodes} rows, got shape {list(x.shape)}"
        )


def _rows(x: torch.Tensor) -> torch.Tensor:
    # (N, *) -> (N, F); explicit F, since -1 is ambiguous for N == 0.
    return x.reshape(x.shape[0], math.prod(x.shape[1:]))


def _carry(graph: Graph, *tensors):
    """The transpose when a gradient will be needed, else three Nones."""
    return graph.transpose() if _checks.plans_for_grad(*tensors) else (None, None, None)


def spmm(
    graph: Graph, x: torch.Tensor, edge_weight: torch.Tensor | None = None, reduce: str = "sum"
) -> torch.Tensor:
    """Sparse x dense aggregation over each node's incoming edges:
    ``out[i] = reduce_{j -> i} w_ji * x[j]`` with reduce sum, mean, max or min (torch_scatter's
    semantics; empty rows give 0; max/min ties take the first edge in CSR order).

    Shapes: x (num_nodes, *); edge_weight (num_edges,) in edge_index order, or None (the graph's
    own weights, or 1). Output (num_nodes, *). Gradients to x and edge_weight (max/min route the
    gradient to the edge that attained the value). Dtypes: CPU float32/float64/bfloat16 (fp32
    accumulation), CUDA/Triton float32/float16/bfloat16. Backends: C++ (CPU), Triton.
    Deterministic: yes (backward over the transpose, no
    atomics).
    """
    op = "fastdl.spmm"
    _graph_args(op, graph, x)
    if reduce not in REDUCES:
        raise ValueError(f"{op}: reduce must be one of {REDUCES}, got {reduce!r}")
    w = graph.edge_values(op, "edge_weight", edge_weight)
    x2 = _rows(x)
    t = _carry(graph, x, w)
    out, _ = _library.call(_ops(op, x).spmm_fwd, graph.rowptr, graph.col, w, x2, reduce, *t)
    return out.view(x.shape)


def gcn_aggregate(
    graph: Graph,
    x: torch.Tensor,
    edge_weight: torch.Tensor | None = None,
    *,
    eps: float | torch.Tensor | None = None,
    improved: bool = False,
) -> torch.Tensor:
    """Kipf & Welling (2017) aggregation ``D^-1/2 (A + f I) D^-1/2 x`` with the self loops and
    degrees computed on the fly (no normalized edge-weight tensor): ``f = 2`` when ``improved``,
    else 1; ``D`` the weighted in-degrees plus f. With ``eps`` (float or learnable one-element
    tensor) the self term is scaled by (1 + eps) (GIN-style diagonal enhancement), degrees
    unchanged. Self loops already in the graph count as ordinary edges of A (a loop
    i -> i then adds to the diagonal twice); Kipf's normalization, as PyG's GCNConv computes it
    (existing loops replaced), is this on ``graph.without_self_loops()``.

    Gradients to x and eps; edge_weight takes none. Dtypes, backends, determinism as :func:`spmm`.
    """
    op = "fastdl.gcn_aggregate"
    _graph_args(op, graph, x)
    w = graph.edge_values(op, "edge_weight", edge_weight)
    if _checks.needs_grad(w):
        raise RuntimeError(f"{op}: edge_weight takes no gradient; pass edge_weight.detach()")
    if eps is not None and not isinstance(eps, torch.Tensor):
        if isinstance(eps, bool) or not isinstance(eps, (int, float)):
            raise TypeError(
                f"{op}: eps must be a float or a one-element tensor, got {type(eps).__name__}"
            )
        eps = torch.tensor([float(eps)], dtype=_acc(x), device=x.device)
    if eps is not None:
        _checks.same_device(op, "eps", eps, x)
        if eps.numel() != 1:
            raise RuntimeError(f"{op}: eps must have one element, got shape {list(eps.shape)}")
    x2 = _rows(x)
    t = _carry(graph, x, eps)
    fill = 2.0 if improved else 1.0
    out, _ = _library.call(_ops(op, x).gcn_fwd, graph.rowptr, graph.col, w, x2, eps, fill, *t)
    return out.view(x.shape)


def sddmm(graph: Graph, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Sampled dense-dense product: one dot product per edge, ``out[k] = <a[src_k], b[dst_k]>``
    (link prediction scores), in edge_index order.

    Shapes: a, b (num_nodes, F). Output (num_edges,) in a's dtype (fp32 accumulation).
    Gradients to a and b. Dtypes, backends, determinism as :func:`spmm`.
    """
    op = "fastdl.sddmm"
    _graph_args(op, graph, a, "a")
    _graph_args(op, graph, b, "b")
    if a.dim() != 2 or b.shape != a.shape:
        raise RuntimeError(
            f"{op}: a and b must both be (num_nodes, F), got {list(a.shape)} and {list(b.shape)}"
        )
    t = _carry(graph, a, b)
    out = _library.call(_ops(op, a).sddmm_fwd, graph.rowptr, graph.col, a, b, *t)
    return graph.to_edge_order(out)


def gat_aggregate(
    graph: Graph,
    h: torch.Tensor,
    att_src: torch.Tensor,
    att_dst: torch.Tensor,
    negative_slope: float = 0.2,
    dropout: float = 0.0,
    training: bool = True,
) -> torch.Tensor:
    """Graph attention (Velickovic et al., 2018), one fused op per direction:
    ``e_ji = LeakyReLU(<att_src, h_j> + <att_dst, h_i>)``, ``alpha = softmax_j(e_ji)`` over the
    incoming edges of i (per head), ``out_i = sum_j dropout(alpha_ji) h_j``. Nothing of size
    edges x heads x F is materialized (edges x heads scalars are saved).

    Shapes: h (num_nodes, heads, F) or (num_nodes, F) for one head; att_src, att_dst (heads, F)
    or PyG's (1, heads, F). Output: h's shape. The graph should contain self loops (as GATConv
    adds them). Gradients to h, att_src, att_dst. Dropout (``training`` and ``dropout`` > 0)
    draws its mask from torch's generator. Dtypes, backends, determinism as :func:`spmm`.
    """
    op = "fastdl.gat_aggregate"
    _graph_args(op, graph, h, "h")
    if not 0.0 <= dropout <= 1.0:
        raise ValueError(f"{op}: dropout must lie in [0, 1], got {dropout}")
    h3 = h.unsqueeze(1) if h.dim() == 2 else h
    if h3.dim() != 3:
        raise RuntimeError(f"{op}: h must be (num_nodes, heads, F), got {list(h.shape)}")
    heads, f = h3.shape[1], h3.shape[2]
    for name, att in (("att_src", att_src), ("att_dst", att_dst)):
        if not isinstance(att, torch.Tensor):
            raise TypeError(f"{op}: {name} must be a tensor, got {type(att).__name__}")
        _checks.same_device(op, name, att, h)
        # The shape, not the element count: a (F, heads) tensor has as many elements but would
        # be read as (heads, F), a silently wrong result.
        if tuple(att.shape) not in ((heads, f), (1, heads, f)):
            raise RuntimeError(
                f"{op}: {name} must have shape (heads, F) = ({heads}, {f}) or (1, {heads}, {f}), "
                f"got {list(att.shape)}"
            )
    drop = None
    if training and dropout > 0:
        keep = torch.rand(graph.num_edges, heads, device=h.device) >= dropout
        scale = 0.0 if dropout >= 1 else 1.0 / (1.0 - dropout)
        drop = keep.to(_acc(h)) * scale
    t = _carry(graph, h, att_src, att_dst)
    args = (graph.rowptr, graph.col, h3, att_src, att_dst, float(negative_slope), drop, *t)
    out = _library.call(_ops(op, h).gat_fwd, *args)[0]
    return out.view(h.shape)
