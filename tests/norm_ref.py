"""Float64 references and the comparison rule of DESIGN §4, shared by the norm tests."""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import fastdl

# float32/float64 kernels: relative to the float64 reference, atol scaled to its magnitude.
TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# Where a result cancels (a zero-variance or single-element row), no evaluation order can beat a
# few roundings of the terms it sums: `cond` (the sum of their magnitudes) times this, in units
# of the compute precision.
ROUNDINGS = 4


def assert_matches(actual, ref, baseline=None, name="tensor", cond=None):
    """``actual`` against the float64 ``ref``, elementwise. float32/float64: within TOL relative
    (atol scaled to the reference's largest magnitude). bfloat16/float16: no worse than 2x the
    max error of ``baseline``, PyTorch's own result in that dtype (the FlashAttention rule), and
    never held to less than one unit of rounding of that dtype at the reference's magnitude.
    ``cond``: the magnitudes of the terms behind each element (see ROUNDINGS)."""
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a, r = actual.detach().cpu().double(), ref.detach().cpu().double()
    if r.numel() == 0:
        return
    scale = max(r.abs().max().item(), 1e-3)
    compute = torch.float64 if actual.dtype == torch.float64 else torch.float32
    slack = 0.0 if cond is None else ROUNDINGS * torch.finfo(compute).eps * cond.cpu().double()
    err = (a - r).abs()
    if actual.dtype in TOL:
        allowed = TOL[actual.dtype] * (r.abs() + scale) + slack
        rule = f"rtol=atol/{scale:.3g}={TOL[actual.dtype]}"
    else:
        assert baseline is not None, f"{name}: a {actual.dtype} result needs torch's as baseline"
        torch_err = (baseline.detach().cpu().double() - r).abs().max().item()
        allowed = max(2 * torch_err, torch.finfo(actual.dtype).eps * scale) + slack
        rule = f"2x torch's own {actual.dtype} error {torch_err:.3g}"
    bad = ~(err <= allowed)  # NaN counts as bad
    if bad.any():
        i = int(torch.nonzero(bad.flatten())[0])
        excess = (err - allowed).flatten()
        worst = int(torch.nan_to_num(excess, nan=float("inf")).argmax())
        raise AssertionError(
            f"{name}: {int(bad.sum())}/{bad.numel()} elements off ({rule}); first at flat index "
            f"{i}: got {a.flatten()[i].item():.6g}, expected {r.flatten()[i].item():.6g}; worst at "
            f"{worst}: error {err.flatten()[worst].item():.3g} > "
            f"allowed {torch.as_tensor(allowed).expand_as(err).flatten()[worst].item():.3g}"
        )


def fwd_bwd(fn: Callable, args: Sequence, grad_outs: Sequence[torch.Tensor]):
    """fn(*args) and the gradients of sum(out_i * grad_outs[i]) w.r.t. the args that require
    grad (in order)."""
    outs = fn(*args)
    outs = outs if isinstance(outs, tuple) else (outs,)
    wrt = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    grads = torch.autograd.grad(
        outs, wrt, [g.to(o.dtype) for o, g in zip(outs, grad_outs, strict=True)]
    )
    return outs, grads


