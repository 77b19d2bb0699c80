"""The op contract (DESIGN §2, §3) for the graph family: opcheck of every raw op, gradcheck in
float64, torch.compile(fullgraph=True), bit-identical repeated runs, every CPU ISA, the Graph
object, and every bad input of issue 6 answered with a clear error."""

import re

import pytest
import torch
from conftest import ISAS
from graph_ref import (
    close,
    compare,
    gat_ref,
    gcn_ref,
    leaf,
    random_graph,
    run_grads,
    sddmm_ref,
    spmm_ref,
)

import fastdl
from fastdl import Graph, _ext
from fastdl.ops import graph as G

N, E = 12, 50


@pytest.fixture
def graph_inputs():
    ei = torch.cat([random_graph(N, E, self_loops=False, seed=11), torch.arange(N).expand(2, N)], 1)
    return ei, Graph.from_edge_index(ei, N)


def _t(*shape, grad=False, dtype=torch.float32):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


# ---------------------------------------------------------------- opcheck


def _samples(g, grad):
    tr = g.transpose()
    nnz = g.num_edges
    x, w = _t(N, 6, grad=grad), (torch.rand(nnz) + 0.5).requires_grad_(grad)
    h, s, d = _t(N, 2, 3, grad=grad), _t(2, 3, grad=grad), _t(2, 3, grad=grad)
    eps = torch.tensor([0.2], requires_grad=grad)
    drop = (torch.rand(nnz, 2) > 0.3).float() * 2
    gcn_graph = g.remove_self_loops()
    rp, col = g.rowptr, g.col
    samples = [
        ("spmm_fwd", (rp, col, w, x, "sum", *tr)),
        ("spmm_fwd", (rp, col, None, x, "mean", *tr)),
        ("spmm_fwd", (rp, col, w, x, "max", *tr)),
        ("spmm_fwd", (rp, col, None, x, "min", *tr)),
        ("gcn_fwd", (gcn_graph.rowptr, gcn_graph.col, None, x, eps, 1.0, *gcn_graph.transpose())),
        ("sddmm_fwd", (rp, col, x, _t(N, 6, grad=grad), *tr)),
        ("gat_fwd", (rp, col, h, s, d, 0.2, None, *tr)),
        ("gat_fwd", (rp, col, h, s, d, 0.1, drop, *tr)),
    ]
    if grad:
        return samples
    _, arg = G.NATIVE.spmm_fwd(rp, col, w, x, "max", None, None, None)
    _, alpha, a_src, a_dst = G.NATIVE.gat_fwd(rp, col, h, s, d, 0.2, None, None, None, None)
    _, dinv = G.NATIVE.gcn_fwd(gcn_graph.rowptr, gcn_graph.col, None, x, eps, 1.0, None, None, None)
    g_out = torch.randn_like(x)
    return [
        *samples,
        ("spmm_bwd", (g_out, rp, col, w, x, arg, *tr, "max", [True, True])),
        ("spmm_bwd", (g_out, rp, col, None, x, arg[:0], *tr, "mean", [True, False])),
        ("gcn_bwd", (g_out, None, x, dinv, eps, *gcn_graph.transpose(), 1.0, [True, True])),
        ("sddmm_bwd", (torch.randn(nnz), rp, col, x, x, *tr, [True, True])),
        ("gat_bwd", (torch.randn_like(h), rp, col, h, s, d, alpha, a_src, a_dst, drop, *tr, 0.2)),
    ]


@pytest.mark.parametrize("grad", [False, True], ids=["no_grad", "grad"])
def test_opcheck(graph_inputs, grad):
    _, g = graph_inputs
    for name, args in _samples(g, grad):
        torch.library.opcheck(getattr(torch.ops.fastdl, name).default, args)


# ---------------------------------------------------------------- gradcheck (float64)


