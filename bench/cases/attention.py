"""Attention cases: fused SDPA forward and forward+backward (causal and not), packed varlen
against torch's padded call, sliding-window attention against SDPA with the equivalent boolean
mask; float32 with the attention issue's targets, bfloat16 rows beside them.

FLOPs follow the usual convention: 4 * B * H * Sq * Sk * D for the forward over the allowed
(query, key) pairs only (causal: about half, window: the band), backward 2.5x the forward.
"""

import torch
import torch.nn.functional as F

import fastdl
from bench.cases import Case, Inputs, Target

SHAPE = (8, 16, 1024, 64)  # (B, H, S, D)
WINDOW = 256  # keys i - 256 .. i (causal sliding window)
WINDOW_SHAPE = (1, 16, 4096, 64)
DTYPES = (torch.float32, torch.bfloat16)


def _randn(shape, dtype, device, grad=False):
    return torch.randn(shape, device=device).to(dtype).requires_grad_(grad)


def _qkv(case: Case, device: torch.device) -> Inputs:
    torch.manual_seed(0)
    grad = case.mode == "fwd+bwd"
    q, k, v = (_randn(case.shape, case.dtype, device, grad) for _ in range(3))
    return Inputs((q, k, v), _randn(case.shape, case.dtype, device) if grad else None)


def _sdpa(causal):
    def run(q, k, v):
        return fastdl.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _sdpa_torch(causal):
    def run(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    return run


def _window_inputs(case: Case, device: torch.device) -> Inputs:
    inputs = _qkv(case, device)
    s = case.shape[2]
    i, j = torch.arange(s)[:, None], torch.arange(s)[None, :]
    mask = ((j <= i) & (j >= i - WINDOW)).to(device)
    return Inputs((*inputs.args, mask), inputs.grad)


def _window(q, k, v, mask):
    return fastdl.scaled_dot_product_attention(q, k, v, window=(WINDOW, 0))


def _window_torch(q, k, v, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def _lengths(b: int, s: int) -> torch.Tensor:
    """Sequence lengths from s/16 to 15s/16 (mean s/2): half the padded tokens are padding."""
    return torch.linspace(s // 16, s - s // 16, b).round().long()


def _varlen_inputs(case: Case, device: torch.device) -> Inputs:
    """Packed (T, H, D) q/k/v with their cu_seqlens and the padded positions of each token."""
    torch.manual_seed(0)
    b, h, s, d = case.shape
    lens = _lengths(b, s)
    total = int(lens.sum())
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lens.cumsum(0)]).to(torch.int32)
    pos = torch.cat([n * s + torch.arange(int(ln)) for n, ln in enumerate(lens)])
    grad = case.mode == "fwd+bwd"
    q, k, v = (_randn((total, h, d), case.dtype, device, grad) for _ in range(3))
    g = _randn((total, h, d), case.dtype, device) if grad else None
    return Inputs((q, k, v, cu.to(device), pos.to(device), s), g)


def _varlen(q, k, v, cu, pos, s):
    return fastdl.varlen_attention(q, k, v, cu, cu, s, s)


def _varlen_torch(q, k, v, cu, pos, s):
    """torch's way: scatter into (B, H, S, D) padding, SDPA with the key-padding mask, gather
    the real tokens back (the copies cost a few percent of the call)."""
    b = cu.numel() - 1
    h, d = q.shape[1:]

    def pad(t):
        out = t.new_zeros(b * s, h, d).index_copy(0, pos, t)
        return out.view(b, s, h, d).transpose(1, 2)

    valid = torch.zeros(b * s, dtype=torch.bool, device=q.device).index_fill(0, pos, True)
    mask = valid.view(b, 1, 1, s)
    out = F.scaled_dot_product_attention(pad(q), pad(k), pad(v), attn_mask=mask)
    return out.transpose(1, 2).reshape(b * s, h, d).index_select(0, pos)


def _flops(shape, mode, pairs):
    b, h, _, d = shape
    fwd = 4 * b * h * pairs * d
    return fwd if mode == "fwd" else int(3.5 * fwd)


def _pairs_causal(s):
    return s * (s + 1) // 2


def _pairs_window(s):
    return sum(min(i, WINDOW) + 1 for i in range(s))


def _pairs_varlen(b, s):
    return int((_lengths(b, s) ** 2).sum())


_S = SHAPE[2]
# (op, mode, shape, variant, pairs per head, target on float32, make, fastdl, eager)
SPECS = (
    (
        "sdpa",
        "fwd",
        SHAPE,
        "",
        _S * _S,
        Target(eager=1.1, peak=0.7),
        _qkv,
        _sdpa(False),
        _sdpa_torch(False),
    ),
    (
        "sdpa",
        "fwd",
        SHAPE,
        "causal",
        _pairs_causal(_S),
        Target(eager=1.6, peak=0.7),
        _qkv,
        _sdpa(True),
        _sdpa_torch(True),
    ),
    (
        "sdpa",
        "fwd+bwd",
        SHAPE,
        "causal",
        _pairs_causal(_S),
        Target(eager=1.5),
        _qkv,
        _sdpa(True),
        _sdpa_torch(True),
    ),
    ("sdpa", "fwd+bwd", SHAPE, "", _S * _S, None, _qkv, _sdpa(False), _sdpa_torch(False)),
    (
        "varlen",
        "fwd",
        SHAPE,
        "half padding",
        _pairs_varlen(SHAPE[0], _S) // SHAPE[0],
        Target(eager=2.0),
        _varlen_inputs,
        _varlen,
        _varlen_torch,
    ),
    (
        "sdpa",
        "fwd",
        WINDOW_SHAPE,
        f"window {WINDOW}",
        _pairs_window(WINDOW_SHAPE[2]),
        Target(eager=4.0),
        _window_inputs,
        _window,
        _window_torch,
    ),
)

CASES = [
    Case(
        family="attention",
        op=op,
        mode=mode,
        shape=shape,
        dtype=dtype,
        flops=_flops(shape, mode, pairs),
        variant=variant,
        target=target if dtype == torch.float32 else None,
        make=make,
        fastdl=fd,
        eager=eager,
    )
    for op, mode, shape, variant, pairs, target, make, fd, eager in SPECS
    for dtype in DTYPES
]
