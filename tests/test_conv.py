"""conv family: conv2d (all arguments, groups, depthwise, both layouts, fused epilogue) and
conv_transpose2d on every backend, forward and backward, against float64 torch; empty and
non-contiguous inputs; every bad input of issue 4."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import cases
from conv_ref import assert_close, make, ref_conv2d, ref_conv_transpose2d

import fastdl

# (N, C, H, W, K, R, S, stride, padding, dilation, groups)
CONV_SHAPES = {
    "3x3": (2, 3, 7, 9, 5, 3, 3, 1, 1, 1, 1),
    "1x1": (2, 12, 5, 6, 10, 1, 1, 1, 0, 1, 1),
    "1x1_s2_groups": (1, 6, 7, 7, 4, 1, 1, 2, 0, 1, 2),
    # 1x1 convs whose NCHW x the CPU's GEMMs read in place, per image (two groups of 40 output
    # channels, too wide for the direct grouped kernels; 1089 pixels: blocks of 1024 and 65).
    "1x1_groups": (2, 48, 5, 7, 80, 1, 1, 1, 0, 1, 2),
    "1x1_blocks": (2, 32, 33, 33, 16, 1, 1, 1, 0, 1, 1),
    "grouped_asym": (2, 6, 9, 7, 4, 3, 2, (2, 1), (1, 0), (1, 2), 2),
    "depthwise": (2, 19, 6, 7, 19, 3, 3, 1, 1, 1, 19),
    "depthwise_s2_dil": (1, 17, 9, 8, 17, 3, 3, 2, 2, 2, 17),
    "depthwise_mult2": (1, 4, 5, 5, 8, 3, 3, 1, 1, 1, 4),
    # Groups of 2, 4 or 8 channels in and out (ResNeXt's): the CPU's direct grouped kernels (a
    # stride-1 input gradient by the adjoint's forward, a strided one on the implicit GEMM).
    "grouped_kg4": (2, 8, 7, 6, 8, 3, 3, 1, 1, 1, 2),
    # Stride-1 rows of 3 taps load each pixel once for the tile's taps: columns padded by 2 (reads
    # left of and past the row), a last tile of 3 pixels.
    "grouped_kg4_padw2": (1, 8, 6, 9, 8, 3, 3, 1, (0, 2), 1, 2),
    "grouped_kg2_strided": (1, 6, 9, 8, 6, 3, 2, (2, 1), (1, 0), (1, 2), 3),
    "grouped_kg8_5x5": (1, 16, 6, 7, 16, 5, 5, 1, 2, 1, 2),
    # Groups of 8 to 32 output channels, any input width: the CPU's broadcast kernels (pixel
    # tiles with a remainder, odd input widths, a channel multiplier of 8, a strided and
    # dilated one whose input gradient stays on the implicit GEMM).
    "grouped_kg16_tail": (2, 32, 5, 17, 32, 3, 3, 1, 1, 1, 2),
    "grouped_kg24_cg3_strided": (1, 6, 9, 11, 48, 3, 2, (2, 1), (1, 0), (1, 2), 2),
    "grouped_kg32_7x7": (1, 64, 7, 7, 64, 3, 3, 1, 1, 1, 2),
    # Channels_last forward tiles of two output rows (rows of at most 7 pixels) a stride and a
    # dilation apart, an odd row count (the last row alone), input rows outside x read as zeros.
    "grouped_kg16_row_pairs": (2, 12, 13, 6, 32, 3, 3, (2, 1), (2, 1), (2, 1), 2),
    # Input rows copied a chunk of groups at a time (256 bytes of a pixel's channels): 12 groups
    # of 8 as chunks of 8 and 4 (float32; 4 a chunk in float64).
    "grouped_kg8_chunks": (2, 96, 6, 9, 96, 3, 3, 1, 1, 1, 12),
    "depthwise_mult8": (1, 3, 6, 5, 24, 3, 3, 1, 1, 1, 3),
    # Channel multipliers of 2 to 7: the depthwise kernels on each channel repeated m times.
    "depthwise_mult3_strided": (2, 5, 7, 9, 15, 3, 2, (2, 1), (1, 0), (1, 2), 5),
    # Depthwise kernels' branches: NCHW planes (stride_w 1) with partial width vectors, NHWC
    # channel vectors with a partial one, pixel tiles with a remainder, an odd tap count.
    "depthwise_wide": (1, 35, 5, 37, 35, 3, 3, (2, 1), (1, 2), (1, 2), 35),
    "depthwise_5x5_nopad": (2, 16, 9, 18, 16, 5, 5, 1, 0, 1, 16),
    # NCHW planes' run-time row kernel: a row stride, a partial width vector.
    "depthwise_3x3_s2h": (2, 20, 9, 18, 20, 3, 3, (2, 1), 1, 1, 20),
    # The NHWC ring's compile-time tiles (3x3 stride 2, 5x5 stride 2, 7x7) with a partial tile
    # (channels_last; in NCHW the split planes below).
    "depthwise_3x3_s2": (1, 18, 9, 21, 18, 3, 3, 2, 1, 1, 18),
    "depthwise_5x5_s2": (1, 33, 11, 12, 33, 5, 5, 2, 2, 1, 33),
    "depthwise_7x7": (2, 24, 10, 13, 24, 7, 7, 1, 3, 1, 24),
    # NCHW planes at stride 1: flat (output rows as wide as the input's, at most 9 taps) with a
    # run-time kernel and dilation; row tiles of 8 (3x3 with output rows narrower than the
    # input's, a partial tile and vector; 5x5 with a column dilation and P != H).
    "depthwise_3x2_flat_dil": (1, 9, 6, 11, 9, 3, 2, 1, (2, 1), (2, 2), 9),
    "depthwise_3x3_tiles": (2, 10, 19, 21, 10, 3, 3, 1, (1, 0), 1, 10),
    "depthwise_5x5_tiles": (2, 12, 7, 9, 12, 5, 5, 1, (1, 4), (1, 2), 12),
    # Flat, padded beyond the taps' reach (no adjoint forward): the input gradient gathered.
    "depthwise_flat_overpad": (1, 8, 6, 9, 8, 3, 3, 1, (3, 1), 1, 8),
    # NCHW planes at column stride 2 on rows split by parity: the run-time kernel (2x3, a column
    # dilation of 3 whose taps change parity, split rows of two 16-lane vectors, a partial output
    # vector); depthwise_3x3_s2, depthwise_5x5_s2 and depthwise_s2_dil take the compile-time ones.
    "depthwise_2x3_split": (2, 6, 9, 37, 6, 2, 3, (1, 2), (1, 2), (1, 3), 6),
    # Column strides of 11 and 21 with 2- and 1-wide kernels: the generic tile, not 3x3's.
    "depthwise_3x2_s11": (1, 16, 6, 40, 16, 3, 2, (1, 11), 0, 1, 16),
    "depthwise_3x1_s21": (1, 16, 5, 64, 16, 3, 1, (2, 21), 0, 1, 16),
    "5x5_s3": (3, 5, 11, 10, 7, 5, 5, 3, 2, 1, 1),
    "stem_7x7": (1, 3, 15, 13, 9, 7, 7, 2, 3, 1, 1),
    "one_channel": (1, 1, 4, 5, 1, 2, 2, 1, 0, 1, 1),
    # Deep layers (more output channels than output pixels): the GEMMs read the weight in its
    # own (K, C, R, S) layout, the input gradient's blocks span several images (28 of 3x3 here,
    # then a remainder of 2) and the weight gradient sums two chunks of blocks.
    "deep_3x3": (30, 37, 5, 5, 141, 3, 3, 1, 0, 1, 1),
    # Small images, whose taps read padding at over a quarter of the pixels: the GEMMs per tap
    # on just the pixels whose tap reads the image (3x3 on 3x3 with padding 1: 40% padding, two
    # blocks of one image, too few pixels for Winograd; a dilated, unevenly strided one; a 1x1
    # image, where only the centre tap reads it).
    "taps_3x3": (2, 37, 3, 3, 141, 3, 3, 1, 1, 1, 1),
    "taps_dilated": (3, 6, 5, 6, 7, 3, 3, (1, 2), 2, (2, 1), 1),
    "taps_1x1_image": (4, 5, 1, 1, 6, 3, 3, 1, 1, 1, 1),
    "deep_grouped_s2": (5, 21, 7, 8, 201, 3, 3, 2, 1, 1, 3),
    # An NCHW x that the CPU's implicit GEMM transposes block by block: blocks of 113 rows that
    # start and end inside output rows of 20 pixels, one of them across the two images; then
    # row dilation 2 and padding 5, whose first block ends in the second image's first output
    # row, which reads only padding (no image rows in its part).
    "nchw_blocks_s2": (2, 64, 21, 40, 24, 3, 3, 2, 1, 1, 1),
    "nchw_blocks_dil_pad": (2, 128, 4, 11, 40, 3, 3, 1, (5, 1), (2, 1), 2),
    # Winograd on the CPU in float32/bfloat16 (stride 1, >= 256 channel pairs):
    # partial tiles at the bottom and right edges, padding 0, 1 and 2 (whose input gradients are
    # Winograd too), and padding 3 (the input gradient's adjoint padding would be negative: the
    # GEMMs per tap).
    "winograd": (2, 16, 11, 13, 20, 3, 3, 1, 1, 1, 1),
    "winograd_pad0": (3, 20, 9, 10, 17, 3, 3, 1, 0, 1, 1),
    "winograd_pad2": (2, 24, 5, 6, 16, 3, 3, 1, 2, 1, 1),
    "winograd_pad3": (2, 16, 4, 5, 16, 3, 3, 1, 3, 1, 1),
    # Several weight-gradient blocks (one image of 15x15 2x2 tiles each), summed over chunks.
    "winograd_chunks": (5, 16, 30, 29, 16, 3, 3, 1, 1, 1, 1),
    # A transformed weight 3x the transformed activations: not Winograd (the GEMMs per tap).
    "winograd_deep": (2, 48, 4, 4, 48, 3, 3, 1, 1, 1, 1),
}
# The Triton interpreter is slow: one layout/epilogue variant per shape there.
INTERPRETED = [
    ("3x3", "cl_relu_res"),
    ("grouped_asym", "nchw_gelu_res"),
    ("depthwise_mult2", "strided_silu"),
    ("1x1", "nchw"),
    ("3x3", "cl_nchw_res"),
]
# (layout, activation, bias, residual: None, "same" layout as x or the "other" one)
VARIANTS = {
    "nchw": ("nchw", "none", True, None),
    "cl_relu_res": ("channels_last", "relu", True, "same"),
    "cl_relu": ("channels_last", "relu", True, None),
    "strided_silu": ("noncontig", "silu", False, None),
    "nchw_gelu_res": ("nchw", "gelu", True, "same"),
    "cl_nchw_res": ("channels_last", "none", False, "other"),
}


def _conv_cases(shapes):
    return [(s, v) for s in shapes for v in VARIANTS]


def _double(t):
    return None if t is None else t.detach().double().requires_grad_()


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases(_conv_cases(CONV_SHAPES), INTERPRETED),
    indirect=["backend"],
)
def test_conv2d(backend, dtype, case):
    shape, variant = case
    n, c, h, w, k, r, s, stride, padding, dilation, groups = CONV_SHAPES[shape]
    layout, act, has_bias, res_layout = VARIANTS[variant]
    cl, dev = layout == "channels_last", backend.device
    x = make((n, c, h, w), dtype, cl, layout == "noncontig", grad=True, device=dev)
    wt = make((k, c // groups, r, s), dtype, grad=True, device=dev)
    b = make((k,), dtype, grad=True, device=dev) if has_bias else None
    out_shape = ref_conv2d(x.detach(), wt.detach(), b, stride, padding, dilation, groups).shape
    res_cl = cl == (res_layout == "same")
    res = make(tuple(out_shape), dtype, res_cl, grad=True, device=dev) if res_layout else None
    y = fastdl.conv2d(x, wt, b, stride, padding, dilation, groups, activation=act, residual=res)

    leaves = [(t, _double(t)) for t in (x, wt, b, res)]
    (xd, wd, bd, rd) = (d for _, d in leaves)
    expected = ref_conv2d(xd, wd, bd, stride, padding, dilation, groups, act, rd)
    assert y.dtype == dtype and y.shape == expected.shape
    if cl and c > 1 and k > 1:
        assert y.is_contiguous(memory_format=torch.channels_last)
    else:
        assert y.is_contiguous()
    assert_close(y, expected, dtype)
    g = torch.randn(expected.shape, dtype=torch.float64, device=dev)
    (y * g.to(dtype)).sum().backward()
    (expected * g.to(dtype).double()).sum().backward()
    for got, want in leaves:
        if got is not None:
            assert got.grad.shape == got.shape and got.grad.dtype == dtype
            assert_close(got.grad, want.grad, dtype, scale=4.0)


# (N, C_in, H, W, C_out, k, stride, padding, output_padding, groups, dilation)
CONVT_SHAPES = {
    "dcgan_4x4_s2": (2, 6, 5, 5, 3, 4, 2, 1, 0, 1, 1),
    "grouped_asym": (1, 6, 4, 3, 4, 3, (2, 1), (1, 0), (1, 0), 2, 1),
    "dilated": (2, 3, 3, 4, 5, 3, 1, 0, 0, 1, 2),
    "outpad_2": (1, 4, 3, 3, 4, 3, 3, 1, 2, 4, 1),
    # 1x1, stride 1, unpadded, yet the output is larger than the input (output_padding 1).
    "1x1_outpad_dilated": (2, 3, 2, 3, 4, 1, 1, 0, 1, 1, 2),
    # Depthwise, stride 1, dilated, output_padding: the adjoint's depthwise forward writes more
    # rows and columns than its padded input gives (the NCHW plane kernel's scratch had been
    # read past its end).
    "depthwise_outpad_dilated": (3, 5, 3, 14, 5, 3, 1, 2, 1, 5, 2),
}


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases(
        [(s, lay) for s in CONVT_SHAPES for lay in ("nchw", "channels_last")],
        [("dcgan_4x4_s2", "channels_last"), ("grouped_asym", "nchw")],
    ),
    indirect=["backend"],
)
def test_conv_transpose2d(backend, dtype, case):
    shape, layout = case
    n, c, h, w, k, ks, stride, padding, opad, groups, dilation = CONVT_SHAPES[shape]
    dev = backend.device
    x = make((n, c, h, w), dtype, layout == "channels_last", grad=True, device=dev)
    wt = make((c, k // groups, ks, ks), dtype, grad=True, device=dev)
    b = make((k,), dtype, grad=True, device=dev)
    y = fastdl.conv_transpose2d(x, wt, b, stride, padding, opad, groups, dilation)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, wt, b))
    expected = ref_conv_transpose2d(xd, wd, bd, stride, padding, opad, groups, dilation)
    assert y.dtype == dtype and y.shape == expected.shape
    if layout == "channels_last":
        assert y.is_contiguous(memory_format=torch.channels_last)
    assert_close(y, expected, dtype)
    g = torch.randn(expected.shape, dtype=torch.float64, device=dev)
    (y * g.to(dtype)).sum().backward()
    (expected * g.to(dtype).double()).sum().backward()
    for got, want in ((x, xd), (wt, wd), (b, bd)):
        assert_close(got.grad, want.grad, dtype, scale=4.0)


@pytest.mark.parametrize("shape", ["3x3", "1x1", "depthwise", "taps_3x3", "winograd"])
@pytest.mark.parametrize("wants", ["bias", "bias_and_x"])
def test_frozen_weight(backend, shape, wants):
    # A frozen weight with a trainable bias (fine-tuning): the backward skips the weight gradient.
    n, c, h, w, k, r, s, stride, padding, dilation, groups = CONV_SHAPES[shape]
    dev = backend.device
    x = make((n, c, h, w), torch.float32, grad=wants == "bias_and_x", device=dev)
    wt = make((k, c // groups, r, s), torch.float32, device=dev)
    b = make((k,), torch.float32, grad=True, device=dev)
    y = fastdl.conv2d(x, wt, b, stride, padding, dilation, groups)
    g = torch.randn(y.shape, device=dev)
    (y * g).sum().backward()
    assert wt.grad is None
    assert_close(b.grad, g.double().sum((0, 2, 3)), torch.float32)
    if x.requires_grad:
        xd = x.detach().double().requires_grad_()
        expected = ref_conv2d(xd, wt.double(), b.double(), stride, padding, dilation, groups)
        (expected * g.double()).sum().backward()
        assert_close(x.grad, xd.grad, torch.float32, scale=4.0)


def test_output_follows_a_channels_last_weight(backend):
    """As torch: an NCHW x with a channels_last weight gives a channels_last output (conv2d and
    conv_transpose2d), with the same values and gradients; an unbatched x stays as it is."""
    dev, cl = backend.device, torch.channels_last
    x = torch.randn(2, 6, 7, 5, device=dev, requires_grad=True)
    w = torch.randn(8, 3, 3, 3, device=dev).contiguous(memory_format=cl).requires_grad_()
    wt = torch.randn(6, 4, 4, 4, device=dev).contiguous(memory_format=cl).requires_grad_()
    y = fastdl.conv2d(x, w, None, 1, 1, 1, 2)
    yt = fastdl.conv_transpose2d(x, wt, None, 2, 1)
    assert y.is_contiguous(memory_format=cl) and yt.is_contiguous(memory_format=cl)
    assert F.conv2d(x, w, None, 1, 1, 1, 2).is_contiguous(memory_format=cl)
    grads = torch.autograd.grad((y.sum(), yt.sum()), (x, w, wt))
    leaves = [t.detach().double().requires_grad_() for t in (x, w, wt)]
    ref = ref_conv2d(leaves[0], leaves[1], None, 1, 1, 1, 2)
    ref_t = ref_conv_transpose2d(leaves[0], leaves[2], None, 2, 1, 0, 1, 1)
    assert_close(y, ref, torch.float32)
    assert_close(yt, ref_t, torch.float32)
    for got, want in zip(grads, torch.autograd.grad((ref.sum(), ref_t.sum()), leaves), strict=True):
        assert_close(got, want, torch.float32, scale=4.0)
    assert fastdl.conv2d(x[0], w, None, 1, 1, 1, 2).is_contiguous()


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_empty_batch(backend, fmt):
    x = torch.randn(0, 4, 6, 6).contiguous(memory_format=fmt).requires_grad_()
    w = torch.randn(6, 2, 3, 3, requires_grad=True)
    b = torch.randn(6, requires_grad=True)
    y = fastdl.conv2d(x, w, b, padding=1, groups=2, activation="relu")
    assert y.shape == (0, 6, 6, 6)
    (gx,) = torch.autograd.grad(y.sum(), x, retain_graph=True)
    # An empty x is contiguous in every format: output and gradient take NCHW strides alike.
    assert y.stride() == torch.empty(y.shape).stride()
    assert gx.stride() == torch.empty(x.shape).stride()
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros_like(w)) and torch.equal(b.grad, torch.zeros_like(b))
    wt = torch.randn(4, 3, 4, 4, requires_grad=True)
    yt = fastdl.conv_transpose2d(x, wt, None, 2, 1)
    assert yt.shape == (0, 3, 12, 12)
    yt.sum().backward()
    assert torch.equal(wt.grad, torch.zeros_like(wt))
    # An empty batch may have an empty output plane too, as torch's (with images it is an error).
    w0 = torch.randn(4, 2, 2, 2, requires_grad=True)
    y0 = fastdl.conv_transpose2d(torch.randn(0, 4, 1, 5, requires_grad=True), w0, padding=(1, 0))
    assert y0.shape == (0, 2, 0, 6)
    y0.sum().backward()
    assert torch.equal(w0.grad, torch.zeros_like(w0))
    with pytest.raises(RuntimeError, match="output size 0 is not positive"):
        fastdl.conv_transpose2d(torch.randn(1, 4, 1, 5), w0, padding=(1, 0))


@pytest.mark.parametrize(
    "backend,dtype,case",
    cases(
        [
            (torch.contiguous_format, 3, 1, None),
            (torch.channels_last, 3, 1, "gelu"),
            (torch.contiguous_format, 1, 1, None),
            (torch.contiguous_format, 3, 2, "relu"),
        ]
    ),
    indirect=["backend"],
)
def test_no_channels(backend, dtype, case):
    """A conv with no output channels (or a transposed one with no input channels): empty
    outputs, zero or empty gradients (the weight gradient's partial sums once divided by 0)."""
    fmt, kernel, groups, activation = case
    dev = backend.device
    x = torch.randn(2, 4, 5, 6, dtype=dtype, device=dev).contiguous(memory_format=fmt)
    x.requires_grad_()
    w = torch.randn(0, 4 // groups, kernel, kernel, dtype=dtype, device=dev, requires_grad=True)
    b = torch.randn(0, dtype=dtype, device=dev, requires_grad=True)
    y = fastdl.conv2d(x, w, b, groups=groups, activation=activation)
    assert y.shape == (2, 0, 6 - kernel, 7 - kernel)
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x))
    assert w.grad.shape == w.shape and b.grad.shape == (0,)
    # conv_transpose2d from 0 input channels: the output is the bias alone.
    x0 = torch.randn(2, 0, 5, 6, dtype=dtype, device=dev, requires_grad=True)
    wt = torch.randn(0, 3, kernel, kernel, dtype=dtype, device=dev, requires_grad=True)
    bt = torch.randn(3 * groups, dtype=dtype, device=dev, requires_grad=True)
    yt = fastdl.conv_transpose2d(x0, wt, bt, groups=groups)
    assert torch.equal(yt, bt.detach().view(1, -1, 1, 1).expand_as(yt))
    g = torch.randn_like(yt)
    yt.backward(g)
    assert x0.grad.shape == x0.shape and wt.grad.shape == wt.shape
    assert_close(bt.grad, g.double().sum((0, 2, 3)), dtype)


