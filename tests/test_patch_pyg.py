"""fastdl.patch on PyTorch Geometric models: GCNConv, GATConv, SAGEConv and GINConv replaced by
fastdl.nn's with the same Parameter objects give PyG's outputs and gradients, keep training with
an optimizer built before the patch, and go back with unpatch, under torch.compile(fullgraph)
too; options fastdl does not implement are left, and calls it does not implement run the PyG
layer."""

import copy

import pytest
import torch
from torch import nn
from torch_geometric import nn as pyg

import fastdl
from fastdl.integrations import pyg as twins

N = 40


class GNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.gcn = pyg.GCNConv(12, 16, cached=True)
        self.gat = pyg.GATConv(16, 6, heads=3)
        self.gat_mean = pyg.GATConv(18, 5, heads=2, concat=False, bias=False)
        self.gcn_out = pyg.GCNConv(5, 4, bias=False)

    def forward(self, x, edge_index):
        x = torch.relu(self.gcn(x, edge_index))
        x = torch.relu(self.gat(x, edge_index))
        return self.gcn_out(self.gat_mean(x, edge_index), edge_index)


def _graph(seed=0):
    gen = torch.Generator().manual_seed(seed)
    ei = torch.randint(0, N, (2, 160), generator=gen)
    ei = ei[:, ei[0] != ei[1]]  # no self loops (see fastdl.integrations.pyg)
    return torch.randn(N, 12, generator=gen, dtype=torch.float64), ei


def _model():
    torch.manual_seed(0)
    model = GNN().double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_()  # PyG zero-initializes biases
    return model


def _step(model, x, ei):
    out = model(x, ei)
    return out, *torch.autograd.grad(out.square().sum(), list(model.parameters()))


def test_gcn_and_gat_replaced_same_results():
    model = _model()
    ref = copy.deepcopy(model)
    params = dict(model.named_parameters())
    report = fastdl.patch(model)
    assert [s[0] for s in report.swapped] == ["gcn", "gat", "gat_mean", "gcn_out"], str(report)
    assert [type(m) for m in model.children()] == [
        twins.GCNConv,
        twins.GATConv,
        twins.GATConv,
        twins.GCNConv,
    ]
    assert all(p is params[n] for n, p in model.named_parameters())  # the very Parameters
    x, ei = _graph()
    for got, want in zip(_step(model, x, ei), _step(ref, x, ei), strict=True):
        torch.testing.assert_close(got, want)


def test_training_carries_over_and_unpatch():
    model = _model().float()
    ref = copy.deepcopy(model)
    opts = [torch.optim.Adam(m.parameters(), lr=1e-2) for m in (model, ref)]
    fastdl.patch(model)  # after the optimizer was built: it holds the same Parameters
    x, ei = _graph()
    x = x.float()
    for _ in range(3):
        for m, opt in zip((model, ref), opts, strict=True):
            opt.zero_grad()
            m(x, ei).square().mean().backward()
            opt.step()
    torch.testing.assert_close(model(x, ei), ref(x, ei), rtol=1e-4, atol=1e-4)
    fastdl.unpatch(model)
    assert type(model.gcn) is pyg.GCNConv and type(model.gat) is pyg.GATConv
    torch.testing.assert_close(model(x, ei), ref(x, ei), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    "layer",
    [
        lambda: pyg.SAGEConv(12, 5),
        lambda: pyg.SAGEConv(12, 5, aggr="max", root_weight=False, bias=False),
        lambda: pyg.SAGEConv(12, 5, aggr="add"),
        lambda: pyg.GINConv(nn.Sequential(nn.Linear(12, 8), nn.BatchNorm1d(8), nn.Linear(8, 5))),
        lambda: pyg.GINConv(nn.Linear(12, 5), eps=0.3, train_eps=True),
        lambda: pyg.GINConv(nn.Linear(12, 5), eps=0.2),
    ],
    ids=["sage", "sage_max", "sage_add", "gin_mlp_bn", "gin_train_eps", "gin_eps"],
)
def test_sage_and_gin_replaced_same_results(layer):
    # Duplicate edges and self loops included (neither layer adds or removes loops).
    torch.manual_seed(0)
    ref = nn.Sequential(layer()).double()
    model = copy.deepcopy(ref)
    report = fastdl.patch(model)
    assert type(model[0]) in (twins.SAGEConv, twins.GINConv), str(report)
    x, ei = _graph(seed=3)
    ei = torch.cat([ei, torch.tensor([[3, 3, 5], [3, 3, 5]])], 1)
    torch.testing.assert_close(_outputs(model[0], model, x, ei), _outputs(ref[0], ref, x, ei))
    fastdl.unpatch(model)
    assert type(model[0]) is type(ref[0])


