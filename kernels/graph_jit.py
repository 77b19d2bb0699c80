"""The @triton.jit kernels of the graph family; kernels/graph.py holds their launchers.

Every kernel walks one row of a CSR per program (the CSR by destination for forward passes, its
transpose for the gradients of gathered inputs): each output row has one writer, no atomics, so
results are bit-identical from run to run. A program gathers BLOCK_E entries x BLOCK_F features
per step and reduces over the entries in fp32 (the "row-split" SpMM of Yang, Buluc & Owens, 2018).
Per-entry scalars are fp32 (fp64 under the interpreter for float64 inputs).
"""

import triton
import triton.language as tl

from .norm_jit import _cast


@triton.jit
def _coef(
    e, em, col_j, perm, w, cs, HAS_PERM: tl.constexpr, HAS_W: tl.constexpr, HAS_CS: tl.constexpr
):
    # w[perm(e)] * cs[col e] for the entries e of a block (0 outside the row).
    c = tl.where(em, 1.0, 0.0)
    if HAS_W:
        q = tl.load(perm + e, mask=em, other=0) if HAS_PERM else e
        c = c * tl.load(w + q, mask=em, other=0.0)
    if HAS_CS:
        c = c * tl.load(cs + col_j, mask=em, other=0.0)
    return c


