"""The @triton.jit kernels of the norm family; kernels/norm.py holds their launchers.

LayerNorm / RMSNorm: one program per row in the forward; in the backward a persistent grid, each
program owning a contiguous range of rows and one row of the dweight/dbias partial-sum buffer.
Rows that fit in one block stay in registers; longer ones are walked in chunks.
BatchNorm: x is seen as (N, C, HW) through its strides (NCHW or channels_last alike), cut into
tiles of BLOCK_C channels x BLOCK_HW positions of one sample. Every reduction across programs is
two-stage (per-program partials, then a fixed-order pass): bit-identical from run to run, no
atomics.
"""

import triton
import triton.language as tl

from fastdl import _ext

# ---------------------------------------------------------------- shared device helpers


@triton.jit
def _chan_merge(mean_a, m2_a, n_a, mean_b, m2_b, n_b):
    # Chan, Golub & LeVeque (1979) pairwise update of (mean, sum of squared deviations, count):
    # stable where a running sum and sum of squares would cancel for |mean| >> std.
    n = n_a + n_b
    delta = mean_b - mean_a
    frac = n_b / n
    return mean_a + delta * frac, m2_a + m2_b + delta * delta * n_a * frac, n


# The interpreter truncates float32 -> bfloat16 where the GPU rounds to nearest even; rounding by
# hand there keeps the CPU runs of the Triton kernels (every family's: they import _to/_cast from
# here) bit-faithful to the GPU.
_INTERPRETED = tl.constexpr(_ext.TRITON_INTERPRET)


@triton.jit
def _to(y, dtype: tl.constexpr):
    """float32 y in dtype, rounded to nearest even."""
    if _INTERPRETED and dtype == tl.bfloat16:
        bits = y.to(tl.uint32, bitcast=True)
        bits += 0x7FFF + ((bits >> 16) & 1)
        y = (bits & 0xFFFF0000).to(tl.float32, bitcast=True)
    return y.to(dtype)


@triton.jit
def _cast(y, PTR):
    """float32 y in the element type of PTR, to be stored there."""
    return _to(y, PTR.dtype.element_ty)


@triton.jit
def _load_param(P, offs, mask, HAS: tl.constexpr, default: tl.constexpr):
    if HAS:
        value = tl.load(P + offs, mask=mask, other=default).to(tl.float32)
    else:
        value = tl.full(offs.shape, default, tl.float32)
    return value


@triton.jit
def sum_rows_kernel(P, OUT, rows, N, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr):
    """Column sums of a (rows, N) float32 buffer of per-program partials, always in the same order:
    the second, deterministic stage of every dweight/dbias reduction."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    r = tl.arange(0, BLOCK_R)
    acc = tl.zeros([BLOCK_R, BLOCK_N], tl.float32)
    for r0 in range(0, rows, BLOCK_R):
        rr = r0 + r
        mask = (rr[:, None] < rows) & (cols[None, :] < N)
        acc += tl.load(P + rr[:, None].to(tl.int64) * N + cols[None, :], mask=mask, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0), mask=cols < N)


# ---------------------------------------------------------------- LayerNorm / RMSNorm


@triton.jit
def _load_sum(X, R, S, offs, mask, HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr):
    # s = x + residual, rounded to x's dtype as the unfused `x + residual` would be, so `sum`, the
    # statistics and the backward (which gets `sum` as its input) all see the same values.
    s = tl.load(X + offs, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        r = tl.load(R + offs, mask=mask, other=0.0)
        s = _cast(s.to(tl.float32) + r.to(tl.float32), S)
        if STORE_SUM:
            tl.store(S + offs, s, mask=mask)
    return s.to(tl.float32)


@triton.jit
def _merge_chunk(mean, m2, count, s, mask, n_valid, IS_RMS: tl.constexpr):
    # RMSNorm pins the mean at 0, which turns M2 into the sum of squares and the merge into a sum.
    cmean = 0.0 if IS_RMS else tl.sum(s, axis=0) / n_valid
    d = tl.where(mask, s - cmean, 0.0)
    return _chan_merge(mean, m2, count, cmean, tl.sum(d * d, axis=0), n_valid)


@triton.jit
def _affine_store(
    Y, W, B, offs, mask, s, mean, rstd, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr
):
    y = (s - mean) * rstd
    if HAS_WEIGHT:
        y = y * _load_param(W, offs, mask, True, 0.0)
    if HAS_BIAS:
        y = y + _load_param(B, offs, mask, True, 0.0)
    tl.store(Y + offs, _cast(y, Y), mask=mask)


@triton.jit
def norm_fwd_kernel(
    X,
    R,
    W,
    B,
    Y,
    S,
    MEAN,
    RSTD,
    N,
    eps,
    IS_RMS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """LayerNorm (Ba et al., 2016) or RMSNorm (Zhang & Sennrich, 2019) of one row of N elements,
    with the residual add fused in front. LayerNorm statistics: two-pass mean / biased variance
    within a chunk, Chan's update across chunks."""
    row = tl.program_id(0)
    base = tl.cast(row, tl.int64) * N
    X += base
    R += base
    S += base
    Y += base
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < N
        s = _load_sum(X, R, S, cols, mask, HAS_RESIDUAL, True)
        mean, m2, _count = _merge_chunk(0.0, 0.0, 0.0, s, mask, N * 1.0, IS_RMS)
    else:
        mean = 0.0
        m2 = 0.0
        count = 0.0
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            chunk = _load_sum(X, R, S, offs, mask, HAS_RESIDUAL, True)
            n_valid = tl.minimum(N - start, BLOCK).to(tl.float32)
            mean, m2, count = _merge_chunk(mean, m2, count, chunk, mask, n_valid, IS_RMS)
    rstd = tl.rsqrt(m2 / N + eps)
    if not IS_RMS:
        tl.store(MEAN + row, mean)
    tl.store(RSTD + row, rstd)
    if ONE_BLOCK:
        _affine_store(Y, W, B, cols, mask, s, mean, rstd, HAS_WEIGHT, HAS_BIAS)
    else:
        for start in range(0, N, BLOCK):
            offs = start + cols
            mask = offs < N
            # Recomputed from x and residual rather than read back from S: this program's
            # threads may not own the same elements of S in both passes.
            chunk = _load_sum(X, R, S, offs, mask, HAS_RESIDUAL, False)
            _affine_store(Y, W, B, offs, mask, chunk, mean, rstd, HAS_WEIGHT, HAS_BIAS)


