"""GNN layers on the fastdl graph ops: GCNConv, GATConv, SAGEConv (mean), GINConv.

Constructor arguments, parameter names and shapes follow their PyTorch Geometric namesakes, so
a PyG state_dict loads unchanged (``load_state_dict``). Each forward takes ``edge_index`` (2, E)
or a prebuilt :class:`fastdl.Graph` (which skips the sort into CSR; pass one when the graph
does not change between calls). Messages flow edge_index[0] -> edge_index[1], as in PyG.
As PyG's, GCNConv, SAGEConv and GINConv also take x (*, num_nodes, features): one graph for a
batch of feature sets (the nodes on dim -2); GATConv takes (num_nodes, features) only.
"""

import math

import torch
from torch import nn

from fastdl.graph import Graph
from fastdl.ops import graph as F


def _graph(edge_index, num_nodes: int) -> Graph:
    if isinstance(edge_index, Graph):
        return edge_index
    return Graph.from_edge_index(edge_index, num_nodes)


def _replace_self_loops(g: Graph, x: torch.Tensor, add: bool) -> tuple[Graph, torch.Tensor]:
    """g without its self loops (with one new loop per node when ``add``), and the features x
    to aggregate over it; pass the output through _node_rows."""
    if not torch.compiler.is_compiling():
        return (g.with_self_loops() if add else g.without_self_loops()), x
    # Removing edges leaves a data-dependent number of them, which torch.compile(fullgraph)
    # cannot trace: the loops go to an extra sink node instead, whose features are a zero row.
    sink = x.new_zeros(1, *x.shape[1:])
    return g.self_loops_to_sink(add), torch.cat([x, sink])


def _check_nodes(op: str, x) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise ValueError(f"{op}: x must be (*, num_nodes, features), got {got}")


def _nodes_first(x: torch.Tensor) -> torch.Tensor:
    """x (*, N, F) as the (N, B * F) rows the graph ops aggregate (B the product of *): an
    aggregation treats each feature column alone, so a batch of feature sets over one graph is
    one set of wider rows."""
    return x if x.dim() == 2 else x.movedim(-2, 0).reshape(x.size(-2), -1)


