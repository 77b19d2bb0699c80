"""Graph family ops against float64 references, forward and backward, on every dtype: spmm (all
reduces), gcn_aggregate, gat_aggregate, sddmm; odd feature counts, empty graphs, isolated
nodes, unsorted edge lists, non-contiguous inputs, and a small hand-computed table. Every test
runs on every backend (Triton through the interpreter on small graphs)."""

import warnings

import pytest
import torch
from conftest import backend_of, cases
from graph_ref import (
    close,
    compare,
    gat_ref,
    gcn_ref,
    leaf,
    random_graph,
    sddmm_ref,
    spmm_ref,
)

import fastdl
from fastdl import Graph


@pytest.fixture(autouse=True)
def _on_backend_device(request):
    """The tests make their tensors with bare factories: on a GPU backend those land on the
    GPU (torch's default device for the test)."""
    b = backend_of(request)
    if b is None or b.device == "cpu":
        yield
        return
    with torch.device(b.device):
        yield


# (nodes, edges, feature shape): empty graph, isolated nodes, odd widths, a wide tile, 2-D features.
SHAPES = [(5, 0, (3,)), (40, 200, (64,)), (33, 150, (37,)), (9, 40, (2, 5)), (20, 90, (150,))]
SMALL = [(5, 0, (3,)), (9, 40, (2, 5)), (12, 50, (37,))]
REDUCES = ["sum", "mean", "max", "min"]


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases(
        [(r, w, *s) for r in REDUCES for w in (0, 1) for s in SHAPES],
        [("sum", 0, *SMALL[0])] + [(r, w, *SMALL[1 + w]) for r in REDUCES for w in (0, 1)],
    ),
    indirect=["backend"],
)
def test_spmm(backend, dtype, case):
    reduce, weighted, n, e, f = case
    ei = random_graph(n, e)
    g = Graph.from_edge_index(ei, n)
    x = leaf(torch.randn(n, *f), dtype)
    w = leaf(torch.rand(e) + 0.5, dtype) if weighted else None
    grad = torch.randn(n, *f)
    if reduce in ("max", "min") and dtype != torch.float32 and dtype != torch.float64:
        # bfloat16/float16 ties make the max's edge ambiguous: values only (the gradient routing is
        # covered in float32/float64).
        out = fastdl.spmm(g, x, w, reduce)
        ref = spmm_ref(
            ei, n, x.detach().double(), None if w is None else w.detach().double(), reduce
        )
        close(out, ref, dtype, "spmm max bf16")
        return
    compare(
        lambda x, w: fastdl.spmm(g, x, w, reduce),
        lambda x, w: spmm_ref(ei, n, x, w, reduce),
        [x, w],
        grad,
        dtype,
        f"spmm {reduce}",
    )


def test_spmm_hand_computed(backend):
    # 0 -> 2 (w 2), 1 -> 2 (w 3), 2 -> 0 (w 1); node 1 has no incoming edge.
    g = Graph.from_edge_index(torch.tensor([[0, 1, 2], [2, 2, 0]]), 3)
    x = torch.tensor([[1.0, -4.0], [2.0, 5.0], [3.0, 6.0]])
    w = torch.tensor([2.0, 3.0, 1.0])
    expect = {
        "sum": [[3, 6], [0, 0], [8, 7]],
        "mean": [[3, 6], [0, 0], [4, 3.5]],
        "max": [[3, 6], [0, 0], [6, 15]],
        "min": [[3, 6], [0, 0], [2, -8]],
    }
    for reduce, table in expect.items():
        assert torch.equal(fastdl.spmm(g, x, w, reduce), torch.tensor(table)), reduce


