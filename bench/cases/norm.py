"""Normalization cases: LayerNorm, RMSNorm, fused residual-add + norm, BatchNorm.

Every case runs in float32, with the norm issue's targets, and in bfloat16 beside it. The
baselines are the torch.nn.functional ops (for the fused ops, the add then the norm).
"""

import torch
import torch.nn.functional as F

import fastdl
from bench.cases import Case, Inputs, Target

EPS = 1e-5
RMS_EPS = 1e-6
TOKENS = (8192, 4096)  # (rows, hidden): a transformer's activations
FEATURES = (32, 64, 56, 56)  # (N, C, H, W): a ResNet stage's activations
DTYPES = (torch.float32, torch.bfloat16)


def _randn(shape, dtype, device, grad=False, memory_format=torch.contiguous_format):
    x = torch.randn(shape, device=device).to(dtype).contiguous(memory_format=memory_format)
    return x.requires_grad_(grad)


def _row_inputs(residual: bool, bias: bool):
    """Inputs (x[, residual], weight[, bias]) for the row norms: parameters of x's dtype."""

    def make(case: Case, device: torch.device) -> Inputs:
        torch.manual_seed(0)
        grad = case.mode == "fwd+bwd"
        n = case.shape[-1]
        args = [_randn(case.shape, case.dtype, device, grad)]
        if residual:
            args.append(_randn(case.shape, case.dtype, device, grad))
        args.append((1 + 0.1 * _randn(n, case.dtype, device)).requires_grad_(grad))
        if bias:
            args.append((0.1 * _randn(n, case.dtype, device)).requires_grad_(grad))
        return Inputs(tuple(args), _randn(case.shape, case.dtype, device) if grad else None)

    return make


def _bn_inputs(case: Case, device: torch.device) -> Inputs:
    """(x, weight, bias, running_mean, running_var): parameters in float32 for bf16 x."""
    torch.manual_seed(0)
    grad = case.mode == "fwd+bwd"
    fmt = torch.channels_last if case.variant == "channels_last" else torch.contiguous_format
    x = _randn(case.shape, case.dtype, device, grad, fmt)
    c = case.shape[1]
    p = torch.float32 if case.dtype in (torch.bfloat16, torch.float16) else case.dtype
    w = (1 + 0.1 * _randn(c, p, device)).requires_grad_(grad)
    b = (0.1 * _randn(c, p, device)).requires_grad_(grad)
    running = (torch.zeros(c, dtype=p, device=device), torch.ones(c, dtype=p, device=device))
    g = torch.randn_like(x) if grad else None
    return Inputs((x, w, b, *running), g)


def _layer_norm(x, w, b):
    return fastdl.layer_norm(x, x.shape[-1:], w, b, EPS)


def _layer_norm_torch(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b, EPS)


def _add_layer_norm(x, r, w, b):
    return fastdl.add_layer_norm(x, r, x.shape[-1:], w, b, EPS)


def _add_layer_norm_torch(x, r, w, b):
    s = x + r
    return F.layer_norm(s, s.shape[-1:], w, b, EPS), s


def _rms_norm(x, w):
    return fastdl.rms_norm(x, x.shape[-1:], w, RMS_EPS)


def _rms_norm_torch(x, w):
    return F.rms_norm(x, x.shape[-1:], w, RMS_EPS)


def _add_rms_norm(x, r, w):
    return fastdl.add_rms_norm(x, r, x.shape[-1:], w, RMS_EPS)


def _add_rms_norm_torch(x, r, w):
    s = x + r
    return F.rms_norm(s, s.shape[-1:], w, RMS_EPS), s


def _batch_norm(x, w, b, rm, rv):
    return fastdl.batch_norm(x, rm, rv, w, b, True, 0.1, EPS)


def _batch_norm_torch(x, w, b, rm, rv):
    return F.batch_norm(x, rm, rv, w, b, True, 0.1, EPS)


def _batch_norm_relu(x, w, b, rm, rv):
    return fastdl.batch_norm(x, rm, rv, w, b, True, 0.1, EPS, activation="relu")


def _batch_norm_relu_torch(x, w, b, rm, rv):
    return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, EPS))


def _fns(make, fastdl_fn, eager_fn) -> dict:
    return {"make": make, "fastdl": fastdl_fn, "eager": eager_fn}


_ln = _fns(_row_inputs(False, True), _layer_norm, _layer_norm_torch)
_add_ln = _fns(_row_inputs(True, True), _add_layer_norm, _add_layer_norm_torch)
_rms = _fns(_row_inputs(False, False), _rms_norm, _rms_norm_torch)
_add_rms = _fns(_row_inputs(True, False), _add_rms_norm, _add_rms_norm_torch)
_bn = _fns(_bn_inputs, _batch_norm, _batch_norm_torch)
_bn_relu = _fns(_bn_inputs, _batch_norm_relu, _batch_norm_relu_torch)

# (op, mode, shape, variant, traffic, target on float32, functions). Traffic: the forward
# reads x and writes out (2), the fused add also reads the residual and writes the sum (4);
# the backward reads x and grad_out and writes grad_input (3).
SPECS = (
    ("layer_norm", "fwd", TOKENS, "", 2, Target(eager=3.0, compile=2.5, peak=0.70), _ln),
    ("layer_norm", "fwd", (65536, 512), "", 2, Target(eager=3.0), _ln),
    ("rms_norm", "fwd", TOKENS, "", 2, Target(eager=5.0), _rms),
    ("add_layer_norm", "fwd", TOKENS, "", 4, Target(eager=3.0), _add_ln),
    ("add_rms_norm", "fwd", TOKENS, "", 4, None, _add_rms),
    ("layer_norm", "fwd+bwd", TOKENS, "", 5, Target(eager=2.0), _ln),
    ("batch_norm", "fwd+bwd", FEATURES, "", 5, Target(eager=2.0), _bn),
    ("batch_norm", "fwd+bwd", FEATURES, "channels_last", 5, Target(eager=2.0), _bn),
    ("batch_norm+relu", "fwd", FEATURES, "", 2, None, _bn_relu),
)

CASES = [
    Case(
        family="norm",
        op=op,
        mode=mode,
        shape=shape,
        dtype=dtype,
        traffic=traffic,
        variant=variant,
        target=target if dtype == torch.float32 else None,
        **fns,
    )
    for op, mode, shape, variant, traffic, target, fns in SPECS
    for dtype in DTYPES
]