def test_gradcheck(graph_inputs):
    ei, g = graph_inputs
    gl = g.remove_self_loops()
    x = _t(N, 3, grad=True, dtype=torch.float64)
    w = (torch.rand(ei.shape[1], dtype=torch.float64) + 0.5).requires_grad_(True)
    for reduce in ("sum", "mean", "max", "min"):
        assert torch.autograd.gradcheck(lambda x, w, r=reduce: fastdl.spmm(g, x, w, r), (x, w))
    eps = torch.tensor([0.1], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, e: fastdl.gcn_aggregate(gl, x, eps=e), (x, eps))
    b = _t(N, 3, grad=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda a, b: fastdl.sddmm(g, a, b), (x, b))
    h = _t(N, 2, 3, grad=True, dtype=torch.float64)
    s, d = _t(2, 3, grad=True, dtype=torch.float64), _t(2, 3, grad=True, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda h, s, d: fastdl.gat_aggregate(g, h, s, d), (h, s, d))


# ---------------------------------------------------------------- compile, determinism, ISAs


def test_compile_fullgraph(graph_inputs):
    ei, g = graph_inputs
    gl = g.remove_self_loops()
    x, b = _t(N, 5, grad=True), _t(N, 5)
    h, s, d = _t(N, 2, 5, grad=True), _t(2, 5, grad=True), _t(2, 5)
    w = torch.rand(ei.shape[1])

    def fn(x, b, h, s, d, w):
        out = fastdl.spmm(g, x, w, "max") + fastdl.spmm(g, x, reduce="mean")
        out = out + fastdl.gcn_aggregate(gl, x, eps=0.5)
        y = fastdl.gat_aggregate(g, h, s, d)
        return out.sum() + y.sum() + fastdl.sddmm(g, x, b).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True)
    args = (x, b, h, s, d, w)
    expect, got = fn(*args), compiled(*args)
    assert torch.allclose(got, expect, rtol=1e-5)
    ge = torch.autograd.grad(expect, (x, h, s))
    gc = torch.autograd.grad(compiled(*args), (x, h, s))
    for a, c in zip(ge, gc, strict=True):
        assert torch.allclose(a, c, rtol=1e-5, atol=1e-6)