def test_spmm_max_min_nan_wins(backend):
    """NaN wins max and min, as torch's amax/amin: the row's first NaN entry, which takes the
    gradient (Triton's tl.max dropped it: 5 for [1, nan, 5], 0 for a row of NaN only)."""
    # node 0 gathers 0, 1, 2 in that order; node 1 gathers 3 and 4 (no NaN)
    g = Graph.from_edge_index(torch.tensor([[0, 1, 2, 3, 4], [0, 0, 0, 1, 1]]), 5)
    nan = float("nan")
    for col0, first in (([1.0, nan, 5.0], 1), ([nan, 1.0, nan], 0), ([nan, nan, nan], 0)):
        x = torch.tensor([[c, 2.0] for c in col0] + [[3.0, 4.0], [-1.0, 7.0]], requires_grad=True)
        for reduce in ("max", "min"):
            out = fastdl.spmm(g, x, reduce=reduce)
            assert out[0, 0].isnan(), (col0, reduce)
            best = {"max": [[2.0], [3.0, 7.0]], "min": [[2.0], [-1.0, 4.0]]}[reduce]
            assert out[0, 1] == best[0][0] and out[1].tolist() == best[1], (col0, reduce)
            (grad,) = torch.autograd.grad(out[:, 0], x, torch.ones(5))
            assert grad[:3, 0].tolist() == [float(i == first) for i in range(3)], (col0, reduce)


def test_spmm_bfloat16_rounds_to_nearest(backend):
    """bfloat16 sums within half an ulp (2^-8 relative, plus the float32 sum's error) of the
    exact sum: rounded, not truncated (Triton's interpreted cast truncated: 40% of the outputs
    one ulp low, up to 2^-7)."""
    n = 50
    ei = random_graph(n, 300, seed=7)
    x = torch.randn(n, 32).bfloat16()
    exact = spmm_ref(ei, n, x.double())
    out = fastdl.spmm(Graph.from_edge_index(ei, n), x).double()
    assert ((out - exact).abs() <= exact.abs() * 2**-8 * 1.01 + 1e-6).all()


def test_spmm_weight_from_graph_and_unsorted_order(backend):
    n, e = 30, 120
    ei = random_graph(n, e, seed=3)
    w = torch.rand(e)
    x = torch.randn(n, 8)
    ref = spmm_ref(ei, n, x.double(), w.double())
    close(fastdl.spmm(Graph.from_edge_index(ei, n, w), x), ref, torch.float32, "graph weights")
    sorted_ei = ei[:, torch.argsort(ei[1], stable=True)]
    g_sorted = Graph.from_edge_index(sorted_ei, n)
    assert g_sorted.perm is None
    close(fastdl.spmm(g_sorted, x), spmm_ref(ei, n, x.double()), torch.float32, "sorted")
    i32 = Graph.from_edge_index(ei.int(), n)
    assert torch.equal(fastdl.spmm(i32, x, w), fastdl.spmm(Graph.from_edge_index(ei, n), x, w))


def test_spmm_non_contiguous(backend):
    n, e = 25, 100
    ei = random_graph(n, e, seed=4)
    g = Graph.from_edge_index(ei, n)
    x = torch.randn(16, n).t()  # (n, 16), transposed strides
    w = torch.rand(2 * e)[::2]
    assert not x.is_contiguous() and not w.is_contiguous()
    out = fastdl.spmm(g, x, w, "mean")
    close(out, spmm_ref(ei, n, x.double(), w.double(), "mean"), torch.float32, "non-contiguous")


GCN = ["plain", "weighted", "eps", "improved"]


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases([(v, *s) for v in GCN for s in SHAPES[:4]], [(v, *s) for v in GCN for s in SMALL[:2]]),
    indirect=["backend"],
)
def test_gcn_aggregate(backend, dtype, case):
    variant, n, e, f = case
    ei = random_graph(n, e, self_loops=False)
    g = Graph.from_edge_index(ei, n)
    x = leaf(torch.randn(n, *f), dtype)
    grad = torch.randn(n, *f)
    w = (torch.rand(e) + 0.5).to(dtype) if variant == "weighted" else None
    eps_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    eps = torch.tensor([0.3], dtype=eps_dtype, requires_grad=True) if variant == "eps" else None
    fill = 2.0 if variant == "improved" else 1.0

    def fast(x, eps):
        return fastdl.gcn_aggregate(g, x, w, eps=eps, improved=fill == 2.0)

    def ref(x, eps):
        wr = None if w is None else w.double()
        return gcn_ref(ei, n, x.reshape(n, -1), wr, eps, fill).reshape(x.shape)

    compare(fast, ref, [x, eps], grad, dtype, f"gcn {variant}")


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases(
        # (4, 16): heads share a vector tile (one gather of whole rows); 18 heads: more than
        # one chunk of the C++ kernels' per-head softmax state.
        [
            (6, 0, 1, 16),
            (30, 150, 1, 16),
            (30, 150, 4, 7),
            (30, 150, 2, 64),
            (30, 150, 4, 16),
            (12, 40, 18, 8),
        ],
        [(6, 0, 1, 16), (10, 40, 3, 7)],
    ),
    indirect=["backend"],
)
def test_gat_aggregate(backend, dtype, case):
    nodes, edges, heads, f = case
    ei = random_graph(nodes, edges, seed=5)
    loops = torch.arange(nodes).expand(2, nodes)
    ei = torch.cat([ei, loops], 1)
    g = Graph.from_edge_index(ei, nodes)
    h = leaf(torch.randn(nodes, heads, f), dtype)
    att_src = leaf(torch.randn(1, heads, f) * 0.5, dtype)
    att_dst = leaf(torch.randn(1, heads, f) * 0.5, dtype)
    grad = torch.randn(nodes, heads, f)
    compare(
        lambda h, s, d: fastdl.gat_aggregate(g, h, s, d, 0.2),
        lambda h, s, d: gat_ref(ei, nodes, h, s, d, 0.2),
        [h, att_src, att_dst],
        grad,
        dtype,
        "gat",
    )


