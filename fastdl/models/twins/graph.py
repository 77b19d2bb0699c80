"""Plain torch twins of fastdl.models.graph: GCN and GAT with message passing written in torch
(gathers, index_add_, scatter_reduce), parameter names as PyTorch Geometric's layers.

Like the fastdl models, each layer prepares its edge list (self loops replaced by one per node,
and for GCN the normalization coefficients) once per edge_index tensor and reuses it while the
same, unmodified tensor comes back, as PyG's ``GCNConv(cached=True)`` does.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn


def _glorot(t: torch.Tensor) -> None:
    a = math.sqrt(6.0 / (t.size(-2) + t.size(-1)))
    nn.init.uniform_(t, -a, a)


class EdgeCache:
    """(src, dst) of edge_index with its self loops replaced by one per node, and the GCN
    coefficients D^-1/2 (A + I) D^-1/2 of each edge, computed for the last edge_index seen."""

    def __init__(self):
        self.key = None
        self.value = None

    def __call__(self, edge_index: torch.Tensor, n: int, dtype: torch.dtype):
        # Not cached under inference_mode or for an inference tensor (as the fastdl model).
        cached = not (edge_index.is_inference() or torch.is_inference_mode_enabled())
        key = (edge_index._version, n, dtype) if cached else None
        if cached and self.key is not None and self.key[0] is edge_index and self.key[1:] == key:
            return self.value
        src, dst = edge_index[0], edge_index[1]
        keep = src != dst
        loops = torch.arange(n, device=edge_index.device)
        src, dst = torch.cat([src[keep], loops]), torch.cat([dst[keep], loops])
        deg = torch.zeros(n, dtype=dtype, device=src.device).index_add_(
            0, dst, torch.ones(dst.numel(), dtype=dtype, device=src.device)
        )
        dinv = deg.rsqrt()
        value = (src, dst, dinv[src] * dinv[dst])
        if cached:
            self.key, self.value = (edge_index, *key), value
        return value


class GCNConv(nn.Module):
    def __init__(self, in_channels: int, out_channels: int, edges: EdgeCache):
        super().__init__()
        self.lin = nn.Linear(in_channels, out_channels, bias=False)
        self.bias = nn.Parameter(torch.zeros(out_channels))
        _glorot(self.lin.weight)
        self.edges = edges

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        src, dst, norm = self.edges(edge_index, x.shape[0], x.dtype)
        h = self.lin(x)
        out = torch.zeros_like(h).index_add_(0, dst, h[src] * norm.unsqueeze(1))
        return out + self.bias


class GATConv(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        heads: int,
        edges: EdgeCache,
        concat: bool = True,
    ):
        super().__init__()
        self.heads, self.out_channels, self.concat = heads, out_channels, concat
        self.lin = nn.Linear(in_channels, heads * out_channels, bias=False)
        self.att_src = nn.Parameter(torch.empty(1, heads, out_channels))
        self.att_dst = nn.Parameter(torch.empty(1, heads, out_channels))
        self.bias = nn.Parameter(torch.zeros(heads * out_channels if concat else out_channels))
        for t in (self.lin.weight, self.att_src, self.att_dst):
            _glorot(t)
        self.edges = edges

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        src, dst, _ = self.edges(edge_index, n, x.dtype)
        h = self.lin(x).view(n, self.heads, self.out_channels)
        score = F.leaky_relu(
            (h * self.att_src).sum(-1)[src] + (h * self.att_dst).sum(-1)[dst], 0.2
        )  # (E, heads)
        # Softmax over each node's incoming edges, shifted by the per-node max for stability.
        index = dst.unsqueeze(1).expand_as(score)
        top = torch.full((n, self.heads), -torch.inf, dtype=x.dtype, device=x.device)
        top = top.scatter_reduce(0, index, score, "amax", include_self=True)
        w = torch.exp(score - top[dst])
        total = torch.zeros(n, self.heads, dtype=x.dtype, device=x.device).index_add_(0, dst, w)
        alpha = w / total[dst]
        out = torch.zeros_like(h).index_add_(0, dst, h[src] * alpha.unsqueeze(-1))
        out = out.reshape(n, -1) if self.concat else out.mean(1)
        return out + self.bias


class GCN(nn.Module):
    def __init__(self, in_channels: int, hidden: int, num_classes: int, dropout: float = 0.5):
        super().__init__()
        self.dropout = dropout
        edges = EdgeCache()
        self.conv1 = GCNConv(in_channels, hidden, edges)
        self.conv2 = GCNConv(hidden, num_classes, edges)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.conv1(x, edge_index))
        h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h, edge_index)


class GAT(nn.Module):
    def __init__(
        self,
        in_channels: int,
        hidden: int,
        num_classes: int,
        heads: int = 8,
        dropout: float = 0.5,
    ):
        super().__init__()
        self.dropout = dropout
        edges = EdgeCache()
        self.conv1 = GATConv(in_channels, hidden, heads, edges)
        self.conv2 = GATConv(hidden * heads, num_classes, 1, edges, concat=False)

    def forward(self, x: torch.Tensor, edge_index: torch.Tensor) -> torch.Tensor:
        x = F.dropout(x, self.dropout, self.training)
        h = F.elu(self.conv1(x, edge_index))
        h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h, edge_index)
