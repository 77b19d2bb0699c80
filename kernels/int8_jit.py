"""The @triton.jit kernels of the int8 family; kernels/int8.py holds their launchers.

quantize_kernel: one program per row, two passes over it (max |x|, then x / scale rounded half
to even). matmul_kernel: the classic tiled GEMM (one BLOCK_M x BLOCK_N tile per program, K in
BLOCK_K steps, tl.dot on int8 -> int32 tensor cores: mma.sync.*.s8 on sm_80, wgmma on sm_90),
with the per-row x per-column dequantization and bias in the epilogue. With A_FLOAT the A tiles
are float activations quantized in registers with their row scales (the int8_linear path): the
int8 activation never goes through memory.
"""

import triton
import triton.language as tl

from .norm_jit import _cast

# Adding then subtracting 1.5 * 2^23 rounds a float32 of magnitude < 2^22 to an integer, half
# to even, in the FPU's own rounding: exact RNE without a libdevice call (and the same in the
# interpreter). Quantized values are at most 127 in magnitude.
_RNE_MAGIC = tl.constexpr(12582912.0)


@triton.jit
def _quantize(x, scale):
    y = tl.math.div_rn(x, scale)
    y = (y + _RNE_MAGIC) - _RNE_MAGIC
    # NaN to 0 before the clamp: tl.maximum / tl.minimum do not propagate NaN (it became -127).
    y = tl.where(y == y, y, 0.0)
    return tl.minimum(tl.maximum(y, -127.0), 127.0).to(tl.int8)


@triton.jit
def quantize_kernel(
    X, Q, S, SKIP, K, stride_x, HAS_SKIP: tl.constexpr, WRITE_Q: tl.constexpr, BLOCK: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    amax = tl.zeros([BLOCK], dtype=tl.float32)
    for k0 in range(0, K, BLOCK):
        cols = k0 + tl.arange(0, BLOCK)
        keep = cols < K
        if HAS_SKIP:
            keep = keep & (tl.load(SKIP + cols, mask=cols < K, other=1) == 0)
        a = tl.abs(tl.load(x_row + cols, mask=keep, other=0.0).to(tl.float32))
        # NaN wins the maximum, so a row holding NaN gets a NaN scale.
        amax = tl.where((a > amax) | (a != a), a, amax)
    m = tl.max(amax, axis=0)
    m = tl.where(tl.sum((amax != amax).to(tl.int32), axis=0) > 0, float("nan"), m)
    scale = tl.where(m == 0.0, 1.0, m / 127.0)
    tl.store(S + row, scale)
    if WRITE_Q:
        for k0 in range(0, K, BLOCK):
            cols = k0 + tl.arange(0, BLOCK)
            x = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
            tl.store(Q + row * K + cols, _quantize(x, scale), mask=cols < K)


@triton.jit
def matmul_kernel(
    A, B, C, AS, BS, BIAS, SKIP,
    M, N, K,
    stride_am, stride_ak, stride_bk, stride_bn, stride_cm,
    A_FLOAT: tl.constexpr, HAS_AS: tl.constexpr, HAS_BS: tl.constexpr, HAS_BIAS: tl.constexpr,
    HAS_SKIP: tl.constexpr, OUT_INT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok = rows < M
    col_ok = cols < N
    a_ptr = A + rows.to(tl.int64)[:, None] * stride_am + ks[None, :] * stride_ak
    b_ptr = B + ks[:, None] * stride_bk + cols.to(tl.int64)[None, :] * stride_bn
    if HAS_AS:
        a_scale = tl.load(AS + rows, mask=row_ok, other=1.0)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        if A_FLOAT:
            x = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
            a = _quantize(x, a_scale[:, None])
            if HAS_SKIP:
                skip = tl.load(SKIP + k0 + ks, mask=k_ok, other=0)
                a = tl.where(skip[None, :] != 0, 0, a).to(tl.int8)
        else:
            a = tl.load(a_ptr, mask=row_ok[:, None] & k_ok[None, :], other=0)
        b = tl.load(b_ptr, mask=k_ok[:, None] & col_ok[None, :], other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptr += BLOCK_K * stride_ak
        b_ptr += BLOCK_K * stride_bk
    c_ptr = C + rows.to(tl.int64)[:, None] * stride_cm + cols[None, :]
    mask = row_ok[:, None] & col_ok[None, :]
    if OUT_INT:
        tl.store(c_ptr, acc, mask=mask)
    else:
        out = acc.to(tl.float32)
        if HAS_AS:
            out = out * a_scale[:, None]
        if HAS_BS:
            out = out * tl.load(BS + cols, mask=col_ok, other=1.0)[None, :]
        if HAS_BIAS:
            out = out + tl.load(BIAS + cols, mask=col_ok, other=0.0)[None, :]
        tl.store(c_ptr, _cast(out, C), mask=mask)