def test_gat_no_heads(backend):
    g = Graph.from_edge_index(torch.tensor([[0, 1], [1, 0]]), 2)
    h = torch.randn(2, 0, 3, requires_grad=True)
    att = torch.randn(0, 3)
    out = fastdl.gat_aggregate(g, h, att, att)
    assert out.shape == (2, 0, 3)
    (grad,) = torch.autograd.grad(out.sum(), h)
    assert grad.shape == h.shape


def test_gat_isolated_node_and_dropout(backend):
    ei = torch.tensor([[0, 1, 1], [1, 0, 1]])  # node 2 has no incoming edge
    g = Graph.from_edge_index(ei, 3)
    h = torch.randn(3, 2, 4)
    s, d = torch.randn(2, 4), torch.randn(2, 4)
    out = fastdl.gat_aggregate(g, h, s, d)
    assert torch.equal(out[2], torch.zeros(2, 4))
    assert torch.equal(fastdl.gat_aggregate(g, h, s, d, dropout=1.0), torch.zeros(3, 2, 4))
    assert torch.equal(fastdl.gat_aggregate(g, h, s, d, dropout=0.5, training=False), out)
    torch.manual_seed(1)
    a = fastdl.gat_aggregate(g, h, s, d, dropout=0.5)
    torch.manual_seed(1)
    assert torch.equal(a, fastdl.gat_aggregate(g, h, s, d, dropout=0.5))


def test_gat_dropout_gradient():  # float64: the C++ backend
    # With a fixed seed the dropped attention weights are the same in both calls, so the
    # gradient of the dropped forward matches finite differences in float64.
    ei = torch.cat([random_graph(8, 30, seed=6), torch.arange(8).expand(2, 8)], 1)
    g = Graph.from_edge_index(ei, 8)
    h = torch.randn(8, 2, 3, dtype=torch.float64, requires_grad=True)
    s = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    d = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)

    def fn(h, s, d):
        torch.manual_seed(7)
        return fastdl.gat_aggregate(g, h, s, d, dropout=0.4)

    assert torch.autograd.gradcheck(fn, (h, s, d))


@pytest.mark.parametrize("backend,dtype,case", cases(SHAPES[:4], SMALL), indirect=["backend"])
def test_sddmm(backend, dtype, case):
    n, e, f = case
    ei = random_graph(n, e, seed=8)
    g = Graph.from_edge_index(ei, n)
    a, b = leaf(torch.randn(n, *f), dtype), leaf(torch.randn(n, *f), dtype)
    if a.dim() != 2:
        a, b = (leaf(t.detach().reshape(n, -1), dtype) for t in (a, b))
    compare(
        lambda a, b: fastdl.sddmm(g, a, b),
        lambda a, b: sddmm_ref(ei, a, b),
        [a, b],
        torch.randn(e),
        dtype,
        "sddmm",
    )


