"""Graph cases: spmm against torch's CSR sparse x dense and the gather + index_add_ path (PyG's
fallback), GCN and GAT layers against torch_geometric's (when installed), on a uniform random
graph and a power-law one (100k nodes, 2M edges, 64 features), float32 and bfloat16 rows.

Shapes are (edges, features); traffic counts the gathered rows (edges x features elements),
which dominate every op here, so the GB/s column is the gather bandwidth.
"""

import copy
import functools
import importlib.util

import torch

import fastdl
from bench.cases import Case, Inputs, Target

NODES, EDGES, FEATURES = 100_000, 2_000_000, 64
HAS_PYG = importlib.util.find_spec("torch_geometric") is not None


@functools.cache
def _edge_index(skew: bool) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    src = torch.randint(0, NODES, (EDGES,), generator=g)
    if skew:  # in-degrees ~ power law: a few hubs take a large share of the edges
        dst = (torch.rand(EDGES, generator=g) ** 3 * NODES).long().clamp_max(NODES - 1)
    else:
        dst = torch.randint(0, NODES, (EDGES,), generator=g)
    return torch.stack([src, dst])


@functools.cache
def _graph(skew: bool, device: str) -> tuple:
    ei = _edge_index(skew).to(device)
    g = fastdl.Graph.from_edge_index(ei, NODES)
    g.transpose()  # built once, as a training loop would after its first step
    csr = torch.sparse_csr_tensor(g.rowptr, g.col, torch.ones(EDGES, device=device), (NODES, NODES))
    return ei, g, csr


def _x(case: Case, device):
    torch.manual_seed(0)
    return torch.randn(NODES, case.shape[1], device=device).to(case.dtype)


def _spmm_inputs(case: Case, device) -> Inputs:
    ei, g, csr = _graph("powerlaw" in case.variant, str(device))
    x = _x(case, device).requires_grad_(case.mode == "fwd+bwd")
    grad = torch.randn(NODES, case.shape[1], device=device).to(case.dtype)
    return Inputs((x, g, csr.to(case.dtype), ei), grad if case.mode == "fwd+bwd" else None)


def _spmm(reduce):
    def fn(x, g, csr, ei):
        return fastdl.spmm(g, x, reduce=reduce)

    return fn


def _torch_csr(x, g, csr, ei):
    return torch.sparse.mm(csr.to(x.dtype), x)


def _index_add(reduce):
    def fn(x, g, csr, ei):
        src, dst = ei
        out = torch.zeros(NODES, x.shape[1], dtype=x.dtype, device=x.device)
        if reduce == "sum":
            return out.index_add_(0, dst, x[src])
        idx = dst[:, None].expand(-1, x.shape[1])
        red = {"mean": "mean", "max": "amax"}[reduce]
        return out.scatter_reduce(0, idx, x[src], red, include_self=False)

    return fn


# ---------------------------------------------------------------- layers vs torch_geometric


def _layers(kind: str, heads: int):
    import torch_geometric.nn as pyg

    torch.manual_seed(0)
    if kind == "gcn":
        ref = pyg.GCNConv(FEATURES, FEATURES)
        fast = fastdl.nn.GCNConv(FEATURES, FEATURES)
    else:
        ref = pyg.GATConv(FEATURES, FEATURES // heads, heads=heads)
        fast = fastdl.nn.GATConv(FEATURES, FEATURES // heads, heads=heads)
    fast.load_state_dict(ref.state_dict())
    return fast, ref


def _layer_inputs(kind: str, heads: int = 1):
    def make(case: Case, device) -> Inputs:
        ei, g, _ = _graph("powerlaw" in case.variant, str(device))
        fast, ref = _layers(kind, heads)
        x = _x(case, device).requires_grad_(case.mode == "fwd+bwd")
        grad = torch.randn(NODES, FEATURES, device=device) if case.mode == "fwd+bwd" else None
        return Inputs((x, g, ei, fast.to(device), ref.to(device)), grad)

    return make


def _fast_layer(x, g, ei, fast, ref):
    return fast(x, g)


@functools.cache
def _double(module):
    return copy.deepcopy(module).double()


def _pyg_layer(x, g, ei, fast, ref):
    # The float64 reference runs a float64 copy of the layer.
    return (ref if x.dtype == torch.float32 else _double(ref))(x, ei)


def _spmm_case(reduce, mode, variant, baseline, dtype=torch.float32, target=None):
    eager = _torch_csr if baseline == "csr" else _index_add(reduce)
    return Case(
        family="graph",
        op=f"spmm_{reduce}",
        mode=mode,
        shape=(EDGES, FEATURES),
        dtype=dtype,
        make=_spmm_inputs,
        fastdl=_spmm(reduce),
        eager=eager,
        traffic=1,
        variant=f"{variant} vs {baseline}",
        target=target,
    )


def _layer_case(kind, heads, mode, target):
    return Case(
        family="graph",
        op=kind if kind == "gcn" else f"gat{heads}h",
        mode=mode,
        shape=(EDGES, FEATURES),
        dtype=torch.float32,
        make=_layer_inputs(kind, heads),
        fastdl=_fast_layer,
        eager=_pyg_layer,
        traffic=1,
        variant="uniform vs pyg",
        target=target,
    )


CASES = [
    _spmm_case("sum", "fwd", "uniform", "csr", target=Target(eager=1.2)),
    _spmm_case("sum", "fwd", "uniform", "index_add", target=Target(eager=25.0)),
    _spmm_case("mean", "fwd", "uniform", "index_add"),
    _spmm_case("max", "fwd", "uniform", "index_add"),
    _spmm_case("sum", "fwd", "powerlaw", "csr"),
    _spmm_case("sum", "fwd", "uniform", "index_add", dtype=torch.bfloat16),
    _spmm_case("sum", "fwd+bwd", "uniform", "index_add"),
]
if HAS_PYG:
    CASES += [
        _layer_case("gcn", 1, "fwd", Target(eager=10.0)),
        _layer_case("gcn", 1, "fwd+bwd", Target(eager=5.0)),
        _layer_case("gat", 1, "fwd", Target(eager=10.0)),
        _layer_case("gat", 1, "fwd+bwd", Target(eager=5.0)),
        _layer_case("gat", 4, "fwd", Target(eager=10.0)),
        _layer_case("gat", 4, "fwd+bwd", Target(eager=5.0)),
    ]
