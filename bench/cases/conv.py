"""Convolution cases: the ResNet layer of issue 4 in both memory formats, forward and
forward+backward, the fused conv + bias + residual + ReLU, depthwise 3x3, and the rows the issue
also reports (1x1, stride-2 3x3, the 7x7 stem, a DCGAN conv_transpose2d layer, bfloat16), plus
ResNet-18's deep layers and ResNeXt-50's grouped convs.

Baselines: torch.nn.functional.conv2d / conv_transpose2d (for the fused case, conv then add
then relu). FLOPs: 2 per multiply-add of the forward; forward+backward is 3x the forward
(input and weight gradients each cost one forward).
"""

import torch
import torch.nn.functional as F

import fastdl
from bench.cases import Case, Inputs, Target

RESNET = (32, 64, 56, 56)  # (N, C, H, W) with a 64 -> 64 3x3 conv, padding 1


def _randn(shape, dtype, device, grad=False, fmt=torch.contiguous_format):
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=fmt)
    return x.requires_grad_(grad)


def _inputs(k, r, stride, padding, groups=1, bias=False, residual=False, transpose=False):
    """(x, weight[, bias][, residual]) for a conv with k output channels and an r x r kernel."""

    def make(case: Case, device: torch.device) -> Inputs:
        torch.manual_seed(0)
        grad = case.mode == "fwd+bwd"
        fmt = torch.channels_last if case.variant.startswith("channels_last") else None
        fmt = fmt or torch.contiguous_format
        n, c, h, _ = case.shape
        x = _randn(case.shape, case.dtype, device, grad, fmt)
        wshape = (c, k // groups, r, r) if transpose else (k, c // groups, r, r)
        fan_in = (c // groups) * r * r
        weight = (_randn(wshape, case.dtype, device) / fan_in**0.5).requires_grad_(grad)
        args = [x, weight]
        if bias:
            args.append(_randn(k, case.dtype, device, grad))
        if residual:
            p = (h + 2 * padding - r) // stride + 1
            args.append(_randn((n, k, p, p), case.dtype, device, grad, fmt))
        out = _call(case, args)
        g = torch.randn_like(out) if grad else None
        return Inputs(tuple(args), g)

    def _call(case, args):
        with torch.no_grad():
            return case.eager(*args)

    return make


def _conv(stride, padding, groups=1):
    def fastdl_fn(x, w):
        return fastdl.conv2d(x, w, None, stride, padding, 1, groups)

    def eager_fn(x, w):
        return F.conv2d(x, w, None, stride, padding, 1, groups)

    return fastdl_fn, eager_fn


def _fused(x, w, b, r):
    return fastdl.conv2d(x, w, b, 1, 1, activation="relu", residual=r)


def _fused_torch(x, w, b, r):
    return torch.relu(F.conv2d(x, w, b, 1, 1) + r)


def _convt(x, w):
    return fastdl.conv_transpose2d(x, w, None, 2, 1)


def _convt_torch(x, w):
    return F.conv_transpose2d(x, w, None, 2, 1)


def _flops(shape, k, r, stride, padding, groups=1, transpose=False, mode="fwd"):
    n, c, h, w = shape
    if transpose:  # the adjoint conv: its output is this input
        macs = n * h * w * c * (k // groups) * r * r
    else:
        p = (h + 2 * padding - r) // stride + 1
        q = (w + 2 * padding - r) // stride + 1
        macs = n * p * q * k * (c // groups) * r * r
    return 2 * macs * (3 if mode == "fwd+bwd" else 1)


def _case(op, mode, shape, dtype, variant, target, k, r, stride, padding, fns, **kw):
    groups, transpose = kw.get("groups", 1), kw.get("transpose", False)
    return Case(
        family="conv",
        op=op,
        mode=mode,
        shape=shape,
        dtype=dtype,
        make=_inputs(k, r, stride, padding, **kw),
        fastdl=fns[0],
        eager=fns[1],
        flops=_flops(shape, k, r, stride, padding, groups, transpose, mode),
        variant=variant,
        target=target,
    )


F32, BF16 = torch.float32, torch.bfloat16
CL = "channels_last"
_3x3 = _conv(1, 1)

CASES = [
    # The ResNet layer: the figures.
    _case("conv2d 3x3", "fwd", RESNET, F32, "", Target(eager=2.0, peak=0.8), 64, 3, 1, 1, _3x3),
    _case("conv2d 3x3", "fwd", RESNET, F32, CL, Target(eager=1.0, peak=0.8), 64, 3, 1, 1, _3x3),
    _case("conv2d 3x3", "fwd+bwd", RESNET, F32, "", Target(eager=1.2), 64, 3, 1, 1, _3x3),
    _case("conv2d 3x3", "fwd+bwd", RESNET, F32, CL, Target(eager=1.2), 64, 3, 1, 1, _3x3),
    _case(
        "conv2d+bias+res+relu",
        "fwd",
        RESNET,
        F32,
        "",
        Target(eager=1.3),
        64,
        3,
        1,
        1,
        (_fused, _fused_torch),
        bias=True,
        residual=True,
    ),
    _case(
        "depthwise 3x3",
        "fwd",
        (32, 256, 28, 28),
        F32,
        "",
        Target(eager=1.5),
        256,
        3,
        1,
        1,
        _conv(1, 1, 256),
        groups=256,
    ),
    # Also reported: depthwise channels_last and both layouts' training step.
    *(
        _case(
            "depthwise 3x3",
            mode,
            (32, 256, 28, 28),
            F32,
            fmt,
            None,
            256,
            3,
            1,
            1,
            _conv(1, 1, 256),
            groups=256,
        )
        for mode, fmt in (("fwd", CL), ("fwd+bwd", ""), ("fwd+bwd", CL))
    ),
    # MobileNetV2's stride-2 depthwise layer on 56x56 (NCHW planes split by column parity).
    _case(
        "depthwise 3x3 s2",
        "fwd",
        (32, 144, 56, 56),
        F32,
        "",
        None,
        144,
        3,
        2,
        1,
        _conv(2, 1, 144),
        groups=144,
    ),
    # Also reported: other shapes and bfloat16.
    _case("conv2d 1x1", "fwd", (32, 256, 56, 56), F32, "", None, 64, 1, 1, 0, _conv(1, 0)),
    _case("conv2d 1x1", "fwd", (32, 256, 56, 56), BF16, "", None, 64, 1, 1, 0, _conv(1, 0)),
    _case("conv2d 3x3 s2", "fwd", (32, 128, 56, 56), F32, "", None, 128, 3, 2, 1, _conv(2, 1)),
    _case("conv2d 3x3 s2", "fwd", (32, 128, 56, 56), BF16, "", None, 128, 3, 2, 1, _conv(2, 1)),
    _case("conv2d 7x7 s2 stem", "fwd", (32, 3, 224, 224), F32, "", None, 64, 7, 2, 3, _conv(2, 3)),
    _case("conv2d 7x7 s2 stem", "fwd", (32, 3, 224, 224), F32, CL, None, 64, 7, 2, 3, _conv(2, 3)),
    _case(
        "conv_transpose2d 4x4 s2",
        "fwd",
        (64, 256, 16, 16),
        F32,
        "",
        None,
        128,
        4,
        2,
        1,
        (_convt, _convt_torch),
        transpose=True,
    ),
    _case("conv2d 3x3", "fwd", RESNET, BF16, "", None, 64, 3, 1, 1, _3x3),
    _case("conv2d 3x3", "fwd", RESNET, BF16, CL, None, 64, 3, 1, 1, _3x3),
    # bfloat16 training: the implicit GEMM's three products on gemm_bf16 (1x1, stride 2), the
    # stride-1 3x3 on float32 Winograd.
    _case("conv2d 1x1", "fwd+bwd", (32, 256, 56, 56), BF16, CL, None, 64, 1, 1, 0, _conv(1, 0)),
    _case("conv2d 3x3 s2", "fwd+bwd", (32, 128, 56, 56), BF16, "", None, 128, 3, 2, 1, _conv(2, 1)),
    _case("conv2d 3x3", "fwd+bwd", RESNET, BF16, CL, None, 64, 3, 1, 1, _3x3),
    # ResNeXt-50 (32x4d)'s grouped 3x3 convs, 32 groups, one per stage (4, 8, 16 and 32 channels
    # a group; no target of the issue): the direct grouped kernels; NCHW for two of the stages
    # (the broadcast kernels' NCHW reads and epilogue).
    *(
        _case(
            f"resnext 3x3 g32 {c}ch {h}x{h}",
            mode,
            (32, c, h, h),
            F32,
            variant,
            None,
            c,
            3,
            1,
            1,
            _conv(1, 1, 32),
            groups=32,
        )
        for variant, stages in (
            (CL, ((128, 56), (256, 28), (512, 14), (1024, 7))),
            ("", ((256, 28), (1024, 7))),
        )
        for c, h in stages
        for mode in ("fwd", "fwd+bwd")
    ),
    # ResNet-18 on 32x32 images: the deep layers (many channels, few pixels; reported beside
    # torch, no target of the issue) and a stride-2 downsampling conv and its 1x1 shortcut.
    *(
        _case(
            f"resnet18 3x3 {c}ch {h}x{h}", "fwd+bwd", (32, c, h, h), F32, CL, None, c, 3, 1, 1, _3x3
        )
        for c, h in ((512, 4), (256, 8), (128, 16))
    ),
    _case(
        "resnet18 3x3 s2 256->512",
        "fwd+bwd",
        (32, 256, 8, 8),
        F32,
        CL,
        None,
        512,
        3,
        2,
        1,
        _conv(2, 1),
    ),
    _case(
        "resnet18 1x1 s2 256->512",
        "fwd+bwd",
        (32, 256, 8, 8),
        F32,
        CL,
        None,
        512,
        1,
        2,
        0,
        _conv(2, 0),
    ),
]