def leaves(args: Sequence, dtype: torch.dtype | None = None, grad: bool = True) -> list:
    """Detached copies of the tensor args (cast to dtype), as leaves requiring grad."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            a = a.detach() if dtype is None else a.detach().to(dtype)
            a.requires_grad_(grad and a.is_floating_point())
        out.append(a)
    return out


@dataclass(frozen=True)
class Kind:
    """A LayerNorm/RMSNorm variant: fastdl's function and torch's, both called as
    ``f(x, residual, weight, bias, normalized_shape, eps)`` and returning a tuple."""

    name: str
    residual: bool
    bias: bool
    ours: Callable
    torch: Callable

    def __str__(self) -> str:
        return self.name


KINDS = (
    Kind(
        "layer_norm",
        residual=False,
        bias=True,
        ours=lambda x, r, w, b, s, eps: (fastdl.layer_norm(x, s, w, b, eps),),
        torch=lambda x, r, w, b, s, eps: (F.layer_norm(x, s, w, b, eps),),
    ),
    Kind(
        "add_layer_norm",
        residual=True,
        bias=True,
        ours=lambda x, r, w, b, s, eps: fastdl.add_layer_norm(x, r, s, w, b, eps),
        torch=lambda x, r, w, b, s, eps: (F.layer_norm(x + r, s, w, b, eps), x + r),
    ),
    Kind(
        "rms_norm",
        residual=False,
        bias=False,
        ours=lambda x, r, w, b, s, eps: (fastdl.rms_norm(x, s, w, eps),),
        torch=lambda x, r, w, b, s, eps: (F.rms_norm(x, s, w, eps),),
    ),
    Kind(
        "add_rms_norm",
        residual=True,
        bias=False,
        ours=lambda x, r, w, b, s, eps: fastdl.add_rms_norm(x, r, s, w, eps),
        torch=lambda x, r, w, b, s, eps: (F.rms_norm(x + r, s, w, eps), x + r),
    ),
)
KIND = {k.name: k for k in KINDS}


def norm_inputs(kind, shape, normalized_shape, dtype, device, weight=True, bias=True, pdtype=None):
    """x (mean 1, std 2, so LayerNorm's centring matters), residual, weight ~ 1, bias ~ 0."""
    pdtype = pdtype or dtype
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).to(dtype).to(device)
    r = torch.randn(shape, dtype=dtype, device=device) if kind.residual else None
    w = (1 + 0.5 * torch.randn(normalized_shape)).to(pdtype).to(device) if weight else None
    use_bias = bias and kind.bias
    b = (0.5 * torch.randn(normalized_shape)).to(pdtype).to(device) if use_bias else None
    return x, r, w, b


def _norm_conds(kind, s, w, b, g, g_sum, n, eps):
    """The term magnitudes (see ROUNDINGS) behind out, grad x, grad weight, grad bias, in float64:
    rounding s (or s - mean) is amplified by rstd * max|s| in each row."""
    rows, g = s.detach().reshape(-1, n), g.detach().double().reshape(-1, n)
    w = g.new_ones(n) if w is None else w.detach().double().reshape(n)
    b = g.new_zeros(n) if b is None else b.detach().double().reshape(n)
    centred = rows - rows.mean(-1, keepdim=True) if kind.bias else rows
    rstd = (centred.square().mean(-1, keepdim=True) + eps).rsqrt()
    xhat = (centred * rstd).abs()
    amp = rstd * rows.abs().amax(-1, keepdim=True)
    wg = (w * g).abs()
    m_wg, m_wgx = wg.mean(-1, keepdim=True), (wg * xhat).mean(-1, keepdim=True)
    dx = rstd * (wg + m_wg + xhat * m_wgx + amp * (m_wgx + xhat * m_wg))
    if g_sum is not None:
        dx = dx + g_sum.detach().double().reshape(-1, n).abs()
    return {
        "out": (amp * w.abs() + b.abs()).reshape(s.shape),
        "x": dx.reshape(s.shape),
        "weight": (g.abs() * (xhat + amp)).sum(0),
        "bias": g.abs().sum(0),
    }


