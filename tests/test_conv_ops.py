"""The op contract (DESIGN §2) for the conv family: opcheck of every raw op on every backend,
gradcheck in float64 (CPU native) through the fused epilogue, torch.compile(fullgraph=True)
against eager, bit-identical repeated backward, and the CPU kernels under every ISA."""

import contextlib

import pytest
import torch
from conftest import BF16_ISAS, ISAS, NATIVE_CPU
from conv_ref import assert_close, ref_conv2d

import fastdl
from fastdl import _ext
from fastdl.ops import conv as conv_ops

S1, P1, D1 = [1, 1], [1, 1], [1, 1]


def _samples(dev, grad):
    """(id, op name, args) for every raw op; with `grad`, the differentiable inputs of the
    forward ops require grad (opcheck then also tests the autograd registration)."""

    def t(*shape, fmt=torch.contiguous_format):
        return torch.randn(shape, device=dev).contiguous(memory_format=fmt).requires_grad_(grad)

    x, w, b = t(2, 4, 5, 6), t(6, 4, 3, 3), t(6)
    xc, res_c = t(2, 4, 5, 6, fmt=torch.channels_last), t(2, 6, 5, 6, fmt=torch.channels_last)
    xg, wg = t(1, 6, 5, 5), t(4, 3, 2, 2)
    xd, wd = t(1, 5, 4, 4), t(5, 1, 3, 3)
    xt, wt, bt = t(2, 4, 3, 3), t(4, 3, 4, 4), t(3)
    xw, ww = t(2, 16, 6, 6), t(16, 16, 3, 3)  # Winograd-sized: inference takes F(4x4, 3x3)
    samples = [
        ("fwd", "conv2d_fwd", (x, w, b, None, S1, P1, D1, 1, "none")),
        ("fwd_winograd_inference", "conv2d_fwd", (xw, ww, None, None, S1, P1, D1, 1, "relu", True)),
        ("fwd_cl_relu_res", "conv2d_fwd", (xc, w, b, res_c, S1, P1, D1, 1, "relu")),
        ("fwd_grouped_gelu", "conv2d_fwd", (xg, wg, None, None, [2, 1], [0, 1], [1, 2], 2, "gelu")),
        ("fwd_depthwise_silu", "conv2d_fwd", (xd, wd, None, None, S1, P1, D1, 5, "silu")),
        ("t_fwd", "conv_transpose2d_fwd", (xt, wt, bt, [2, 2], S1, [0, 0], 1, D1)),
        ("t_fwd_cl", "conv_transpose2d_fwd", (xc, wt, None, [1, 2], [0, 1], [0, 1], 1, D1)),
    ]
    if grad:
        return samples
    out, pre = conv_ops.NATIVE.conv2d_fwd(x, w, b, None, S1, P1, D1, 1, "gelu")
    outc, _ = conv_ops.NATIVE.conv2d_fwd(xc, w, b, res_c, S1, P1, D1, 1, "relu")
    g, gc = torch.randn_like(out), torch.randn_like(outc)
    e = x.new_empty(0)
    gt = torch.randn(2, 3, 6, 6, device=dev)
    return [
        *samples,
        ("bwd_gelu", "conv2d_bwd", (g, x, w, e, pre, S1, P1, D1, 1, "gelu", [True] * 4)),
        ("bwd_cl_relu", "conv2d_bwd", (gc, xc, w, outc, e, S1, P1, D1, 1, "relu", [True] * 4)),
        (
            "bwd_weight_only",
            "conv2d_bwd",
            (g, x, w, e, e, S1, P1, D1, 1, "none", [False, True, False, False]),
        ),
        (
            "t_bwd",
            "conv_transpose2d_bwd",
            (gt, xt, wt, [2, 2], S1, [0, 0], 1, D1, [True, True, True]),
        ),
    ]


IDS = [s[0] for s in _samples("cpu", False)]
GRAD_IDS = [s[0] for s in _samples("cpu", True)]


@pytest.mark.parametrize("sample", IDS)
def test_opcheck(backend, sample):
    _, op, args = next(s for s in _samples(backend.device, False) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(conv_ops), op), args)


@pytest.mark.parametrize("sample", GRAD_IDS)
def test_opcheck_requires_grad(backend, sample):
    _, op, args = next(s for s in _samples(backend.device, True) if s[0] == sample)
    torch.library.opcheck(getattr(backend.ops(conv_ops), op), args)


def _t(*shape, fmt=torch.contiguous_format):
    x = torch.randn(*shape, dtype=torch.float64).contiguous(memory_format=fmt)
    return x.requires_grad_()


GRADCHECK = {
    "conv_bias_relu_res": (
        lambda x, w, b, r: fastdl.conv2d(x, w, b, 1, 1, activation="relu", residual=r),
        (_t(2, 3, 4, 5), _t(4, 3, 3, 3), _t(4), _t(2, 4, 4, 5)),
    ),
    "conv_cl_silu_res": (
        lambda x, w, r: fastdl.conv2d(x, w, None, 2, 1, activation="silu", residual=r),
        (_t(1, 3, 5, 5, fmt=torch.channels_last), _t(2, 3, 2, 2), _t(1, 2, 3, 3)),
    ),
    "conv_grouped_gelu": (
        lambda x, w, b: fastdl.conv2d(x, w, b, (1, 2), (0, 1), (2, 1), 2, activation="gelu"),
        (_t(1, 4, 6, 5), _t(4, 2, 2, 3), _t(4)),
    ),
    "depthwise": (
        lambda x, w, b: fastdl.conv2d(x, w, b, 1, 1, 1, 3),
        (_t(2, 3, 4, 4), _t(3, 1, 3, 3), _t(3)),
    ),
    "conv_transpose": (
        lambda x, w, b: fastdl.conv_transpose2d(x, w, b, 2, 1, 1, 2),
        (_t(1, 4, 3, 3), _t(4, 1, 3, 3), _t(2)),
    ),
}


