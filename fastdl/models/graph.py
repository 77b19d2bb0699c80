"""Graph node classifiers built from fastdl's graph layers: GCN and GAT, with the generated
community graph they learn from.

Each model takes node features x (num_nodes, F) and the graph as a PyG-style ``edge_index``
(2, E) or a prebuilt :class:`fastdl.Graph`. An edge_index is turned into a Graph (the CSR sort
and its validation) once and cached for as long as the same, unmodified tensor comes back, so a
training step on a fixed graph does no graph construction. The plain-torch twins are in
fastdl/models/twins/graph.py.
"""

import functools

import torch
import torch.nn.functional as F
from torch import nn

from fastdl import _checks
from fastdl import nn as fnn
from fastdl.graph import Graph
from fastdl.models.spec import ModelSpec, check_dtype
from fastdl.models.twins import graph as twins


class CachedGraph:
    """The Graph of the last edge_index seen (rebuilt when another tensor, or the same one
    modified in place, arrives), with the checks every node classifier makes of its inputs."""

    def __init__(self, model: str):
        self.model = model
        self.key = None
        self.graph = None

    def __call__(self, x: torch.Tensor, edge_index, in_channels: int) -> Graph:
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != in_channels:
            got = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"{self.model}: x must be (num_nodes, {in_channels}), got {got}")
        n = x.shape[0]
        graph = edge_index if isinstance(edge_index, Graph) else self._build(edge_index, n)
        if graph.num_nodes != n:
            raise ValueError(
                f"{self.model}: the graph has {graph.num_nodes} nodes but x has {n} rows "
                f"(x must be (num_nodes, {in_channels}))"
            )
        return graph

    def _build(self, edge_index, n: int) -> Graph:
        if (
            not isinstance(edge_index, torch.Tensor)
            or edge_index.dim() != 2
            or (edge_index.shape[0] != 2)
        ):
            got = tuple(edge_index.shape) if isinstance(edge_index, torch.Tensor) else edge_index
            raise ValueError(
                f"{self.model}: edge_index must be (2, E) or a fastdl.Graph, got {got}"
            )
        if edge_index.dtype not in (torch.int64, torch.int32):
            raise _checks.DtypeError(
                f"{self.model}: edge_index must hold int64 or int32 node ids, "
                f"got {edge_index.dtype}"
            )
        if torch.compiler.is_compiling():  # no cache, no host read: the Graph checks in-graph
            return Graph.from_edge_index(edge_index, n)
        # The tensor itself is kept in the key, so its id cannot be reused by another one. An
        # inference tensor has no version counter to tell an in-place edit, and a graph built
        # under inference_mode holds inference tensors a later training step cannot save for
        # backward: neither is cached.
        cached = not (edge_index.is_inference() or torch.is_inference_mode_enabled())
        key = (edge_index, edge_index._version, n) if cached else None
        if (
            cached
            and self.key is not None
            and self.key[0] is edge_index
            and self.key[1:] == key[1:]
        ):
            return self.graph
        if edge_index.numel():
            lo, hi = (int(v) for v in torch.aminmax(edge_index))
            if lo < 0 or hi >= n:
                raise ValueError(
                    f"{self.model}: edge_index refers to node {lo if lo < 0 else hi} but x has "
                    f"{n} rows (one per node, ids 0..{n - 1})"
                )
        graph = Graph.from_edge_index(edge_index, n)
        if cached:
            self.key, self.graph = key, graph
        return graph


def check_dropout(model: str, p: float) -> None:
    # F.dropout would check it only at the first training step.
    if not 0 <= p <= 1:
        raise ValueError(f"{model}: dropout must be in [0, 1], got {p}")


class GCN(nn.Module):
    """Two-layer graph convolutional network (Kipf & Welling, 2017):
    ``A' relu(A' x W1 + b1) W2 + b2`` with ``A' = D^-1/2 (A + I) D^-1/2``, dropout on the hidden
    features; each layer a fastdl.nn.GCNConv (normalization computed on the fly in the
    aggregation kernel). Output: class logits (num_nodes, num_classes)."""

    def __init__(self, in_channels: int, hidden: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        check_dropout("GCN", dropout)
        self.in_channels, self.dropout = in_channels, dropout
        self.conv1 = fnn.GCNConv(in_channels, hidden)
        self.conv2 = fnn.GCNConv(hidden, num_classes)
        self.graph = CachedGraph("GCN")

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        g = self.graph(x, edge_index, self.in_channels)
        check_dtype(self, "x", x)
        h = F.relu(self.conv1(x, g))
        h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h, g)


