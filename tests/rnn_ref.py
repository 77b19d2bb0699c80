"""Float64 references for the rnn tests: torch.nn's own LSTM/GRU (packed-sequence path for
variable lengths) on float64 copies of the same weights and inputs, compared under DESIGN §4
(tests/norm_ref.assert_matches)."""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from norm_ref import assert_matches
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastdl

TABLE_ROWS = 7


@dataclass(frozen=True)
class RnnCase:
    kind: str  # "lstm" or "gru"
    T: int
    B: int
    IN: int
    H: int
    layers: int = 1
    bidir: bool = False
    proj: int = 0
    bias: bool = True
    batch_first: bool = False
    lengths: bool = False  # variable lengths (including 1 and T)
    # fastdl gets the first layer's input projected (x W_ih^T per direction, w_ih None); the
    # gradients still reach x and w_ih, through the caller's product.
    projected: bool = False
    # x is an embedding table (TABLE_ROWS, IN) read at index(): torch gets F.embedding(index, x),
    # fastdl the table x W_ih^T per direction and the index (the ops gather the rows); "grad x"
    # is then the table's gradient.
    indexed: bool = False

    def index(self, device="cpu") -> torch.Tensor:
        """The rows the positions read, (T, B) ((B, T) with batch_first); every row, repeats."""
        seq = (self.B, self.T) if self.batch_first else (self.T, self.B)
        gen = torch.Generator().manual_seed(self.T * 100 + self.B)
        return torch.randint(0, TABLE_ROWS, seq, generator=gen).to(device)

    def __str__(self) -> str:
        flags = [
            f"L{self.layers}" if self.layers > 1 else "",
            "bi" if self.bidir else "",
            f"proj{self.proj}" if self.proj else "",
            "" if self.bias else "nobias",
            "bf" if self.batch_first else "",
            "len" if self.lengths else "",
            "projin" if self.projected else "",
            "index" if self.indexed else "",
        ]
        return "-".join([self.kind, f"{self.T}x{self.B}x{self.IN}x{self.H}", *filter(None, flags)])

    def module(self, dtype=torch.float64) -> nn.Module:
        kw = {"proj_size": self.proj} if self.kind == "lstm" else {}
        cls = nn.LSTM if self.kind == "lstm" else nn.GRU
        return cls(
            self.IN,
            self.H,
            self.layers,
            bias=self.bias,
            batch_first=self.batch_first,
            bidirectional=self.bidir,
            **kw,
        ).to(dtype)


def make_inputs(case: RnnCase, device="cpu"):
    """x, (h0[, c0]), lengths (CPU int64 or None), and the output gradients, all float64."""
    dirs = 2 if case.bidir else 1
    seq = (case.B, case.T) if case.batch_first else (case.T, case.B)
    shape = (TABLE_ROWS, case.IN) if case.indexed else (*seq, case.IN)
    x = torch.randn(shape, dtype=torch.float64, device=device)
    out = case.proj or case.H
    h0 = 0.5 * torch.randn(case.layers * dirs, case.B, out, dtype=torch.float64, device=device)
    states = [h0]
    if case.kind == "lstm":
        states.append(
            torch.randn(case.layers * dirs, case.B, case.H, dtype=torch.float64, device=device)
        )
    lengths = None
    if case.lengths:
        lengths = torch.randint(1, case.T + 1, (case.B,))
        lengths[0] = case.T
        lengths[-1] = 1 if case.B > 1 else case.T
    y_shape = (*seq, dirs * out)
    grads = [torch.randn(y_shape, dtype=torch.float64, device=device)]
    grads += [torch.randn_like(s) for s in states]
    return x, states, lengths, grads


def run_torch(mod: nn.Module, case: RnnCase, x, states, lengths):
    hx = tuple(states) if case.kind == "lstm" else states[0]
    if case.indexed:
        x = F.embedding(case.index(x.device), x)
    if lengths is None:
        y, h = mod(x, hx)
    else:
        packed = pack_padded_sequence(x, lengths, case.batch_first, enforce_sorted=False)
        y, h = mod(packed, hx)
        y, _ = pad_packed_sequence(y, case.batch_first, total_length=case.T)
    return (y, *h) if case.kind == "lstm" else (y, h)


def run_fastdl(mod: nn.Module, case: RnnCase, x, states, lengths):
    fn = fastdl.lstm if case.kind == "lstm" else fastdl.gru
    hx = tuple(states) if case.kind == "lstm" else states[0]
    lens = None if lengths is None else lengths.to(x.device)
    params = list(mod._flat_weights)
    if case.projected or case.indexed:
        dirs = 2 if case.bidir else 1
        per = len(params) // (case.layers * dirs)
        x = torch.cat([x @ params[d * per].t() for d in range(dirs)], -1)
        for d in range(dirs):
            params[d * per] = None
    y, h = fn(
        x,
        hx,
        params,
        case.bias,
        case.layers,
        0.0,
        False,
        case.bidir,
        case.batch_first,
        lengths=lens,
        index=case.index(x.device) if case.indexed else None,
    )
    return (y, *h) if case.kind == "lstm" else (y, h)


def _fwd_bwd(run, mod, case, x, states, lengths, grads, dtype):
    x = x.detach().to(dtype).requires_grad_()
    states = [s.detach().to(dtype).requires_grad_() for s in states]
    outs = run(mod, case, x, states, lengths)
    params = list(mod.parameters())
    g = torch.autograd.grad(outs, [x, *states, *params], [t.to(dtype) for t in grads])
    return [*outs, *g]


def names(case: RnnCase, mod: nn.Module) -> list[str]:
    outs = ["y", "h_n", "c_n"] if case.kind == "lstm" else ["y", "h_n"]
    states = ["grad h0", "grad c0"] if case.kind == "lstm" else ["grad h0"]
    return [*outs, "grad x", *states, *(f"grad {n}" for n, _ in mod.named_parameters())]


def check_rnn(case: RnnCase, dtype: torch.dtype, device="cpu"):
    """fastdl against torch.nn in float64: outputs, final states and every gradient (input,
    initial states, each parameter); bfloat16/float16 also against torch's own result in that
    dtype (the 2x rule)."""
    # The reference sees the inputs and weights as rounded to dtype, so only the computation
    # differs.
    ref_mod = case.module()
    with torch.no_grad():
        for p in ref_mod.parameters():
            p.copy_(p.to(dtype).double())
    x, states, lengths, grads = make_inputs(case, device)
    x, grads = x.to(dtype).double(), [g.to(dtype).double() for g in grads]
    states = [s.to(dtype).double() for s in states]
    ref = _fwd_bwd(run_torch, ref_mod.to(device), case, x, states, lengths, grads, torch.float64)
    ours_mod = case.module(dtype).to(device)
    ours_mod.load_state_dict(ref_mod.state_dict())
    ours = _fwd_bwd(run_fastdl, ours_mod, case, x, states, lengths, grads, dtype)
    base = None
    if dtype in (torch.bfloat16, torch.float16):
        base = _fwd_bwd(run_torch, ours_mod, case, x, states, lengths, grads, dtype)
    for i, name in enumerate(names(case, ref_mod)):
        assert ours[i].dtype == dtype, f"{case} {name}: dtype {ours[i].dtype}"
        assert_matches(ours[i], ref[i], None if base is None else base[i], f"{case} {name}")
