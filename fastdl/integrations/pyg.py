"""PyTorch Geometric: fastdl.patch replaces GCNConv, GATConv, SAGEConv and GINConv by fastdl.nn's.

The fastdl layers have PyG's parameter layout (``lin.weight`` (out, in), ``bias``; GAT's
``att_src``/``att_dst`` (1, heads, out)), so the twin takes the PyG layer's very Parameter
objects: an optimizer built before patching keeps training them, and unpatch puts the PyG layer
back with what was learnt. Options the fastdl layers do not implement leave the layer as it is,
with the reason in the report.

The twins (:class:`GCNConv`, :class:`GATConv`, :class:`SAGEConv`, :class:`GINConv` below:
fastdl.nn's with PyG's call signature) run the fastdl kernels on ``x`` of shape (N, C) with
``edge_index`` a (2, E) integer tensor or a fastdl.Graph (GCN: and ``edge_weight``). Every other
call (a sparse adjacency: torch_sparse's SparseTensor or a torch.sparse tensor; a pair of feature
tensors; ``size``; GAT's ``edge_attr`` or ``return_attention_weights``) runs the PyG layer they
replaced, on the same Parameters, so
it gives PyG's result (its own cache for GCNConv(cached=True)).
fastdl's GCNConv replaces the input's self loops by its own where PyG keeps theirs, so a
weighted call whose edge_index has self loops (their weights may differ from 1) runs the PyG
layer too; a fastdl.Graph, or any call under torch.compile (which cannot branch on the edges),
runs fastdl's (the two differ only when a self loop's weight is not 1).
"""

import torch
from torch import nn
from torch_geometric import nn as pyg

from fastdl import nn as fnn
from fastdl.graph import INDEX_DTYPES, Graph
from fastdl.ops.graph import REDUCES
from fastdl.patch import Swap, dtype_problem, qualname

# Where a twin keeps the PyG layer it replaced, outside its submodules: no second copy of the
# Parameters in its state_dict.
PYG_LAYER = "_pyg_layer"


def _fastdl_call(x, edge_index) -> bool:
    """Whether the fastdl layers implement a call on these inputs (the rest go to PyG)."""
    if not isinstance(x, torch.Tensor) or x.dim() != 2:
        return False
    if isinstance(edge_index, Graph):
        return True
    return (
        isinstance(edge_index, torch.Tensor)
        and edge_index.layout == torch.strided
        and edge_index.dtype in INDEX_DTYPES
    )


def _run_pyg(twin: nn.Module, *args):
    layer = twin.__dict__[PYG_LAYER]
    layer.train(twin.training)  # GAT's attention dropout
    return layer(*args)


class GCNConv(fnn.GCNConv):
    """fastdl.nn.GCNConv standing in for a PyG GCNConv (see the module docstring)."""

    def forward(self, x, edge_index, edge_weight=None):
        if _fastdl_call(x, edge_index) and not _weighted_loops(edge_index, edge_weight):
            return super().forward(x, edge_index, edge_weight)
        return _run_pyg(self, x, edge_index, edge_weight)


def _weighted_loops(edge_index, edge_weight) -> bool:
    """Whether a weighted edge_index has self loops, whose weights PyG keeps (see the
    docstring)."""
    if edge_weight is None or isinstance(edge_index, Graph) or torch.compiler.is_compiling():
        return False
    return bool((edge_index[0] == edge_index[1]).any())


class GATConv(fnn.GATConv):
    """fastdl.nn.GATConv standing in for a PyG GATConv (see the module docstring)."""

    def forward(self, x, edge_index, edge_attr=None, size=None, return_attention_weights=None):
        # Any of these set goes to PyG, return_attention_weights=False included (PyG versions
        # differ on what it returns).
        extras = (edge_attr, size, return_attention_weights)
        if _fastdl_call(x, edge_index) and all(a is None for a in extras):
            return super().forward(x, edge_index)
        return _run_pyg(self, x, edge_index, *extras)


class _SizeCall:
    """The forward of a twin whose PyG layer is called as (x, edge_index, size): calls with a
    size run the PyG layer."""

    def forward(self, x, edge_index, size=None):
        if _fastdl_call(x, edge_index) and size is None:
            return super().forward(x, edge_index)
        return _run_pyg(self, x, edge_index, size)


class SAGEConv(_SizeCall, fnn.SAGEConv):
    """fastdl.nn.SAGEConv standing in for a PyG SAGEConv (see the module docstring)."""


