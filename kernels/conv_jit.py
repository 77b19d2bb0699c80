"""Triton kernels of the conv family (launchers in kernels/conv.py).

Every conv is an implicit GEMM (Chetlur et al., "cuDNN: Efficient Primitives for Deep
Learning", 2014): no im2col buffer, each program gathers its operand tiles straight from the
strided input (any memory format: the strides are arguments) and accumulates with tl.dot, which
runs on tensor cores for float16/bfloat16 (mma on sm_80, wgmma on sm_90); float32 asks for IEEE
precision, not TF32, so it meets DESIGN §4. Accumulation is float32 and every output element is
written by exactly one program: deterministic, no atomics.

Geometry in conv2d terms (csrc/common/conv.h): input (N, C, H, W), weight (K, C/G, R, S), output
(N, K, P, Q); a transposed conv runs the same kernels with the roles of input and output swapped.
"""

import triton
import triton.language as tl

from .norm_jit import _cast

NONE, RELU, SILU, GELU = 0, 1, 2, 3


@triton.jit
def _dot(a, b, acc, F32_DOT: tl.constexpr):
    # F32_DOT: widen the operands first. Only for the interpreter (CPU tensors), whose bfloat16
    # tl.dot returns garbage (Triton 3.x); on a GPU half precision stays on tensor cores.
    if F32_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if a.dtype == tl.float32:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _activate(v, ACT: tl.constexpr):
    if ACT == 1:
        v = tl.where(v < 0.0, 0.0, v)  # NaN stays NaN, as torch.relu
    elif ACT == 2:
        v = v / (1.0 + tl.exp(-v))
    elif ACT == 3:
        v = 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    return v