def test_bit_identical_repeats():
    n = 500
    ei = random_graph(n, 8000, skew=True, seed=12)
    g = Graph.from_edge_index(ei, n)
    x = _t(n, 40, grad=True)
    w = (torch.rand(ei.shape[1]) + 0.5).requires_grad_(True)
    h, s, d = _t(n, 2, 20, grad=True), _t(2, 20, grad=True), _t(2, 20, grad=True)

    def run():
        outs = []
        for reduce in ("sum", "max"):
            y = fastdl.spmm(g, x, w, reduce)
            outs += [y, *torch.autograd.grad(y, (x, w), torch.ones_like(y))]
        y = fastdl.gat_aggregate(g, h, s, d)
        outs += [y, *torch.autograd.grad(y, (h, s, d), torch.ones_like(y))]
        return outs

    first = run()
    for _ in range(3):
        for a, b in zip(first, run(), strict=True):
            assert torch.equal(a, b)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for a, b in zip(first, run(), strict=True):
            assert torch.equal(a, b)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    n = 40
    ei = random_graph(n, 300, seed=13)
    g = Graph.from_edge_index(ei, n)
    best = _ext._C.cpu_isa()
    try:
        fastdl.set_cpu_isa(isa)
        for dtype in (torch.float32, torch.bfloat16):
            x = torch.randn(n, 70).to(dtype)
            out = fastdl.spmm(g, x, reduce="sum")
            ref = spmm_ref(ei, n, x.double())
            assert (out.double() - ref).abs().max() <= 1e-2 * ref.abs().max()
        # GAT forward and backward: heads of an entry as one vector (1 and 4 heads), and more
        # heads than a vector's lanes (18).
        for heads, f in ((1, 16), (4, 7), (18, 8)):
            h = torch.randn(n, heads, f, dtype=torch.float64)
            s, d = torch.randn(1, heads, f), torch.randn(1, heads, f)
            compare(
                lambda h, s, d: fastdl.gat_aggregate(g, h, s, d),
                lambda h, s, d: gat_ref(ei, n, h, s, d),
                [leaf(h, torch.float32), leaf(s, torch.float32), leaf(d, torch.float32)],
                torch.randn(n, heads, f),
                torch.float32,
                f"gat {heads} heads",
            )
    finally:
        fastdl.set_cpu_isa(best)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_gather_windows(monkeypatch, isa, dtype):
    # The C++ sums in passes over windows of the gathered rows when those exceed a cache budget
    # (forced here to 3 passes over x's 600 x 24 elements): a hub row longer than a window
    # row (all in the first pass), isolated nodes, weights, mean, GCN's scalings and diagonal,
    # SDDMM's backward and the backward passes over the transpose, against float64 references.
    n, e = 600, 6000
    ei = random_graph(n, e, skew=True, seed=11)
    hub_in = torch.stack([torch.arange(300), torch.full((300,), 7)])  # a long CSR row
    hub_out = torch.stack([torch.full((300,), 9), torch.arange(300, 600)])  # a long transposed row
    ei = torch.cat([ei, hub_in, hub_out], 1)
    ei = ei[:, ei[1] != 5]  # node 5 isolated
    g = Graph.from_edge_index(ei, n)
    assert g.in_degree().max() > 256 and g.out_degree().max() > 256 and g.in_degree()[5] == 0
    x, y = torch.randn(n, 24, dtype=dtype), torch.randn(n, 24, dtype=dtype)
    w = torch.rand(ei.shape[1], dtype=dtype) + 0.5
    grad, edge_grad = torch.randn(n, 24), torch.randn(ei.shape[1])

    def run():
        outs = []
        for reduce, wt in (("sum", None), ("sum", w), ("mean", w)):
            inputs = [leaf(x, dtype), None if wt is None else leaf(wt, dtype)]
            compare(
                lambda a, b, r=reduce: fastdl.spmm(g, a, b, r),
                lambda a, b, r=reduce: spmm_ref(ei, n, a, b, r),
                inputs,
                grad,
                dtype,
                f"windowed spmm {reduce}",
            )
            out, grads = run_grads(lambda a, b, r=reduce: fastdl.spmm(g, a, b, r), inputs, grad)
            outs += [out, *grads]
        eps = torch.tensor([0.3], dtype=dtype, requires_grad=True)
        for fast, ref, inputs, g_out, what in (
            (
                lambda a, b: fastdl.gcn_aggregate(g, a, eps=b),
                lambda a, b: gcn_ref(ei, n, a, None, b, 1.0),
                [leaf(x, dtype), eps],
                grad,
                "windowed gcn",
            ),
            (
                lambda a, b: fastdl.sddmm(g, a, b),
                lambda a, b: sddmm_ref(ei, a, b),
                [leaf(x, dtype), leaf(y, dtype)],
                edge_grad,
                "windowed sddmm",
            ),
        ):
            compare(fast, ref, inputs, g_out, dtype, what)
            out, grads = run_grads(fast, inputs, g_out)
            outs += [out, *grads]
        return outs

    best = _ext._C.cpu_isa()
    try:
        fastdl.set_cpu_isa(isa)
        monkeypatch.setenv("FASTDL_GATHER_WINDOW_KB", str(20 * x.element_size() // 4))
        windowed = run()
        assert all(torch.equal(a, b) for a, b in zip(windowed, run(), strict=True))  # deterministic
        monkeypatch.delenv("FASTDL_GATHER_WINDOW_KB")
        # One pass sums in another order: the windows were in force above.
        assert not all(torch.equal(a, b) for a, b in zip(windowed, run(), strict=True))
        # Fewer rows to gather from than windows (3 rows of 4096 features, 6 windows' worth):
        # a pass per row.
        monkeypatch.setenv("FASTDL_GATHER_WINDOW_KB", str(8 * x.element_size() // 4))
        ew = torch.tensor([[0, 1, 2] * 4 + [1], [0] * 3 + [1] * 3 + [2] * 7])
        gw = Graph.from_edge_index(ew, 3)
        xw = torch.randn(3, 4096, dtype=dtype)
        close(fastdl.spmm(gw, xw), spmm_ref(ew, 3, xw.double()), dtype, "3 windows")
    finally:
        fastdl.set_cpu_isa(best)


# ---------------------------------------------------------------- the Graph object


def test_graph_structure(graph_inputs):
    ei, g = graph_inputs
    assert g.num_nodes == N and g.num_edges == ei.shape[1]
    assert torch.equal(g.in_degree(), torch.bincount(ei[1], minlength=N))
    assert torch.equal(g.out_degree(), torch.bincount(ei[0], minlength=N))
    t_rowptr, t_col, t_perm = g.transpose()
    assert g.transpose()[0] is t_rowptr  # cached
    assert torch.equal(t_rowptr[1:] - t_rowptr[:-1], g.out_degree())
    assert torch.equal(g.dst()[t_perm], t_col) and torch.equal(
        g.col[t_perm].sort().values, g.col[t_perm]
    )
    loops = g.remove_self_loops()
    assert loops.num_edges == ei.shape[1] - N
    back = loops.add_self_loops()
    assert back.num_edges == ei.shape[1]
    assert bool((back.col[back.rowptr[1:] - 1] == torch.arange(N)).all())
    wg = Graph.from_edge_index(ei, N, torch.ones(ei.shape[1]))
    coef = wg.gcn_norm()
    assert coef.shape == (ei.shape[1],) and bool((coef > 0).all())


def test_empty_and_isolated():
    g = Graph.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 4)
    x = _t(4, 3, grad=True)
    for reduce in ("sum", "mean", "max", "min"):
        out = fastdl.spmm(g, x, reduce=reduce)
        assert torch.equal(out, torch.zeros(4, 3))
        (gx,) = torch.autograd.grad(out.sum(), x)
        assert torch.equal(gx, torch.zeros(4, 3))
    assert torch.equal(fastdl.gcn_aggregate(g, x), x)  # only the self loops: D = I
    assert fastdl.sddmm(g, x, x).shape == (0,)
    none = Graph.from_edge_index(torch.zeros(2, 0, dtype=torch.long), 0)
    assert fastdl.spmm(none, torch.zeros(0, 3)).shape == (0, 3)


# ---------------------------------------------------------------- bad input


def test_bad_edge_index():
    with pytest.raises(IndexError, match=r"index 7 out of range for num_nodes=5"):
        Graph.from_edge_index(torch.tensor([[0, 7], [1, 2]]), 5)
    with pytest.raises(IndexError, match=r"index -1 out of range"):
        Graph.from_edge_index(torch.tensor([[0, 1], [-1, 2]]), 5)
    with pytest.raises(
        TypeError, match=r"edge_index must be an integer tensor .* got torch.float32"
    ):
        Graph.from_edge_index(torch.tensor([[0.0, 1.0], [1.0, 2.0]]), 5)
    with pytest.raises(ValueError, match=r"edge_index must have shape \(2, E\), got \[3, 2\]"):
        Graph.from_edge_index(torch.zeros(3, 2, dtype=torch.long), 5)
    with pytest.raises(ValueError, match=r"edge_weight must have shape \(2,\)"):
        Graph.from_edge_index(torch.tensor([[0, 1], [1, 2]]), 5, torch.ones(3))
    # num_nodes is an int: neither None nor a float to truncate (5.7 would give 5 nodes).
    ei = torch.tensor([[0, 1], [1, 2]])
    for bad, name in ((None, "NoneType"), (5.7, "float"), (True, "bool")):
        with pytest.raises(
            TypeError, match=rf"from_edge_index: num_nodes must be an int, got {name}"
        ):
            Graph.from_edge_index(ei, bad)
    with pytest.raises(ValueError, match=r"num_nodes must be >= 0, got -1"):
        Graph.from_edge_index(ei[:, :0], -1)
    assert Graph.from_edge_index(ei, torch.tensor(3)).num_nodes == 3


def test_bad_csr():
    col = torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match=r"rowptr\[0\] must be 0, got 1"):
        Graph.from_csr(torch.tensor([1, 2, 3, 3]), col)
    with pytest.raises(ValueError, match=r"rowptr decreases"):
        Graph.from_csr(torch.tensor([0, 2, 1, 3]), col)
    with pytest.raises(ValueError, match=r"must end at the number of entries 3, got 2"):
        Graph.from_csr(torch.tensor([0, 1, 2, 2]), col)
    with pytest.raises(IndexError, match=r"col index 5 out of range"):
        Graph.from_csr(torch.tensor([0, 1, 2, 3]), torch.tensor([0, 5, 1]))
    empty = torch.zeros(0, dtype=torch.long)
    with pytest.raises(ValueError, match=r"from_csr: malformed CSR: rowptr is empty"):
        Graph.from_csr(empty, empty)
    with pytest.raises(TypeError, match=r"from_csr: num_nodes must be an int, got float"):
        Graph.from_csr(torch.tensor([0, 1, 2, 3]), col, 3.0)
    with pytest.raises(TypeError, match=r"from_csr: rowptr must be a tensor, got list"):
        Graph.from_csr([0, 1, 2, 3], col)
    with pytest.raises(TypeError, match=r"from_csr: col must be a tensor, got list"):
        Graph.from_csr(torch.tensor([0, 1, 2, 3]), [0, 1, 2])
    # The raw ops check a CSR themselves, before any kernel reads memory.
    x = torch.randn(3, 4)
    op = torch.ops.fastdl.spmm_fwd
    cases = [
        (torch.tensor([1, 2, 3, 3]), col, r"rowptr\[0\] must be 0"),
        (torch.tensor([0, 2, 1, 3]), col, r"rowptr decreases at row 1"),
        (torch.tensor([0, 1, 2, 4]), col, r"must end at the number of entries 3, got 4"),
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0, 3, 1]), r"index out of range.*\[0, 3\)"),
        (torch.tensor([0, 1, 2, 3]), torch.tensor([0, -9, 1]), r"index out of range"),
    ]
    for rowptr, c, msg in cases:
        with pytest.raises(RuntimeError, match=msg):
            op(rowptr, c, None, x, "sum", None, None, None)
    with pytest.raises(TypeError, match=r"rowptr must be an int64 index tensor, got Float"):
        op(torch.tensor([0.0, 1.0]), torch.tensor([0]), None, x, "sum", None, None, None)
    rp, c = torch.tensor([0, 1, 2, 3]), torch.tensor([0, 1, 2])
    bad_perm = torch.tensor([0, 9, 1])
    with pytest.raises(RuntimeError, match=r"perm entry in \[0, nnz\)"):
        torch.ops.fastdl.spmm_bwd(
            x,
            rp,
            c,
            None,
            x,
            x.new_empty(0, dtype=torch.long),
            rp,
            c,
            bad_perm,
            "sum",
            [True, False],
        )


