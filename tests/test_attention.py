"""Attention family: scaled_dot_product_attention and varlen_attention on every backend against
float64 references (tests/attention_ref.py and torch's own SDPA), forward and backward; masks,
causal/window bands in both alignments, GQA, dropout, odd shapes, strides, empty inputs, the
fully-masked-row table and bad inputs. opcheck/gradcheck/compile: test_attention_ops.py."""

import math

import attention_ref as ref
import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, dtype_id

import fastdl
from fastdl.ops import attention as A

# Triton joins these parametrizations once kernels/attention.py exists (A.TRITON not None).
ATT_BACKENDS = [b for b in BACKENDS if b.name == "native" or A.TRITON is not None]
on_backends = pytest.mark.parametrize("backend", ATT_BACKENDS, ids=str, indirect=True)


def _params(native, interpreted=None, dtypes=True):
    out = []
    for b in ATT_BACKENDS:
        for case in interpreted if b.interpreted and interpreted is not None else native:
            for dt in b.dtypes if dtypes else (None,):
                ident = "-".join(filter(None, (str(b), dt and dtype_id(dt), str(case))))
                out.append(pytest.param(b, dt, case, id=ident))
    return out


def _inputs(shape, dtype, dev, grad=True):
    b, hq, hk, sq, sk, d = shape
    q = torch.randn(b, hq, sq, d, dtype=dtype, device=dev)
    k = torch.randn(b, hk, sk, d, dtype=dtype, device=dev)
    v = torch.randn(b, hk, sk, d, dtype=dtype, device=dev)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _tol(dtype):
    return {torch.float64: 1e-10, torch.float32: 2e-5}.get(dtype)


def _check(ours, exact, lowp=None, dtype=torch.float32, what=""):
    """ours vs the float64 reference: fp32/fp64 within tolerance, half precision no worse than
    2x the error of torch's own computation in that dtype (``lowp``)."""
    err = (ours.double() - exact).abs().max().item() if exact.numel() else 0.0
    scale = max(exact.abs().max().item(), 1.0) if exact.numel() else 1.0
    if dtype in (torch.float32, torch.float64):
        assert err <= _tol(dtype) * scale, f"{what}: max error {err}"
    else:
        base = (lowp.double() - exact).abs().max().item()
        assert err <= 2 * base + 1e-6, f"{what}: max error {err} vs torch {base}"


def _run(q, k, v, g, **kw):
    out = fastdl.scaled_dot_product_attention(q, k, v, **kw)
    grads = torch.autograd.grad(out, (q, k, v), g, allow_unused=True)
    return out, grads


def _ref(q, k, v, g, mask=None, **kw):
    """float64 reference output and grads on the same (rounded) inputs."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    m = mask.double() if mask is not None and mask.dtype != torch.bool else mask
    out = ref.sdpa(q64, k64, v64, mask=m, **kw)
    return out, torch.autograd.grad(out, (q64, k64, v64), g.double())


def _torch_lowp(q, k, v, g, mask, causal, enable_gqa):
    """torch's SDPA in the low-precision dtype (only where torch has the same semantics)."""
    qq, kk, vv = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(
        qq, kk, vv, attn_mask=mask, is_causal=causal, enable_gqa=enable_gqa
    )
    return out, torch.autograd.grad(out, (qq, kk, vv), g)


# (B, Hq, Hkv, Sq, Sk, D), is_causal
SHAPES = [
    ((2, 4, 2, 77, 300, 59), False),
    ((1, 2, 2, 130, 130, 64), True),
    ((2, 3, 3, 3, 1, 40), False),
    ((1, 2, 1, 1, 257, 111), False),
    ((1, 1, 1, 113, 70, 256), True),
    ((3, 2, 2, 65, 65, 8), True),
]
SMALL = [((1, 2, 1, 13, 17, 16), False), ((1, 2, 2, 9, 9, 40), True)]


