"""fastdl.Graph: a graph as a CSR by destination node, built once from a COO ``edge_index`` and
validated once, with its transpose (by source node) built lazily for backward passes.

Edge ``k`` of ``edge_index`` goes from ``edge_index[0, k]`` (source ``j``) to ``edge_index[1, k]``
(destination ``i``), as in PyTorch Geometric: messages flow source -> destination and every op
aggregates over each node's incoming edges. ``perm[e]`` is the edge id of CSR entry ``e`` (None
when edge_index is already sorted by destination), so per-edge tensors given in edge order map
onto CSR entries and back.

Under torch.compile (fullgraph, static or dynamic shapes) a Graph is built without reading a
value on the host: every shape follows from num_nodes and the number of edges (edge_index is
always sorted; the range check runs in the compiled graph, see _check_range), and
:meth:`Graph.self_loops_to_sink` stands in for the removal of self loops, whose result has a
data-dependent number of edges.
"""

import torch

from fastdl import _checks

INDEX_DTYPES = (torch.int64, torch.int32)


def _fail(msg: str, exc: type[Exception] = ValueError) -> None:
    raise exc(msg)


def _num_nodes(op: str, num_nodes) -> int:
    """num_nodes as an int >= 0; a float or None is refused rather than truncated or crashed on."""
    n = _checks.as_int(num_nodes)  # ints, numpy and 0-d tensor integers; not float, None
    if n is None:
        _fail(f"{op}: num_nodes must be an int, got {type(num_nodes).__name__}", TypeError)
    if n < 0:
        _fail(f"{op}: num_nodes must be >= 0, got {n}")
    return n


def check_csr(op: str, rowptr: torch.Tensor, col: torch.Tensor, num_nodes: int) -> None:
    """rowptr starts at 0, never decreases, ends at nnz; col in [0, num_nodes) (the C++ ops check
    the same before any kernel reads memory)."""
    for name, t in (("rowptr", rowptr), ("col", col)):
        if not isinstance(t, torch.Tensor):
            _fail(f"{op}: {name} must be a tensor, got {type(t).__name__}", TypeError)
        if t.dtype not in INDEX_DTYPES:
            _fail(
                f"{op}: {name} must be an integer index tensor (int64 or int32), got {t.dtype}",
                _checks.DtypeError,
            )
        if t.dim() != 1:
            _fail(f"{op}: {name} must be 1-D, got shape {list(t.shape)}")
    if rowptr.numel() == 0:
        _fail(f"{op}: malformed CSR: rowptr is empty; it needs num_nodes + 1 >= 1 entries")
    if rowptr.numel() != num_nodes + 1:
        _fail(
            f"{op}: rowptr must have num_nodes + 1 = {num_nodes + 1} entries, got {rowptr.numel()}"
        )
    if rowptr[0].item() != 0:
        _fail(f"{op}: malformed CSR: rowptr[0] must be 0, got {rowptr[0].item()}")
    if num_nodes and bool((rowptr[1:] < rowptr[:-1]).any()):
        _fail(f"{op}: malformed CSR: rowptr decreases")
    if rowptr[-1].item() != col.numel():
        _fail(
            f"{op}: malformed CSR: rowptr must end at the number of entries {col.numel()}, "
            f"got {rowptr[-1].item()}"
        )
    _check_range(op, "col", col, num_nodes)


def _check_range(op: str, name: str, idx: torch.Tensor, num_nodes: int) -> None:
    if torch.compiler.is_compiling():
        # .item() would make the branch data-dependent, which torch.compile cannot trace: the
        # compiled graph checks instead (its message cannot name the bad index).
        in_range = ((idx >= 0) & (idx < num_nodes)).all()
        torch._assert_async(
            in_range,
            f"{op}: {name} index out of range for num_nodes={num_nodes} (expected [0, "
            f"{num_nodes}))",
        )
        return
    if idx.numel() == 0:
        return
    lo, hi = idx.min().item(), idx.max().item()
    if lo < 0 or hi >= num_nodes:
        bad = lo if lo < 0 else hi
        _fail(
            f"{op}: {name} index {bad} out of range for num_nodes={num_nodes} (expected [0, "
            f"{num_nodes}))",
            IndexError,
        )