def test_gin_eps_buffer_stays_shared_after_conversion():
    # .double() replaces buffers: the PyG layer (calls with size=, unpatch) must see the new eps.
    model = nn.Sequential(pyg.GINConv(nn.Linear(12, 5), eps=0.3))
    fastdl.patch(model)
    model.double()
    model.load_state_dict({**model.state_dict(), "0.eps": torch.tensor([5.0])})
    x, ei = _graph(seed=4)
    torch.testing.assert_close(model[0](x, ei), model[0](x, ei, (N, N)))
    fastdl.unpatch(model)
    assert model[0].eps.item() == 5.0 and model[0].eps.dtype == torch.float64


@pytest.mark.parametrize(
    "layer, reason",
    [
        (lambda: pyg.GCNConv(4, 4, improved=True), "improved"),
        (lambda: pyg.GCNConv(4, 4, normalize=False), "normalize"),
        (lambda: pyg.GCNConv(-1, 4), "lazy"),
        (lambda: pyg.GCNConv(4, 4, aggr="mean"), "aggr"),
        (lambda: pyg.GATConv(4, 4, edge_dim=3), "edge_dim"),
        (lambda: pyg.GATConv((4, 6), 4), "bipartite"),
        (lambda: pyg.GATConv(4, 4, residual=True), "residual"),
        (lambda: pyg.SAGEConv(4, 4, normalize=True), "normalize=True"),
        (lambda: pyg.SAGEConv(4, 4, project=True), "project=True"),
        (lambda: pyg.SAGEConv((4, 6), 4), "bipartite"),
        (lambda: pyg.SAGEConv(4, 4, aggr="std"), "aggr"),
        (lambda: pyg.GINConv(nn.Linear(4, 4), aggr="mean"), "aggr"),
    ],
)
def test_unsupported_options_left(layer, reason):
    model = nn.Sequential(layer())
    report = fastdl.patch(model)
    assert report.swapped == [] and reason in report.left[0][2], str(report)
    assert type(model[0]).__module__.startswith("torch_geometric")