@pytest.mark.parametrize("backend,dtype,case", _params(SHAPES, SMALL), indirect=["backend"])
def test_sdpa_matches_torch(backend, dtype, case):
    shape, causal = case
    q, k, v = _inputs(shape, dtype, backend.device)
    g = torch.randn(shape[0], shape[1], shape[3], shape[5], dtype=dtype, device=backend.device)
    gqa = shape[1] != shape[2]
    out, grads = _run(q, k, v, g, is_causal=causal, enable_gqa=gqa)
    exact, exact_g = _ref(q, k, v, g, right=0 if causal else -1)
    # The reference is torch's own semantics: check it once against torch in float64.
    t64 = F.scaled_dot_product_attention(
        *(t.detach().double() for t in (q, k, v)), is_causal=causal, enable_gqa=gqa
    )
    assert torch.allclose(t64, exact, atol=1e-12)
    low = (
        _torch_lowp(q, k, v, g, None, causal, gqa)
        if dtype not in (torch.float32, torch.float64)
        else None
    )
    _check(out, exact, low and low[0], dtype, "out")
    assert out.shape == q.shape and out.dtype == dtype
    for i, name in enumerate("qkv"):
        _check(grads[i], exact_g[i], low and low[1][i], dtype, "grad_" + name)


MASKS = ["bool_full", "bool_bcast", "float_bcast", "float_2d", "bool_key_padding"]


def _mask(kind, b, h, sq, sk, dtype, dev):
    if kind == "bool_full":
        return torch.rand(b, h, sq, sk, device=dev) > 0.3
    if kind == "bool_bcast":
        return torch.rand(1, h, sq, 1, device=dev).expand(1, h, sq, sk) > -1
    if kind == "float_bcast":
        return torch.randn(b, 1, sq, sk, dtype=dtype, device=dev)
    if kind == "float_2d":
        return torch.randn(sq, sk, dtype=dtype, device=dev)
    m = torch.ones(b, 1, 1, sk, dtype=torch.bool, device=dev)
    m[..., sk // 2 :] = False
    return m


@pytest.mark.parametrize(
    "backend,dtype,case", _params(MASKS, MASKS[1:3], dtypes=True), indirect=["backend"]
)
def test_masks(backend, dtype, case):
    shape = (2, 2, 2, 37, 45, 24) if not backend.interpreted else (1, 2, 2, 9, 11, 16)
    b, h, _, sq, sk, _ = shape
    q, k, v = _inputs(shape, dtype, backend.device)
    mask = _mask(case, b, h, sq, sk, dtype, backend.device)
    g = torch.randn_like(q)
    out, grads = _run(q, k, v, g, attn_mask=mask)
    exact, exact_g = _ref(q, k, v, g, mask=mask)
    low = None
    if dtype not in (torch.float32, torch.float64):
        low = _torch_lowp(q, k, v, g, mask, False, False)
    _check(out, exact, low and low[0], dtype, "out")
    for i in range(3):
        _check(grads[i], exact_g[i], low and low[1][i], dtype, f"grad {i}")


@on_backends
@pytest.mark.parametrize("shape", [(2, 3, 5, 7), (3, 5, 7), (5, 7), (1, 1, 7), (2, 1, 5, 1)])
def test_float_mask_gradient(backend, shape):
    """The gradient of a learned additive bias, summed over its broadcast dims."""
    dev = backend.device
    q, k, v = _inputs((2, 3, 3, 5, 7, 16), torch.float32, dev)
    mask = torch.randn(shape, device=dev, requires_grad=True)
    g = torch.randn_like(q)
    out = fastdl.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=True)
    gm = torch.autograd.grad(out, mask, g)[0]
    m64 = mask.detach().double().requires_grad_()
    exact = ref.sdpa(*(t.detach().double() for t in (q, k, v)), mask=m64, right=0)
    exact_gm = torch.autograd.grad(exact, m64, g.double())[0]
    assert gm.shape == mask.shape
    _check(gm, exact_gm, dtype=torch.float32, what="grad_mask")


BANDS = [
    (-1, 0, "top_left"),
    (-1, 0, "bottom_right"),
    (4, 0, "top_left"),
    (3, 5, "bottom_right"),
    (0, 0, "top_left"),
    (70, -1, "top_left"),
]
# Sides near 2^31, where int32 index arithmetic wraps i + side (the Triton kernels returned zeros
# or zero key gradients).
HUGE_BANDS = [
    (2**31 - 1, 2**31 - 1, "top_left"),
    (2**31 - 1, 0, "bottom_right"),
    (3, 2**31 - 25, "top_left"),
]
BANDS += HUGE_BANDS