class GAT(nn.Module):
    """Two-layer graph attention network (Velickovic et al., 2018): a multi-head GATConv with
    heads concatenated, ELU, then a one-head GATConv to the classes; dropout on the input and
    hidden features. Each layer's attention scores, softmax over incoming edges and weighted
    sum run in one fastdl kernel. Output: class logits (num_nodes, num_classes)."""

    def __init__(
        self,
        in_channels: int,
        hidden: int,
        num_classes: int,
        heads: int = 8,
        dropout: float = 0.5,
    ):
        super().__init__()
        check_dropout("GAT", dropout)
        if heads < 1:
            raise ValueError(f"GAT: heads must be at least 1, got {heads}")
        self.in_channels, self.dropout = in_channels, dropout
        self.conv1 = fnn.GATConv(in_channels, hidden, heads)
        self.conv2 = fnn.GATConv(hidden * heads, num_classes, 1, concat=False)
        self.graph = CachedGraph("GAT")

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        g = self.graph(x, edge_index, self.in_channels)
        check_dtype(self, "x", x)
        x = F.dropout(x, self.dropout, self.training)
        h = F.elu(self.conv1(x, g))
        h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h, g)


# ---------------------------------------------------------------- data


@functools.lru_cache(maxsize=4)
def community_graph(
    num_nodes: int,
    num_classes: int,
    features: int,
    degree: int,
    p_in: float = 0.7,
    device: str = "cpu",
    seed: int = 0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A stochastic block model: nodes in ``num_classes`` random communities, about
    ``degree`` undirected edges per node, each one inside the node's community with probability
    ``p_in`` (else to any node); features a community centroid (N(0, I)) scaled by 0.5 plus
    N(0, I) noise, so a node's own features are a weak cue and its neighbours' average a strong
    one. Returns x (N, features), edge_index (2, E) with both directions of every edge, and
    target: the community labels with half the nodes (the held-out ones) set to -100
    (cross_entropy's ignore_index). Deterministic in ``seed``; cached, so every call with the
    same arguments returns the same tensors (and a model's cached Graph stays valid)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(num_classes, (num_nodes,), generator=g)
    order = torch.argsort(labels)
    counts = torch.bincount(labels, minlength=num_classes)
    starts = torch.cumsum(counts, 0) - counts
    m = num_nodes * degree // 2
    src = torch.randint(num_nodes, (m,), generator=g)
    c = labels[src]
    inside = order[starts[c] + (torch.rand(m, generator=g) * counts[c]).long()]
    anywhere = torch.randint(num_nodes, (m,), generator=g)
    dst = torch.where(torch.rand(m, generator=g) < p_in, inside, anywhere)
    keep = src != dst
    src, dst = src[keep], dst[keep]
    edge_index = torch.stack([torch.cat([src, dst]), torch.cat([dst, src])])
    centroids = torch.randn(num_classes, features, generator=g)
    x = 0.5 * centroids[labels] + torch.randn(num_nodes, features, generator=g)
    target = labels.masked_fill(torch.rand(num_nodes, generator=g) < 0.5, -100)
    return x.to(device), edge_index.to(device), target.to(device)


def _node_batch(num_nodes: int, num_classes: int, features: int, degree: int):
    def batch(_generator, device):
        # Node classification on one fixed graph (transductive): every step sees all of it.
        x, edge_index, target = community_graph(
            num_nodes, num_classes, features, degree, device=str(device)
        )
        return (x, edge_index), target

    return batch


SPECS = (
    ModelSpec(
        name="gcn",
        group="graph",
        task="2-layer GCN classifying the nodes of a 50k-node, 8-community stochastic block "
        "model (16 edges per node, 128 features)",
        build=lambda: GCN(128, 64, 8),
        twin=lambda: twins.GCN(128, 64, 8),
        batch=_node_batch(50_000, 8, 128, 16),
        loss=F.cross_entropy,
        lr=1e-2,
    ),
    ModelSpec(
        name="gat",
        group="graph",
        task="2-layer GAT (8 heads) classifying the nodes of a 10k-node, 8-community stochastic "
        "block model (16 edges per node, 64 features)",
        build=lambda: GAT(64, 8, 8),
        twin=lambda: twins.GAT(64, 8, 8),
        batch=_node_batch(10_000, 8, 64, 16),
        loss=F.cross_entropy,
        lr=5e-3,
    ),
)
