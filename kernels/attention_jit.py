"""The @triton.jit kernels of the attention family; kernels/attention.py holds their launchers.

FlashAttention-2 (Dao, 2023): the forward walks the key blocks of one query block with an online
softmax and saves the log-sum-exp; the backward recomputes the probabilities from it, one kernel
per key block for dK/dV (looping over the query heads of its GQA group) and one per query block
for dQ, so no gradient is accumulated with atomics (deterministic). Both walk only the key or
query blocks that intersect the causal/window band. Dense (B, H, S, D) and packed varlen
(T, H, D) inputs share the kernels: VARLEN reads each sequence's rows from cu_seqlens.

Semantics (band, dropout counters and hash) are those of csrc/common/attention_math.h.
"""

import triton
import triton.language as tl

from fastdl import _ext

from .norm_jit import _to

# The interpreter's tl.dot mishandles bfloat16 operands (numpy has no bfloat16); there the
# operands are widened to float32 first, which is exact for bf16/fp16 products, as on the GPU.
_INTERPRETED = tl.constexpr(_ext.TRITON_INTERPRET)

# ---------------------------------------------------------------- device helpers


@triton.jit
def _mul32(x, c: tl.constexpr):
    # (x * c) mod 2^32 in int64 without overflow: by 16-bit halves of x (x, c < 2^32).
    return ((x & 0xFFFF) * c + ((((x >> 16) * c) & 0xFFFF) << 16)) & 0xFFFFFFFF


@triton.jit
def _mix32(x):
    # lowbias32 (C. Wellons, 2018), as fastdl_mix32.
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


@triton.jit
def _dropout_keep(ctr, seed_lo, seed_hi, threshold):
    """fastdl_dropout_keep on int64 counters (< 2^63)."""
    x = _mix32((ctr & 0xFFFFFFFF) ^ seed_lo)
    x = _mix32(x ^ (ctr >> 32) ^ seed_hi)
    return x >= threshold


@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    # float32 inputs multiply in full precision (the default would round them to tf32).
    if _INTERPRETED:
        r = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    elif IEEE:
        r = tl.dot(a, b, input_precision="ieee")
    else:
        r = tl.dot(a, b)
    return r


@triton.jit
def _seq(CU, n, S, VARLEN: tl.constexpr):
    """(first row, length) of sequence n: from cu_seqlens, or (0, S) for dense inputs."""
    if VARLEN:
        start = tl.load(CU + n).to(tl.int64)
        length = (tl.load(CU + n + 1) - start).to(tl.int32)
    else:
        start = tl.zeros([], tl.int64)
        length = S
    return start, length


@triton.jit
def _scores(
    q,
    kt,
    offs_m,
    offs_n,
    sq,
    sk,
    scale,
    left,
    right,
    MASK,
    sm_i,
    sm_j,
    ctr,
    ctr_row,
    BOTTOM_RIGHT: tl.constexpr,
    HAS_MASK: tl.constexpr,
    IEEE: tl.constexpr,
):
    """scale * q k^T (+ mask), -inf where (i, j) is outside the band or the sequence; also the
    dropout counters of the block."""
    s = _dot(q, kt, IEEE) * scale
    i = offs_m[:, None] + (sk - sq if BOTTOM_RIGHT else 0)
    j = offs_n[None, :]
    ok = (j < sk) & (offs_m[:, None] < sq)
    # A negative side is unbounded.
    jlo = tl.where(left < 0, -(1 << 30), i - left)
    jhi = tl.where(right < 0, 1 << 30, i + right)
    ok = ok & (j >= jlo) & (j <= jhi)
    if HAS_MASK:
        mptr = MASK + offs_m[:, None].to(tl.int64) * sm_i + offs_n[None, :].to(tl.int64) * sm_j
        s += tl.load(mptr, mask=ok, other=0.0)
    s = tl.where(ok, s, float("-inf"))
    c = ctr + offs_m[:, None].to(tl.int64) * ctr_row + offs_n[None, :]
    return s, c