@pytest.mark.parametrize(
    "backend,dtype,case", _params(BANDS, BANDS[1:4] + HUGE_BANDS), indirect=["backend"]
)
def test_window_and_alignment(backend, dtype, case):
    left, right, align = case
    for sq, sk in ((40, 300), (300, 40)) if not backend.interpreted else ((7, 19), (19, 7)):
        q, k, v = _inputs((1, 2, 2, sq, sk, 32), dtype, backend.device)
        g = torch.randn_like(q)
        out, grads = _run(q, k, v, g, window=(left, right), causal_alignment=align)
        br = align == "bottom_right"
        exact, exact_g = _ref(q, k, v, g, left=left, right=right, bottom_right=br)
        low = None
        if dtype not in (torch.float32, torch.float64):
            allowed = ref.band(sq, sk, left, right, br, backend.device)
            low = _torch_lowp(q, k, v, g, allowed, False, False)
            low = (torch.nan_to_num(low[0]), [torch.nan_to_num(x) for x in low[1]])
        _check(out, exact, low and low[0], dtype, "out")
        for i in range(3):
            _check(grads[i], exact_g[i], low and low[1][i], dtype, f"grad {i}")


@on_backends
def test_fully_masked_rows(backend):
    """Rows with no allowed key: zeros out, zero (finite) gradients, as a small table."""
    dev = backend.device
    q, k, v = _inputs((1, 1, 1, 3, 2, 4), torch.float32, dev)
    mask = torch.tensor([[True, False], [False, False], [True, True]], device=dev)
    out, grads = _run(q, k, v, torch.ones_like(q), attn_mask=mask)
    assert torch.equal(out[0, 0, 1], torch.zeros(4, device=dev))
    torch.testing.assert_close(out[0, 0, 0], v[0, 0, 0].detach())
    assert all(torch.isfinite(gr).all() for gr in grads)
    assert torch.equal(grads[0][0, 0, 1], torch.zeros(4, device=dev))
    # Bottom-right causal with Sq > Sk: the first Sq - Sk rows see no key.
    q, k, v = _inputs((1, 1, 1, 5, 2, 4), torch.float32, dev)
    out, grads = _run(q, k, v, torch.ones_like(q), is_causal=True, causal_alignment="bottom_right")
    assert torch.equal(out[0, 0, :3], torch.zeros(3, 4, device=dev))
    assert all(torch.isfinite(gr).all() for gr in grads)
    # -inf float mask on a whole row.
    fm = torch.zeros(3, 2, device=dev)
    fm[1] = -math.inf
    q, k, v = _inputs((1, 1, 1, 3, 2, 4), torch.float32, dev)
    out = fastdl.scaled_dot_product_attention(q, k, v, attn_mask=fm)
    assert torch.equal(out[0, 0, 1], torch.zeros(4, device=dev))


@on_backends
@pytest.mark.parametrize("p", [0.0, 0.25, 0.9, 1.0])
def test_dropout(backend, p):
    dev = backend.device
    shape = (1, 2, 1, 9, 11, 16) if backend.interpreted else (2, 2, 1, 19, 23, 16)
    q, k, v = _inputs(shape, torch.float32, dev)
    g = torch.randn_like(q)
    out, grads = _run(q, k, v, g, dropout_p=p, seed=1234, enable_gqa=True, is_causal=True)
    exact, exact_g = _ref(q, k, v, g, p=p, seed=1234, right=0)
    _check(out, exact, what="out")
    for i in range(3):
        _check(grads[i], exact_g[i], what=f"grad {i}")
    again = fastdl.scaled_dot_product_attention(
        q, k, v, dropout_p=p, seed=1234, enable_gqa=True, is_causal=True
    )
    assert torch.equal(out, again)


@on_backends
def test_dropout_rate_and_seed(backend):
    """The draw keeps ~1 - p of the entries, and a new call draws a new mask."""
    dev = backend.device
    sq, sk = (16, 128) if backend.interpreted else (64, 256)
    q = torch.zeros(1, 1, sq, 8, device=dev)
    k = torch.zeros(1, 1, sk, 8, device=dev)
    v = torch.ones(1, 1, sk, 8, device=dev)
    # Uniform P = 1/sk: out = (kept count / sk) / (1 - p) per row.
    out = fastdl.scaled_dot_product_attention(q, k, v, dropout_p=0.4, seed=7)
    kept = out[0, 0, :, 0] * 0.6
    assert abs(kept.mean().item() - 0.6) < 0.03
    torch.manual_seed(1)
    a = fastdl.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    b = fastdl.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    torch.manual_seed(1)
    c = fastdl.scaled_dot_product_attention(q, k, v, dropout_p=0.4)
    assert not torch.equal(a, b) and torch.equal(a, c)


