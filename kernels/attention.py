"""Host launchers of the attention family's Triton kernels (kernels/attention_jit.py), registered
by fastdl/ops/attention.py as the ``fastdl::<op>_triton`` custom ops: each launcher's
annotations are its op's schema, matching csrc/ops.cpp. They check their inputs with the
messages of csrc/common/attention.h, allocate what the fake kernels describe and launch. Also
AOT, the configurations tests/test_gpu_build.py compiles ahead of time.
"""

import math

import torch
import triton

from fastdl import _checks, _ext

from . import attention_jit as jit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _gpu_blocks(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_D, num_warps): 64 x 64 tiles up to D = 64, narrower beyond (the
    q / accumulator / k / v tiles of D padded to a power of two must fit registers and the
    shared memory of sm_80); float32 tiles are half as wide."""
    bd = max(16, triton.next_power_of_2(d))
    if dtype == torch.float32:
        return (32, 32, bd, 4) if bd > 64 else (64, 32, bd, 4)
    return (64, 64, bd, 4) if bd <= 64 else (32, 64, bd, 4) if bd <= 128 else (32, 32, bd, 8)


def _blocks(d: int, dtype: torch.dtype) -> tuple[int, int, int, int]:
    if _ext.TRITON_INTERPRET:  # the interpreter's cost grows with the tile, not the grid
        return 16, 16, max(16, triton.next_power_of_2(d)), 1
    return _gpu_blocks(d, dtype)


def _require_runnable(op: str, q: torch.Tensor) -> None:
    if q.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got q on {q.device}"
        )


def _qkv(op, q, k, v, rank):
    layout = "(B, H, S, D)" if rank == 4 else "(T, H, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != rank:
            raise RuntimeError(
                f"{op}: {name} must have rank {rank} {layout}, got shape {list(t.shape)}"
            )
    _checks.dtype(op, "q", q, DTYPES)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise _checks.DtypeError(
                f"{op}: {name} has dtype {t.dtype} but q has dtype {q.dtype}; "
                "q, k and v must have one dtype"
            )
        _checks.same_device(op, name, t, q)
    if not (q.shape[-1] == k.shape[-1] == v.shape[-1]):
        raise RuntimeError(f"{op}: q, k and v must have the same head_dim")
    if k.shape != v.shape:
        raise RuntimeError(f"{op}: k and v must have the same shape")
    if not 1 <= q.shape[-1] <= MAX_HEAD_DIM:
        raise RuntimeError(
            f"{op}: head_dim must be in [1, {MAX_HEAD_DIM}] (the supported limit), "
            f"got {q.shape[-1]}"
        )
    hq, hk = q.shape[-2 if rank == 3 else 1], k.shape[-2 if rank == 3 else 1]
    if not ((hk > 0 and hq % hk == 0) or hk == hq == 0):
        raise RuntimeError(
            f"{op}: the number of query heads must be a multiple of the number of key/value "
            f"heads, got {hq} query heads and {hk} key/value heads"
        )
    if rank == 4 and k.shape[0] != q.shape[0]:
        raise RuntimeError(f"{op}: q and k must have the same batch size")
    _require_runnable(op, q)


def _dropout(op, p):
    if not (0.0 <= p <= 1.0):
        raise RuntimeError(f"{op}: dropout_p must be in [0, 1], got {p}")


def additive_mask(op, mask, q, full):
    """attn_mask as an additive float32 view of shape ``full`` (bool -> 0 / -inf), as
    attention::additive_mask."""
    if mask is None:
        return None
    _checks.same_device(op, "attn_mask", mask, q)
    if mask.dtype not in (torch.bool, torch.float32, q.dtype):
        raise _checks.DtypeError(
            f"{op}: attn_mask has dtype {mask.dtype}; supported: bool, float32 or q's dtype "
            f"{q.dtype}"
        )
    fits = mask.dim() <= 4 and all(
        s in (1, f) for s, f in zip(reversed(mask.shape), reversed(full), strict=False)
    )
    if not fits:
        raise RuntimeError(
            f"{op}: attn_mask of shape {list(mask.shape)} is not broadcastable to {list(full)} "
            "(B, H, Sq, Sk)"
        )
    if mask.dtype == torch.bool:
        add = torch.zeros(mask.shape, dtype=torch.float32, device=mask.device)
        add = add.masked_fill(~mask, -math.inf)
    else:
        add = mask.float()
    return add.expand(full)


def reduce_grad_mask(full: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The full (B, H, Sq, Sk) gradient summed over the dims the mask was broadcast along."""
    lead = 4 - mask.dim()
    dims = [i for i in range(4) if i < lead or (mask.shape[i - lead] == 1 and full.shape[i] != 1)]
    g = full.sum(dims, keepdim=True) if dims else full
    return g.reshape(mask.shape).to(mask.dtype)