@pytest.mark.parametrize("case", GRADCHECK)
def test_gradcheck(case):
    fn, args = GRADCHECK[case]
    with fastdl.backend("native"):
        assert torch.autograd.gradcheck(fn, args)


def test_compile_fullgraph(backend):
    def f(x, w, b, r, wt):
        y = fastdl.conv2d(x, w, b, padding="same", activation="silu", residual=r)
        return fastdl.conv_transpose2d(y, wt, None, 2, 1, 1)

    dev = backend.device
    x = torch.randn(2, 3, 6, 5, device=dev, requires_grad=True)
    w = torch.randn(4, 3, 3, 3, device=dev, requires_grad=True)
    b = torch.randn(4, device=dev, requires_grad=True)
    r = torch.randn(2, 4, 6, 5, device=dev, requires_grad=True)
    wt = torch.randn(4, 2, 3, 3, device=dev, requires_grad=True)
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True)
    y, y_eager = compiled(x, w, b, r, wt), f(x, w, b, r, wt)
    torch.testing.assert_close(y, y_eager)
    grads = torch.autograd.grad(y.sum(), (x, w, b, r, wt))
    grads_eager = torch.autograd.grad(y_eager.sum(), (x, w, b, r, wt))
    for a, e in zip(grads, grads_eager, strict=True):
        torch.testing.assert_close(a, e)