class GINConv(_SizeCall, fnn.GINConv):
    """fastdl.nn.GINConv standing in for a PyG GINConv (see the module docstring)."""

    def _apply(self, fn, recurse=True):
        # .to()/.double() convert Parameters in place (still shared with the PyG layer) but
        # replace buffers: the PyG layer is pointed at the twin's new eps buffer again.
        super()._apply(fn, recurse)
        layer = self.__dict__.get(PYG_LAYER)
        if layer is not None and "eps" in self._buffers:
            layer._buffers["eps"] = self._buffers["eps"]
        return self


def _lazy(module: nn.Module) -> bool:
    return any(isinstance(p, nn.parameter.UninitializedParameter) for p in module.parameters())


def _common_problem(module, aggr: str) -> str | None:
    if _lazy(module):
        return "lazy (in_channels=-1) parameters are not initialized yet"
    if module.aggr != aggr or module.flow != "source_to_target" or module.node_dim not in (0, -2):
        return f"aggr={module.aggr!r}, flow={module.flow!r}, node_dim={module.node_dim}"
    if getattr(module, "_decomposed_layers", 1) != 1 or getattr(module, "_explain", None):
        return "decomposed_layers or explain mode"
    return dtype_problem(module)


def _gcn_problem(m: pyg.GCNConv) -> str | None:
    if not m.normalize or m.add_self_loops is False:
        return "normalize=False or add_self_loops=False (fastdl's GCNConv always normalizes)"
    if m.improved:
        # PyG's add_remaining_self_loops drops the fill value 2 when edge_weight is None, so its
        # output depends on the call; fastdl's GCNConv always uses A + 2I.
        return "improved=True (PyG applies it only with edge weights; fastdl always)"
    return _common_problem(m, "add")


def _gat_problem(m: pyg.GATConv) -> str | None:
    if m.lin is None:
        return "bipartite in_channels (a pair of sizes)"
    if m.edge_dim is not None or m.residual:
        return f"edge_dim={m.edge_dim}, residual={m.residual}"
    return _common_problem(m, "add")


def _sage_problem(m: pyg.SAGEConv) -> str | None:
    if isinstance(m.in_channels, tuple):
        return "bipartite in_channels (a pair of sizes)"
    if m.normalize or m.project:
        return f"normalize={m.normalize}, project={m.project}"
    return _common_problem(m, m.aggr if _sage_aggr(m) in REDUCES else "mean, sum, max or min")


def _sage_aggr(m: pyg.SAGEConv):
    """PyG's aggregation under fastdl's name ("add" is "sum")."""
    return "sum" if m.aggr == "add" else m.aggr


def _gin_problem(m: pyg.GINConv) -> str | None:
    return _common_problem(m, "add")


def _share(twin: nn.Module, original: nn.Module) -> nn.Module:
    for name, p in original.named_parameters():
        owner, _, attr = name.rpartition(".")
        setattr(twin.get_submodule(owner), attr, p)
    twin.__dict__[PYG_LAYER] = original
    return twin.train(original.training)


def _gcn(m: pyg.GCNConv) -> GCNConv:
    return _share(
        GCNConv(m.in_channels, m.out_channels, cached=m.cached, bias=m.bias is not None), m
    )


def _gat(m: pyg.GATConv) -> GATConv:
    twin = GATConv(
        m.in_channels, m.out_channels, m.heads, m.concat, m.negative_slope, m.dropout,
        m.add_self_loops, bias=m.bias is not None,
    )  # fmt: skip
    return _share(twin, m)


def _sage(m: pyg.SAGEConv) -> SAGEConv:
    twin = SAGEConv(
        m.in_channels, m.out_channels, _sage_aggr(m), m.root_weight, m.lin_l.bias is not None
    )
    return _share(twin, m)


def _gin(m: pyg.GINConv) -> GINConv:
    # The same nn module (so its Parameters, and any of its modules patch swaps, are shared);
    # eps the same Parameter or, without train_eps, the same buffer.
    twin = GINConv(m.nn, m.initial_eps, isinstance(m.eps, nn.Parameter))
    if not isinstance(m.eps, nn.Parameter):
        twin.eps = m.eps
    return _share(twin, m)


RULES = {
    pyg.GCNConv: (_gcn_problem, _gcn, GCNConv),
    pyg.GATConv: (_gat_problem, _gat, GATConv),
    pyg.SAGEConv: (_sage_problem, _sage, SAGEConv),
    pyg.GINConv: (_gin_problem, _gin, GINConv),
}


def recognise(module: nn.Module) -> Swap | str | None:
    """fastdl.patch's hook: the swap for a PyG layer (exact class), why it is left, or None."""
    rule = RULES.get(type(module))
    if rule is None:
        return None
    problem, build, twin = rule
    return problem(module) or Swap(type(module).__name__, qualname(twin), build, in_place=False)