@on_backends
def test_strides_and_layouts(backend):
    """(B, S, H, D) transposed views, expanded K/V, 3-D and 5-D inputs."""
    dev = backend.device
    q = torch.randn(2, 11, 4, 24, device=dev).transpose(1, 2)
    k = torch.randn(2, 13, 2, 24, device=dev).transpose(1, 2)
    v = torch.randn(2, 24, 13, 2, device=dev).permute(0, 3, 2, 1)
    out = fastdl.scaled_dot_product_attention(q, k, v, enable_gqa=True)
    exact = ref.sdpa(q.double(), k.double(), v.double())
    _check(out, exact, what="transposed")
    ke = torch.randn(1, 1, 13, 24, device=dev).expand(2, 4, 13, 24)
    out = fastdl.scaled_dot_product_attention(q, ke, ke)
    _check(out, ref.sdpa(q.double(), ke.double(), ke.double()), what="expanded")
    q3, k3 = torch.randn(3, 7, 16, device=dev), torch.randn(3, 9, 16, device=dev)
    out = fastdl.scaled_dot_product_attention(q3, k3, k3, is_causal=True)
    _check(
        out,
        F.scaled_dot_product_attention(q3.double(), k3.double(), k3.double(), is_causal=True),
        what="3-D",
    )
    q5, k5 = torch.randn(2, 3, 2, 5, 8, device=dev), torch.randn(2, 3, 2, 6, 8, device=dev)
    m5 = torch.randn(3, 1, 5, 6, device=dev)
    out = fastdl.scaled_dot_product_attention(q5, k5, k5, attn_mask=m5)
    exact = F.scaled_dot_product_attention(q5.double(), k5.double(), k5.double(), m5.double())
    _check(out, exact, what="5-D")


@on_backends
@pytest.mark.parametrize("shared", ["k_heads", "v_heads", "k_batch", "k_heads_and_batch"])
def test_expanded_k_or_v_alone(backend, shared):
    """K (or V) expanded with stride 0 over heads or batch while the other is not: heads that
    share K's memory must not share its packed V (the CPU kernel once keyed its packed key
    blocks on K's pointer alone: errors of ~1 in the output). Sk = 300 spans several key
    blocks; forward and every gradient against float64, and varlen with such a K."""
    dev = backend.device
    # One head when K is shared over the batch: consecutive tasks then share K whatever the
    # order threads claim them in.
    b, h, sq, sk, d = 2, 1 if shared == "k_batch" else 3, 9, 300, 8
    expand = {"k_heads": (b, 1), "v_heads": (b, 1), "k_batch": (1, h), "k_heads_and_batch": (1, 1)}
    small = torch.randn(*expand[shared], sk, d, device=dev, requires_grad=True)
    full = torch.randn(b, h, sk, d, device=dev, requires_grad=True)
    q = torch.randn(b, h, sq, d, device=dev, requires_grad=True)
    k, v = (
        (small.expand(b, h, sk, d), full)
        if shared != "v_heads"
        else (full, small.expand(b, h, sk, d))
    )
    leaves = [t.detach().double().requires_grad_() for t in (q, small, full)]
    k64, v64 = (
        (leaves[1].expand(b, h, sk, d), leaves[2])
        if shared != "v_heads"
        else (leaves[2], leaves[1].expand(b, h, sk, d))
    )
    for causal in (False, True):
        out = fastdl.scaled_dot_product_attention(q, k, v, is_causal=causal)
        exact = F.scaled_dot_product_attention(leaves[0], k64, v64, is_causal=causal)
        _check(out, exact, what="expanded")
        g = torch.randn(exact.shape, device=dev, dtype=torch.float64)
        got = torch.autograd.grad(out, (q, small, full), g.float())
        want = torch.autograd.grad(exact, leaves, g)
        for a, e in zip(got, want, strict=True):
            _check(a, e, what="expanded gradient")
    # varlen: tokens (T, H, D) with K's heads expanded, one sequence (its heads are consecutive
    # tasks sharing K)
    cu = torch.tensor([0, 9], device=dev)
    qv = torch.randn(9, 3, d, device=dev)
    kv = torch.randn(9, 1, d, device=dev).expand(9, 3, d)
    vv = torch.randn(9, 3, d, device=dev)
    out = fastdl.varlen_attention(qv, kv, vv, cu, cu, 9, 9)
    dense = fastdl.varlen_attention(qv, kv.contiguous(), vv, cu, cu, 9, 9)
    torch.testing.assert_close(out, dense)