def check_norm(kind, x, r, w, b, normalized_shape, eps, ref_eps=None):
    """Runs ``kind`` forward and backward on (x, r, w, b) (views and strides as given) and checks
    every output and gradient against the float64 reference; for bfloat16/float16 against 2x the
    error of torch's own op in that dtype. ``ref_eps``: the eps the reference uses (when eps is
    None for RMSNorm). The reference normalizes the sum x + residual as the op returns it, in x's
    dtype (what torch's unfused ops do too), with the identity as its gradient."""
    ref_eps = eps if ref_eps is None else ref_eps
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    n = math.prod(shape)
    names = ("x", "residual", "weight", "bias")
    args = [t.detach().requires_grad_() if t is not None else None for t in (x, r, w, b)]
    grad_outs = [
        torch.randn(x.shape, dtype=x.dtype, device=x.device) for _ in range(1 + kind.residual)
    ]
    outs, grads = fwd_bwd(lambda *a: kind.ours(*a, normalized_shape, eps), args, grad_outs)

    def reference(x, r, w, b):
        if r is not None:
            s = x + r
            x, r = s + (s.to(args[0].dtype).double() - s).detach(), torch.zeros_like(s)
        return kind.torch(x, r, w, b, shape, ref_eps)

    ref_args = [None if t is None else t.detach().double().requires_grad_() for t in args]
    ref_outs, ref_grads = fwd_bwd(reference, ref_args, grad_outs)
    base_outs, base_grads = [None] * len(outs), [None] * len(grads)
    if x.dtype not in TOL:  # torch's own op, parameters in x's dtype
        base_args = [None if t is None else t.detach().to(x.dtype).requires_grad_() for t in args]
        base_outs, base_grads = fwd_bwd(
            lambda *a: kind.torch(*a, shape, ref_eps), base_args, grad_outs
        )

    s64 = ref_outs[1] if kind.residual else ref_args[0]
    g_sum = grad_outs[1] if kind.residual else None
    conds = _norm_conds(kind, s64, w, b, grad_outs[0], g_sum, n, ref_eps)
    conds["residual"] = conds["x"]
    conds["weight"], conds["bias"] = (
        None if t is None else conds[k].reshape(t.shape) for k, t in (("weight", w), ("bias", b))
    )
    for i, (o, ro, bo) in enumerate(zip(outs, ref_outs, base_outs, strict=True)):
        assert o.dtype == x.dtype and o.device == x.device, f"output {i}: {o.dtype} {o.device}"
        assert o.is_contiguous(), f"output {i} is not contiguous"
        cond = conds["out"] if i == 0 else None
        assert_matches(o, ro, bo, name=f"{kind} output {i}", cond=cond)
    if kind.residual:
        assert torch.equal(outs[1], x + r), "sum output != x + residual"
    got = [n for n, t in zip(names, args, strict=True) if t is not None]
    for name, g, rg, bg in zip(got, grads, ref_grads, base_grads, strict=True):
        t = args[names.index(name)]
        assert g.dtype == t.dtype and g.shape == t.shape, f"grad {name}: {g.dtype} {g.shape}"
        assert_matches(g, rg, bg, name=f"{kind} grad {name}", cond=conds[name])
    return outs


# ---------------------------------------------------------------- batch norm


def bn_ours(x, w, b, rm, rv, training, momentum, eps, relu):
    act = "relu" if relu else None
    return fastdl.batch_norm(x, rm, rv, w, b, training, momentum, eps, activation=act)


def bn_torch(x, w, b, rm, rv, training, momentum, eps, relu):
    y = F.batch_norm(x, rm, rv, w, b, training, momentum, eps)
    return F.relu(y) if relu else y


def bn_inputs(shape, dtype, device, pdtype=None, memory_format=torch.contiguous_format):
    """x (mean 0.5, std 2), weight ~ 1, bias ~ 0, running_mean ~ 0, running_var in [0.5, 1.5]."""
    pdtype = pdtype or dtype
    c = shape[1]
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 0.5).to(dtype).to(device)
    x = x.contiguous(memory_format=memory_format)
    w = (1 + 0.5 * torch.randn(c)).to(pdtype).to(device)
    b = (0.5 * torch.randn(c)).to(pdtype).to(device)
    rm = (0.3 * torch.randn(c)).to(pdtype).to(device)
    rv = (0.5 + torch.rand(c)).to(pdtype).to(device)
    return x, w, b, rm, rv


