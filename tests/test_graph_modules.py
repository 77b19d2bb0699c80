"""fastdl.nn graph layers: against float64 references built from graph_ref, state_dict
compatibility with torch_geometric, and against torch_geometric's layers with copied weights
(forward and backward) when it is installed."""

import importlib.util

import pytest
import torch
from graph_ref import gat_ref, gcn_ref, random_graph, spmm_ref

import fastdl
from fastdl import Graph

HAS_PYG = importlib.util.find_spec("torch_geometric") is not None
N, E = 30, 160


def _edge_index(self_loops=True):
    return random_graph(N, E, self_loops=self_loops, seed=21)


def _no_loops(ei):
    return ei[:, ei[0] != ei[1]]


def _with_loops(ei):
    ei = _no_loops(ei)
    return torch.cat([ei, torch.arange(N).expand(2, N)], 1)


def test_gcn_conv_reference():
    ei = _edge_index()
    layer = fastdl.nn.GCNConv(8, 5).double()
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(N, 8, dtype=torch.float64)
    out = layer(x, ei)
    ref = gcn_ref(_no_loops(ei), N, x @ layer.lin.weight.t()) + layer.bias
    assert torch.allclose(out, ref)
    assert torch.equal(layer(x, Graph.from_edge_index(ei, N)), out)
    improved = fastdl.nn.GCNConv(8, 5, improved=True).double()
    ref = gcn_ref(_no_loops(ei), N, x @ improved.lin.weight.t(), fill=2.0)
    assert torch.allclose(improved(x, ei), ref)


def test_gat_conv_reference():
    ei = _edge_index()
    for concat in (True, False):
        layer = fastdl.nn.GATConv(8, 3, heads=2, concat=concat).double()
        x = torch.randn(N, 8, dtype=torch.float64)
        h = (x @ layer.lin.weight.t()).view(N, 2, 3)
        ref = gat_ref(_with_loops(ei), N, h, layer.att_src, layer.att_dst)
        ref = ref.reshape(N, 6) if concat else ref.mean(1)
        assert torch.allclose(layer(x, ei), ref)


def test_bias_in_place_grad_compile_and_promotion():
    # GCNConv/GATConv add their bias in place on the aggregation's output: gradients to every
    # parameter and the input as with a fresh sum, the same under torch.compile(fullgraph), and
    # a float32 bias on a bfloat16 output still promotes the result to float32.
    g = Graph.from_edge_index(_edge_index(), N)
    for layer in (fastdl.nn.GCNConv(8, 5), fastdl.nn.GATConv(8, 3, heads=2)):
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(N, 8, requires_grad=True)
        out = layer(x, g)
        params = [x, *layer.parameters()]
        grads = torch.autograd.grad(out.square().sum(), params)
        layer.bias.data.zero_()
        plain = layer(x, g).detach()
        torch.nn.init.normal_(layer.bias, generator=torch.Generator().manual_seed(0))
        assert torch.allclose(layer(x, g), plain + layer.bias, atol=1e-6)
        compiled = torch.compile(lambda x, layer=layer: layer(x, g), fullgraph=True)
        out_c = compiled(x)
        assert torch.allclose(out_c, layer(x, g), atol=1e-5)
        grads_c = torch.autograd.grad(out_c.square().sum(), params)
        grads_e = torch.autograd.grad(layer(x, g).square().sum(), params)
        for a, b in zip(grads_c, grads_e, strict=True):
            assert torch.allclose(a, b, atol=1e-4)
        assert all(gr is not None and gr.abs().sum() > 0 for gr in grads)
        xb = torch.randn(N, 8).bfloat16()
        assert layer.bfloat16()(xb, g).dtype == torch.bfloat16
        layer.lin.bfloat16()
        layer.bias.data = layer.bias.data.float()
        assert layer(xb, g).dtype == torch.float32


def _compiled(layer, g):
    return torch.compile(lambda x: layer(x, g), fullgraph=True)