@triton.jit
def _key_range(start_m, BLOCK_M: tl.constexpr, sq, sk, left, right, BOTTOM_RIGHT: tl.constexpr):
    off = sk - sq if BOTTOM_RIGHT else 0
    lo = tl.where(left < 0, 0, tl.maximum(start_m + off - left, 0))
    hi = tl.where(right < 0, sk, tl.minimum(start_m + BLOCK_M + off + right, sk))
    return lo, hi


# ---------------------------------------------------------------- forward


@triton.jit
def attention_fwd_kernel(
    Q, K, V, O, LSE, MASK, CU_Q, CU_K,  # noqa: E741 (Q, K, V, O: the paper's names)
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, so_b, so_h, so_s, sl_b, sl_h,
    sm_b, sm_h, sm_i, sm_j,
    H, GROUP, SQ, SK, D, scale, left, right, keep_scale, threshold, seed_lo, seed_hi, offset,
    BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """One query block of one (sequence, head): out and lse (FlashAttention-2, Alg. 1)."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q0, sq = _seq(CU_Q, b, SQ, VARLEN)
    k0, sk = _seq(CU_K, b, SK, VARLEN)
    if start_m < sq:
        if VARLEN:  # packed rows; counters over packed token indices (SQ, SK = Tq, Tk)
            ctr = offset + (h * SQ + q0) * SK + k0
            bq, bk, bv = q0 * sq_s, k0 * sk_s, k0 * sv_s
            bo, bl = q0 * so_s, q0
        else:
            ctr = offset + (b * H + h).to(tl.int64) * SQ * SK
            bq, bk, bv = b.to(tl.int64) * sq_b, b.to(tl.int64) * sk_b, b.to(tl.int64) * sv_b
            bo, bl = b.to(tl.int64) * so_b, b.to(tl.int64) * sl_b
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qp = Q + bq + h * sq_h + offs_m[:, None].to(tl.int64) * sq_s + offs_d[None, :]
        q = tl.load(qp, mask=(offs_m[:, None] < sq) & dmask[None, :], other=0.0)
        mbase = MASK + b.to(tl.int64) * sm_b + h * sm_h
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _key_range(start_m, BLOCK_M, sq, sk, left, right, BOTTOM_RIGHT)
        for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kvm = (offs_n[:, None] < sk) & dmask[None, :]
            rows_n = offs_n[:, None].to(tl.int64)
            k = tl.load(K + bk + hk * sk_h + rows_n * sk_s + offs_d[None, :], mask=kvm, other=0.0)
            v = tl.load(V + bv + hk * sv_h + rows_n * sv_s + offs_d[None, :], mask=kvm, other=0.0)
            s, c = _scores(q, tl.trans(k), offs_m, offs_n, sq, sk, scale, left, right, mbase,
                           sm_i, sm_j, ctr, SK, BOTTOM_RIGHT, HAS_MASK, IEEE)  # fmt: skip
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                p = tl.where(_dropout_keep(c, seed_lo, seed_hi, threshold), p * keep_scale, 0.0)
            acc = acc * alpha[:, None] + _dot(_to(p, v.dtype), v, IEEE)
            m_i = m_new
        none = l_i == 0.0
        out = acc / tl.where(none, 1.0, l_i)[:, None]
        op = O + bo + h * so_h + offs_m[:, None].to(tl.int64) * so_s + offs_d[None, :]
        tl.store(op, _to(out, O.dtype.element_ty), mask=(offs_m[:, None] < sq) & dmask[None, :])
        lse = tl.where(none, float("-inf"), m_i + tl.log(tl.where(none, 1.0, l_i)))
        tl.store(LSE + bl + h * sl_h + offs_m, lse, mask=offs_m < sq)


# ---------------------------------------------------------------- backward


@triton.jit
def _probs(s, c, lse, do, vt, delta, keep_scale, threshold, seed_lo, seed_hi,
           DROPOUT: tl.constexpr, IEEE: tl.constexpr):  # fmt: skip
    """P recomputed from lse, the dropped P * Z (what multiplied V), and dS = P (dP Z - delta)."""
    p = tl.where(lse[:, None] == float("-inf"), 0.0, tl.exp(s - lse[:, None]))
    dp = _dot(do, vt, IEEE)
    pz = p
    if DROPOUT:
        keep = _dropout_keep(c, seed_lo, seed_hi, threshold)
        pz = tl.where(keep, p * keep_scale, 0.0)
        dp = tl.where(keep, dp * keep_scale, 0.0)
    return pz, p * (dp - delta[:, None])


@triton.jit
def attention_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV, GM, MASK, CU_Q, CU_K,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sd_b, sd_h, sd_s, sl_b, sl_h,
    sg_b, sg_h, sg_s, sm_b, sm_h, sm_i, sm_j,
    HKV, GROUP, SQ, SK, D, scale, left, right, keep_scale, threshold, seed_lo, seed_hi, offset,
    BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr, WANT_GM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dK and dV of one key block of one (sequence, kv head), over the query heads of its group
    and the query blocks of the band (FlashAttention-2, Alg. 2). dK/dV (and the full mask
    gradient GM, when WANT_GM) are laid out like K (contiguous, strides sg_* for GM)."""
    start_n = tl.program_id(0) * BLOCK_N
    bh = tl.program_id(1)
    b = bh // HKV
    hk = bh % HKV
    H = HKV * GROUP
    q0, sq = _seq(CU_Q, b, SQ, VARLEN)
    k0, sk = _seq(CU_K, b, SK, VARLEN)
    if start_n < sk:
        if VARLEN:
            bq, bk, bv, bd, bl = q0 * sq_s, k0 * sk_s, k0 * sv_s, q0 * sd_s, q0
        else:
            b64 = b.to(tl.int64)
            bq, bk, bv, bd, bl = b64 * sq_b, b64 * sk_b, b64 * sv_b, b64 * sd_b, b64 * sl_b
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        kvm = (offs_n[:, None] < sk) & dmask[None, :]
        rows_n = offs_n[:, None].to(tl.int64)
        k = tl.load(K + bk + hk * sk_h + rows_n * sk_s + offs_d[None, :], mask=kvm, other=0.0)
        v = tl.load(V + bv + hk * sv_h + rows_n * sv_s + offs_d[None, :], mask=kvm, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        # Query rows i that may see a key of this block: i in [j - off - right, j - off + left].
        off = sk - sq if BOTTOM_RIGHT else 0
        lo = tl.where(right < 0, 0, tl.maximum(start_n - off - right, 0))
        hi = tl.where(left < 0, sq, tl.minimum(start_n + BLOCK_N - off + left, sq))
        for g in range(GROUP):
            h = hk * GROUP + g
            if VARLEN:
                ctr = offset + (h * SQ + q0) * SK + k0
            else:
                ctr = offset + (b * H + h).to(tl.int64) * SQ * SK
            mbase = MASK + b.to(tl.int64) * sm_b + h * sm_h
            for start_m in range((lo // BLOCK_M) * BLOCK_M, hi, BLOCK_M):
                offs_m = start_m + tl.arange(0, BLOCK_M)
                qm = (offs_m[:, None] < sq) & dmask[None, :]
                rows_m = offs_m[:, None].to(tl.int64)
                q = tl.load(Q + bq + h * sq_h + rows_m * sq_s + offs_d[None, :], mask=qm, other=0.0)
                do = tl.load(
                    DO + bd + h * sd_h + rows_m * sd_s + offs_d[None, :], mask=qm, other=0.0
                )
                lse = tl.load(LSE + bl + h * sl_h + offs_m, mask=offs_m < sq, other=0.0)
                delta = tl.load(DELTA + bl + h * sl_h + offs_m, mask=offs_m < sq, other=0.0)
                s, c = _scores(q, tl.trans(k), offs_m, offs_n, sq, sk, scale, left, right, mbase,
                               sm_i, sm_j, ctr, SK, BOTTOM_RIGHT, HAS_MASK, IEEE)  # fmt: skip
                pz, ds = _probs(s, c, lse, do, tl.trans(v), delta, keep_scale, threshold,
                                seed_lo, seed_hi, DROPOUT, IEEE)  # fmt: skip
                dv += _dot(tl.trans(_to(pz, do.dtype)), do, IEEE)
                dk += _dot(tl.trans(_to(ds, q.dtype)), q, IEEE)
                if WANT_GM:
                    gp = GM + b.to(tl.int64) * sg_b + h * sg_h + rows_m * sg_s + offs_n[None, :]
                    tl.store(gp, ds, mask=(offs_m[:, None] < sq) & (offs_n[None, :] < sk))
        dkp = DK + bk + hk * sk_h + rows_n * sk_s + offs_d[None, :]
        tl.store(dkp, _to(dk * scale, DK.dtype.element_ty), mask=kvm)
        dvp = DV + bv + hk * sv_h + rows_n * sv_s + offs_d[None, :]
        tl.store(dvp, _to(dv, DV.dtype.element_ty), mask=kvm)


@triton.jit
def attention_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ, MASK, CU_Q, CU_K,
    sq_b, sq_h, sq_s, sk_b, sk_h, sk_s, sv_b, sv_h, sv_s, sd_b, sd_h, sd_s, sl_b, sl_h,
    sm_b, sm_h, sm_i, sm_j,
    H, GROUP, SQ, SK, D, scale, left, right, keep_scale, threshold, seed_lo, seed_hi, offset,
    BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, DROPOUT: tl.constexpr,
    VARLEN: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """dQ of one query block of one (sequence, head); DQ is laid out like Q."""
    start_m = tl.program_id(0) * BLOCK_M
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    hk = h // GROUP
    q0, sq = _seq(CU_Q, b, SQ, VARLEN)
    k0, sk = _seq(CU_K, b, SK, VARLEN)
    if start_m < sq:
        if VARLEN:
            ctr = offset + (h * SQ + q0) * SK + k0
            bq, bk, bv, bd, bl = q0 * sq_s, k0 * sk_s, k0 * sv_s, q0 * sd_s, q0
        else:
            ctr = offset + (b * H + h).to(tl.int64) * SQ * SK
            b64 = b.to(tl.int64)
            bq, bk, bv, bd, bl = b64 * sq_b, b64 * sk_b, b64 * sv_b, b64 * sd_b, b64 * sl_b
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        dmask = offs_d < D
        qm = (offs_m[:, None] < sq) & dmask[None, :]
        rows_m = offs_m[:, None].to(tl.int64)
        q = tl.load(Q + bq + h * sq_h + rows_m * sq_s + offs_d[None, :], mask=qm, other=0.0)
        do = tl.load(DO + bd + h * sd_h + rows_m * sd_s + offs_d[None, :], mask=qm, other=0.0)
        lse = tl.load(LSE + bl + h * sl_h + offs_m, mask=offs_m < sq, other=0.0)
        delta = tl.load(DELTA + bl + h * sl_h + offs_m, mask=offs_m < sq, other=0.0)
        mbase = MASK + b.to(tl.int64) * sm_b + h * sm_h
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        lo, hi = _key_range(start_m, BLOCK_M, sq, sk, left, right, BOTTOM_RIGHT)
        for start_n in range((lo // BLOCK_N) * BLOCK_N, hi, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            kvm = (offs_n[:, None] < sk) & dmask[None, :]
            rows_n = offs_n[:, None].to(tl.int64)
            k = tl.load(K + bk + hk * sk_h + rows_n * sk_s + offs_d[None, :], mask=kvm, other=0.0)
            v = tl.load(V + bv + hk * sv_h + rows_n * sv_s + offs_d[None, :], mask=kvm, other=0.0)
            s, c = _scores(q, tl.trans(k), offs_m, offs_n, sq, sk, scale, left, right, mbase,
                           sm_i, sm_j, ctr, SK, BOTTOM_RIGHT, HAS_MASK, IEEE)  # fmt: skip
            _, ds = _probs(s, c, lse, do, tl.trans(v), delta, keep_scale, threshold, seed_lo,
                           seed_hi, DROPOUT, IEEE)  # fmt: skip
            dq += _dot(_to(ds, k.dtype), k, IEEE)
        dqp = DQ + bq + h * sq_h + rows_m * sq_s + offs_d[None, :]
        tl.store(dqp, _to(dq * scale, DQ.dtype.element_ty), mask=qm)
