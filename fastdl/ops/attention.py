"""Attention family: fused scaled dot-product attention (dense and variable-length).

Each op has a native implementation (C++ on CPU, CUDA on GPU; schemas and exact semantics in
csrc/ops.cpp and csrc/common/attention_math.h). The raw ops take the band as
``(window_left, window_right, bottom_right)`` (a negative side is unbounded; causal is
``window_right = 0``) and dropout as ``(dropout_p, seed, offset)``; the public functions below
translate torch's arguments. One fake kernel and one autograd formula serve every backend.
"""

from types import SimpleNamespace

import torch

from fastdl import _autocast, _backend, _checks, _ext
from fastdl.ops import _library

OPS = ("attention_fwd", "attention_bwd", "varlen_attention_fwd", "varlen_attention_bwd")
MAX_HEAD_DIM = 256
ALIGNMENTS = ("top_left", "bottom_right")


def _acc(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _grad_like(t: torch.Tensor, wanted: bool) -> torch.Tensor:
    # Gradients come back contiguous in the input's shape, empty when not asked for.
    return torch.empty(t.shape if wanted else (0,), dtype=t.dtype, device=t.device)


# ---------------------------------------------------------------- fake kernels (all backends)


def _attention_fwd_fake(q, k, v, attn_mask, dropout_p, seed, offset, left, right, br, scale):
    b, h, sq, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty(
        (b, h, sq), dtype=_acc(q)
    )


def _attention_bwd_fake(
    grad_out, q, k, v, attn_mask, out, lse, p, seed, offset, left, right, br, scale, mask
):
    want_mask = mask[3] and attn_mask is not None and attn_mask.dtype != torch.bool
    gm = torch.empty(attn_mask.shape, dtype=attn_mask.dtype, device=q.device) if want_mask else None
    return (
        _grad_like(q, mask[0]),
        _grad_like(k, mask[1]),
        _grad_like(v, mask[2]),
        gm if gm is not None else q.new_empty(0),
    )


def _varlen_fwd_fake(q, k, v, cu_q, cu_k, max_q, max_k, p, seed, offset, left, right, br, scale):
    t, h, _ = q.shape
    return torch.empty(q.shape, dtype=q.dtype, device=q.device), q.new_empty((h, t), dtype=_acc(q))


def _varlen_bwd_fake(grad_out, q, k, v, cu_q, cu_k, max_q, max_k, out, lse, *args):
    mask = args[-1]
    return _grad_like(q, mask[0]), _grad_like(k, mask[1]), _grad_like(v, mask[2])


# ---------------------------------------------------------------- autograd (all backends)


def _attention_setup(ctx, inputs, output):
    q, k, v, attn_mask = inputs[:4]
    ctx.args = inputs[4:]
    ctx.has_mask = attn_mask is not None
    ctx.save_for_backward(q, k, v, attn_mask, *output)


def _attention_backward(bwd):
    def backward(ctx, g_out, _g_lse):
        q, k, v, attn_mask, out, lse = ctx.saved_tensors
        nq, nk, nv, nm = ctx.needs_input_grad[:4]
        if nm and attn_mask.dtype == torch.bool:
            raise RuntimeError("fastdl.scaled_dot_product_attention: a bool attn_mask has no grad")
        gq, gk, gv, gm = bwd(
            g_out.contiguous(), q, k, v, attn_mask, out, lse, *ctx.args, [nq, nk, nv, nm]
        )
        return (gq if nq else None, gk if nk else None, gv if nv else None, gm if nm else None) + (
            None,
        ) * 7

    return backward


def _varlen_setup(ctx, inputs, output):
    ctx.args = inputs[5:]
    ctx.save_for_backward(*inputs[:5], *output)


def _varlen_backward(bwd):
    def backward(ctx, g_out, _g_lse):
        q, k, v, cu_q, cu_k, out, lse = ctx.saved_tensors
        nq, nk, nv = ctx.needs_input_grad[:3]
        max_q, max_k, *rest = ctx.args
        gq, gk, gv = bwd(
            g_out.contiguous(), q, k, v, cu_q, cu_k, max_q, max_k, out, lse, *rest, [nq, nk, nv]
        )
        return (gq if nq else None, gk if nk else None, gv if nv else None) + (None,) * 11

    return backward


_FAKE = {
    "attention_fwd": _attention_fwd_fake,
    "attention_bwd": _attention_bwd_fake,
    "varlen_attention_fwd": _varlen_fwd_fake,
    "varlen_attention_bwd": _varlen_bwd_fake,
}
_AUTOGRAD = {
    "attention": (_attention_setup, _attention_backward),
    "varlen_attention": (_varlen_setup, _varlen_backward),
}


def _register(ops: SimpleNamespace) -> SimpleNamespace:
    return _library.register(ops, _FAKE, _AUTOGRAD)


def _native_ops() -> SimpleNamespace | None:
    if _ext._C is None:
        return None
    return _register(SimpleNamespace(**{n: getattr(torch.ops.fastdl, n).default for n in OPS}))


def _triton_ops() -> SimpleNamespace | None:
    if not _ext.HAS_TRITON:
        return None
    from fastdl.kernels import attention as launchers

    return _register(
        SimpleNamespace(
            **{
                n: torch.library.custom_op(
                    f"fastdl::{n}_triton", getattr(launchers, n), mutates_args=()
                )
                for n in OPS
            }
        )
    )


NATIVE = _native_ops()
TRITON = _triton_ops()


def _ops(op: str, x: torch.Tensor) -> SimpleNamespace:
    return _backend.namespace("attention", op, x, NATIVE, TRITON)


# ---------------------------------------------------------------- public functions


def _band(op, is_causal, window, causal_alignment):
    if causal_alignment not in ALIGNMENTS:
        raise ValueError(
            f"{op}: causal_alignment must be one of {ALIGNMENTS}, got {causal_alignment!r}"
        )
    window = (-1, -1) if window is None else window
    if not (
        isinstance(window, (tuple, list))
        and len(window) == 2
        and all(isinstance(w, int) for w in window)
    ):
        raise TypeError(f"{op}: window must be a pair of ints (left, right), got {window!r}")
    left, right = window
    if is_causal:
        right = 0 if right < 0 else min(right, 0)
    return left, right, causal_alignment == "bottom_right"


def _dropout_args(op, dropout_p, seed):
    if not (0.0 <= dropout_p <= 1.0):
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    if dropout_p == 0.0:
        return 0, 0
    if seed is None:
        # One draw of torch's default generator per call: torch.manual_seed reproduces it.
        seed = int(torch.randint(-(2**63), 2**63 - 1, (), dtype=torch.int64).item())
    return seed, 0


def _check_heads(op, q, k, v, enable_gqa):
    for name, t in (("key", k), ("value", v)):
        _checks.same_device(op, name, t, q)
    if q.dim() != k.dim() or q.dim() != v.dim() or q.dim() < 3:
        raise RuntimeError(
            f"{op}: query, key and value must have one rank >= 3 (*, H, L, E), got shapes "
            f"{list(q.shape)}, {list(k.shape)} and {list(v.shape)}"
        )
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise RuntimeError(
            f"{op}: query, key and value must have the same head_dim, got {q.shape[-1]}, "
            f"{k.shape[-1]} and {v.shape[-1]}"
        )
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise RuntimeError(
            f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}] (the supported limit), "
            f"got {q.shape[-1]}"
        )
    if q.dim() >= 4 and q.shape[-3] != k.shape[-3]:
        if not enable_gqa:
            raise RuntimeError(
                f"{op}: query has {q.shape[-3]} heads but key has {k.shape[-3]}; pass "
                "enable_gqa=True for grouped-query attention"
            )
        if k.shape[-3] == 0 or q.shape[-3] % k.shape[-3]:
            raise RuntimeError(
                f"{op}: the number of query heads must be a multiple of the number of key/value "
                f"heads, got {q.shape[-3]} query heads and {k.shape[-3]} key/value heads"
            )


