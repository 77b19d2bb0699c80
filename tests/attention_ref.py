"""Float64 references for the attention family: the plain softmax(q k^T * scale + mask) v with
the band (causal/window, either alignment) and the dropout draw of csrc/common/attention_math.h
recomputed here independently, so any backend's output and gradients can be compared."""

import math

import torch

M32 = 0xFFFFFFFF


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    # (x * c) mod 2^32 on int64 tensors without overflowing int64: by 16-bit halves of x.
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & M32


def mix32(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 (C. Wellons), as fastdl_mix32."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def dropout_keep(seed: int, counter: torch.Tensor, p: float) -> torch.Tensor:
    """The keep mask for int64 counters (all < 2^63 here), as fastdl_dropout_keep."""
    if p >= 1:
        return torch.zeros(counter.shape, dtype=torch.bool, device=counter.device)
    s = seed % 2**64
    x = mix32((counter & M32) ^ (s & M32))
    x = mix32(x ^ (counter >> 32) ^ (s >> 32))
    threshold = min(math.floor(p * 2**32), M32)
    return x >= threshold


def band(sq: int, sk: int, left: int, right: int, bottom_right: bool, device=None) -> torch.Tensor:
    """(sq, sk) bool: key j allowed for query i."""
    i = torch.arange(sq, device=device)[:, None] + (sk - sq if bottom_right else 0)
    j = torch.arange(sk, device=device)[None, :]
    ok = torch.ones(sq, sk, dtype=torch.bool, device=device)
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


def sdpa(
    q,
    k,
    v,
    mask=None,
    scale=None,
    left=-1,
    right=-1,
    bottom_right=False,
    p=0.0,
    seed=0,
    ctr=None,
):
    """Reference attention on (B, H, S, D) tensors (any float dtype; differentiable, including
    w.r.t. a float mask). ``ctr`` overrides the dropout counters ((B, Hq, Sq, Sk) int64)."""
    b, hq, sq, d = q.shape
    hk, sk = k.shape[1], k.shape[2]
    k = k.repeat_interleave(hq // hk, 1) if hk else k
    v = v.repeat_interleave(hq // hk, 1) if hk else v
    scale = 1 / math.sqrt(d) if scale is None else scale
    s = q @ k.transpose(-1, -2) * scale
    if mask is not None:
        s = s.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else s + mask
    s = s.masked_fill(~band(sq, sk, left, right, bottom_right, s.device), -math.inf)
    m = s.amax(-1, keepdim=True).detach() if sk else s.new_zeros(b, hq, sq, 1)
    m = torch.where(torch.isinf(m) & (m < 0), torch.zeros_like(m), m)
    e = torch.exp(s - m)
    probs = e / e.sum(-1, keepdim=True).clamp_min(torch.finfo(e.dtype).tiny)
    if p > 0:
        if ctr is None:
            ctr = torch.arange(b * hq * sq * sk, dtype=torch.int64, device=q.device)
            ctr = ctr.view(b, hq, sq, sk)
        keep = dropout_keep(seed, ctr, p)
        probs = probs * keep / (1 - p) if p < 1 else probs * 0
    return probs @ v


def varlen(q, k, v, cu_q, cu_k, **kw):
    """Reference varlen attention: each packed sequence through sdpa, with the packed dropout
    counters (h * Tq + tq) * Tk + tk."""
    tq, tk = q.shape[0], k.shape[0]
    hq = q.shape[1]
    outs = []
    for n in range(len(cu_q) - 1):
        a, b_ = int(cu_q[n]), int(cu_q[n + 1])
        c, d = int(cu_k[n]), int(cu_k[n + 1])
        ctr = (
            (torch.arange(hq)[:, None, None] * tq + torch.arange(a, b_)[None, :, None]) * tk
            + torch.arange(c, d)[None, None, :]
        )[None].to(q.device)
        qs, ks, vs = (t.transpose(0, 1)[None] for t in (q[a:b_], k[c:d], v[c:d]))
        outs.append(sdpa(qs, ks, vs, ctr=ctr, **kw)[0].transpose(0, 1))
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