def test_raw_ops_refuse_wrong_shapes(backend):
    """The raw backward ops are callable directly: what they are given must have the shapes
    their kernels index (Triton's sddmm read b with a's width, its backward crashed)."""
    ops, dev = backend.ops(G), backend.device
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    rp, col = g.rowptr.to(dev), g.col.to(dev)
    t = [x.to(dev) for x in g.transpose()]

    def r(*shape):
        return torch.randn(*shape, device=dev)

    a, no_arg = r(2, 3), torch.empty(0, 0, dtype=torch.long, device=dev)
    calls = [
        lambda: ops.sddmm_fwd(rp, col, a, r(2, 5), None, None, None),
        lambda: ops.sddmm_fwd(rp, col, a, r(1, 3), None, None, None),
        lambda: ops.sddmm_bwd(r(2), rp, col, a, r(2, 5), *t, [True, True]),
        lambda: ops.spmm_bwd(r(1, 2), rp, col, None, a, no_arg, *t, "sum", [True, True]),
        lambda: ops.gcn_bwd(r(1, 3), None, a, r(2), None, *t, 1.0, [True, True]),
        lambda: ops.gat_bwd(
            r(2, 1, 4), rp, col, r(2, 1, 3), r(1, 3), r(1, 3), r(2, 1), r(2, 1), r(2, 1), None,
            *t, 0.2,
        ),
    ]  # fmt: skip
    shape = r"(must have( the)? shape|same number of features|rows but the graph has)"
    for call in calls:
        with pytest.raises(RuntimeError, match=shape):
            call()