def test_compile_with_an_unused_graph():
    # A prebuilt Graph never used outside torch.compile: its self-loop replacement and transpose
    # are traced too (no data-dependent branch), with eager's results and gradients.
    ei = _edge_index()  # unsorted, with self loops
    for layer in (fastdl.nn.GCNConv(8, 5), fastdl.nn.GATConv(8, 3, heads=2)):
        layer = layer.double()
        torch.nn.init.normal_(layer.bias)
        x = torch.randn(N, 8, dtype=torch.float64, requires_grad=True)
        params = [x, *layer.parameters()]
        out = _compiled(layer, Graph.from_edge_index(ei, N))(x)
        want = layer(x, ei)
        torch.testing.assert_close(out, want)
        grads = torch.autograd.grad(out.square().sum(), params)
        for got, ref in zip(grads, torch.autograd.grad(want.square().sum(), params), strict=True):
            torch.testing.assert_close(got, ref)


def test_gcn_cached_keeps_the_first_call():
    # As PyG's cached normalization: the first call's graph and edge weights serve every later
    # call, whatever edge_index and edge_weight it passes.
    ei = _no_loops(_edge_index())
    layer = fastdl.nn.GCNConv(8, 5, cached=True).double()
    x = torch.randn(N, 8, dtype=torch.float64)
    w = torch.rand(ei.shape[1], dtype=torch.float64)
    first = layer(x, ei, w)
    assert torch.allclose(first, gcn_ref(ei, N, x @ layer.lin.weight.t(), w) + layer.bias)
    assert torch.equal(layer(x, ei, w.flip(0)), first)
    assert torch.equal(layer(x, ei.flip(1)), first)
    layer.reset_parameters()  # clears the cache, as PyG's
    assert torch.allclose(layer(x, ei), gcn_ref(ei, N, x @ layer.lin.weight.t()))


def test_sage_and_gin_reference():
    ei = _edge_index()
    x = torch.randn(N, 6, dtype=torch.float64, requires_grad=True)
    sage = fastdl.nn.SAGEConv(6, 4).double()
    ref = sage.lin_l(spmm_ref(ei, N, x, reduce="mean")) + sage.lin_r(x)
    assert torch.allclose(sage(x, ei), ref)
    mlp = torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.ReLU()).double()
    gin = fastdl.nn.GINConv(mlp, eps=0.25, train_eps=True).double()
    out = gin(x, ei)
    assert torch.allclose(out, mlp(spmm_ref(ei, N, x) + 1.25 * x))
    (g_eps,) = torch.autograd.grad(out.sum(), gin.eps)
    assert g_eps.shape == (1,) and torch.isfinite(g_eps).all()
    assert "eps" in dict(gin.named_parameters())
    assert "eps" in dict(fastdl.nn.GINConv(mlp).named_buffers())


def test_training_step_decreases_loss():
    ei = _edge_index()
    x, y = torch.randn(N, 8), torch.randn(N, 4)
    model = torch.nn.ModuleList([fastdl.nn.GATConv(8, 4, heads=2), fastdl.nn.GCNConv(8, 4)])
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    g = Graph.from_edge_index(ei, N)
    losses = []
    for _ in range(5):
        loss = (model[0](x, g) - y.repeat(1, 2)).square().mean() + (
            model[1](x, g) - y
        ).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert all(p.grad is not None for p in model.parameters())


# ---------------------------------------------------------------- torch_geometric


def _pyg_pairs():
    import torch_geometric.nn as pyg

    mlp = torch.nn.Sequential(torch.nn.Linear(8, 5), torch.nn.ReLU(), torch.nn.Linear(5, 5))
    return [
        ("gcn", pyg.GCNConv(8, 5), fastdl.nn.GCNConv(8, 5)),
        # (improved=True is left out: PyG 2.8 drops its fill value 2 on unweighted graphs, since
        # add_remaining_self_loops ignores fill_value without edge weights; ours follows the
        # documented A + 2I, checked against graph_ref above.)
        ("gat_concat", pyg.GATConv(8, 3, heads=4), fastdl.nn.GATConv(8, 3, heads=4)),
        (
            "gat_mean",
            pyg.GATConv(8, 3, heads=2, concat=False),
            fastdl.nn.GATConv(8, 3, heads=2, concat=False),
        ),
        ("sage", pyg.SAGEConv(8, 5), fastdl.nn.SAGEConv(8, 5)),
        ("gin", pyg.GINConv(mlp, train_eps=True), fastdl.nn.GINConv(mlp, train_eps=True)),
    ]


