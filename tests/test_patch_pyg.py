"""fastdl.patch on PyTorch Geometric models: GCNConv and GATConv replaced by fastdl.nn's with the
same Parameter objects give PyG's outputs and gradients, keep training with an optimizer built
before the patch, and go back with unpatch; options fastdl does not implement are left."""

import copy

import pytest
import torch
from torch import nn
from torch_geometric import nn as pyg

import fastdl
from fastdl import nn as fnn

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
        fnn.GCNConv,
        fnn.GATConv,
        fnn.GATConv,
        fnn.GCNConv,
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
    "layer, reason",
    [
        (lambda: pyg.GCNConv(4, 4, improved=True), "improved"),
        (lambda: pyg.GCNConv(4, 4, normalize=False), "normalize"),
        (lambda: pyg.GCNConv(-1, 4), "lazy"),
        (lambda: pyg.GCNConv(4, 4, aggr="mean"), "aggr"),
        (lambda: pyg.GATConv(4, 4, edge_dim=3), "edge_dim"),
        (lambda: pyg.GATConv((4, 6), 4), "bipartite"),
        (lambda: pyg.GATConv(4, 4, residual=True), "residual"),
    ],
)
def test_unsupported_options_left(layer, reason):
    model = nn.Sequential(layer())
    report = fastdl.patch(model)
    assert report.swapped == [] and reason in report.left[0][2], str(report)
    assert type(model[0]).__module__.startswith("torch_geometric")