@triton.jit
def _row_stats(MEAN, RSTD, row, IS_RMS: tl.constexpr):
    mean = 0.0 if IS_RMS else tl.load(MEAN + row)
    return mean, tl.load(RSTD + row)


@triton.jit
def _bwd_terms(DY, X, offs, mask, w, mean, rstd):
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    xhat = tl.where(mask, (x - mean) * rstd, 0.0)
    return dy, xhat, dy * w


@triton.jit
def _store_dx(DX, DS, offs, mask, xhat, wdy, c1, c2, rstd, HAS_DSUM: tl.constexpr):
    dx = (wdy - (xhat * c1 + c2)) * rstd
    if HAS_DSUM:
        dx += tl.load(DS + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(DX + offs, _cast(dx, DX), mask=mask)


@triton.jit
def norm_bwd_kernel(
    DY,
    DS,
    X,
    W,
    MEAN,
    RSTD,
    DX,
    DW,
    DB,
    M,
    N,
    rows_per_program,
    IS_RMS: tl.constexpr,
    HAS_DSUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_DW: tl.constexpr,
    HAS_DB: tl.constexpr,
    BLOCK: tl.constexpr,
    ONE_BLOCK: tl.constexpr,
):
    """LayerNorm / RMSNorm backward over a contiguous range of rows:
    dx = rstd * (w*dy - xhat * mean(w*dy*xhat) - mean(w*dy)) (RMSNorm drops the last term),
    plus grad_sum; this program's share of dw = sum(dy*xhat), db = sum(dy) goes to row `pid` of
    the partial buffers DW, DB, reduced afterwards in a fixed order."""
    pid = tl.program_id(0)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    DW += pid.to(tl.int64) * N
    DB += pid.to(tl.int64) * N
    cols = tl.arange(0, BLOCK)
    if ONE_BLOCK:
        mask = cols < N
        w = _load_param(W, cols, mask, HAS_WEIGHT, 1.0)
        dw = tl.zeros([BLOCK], tl.float32)
        db = tl.zeros([BLOCK], tl.float32)
        for row in range(row_start, row_end):
            offs = tl.cast(row, tl.int64) * N + cols
            mean, rstd = _row_stats(MEAN, RSTD, row, IS_RMS)
            dy, xhat, wdy = _bwd_terms(DY, X, offs, mask, w, mean, rstd)
            c1 = tl.sum(xhat * wdy, axis=0) / N
            c2 = 0.0 if IS_RMS else tl.sum(wdy, axis=0) / N
            _store_dx(DX, DS, offs, mask, xhat, wdy, c1, c2, rstd, HAS_DSUM)
            dw += dy * xhat
            db += dy
        if HAS_DW:
            tl.store(DW + cols, dw, mask=mask)
        if HAS_DB:
            tl.store(DB + cols, db, mask=mask)
    else:
        for row in range(row_start, row_end):
            base = tl.cast(row, tl.int64) * N
            mean, rstd = _row_stats(MEAN, RSTD, row, IS_RMS)
            c1 = 0.0
            c2 = 0.0
            for start in range(0, N, BLOCK):
                offs = start + cols
                mask = offs < N
                w = _load_param(W, offs, mask, HAS_WEIGHT, 1.0)
                dy, xhat, wdy = _bwd_terms(DY, X, base + offs, mask, w, mean, rstd)
                c1 += tl.sum(xhat * wdy, axis=0)
                c2 += tl.sum(wdy, axis=0)
            c1 = c1 / N
            c2 = 0.0 if IS_RMS else c2 / N
            for start in range(0, N, BLOCK):
                offs = start + cols
                mask = offs < N
                w = _load_param(W, offs, mask, HAS_WEIGHT, 1.0)
                dy, xhat, wdy = _bwd_terms(DY, X, base + offs, mask, w, mean, rstd)
                _store_dx(DX, DS, base + offs, mask, xhat, wdy, c1, c2, rstd, HAS_DSUM)
                if HAS_DW:
                    tl.store(DW + offs, tl.load(DW + offs, mask=mask) + dy * xhat, mask=mask)
                if HAS_DB:
                    tl.store(DB + offs, tl.load(DB + offs, mask=mask) + dy, mask=mask)
            # The next row reads back these partials: make the stores visible to every thread.
            tl.debug_barrier()


# ---------------------------------------------------------------- BatchNorm


@triton.jit
def _bn_tile(tile, c, C, HW, s_n, s_c, s_hw, hw_blocks, BLOCK_HW: tl.constexpr):
    # Tile `tile` covers channels c of sample n, positions [hw0, hw0 + BLOCK_HW). Strides of 1
    # are specialized by the JIT, so both layouts get contiguous (vectorized) accesses.
    n = tile // hw_blocks
    hw0 = (tile - n * hw_blocks) * BLOCK_HW
    hw = hw0 + tl.arange(0, BLOCK_HW)
    offs = tl.cast(n, tl.int64) * s_n + (c[:, None] * s_c + hw[None, :] * s_hw)
    mask = (c[:, None] < C) & (hw[None, :] < HW)
    return offs, mask, tl.minimum(HW - hw0, BLOCK_HW).to(tl.float32)


@triton.jit
def _bn_params(MEAN, INVSTD, W, B, c, cmask, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    mean = tl.load(MEAN + c, mask=cmask, other=0.0)
    invstd = tl.load(INVSTD + c, mask=cmask, other=0.0)
    w = _load_param(W, c, cmask, HAS_WEIGHT, 1.0)
    b = _load_param(B, c, cmask, HAS_BIAS, 0.0)
    return mean[:, None], invstd[:, None], w[:, None], b[:, None]


@triton.jit
def _bn_affine(x, mean, invstd, w, b):
    # The forward and the ReLU mask of the backward both use this, so they agree to the bit.
    return (x - mean) * (invstd * w) + b


@triton.jit
def bn_stats_kernel(
    X,
    PMEAN,
    PM2,
    PCOUNT,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    hw_blocks,
    tiles,
    tiles_per_split,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per-channel (mean, M2, count) of one split of the tiles, merged tile by tile with Chan's
    update; the splits are merged by bn_finalize_kernel."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = 0.0
    t0 = split * tiles_per_split
    for tile in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        offs, mask, n_valid = _bn_tile(tile, c, C, HW, s_n, s_c, s_hw, hw_blocks, BLOCK_HW)
        x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        tmean = tl.sum(x, axis=1) / n_valid
        d = tl.where(mask, x - tmean[:, None], 0.0)
        mean, m2, count = _chan_merge(mean, m2, count, tmean, tl.sum(d * d, axis=1), n_valid)
    cmask = c < C
    tl.store(PMEAN + split * C + c, mean, mask=cmask)
    tl.store(PM2 + split * C + c, m2, mask=cmask)
    if tl.program_id(1) == 0:
        tl.store(PCOUNT + split, count)


@triton.jit
def bn_finalize_kernel(PMEAN, PM2, PCOUNT, MEAN, INVSTD, C, splits, eps, BLOCK_C: tl.constexpr):
    """Merges the splits' statistics in split order; biased variance, invstd = 1/sqrt(var+eps)."""
    c = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean = tl.zeros([BLOCK_C], tl.float32)
    m2 = tl.zeros([BLOCK_C], tl.float32)
    count = 0.0
    for s in range(splits):
        smean = tl.load(PMEAN + s * C + c, mask=cmask, other=0.0)
        sm2 = tl.load(PM2 + s * C + c, mask=cmask, other=0.0)
        mean, m2, count = _chan_merge(mean, m2, count, smean, sm2, tl.load(PCOUNT + s))
    tl.store(MEAN + c, mean, mask=cmask)
    tl.store(INVSTD + c, tl.rsqrt(m2 / count + eps), mask=cmask)


@triton.jit
def bn_fwd_kernel(
    X,
    Y,
    MEAN,
    INVSTD,
    W,
    B,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    hw_blocks,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """BatchNorm (Ioffe & Szegedy, 2015) apply: y = (x - mean) * invstd * w + b, optional ReLU."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    offs, mask, _n = _bn_tile(tl.program_id(0), c, C, HW, s_n, s_c, s_hw, hw_blocks, BLOCK_HW)
    mean, invstd, w, b = _bn_params(MEAN, INVSTD, W, B, c, c < C, HAS_WEIGHT, HAS_BIAS)
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    y = _bn_affine(x, mean, invstd, w, b)
    if RELU:
        y = tl.maximum(y, 0.0)
    tl.store(Y + offs, _cast(y, Y), mask=mask)


@triton.jit
def _bn_grad(DY, X, offs, mask, mean, invstd, w, b, RELU: tl.constexpr):
    # dy with the ReLU's mask applied (from the recomputed pre-activation), and xhat.
    x = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32)
    if RELU:
        dy = tl.where(_bn_affine(x, mean, invstd, w, b) > 0.0, dy, 0.0)
    return dy, (x - mean) * invstd


@triton.jit
def bn_bwd_reduce_kernel(
    DY,
    X,
    MEAN,
    INVSTD,
    W,
    B,
    PDY,
    PDYX,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    hw_blocks,
    tiles,
    tiles_per_split,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """Per-channel partial sums of dy and dy * xhat over one split of the tiles."""
    split = tl.program_id(0)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    mean, invstd, w, b = _bn_params(MEAN, INVSTD, W, B, c, cmask, HAS_WEIGHT, HAS_BIAS)
    sum_dy = tl.zeros([BLOCK_C], tl.float32)
    sum_dyx = tl.zeros([BLOCK_C], tl.float32)
    t0 = split * tiles_per_split
    for tile in range(t0, tl.minimum(t0 + tiles_per_split, tiles)):
        offs, mask, _n = _bn_tile(tile, c, C, HW, s_n, s_c, s_hw, hw_blocks, BLOCK_HW)
        dy, xhat = _bn_grad(DY, X, offs, mask, mean, invstd, w, b, RELU)
        sum_dy += tl.sum(dy, axis=1)
        sum_dyx += tl.sum(dy * xhat, axis=1)
    tl.store(PDY + split * C + c, sum_dy, mask=cmask)
    tl.store(PDYX + split * C + c, sum_dyx, mask=cmask)


@triton.jit
def bn_bwd_dx_kernel(
    DY,
    X,
    DX,
    MEAN,
    INVSTD,
    W,
    B,
    SUM_DY,
    SUM_DYX,
    inv_count,
    C,
    HW,
    s_n,
    s_c,
    s_hw,
    hw_blocks,
    TRAINING: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RELU: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HW: tl.constexpr,
):
    """dx = w * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) with batch statistics (the
    means are per channel), dx = w * invstd * dy with running statistics."""
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = c < C
    offs, mask, _n = _bn_tile(tl.program_id(0), c, C, HW, s_n, s_c, s_hw, hw_blocks, BLOCK_HW)
    mean, invstd, w, b = _bn_params(MEAN, INVSTD, W, B, c, cmask, HAS_WEIGHT, HAS_BIAS)
    dy, xhat = _bn_grad(DY, X, offs, mask, mean, invstd, w, b, RELU)
    if TRAINING:
        mean_dy = tl.load(SUM_DY + c, mask=cmask, other=0.0)[:, None] * inv_count
        mean_dyx = tl.load(SUM_DYX + c, mask=cmask, other=0.0)[:, None] * inv_count
        dy = dy - mean_dy - xhat * mean_dyx
    tl.store(DX + offs, _cast(dy * (w * invstd), DX), mask=mask)