def test_no_channels_at_all(backend):
    # Neither input nor output channels: every GEMM dimension but the rows is 0.
    dev = backend.device
    x = torch.randn(2, 0, 5, 5, device=dev, requires_grad=True)
    w = torch.randn(0, 0, 3, 3, device=dev, requires_grad=True)
    y = fastdl.conv2d(x, w)
    assert y.shape == (2, 0, 3, 3)
    y.sum().backward()
    assert x.grad.shape == x.shape and w.grad.shape == w.shape
    assert fastdl.conv_transpose2d(x, w).shape == (2, 0, 7, 7)


def test_one_value_sequences(backend):
    """stride/padding/dilation/output_padding as one-element sequences serve both dims, as
    torch's functional convs take them."""
    x = torch.randn(2, 4, 7, 6, device=backend.device)
    w = torch.randn(6, 4, 3, 3, device=backend.device)
    wt = torch.randn(4, 3, 3, 3, device=backend.device)
    got = fastdl.conv2d(x, w, None, (2,), [1], [2])
    assert_close(got, F.conv2d(x.double(), w.double(), None, (2,), [1], [2]), torch.float32)
    # any integer type, numpy's too (a model built from a numpy config), as torch takes them
    got = fastdl.conv2d(x, w, None, np.int64(2), (np.int32(1), 1))
    assert_close(got, F.conv2d(x.double(), w.double(), None, 2, 1), torch.float32)
    got = fastdl.conv_transpose2d(x, wt, None, [2], (1,), [1])
    want = F.conv_transpose2d(x.double(), wt.double(), None, [2], (1,), [1])
    assert_close(got, want, torch.float32)