def _nodes_back(out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The aggregation out (N, B * F) of _nodes_first(x) back in x's layout (*, N, F)."""
    if x.dim() == 2:
        return out
    return out.reshape(out.size(0), *x.shape[:-2], -1).movedim(0, -2)


def _node_rows(out: torch.Tensor, n: int) -> torch.Tensor:
    # Without the sink's row, if any. No view otherwise: the bias added in place to a view
    # would make autograd copy the whole gradient in the backward pass.
    return out if out.size(0) == n else out[:n]


def _add_bias(out: torch.Tensor, bias) -> torch.Tensor:
    # In place when the dtypes agree: out is the aggregation's fresh output, which its backward
    # does not read, and a new tensor cost a page-faulted allocation of the whole output (~7% of
    # a GAT forward). Otherwise out + bias, which promotes as torch does (a bfloat16 out and a
    # float32 bias give float32).
    if bias is None:
        return out
    return out.add_(bias) if out.dtype == bias.dtype else out + bias


def _glorot(t: torch.Tensor) -> None:
    # PyG's glorot: U(-a, a), a = sqrt(6 / (fan_in + fan_out)) over the last two dims.
    a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
    nn.init.uniform_(t, -a, a)


class GCNConv(nn.Module):
    """Graph convolution (Kipf & Welling, 2017): ``D^-1/2 (A + I) D^-1/2 X W + b``, as PyG's
    GCNConv (``lin.weight``, ``bias``); ``improved`` uses 2I. Self loops in the input are
    replaced by the layer's own (PyG keeps their weights; the same for unweighted graphs).
    ``cached`` keeps the Graph and edge_weight of the first call for every later call (whose
    edge_index and edge_weight are then ignored), as PyG's cached normalization."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        improved: bool = False,
        cached: bool = False,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.improved, self.cached = improved, cached
        self._cache = None
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _glorot(self.lin.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)
        self._cache = None

    def _graph(self, edge_index, n: int, edge_weight) -> tuple[Graph, torch.Tensor | None]:
        if not self.cached:
            return _graph(edge_index, n), edge_weight
        if self._cache is None:
            # Cached before its self loops are replaced, a step that differs under torch.compile
            # (see _replace_self_loops) and that eager caches on the Graph.
            self._cache = _graph(edge_index, n), edge_weight
        return self._cache

    def forward(self, x: torch.Tensor, edge_index, edge_weight=None) -> torch.Tensor:
        _check_nodes("fastdl.nn.GCNConv", x)
        n = x.size(-2)
        g, edge_weight = self._graph(edge_index, n, edge_weight)
        h = self.lin(x)
        g, rows = _replace_self_loops(g, _nodes_first(h), add=False)
        out = F.gcn_aggregate(g, rows, edge_weight, improved=self.improved)
        return _add_bias(_nodes_back(_node_rows(out, n), h), self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}"


class GATConv(nn.Module):
    """Graph attention (Velickovic et al., 2018), multi-head, as PyG's GATConv (``lin.weight``
    (heads * out, in), ``att_src``/``att_dst`` (1, heads, out), ``bias``): heads concatenated
    (``concat``) or averaged. Self loops are replaced by one per node (``add_self_loops``)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int = 1,
        concat: bool = True,
        negative_slope: float = 0.2,
        dropout: float = 0.0,
        add_self_loops: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.heads = in_channels, out_channels, heads
        self.concat, self.negative_slope, self.dropout = concat, negative_slope, dropout
        self.add_self_loops = add_self_loops
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        width = heads * out_channels if concat else out_channels
        self.bias = nn.Parameter(torch.empty(width)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _glorot(self.lin.weight)
        _glorot(self.att_src)
        _glorot(self.att_dst)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        # Checked here: the head split below would turn a wrong x into a confusing row count.
        if not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != self.in_channels:
            got = list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(
                f"fastdl.nn.GATConv: x must be (num_nodes, in_channels={self.in_channels}), "
                f"got {got}"
            )
        n = x.size(0)
        g = _graph(edge_index, n)
        h = self.lin(x).view(-1, self.heads, self.out_channels)
        if self.add_self_loops:
            g, h = _replace_self_loops(g, h, add=True)
        out = F.gat_aggregate(
            g, h, self.att_src, self.att_dst, self.negative_slope, self.dropout, self.training
        )
        out = _node_rows(out, n)
        out = out.reshape(-1, self.heads * self.out_channels) if self.concat else out.mean(1)
        return _add_bias(out, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, heads={self.heads}"


class SAGEConv(nn.Module):
    """GraphSAGE (Hamilton et al., 2017) with mean aggregation, as PyG's SAGEConv
    (``lin_l`` on the neighbour mean, with bias; ``lin_r`` on the root, without)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        aggr: str = "mean",
        root_weight: bool = True,
        bias: bool = True,
    ):
        super().__init__()
        if aggr not in F.REDUCES:
            raise ValueError(f"fastdl.nn.SAGEConv: aggr must be one of {F.REDUCES}, got {aggr!r}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.aggr, self.root_weight = aggr, root_weight
        self.lin_l = nn.Linear(in_channels, out_channels, bias=bias)
        self.lin_r = nn.Linear(in_channels, out_channels, bias=False) if root_weight else None

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        _check_nodes("fastdl.nn.SAGEConv", x)
        g = _graph(edge_index, x.size(-2))
        out = self.lin_l(_nodes_back(F.spmm(g, _nodes_first(x), reduce=self.aggr), x))
        return out + self.lin_r(x) if self.lin_r is not None else out

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, aggr={self.aggr!r}"


class GINConv(nn.Module):
    """Graph isomorphism network layer (Xu et al., 2019): ``nn((1 + eps) x_i + sum_j x_j)``, as
    PyG's GINConv (``nn.*``, ``eps`` a parameter when ``train_eps``, else a buffer)."""

    def __init__(self, nn_module: nn.Module, eps: float = 0.0, train_eps: bool = False):
        super().__init__()
        self.nn = nn_module
        self.initial_eps = eps
        if train_eps:
            self.eps = nn.Parameter(torch.tensor([eps]))
        else:
            self.register_buffer("eps", torch.tensor([eps]))

    def forward(self, x: torch.Tensor, edge_index) -> torch.Tensor:
        _check_nodes("fastdl.nn.GINConv", x)
        g = _graph(edge_index, x.size(-2))
        return self.nn(_nodes_back(F.spmm(g, _nodes_first(x)), x) + (1 + self.eps) * x)
