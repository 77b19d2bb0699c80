"""float64 references of the graph ops, written with dense torch ops on the COO edge list, and
random test graphs."""

import math

import torch

# Relative error bounds (max |out - ref| / max(|ref|, 1)) per dtype: one rounding of the output
# for bfloat16/float16 (fp32 accumulation), fp32 summation error otherwise.
TOL = {torch.float64: 1e-12, torch.float32: 2e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


def random_graph(n, e, self_loops=True, sorted_=False, skew=False, seed=0):
    """edge_index (2, e) int64 on n nodes, on torch's default device (drawn on the CPU, so the
    same graph everywhere); with skew, destinations follow a power law."""
    g = torch.Generator().manual_seed(seed)
    cpu = {"generator": g, "device": "cpu"}
    src = torch.randint(0, max(n, 1), (e,), **cpu)
    if skew:
        dst = (torch.rand(e, **cpu) ** 3 * n).long().clamp_max(n - 1)
    else:
        dst = torch.randint(0, max(n, 1), (e,), **cpu)
    if not self_loops and n > 1:
        dst = torch.where(dst == src, (dst + 1) % n, dst)
    ei = torch.stack([src, dst])
    if sorted_:
        ei = ei[:, torch.argsort(dst, stable=True)]
    return ei.to(torch.get_default_device())


def close(out, ref, dtype, what=""):
    assert out.shape == ref.shape, f"{what}: shape {list(out.shape)} vs {list(ref.shape)}"
    if ref.numel() == 0:
        return
    err = (out.double() - ref.double()).abs().max().item()
    scale = max(ref.double().abs().max().item(), 1.0)
    assert err / scale <= TOL[dtype], f"{what}: relative error {err / scale:.3g} > {TOL[dtype]}"


def spmm_ref(edge_index, n, x, w=None, reduce="sum"):
    src, dst = edge_index
    msg = x[src].reshape(src.numel(), math.prod(x.shape[1:]))
    if w is not None:
        msg = msg * w[:, None]
    out = torch.zeros(n, msg.shape[1], dtype=msg.dtype)
    red = {"sum": "sum", "mean": "mean", "max": "amax", "min": "amin"}[reduce]
    idx = dst[:, None].expand_as(msg)
    out = out.scatter_reduce(0, idx, msg, red, include_self=False)
    return out.reshape(n, *x.shape[1:])


def gcn_ref(edge_index, n, x, w=None, eps=None, fill=1.0):
    src, dst = edge_index
    w = torch.ones(src.numel(), dtype=x.dtype) if w is None else w
    deg = torch.zeros(n, dtype=x.dtype).index_add(0, dst, w) + fill
    dinv = deg.pow(-0.5)
    coef = dinv[dst] * w * dinv[src]
    out = torch.zeros_like(x).index_add(0, dst, coef[:, None] * x[src])
    self_w = fill * (1 + eps) if eps is not None else fill
    return out + (self_w * dinv.square())[:, None] * x


def gat_ref(edge_index, n, h, att_src, att_dst, slope=0.2):
    src, dst = edge_index
    heads, f = h.shape[1], h.shape[2]
    a_s = (h * att_src.reshape(heads, f)).sum(-1)
    a_d = (h * att_dst.reshape(heads, f)).sum(-1)
    z = torch.nn.functional.leaky_relu(a_s[src] + a_d[dst], slope)
    idx = dst[:, None].expand_as(z)
    m = torch.full((n, heads), -torch.inf, dtype=z.dtype).scatter_reduce(
        0, idx, z, "amax", include_self=True
    )
    ex = (z - m[dst]).exp()
    den = torch.zeros(n, heads, dtype=z.dtype).index_add(0, dst, ex)
    alpha = ex / den[dst]
    return torch.zeros_like(h).index_add(0, dst, alpha[:, :, None] * h[src])


def sddmm_ref(edge_index, a, b):
    src, dst = edge_index
    return (a[src] * b[dst]).sum(-1)


def leaf(t, dtype):
    return t.to(dtype).requires_grad_(True)


def run_grads(fn, inputs, grad_out):
    out = fn(*inputs)
    wrt = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    grads = torch.autograd.grad(out, wrt, grad_out.to(out.dtype), allow_unused=True)
    return out, grads


def compare(fast, ref, inputs, grad_out, dtype, what):
    out, grads = run_grads(fast, inputs, grad_out)
    ref_inputs = [
        t.detach().double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t
        for t in inputs
    ]
    rout, rgrads = run_grads(ref, ref_inputs, grad_out.double())
    assert out.dtype == dtype
    close(out, rout, dtype, f"{what} out")
    for k, (g, rg) in enumerate(zip(grads, rgrads, strict=True)):
        close(g, rg, dtype, f"{what} grad {k}")