def test_bad_op_arguments(graph_inputs):
    ei, g = graph_inputs
    x = torch.randn(N, 4)
    with pytest.raises(ValueError, match=r"reduce must be one of .* got 'median'"):
        fastdl.spmm(g, x, reduce="median")
    with pytest.raises(RuntimeError, match=r"reduce must be one of sum, mean, max, min, got 'mul'"):
        torch.ops.fastdl.spmm_fwd(g.rowptr, g.col, None, x, "mul", None, None, None)
    with pytest.raises(
        RuntimeError, match=rf"x must have num_nodes={N} rows, got shape \[{N - 1}, 4\]"
    ):
        fastdl.spmm(g, x[:-1])
    with pytest.raises(ValueError, match=rf"edge_weight must have shape \({ei.shape[1]},\)"):
        fastdl.spmm(g, x, torch.ones(3))
    with pytest.raises(TypeError, match=r"edge_weight must be a floating-point tensor"):
        fastdl.spmm(g, x, torch.ones(ei.shape[1], dtype=torch.long))
    with pytest.raises(RuntimeError, match=r"x is on meta but the graph is on cpu"):
        fastdl.spmm(g, x.to("meta"))
    with pytest.raises(RuntimeError, match=r"edge_weight is on meta but the graph is on cpu"):
        fastdl.spmm(g, x, torch.ones(ei.shape[1], device="meta"))
    with pytest.raises(
        TypeError, match=r"x has dtype Long; supported dtypes: Float, Double, BFloat16"
    ):
        torch.ops.fastdl.spmm_fwd(g.rowptr, g.col, None, x.long(), "sum", None, None, None)
    with pytest.raises(TypeError, match=r"graph must be a fastdl.Graph"):
        fastdl.spmm(ei, x)
    with pytest.raises(ValueError, match=r"dropout must lie in \[0, 1\], got 1.5"):
        fastdl.gat_aggregate(
            g, torch.randn(N, 2, 3), torch.randn(2, 3), torch.randn(2, 3), 0.2, 1.5
        )
    h, att = torch.randn(N, 2, 3), torch.randn(2, 3)
    with pytest.raises(RuntimeError, match=r"att_src must have shape \(heads, F\) = \(2, 3\)"):
        fastdl.gat_aggregate(g, h, torch.randn(3, 3), att)
    # The same element count in another shape is refused, not reinterpreted as (heads, F).
    for shape in ((3, 2), (6,), (2, 1, 3), (1, 1, 6)):
        got = re.escape(str(list(shape)))
        with pytest.raises(
            RuntimeError, match=rf"att_dst must have shape .* or \(1, 2, 3\), got {got}"
        ):
            fastdl.gat_aggregate(g, h, att, torch.randn(shape))
    with pytest.raises(TypeError, match=r"gat_aggregate: att_src must be a tensor, got list"):
        fastdl.gat_aggregate(g, h, att.tolist(), att)
    with pytest.raises(TypeError, match=r"gcn_aggregate: eps must be a float or a one-element"):
        fastdl.gcn_aggregate(g, x, eps=[0.1])
    with pytest.raises(RuntimeError, match=r"a and b must both be \(num_nodes, F\)"):
        fastdl.sddmm(g, x, torch.randn(N, 5))
    w = torch.ones(g.num_edges, requires_grad=True)
    with pytest.raises(RuntimeError, match=r"edge_weight takes no gradient"):
        fastdl.gcn_aggregate(g, x, w)
    with pytest.raises(RuntimeError, match=r"eps must have one element"):
        fastdl.gcn_aggregate(g, x, eps=torch.ones(2))