def _bn_conds(x, w, b, rm, rv, g, training, eps):
    """As _norm_conds, per channel."""
    c = x.shape[1]
    view = (1, c) + (1,) * (x.dim() - 2)
    dims = [d for d in range(x.dim()) if d != 1]
    x, g = x.detach().double(), g.detach().double()
    if training:
        var, mean = torch.var_mean(x, dims, correction=0) if x.numel() else (x.new_ones(c),) * 2
    else:
        mean, var = rm.double(), rv.double()
    invstd = (var + eps).rsqrt().view(view)
    w = x.new_ones(view) if w is None else w.detach().double().view(view)
    b = x.new_zeros(view) if b is None else b.detach().double().view(view)
    xhat = ((x - mean.view(view)) * invstd).abs()
    top = x.abs().amax(dims, keepdim=True) if x.numel() else 0
    amp = invstd * (top + mean.abs().view(view))
    ga = g.abs()
    dx = w.abs() * invstd * ga
    if training and x.numel():
        m_g, m_gx = ga.mean(dims, keepdim=True), (ga * xhat).mean(dims, keepdim=True)
        dx = w.abs() * invstd * (ga + m_g + xhat * m_gx + amp * (m_gx + xhat * m_g))
    return {
        "out": amp * w.abs() + b.abs(),
        "x": dx,
        "weight": (ga * (xhat + amp)).sum(dims),
        "bias": ga.sum(dims),
    }


def check_bn(x, w, b, rm, rv, training, relu, momentum=0.1, eps=1e-5):
    """Forward, backward (x, weight, bias) and the updated running statistics against F.batch_norm
    in float64 (bfloat16/float16: against 2x torch's own error in that dtype)."""
    g = torch.randn(x.shape, dtype=x.dtype, device=x.device)
    stats = [None if t is None else t.clone() for t in (rm, rv)]
    args = [t.detach().requires_grad_() if t is not None else None for t in (x, w, b)]
    (out,), grads = fwd_bwd(
        lambda *a: bn_ours(*a, *stats, training, momentum, eps, relu), args, [g]
    )

    ref_stats = [None if t is None else t.double() for t in (rm, rv)]
    ref_args = [t.detach().double().requires_grad_() if t is not None else None for t in args]
    (ref,), ref_grads = fwd_bwd(
        lambda *a: bn_torch(*a, *ref_stats, training, momentum, eps, relu), ref_args, [g]
    )
    base, base_grads, base_stats = None, [None] * len(grads), [None, None]
    if x.dtype not in TOL:
        base_stats = [None if t is None else t.clone() for t in (rm, rv)]
        base_args = [t.detach().requires_grad_() if t is not None else None for t in args]
        (base,), base_grads = fwd_bwd(
            lambda *a: bn_torch(*a, *base_stats, training, momentum, eps, relu), base_args, [g]
        )
    conds = _bn_conds(x, w, b, rm, rv, g, training, eps)
    assert out.dtype == x.dtype and out.shape == x.shape
    assert_matches(out, ref, base, "batch_norm output", conds["out"])
    names = ("x", "weight", "bias")
    present = [n for n, t in zip(names, args, strict=True) if t is not None]
    for name, gr, rg, bg in zip(present, grads, ref_grads, base_grads, strict=True):
        assert gr.dtype == args[names.index(name)].dtype
        assert_matches(gr, rg, bg, f"batch_norm grad {name}", conds[name])
    for name, s, rs, bs, before in zip(
        ("running_mean", "running_var"), stats, ref_stats, base_stats, (rm, rv), strict=True
    ):
        if s is None:
            continue
        assert s.dtype == before.dtype
        if training and x.numel() > 0:
            assert_matches(s, rs, bs, name)
        else:
            assert torch.equal(s, before), f"{name} changed"
    return out