@pytest.mark.parametrize(
    "padding,kernel,dilation",
    [("same", 3, 1), ("same", 4, 1), ("same", (2, 5), (3, 1)), ("valid", 3, 2)],
)
def test_string_padding_and_unbatched(backend, padding, kernel, dilation):
    kernel = (kernel, kernel) if isinstance(kernel, int) else kernel
    x = torch.randn(3, 9, 8, dtype=torch.float32)
    w = torch.randn(4, 3, *kernel)
    y = fastdl.conv2d(x, w, None, 1, padding, dilation)
    expected = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, padding, dilation)
    assert y.shape == expected.shape
    assert_close(y, expected, torch.float32)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("kg", [2, 4, 8, 16, 32])
def test_grouped_nan_stays_in_its_group(layout, kg):
    """A NaN or Inf input channel reaches only its own group's outputs: the direct grouped kernel
    loads each group's channels into its own lanes only (torch: the same)."""
    x = torch.randn(2, 4 * kg, 6, 5)
    x[:, 0] = float("nan")
    x[:, kg] = float("inf")
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    w = torch.randn(4 * kg, kg, 3, 3)
    y = fastdl.conv2d(x, w, None, 1, 1, 1, 4)
    assert not torch.isfinite(y[:, : 2 * kg]).any()
    assert torch.isfinite(y[:, 2 * kg :]).all()
    expected = torch.nn.functional.conv2d(x.double(), w.double(), None, 1, 1, 1, 4)
    torch.testing.assert_close(y[:, 2 * kg :].double(), expected[:, 2 * kg :], rtol=1e-5, atol=1e-5)


