"""Triton kernels of the rnn family: the fused pointwise step of the LSTM (Hochreiter &
Schmidhuber, 1997; forget gate of Gers et al., 2000) and the GRU (Cho et al., 2014), forward and
backward, in torch's gate order. The recurrent GEMMs run between them (kernels/rnn.py); each
kernel reads a step's gate pre-activations and states once and writes the new state, the output
and what BPTT needs, as csrc/cpu/rnn_kernels.h does.

Grid: (B, cdiv(H, BLOCK)); program (b, k) handles columns [k * BLOCK, (k + 1) * BLOCK) of row b.
POS[b] is row b's position in this step, < 0 when its sequence has ended (the program then
touches nothing). Everything is float32: the launchers widen half-precision inputs once.
"""

import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    # 1 - 2 / (e^{2x} + 1) saturates to +-1 without inf / inf at large |x|, but below |x| = 0.3
    # that difference cancels (an absolute error of ~6e-8 however small tanh x is), so the Taylor
    # series (terms to x^11, truncation < 1e-9 there) takes over, as csrc/cpu/rnn_kernels.h does.
    s = x * x
    small = x * (
        1.0
        + s
        * (
            -1.0 / 3
            + s * (2.0 / 15 + s * (-17.0 / 315 + s * (62.0 / 2835 + s * (-1382.0 / 155925))))
        )
    )
    return tl.where(tl.abs(x) < 0.3, small, 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))


@triton.jit
def _step(POS, B, H, BLOCK: tl.constexpr):
    """(row of this program's position in a (T, B, .) tensor, column offsets, mask)."""
    b = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    p = tl.load(POS + b)
    # p broadcast over the columns: a block-shaped mask (the interpreter wants no scalar in it).
    mask = (cols < H) & ((cols * 0 + p) >= 0)
    row = tl.maximum(p, 0).to(tl.int64) * B + b
    return b.to(tl.int64), row, cols, mask


@triton.jit
def lstm_step_fwd_kernel(
    GX, GH, POS, C, OUT, Y, GATES, CS, B, H, HAS_Y: tl.constexpr, BLOCK: tl.constexpr
):
    b, row, cols, m = _step(POS, B, H, BLOCK)
    gx = GX + row * 4 * H + cols
    gh = GH + b * 4 * H + cols
    i = tl.sigmoid(tl.load(gx, mask=m, other=0.0) + tl.load(gh, mask=m, other=0.0))
    f = tl.sigmoid(tl.load(gx + H, mask=m, other=0.0) + tl.load(gh + H, mask=m, other=0.0))
    g = _tanh(tl.load(gx + 2 * H, mask=m, other=0.0) + tl.load(gh + 2 * H, mask=m, other=0.0))
    o = tl.sigmoid(tl.load(gx + 3 * H, mask=m, other=0.0) + tl.load(gh + 3 * H, mask=m, other=0.0))
    c = f * tl.load(C + b * H + cols, mask=m, other=0.0) + i * g
    r = o * _tanh(c)
    tl.store(C + b * H + cols, c, mask=m)
    tl.store(CS + row * H + cols, c, mask=m)
    tl.store(OUT + b * H + cols, r, mask=m)
    if HAS_Y:
        tl.store(Y + row * H + cols, r, mask=m)
    gates = GATES + row * 4 * H + cols
    tl.store(gates, i, mask=m)
    tl.store(gates + H, f, mask=m)
    tl.store(gates + 2 * H, g, mask=m)
    tl.store(gates + 3 * H, o, mask=m)


@triton.jit
def lstm_step_bwd_kernel(
    DH, GY, GATES, CS, CPREV, DC, DG, POS, B, H, HAS_GY: tl.constexpr, BLOCK: tl.constexpr
):
    b, row, cols, m = _step(POS, B, H, BLOCK)
    dr = tl.load(DH + b * H + cols, mask=m, other=0.0)
    if HAS_GY:
        dr += tl.load(GY + row * H + cols, mask=m, other=0.0)
    gates = GATES + row * 4 * H + cols
    i = tl.load(gates, mask=m, other=0.0)
    f = tl.load(gates + H, mask=m, other=0.0)
    g = tl.load(gates + 2 * H, mask=m, other=0.0)
    o = tl.load(gates + 3 * H, mask=m, other=0.0)
    tc = _tanh(tl.load(CS + row * H + cols, mask=m, other=0.0))
    dct = tl.load(DC + b * H + cols, mask=m, other=0.0) + dr * o * (1.0 - tc * tc)
    cprev = tl.load(CPREV + row * H + cols, mask=m, other=0.0)
    dg = DG + row * 4 * H + cols
    tl.store(dg, dct * g * i * (1.0 - i), mask=m)
    tl.store(dg + H, dct * cprev * f * (1.0 - f), mask=m)
    tl.store(dg + 2 * H, dct * i * (1.0 - g * g), mask=m)
    tl.store(dg + 3 * H, dr * tc * o * (1.0 - o), mask=m)
    tl.store(DC + b * H + cols, dct * f, mask=m)


@triton.jit
def gru_step_fwd_kernel(GX, GH, POS, HS, Y, GATES, B, H, BLOCK: tl.constexpr):
    b, row, cols, m = _step(POS, B, H, BLOCK)
    gx = GX + row * 3 * H + cols
    gh = GH + b * 3 * H + cols
    r = tl.sigmoid(tl.load(gx, mask=m, other=0.0) + tl.load(gh, mask=m, other=0.0))
    z = tl.sigmoid(tl.load(gx + H, mask=m, other=0.0) + tl.load(gh + H, mask=m, other=0.0))
    ghn = tl.load(gh + 2 * H, mask=m, other=0.0)
    n = _tanh(tl.load(gx + 2 * H, mask=m, other=0.0) + r * ghn)
    h = n + z * (tl.load(HS + b * H + cols, mask=m, other=0.0) - n)
    tl.store(HS + b * H + cols, h, mask=m)
    tl.store(Y + row * H + cols, h, mask=m)
    gates = GATES + row * 4 * H + cols
    tl.store(gates, r, mask=m)
    tl.store(gates + H, z, mask=m)
    tl.store(gates + 2 * H, n, mask=m)
    tl.store(gates + 3 * H, ghn, mask=m)


@triton.jit
def gru_step_bwd_kernel(
    DH, GY, GATES, HPREV, DG, DIRECT, POS, B, H, HAS_GY: tl.constexpr, BLOCK: tl.constexpr
):
    b, row, cols, m = _step(POS, B, H, BLOCK)
    d = tl.load(DH + b * H + cols, mask=m, other=0.0)
    if HAS_GY:
        d += tl.load(GY + row * H + cols, mask=m, other=0.0)
    gates = GATES + row * 4 * H + cols
    r = tl.load(gates, mask=m, other=0.0)
    z = tl.load(gates + H, mask=m, other=0.0)
    n = tl.load(gates + 2 * H, mask=m, other=0.0)
    ghn = tl.load(gates + 3 * H, mask=m, other=0.0)
    hprev = tl.load(HPREV + row * H + cols, mask=m, other=0.0)
    dn = d * (1.0 - z) * (1.0 - n * n)
    dg = DG + row * 4 * H + cols
    tl.store(dg, dn * ghn * r * (1.0 - r), mask=m)
    tl.store(dg + H, d * (hprev - n) * z * (1.0 - z), mask=m)
    tl.store(dg + 2 * H, dn * r, mask=m)
    tl.store(dg + 3 * H, dn, mask=m)
    tl.store(DIRECT + b * H + cols, d * z, mask=m)