class Graph:
    """A directed graph on ``num_nodes`` nodes as a CSR by destination node.

    Build it with :meth:`from_edge_index` (COO, as PyTorch Geometric) or :meth:`from_csr`.
    Attributes: ``rowptr`` (num_nodes + 1,) and ``col`` (num_edges,) int64, ``perm`` (CSR entry
    -> edge id, or None), ``edge_weight`` (in CSR entry order, or None). Immutable; derived
    structures (transpose, degrees) are cached.
    """

    def __init__(self, rowptr, col, num_nodes, perm=None, edge_weight=None, num_input_edges=None):
        self.rowptr, self.col, self.num_nodes = rowptr, col, int(num_nodes)
        self.perm, self.edge_weight = perm, edge_weight
        # Length of the per-edge tensors users pass (edge_index order); perm indexes into them.
        self.num_input_edges = col.numel() if num_input_edges is None else num_input_edges
        self._transpose = None
        self._inv_perm = None
        self._no_loops = None  # the graph without self loops, when it has some
        self._loop_free = False  # known to have none (a flag: no reference cycle to itself)
        self._with_loops = None

    # ---------------------------------------------------------------- construction

    @classmethod
    def from_edge_index(cls, edge_index, num_nodes, edge_weight=None) -> "Graph":
        """Validate a COO ``edge_index`` (2, E) of int64/int32 indices in [0, num_nodes) (and
        ``edge_weight`` (E,) when given) once, and sort it into a CSR by destination."""
        op = "fastdl.Graph.from_edge_index"
        if not isinstance(edge_index, torch.Tensor):
            _fail(f"{op}: edge_index must be a tensor, got {type(edge_index).__name__}", TypeError)
        if edge_index.dtype not in INDEX_DTYPES:
            _fail(
                f"{op}: edge_index must be an integer tensor (int64 or int32), got "
                f"{edge_index.dtype}",
                _checks.DtypeError,
            )
        if edge_index.dim() != 2 or edge_index.shape[0] != 2:
            _fail(f"{op}: edge_index must have shape (2, E), got {list(edge_index.shape)}")
        num_nodes = _num_nodes(op, num_nodes)
        _check_range(op, "edge_index", edge_index, num_nodes)
        num_edges = edge_index.shape[1]
        if edge_weight is not None:
            _check_edge_values(op, "edge_weight", edge_weight, edge_index, num_edges)
        src, dst = edge_index[0].long(), edge_index[1].long()
        if _sorted(dst):
            perm, col = None, src.contiguous()
        else:
            perm = torch.argsort(dst, stable=True)
            col, dst = src[perm], dst[perm]
        rowptr = _rowptr(dst, num_nodes)
        if edge_weight is not None and perm is not None:
            edge_weight = edge_weight[perm]
        return cls(rowptr, col, num_nodes, perm, edge_weight)

    @classmethod
    def from_csr(cls, rowptr, col, num_nodes=None, edge_weight=None) -> "Graph":
        """A graph from a CSR by destination (rowptr (N + 1,), col = source indices), validated
        (rowptr starts at 0, never decreases, ends at nnz; col in range). edge_weight in CSR
        entry order."""
        op = "fastdl.Graph.from_csr"
        if not isinstance(rowptr, torch.Tensor):
            _fail(f"{op}: rowptr must be a tensor, got {type(rowptr).__name__}", TypeError)
        num_nodes = rowptr.numel() - 1 if num_nodes is None else _num_nodes(op, num_nodes)
        check_csr(op, rowptr, col, num_nodes)
        if edge_weight is not None:
            _check_edge_values(op, "edge_weight", edge_weight, col, col.numel())
        return cls(
            rowptr.long().contiguous(), col.long().contiguous(), num_nodes, None, edge_weight
        )

    # ---------------------------------------------------------------- derived structure

    @property
    def num_edges(self) -> int:
        return self.col.numel()

    @property
    def device(self) -> torch.device:
        return self.col.device

    def __repr__(self) -> str:
        w = ", weighted" if self.edge_weight is not None else ""
        return f"Graph(num_nodes={self.num_nodes}, num_edges={self.num_edges}{w})"

    def dst(self) -> torch.Tensor:
        """The destination node of each CSR entry."""
        # output_size: a static shape under torch.compile, and no pass over counts to size it.
        nodes = torch.arange(self.num_nodes, device=self.device)
        return torch.repeat_interleave(nodes, self.in_degree(), output_size=self.num_edges)

    def transpose(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The CSR by source node: (t_rowptr, t_col = destination, t_perm = the CSR entry of each
        transposed entry); built on first use and cached."""
        if self._transpose is None:
            t_perm = torch.argsort(self.col, stable=True)
            t_col = self.dst()[t_perm]
            self._transpose = (_rowptr(self.col[t_perm], self.num_nodes), t_col, t_perm)
        return self._transpose

    def inv_perm(self) -> torch.Tensor | None:
        """Edge id -> CSR entry (None when the edges were already in CSR order)."""
        if self.num_input_edges != self.num_edges:
            raise RuntimeError(
                "fastdl.Graph: this graph dropped or added edges; per-entry values have no "
                "edge_index order"
            )
        if self.perm is None:
            return None
        if self._inv_perm is None:
            inv = torch.empty_like(self.perm)
            inv[self.perm] = torch.arange(self.perm.numel(), device=self.device)
            self._inv_perm = inv
        return self._inv_perm

    def in_degree(self) -> torch.Tensor:
        """Incoming edges per node (int64)."""
        return self.rowptr[1:] - self.rowptr[:-1]

    def out_degree(self) -> torch.Tensor:
        """Outgoing edges per node (int64)."""
        return torch.bincount(self.col, minlength=self.num_nodes)

    def gcn_norm(self, improved: bool = False) -> torch.Tensor:
        """The Kipf coefficients D^-1/2 (A + I) D^-1/2 of each CSR entry (self loops not
        included; fastdl.gcn_aggregate computes them on the fly and never needs this)."""
        w = self.edge_weight
        if w is None:
            w = torch.ones(self.num_edges, device=self.device)
        deg = torch.zeros(self.num_nodes, dtype=w.dtype, device=self.device)
        dinv = (deg.index_add(0, self.dst(), w) + (2.0 if improved else 1.0)).pow(-0.5)
        return dinv[self.dst()] * w * dinv[self.col]

    def without_self_loops(self) -> "Graph":
        """:meth:`remove_self_loops`, computed once and cached (self when there are none). Not
        under torch.compile: see :meth:`self_loops_to_sink`."""
        if self._loop_free:
            return self
        if self._no_loops is None:
            if not (self.num_edges and bool((self.col == self.dst()).any())):
                self._loop_free = True
                return self
            self._no_loops = self.remove_self_loops()
            self._no_loops._loop_free = True
        return self._no_loops

    def with_self_loops(self) -> "Graph":
        """Exactly one self loop per node (existing ones replaced), computed once and cached."""
        if self._with_loops is None:
            self._with_loops = self.without_self_loops().add_self_loops()
        return self._with_loops

    def add_self_loops(self, fill_value: float = 1.0) -> "Graph":
        """A new graph with one self loop (weight ``fill_value`` when weighted) appended after
        the existing incoming edges of every node."""
        n, dev = self.num_nodes, self.device
        rowptr = self.rowptr + torch.arange(n + 1, device=dev)
        loop_pos = rowptr[1:] - 1
        # Entry e of row r moves r places: one new loop in each row before it. Index positions,
        # not a boolean mask, so the shapes stay static under torch.compile.
        pos = torch.arange(self.num_edges, device=dev) + self.dst()
        col = self.col.new_empty(self.num_edges + n)
        col[pos] = self.col
        col[loop_pos] = torch.arange(n, device=dev)
        w = None
        if self.edge_weight is not None:
            w = self.edge_weight.new_empty(self.num_edges + n)
            w[pos] = self.edge_weight
            w[loop_pos] = fill_value
        return Graph(rowptr, col, n, None, w)

    def remove_self_loops(self) -> "Graph":
        """A new graph without the edges i -> i; per-edge values in the original edge_index
        order still apply to it (its perm maps each entry to its original edge)."""
        keep = self.col != self.dst()
        counts = torch.bincount(self.dst()[keep], minlength=self.num_nodes)
        w = None if self.edge_weight is None else self.edge_weight[keep]
        kept = keep.nonzero().view(-1)
        perm = kept if self.perm is None else self.perm[kept]
        return Graph(
            _rowptr_from_counts(counts),
            self.col[keep],
            self.num_nodes,
            perm,
            w,
            self.num_input_edges,
        )

    def self_loops_to_sink(self, add_self_loops: bool = False) -> "Graph":
        """This graph on num_nodes + 1 nodes, its self loops i -> i turned into loops of the extra
        last node (the sink), then (``add_self_loops``) one new loop appended to every node.
        Nodes 0..num_nodes-1 get the incoming edges of :meth:`without_self_loops`
        (:meth:`with_self_loops`) in the same order, but the number of entries does not depend
        on the data, so torch.compile traces it with static shapes: aggregate features with a
        zero row appended for the sink and drop its output row. perm and edge_weight follow the
        moved entries (added loops: as :meth:`add_self_loops`)."""
        n, dst = self.num_nodes, self.dst()
        loop = self.col == dst
        rows = torch.where(loop, n, dst)
        order = torch.argsort(rows, stable=True)
        col = torch.where(loop, n, self.col)[order]
        rowptr = _rowptr(rows[order], n + 1)
        perm = order if self.perm is None else self.perm[order]
        w = None if self.edge_weight is None else self.edge_weight[order]
        sunk = Graph(rowptr, col, n + 1, perm, w, self.num_input_edges)
        return sunk.add_self_loops() if add_self_loops else sunk

    def to(self, device) -> "Graph":
        def mv(t):
            return None if t is None else t.to(device)

        return Graph(
            mv(self.rowptr),
            mv(self.col),
            self.num_nodes,
            mv(self.perm),
            mv(self.edge_weight),
            self.num_input_edges,
        )

    # ---------------------------------------------------------------- per-edge values

    def edge_values(self, op: str, name: str, values: torch.Tensor | None) -> torch.Tensor | None:
        """Per-edge ``values`` given in edge_index order, in CSR entry order (differentiably);
        the graph's own edge_weight when values is None."""
        if values is None:
            return self.edge_weight
        _check_edge_values(op, name, values, self.col, self.num_input_edges)
        return values if self.perm is None else values[self.perm]

    def to_edge_order(self, values: torch.Tensor) -> torch.Tensor:
        """Per-entry values in CSR order back in edge_index order (differentiably)."""
        inv = self.inv_perm()
        return values if inv is None else values[inv]


def _check_edge_values(op, name, values, ref, num_edges):
    if not isinstance(values, torch.Tensor) or not values.is_floating_point():
        got = values.dtype if isinstance(values, torch.Tensor) else type(values).__name__
        _fail(f"{op}: {name} must be a floating-point tensor, got {got}", _checks.DtypeError)
    if values.device != ref.device:
        _fail(
            f"{op}: {name} is on {values.device} but the graph is on {ref.device}; all tensors "
            "must be on the same device",
            RuntimeError,
        )
    if values.dim() != 1 or values.numel() != num_edges:
        _fail(
            f"{op}: {name} must have shape ({num_edges},) (one value per edge), got "
            f"{list(values.shape)}"
        )


def _rowptr_from_counts(counts: torch.Tensor) -> torch.Tensor:
    return torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])


def _rowptr(sorted_rows: torch.Tensor, num_nodes: int) -> torch.Tensor:
    # Where each row starts among the sorted entries: num_nodes + 1 values whatever the data
    # (bincount's length follows the largest value, which torch.compile cannot trace), and
    # faster than bincount + cumsum (18 vs 33 ms for 2M edges on 2 cores).
    rows = torch.arange(num_nodes + 1, dtype=sorted_rows.dtype, device=sorted_rows.device)
    # searchsorted warns on a non-contiguous boundary (a row of a PyG-style edge_index.t()).
    return torch.searchsorted(sorted_rows.contiguous(), rows)


def _sorted(rows: torch.Tensor) -> bool:
    """Whether rows never decrease, so the sort into CSR can be skipped; never under
    torch.compile, whose graph cannot branch on the answer (the sort is stable: same CSR)."""
    if torch.compiler.is_compiling():
        return False
    return bool((rows[1:] >= rows[:-1]).all())