class Stack(nn.Module):
    """GCN ("gcn", given the edge weights) and GAT ("gat") layers in a row."""

    def __init__(self, kinds):
        super().__init__()
        self.kinds = kinds
        width = {"gcn": 8, "gat": 4 * 2}
        sizes = [12] + [width[k] for k in kinds]
        self.layers = nn.ModuleList(
            pyg.GCNConv(a, b) if k == "gcn" else pyg.GATConv(a, b // 2, heads=2)
            for k, a, b in zip(kinds, sizes, sizes[1:], strict=False)
        )

    def forward(self, x, ei, w):
        for kind, layer in zip(self.kinds, self.layers, strict=True):
            x = torch.relu(layer(x, ei, w) if kind == "gcn" else layer(x, ei))
        return x


def _with_loops(ei, w):
    # Self loops of weight 1 (PyG keeps a loop's weight, fastdl uses 1: see the integration),
    # one node with two, appended after the unsorted edges.
    loops = torch.tensor([[3, 3, 7, 20], [3, 3, 7, 20]])
    return torch.cat([ei, loops], 1), torch.cat([w, torch.ones(4, dtype=w.dtype)])


@pytest.mark.parametrize(
    "kinds, dynamic",
    [(("gcn", "gat"), None), (("gcn", "gat"), True), (("gcn",), None), (("gat",), None)],
    ids=["gcn+gat", "gcn+gat-dynamic", "gcn", "gat"],
)
def test_compile_fullgraph_without_warm_up(kinds, dynamic):
    # The patched model is compiled before any eager call, and given a raw edge_index: the graph
    # build and self-loop replacement trace with static shapes (by default the second edge
    # count recompiles with a dynamic one) or dynamic ones.
    torch.compiler.reset()
    torch.manual_seed(0)
    ref = Stack(kinds).double()
    model = copy.deepcopy(ref)
    assert len(fastdl.patch(model).swapped) == len(kinds)
    compiled = torch.compile(model, fullgraph=True, dynamic=dynamic)
    x, ei = _graph(seed=1)
    w = torch.rand(ei.shape[1], dtype=torch.float64)
    for edges, weights in ((ei, w), _with_loops(ei, w)):
        torch.testing.assert_close(
            _outputs(compiled, model, x, edges, weights), _outputs(ref, ref, x, edges, weights)
        )


def test_weighted_self_loops_as_pyg():
    # PyG keeps the weight of a self loop in the input (fastdl's layer puts its own, weight 1):
    # a weighted call whose edge_index has self loops runs the PyG layer, same results.
    torch.manual_seed(0)
    ref = Stack(("gcn",)).double()
    model = copy.deepcopy(ref)
    fastdl.patch(model)
    x, ei = _graph(seed=2)
    ei, w = _with_loops(ei, torch.rand(ei.shape[1], dtype=torch.float64))
    w[-4:] = torch.tensor([0.3, 2.0, 0.5, 1.5], dtype=torch.float64)
    torch.testing.assert_close(_outputs(model, model, x, ei, w), _outputs(ref, ref, x, ei, w))


def _outputs(fn, module, x, *args):
    """fn's output and the gradients of its square sum to x and module's parameters (by name)."""
    x = x.clone().requires_grad_()
    out = fn(x, *args)
    params = [p for _, p in sorted(module.named_parameters())]
    return out, *torch.autograd.grad(out.square().sum(), [x, *params])


def test_gcn_cached_as_pyg():
    # PyG's cached GCNConv keeps the normalized graph and edge weights of the first call: later
    # calls' edge_index and edge_weight are ignored.
    torch.manual_seed(0)
    ref = nn.Sequential(pyg.GCNConv(12, 4, cached=True)).double()
    model = copy.deepcopy(ref)
    fastdl.patch(model)
    x, ei = _graph()
    w = torch.rand(ei.shape[1], dtype=torch.float64)
    for edges, weights in ((ei, w), (ei, w.flip(0)), (ei, None), (ei[:, :50], None)):
        torch.testing.assert_close(model[0](x, edges, weights), ref[0](x, edges, weights))


def _sparse(kind, ei):
    # PyG's sparse form is the transposed adjacency: row = destination.
    if kind == "SparseTensor":
        torch_sparse = pytest.importorskip("torch_sparse")
        return torch_sparse.SparseTensor(row=ei[1], col=ei[0], sparse_sizes=(N, N))
    adj_t = torch.sparse_coo_tensor(ei.flip(0), torch.ones(ei.shape[1], dtype=torch.float64))
    return adj_t.coalesce() if kind == "coo" else adj_t.to_sparse_csr()


@pytest.mark.parametrize("kind", ["coo", "csr", "SparseTensor"])
def test_sparse_adjacency_runs_pyg(kind):
    torch.manual_seed(0)
    ref = nn.Sequential(pyg.GCNConv(12, 4), pyg.GATConv(12, 3, heads=2)).double()
    model = copy.deepcopy(ref)
    fastdl.patch(model)
    x, ei = _graph()
    adj_t = _sparse(kind, ei)
    for layer, ref_layer in zip(model, ref, strict=True):
        torch.testing.assert_close(layer(x, adj_t), ref_layer(x, adj_t))


def test_gat_call_options_run_pyg():
    # return_attention_weights (True: (out, (edge_index, alpha))), size and edge_attr are
    # PyG's; the PyG layer runs in the twin's mode (here eval: no attention dropout).
    torch.manual_seed(0)
    ref = nn.Sequential(pyg.GATConv(12, 3, heads=2, dropout=0.5)).double()
    model = copy.deepcopy(ref)
    fastdl.patch(model)
    model.eval(), ref.eval()
    x, ei = _graph()
    for flag in (True, False):
        got = model[0](x, ei, return_attention_weights=flag)
        torch.testing.assert_close(got, ref[0](x, ei, return_attention_weights=flag))
    torch.testing.assert_close(model[0](x, ei, size=(N, N)), ref[0](x, ei, size=(N, N)))
    attr = torch.randn(ei.shape[1], 2, dtype=torch.float64)
    torch.testing.assert_close(model[0](x, ei, attr), ref[0](x, ei, attr))