def _side(w: int, sq: int, sk: int) -> int:
    """A window side for the kernels' int32 index arithmetic: -1 (unbounded) from sq + sk on,
    which bounds no (query, key) pair of sq x sk (a side near 2^31 would wrap i + side)."""
    return -1 if w >= sq + sk else w


def _rng(p: float, seed: int) -> dict:
    threshold = min(math.floor(p * 2**32), 2**32 - 1)
    s = seed % 2**64
    return {
        "keep_scale": 0.0 if p >= 1 else 1.0 / (1.0 - p),
        "threshold": 2**32 if p >= 1 else threshold,  # 2^32: nothing kept
        "seed_lo": s & 0xFFFFFFFF,
        "seed_hi": s >> 32,
    }


def _mask_strides(m):
    return (0, 0, 0, 0) if m is None else tuple(m.stride())


def _scale(scale: float | None, d: int) -> float:
    # None is the default 1 / sqrt(D) (csrc/common/attention.h: attention::scale_or_default).
    return 1.0 / math.sqrt(d) if scale is None else scale


def _last_unit(t):
    return t if t.stride(-1) == 1 or t.shape[-1] == 1 else t.contiguous()


# ---------------------------------------------------------------- dense


def attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    dropout_p: float,
    seed: int,
    offset: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "fastdl::attention_fwd_triton"
    _qkv(op, q, k, v, 4)
    _dropout(op, dropout_p)
    b, hq, sq, d = q.shape
    scale = _scale(scale, d)
    hk, sk = k.shape[1], k.shape[2]
    mask = additive_mask(op, attn_mask, q, (b, hq, sq, sk))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((b, hq, sq), dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    bm, bn, bd, warps = _blocks(d, q.dtype)
    grid = (triton.cdiv(sq, bm), b * hq)
    jit.attention_fwd_kernel[grid](
        q, k, v, out, lse, mask if mask is not None else q, q, q,
        *q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *out.stride()[:3], *lse.stride()[:2],
        *_mask_strides(mask),
        hq, hq // hk, sq, sk, d, scale, _side(window_left, sq, sk), _side(window_right, sq, sk),
        **_rng(dropout_p, seed), offset=offset,
        BOTTOM_RIGHT=bottom_right, HAS_MASK=mask is not None, DROPOUT=dropout_p > 0,
        VARLEN=False, IEEE=q.dtype == torch.float32,
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )  # fmt: skip
    return out, lse


def _backward(grad_out, q, k, v, mask, out, lse, cu_q, cu_k, dims, band, offset, rng, want_gm):
    """Shared by the dense and varlen backward: dims = (N, Hq, Hkv, SQ, SK, D) where SQ/SK are
    the lengths of dense inputs or the token totals of varlen ones; band = (scale, left, right,
    bottom_right)."""
    n, hq, hk, sq, sk, d = dims
    varlen = cu_q is not None
    q, k, v, grad_out = (t.contiguous() for t in (q, k, v, grad_out))
    # delta = rowsum(dO * O), laid out like lse.
    delta = (grad_out.float() * out.float()).sum(-1)
    delta = (delta.t() if varlen else delta).contiguous()
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    gm = torch.zeros((n, hq, sq, sk), dtype=torch.float32, device=q.device) if want_gm else None
    bm, bn, bd, warps = _blocks(d, q.dtype)
    if varlen:  # rows are tokens: (batch, head, row) strides (0, stride(1), stride(0))
        strides = (*(s for t in (q, k, v, grad_out) for s in (0, t.stride(1), t.stride(0))),
                   0, lse.stride(0))  # fmt: skip
    else:
        strides = (*q.stride()[:3], *k.stride()[:3], *v.stride()[:3], *grad_out.stride()[:3],
                   *lse.stride()[:2])  # fmt: skip
    cu = (cu_q, cu_k) if varlen else (q, q)
    m = mask if mask is not None else q
    flags = {
        "BOTTOM_RIGHT": band[3], "HAS_MASK": mask is not None, "DROPOUT": rng["keep_scale"] != 1.0,
        "VARLEN": varlen, "IEEE": q.dtype == torch.float32, "BLOCK_M": bm, "BLOCK_N": bn,
        "BLOCK_D": bd, "num_warps": warps,
    }  # fmt: skip
    scalars = (sq, sk, d, *band[:3])
    max_k = sk if not varlen else int((cu_k[1:] - cu_k[:-1]).max()) if n else 0
    max_q = sq if not varlen else int((cu_q[1:] - cu_q[:-1]).max()) if n else 0
    jit.attention_bwd_dkdv_kernel[(triton.cdiv(max(max_k, 1), bn), n * hk)](
        q, k, v, grad_out, lse, delta, dk, dv, gm if want_gm else q, m, *cu, *strides,
        *(gm.stride()[:3] if want_gm else (0, 0, 0)), *_mask_strides(mask),
        hk, hq // hk, *scalars, **rng, offset=offset, **flags, WANT_GM=want_gm,
    )  # fmt: skip
    jit.attention_bwd_dq_kernel[(triton.cdiv(max(max_q, 1), bm), n * hq)](
        q, k, v, grad_out, lse, delta, dq, m, *cu, *strides, *_mask_strides(mask),
        hq, hq // hk, *scalars, **rng, offset=offset, **flags,
    )  # fmt: skip
    return dq, dk, dv, gm


def attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_mask: torch.Tensor | None,
    out: torch.Tensor,
    lse: torch.Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    scale: float | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "fastdl::attention_bwd_triton"
    _qkv(op, q, k, v, 4)
    _dropout(op, dropout_p)
    b, hq, sq, d = q.shape
    scale = _scale(scale, d)
    hk, sk = k.shape[1], k.shape[2]
    mask = additive_mask(op, attn_mask, q, (b, hq, sq, sk))
    want_gm = bool(output_mask[3]) and attn_mask is not None and attn_mask.dtype != torch.bool
    if q.numel() and k.numel():
        band = (scale, _side(window_left, sq, sk), _side(window_right, sq, sk), bottom_right)
        dims = (b, hq, hk, sq, sk, d)
        rng = _rng(dropout_p, seed)
        dq, dk, dv, gm = _backward(
            grad_out, q, k, v, mask, out, lse, None, None, dims, band, offset, rng, want_gm
        )
    else:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        gm = torch.zeros((b, hq, sq, sk), device=q.device) if want_gm else None
    # Unwanted gradients: distinct empty tensors (outputs may not alias one another).
    return (
        dq.contiguous() if output_mask[0] else q.new_empty(0),
        dk.contiguous() if output_mask[1] else q.new_empty(0),
        dv.contiguous() if output_mask[2] else q.new_empty(0),
        reduce_grad_mask(gm, attn_mask) if want_gm else q.new_empty(0),
    )


# ---------------------------------------------------------------- varlen


def _cu(op, name, cu, q, total, max_len):
    _checks.dtype(op, name, cu, (torch.int32, torch.int64))
    _checks.same_device(op, name, cu, q)
    if cu.dim() != 1 or cu.numel() < 1:
        raise RuntimeError(f"{op}: {name} must be 1-D with N + 1 >= 1 entries")
    c = cu.tolist()
    if c[0] != 0:
        raise RuntimeError(f"{op}: {name} must start at 0, got {c[0]}")
    for i in range(len(c) - 1):
        if c[i + 1] < c[i]:
            raise RuntimeError(f"{op}: {name} must be non-decreasing, got {c[i]} then {c[i + 1]}")
        if c[i + 1] - c[i] > max_len:
            raise RuntimeError(f"{op}: sequence {i} has length {c[i + 1] - c[i]} above max_seqlen")
    if c[-1] != total:
        raise RuntimeError(f"{op}: {name} must end at the number of tokens {total}, got {c[-1]}")
    return cu.to(torch.int32).contiguous()


def _varlen_args(op, q, k, v, cu_q, cu_k, max_q, max_k, p):
    _qkv(op, q, k, v, 3)
    _dropout(op, p)
    if cu_q.numel() != cu_k.numel():
        raise RuntimeError(f"{op}: cu_seqlens_q and cu_seqlens_k must have the same length")
    return _cu(op, "cu_seqlens_q", cu_q, q, q.shape[0], max_q), _cu(
        op, "cu_seqlens_k", cu_k, q, k.shape[0], max_k
    )


def varlen_attention_fwd(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    dropout_p: float,
    seed: int,
    offset: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    scale: float | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    op = "fastdl::varlen_attention_fwd_triton"
    cq, ck = _varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p)  # fmt: skip
    tq, hq, d = q.shape
    scale = _scale(scale, d)
    tk, hk = k.shape[:2]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((hq, tq), dtype=torch.float32, device=q.device)
    n = cq.numel() - 1
    if out.numel() == 0 or n == 0:
        return out, lse
    q, k, v = _last_unit(q), _last_unit(k), _last_unit(v)
    bm, bn, bd, warps = _blocks(d, q.dtype)
    jit.attention_fwd_kernel[(triton.cdiv(max(max_seqlen_q, 1), bm), n * hq)](
        q, k, v, out, lse, q, cq, ck,
        0, q.stride(1), q.stride(0), 0, k.stride(1), k.stride(0), 0, v.stride(1), v.stride(0),
        0, out.stride(1), out.stride(0), 0, lse.stride(0), 0, 0, 0, 0,
        hq, hq // hk, tq, tk, d, scale, _side(window_left, tq, tk), _side(window_right, tq, tk),
        **_rng(dropout_p, seed), offset=offset,
        BOTTOM_RIGHT=bottom_right, HAS_MASK=False, DROPOUT=dropout_p > 0, VARLEN=True,
        IEEE=q.dtype == torch.float32, BLOCK_M=bm, BLOCK_N=bn, BLOCK_D=bd, num_warps=warps,
    )  # fmt: skip
    return out, lse


def varlen_attention_bwd(
    grad_out: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    out: torch.Tensor,
    lse: torch.Tensor,
    dropout_p: float,
    seed: int,
    offset: int,
    window_left: int,
    window_right: int,
    bottom_right: bool,
    scale: float | None,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    op = "fastdl::varlen_attention_bwd_triton"
    cq, ck = _varlen_args(op, q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          dropout_p)  # fmt: skip
    tq, hq, d = q.shape
    scale = _scale(scale, d)
    tk, hk = k.shape[:2]
    n = cq.numel() - 1
    if q.numel() and k.numel() and n:
        band = (scale, _side(window_left, tq, tk), _side(window_right, tq, tk), bottom_right)
        dims = (n, hq, hk, tq, tk, d)
        rng = _rng(dropout_p, seed)
        dq, dk, dv, _ = _backward(
            grad_out, q, k, v, None, out, lse, cq, ck, dims, band, offset, rng, False
        )
    else:
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    return tuple(
        g.contiguous() if want else q.new_empty(0)
        for g, want in zip((dq, dk, dv), output_mask, strict=True)
    )


# ---------------------------------------------------------------- AOT (tests/test_gpu_build.py)

_TYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
_DATA = {"Q", "K", "V", "O", "DO", "DK", "DV", "DQ"}
_F32 = {"LSE", "DELTA", "GM", "MASK"}
_I64 = {"threshold", "seed_lo", "seed_hi", "offset"}


def _aot(kernel, data: str, d: int, **flags):
    bm, bn, bd, warps = _gpu_blocks(d, _TYPES[data])
    constexprs = {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_D": bd, "IEEE": data == "fp32", **flags}

    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in _DATA:
            return "*" + data
        if name in _F32:
            return "*fp32"
        if name in ("CU_Q", "CU_K"):
            return "*i32"
        if name in ("scale", "keep_scale"):
            return "fp32"
        return "i64" if name in _I64 else "i32"

    signature = {name: arg_type(name) for name in kernel.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, t in enumerate(signature.values()) if "*" in t}
    return {
        "kernel": kernel,
        "signature": signature,
        "constexprs": constexprs,
        "attrs": attrs,
        "num_warps": warps,
        "tensor_cores": data != "fp32",
    }


_ALL = {"BOTTOM_RIGHT": True, "HAS_MASK": True, "DROPOUT": True, "VARLEN": False}
_VARLEN = {"BOTTOM_RIGHT": True, "HAS_MASK": False, "DROPOUT": False, "VARLEN": True}
AOT = [
    _aot(jit.attention_fwd_kernel, "fp16", 64, **_ALL),
    _aot(jit.attention_fwd_kernel, "bf16", 128, **_VARLEN),
    _aot(jit.attention_fwd_kernel, "bf16", 256, **_ALL),
    _aot(jit.attention_fwd_kernel, "fp32", 64, **_ALL),
    _aot(jit.attention_bwd_dkdv_kernel, "fp16", 64, **_ALL, WANT_GM=True),
    _aot(jit.attention_bwd_dkdv_kernel, "bf16", 128, **_VARLEN, WANT_GM=False),
    _aot(jit.attention_bwd_dkdv_kernel, "fp32", 64, **_ALL, WANT_GM=False),
    _aot(jit.attention_bwd_dq_kernel, "fp16", 64, **_ALL),
    _aot(jit.attention_bwd_dq_kernel, "bf16", 256, **_VARLEN),
    _aot(jit.attention_bwd_dq_kernel, "fp32", 128, **_ALL),
]