def test_power_law_graph(backend):
    n, e = (300, 6000) if not backend.interpreted else (60, 600)
    ei = random_graph(n, e, skew=True, seed=9)
    g = Graph.from_edge_index(ei, n)
    assert g.in_degree().max() > 10 * g.in_degree().float().mean()
    x = torch.randn(n, 24)
    for reduce in ("sum", "max"):
        ref = spmm_ref(ei, n, x.double(), reduce=reduce)
        close(fastdl.spmm(g, x, reduce=reduce), ref, torch.float32, reduce)


# ---------------------------------------------------------------- Graph under torch.compile


def test_self_loops_to_sink_matches_removal():
    # Nodes 0..n-1 of the sink graph aggregate what the graph without (with) self loops gives;
    # per-edge weights in edge_index order still reach their edges through perm.
    n, e = 20, 90
    ei = torch.cat([random_graph(n, e, seed=12), torch.tensor([[4, 4, 7], [4, 4, 7]])], 1)
    g = Graph.from_edge_index(ei, n)
    x = torch.randn(n, 5, dtype=torch.float64)
    x_sink = torch.cat([x, torch.zeros(1, 5, dtype=torch.float64)])
    w = torch.rand(ei.shape[1], dtype=torch.float64)
    sink = g.self_loops_to_sink()
    assert sink.num_nodes == n + 1 and sink.num_edges == g.num_edges
    assert torch.equal(fastdl.spmm(sink, x_sink, w)[:n], fastdl.spmm(g.without_self_loops(), x, w))
    with_loops = g.self_loops_to_sink(add_self_loops=True)
    assert with_loops.num_edges == g.num_edges + n + 1
    assert torch.equal(fastdl.spmm(with_loops, x_sink)[:n], fastdl.spmm(g.with_self_loops(), x))


def test_from_edge_index_compiles():
    # No host read while tracing (fullgraph): the same CSR as eager, unsorted or not, and an
    # out-of-range index still raises, from inside the compiled graph.
    n = 15

    def csr(ei):
        g = Graph.from_edge_index(ei, n).self_loops_to_sink(add_self_loops=True)
        return g.rowptr, g.col

    build = torch.compile(csr, fullgraph=True)
    for ei in (random_graph(n, 60, seed=13), random_graph(n, 60, sorted_=True, seed=14)):
        for got, want in zip(build(ei), csr(ei), strict=True):
            assert torch.equal(got, want)
    bad = random_graph(n, 60, seed=13)
    bad[1, 3] = n
    with pytest.raises(RuntimeError, match="edge_index index out of range for num_nodes=15"):
        build(bad)


def test_transposed_sorted_edge_index_builds_without_warning():
    # (E, 2) pairs transposed (PyG style): sorted rows are a non-contiguous view, which
    # torch.searchsorted warns about unless given a contiguous copy.
    pairs = torch.tensor([[0, 1], [0, 2], [1, 2]])  # both columns sorted: no sort is needed
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        graph = fastdl.Graph.from_edge_index(pairs.t(), 3)
    assert graph.num_nodes == 3
    x = torch.randn(3, 4, dtype=torch.float64)
    want = torch.zeros_like(x).index_add_(0, pairs[:, 1], x[pairs[:, 0]])
    torch.testing.assert_close(fastdl.spmm(graph, x), want)


def test_gcn_aggregate_self_loops_count_as_edges():
    # A loop already in the graph is an edge of A, added to the diagonal f I (gcn_ref); PyG's
    # normalization (loops replaced) is the same op on graph.without_self_loops().
    edge_index = torch.tensor([[0, 1, 2, 1], [1, 2, 0, 1]])
    graph = Graph.from_edge_index(edge_index, 3)
    x = torch.randn(3, 4, dtype=torch.float64)
    torch.testing.assert_close(fastdl.gcn_aggregate(graph, x), gcn_ref(edge_index, 3, x))
    clean = graph.without_self_loops()
    assert clean.without_self_loops() is clean
    loops = torch.arange(3)
    src = torch.cat([edge_index[0, :3], loops])
    dst = torch.cat([edge_index[1, :3], loops])
    deg = torch.zeros(3, dtype=torch.float64).index_add_(0, dst, torch.ones(6, dtype=torch.float64))
    coef = (deg[src] * deg[dst]).rsqrt()
    want = torch.zeros_like(x).index_add_(0, dst, x[src] * coef[:, None])
    torch.testing.assert_close(fastdl.gcn_aggregate(clean, x), want)