def test_bfloat16_rounds_to_nearest(backend):
    """bfloat16 output and gradients within half an ulp (2^-8 relative) of the exact values, plus
    the float32 sums' error: rounded, not truncated (Triton's interpreted cast truncated, a bias
    toward zero of up to one ulp)."""
    torch.manual_seed(0)
    x = torch.randn(2, 8, 6, 6).bfloat16().requires_grad_()
    w = torch.randn(8, 8, 3, 3).bfloat16().requires_grad_()
    g = torch.randn(2, 8, 6, 6).bfloat16()
    y = fastdl.conv2d(x, w, padding=1)
    gx, gw = torch.autograd.grad(y, (x, w), g)
    x64, w64 = (t.detach().double().requires_grad_() for t in (x, w))
    y64 = torch.nn.functional.conv2d(x64, w64, padding=1)
    gx64, gw64 = torch.autograd.grad(y64, (x64, w64), g.double())
    for got, exact in ((y, y64), (gx, gx64), (gw, gw64)):
        assert got.dtype == torch.bfloat16
        err = (got.double() - exact.detach()).abs()
        assert (err <= exact.detach().abs() * 2**-8 * 1.01 + 1e-4).all()


@pytest.mark.parametrize("stride, kernel", [(1, 3), (1, 5), (2, 3), ((1, 2), 2)])
def test_bfloat16_depthwise_nchw(stride, kernel):
    """A bfloat16 NCHW depthwise forward widens x plane by plane inside the plane kernels (flat,
    row tiles, split by parity): within half an ulp of the exact values, as the other convs."""
    torch.manual_seed(0)
    x = torch.randn(2, 5, 9, 21).bfloat16()
    w = torch.randn(5, 1, kernel, kernel).bfloat16()
    y = fastdl.conv2d(x, w, None, stride, kernel // 2, 1, 5)
    exact = torch.nn.functional.conv2d(x.double(), w.double(), None, stride, kernel // 2, 1, 5)
    assert y.dtype == torch.bfloat16 and y.shape == exact.shape
    assert ((y.double() - exact).abs() <= exact.abs() * 2**-8 * 1.01 + 1e-4).all()


def test_triton_backward_under_another_backend():
    """A Triton forward's backward runs the Triton backward op whatever backend is in force by
    then, float16 (a dtype of the Triton kernels only, on CPU) included: its checks took the
    backend in force, and refused float16 under "native"."""
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(1, 2, 4, 4, dtype=torch.float16, device=dev, requires_grad=True)
    w = torch.randn(3, 2, 3, 3, dtype=torch.float16, device=dev, requires_grad=True)
    wt = torch.randn(2, 3, 2, 2, dtype=torch.float16, device=dev, requires_grad=True)
    with fastdl.backend("triton"):
        y = fastdl.conv2d(x, w, padding=1)
        yt = fastdl.conv_transpose2d(x, wt, stride=2)
    with fastdl.backend("native"):
        grads = torch.autograd.grad(y.float().sum() + yt.float().sum(), (x, w, wt))
    x32, w32, wt32 = (t.detach().float().requires_grad_() for t in (x, w, wt))
    ref = torch.nn.functional.conv2d(x32, w32, padding=1).sum()
    ref = ref + torch.nn.functional.conv_transpose2d(x32, wt32, stride=2).sum()
    for got, want in zip(grads, torch.autograd.grad(ref, (x32, w32, wt32)), strict=True):
        torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_nan_propagates(backend):
    x = torch.randn(1, 2, 4, 4)
    x[0, 1, 2, 2] = float("nan")
    w = torch.randn(3, 2, 3, 3)
    y = fastdl.conv2d(x, w, padding=1, activation="relu")
    expected = torch.relu(torch.nn.functional.conv2d(x, w, padding=1))
    assert torch.equal(y.isnan(), expected.isnan())


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_nonfinite_propagates_winograd(backend, layout):
    """A NaN and an Inf in a Winograd-sized conv (forward and input gradient) land where torch's
    conv puts them, not smeared over whole tiles; 8 images make several blocks, so the blocks
    between the first and the last (the only ones with a non-finite value) run Winograd."""
    cl = layout == "channels_last"
    x = make((8, 32, 12, 12), torch.float32, cl, device=backend.device)
    x[0, 3, 4, 4] = float("nan")
    x[7, 5, 9, 2] = float("inf")
    w = make((32, 32, 3, 3), torch.float32, device=backend.device) / 16
    x.requires_grad_()
    w.requires_grad_()
    y = fastdl.conv2d(x, w, padding=1)
    expected = torch.nn.functional.conv2d(x.detach(), w.detach(), padding=1)
    assert torch.equal(y.isnan(), expected.isnan()) and torch.equal(y.isinf(), expected.isinf())
    finite = expected.isfinite()
    assert_close(y[finite], expected[finite].double(), torch.float32)
    g = torch.zeros_like(y)
    g[7, 7, 5, 6] = float("nan")
    gx, gw = torch.autograd.grad(y, (x, w), g)
    assert torch.equal(gx[7].isnan(), _window(12, 5, 6, gx.device).expand(32, 12, 12))
    assert not gx[:7].isnan().any()
    # The weight gradient sees the NaN of g (output channel 7) and those of x (every input
    # channel of image 7 is multiplied by that NaN, and x's own NaN and Inf): all NaN, as torch.
    (tw,) = torch.autograd.grad(torch.nn.functional.conv2d(x, w, padding=1), w, g)
    assert torch.equal(gw.isnan(), tw.isnan())


# Run in a subprocess per FASTDL_CONV_WINOGRAD setting (read once per process): forward and
# input gradient of the Winograd-sized shapes against float64 (partial tiles, padding 0-2, both
# layouts, a NaN), and the outputs of one conv, as inference and as a differentiable forward,
# saved for the parent to compare across settings.
_WINOGRAD_SWITCH = """
import sys, torch
sys.path.insert(0, {tests!r})
import fastdl
from conv_ref import assert_close, make, ref_conv2d
torch.manual_seed(0)
for n, c, h, w, k, pad in [(2, 16, 11, 13, 20, 1), (3, 20, 9, 10, 17, 0), (3, 24, 5, 6, 16, 2)]:
    for cl in (False, True):
        x = make((n, c, h, w), torch.float32, cl, grad=True)
        wt = make((k, c, 3, 3), torch.float32, grad=True)
        y = fastdl.conv2d(x, wt, padding=pad, activation="relu")
        xd, wd = (t.detach().double().requires_grad_() for t in (x, wt))
        pre = ref_conv2d(xd, wd, None, 1, pad, 1, 1)
        expected = pre.relu()
        assert_close(y, expected, torch.float32)
        with torch.no_grad():
            inferred = fastdl.conv2d(x, wt, padding=pad, activation="relu")
        assert_close(inferred, expected, torch.float32)
        # No gradient where the pre-activation is within rounding of ReLU's kink: which side
        # float32 lands on is the rounding's choice.
        g = torch.randn(expected.shape, dtype=torch.float64) * (pre.abs() > 1e-4)
        y.backward(g.float())
        expected.backward(g)
        assert_close(x.grad, xd.grad, torch.float32, scale=4.0)
        assert_close(wt.grad, wd.grad, torch.float32, scale=4.0)
torch.manual_seed(0)
x = torch.randn(4, 64, 12, 12)
w = torch.randn(64, 64, 3, 3)
trained = fastdl.conv2d(x, w.requires_grad_(), padding=1).detach()
# Too few tiles of 8x8 images for F(4x4, 3x3)'s weight, enough for F(2x2, 3x3)'s.
deep = fastdl.conv2d(torch.randn(8, 256, 8, 8), torch.randn(256, 256, 3, 3) / 48, padding=1)
saved = (x, w.detach(), fastdl.conv2d(x, w.detach(), padding=1), trained, deep)
torch.save(saved, {path!r})
x[1, 2, 3, 4] = float("nan")
y = fastdl.conv2d(x, w.detach(), padding=1)
assert torch.equal(y.isnan(), torch.nn.functional.conv2d(x, w, padding=1).isnan())
"""


def test_winograd_settings(tmp_path):
    """FASTDL_CONV_WINOGRAD=0 (direct), 2 (F(2x2, 3x3)) and 4 (F(4x4, 3x3)) are each correct on
    the Winograd shapes (checked in their subprocess) and really take different paths: three
    roundings of one 64-channel conv, F(4x4, 3x3)'s RMS error the largest (~4x the direct
    GEMM's here), F(2x2, 3x3)'s of the direct one's order. Unset (the default), a forward whose
    output will be differentiated takes F(2x2, 3x3), an inference forward F(4x4, 3x3) where it
    suits, else F(2x2, 3x3)."""
    err, out = {}, {}
    for flag in ("0", "2", "4", None):
        path = str(tmp_path / f"y{flag}.pt")
        env = {k: v for k, v in os.environ.items() if k != "FASTDL_CONV_WINOGRAD"}
        env.update({} if flag is None else {"FASTDL_CONV_WINOGRAD": flag})
        script = _WINOGRAD_SWITCH.format(tests=os.path.dirname(__file__), path=path)
        subprocess.run([sys.executable, "-c", script], env=env, check=True, timeout=600)
        x, w, inferred, trained, out[flag, "deep"] = torch.load(path)
        out[flag] = inferred, trained
        expected = torch.nn.functional.conv2d(x.double(), w.double(), padding=1)
        err[flag] = (trained.double() - expected).square().mean().sqrt().item()
    assert err["0"] != err["2"] != err["4"] != err["0"]
    assert err["4"] > 2.5 * max(err["0"], err["2"]) and err["2"] < 2 * err["0"]
    for flag in ("0", "2", "4"):
        assert torch.equal(*out[flag])
    assert torch.equal(out[None][0], out["4"][0]) and torch.equal(out[None][1], out["2"][1])
    # An inference forward that F(4x4, 3x3) does not suit takes F(2x2, 3x3) (forced "4" runs it
    # on the implicit GEMM).
    assert torch.equal(out[None, "deep"], out["2", "deep"])
    assert not torch.equal(out[None, "deep"], out["4", "deep"])


def _window(size, p, q, device):
    """(size, size) mask of the 3x3 window around (p, q): the input pixels that output pixel
    (p, q) of a 3x3 padding-1 conv reads."""
    m = torch.zeros(size, size, dtype=torch.bool, device=device)
    m[max(p - 1, 0) : p + 2, max(q - 1, 0) : q + 2] = True
    return m


def _bad(x=None, w=None, **kw):
    x = torch.randn(2, 4, 6, 6) if x is None else x
    w = torch.randn(6, 4, 3, 3) if w is None else w
    return lambda: fastdl.conv2d(x, w, **kw)


def _bad_t(x=None, w=None, **kw):
    x = torch.randn(2, 4, 6, 6) if x is None else x
    w = torch.randn(4, 3, 3, 3) if w is None else w
    return lambda: fastdl.conv_transpose2d(x, w, **kw)


BAD = {
    "channels_vs_weight": (_bad(w=torch.randn(6, 3, 3, 3)), RuntimeError, "x has 4 channels"),
    "channels_vs_groups": (_bad(w=torch.randn(6, 4, 3, 3), groups=3), RuntimeError, "divisible"),
    "out_channels_vs_groups": (
        _bad(w=torch.randn(5, 2, 3, 3), groups=2),
        RuntimeError,
        "output channels 5",
    ),
    "stride_zero": (_bad(stride=0), RuntimeError, "stride must be > 0"),
    "dilation_negative": (_bad(dilation=(1, -1)), RuntimeError, "dilation must be > 0"),
    "padding_negative": (_bad(padding=-1), RuntimeError, "padding must be >= 0"),
    "kernel_too_large": (_bad(w=torch.randn(6, 4, 9, 3)), RuntimeError, "larger than the padded"),
    "kernel_empty": (_bad(w=torch.randn(6, 4, 0, 3)), RuntimeError, "kernel of at least 1x1"),
    "t_kernel_empty": (_bad_t(w=torch.randn(4, 3, 2, 0)), RuntimeError, "kernel of at least 1x1"),
    "bias_size": (_bad(bias=torch.randn(5)), RuntimeError, r"bias must have shape \(6,\)"),
    "activation": (_bad(activation="tanh"), RuntimeError, "activation must be one of"),
    "residual_shape": (
        _bad(residual=torch.randn(2, 6, 4, 5)),
        RuntimeError,
        "residual must have the output's shape",
    ),
    "mixed_dtypes": (_bad(w=torch.randn(6, 4, 3, 3, dtype=torch.float64)), TypeError, "weight"),
    "residual_dtype": (
        _bad(residual=torch.randn(2, 6, 4, 4, dtype=torch.float64)),
        TypeError,
        "residual has dtype",
    ),
    "int_dtype": (
        _bad(x=torch.ones(2, 4, 6, 6, dtype=torch.int32), w=torch.ones(6, 4, 3, 3).int()),
        TypeError,
        "supported dtypes",
    ),
    "x_3d_bad": (_bad(x=torch.randn(4, 6)), RuntimeError, "4-D"),
    "same_strided": (_bad(padding="same", stride=2), RuntimeError, "strided"),
    "devices": (_bad(bias=torch.randn(6, device="meta")), RuntimeError, "same device"),
    "t_output_padding": (
        _bad_t(stride=2, output_padding=2),
        RuntimeError,
        "output_padding must be smaller than stride or dilation",
    ),
    "t_channels": (_bad_t(w=torch.randn(3, 3, 3, 3)), RuntimeError, "x has 4 channels"),
    "t_bias": (_bad_t(bias=torch.randn(4)), RuntimeError, r"bias must have shape \(3,\)"),
    "t_stride": (_bad_t(stride=(1, 0)), RuntimeError, "stride must be > 0"),
    "stride_three": (_bad(stride=(1, 1, 1)), RuntimeError, "stride must have 2 values"),
    "padding_float": (_bad(padding=1.0), TypeError, "padding must be an int or a pair of ints"),
    "t_padding_string": (_bad_t(padding="same"), TypeError, "padding must be an int or a pair"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_input(backend, case):
    fn, exc, match = BAD[case]
    with pytest.raises(exc, match=match):
        fn()


@pytest.mark.parametrize(
    "case", ["bias_size", "activation", "t_output_padding", "kernel_too_large"]
)
def test_bad_input_raw_native_op(case):
    """The C++ checks (csrc/common/conv.h) guard direct calls of the raw ops too."""
    from fastdl.ops import conv as ops

    x, w = torch.randn(2, 4, 6, 6), torch.randn(6, 4, 3, 3)
    calls = {
        "bias_size": lambda: ops.NATIVE.conv2d_fwd(
            x, w, torch.randn(5), None, [1, 1], [0, 0], [1, 1], 1, "none"
        ),
        "activation": lambda: ops.NATIVE.conv2d_fwd(
            x, w, None, None, [1, 1], [0, 0], [1, 1], 1, "tanh"
        ),
        "t_output_padding": lambda: ops.NATIVE.conv_transpose2d_fwd(
            x, torch.randn(4, 3, 3, 3), None, [2, 2], [0, 0], [2, 2], 1, [1, 1]
        ),
        "kernel_too_large": lambda: ops.NATIVE.conv2d_fwd(
            x, torch.randn(6, 4, 9, 9), None, None, [1, 1], [1, 1], [1, 1], 1, "none"
        ),
    }
    with pytest.raises(RuntimeError, match=BAD[case][2]):
        calls[case]()