@triton.jit
def conv2d_fwd_kernel(
    X, Wt, B, Res, Y, Pre,
    N, H, W, P, Q, CG, KG,
    s_xn, s_xc, s_xh, s_xw,
    s_wk, s_wc, s_wr, s_ws,
    s_yn, s_yk, s_yp, s_yq,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KR: tl.constexpr, KS: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, SAVE_PRE: tl.constexpr, ACT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """out = act(conv(x, w) + bias + residual) for a (BLOCK_M pixels) x (BLOCK_N channels) tile
    of group program_id(2); the reduction runs over taps (r, s) and BLOCK_C input channels."""
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    pq = P * Q
    n = (offs_m // pq).to(tl.int64)
    p = offs_m % pq // Q
    q = offs_m % Q
    row_ok = offs_m < N * pq
    col_ok = offs_n < KG
    k = (g * KG + offs_n).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(KR):
        h = p * stride_h - pad_h + r * dil_h
        for s in tl.static_range(KS):
            w = q * stride_w - pad_w + s * dil_w
            ok = row_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
            x_row = X + n * s_xn + h.to(tl.int64) * s_xh + w.to(tl.int64) * s_xw
            w_col = Wt + k * s_wk + r * s_wr + s * s_ws
            for c0 in range(0, CG, BLOCK_C):
                c = c0 + tl.arange(0, BLOCK_C)
                c_ok = c < CG
                a = tl.load(
                    x_row[:, None] + (g * CG + c)[None, :].to(tl.int64) * s_xc,
                    mask=ok[:, None] & c_ok[None, :],
                    other=0.0,
                )
                b = tl.load(
                    w_col[None, :] + c[:, None].to(tl.int64) * s_wc,
                    mask=c_ok[:, None] & col_ok[None, :],
                    other=0.0,
                )
                acc = _dot(a, b, acc, F32_DOT)
    out_off = (n * s_yn + p.to(tl.int64) * s_yp + q.to(tl.int64) * s_yq)[:, None] + (k * s_yk)[
        None, :
    ]
    mask = row_ok[:, None] & col_ok[None, :]
    if HAS_BIAS:
        acc += tl.load(B + k, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        acc += tl.load(Res + out_off, mask=mask, other=0.0).to(tl.float32)
    if SAVE_PRE:
        tl.store(Pre + out_off, _cast(acc, Pre), mask=mask)
    tl.store(Y + out_off, _cast(_activate(acc, ACT), Y), mask=mask)


@triton.jit
def conv2d_dgrad_kernel(
    G, Wt, B, DX,
    N, H, W, P, Q, CG, KG,
    s_gn, s_gk, s_gp, s_gq,
    s_wk, s_wc, s_wr, s_ws,
    s_dn, s_dc, s_dh, s_dw,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KR: tl.constexpr, KS: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """dx[n, c, h, w] = sum over (k, r, s) of g[n, k, p, q] * w[k, c, r, s] where
    h = p * stride - pad + r * dil (+ bias[c]: the transposed conv's forward). Gathered per input
    pixel (the taps whose p, q are whole and in range), so no scatter and no atomics."""
    g = tl.program_id(2)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    hw = H * W
    n = (offs_m // hw).to(tl.int64)
    h = offs_m % hw // W
    w = offs_m % W
    row_ok = offs_m < N * hw
    col_ok = offs_n < CG
    c = (g * CG + offs_n).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for r in tl.static_range(KR):
        hp = h + pad_h - r * dil_h
        p = hp // stride_h
        p_ok = (hp >= 0) & (hp % stride_h == 0) & (p < P)
        for s in tl.static_range(KS):
            wq = w + pad_w - s * dil_w
            q = wq // stride_w
            ok = row_ok & p_ok & (wq >= 0) & (wq % stride_w == 0) & (q < Q)
            g_row = G + n * s_gn + p.to(tl.int64) * s_gp + q.to(tl.int64) * s_gq
            w_col = Wt + offs_n.to(tl.int64) * s_wc + r * s_wr + s * s_ws
            for k0 in range(0, KG, BLOCK_K):
                kk = k0 + tl.arange(0, BLOCK_K)
                k_ok = kk < KG
                k = (g * KG + kk).to(tl.int64)
                a = tl.load(g_row[:, None] + k[None, :] * s_gk, ok[:, None] & k_ok[None, :], 0.0)
                b = tl.load(
                    w_col[None, :] + k[:, None] * s_wk, k_ok[:, None] & col_ok[None, :], 0.0
                )
                acc = _dot(a, b, acc, F32_DOT)
    if HAS_BIAS:
        acc += tl.load(B + c, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    off = (n * s_dn + h.to(tl.int64) * s_dh + w.to(tl.int64) * s_dw)[:, None] + (c * s_dc)[None, :]
    tl.store(DX + off, _cast(acc, DX), mask=row_ok[:, None] & col_ok[None, :])


@triton.jit
def conv2d_wgrad_kernel(
    X, G, DW,
    N, H, W, P, Q, CG, KG,
    s_xn, s_xc, s_xh, s_xw,
    s_gn, s_gk, s_gp, s_gq,
    s_wk, s_wc, s_wr, s_ws,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KR: tl.constexpr, KS: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_M: tl.constexpr, F32_DOT: tl.constexpr,
):  # fmt: skip
    """dw[k, c, r, s] = sum over output pixels m of g[m, k] * x[m shifted by tap (r, s), c]: a
    (BLOCK_K x BLOCK_C) tile per program for one tap and group (program_id(2) = (g, r, s)),
    reduced over all N * P * Q pixels in a fixed order."""
    tap = tl.program_id(2)
    g = tap // (KR * KS)
    r = tap % (KR * KS) // KS
    s = tap % KS
    kk = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    cc = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    k_ok = kk < KG
    c_ok = cc < CG
    k = (g * KG + kk).to(tl.int64)
    c = (g * CG + cc).to(tl.int64)
    pq = P * Q
    acc = tl.zeros((BLOCK_K, BLOCK_C), dtype=tl.float32)
    for m0 in range(0, N * pq, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        n = (m // pq).to(tl.int64)
        p = m % pq // Q
        q = m % Q
        h = p * stride_h - pad_h + r * dil_h
        w = q * stride_w - pad_w + s * dil_w
        m_ok = m < N * pq
        x_ok = m_ok & (h >= 0) & (h < H) & (w >= 0) & (w < W)
        g_off = n * s_gn + p.to(tl.int64) * s_gp + q.to(tl.int64) * s_gq
        x_off = n * s_xn + h.to(tl.int64) * s_xh + w.to(tl.int64) * s_xw
        a = tl.load(G + g_off[None, :] + (k * s_gk)[:, None], k_ok[:, None] & m_ok[None, :], 0.0)
        b = tl.load(X + x_off[:, None] + (c * s_xc)[None, :], x_ok[:, None] & c_ok[None, :], 0.0)
        acc = _dot(a, b, acc, F32_DOT)
    off = (k * s_wk)[:, None] + (cc.to(tl.int64) * s_wc)[None, :] + r * s_wr + s * s_ws
    tl.store(DW + off, _cast(acc, DW), mask=k_ok[:, None] & c_ok[None, :])


@triton.jit
def channel_sum_kernel(
    G, Out, N, K, P, Q, s_gn, s_gk, s_gp, s_gq,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    """Out[k] = sum over (n, p, q) of G[n, k, p, q] (the bias gradient), in a fixed order."""
    k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    k_ok = k < K
    pq = P * Q
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for m0 in range(0, N * pq, BLOCK_M):
        m = m0 + tl.arange(0, BLOCK_M)
        n = (m // pq).to(tl.int64)
        off = n * s_gn + (m % pq // Q).to(tl.int64) * s_gp + (m % Q).to(tl.int64) * s_gq
        mask = (m < N * pq)[:, None] & k_ok[None, :]
        ptr = G + off[:, None] + (k.to(tl.int64) * s_gk)[None, :]
        acc += tl.load(ptr, mask, 0.0).to(tl.float32)
    tl.store(Out + k, _cast(tl.sum(acc, axis=0), Out), mask=k_ok)


@triton.jit
def epilogue_bwd_kernel(GO, Saved, GP, numel, ACT: tl.constexpr, BLOCK: tl.constexpr):
    """gpre = grad_out * act'(.) elementwise (all three in one memory layout): relu reads the
    output (y > 0), silu and gelu the saved pre-activation."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < numel
    go = tl.load(GO + offs, mask=mask, other=0.0).to(tl.float32)
    v = tl.load(Saved + offs, mask=mask, other=0.0).to(tl.float32)
    if ACT == 1:
        d = tl.where(v > 0.0, 1.0, 0.0)
    elif ACT == 2:
        sig = 1.0 / (1.0 + tl.exp(-v))
        d = sig * (1.0 + v * (1.0 - sig))
    else:
        cdf = 0.5 * (1.0 + tl.erf(v * 0.7071067811865476))
        d = cdf + v * 0.3989422804014327 * tl.exp(-0.5 * v * v)
    tl.store(GP + offs, _cast(go * d, GP), mask=mask)