def _broadcast_batch(op, q, k, v):
    # The batch dims (all but (H, L, E); N of a 3-D (N, L, E)) broadcast, as torch's sdpa: e.g.
    # learned queries of batch 1 against a batch of keys. Expanded, not copied.
    nb = max(q.dim() - 3, 1)
    shapes = [t.shape[:nb] for t in (q, k, v)]
    if shapes[0] == shapes[1] == shapes[2]:
        return q, k, v
    try:
        batch = torch.broadcast_shapes(*shapes)
    except RuntimeError:
        raise RuntimeError(
            f"{op}: the batch dims of query, key and value must broadcast, got "
            f"{[list(s) for s in shapes]}"
        ) from None
    return tuple(t.expand(*batch, *t.shape[nb:]) for t in (q, k, v))


def scaled_dot_product_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attn_mask: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
    *,
    window: tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    seed: int | None = None,
) -> torch.Tensor:
    """Fused attention ``softmax(q k^T * scale + mask) v`` (FlashAttention-2, Dao 2023: tiled
    with an online softmax, the (L, S) scores never stored; backward recomputes them from the
    saved log-sum-exp), as ``torch.nn.functional.scaled_dot_product_attention``.

    Shapes: query (*, Hq, L, E) (or (N, L, E)), key/value (*, Hkv, S, E), E <= 256, the batch
    dims * (N) broadcast; Hq a multiple of Hkv with ``enable_gqa``. attn_mask: bool (True
    attends) or float (added), broadcastable to (*, Hq, L, S); a float mask that requires grad
    gets its gradient (a learned bias).
    ``is_causal``: key j <= query i (+ S - L with ``causal_alignment="bottom_right"``).
    Extras: ``window=(left, right)`` keeps keys i - left <= j <= i + right (same alignment; a
    negative side is unbounded), combinable with a mask and with ``is_causal``; ``seed`` fixes
    the dropout draw (default: one draw of torch's generator). A row with no allowed key gives
    zeros (and zero gradients), not NaN. Output: query's shape, contiguous.

    Dtypes: CPU float32/float64/bfloat16, CUDA/Triton float16/bfloat16/float32 (accumulation
    in float32). Backends: C++ (CPU), CUDA, Triton. Deterministic: yes, dropout included (a
    counter-based hash of (seed, position), the same on every backend).
    """
    op = "fastdl.scaled_dot_product_attention"
    q, k, v, attn_mask = _autocast.lower(query, key, value, attn_mask)  # a bool mask stays
    _check_heads(op, q, k, v, enable_gqa)
    q, k, v = _broadcast_batch(op, q, k, v)
    out_shape = q.shape
    if attn_mask is not None:
        _checks.same_device(op, "attn_mask", attn_mask, q)
    left, right, br = _band(op, is_causal, window, causal_alignment)
    seed, offset = _dropout_args(op, dropout_p, seed)
    scale = None if scale is None else float(scale)  # None: 1 / sqrt(E), in the op
    if q.dim() == 3:  # (N, L, E): one head
        q, k, v = q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)
        if attn_mask is not None and attn_mask.dim() == 3:
            attn_mask = attn_mask.unsqueeze(1)
    elif q.dim() > 4:  # (*, H, L, E): batch dims flattened (views unless strides forbid)
        if attn_mask is not None:
            attn_mask = attn_mask.expand(*q.shape[:-1], k.shape[-2])
            attn_mask = attn_mask.reshape(-1, *attn_mask.shape[-3:])
        q, k, v = (t.reshape(-1, *t.shape[-3:]) for t in (q, k, v))
    if attn_mask is not None and attn_mask.dim() > 4:
        raise RuntimeError(f"{op}: attn_mask of shape {list(attn_mask.shape)} has rank > 4")
    args = (q, k, v, attn_mask, dropout_p, seed, offset, left, right, br, scale)
    out = _library.call(_ops(op, q).attention_fwd, *args)[0]
    return out if len(out_shape) == 4 else out.reshape(out_shape)