def test_backward_deterministic():
    x = torch.randn(4, 16, 20, 20, requires_grad=True)
    w = torch.randn(24, 16, 3, 3, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    g = torch.randn(4, 24, 20, 20)

    def grads():
        y = fastdl.conv2d(x, w, b, padding=1, activation="relu")
        return torch.autograd.grad(y, (x, w, b), g)

    first = grads()
    for _ in range(2):
        for a, e in zip(grads(), first, strict=True):
            assert torch.equal(a, e)


@pytest.mark.parametrize("weight_cl", [False, True])
def test_deep_layer_backward(weight_cl):
    """A deep layer (more output channels than pixels) with the weight in either layout: the
    GEMMs then take the (K, C, R, S) weight as it is, or the channels_last one as it is. Both
    match float64 and repeat bit for bit."""
    x = torch.randn(30, 37, 5, 5).contiguous(memory_format=torch.channels_last)
    w = torch.randn(141, 37, 3, 3) / 18
    if weight_cl:
        w = w.contiguous(memory_format=torch.channels_last)
    x.requires_grad_()
    w.requires_grad_()
    b = torch.randn(141, requires_grad=True)
    g = torch.randn(30, 141, 3, 3)

    def grads():
        y = fastdl.conv2d(x, w, b, activation="relu")
        return (y, *torch.autograd.grad(y, (x, w, b), g))

    first = grads()
    for a, e in zip(grads(), first, strict=True):
        assert torch.equal(a, e)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = ref_conv2d(xd, wd, bd, 1, 0, 1, 1, "relu")
    assert_close(first[0], yd, torch.float32)
    for got, want in zip(first[1:], torch.autograd.grad(yd, (xd, wd, bd), g.double()), strict=True):
        assert_close(got, want, torch.float32, scale=4.0)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa(isa):
    """A depthwise, grouped ones (3 groups of 4: one partial vector on AVX-512; 6 groups of 2;
    both rotated in registers on the SIMD ISAs; groups of 8, 16, 24 and 32 output channels on
    the broadcast kernels, 8 and 24 (16 too on AMD) in eight-lane vectors on AVX-512, four
    groups of 8 in and out in pairs there) and a dense conv, every gradient, under each ISA's
    kernels."""
    x = torch.randn(2, 12, 7, 6, requires_grad=True).contiguous(memory_format=torch.channels_last)
    w = torch.randn(12, 1, 3, 3, requires_grad=True)
    wg = torch.randn(12, 4, 3, 3, requires_grad=True)
    wg2 = torch.randn(12, 2, 3, 3, requires_grad=True)
    w8 = torch.randn(32, 3, 3, 3, requires_grad=True)
    w88 = torch.randn(32, 8, 3, 3, requires_grad=True)
    w16 = torch.randn(32, 16, 3, 3, requires_grad=True)
    w24 = torch.randn(48, 16, 1, 3, requires_grad=True)
    w32 = torch.randn(64, 24, 3, 3, requires_grad=True)
    w2 = torch.randn(5, 64, 3, 2, requires_grad=True)
    params = (x, w, wg, wg2, w8, w88, w16, w24, w32, w2)

    def net(x, w, wg, wg2, w8, w88, w16, w24, w32, w2, conv):
        y = conv(x, w, None, 1, 1, 1, 12, "gelu")
        y = conv(y, wg, None, 1, 1, 1, 3, "relu")
        y = conv(y, wg2, None, 1, 1, 1, 6, "none") / 2
        y = conv(y, w8, None, 1, 1, 1, 4, "none") / 4  # kg 8, cg 3
        y = conv(y, w88, None, 1, 1, 1, 4, "relu") / 4  # kg 8, cg 8
        y = conv(y, w16, None, 1, 1, 1, 2, "relu") / 4  # kg 16, cg 16
        y = conv(y, w24, None, 1, (0, 1), 1, 2, "none") / 4  # kg 24, cg 16
        y = conv(y, w32, None, (1, 2), 1, 1, 2, "silu") / 4  # kg 32, strided
        return conv(y, w2, None, 2, (1, 0), 1, 1, "silu")

    def ours(x, w, b, stride, padding, dilation, groups, act):
        return fastdl.conv2d(x, w, b, stride, padding, dilation, groups, activation=act)

    previous = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    try:
        with fastdl.backend(NATIVE_CPU.name):
            z = net(*params, ours)
            grads = torch.autograd.grad(z.sum(), params)
    finally:
        _ext.set_cpu_isa(previous)
    doubles = [t.detach().double().requires_grad_() for t in params]
    zd = net(*doubles, ref_conv2d)
    assert_close(z, zd, torch.float32)
    for got, want in zip(grads, torch.autograd.grad(zd.sum(), doubles), strict=True):
        assert_close(got, want, torch.float32, scale=4.0)


# Convs of few input channels on the CPU's direct plane kernel (conv_plane.h), (N, C, H, W, K,
# R, S, stride, padding, dilation, activation, residual): the 7x7 stride-2 stem with a partial
# tile of output channels (12 = 8 + 4) and a last tile of one pixel vector; a column dilation of 3
# at stride 2 (taps in both halves of the split rows); stride 1 with rows of 37 (a partial vector)
# and a row stride of 3; one channel, a 2x3 kernel padded beyond its reach; 200-pixel rows in two
# blocks of output rows, the last one shorter; 16 channels of 5x5 (400 taps).
PLANE_CASES = [
    (2, 3, 25, 30, 12, 7, 7, 2, 3, 1, "relu", False),
    (1, 4, 11, 40, 9, 3, 3, (1, 2), (2, 1), (1, 3), "gelu", True),
    (2, 2, 13, 37, 8, 3, 5, (3, 1), (0, 2), (2, 1), "none", False),
    (3, 1, 6, 9, 5, 2, 3, 1, (3, 4), 1, "silu", True),
    (1, 3, 50, 200, 16, 3, 3, 1, 1, 1, "relu", True),
    (2, 16, 9, 20, 24, 5, 5, 1, 2, 1, "none", False),
]


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_isa_plane(isa, dtype, layout):
    """The dense direct conv SIMD over output planes under each ISA's kernels (tiles of two pixel
    vectors by 8 channels on AVX-512, three by 4 elsewhere: the last tiles of 12, 9 and 5
    channels partial), in float32 and float64, each epilogue: NCHW x not
    contiguous (copied), written plane by plane; channels_last x read in place, its output
    transposed a tile at a time. Outputs and every gradient equal to float64."""
    torch.manual_seed(0)
    cl = layout == "channels_last"
    fmt = torch.channels_last if cl else torch.contiguous_format
    for n, c, h, w, k, r, s, stride, padding, dilation, act, with_res in PLANE_CASES:
        x = torch.randn(n, c, h, 2 * w, dtype=dtype)[..., ::2]
        x = (x.contiguous(memory_format=fmt) if cl else x).requires_grad_()
        wt = (torch.randn(k, c, r, s, dtype=dtype) / (c * r * s) ** 0.5).requires_grad_()
        b = torch.randn(k, dtype=dtype, requires_grad=True)
        shape = ref_conv2d(x.detach(), wt.detach(), None, stride, padding, dilation, 1).shape
        res = None
        if with_res:
            res = torch.randn(shape, dtype=dtype).contiguous(memory_format=fmt).requires_grad_()
        leaves = [t for t in (x, wt, b, res) if t is not None]
        previous = _ext.cpu_isa()
        _ext.set_cpu_isa(isa)
        try:
            with fastdl.backend(NATIVE_CPU.name):
                y = fastdl.conv2d(x, wt, b, stride, padding, dilation, activation=act, residual=res)
                grads = torch.autograd.grad(y, leaves, torch.ones_like(y))
        finally:
            _ext.set_cpu_isa(previous)
        doubles = [t.detach().double().requires_grad_() for t in leaves]
        rd = doubles[3] if with_res else None
        yd = ref_conv2d(*doubles[:3], stride, padding, dilation, 1, act, rd)
        out_fmt = fmt if c > 1 else torch.contiguous_format  # one channel: NCHW is NHWC
        assert y.dtype == dtype and y.is_contiguous(memory_format=out_fmt)
        assert_close(y, yd, dtype)
        for got, want in zip(grads, torch.autograd.grad(yd.sum(), doubles), strict=True):
            assert_close(got, want, dtype, scale=4.0)


def _within_half_ulp(y, exact):
    """bfloat16 y rounded from float32 sums of exact bfloat16 products: within half an ulp of the
    float64 value plus the sums' error."""
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 * 1.01 + 1e-4).all()


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("stride, kernel", [(1, 3), (2, 5), ((1, 2), 2)])
def test_bfloat16_depthwise_channels_last(isa, stride, kernel):
    """A bfloat16 channels_last depthwise forward reads x as it is, each input row widened into
    the kernel's ring of rows (3x3 and 5x5 compiled for their size, any other at run time; 21
    channels: partial vectors), under each ISA: within half an ulp of the exact values."""
    torch.manual_seed(0)
    x = torch.randn(2, 21, 9, 11).bfloat16().contiguous(memory_format=torch.channels_last)
    w = torch.randn(21, 1, kernel, kernel).bfloat16()
    previous = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    try:
        with fastdl.backend(NATIVE_CPU.name):
            y = fastdl.conv2d(x, w, None, stride, kernel // 2, 1, 21)
    finally:
        _ext.set_cpu_isa(previous)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, kernel // 2, 1, 21)
    assert y.is_contiguous(memory_format=torch.channels_last)
    _within_half_ulp(y, exact)


# Dense stride-1 bfloat16 convs on AMX tiles without im2col (conv_amx.h; C and K multiples of
# 32), (N, C, H, W, K, R, S, padding, dilation), each with more than 3/4 of its taps (and of its
# adjoint's) inside the input, below which the GEMMs per tap run: rows of 25 padded pixels,
# whose rows of flat positions wrap around the 64-position ring; one image split into bands of
# rows (each copying its own halo); a 5x3 kernel with a row dilation of 2 and no column padding;
# padding beyond the taps' reach (whole zero rows and columns; its input gradient on the GEMMs);
# a 1x3 kernel over 40-pixel rows; a 2x2 with a column dilation of 3 (an even-sized adjoint); a
# padded 1x1 (on the tiles for an NCHW x only).
AMX_CASES = [
    (2, 64, 9, 23, 64, 3, 3, 1, 1),
    (1, 32, 23, 7, 96, 3, 3, 1, 1),
    (2, 96, 21, 29, 32, 5, 3, (4, 0), (2, 1)),
    (2, 32, 30, 28, 64, 3, 3, 3, 1),
    (1, 128, 5, 40, 64, 1, 3, (0, 1), 1),
    (2, 64, 12, 24, 128, 2, 2, 0, (1, 3)),
    (2, 64, 16, 17, 32, 1, 1, 1, 1),
]


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


@contextlib.contextmanager
def _amx():
    """The native CPU backend under the "amx" ISA, restored after."""
    previous = _ext.cpu_isa()
    _ext.set_cpu_isa("amx")
    try:
        with fastdl.backend(NATIVE_CPU.name):
            yield
    finally:
        _ext.set_cpu_isa(previous)


def _amx_conv(*args, **kwargs):
    """fastdl.conv2d under _amx and the number of convs it ran on the AMX kernel."""
    before = _ext._C._conv_amx_runs()
    with _amx():
        return fastdl.conv2d(*args, **kwargs), _ext._C._conv_amx_runs() - before


@pytest.mark.skipif("amx" not in BF16_ISAS, reason="this CPU has no AMX tiles")
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("epilogue", ["none", "bias_res_relu", "gelu"])
def test_bfloat16_amx_direct(layout, epilogue):
    """bfloat16 stride-1 convs of 32k channels on AMX tiles reading the zero-padded input rows in
    place (an NCHW x's rows transposed as they are copied, 32 x 32 at a time with partial blocks;
    a strided one copied to NHWC first), each counted on the kernel's hook: outputs within half an
    ulp (plus the float32 sums' error) of float64, through the lean bfloat16 epilogues (bias,
    residual, ReLU; channels_last between the tile steps, NCHW a row at a time transposed in
    registers) and the general one (GELU); in training the input gradient as the adjoint's
    forward on the tiles (where the padding is within the taps' reach), within half an ulp
    without an activation, and every gradient against float64."""
    torch.manual_seed(0)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    act = {"none": None, "bias_res_relu": "relu", "gelu": "gelu"}[epilogue]
    for i, (n, c, h, w, k, r, s, padding, dilation) in enumerate(AMX_CASES):
        x = torch.randn(n, c, h, 2 * w).bfloat16()[..., ::2]
        if i % 2 == 0 or fmt == torch.channels_last:  # else strided (copied to NHWC)
            x = x.contiguous(memory_format=fmt)
        wt = (torch.randn(k, c, r, s) / (c * r * s) ** 0.5).bfloat16()
        b = torch.randn(k).bfloat16() if epilogue == "bias_res_relu" else None
        exact = torch.nn.functional.conv2d(
            x.double(), wt.double(), None if b is None else b.double(), 1, padding, dilation
        )
        res = None
        if epilogue == "bias_res_relu":
            res = torch.randn(exact.shape).bfloat16().contiguous(memory_format=fmt)
            exact = (exact + res.double()).relu()
        elif act == "gelu":
            exact = torch.nn.functional.gelu(exact)
        with torch.no_grad():
            y, runs = _amx_conv(x, wt, b, 1, padding, dilation, activation=act, residual=res)
        tiles = r * s > 1 or (x.is_contiguous() and fmt == torch.contiguous_format)
        assert runs == int(tiles), (i, runs)
        assert y.is_contiguous(memory_format=fmt)
        _within_half_ulp(y, exact)
    if epilogue == "bias_res_relu":
        return
    for n, c, h, w, k, r, s, padding, dilation in AMX_CASES:
        leaves = [
            torch.randn(n, c, h, w).bfloat16().contiguous(memory_format=fmt).requires_grad_(),
            (torch.randn(k, c, r, s) / (c * r * s) ** 0.5).bfloat16().requires_grad_(),
            torch.randn(k).bfloat16().requires_grad_(),
        ]
        y, runs = _amx_conv(*leaves, 1, padding, dilation, activation=act)
        assert runs == int(r * s > 1 or fmt == torch.contiguous_format)
        g = torch.randn_like(y)
        before = _ext._C._conv_amx_runs()
        with _amx():
            grads = torch.autograd.grad(y, leaves, g)
        (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
        adjoint = r * s > 1 and ph <= dh * (r - 1) and pw <= dw * (s - 1)
        assert _ext._C._conv_amx_runs() - before == int(adjoint)
        doubles = [t.detach().double().requires_grad_() for t in leaves]
        yd = ref_conv2d(*doubles, 1, padding, dilation, 1, act or "none")
        want = torch.autograd.grad(yd, doubles, g.double())
        assert_close(y, yd, torch.bfloat16)
        if act is None:
            _within_half_ulp(grads[0], want[0])
        for got, ref in zip(grads, want, strict=True):
            assert_close(got, ref, torch.bfloat16, scale=4.0)


@pytest.mark.skipif("amx" not in BF16_ISAS, reason="this CPU has no AMX tiles")
@pytest.mark.parametrize("kernel, dilation, output_padding", [(3, 2, 1), ((3, 1), (1, 2), (0, 1))])
def test_bfloat16_amx_transpose_output_padding(kernel, dilation, output_padding):
    """A stride-1 bfloat16 conv_transpose2d with output_padding (below the dilation): its output
    rows are wider than the padded input's reach of the conv it is the adjoint of, so it stays off
    the AMX conv kernel (whose last columns would read the next row's pixels, or leave a band's
    last row unwritten): equal to float64 within bfloat16's rounding."""
    torch.manual_seed(0)
    x = torch.randn(2, 32, 40, 40).bfloat16()
    w = (torch.randn(32, 32, *_pair(kernel)) / 17).bfloat16()
    padding = 4 if kernel == 3 else 0
    with _amx(), torch.no_grad():
        y = fastdl.conv_transpose2d(x, w, None, 1, padding, output_padding, 1, dilation)
    exact = torch.nn.functional.conv_transpose2d(
        x.double(), w.double(), None, 1, padding, output_padding, 1, dilation
    )
    _within_half_ulp(y, exact)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("kg", [8, 32])
def test_grouped_weight_grad_in_group_slices(isa, kg):
    """Grouped convs whose weight-gradient partial sums are large (~0.3 MiB) split them by slices
    of groups as well as by rows, each slice summing its own groups and bias channels; equal to
    float64 with 1 and 2 threads (the chunks do not depend on the thread count)."""
    groups = 256 // kg
    x = torch.randn(2, 256 if kg == 8 else 8 * 32, 5, 6).contiguous(
        memory_format=torch.channels_last
    )
    w = torch.randn(256, x.shape[1] // groups, 3, 3, requires_grad=True)
    b = torch.randn(256, requires_grad=True)
    g = torch.randn(2, 256, 5, 6)
    previous, threads = _ext.cpu_isa(), torch.get_num_threads()
    _ext.set_cpu_isa(isa)
    try:
        with fastdl.backend(NATIVE_CPU.name):
            runs = []
            for n in (1, 2):
                torch.set_num_threads(n)
                y = fastdl.conv2d(x, w, b, 1, 1, 1, groups)
                runs.append(torch.autograd.grad(y, (w, b), g))
    finally:
        _ext.set_cpu_isa(previous)
        torch.set_num_threads(threads)
    wd, bd = w.detach().double().requires_grad_(), b.detach().double().requires_grad_()
    yd = ref_conv2d(x.double(), wd, bd, 1, 1, 1, groups)
    want = torch.autograd.grad(yd, (wd, bd), g.double())
    for got in runs:
        assert_close(got[0], want[0], torch.float32, scale=4.0)
        assert_close(got[1], want[1], torch.float32, scale=4.0)
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_nchw_winograd(isa):
    """Per ISA: NCHW input through the layout transposes, Winograd (forward and both gradients,
    16-row transpose blocks plus remainders), the NCHW epilogue with bias + residual + ReLU, and
    the 3x3 depthwise on flat NCHW planes, a 3x2 one at column stride 2 on rows split by parity
    (the ISA's deinterleave)."""
    x = torch.randn(2, 20, 9, 11, requires_grad=True)
    w = torch.randn(24, 20, 3, 3, requires_grad=True)
    b = torch.randn(24, requires_grad=True)
    res = torch.randn(2, 24, 9, 11)
    wd3 = torch.randn(24, 1, 3, 3, requires_grad=True)
    wd32 = torch.randn(24, 1, 3, 2, requires_grad=True)
    previous = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    try:
        with fastdl.backend(NATIVE_CPU.name):
            y = fastdl.conv2d(x, w, b, 1, 1, activation="relu", residual=res)
            z = fastdl.conv2d(y, wd3, None, 1, 1, 1, 24)
            z = fastdl.conv2d(z, wd32, None, (1, 2), 1, 1, 24)
            grads = torch.autograd.grad((z * z).sum(), (x, w, b, wd3, wd32))
    finally:
        _ext.set_cpu_isa(previous)
    leaves = [t.detach().double().requires_grad_() for t in (x, w, b, wd3, wd32)]
    yd = ref_conv2d(leaves[0], leaves[1], leaves[2], 1, 1, 1, 1, "relu", res.double())
    zd = ref_conv2d(yd, leaves[3], None, 1, 1, 1, 24)
    zd = ref_conv2d(zd, leaves[4], None, (1, 2), 1, 1, 24)
    assert_close(z, zd, torch.float32)
    for got, want in zip(grads, torch.autograd.grad((zd * zd).sum(), leaves), strict=True):
        assert_close(got, want, torch.float32, scale=4.0)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_depthwise_flat_edges(isa):
    """Per ISA: the 3x3 depthwise forward on flat NCHW planes reads the vectors away from the
    plane's top and bottom rows whole (a row's first and last columns then read the neighbouring
    rows' pixels, masked off by column). Rows of 5 to 28 pixels (column masks repeating every 1
    to 13 vectors, vectors across up to 4 rows), a dilation of 2, the lean epilogue and the full
    one; Inf and NaN at the rows' ends and the plane's corners land where torch's conv puts them,
    not in the pixels of the neighbouring rows, nor in the weight gradients of the taps that do
    not read them."""
    torch.manual_seed(0)
    previous = _ext.cpu_isa()
    for h, width, dil in [(9, 5, 1), (7, 12, 1), (11, 13, 1), (6, 16, 1), (10, 28, 1), (12, 13, 2)]:
        x = torch.randn(2, 3, h, width)
        x[0, 0, 3, 0], x[0, 1, 4, width - 1] = float("inf"), float("nan")
        x[1, 2, 0, 0], x[1, 0, h - 1, width - 1] = float("nan"), float("-inf")
        x[1, 1, h // 2, width - 1], x[1, 1, h // 2 + 1, 0] = float("inf"), float("inf")
        w, b = torch.randn(3, 1, 3, 3, requires_grad=True), torch.randn(3)
        res, g = torch.randn(2, 3, h, width), torch.randn(2, 3, h, width)
        _ext.set_cpu_isa(isa)
        try:
            with fastdl.backend(NATIVE_CPU.name):
                with torch.no_grad():
                    ys = [
                        fastdl.conv2d(x, w, b, 1, dil, dil, 3, activation="relu"),
                        fastdl.conv2d(x, w, b, 1, dil, dil, 3, activation="silu", residual=res),
                    ]
                (gw,) = torch.autograd.grad(fastdl.conv2d(x, w, b, 1, dil, dil, 3), w, g)
        finally:
            _ext.set_cpu_isa(previous)
        xd, wd, bd = x.double(), w.detach().double().requires_grad_(), b.double()
        wants = [
            ref_conv2d(xd, wd, bd, 1, dil, dil, 3, "relu"),
            ref_conv2d(xd, wd, bd, 1, dil, dil, 3, "silu", res.double()),
        ]
        (want_gw,) = torch.autograd.grad(ref_conv2d(xd, wd, bd, 1, dil, dil, 3), wd, g.double())
        for y, want in zip([*ys, gw], [*wants, want_gw], strict=True):
            assert torch.equal(y.isnan(), want.isnan()), (h, width, dil)
            assert torch.equal(y.isinf(), want.isinf()), (h, width, dil)
            finite = want.isfinite()
            assert_close(y[finite], want[finite], torch.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("grad", [False, True])
def test_nchw_winograd_wide_rows(isa, grad):
    """NCHW Winograd on rows of 9 to 60 tiles, F(4x4) without grad and F(2x2) with: partial last
    tiles and tile rows, blocks of one or several tile rows, some across two images (their slabs
    transposed from both), each epilogue; a NaN and an Inf land where torch's conv puts them."""
    torch.manual_seed(0)
    shapes = [(2, 16, 24, 30, 61), (3, 20, 16, 17, 33), (2, 40, 40, 9, 120)]
    for n, c, k, h, width in shapes:
        x = torch.randn(n, c, h, width, requires_grad=grad)
        w = torch.randn(k, c, 3, 3) / 6
        b, res = torch.randn(k), torch.randn(n, k, h, width)
        previous = _ext.cpu_isa()
        _ext.set_cpu_isa(isa)
        try:
            with fastdl.backend(NATIVE_CPU.name), torch.set_grad_enabled(grad):
                ys = [
                    fastdl.conv2d(x, w, b, 1, 1, activation="silu", residual=res),
                    fastdl.conv2d(x, w, None, 1, 1),
                ]
        finally:
            _ext.set_cpu_isa(previous)
        xd = x.detach().double()
        want = ref_conv2d(xd, w.double(), b.double(), 1, 1, 1, 1, "silu", res.double())
        assert_close(ys[0], want, torch.float32)
        assert_close(ys[1], ref_conv2d(xd, w.double(), None, 1, 1, 1, 1), torch.float32)
    x = torch.randn(2, 16, 12, 40)
    x[1, 3, 5, 7], x[0, 2, 0, 0] = float("nan"), float("inf")
    w = torch.randn(16, 16, 3, 3)
    with fastdl.backend(NATIVE_CPU.name), torch.no_grad():
        y = fastdl.conv2d(x, w, None, 1, 1)
    want = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1)
    assert torch.equal(y.isnan(), want.isnan()) and torch.equal(y.isinf(), want.isinf())
    finite = want.isfinite()
    assert_close(y[finite], want[finite], torch.float32)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_every_isa_streamed_outputs(isa, layout):
    """Per ISA and layout: outputs of >= 8 MiB are written with non-temporal stores where a whole
    vector lands aligned, ordinary ones elsewhere (rows of 131 pixels: vectors straddle the
    alignment), through the Winograd epilogue with bias + residual + ReLU, the implicit GEMM's
    (1x1), both depthwise kernels (with bias + ReLU; channels_last on AVX2: a pixel's two
    half-line vectors streamed back to back) and (NCHW) the plane kernel's lean one; equal to
    float64."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 16, 131, 131).contiguous(memory_format=fmt)
    w, w1 = torch.randn(64, 16, 3, 3) / 12, torch.randn(64, 16, 1, 1) / 4
    b, res = torch.randn(64), torch.randn(2, 64, 131, 131).contiguous(memory_format=fmt)
    wd = torch.randn(64, 1, 3, 3) / 3
    w3 = torch.randn(64, 3, 5, 5) / 8
    previous = _ext.cpu_isa()
    _ext.set_cpu_isa(isa)
    try:
        with fastdl.backend(NATIVE_CPU.name), torch.no_grad():
            y = fastdl.conv2d(x, w, b, 1, 1, activation="relu", residual=res)
            y1 = fastdl.conv2d(x, w1, b)
            z = fastdl.conv2d(y, wd, b, 1, 1, 1, 64, activation="relu")
            y3 = fastdl.conv2d(x[:, :3], w3, b, 1, 2, activation="relu")
    finally:
        _ext.set_cpu_isa(previous)
    assert y.numel() * 4 >= 8 << 20 and y.is_contiguous(memory_format=fmt)
    assert_close(
        y3,
        ref_conv2d(x[:, :3].double(), w3.double(), b.double(), 1, 2, 1, 1, "relu"),
        torch.float32,
    )
    yd = ref_conv2d(x.double(), w.double(), b.double(), 1, 1, 1, 1, "relu", res.double())
    assert_close(y, yd, torch.float32)
    assert_close(y1, ref_conv2d(x.double(), w1.double(), b.double(), 1, 0, 1, 1), torch.float32)
    zd = ref_conv2d(y.double(), wd.double(), b.double(), 1, 1, 1, 64, "relu")
    assert_close(z, zd, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_streamed_input_gradient(layout):
    """The Winograd input gradient of >= 8 MiB, written straight in x's memory format with
    non-temporal stores where whole vectors land aligned: equal to float64, in x's format."""
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(2, 64, 131, 131).contiguous(memory_format=fmt).requires_grad_()
    w = (torch.randn(64, 64, 3, 3) / 24).requires_grad_()
    g = torch.randn(2, 64, 131, 131)
    with fastdl.backend(NATIVE_CPU.name):
        (gx,) = torch.autograd.grad(fastdl.conv2d(x, w, None, 1, 1), x, g)
    assert gx.numel() * 4 >= 8 << 20 and gx.is_contiguous(memory_format=fmt)
    xd = x.detach().double().requires_grad_()
    want = ref_conv2d(xd, w.detach().double(), None, 1, 1, 1, 1)
    (want,) = torch.autograd.grad(want, xd, g.double())
    assert_close(gx, want, torch.float32, scale=4.0)


def test_taps_any_thread_count():
    """The per-tap GEMMs of small images (4x4, 31% of the taps on padding, as ResNet-18's last
    stage on 32x32 inputs; few images for so many channels, so not Winograd): outputs and
    gradients bit for bit the same on 1 and 2 threads (each weight-gradient element is one GEMM's
    sum), and equal to float64."""
    x = torch.randn(4, 96, 4, 4, requires_grad=True)
    w = torch.randn(96, 96, 3, 3, requires_grad=True)
    b = torch.randn(96, requires_grad=True)
    g = torch.randn(4, 96, 4, 4)

    def run(threads):
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            y = fastdl.conv2d(x, w, b, padding=1)
            return (y, *torch.autograd.grad(y, (x, w, b), g))
        finally:
            torch.set_num_threads(before)

    one, two = run(1), run(2)
    for a, e in zip(one, two, strict=True):
        assert torch.equal(a, e)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    yd = ref_conv2d(xd, wd, bd, 1, 1, 1, 1)
    assert_close(one[0], yd, torch.float32)
    for got, want in zip(one[1:], torch.autograd.grad(yd, (xd, wd, bd), g.double()), strict=True):
        assert_close(got, want, torch.float32, scale=4.0)


def test_taps_weight_gradient_in_groups_of_images():
    """The per-tap weight gradient gathers its rows a group of images at a time (at most 64 MiB
    of them) and adds the groups' GEMMs in order: 140000 1x1 images of 64 channels (only the
    centre tap of a 3x3 dilated by 2 with padding 2 reads them; the other taps' gradients are
    zero) take two groups."""
    n, c, k = 140_000, 64, 64
    x = torch.randn(n, c, 1, 1)
    w = torch.randn(k, c, 3, 3, requires_grad=True)
    g = torch.randn(n, k, 1, 1)
    (gw,) = torch.autograd.grad(fastdl.conv2d(x, w, padding=2, dilation=2), (w,), g)
    expected = torch.zeros(k, c, 3, 3, dtype=torch.float64)
    expected[:, :, 1, 1] = g.double().flatten(1).T @ x.double().flatten(1)
    assert_close(gw, expected, torch.float32, scale=4.0)
    assert torch.count_nonzero(gw[:, :, 1, 1]) == k * c and torch.count_nonzero(gw) == k * c


BF16_CONVS = {
    # name: (x shape, weight shape, stride, padding, dilation, groups, channels_last x, fused
    # bias + residual + ReLU); none on the per-tap GEMMs (groups 1 with > 25% of the taps on
    # padding); the stride-1 3x3 takes Winograd in float32, or bf16 products on AMX tiles
    "1x1 direct": ((2, 24, 6, 7), (40, 24, 1, 1), 1, 0, 1, 1, True, True),
    "3x3 stride 1": ((2, 20, 13, 12), (24, 20, 3, 3), 1, 1, 1, 1, True, True),
    "3x3 s2 deep (c,r,s) columns": ((2, 70, 16, 16), (160, 70, 3, 3), 2, 1, 1, 1, False, False),
    "7x7 s2 stem": ((2, 3, 31, 29), (16, 3, 7, 7), 2, 3, 1, 1, False, True),
    "grouped dilated": ((2, 12, 11, 9), (18, 4, 3, 3), 1, 2, 2, 3, True, False),
    "transposed 4x4 s2": ((2, 32, 7, 6), (32, 24, 4, 4), 2, 1, 1, 1, False, None),
}


def _bf16_conv(x, w, b, res, spec, fn):
    """The conv of BF16_CONVS' spec by fn (fastdl's or torch.nn.functional's module)."""
    stride, pad, dil, groups, fused = spec[2], spec[3], spec[4], spec[5], spec[7]
    if fused is None:
        return fn.conv_transpose2d(x, w, b, stride, pad, 0, groups, dil)
    if fused and fn is fastdl:
        return fastdl.conv2d(x, w, b, stride, pad, dil, groups, residual=res, activation="relu")
    y = fn.conv2d(x, w, b, stride, pad, dil, groups)
    return torch.relu(y + res) if fused else y


@pytest.mark.parametrize("isa", BF16_ISAS)
@pytest.mark.parametrize("name", list(BF16_CONVS))
def test_every_isa_bfloat16(isa, name):
    """bfloat16 convs on the implicit GEMM, forward and every gradient: with AVX512-BF16 they
    multiply bfloat16 operands as they are (gemm_bf16: x and the weight; the output gradient
    and x for the input and weight gradients; a fused ReLU's gradient rounded to bfloat16
    first), elsewhere widened; both within twice torch's bfloat16 error of the float64 result,
    and equal to each other up to bfloat16 rounding. conv_transpose2d's forward is the input
    gradient of its adjoint conv."""
    spec = BF16_CONVS[name]
    torch.manual_seed(0)
    x = torch.randn(spec[0]).to(torch.bfloat16)
    x = x.contiguous(memory_format=torch.channels_last) if spec[6] else x
    w = torch.randn(spec[1]).to(torch.bfloat16)
    b = torch.randn(w.shape[1 if spec[7] is None else 0]).to(torch.bfloat16)
    inputs = [t.requires_grad_() for t in (x, w, b)]
    base = _bf16_conv(x, w, b, None, spec, torch.nn.functional) if spec[7] is not True else None
    shape = (base if base is not None else torch.nn.functional.conv2d(x, w, b, *spec[2:6])).shape
    res = torch.randn(shape).to(torch.bfloat16).requires_grad_() if spec[7] else None
    inputs += [res] if res is not None else []
    g = torch.randn(shape).to(torch.bfloat16)

    def grads(fn, ts):
        y = _bf16_conv(*ts[:3], ts[3] if len(ts) > 3 else None, spec, fn)
        return [y.detach(), *torch.autograd.grad(y, ts, g.to(y.dtype))]

    runs = []
    for which in (isa, "scalar"):
        previous = _ext.cpu_isa()
        _ext.set_cpu_isa(which)
        try:
            with fastdl.backend(NATIVE_CPU.name):
                runs.append(grads(fastdl, inputs))
        finally:
            _ext.set_cpu_isa(previous)
    exact = grads(torch.nn.functional, [t.detach().double().requires_grad_() for t in inputs])
    lowp = grads(torch.nn.functional, inputs)
    for i, want in enumerate(exact):
        torch_err = (lowp[i].double() - want).abs().max().item()
        for got in (run[i] for run in runs):
            assert got.dtype == torch.bfloat16 and got.shape == want.shape
            assert (got.double() - want).abs().max().item() <= 2 * torch_err + 1e-6, i
        assert (runs[0][i].double() - runs[1][i].double()).abs().max() <= 2**-7 * want.abs().max()