@triton.jit
def gather_sum_kernel(
    rowptr,
    col,
    perm,
    w,
    cs,
    rs,
    ds,
    x,
    xd,
    out,
    F,
    HAS_PERM: tl.constexpr,
    HAS_W: tl.constexpr,
    HAS_CS: tl.constexpr,
    HAS_RS: tl.constexpr,
    HAS_DS: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[i] = rs[i] * sum_{e in row i} w[perm e] * cs[col e] * x[col e] + ds[i] * xd[i]."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    e0 = tl.load(rowptr + row)
    e1 = tl.load(rowptr + row + 1)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        c = _coef(e, em, j, perm, w, cs, HAS_PERM, HAS_W, HAS_CS)
        xv = tl.load(x + j[:, None] * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0)
        acc += tl.sum(c[:, None] * xv.to(c.dtype), axis=0)
    if HAS_RS:
        acc = acc * tl.load(rs + row)
    if HAS_DS:
        acc += tl.load(ds + row) * tl.load(xd + row * F + f, mask=fm, other=0.0).to(acc.dtype)
    tl.store(out + row * F + f, _cast(acc, out), mask=fm)


@triton.jit
def gather_max_kernel(
    rowptr,
    col,
    w,
    x,
    out,
    arg,
    F,
    HAS_W: tl.constexpr,
    IS_MIN: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """out[i, f] = max (min) over e of w[e] * x[col e, f], arg the first entry attaining it;
    empty rows 0 and -1. NaN wins (as torch's amax/amin): the row's first NaN entry."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    e0 = tl.load(rowptr + row)
    e1 = tl.load(rowptr + row + 1)
    sign = -1.0 if IS_MIN else 1.0
    best = tl.full([BLOCK_F], float("-inf"), tl.float32)
    best_arg = tl.full([BLOCK_F], -1, tl.int64)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        c = tl.load(w + e, mask=em, other=0.0) if HAS_W else tl.where(em, 1.0, 0.0)
        xv = tl.load(x + j[:, None] * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0)
        # Maximize sign * value, so one code path serves max and min.
        v = tl.where(em[:, None], sign * (c[:, None] * xv.to(tl.float32)), float("-inf"))
        # tl.max drops NaN: the block's first NaN is found apart, and beats all but an earlier one.
        nan = v != v
        nan_arg = tl.min(tl.where(nan, e[:, None], e1), axis=0)
        v = tl.where(nan, float("-inf"), v)
        blk = tl.max(v, axis=0)
        cand = tl.where((v == blk[None, :]) & em[:, None], e[:, None], e1)
        blk_arg = tl.min(cand, axis=0)
        had_nan = best != best
        take = ((blk > best) | ((best_arg < 0) & (blk_arg < e1))) & ~had_nan
        new_nan = (nan_arg < e1) & ~had_nan
        best = tl.where(new_nan, float("nan"), tl.where(take, blk, best))
        best_arg = tl.where(new_nan, nan_arg, tl.where(take, blk_arg, best_arg))
    res = tl.where(best_arg >= 0, sign * best, 0.0)
    tl.store(out + row * F + f, _cast(res, out), mask=fm)
    tl.store(arg + row * F + f, best_arg, mask=fm)


@triton.jit
def gather_max_bwd_kernel(
    t_rowptr,
    t_col,
    t_perm,
    w,
    g,
    arg,
    out,
    F,
    HAS_W: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """Over the transpose: out[j, f] = sum_t [arg[i, f] == q] w[q] g[i, f], i = t_col[t],
    q = t_perm[t]."""
    row = tl.program_id(0).to(tl.int64)
    f = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    fm = f < F
    t0 = tl.load(t_rowptr + row)
    t1 = tl.load(t_rowptr + row + 1)
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for start in range(t0, t1, BLOCK_E):
        t = start + tl.arange(0, BLOCK_E)
        tm = t < t1
        i = tl.load(t_col + t, mask=tm, other=0)
        q = tl.load(t_perm + t, mask=tm, other=-2)
        c = tl.load(w + q, mask=tm, other=0.0) if HAS_W else tl.where(tm, 1.0, 0.0)
        m2 = tm[:, None] & fm[None, :]
        a = tl.load(arg + i[:, None] * F + f[None, :], mask=m2, other=-3)
        gv = tl.load(g + i[:, None] * F + f[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(a == q[:, None], c[:, None] * gv, 0.0), axis=0)
    tl.store(out + row * F + f, _cast(acc, out), mask=fm)


@triton.jit
def edge_dot_kernel(
    rowptr,
    col,
    a,
    b,
    rs,
    arg,
    dots,
    F,
    HAS_RS: tl.constexpr,
    HAS_ARG: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """dots[e] = rs[i] * sum_f mask(e, f) a[i, f] b[col e, f] over the entries of row i, with
    mask(e, f) = (arg[i, f] == e) when HAS_ARG."""
    row = tl.program_id(0).to(tl.int64)
    e0 = tl.load(rowptr + row)
    e1 = tl.load(rowptr + row + 1)
    scale = tl.load(rs + row) if HAS_RS else 1.0
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        acc = tl.zeros([BLOCK_E], dtype=tl.float32)
        for f0 in range(0, F, BLOCK_F):
            f = f0 + tl.arange(0, BLOCK_F)
            fm = f < F
            av = tl.load(a + row * F + f, mask=fm, other=0.0).to(tl.float32)
            bv = tl.load(
                b + j[:, None] * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0
            ).to(tl.float32)
            prod = av[None, :] * bv
            if HAS_ARG:
                am = tl.load(arg + row * F + f, mask=fm, other=-1)
                prod = tl.where(am[None, :] == e[:, None], prod, 0.0)
            acc += tl.sum(prod, axis=1)
        tl.store(dots + e, acc * scale, mask=em)


# ---------------------------------------------------------------- graph attention


@triton.jit
def gat_scores_kernel(
    h, att_src, att_dst, a_src, a_dst, H, F, BLOCK_H: tl.constexpr, BLOCK_F: tl.constexpr
):
    """a_src[n, k] = <h[n, k], att_src[k]>, a_dst likewise (one program per node)."""
    n = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_H)
    km = k < H
    s = tl.zeros([BLOCK_H], dtype=tl.float32)
    d = tl.zeros([BLOCK_H], dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        f = f0 + tl.arange(0, BLOCK_F)
        m = km[:, None] & (f < F)[None, :]
        off = k[:, None] * F + f[None, :]
        hv = tl.load(h + n * H * F + off, mask=m, other=0.0).to(tl.float32)
        s += tl.sum(hv * tl.load(att_src + off, mask=m, other=0.0), axis=1)
        d += tl.sum(hv * tl.load(att_dst + off, mask=m, other=0.0), axis=1)
    tl.store(a_src + n * H + k, s, mask=km)
    tl.store(a_dst + n * H + k, d, mask=km)


@triton.jit
def gat_fwd_kernel(
    rowptr,
    col,
    h,
    a_src,
    a_dst,
    drop,
    alpha,
    out,
    H,
    F,
    slope,
    HAS_DROP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program per (row, head): online softmax statistics over the row (Milakov &
    Gimelshein, 2018), then alpha and the weighted sum of the gathered rows."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    e0 = tl.load(rowptr + row)
    e1 = tl.load(rowptr + row + 1)
    ad = tl.load(a_dst + row * H + k)
    m = tl.full([BLOCK_E], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        z = tl.load(a_src + j * H + k, mask=em, other=0.0) + ad
        z = tl.where(em, tl.where(z > 0, z, z * slope), float("-inf"))
        m_new = tl.maximum(m, z)
        s = s * tl.exp(tl.where(m_new == float("-inf"), 0.0, m - m_new)) + tl.where(
            em, tl.exp(z - m_new), 0.0
        )
        m = m_new
    mx = tl.max(m, axis=0)
    total = tl.sum(s * tl.exp(tl.where(m == float("-inf"), float("-inf"), m - mx)), axis=0)
    inv = 1.0 / total
    f = tl.arange(0, BLOCK_F)
    fm = f < F
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        z = tl.load(a_src + j * H + k, mask=em, other=0.0) + ad
        z = tl.where(z > 0, z, z * slope)
        al = tl.where(em, tl.exp(z - mx) * inv, 0.0)
        tl.store(alpha + e * H + k, al, mask=em)
        if HAS_DROP:
            al = al * tl.load(drop + e * H + k, mask=em, other=0.0)
        hv = tl.load(
            h + (j[:, None] * H + k) * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0
        )
        acc += tl.sum(al[:, None] * hv.to(tl.float32), axis=0)
    tl.store(out + (row * H + k) * F + f, _cast(acc, out), mask=fm)


@triton.jit
def gat_bwd_rows_kernel(
    rowptr,
    col,
    h,
    g,
    a_src,
    a_dst,
    drop,
    alpha,
    dz,
    g_dst,
    H,
    F,
    slope,
    HAS_DROP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program per (row, head): dalpha_e = drop_e <g_i, h_j>, then the softmax and
    LeakyReLU backward into dz_e, and g_dst[i] = sum_e dz_e."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    e0 = tl.load(rowptr + row)
    e1 = tl.load(rowptr + row + 1)
    f = tl.arange(0, BLOCK_F)
    fm = f < F
    gv = tl.load(g + (row * H + k) * F + f, mask=fm, other=0.0).to(tl.float32)
    tsum = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        hv = tl.load(
            h + (j[:, None] * H + k) * F + f[None, :], mask=em[:, None] & fm[None, :], other=0.0
        )
        da = tl.sum(hv.to(tl.float32) * gv[None, :], axis=1)
        if HAS_DROP:
            da = da * tl.load(drop + e * H + k, mask=em, other=0.0)
        tl.store(dz + e * H + k, da, mask=em)
        tsum += tl.load(alpha + e * H + k, mask=em, other=0.0) * da
    t = tl.sum(tsum, axis=0)
    ad = tl.load(a_dst + row * H + k)
    gd = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start in range(e0, e1, BLOCK_E):
        e = start + tl.arange(0, BLOCK_E)
        em = e < e1
        j = tl.load(col + e, mask=em, other=0)
        z = tl.load(a_src + j * H + k, mask=em, other=0.0) + ad
        al = tl.load(alpha + e * H + k, mask=em, other=0.0)
        v = al * (tl.load(dz + e * H + k, mask=em, other=0.0) - t) * tl.where(z > 0, 1.0, slope)
        tl.store(dz + e * H + k, v, mask=em)
        gd += tl.where(em, v, 0.0)
    tl.store(g_dst + row * H + k, tl.sum(gd, axis=0))


@triton.jit
def gat_bwd_nodes_kernel(
    t_rowptr,
    t_col,
    t_perm,
    g,
    drop,
    alpha,
    dz,
    att_src,
    att_dst,
    g_dst,
    g_src,
    out,
    H,
    F,
    HAS_DROP: tl.constexpr,
    BLOCK_E: tl.constexpr,
    BLOCK_F: tl.constexpr,
):
    """One program per (node j, head) over the transpose: g_src[j] = sum_t dz_q and
    grad_h[j] = sum_t beta_q g_i + g_src[j] att_src + g_dst[j] att_dst."""
    row = tl.program_id(0).to(tl.int64)
    k = tl.program_id(1)
    t0 = tl.load(t_rowptr + row)
    t1 = tl.load(t_rowptr + row + 1)
    f = tl.arange(0, BLOCK_F)
    fm = f < F
    acc = tl.zeros([BLOCK_F], dtype=tl.float32)
    gs = tl.zeros([BLOCK_E], dtype=tl.float32)
    for start in range(t0, t1, BLOCK_E):
        t = start + tl.arange(0, BLOCK_E)
        tm = t < t1
        i = tl.load(t_col + t, mask=tm, other=0)
        q = tl.load(t_perm + t, mask=tm, other=0)
        gs += tl.load(dz + q * H + k, mask=tm, other=0.0)
        beta = tl.load(alpha + q * H + k, mask=tm, other=0.0)
        if HAS_DROP:
            beta = beta * tl.load(drop + q * H + k, mask=tm, other=0.0)
        gv = tl.load(
            g + (i[:, None] * H + k) * F + f[None, :], mask=tm[:, None] & fm[None, :], other=0.0
        )
        acc += tl.sum(beta[:, None] * gv.to(tl.float32), axis=0)
    gsum = tl.sum(gs, axis=0)
    tl.store(g_src + row * H + k, gsum)
    gd = tl.load(g_dst + row * H + k)
    acc += gsum * tl.load(att_src + k * F + f, mask=fm, other=0.0)
    acc += gd * tl.load(att_dst + k * F + f, mask=fm, other=0.0)
    tl.store(out + (row * H + k) * F + f, _cast(acc, out), mask=fm)