def varlen_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    *,
    window: tuple[int, int] | None = None,
    causal_alignment: str = "top_left",
    seed: int | None = None,
) -> torch.Tensor:
    """Attention over a packed batch of variable-length sequences, no padding (FlashAttention's
    ``flash_attn_varlen_func`` layout): q (Tq, Hq, E), k/v (Tk, Hkv, E), sequence n being tokens
    ``cu_seqlens[n]:cu_seqlens[n + 1]`` (int32/int64, starting at 0, non-decreasing, ending at
    T); each sequence attends only to its own keys, with ``is_causal``/``window``/alignment
    applied per sequence. Hq a multiple of Hkv (GQA). Output (Tq, Hq, E). Dtypes, backends,
    dropout and determinism as :func:`scaled_dot_product_attention`.
    """
    op = "fastdl.varlen_attention"
    q, k, v = _autocast.lower(q, k, v)
    for name, t in (
        ("k", k),
        ("v", v),
        ("cu_seqlens_q", cu_seqlens_q),
        ("cu_seqlens_k", cu_seqlens_k),
    ):
        _checks.same_device(op, name, t, q)
    left, right, br = _band(op, is_causal, window, causal_alignment)
    seed, offset = _dropout_args(op, dropout_p, seed)
    scale = None if scale is None else float(scale)  # None: 1 / sqrt(E), in the op
    lens = (cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k)
    args = (q, k, v, *lens, dropout_p, seed, offset, left, right, br, scale)
    return _library.call(_ops(op, q).varlen_attention_fwd, *args)[0]
