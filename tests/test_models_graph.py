"""fastdl.models.graph against its plain-torch twins (fastdl/models/twins/graph.py, message
passing with gathers and index_add_): same outputs and gradients from the same weights, 20
AdamW steps with the same losses, the cached Graph, bad inputs."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import fastdl
from fastdl.models import graph as G
from fastdl.models import train
from fastdl.models.twins import graph as T

SPECS = {spec.name: spec for spec in G.SPECS}


def _batch(generator, device):
    x, edge_index, target = G.community_graph(300, 4, 16, 8, device=str(device))
    return (x, edge_index), target


SMALL = {
    "gcn": (lambda: G.GCN(16, 12, 4), lambda: T.GCN(16, 12, 4)),
    "gat": (lambda: G.GAT(16, 4, 4, heads=3), lambda: T.GAT(16, 4, 4, heads=3)),
}


def small(name: str):
    build, twin = SMALL[name]
    return dataclasses.replace(SPECS[name], build=build, twin=twin, batch=_batch)


def pair(spec):
    torch.manual_seed(0)
    model = spec.build()
    twin = spec.twin()
    twin.load_state_dict(model.state_dict())
    return model, twin


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


def test_specs():
    assert set(SPECS) == set(SMALL)
    assert all(spec.group == "graph" and spec.train for spec in G.SPECS)


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(SMALL))
def test_forward_and_gradients_match_twin(name, mode):
    """Train mode draws the same dropout masks in both (same seed, same calls)."""
    spec = small(name)
    model, twin = pair(spec)
    (x, edge_index), target = spec.batch(None, torch.device("cpu"))
    outs = []
    for m in (model, twin):
        getattr(m, mode)()
        torch.manual_seed(1)
        out = m(x, edge_index)
        spec.loss(out, target).backward()
        outs.append(out)
    assert outs[0].shape == (300, 4)
    assert rel(outs[0], outs[1]) <= 1e-4
    grads = dict(model.named_parameters())
    for pname, p in twin.named_parameters():
        assert rel(grads[pname].grad, p.grad) <= 1e-4, pname


@pytest.mark.parametrize("name", sorted(SMALL))
def test_training_matches_twin(name):
    run = train.train(small(name), 20, torch.device("cpu"))
    ours, theirs = (torch.tensor(run.losses[who]) for who in ("fastdl", "torch"))
    torch.testing.assert_close(ours, theirs, rtol=1e-3, atol=0)
    assert ours[-1] < 0.8 * ours[0]  # the communities are learnable


@pytest.mark.parametrize("name", sorted(SMALL))
def test_graph_is_built_once_per_edge_index(name):
    model = small(name).build()
    (x, edge_index), _ = _batch(None, "cpu")
    out = model.eval()(x, edge_index)
    graph = model.graph.graph
    model(x, edge_index)
    assert model.graph.graph is graph
    # A prebuilt fastdl.Graph gives the same output.
    torch.testing.assert_close(model(x, fastdl.Graph.from_edge_index(edge_index, 300)), out)
    # Another tensor, or the same one modified in place, is a new graph.
    flipped = edge_index.flip(0)
    model(x, flipped)
    assert model.graph.graph is not graph
    graph = model.graph.graph
    flipped[0, 0] = 1
    model(x, flipped)
    assert model.graph.graph is not graph


@pytest.mark.parametrize("name", sorted(SMALL))
def test_inference_mode(name):
    """An edge_index made under torch.inference_mode has no version counter: the model and its
    twin run on it (rebuilding the graph each call, nothing cached) and agree."""
    model, twin = pair(small(name))
    (x, edge_index), _ = _batch(None, "cpu")
    with torch.no_grad():
        want = model.eval()(x, edge_index)
    with torch.inference_mode():
        x_inf, edge_inf = x.clone(), edge_index.clone()
        for _ in range(2):
            got = model(x_inf, edge_inf)
            assert rel(got, want) <= 1e-6
            assert rel(twin.eval()(x_inf, edge_inf), want) <= 1e-4
        model(x, edge_index)  # an ordinary edge_index first seen under inference_mode
        twin(x, edge_index)
    # ... is not cached with inference tensors: a training step on it runs its backward
    for m in (model.train(), twin.train()):
        m(x, edge_index).square().sum().backward()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_bad_input(name):
    label = name.upper()
    model = small(name).build()
    (x, edge_index), _ = _batch(None, "cpu")
    with pytest.raises(ValueError, match=f"{label}: edge_index refers to node 299 but x has 200"):
        model(x[:200], edge_index)
    negative = torch.cat([edge_index, torch.tensor([[-1], [0]])], 1)
    with pytest.raises(ValueError, match=f"{label}: edge_index refers to node -1 but x has 300"):
        model(x, negative)
    with pytest.raises(ValueError, match=f"{label}: edge_index must hold int64 or int32"):
        model(x, edge_index.float())
    graph = fastdl.Graph.from_edge_index(edge_index, 300)
    with pytest.raises(ValueError, match=f"{label}: the graph has 300 nodes but x has 299 rows"):
        model(x[:299], graph)
    with pytest.raises(ValueError, match=rf"{label}: x must be \(num_nodes, 16\), got \(300, 15\)"):
        model(x[:, :15], edge_index)
    with pytest.raises(ValueError, match=rf"{label}: edge_index must be \(2, E\)"):
        model(x, edge_index[0])
    with pytest.raises(TypeError, match=rf"{label}: x must have the model's dtype torch.float32"):
        model(x.double(), edge_index)
    with pytest.raises(TypeError, match=rf"{label}: edge_index must hold int64 or int32 node ids"):
        model(x, edge_index.float())  # a DtypeError: a ValueError too, as it was


def test_bad_constructor_arguments():
    for cls in (G.GCN, G.GAT):
        with pytest.raises(ValueError, match=rf"^{cls.__name__}: dropout must be in \[0, 1\]"):
            cls(4, 3, 2, dropout=1.5)
    with pytest.raises(ValueError, match=r"^GAT: heads must be at least 1, got 0"):
        G.GAT(4, 3, 2, heads=0)


def test_community_graph():
    x, edge_index, target = G.community_graph(2000, 5, 8, 10)
    assert G.community_graph(2000, 5, 8, 10)[1] is edge_index  # cached: the same tensors
    assert x.shape == (2000, 8) and edge_index.shape[0] == 2
    assert 9 * 2000 < edge_index.shape[1] <= 10 * 2000  # both directions, self loops dropped
    assert (edge_index[0] != edge_index[1]).all()
    labels = G.community_graph(2000, 5, 8, 10, seed=0)[2]
    known = labels >= 0
    assert 0.4 < known.float().mean() < 0.6 and set(labels[known].tolist()) == set(range(5))
    # Homophily: with p_in = 0.7 most edges of the labelled pairs stay inside a community.
    src, dst = edge_index
    both = known[src] & known[dst]
    assert (labels[src][both] == labels[dst][both]).float().mean() > 0.65
    # Features carry the community, weakly: nearest centroid beats chance, not perfection.
    centroids = torch.stack([x[labels == c].mean(0) for c in range(5)])
    guess = torch.cdist(x[known], centroids).argmin(1)
    assert 0.3 < (guess == labels[known]).float().mean() < 0.95
    assert F.cross_entropy(torch.zeros(2000, 5), target) > 0


@pytest.mark.parametrize("name", sorted(SMALL))
def test_compile_fullgraph(name):
    # Under torch.compile the graph is built in the compiled code (no cache, no host read).
    model = small(name).build().eval()
    (x, edge_index), _ = _batch(None, "cpu")
    compiled = torch.compile(model, fullgraph=True)
    torch.testing.assert_close(compiled(x, edge_index), model(x, edge_index))