@pytest.mark.skipif(not HAS_PYG, reason="the comparison with torch_geometric needs it installed")
def test_against_torch_geometric():
    ei = _no_loops(_edge_index())  # PyG keeps existing self loops' weights; none here
    for name, ref, fast in _pyg_pairs():
        for p in ref.parameters():
            torch.nn.init.normal_(p, std=0.3)
        fast.load_state_dict(ref.state_dict())
        ref, fast = ref.double(), fast.double()
        x = torch.randn(N, 8, dtype=torch.float64, requires_grad=True)
        g = torch.randn(N, fast(x, ei).shape[1], dtype=torch.float64)
        out_r, out_f = ref(x, ei), fast(x, ei)
        assert torch.allclose(out_f, out_r, atol=1e-10), name
        names = sorted(dict(ref.named_parameters()))
        assert names == sorted(dict(fast.named_parameters())), name
        params_r, params_f = dict(ref.named_parameters()), dict(fast.named_parameters())
        grads_r = torch.autograd.grad(out_r, [x, *(params_r[k] for k in names)], g)
        grads_f = torch.autograd.grad(out_f, [x, *(params_f[k] for k in names)], g)
        for k, a, b in zip(["x", *names], grads_f, grads_r, strict=True):
            assert torch.allclose(a, b, atol=1e-10), (name, k)


def test_batched_features_over_one_graph():
    """GCNConv, SAGEConv and GINConv take x (*, num_nodes, features) as PyG's do: each set of
    features aggregated over the graph alone (the batch was read as nodes before)."""
    ei = _edge_index()
    x = torch.randn(2, 3, N, 6, dtype=torch.float64, requires_grad=True)
    gcn = fastdl.nn.GCNConv(6, 4).double()
    sage = fastdl.nn.SAGEConv(6, 4).double()
    gin = fastdl.nn.GINConv(torch.nn.Linear(6, 4).double())
    for layer in (gcn, sage, gin):
        out = layer(x, ei)
        assert out.shape == (2, 3, N, 4)
        for i, j in ((0, 0), (1, 2)):
            ref = layer(x[i, j], ei)
            torch.testing.assert_close(out[i, j], ref, rtol=1e-12, atol=1e-12)
        g = torch.randn_like(out)
        (gx,) = torch.autograd.grad(out, x, g)
        (gx_ref,) = torch.autograd.grad(layer(x[1, 2], ei), x, g[1, 2])
        torch.testing.assert_close(gx[1, 2], gx_ref[1, 2], rtol=1e-12, atol=1e-12)
    for layer in (gcn, sage, gin):
        with pytest.raises(ValueError, match=r"x must be \(\*, num_nodes, features\), got \[30\]"):
            layer(torch.randn(N, dtype=torch.float64), ei)


def test_gat_conv_checks_x():
    # Checked up front: a 3-D x would reach the aggregation with heads times the rows.
    conv = fastdl.nn.GATConv(5, 3, heads=2)
    ei = _edge_index()
    for x, got in ((torch.randn(N, 2, 5), r"\[30, 2, 5\]"), (torch.randn(N, 4), r"\[30, 4\]")):
        with pytest.raises(
            ValueError, match=rf"GATConv: x must be \(num_nodes, in_channels=5\), got {got}"
        ):
            conv(x, ei)
    with pytest.raises(ValueError, match=r"GATConv: x must be .* got list"):
        conv([[0.0] * 5], ei)