@on_backends
@pytest.mark.parametrize(
    "q_shape,kv_shape",
    [
        ((2, 2, 5, 8), (1, 2, 6, 8)),
        ((1, 2, 5, 8), (3, 2, 6, 8)),
        ((3, 5, 8), (1, 6, 8)),
        ((2, 3, 2, 5, 8), (1, 3, 2, 6, 8)),
    ],
    ids=["kv_batch1", "q_batch1", "3d", "5d"],
)
def test_batch_broadcast(backend, q_shape, kv_shape):
    # The batch dims broadcast as in torch's sdpa; gradients sum over the broadcast.
    dev = backend.device
    q = torch.randn(q_shape, device=dev, requires_grad=True)
    k, v = (torch.randn(kv_shape, device=dev, requires_grad=True) for _ in range(2))
    out = fastdl.scaled_dot_product_attention(q, k, v, is_causal=True)
    leaves = [t.detach().double().requires_grad_() for t in (q, k, v)]
    exact = F.scaled_dot_product_attention(*leaves, is_causal=True)
    _check(out, exact, what="broadcast")
    g = torch.randn(exact.shape, device=dev, dtype=torch.float64)
    for got, want in zip(
        torch.autograd.grad(out, (q, k, v), g.float()),
        torch.autograd.grad(exact, leaves, g),
        strict=True,
    ):
        _check(got, want, what="broadcast gradient")


@on_backends
@pytest.mark.parametrize("shape", [(0, 2, 2, 5, 5, 8), (2, 2, 2, 0, 5, 8), (2, 2, 2, 5, 0, 8)])
def test_empty(backend, shape):
    q, k, v = _inputs(shape, torch.float32, backend.device)
    out = fastdl.scaled_dot_product_attention(q, k, v)
    assert out.shape == q.shape
    assert torch.equal(out, torch.zeros_like(out))  # no key: zeros (torch gives NaN for Sk=0)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert all(gr.shape == t.shape and not gr.any() for gr, t in zip(grads, (q, k, v), strict=True))


# ---------------------------------------------------------------- varlen

VARLEN = [
    (((5, 0, 70, 130), (7, 3, 70, 1)), False, -1),
    (((64, 65, 1), (64, 65, 200)), True, -1),
    (((33, 17), (33, 17)), True, 8),
]


@pytest.mark.parametrize(
    "backend,dtype,case", _params(VARLEN, [(((5, 3), (4, 6)), True, 2)]), indirect=["backend"]
)
def test_varlen(backend, dtype, case):
    (lq, lk), causal, left = case
    dev = backend.device
    hq, hk, d = 4, 2, 40
    q = torch.randn(sum(lq), hq, d, dtype=dtype, device=dev, requires_grad=True)
    k = torch.randn(sum(lk), hk, d, dtype=dtype, device=dev, requires_grad=True)
    v = torch.randn(sum(lk), hk, d, dtype=dtype, device=dev, requires_grad=True)
    cu_q = torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32, device=dev)
    cu_k = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], device=dev)
    kw = {"is_causal": causal, "window": (left, -1), "causal_alignment": "bottom_right"}
    out = fastdl.varlen_attention(
        q, k, v, cu_q, cu_k, max(lq), max(lk), dropout_p=0.2, seed=3, **kw
    )
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g)
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    exact = ref.varlen(
        q64,
        k64,
        v64,
        cu_q.cpu(),
        cu_k.cpu(),
        left=left,
        right=0 if causal else -1,
        bottom_right=True,
        p=0.2,
        seed=3,
    )
    exact_g = torch.autograd.grad(exact, (q64, k64, v64), g.double())
    if dtype in (torch.float32, torch.float64):
        _check(out, exact, dtype=dtype, what="out")
        for i in range(3):
            _check(grads[i], exact_g[i], dtype=dtype, what=f"grad {i}")
    else:  # no torch varlen to compare with: the bf16/fp16 rounding of the output itself
        assert (out.double() - exact).abs().max() <= 2 * 2**-7 * exact.abs().max() + 1e-3


