"""Float64 references and input builders for the conv tests."""

import torch
import torch.nn.functional as F

ACT = {
    "none": lambda v: v,
    "relu": torch.relu,
    "silu": F.silu,
    "gelu": F.gelu,
}


def ref_conv2d(x, w, b, stride, padding, dilation, groups, activation="none", residual=None):
    """torch's conv2d + epilogue in float64 (autograd-capable)."""
    y = F.conv2d(
        x.double(), w.double(), None if b is None else b.double(), stride, padding, dilation, groups
    )
    if residual is not None:
        y = y + residual.double()
    return ACT[activation](y)


def ref_conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation):
    return F.conv_transpose2d(
        x.double(),
        w.double(),
        None if b is None else b.double(),
        stride,
        padding,
        output_padding,
        groups,
        dilation,
    )


def tol(dtype):
    """(atol, rtol) against float64: DESIGN §4 (fp32 ~1e-5 relative; bf16 inputs are rounded,
    the accumulation is float32, so the bound is bf16's own rounding of the output)."""
    return {
        torch.float64: (1e-10, 1e-10),
        torch.float32: (2e-5, 2e-5),
        torch.bfloat16: (2e-2, 2e-2),
        torch.float16: (5e-3, 5e-3),
    }[dtype]


def assert_close(actual, expected, dtype, scale=1.0):
    """actual vs the float64 expected, with tolerances relative to the tensor's magnitude (a
    conv output is a sum of many terms: elementwise relative error is meaningless near 0)."""
    atol, rtol = tol(dtype)
    mag = max(expected.abs().max().item(), 1.0) * scale
    torch.testing.assert_close(actual.double(), expected, atol=atol * mag, rtol=rtol)


def make(shape, dtype, channels_last=False, noncontig=False, grad=False, device="cpu"):
    """A random tensor in the given layout; `noncontig` makes a strided slice of a bigger one."""
    if noncontig:
        big = torch.randn(*shape[:-1], shape[-1] * 2, dtype=torch.float64)
        t = big.to(device=device, dtype=dtype)[..., ::2]
        assert not t.is_contiguous()
    else:
        t = torch.randn(shape, dtype=torch.float64).to(device=device, dtype=dtype)
    if channels_last:
        t = t.contiguous(memory_format=torch.channels_last)
    return t.requires_grad_(grad)