# ---------------------------------------------------------------- bad inputs


def _bad(dev):
    q, k, v = (torch.randn(1, 2, 4, 8, device=dev) for _ in range(3))
    return q, k, v


@on_backends
def test_bad_inputs(backend):
    dev = backend.device
    sdpa = fastdl.scaled_dot_product_attention
    q, k, v = _bad(dev)
    with pytest.raises(RuntimeError, match="rank"):
        sdpa(q, k[0], v)
    with pytest.raises(RuntimeError, match="same head_dim"):
        sdpa(q, k[..., :4], v)
    big = torch.randn(1, 1, 2, 300, device=dev)
    with pytest.raises(RuntimeError, match=r"head_dim must be in \[1, 256\]"):
        sdpa(big, big, big)
    with pytest.raises(RuntimeError, match="enable_gqa"):
        sdpa(torch.randn(1, 3, 4, 8, device=dev), k, v)
    with pytest.raises(RuntimeError, match="multiple of the number of key/value heads"):
        sdpa(torch.randn(1, 3, 4, 8, device=dev), k, v, enable_gqa=True)
    with pytest.raises(RuntimeError, match="batch dims of query, key and value must broadcast"):
        q5, k5 = torch.randn(2, 3, 2, 5, 8, device=dev), torch.randn(3, 2, 2, 6, 8, device=dev)
        sdpa(q5, k5, k5)
    with pytest.raises(RuntimeError, match="not broadcastable"):
        sdpa(q, k, v, attn_mask=torch.ones(3, 4, dtype=torch.bool, device=dev))
    with pytest.raises(TypeError, match="attn_mask has dtype"):
        sdpa(q, k, v, attn_mask=torch.ones(4, 4, dtype=torch.int32, device=dev))
    for p in (-0.1, 1.5, math.nan):
        with pytest.raises(ValueError, match="dropout_p must be in"):
            sdpa(q, k, v, dropout_p=p)
    with pytest.raises(TypeError, match="k has dtype"):
        sdpa(q, k.double(), v)
    with pytest.raises(TypeError, match="supported dtypes"):
        sdpa(q.int(), k.int(), v.int())
    with pytest.raises(ValueError, match="causal_alignment"):
        sdpa(q, k, v, is_causal=True, causal_alignment="center")
    for window in ((1, 2, 3), (1,), 4, (1.5, 0)):
        with pytest.raises(TypeError, match="window must be a pair of ints"):
            sdpa(q, k, v, window=window)
    with pytest.raises(RuntimeError, match="same device"):
        sdpa(q, k.to("meta"), v)


@on_backends
def test_bad_varlen(backend):
    dev = backend.device
    q = torch.randn(6, 2, 8, device=dev)
    ok = torch.tensor([0, 2, 6], dtype=torch.int32, device=dev)

    def call(cu_q, cu_k=ok, mq=4, mk=4):
        return fastdl.varlen_attention(q, q, q, cu_q, cu_k, mq, mk)

    with pytest.raises(TypeError, match="cu_seqlens_q has dtype"):
        call(ok.float())
    with pytest.raises(RuntimeError, match="must start at 0"):
        call(torch.tensor([1, 2, 6], dtype=torch.int32, device=dev))
    with pytest.raises(RuntimeError, match="non-decreasing"):
        call(torch.tensor([0, 4, 3, 6], device=dev), torch.tensor([0, 2, 4, 6], device=dev))
    with pytest.raises(RuntimeError, match="must end at the number of tokens 6"):
        call(torch.tensor([0, 2, 5], device=dev))
    with pytest.raises(RuntimeError, match="above max_seqlen"):
        call(ok, mq=3)
    with pytest.raises(RuntimeError, match="same length"):
        call(torch.tensor([0, 6], device=dev))
