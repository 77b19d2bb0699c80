"""Host launchers of the norm family's Triton kernels (kernels/norm_jit.py), registered by
fastdl/ops/norm.py as the ``fastdl::<op>_triton`` custom ops: each launcher's annotations are its
op's schema, matching csrc/ops.cpp. They check their inputs (fastdl/_checks.py), allocate the
outputs the fake kernels describe, pick block sizes and launch. Also AOT, the configurations
tests/test_gpu_build.py compiles ahead of time.
"""

import functools
import math
from dataclasses import dataclass

import torch
import triton

from fastdl import _checks, _ext

from . import norm_jit as jit

DTYPES = (torch.float32, torch.float16, torch.bfloat16)

# A row up to this many elements is normalized from registers in one pass over memory: 32 values
# per thread at 16 warps in the forward. The backward keeps x, dy, w, w*dy and the two gradient
# accumulators live across the row reductions: at 16 values per thread (8192 at 16 warps) ptxas
# spills on sm_80 and sm_90, hence its smaller bound and more warps per element.
MAX_FWD_BLOCK = 16384
MAX_BWD_BLOCK = 4096
FWD_PER_THREAD = 16
BWD_PER_THREAD = 8
# Longer rows are walked in chunks of this size, in two passes (the second one's reads hit L2).
CHUNK = 4096
# Elements per BatchNorm tile: 16 fp32 values per thread at 8 warps.
BN_TILE = 4096


def _require_runnable(op: str, x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not _ext.TRITON_INTERPRET:
        raise RuntimeError(
            f"{op}: the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before "
            f"importing fastdl, for CPU tensors), got x on {x.device}"
        )


def _stats_arg(op: str, name: str, t: torch.Tensor, x: torch.Tensor, numel: int) -> None:
    _checks.same_device(op, name, t, x)
    _checks.dtype(op, name, t, (torch.float32,))
    if t.numel() != numel:
        raise RuntimeError(f"{op}: {name} must have {numel} elements, got shape {list(t.shape)}")


def _like_x(op: str, name: str, t: torch.Tensor | None, x: torch.Tensor) -> None:
    if t is not None:
        _checks.same_device(op, name, t, x)
        _checks.same_shape(op, name, t, x)
        _checks.dtype(op, name, t, (x.dtype,))


def _ptr(t: torch.Tensor | None, dummy: torch.Tensor) -> torch.Tensor:
    # An absent (or empty) tensor is never read: its constexpr flag is off. Any pointer will do.
    return dummy if t is None or t.numel() == 0 else t.contiguous()


@functools.cache
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # the interpreter: a few programs, enough to exercise the partial-sum stages


def _warps(block: int, per_thread: int) -> int:
    return min(16, max(4, block // (32 * per_thread)))


def _row_block(n: int, max_block: int) -> tuple[int, bool]:
    block = triton.next_power_of_2(n)
    return (block, True) if block <= max_block else (CHUNK, False)


def _sum_rows(partials: torch.Tensor) -> torch.Tensor:
    rows, n = partials.shape
    out = partials.new_empty(n)
    jit.sum_rows_kernel[(triton.cdiv(n, 128),)](partials, out, rows, n, BLOCK_R=16, BLOCK_N=128)
    return out


def _norm_fwd(op, x, residual, weight, bias, n, eps, is_rms):
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    _checks.normalized_numel(op, x, n)
    _like_x(op, "residual", residual, x)
    _checks.param(op, "weight", weight, x, n)
    _checks.param(op, "bias", bias, x, n)
    _checks.positive_eps(op, eps)
    x = x.contiguous()
    rows = x.numel() // n
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    s = torch.empty_like(out) if residual is not None else x.new_empty(0)
    mean = x.new_empty(rows, dtype=torch.float32)
    rstd = x.new_empty(rows, dtype=torch.float32)
    if rows:
        block, one_block = _row_block(n, MAX_FWD_BLOCK)
        jit.norm_fwd_kernel[(rows,)](
            x, _ptr(residual, x), _ptr(weight, x), _ptr(bias, x), out, _ptr(s, out), mean, rstd,
            n, eps, IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, BLOCK=block,
            ONE_BLOCK=one_block, num_warps=_warps(block, FWD_PER_THREAD),
        )  # fmt: skip
    return out, s, mean, rstd


def _norm_bwd(op, grad_out, grad_sum, input, mean, rstd, weight, n, want_dw, want_db, is_rms):
    _checks.dtype(op, "input", input, DTYPES)
    _require_runnable(op, input)
    _checks.normalized_numel(op, input, n)
    rows = input.numel() // n
    _like_x(op, "grad_out", grad_out, input)
    _like_x(op, "grad_sum", grad_sum, input)
    for name, t in (("mean", mean), ("rstd", rstd)):
        if t is not None:
            _stats_arg(op, name, t, input, rows)
    _checks.param(op, "weight", weight, input, n)
    input = input.contiguous()
    grad_input = torch.empty(input.shape, dtype=input.dtype, device=input.device)
    block, one_block = _row_block(n, MAX_BWD_BLOCK)
    per_sm = min(8, MAX_BWD_BLOCK // block) if one_block else 1
    rows_per_program = triton.cdiv(rows, _sm_count(input.device) * per_sm)
    programs = triton.cdiv(rows, rows_per_program) if rows else 0
    # One block stores its partial row whole; the chunked path accumulates into it in place.
    alloc = torch.empty if one_block else torch.zeros
    partials = [
        alloc((programs, n) if want else (0,), dtype=torch.float32, device=input.device)
        for want in (want_dw, want_db)
    ]
    if rows:
        jit.norm_bwd_kernel[(programs,)](
            grad_out.contiguous(), _ptr(grad_sum, input), input, _ptr(weight, input),
            _ptr(mean, rstd), rstd.contiguous(), grad_input, _ptr(partials[0], rstd),
            _ptr(partials[1], rstd), rows, n, rows_per_program, IS_RMS=is_rms,
            HAS_DSUM=grad_sum is not None, HAS_WEIGHT=weight is not None, HAS_DW=want_dw,
            HAS_DB=want_db, BLOCK=block, ONE_BLOCK=one_block,
            num_warps=_warps(block, BWD_PER_THREAD),
        )  # fmt: skip
    # Summing no rows gives zeros, which is the right gradient for an empty input.
    param_grads = tuple(_sum_rows(p) if p.dim() == 2 else p for p in partials)
    return grad_input, *param_grads


def layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    normalized_numel: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, sum, mean, rstd) of LayerNorm over rows of normalized_numel, residual added first."""
    return _norm_fwd("fastdl.layer_norm", x, residual, weight, bias, normalized_numel, eps, False)


def layer_norm_bwd(
    grad_out: torch.Tensor,
    grad_sum: torch.Tensor | None,
    input: torch.Tensor,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    normalized_numel: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); parameter gradients flat float32, or empty when
    output_mask leaves them out. grad_input is always computed."""
    return _norm_bwd(
        "fastdl.layer_norm", grad_out, grad_sum, input, mean, rstd, weight, normalized_numel,
        output_mask[1], output_mask[2], False,
    )  # fmt: skip


def rms_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    normalized_numel: int,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, sum, rstd) of RMSNorm over rows of normalized_numel, residual added first."""
    out, s, _, rstd = _norm_fwd(
        "fastdl.rms_norm", x, residual, weight, None, normalized_numel, eps, True
    )
    return out, s, rstd


def rms_norm_bwd(
    grad_out: torch.Tensor,
    grad_sum: torch.Tensor | None,
    input: torch.Tensor,
    rstd: torch.Tensor,
    weight: torch.Tensor | None,
    normalized_numel: int,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight), as :func:`layer_norm_bwd`."""
    grad_input, grad_weight, _ = _norm_bwd(
        "fastdl.rms_norm", grad_out, grad_sum, input, None, rstd, weight, normalized_numel,
        output_mask[1], False, True,
    )  # fmt: skip
    return grad_input, grad_weight


@dataclass(frozen=True)
class _BnGeometry:
    """x seen as (N, C, HW) in its dense layout, and the tiling every BatchNorm kernel shares."""

    memory_format: torch.memory_format
    n: int
    c: int
    hw: int
    block_c: int
    block_hw: int

    @classmethod
    def of(cls, x: torch.Tensor, memory_format: torch.memory_format) -> "_BnGeometry":
        n, c, hw = x.shape[0], x.shape[1], math.prod(x.shape[2:])
        pow2_c, pow2_hw = triton.next_power_of_2(max(c, 1)), triton.next_power_of_2(max(hw, 1))
        if memory_format == torch.channels_last:
            # Channels are contiguous: a tile is up to 64 channels wide.
            block_c = min(pow2_c, 64)
            block_hw = min(pow2_hw, BN_TILE // block_c)
        else:
            block_hw = min(pow2_hw, 1024)
            block_c = min(pow2_c, BN_TILE // block_hw)
        return cls(memory_format, n, c, hw, block_c, block_hw)

    @property
    def hw_blocks(self) -> int:
        return triton.cdiv(self.hw, self.block_hw)

    @property
    def grid(self) -> tuple[int, int]:
        # Tiles on axis 0 (up to 2^31 - 1 programs), channel blocks on axis 1 (up to 65535).
        return (self.n * self.hw_blocks, triton.cdiv(self.c, self.block_c))

    @property
    def num_warps(self) -> int:
        return 8 if self.block_c * self.block_hw >= BN_TILE else 4

    def args(self) -> tuple[int, ...]:
        # (C, HW, stride_n, stride_c, stride_hw, hw_blocks), from the sizes: torch leaves the
        # strides of size-1 dims arbitrary.
        cl = self.memory_format == torch.channels_last
        s_c, s_hw = (1, self.c) if cl else (self.hw, 1)
        return (self.c, self.hw, self.c * self.hw, s_c, s_hw, self.hw_blocks)

    def splits(self, device: torch.device) -> tuple[int, int]:
        """(splits, tiles per split) of the reductions: about 4 programs per SM in all."""
        tiles, c_blocks = self.grid
        per_split = triton.cdiv(tiles, max(1, min(tiles, 4 * _sm_count(device) // c_blocks)))
        return triton.cdiv(tiles, per_split), per_split


def _bn_check(op, x, params):
    _checks.dtype(op, "x", x, DTYPES)
    _require_runnable(op, x)
    if x.dim() < 2:
        raise RuntimeError(f"{op}: x must be (N, C, *), got shape {list(x.shape)}")
    if x.numel() and x[0].numel() >= 2**31:
        raise RuntimeError(
            f"{op}: one sample of x has {x[0].numel()} elements; the Triton kernels index "
            "within a sample in 32 bits (at most 2^31 - 1)"
        )
    for name, p in params.items():
        _checks.param(op, name, p, x, x.shape[1])


def _bn_layout(x: torch.Tensor) -> tuple[torch.Tensor, _BnGeometry]:
    from fastdl.ops.norm import channels_last  # the layout rule all backends share

    fmt = torch.channels_last if channels_last(x) else torch.contiguous_format
    return x.contiguous(memory_format=fmt), _BnGeometry.of(x, fmt)


def batch_norm_fwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    eps: float,
    relu: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, save_mean, save_invstd): batch statistics when training (biased variance), the
    running ones otherwise; out keeps x's memory format. An empty batch in training mode has no
    statistics: save_mean and save_invstd are NaN."""
    op = "fastdl.batch_norm"
    params = {
        "weight": weight,
        "bias": bias,
        "running_mean": running_mean,
        "running_var": running_var,
    }
    _bn_check(op, x, params)
    _checks.positive_eps(op, eps)
    c = x.shape[1]
    count = x.numel() // c if c else 0
    if training and count == 1:
        raise ValueError(
            f"{op}: expected more than 1 value per channel when training, "
            f"got x of shape {list(x.shape)}"
        )
    if not training and (running_mean is None or running_var is None):
        raise RuntimeError(f"{op}: running_mean and running_var are required in eval mode")
    x, g = _bn_layout(x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=g.memory_format)
    stat = {"dtype": torch.float32, "device": x.device}
    if not training:
        mean = running_mean.reshape(c).to(copy=True, **stat)
        invstd = running_var.reshape(c).double().add(eps).rsqrt().to(**stat)
    elif count == 0:
        mean = torch.full((c,), float("nan"), **stat)
        invstd = mean.clone()
    else:
        splits, per_split = g.splits(x.device)
        pmean, pm2 = torch.empty((2, splits, c), **stat)
        pcount = torch.empty(splits, **stat)
        jit.bn_stats_kernel[(splits, g.grid[1])](
            x, pmean, pm2, pcount, *g.args(), g.grid[0], per_split, BLOCK_C=g.block_c,
            BLOCK_HW=g.block_hw, num_warps=g.num_warps,
        )  # fmt: skip
        mean, invstd = torch.empty(c, **stat), torch.empty(c, **stat)  # outputs: no aliasing
        jit.bn_finalize_kernel[(triton.cdiv(c, 256),)](
            pmean, pm2, pcount, mean, invstd, c, splits, eps, BLOCK_C=256
        )
    if x.numel():
        jit.bn_fwd_kernel[g.grid](
            x, out, mean, invstd, _ptr(weight, mean), _ptr(bias, mean), *g.args(),
            HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None, RELU=relu,
            BLOCK_C=g.block_c, BLOCK_HW=g.block_hw, num_warps=g.num_warps,
        )  # fmt: skip
    return out, mean, invstd


def batch_norm_bwd(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    save_mean: torch.Tensor,
    save_invstd: torch.Tensor,
    training: bool,
    relu: bool,
    output_mask: list[bool],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_input, grad_weight, grad_bias); grad_input in x's memory format and always
    computed, parameter gradients (C,) float32 or empty when output_mask leaves them out."""
    op = "fastdl.batch_norm"
    _bn_check(op, x, {"weight": weight, "bias": bias})
    _like_x(op, "grad_out", grad_out, x)
    c = x.shape[1]
    _stats_arg(op, "save_mean", save_mean, x, c)
    _stats_arg(op, "save_invstd", save_invstd, x, c)
    x, g = _bn_layout(x)
    grad_out = grad_out.contiguous(memory_format=g.memory_format)
    grad_input = torch.empty(x.shape, dtype=x.dtype, device=x.device, memory_format=g.memory_format)
    mean, invstd = save_mean.contiguous(), save_invstd.contiguous()
    want_w, want_b = output_mask[1], output_mask[2]
    stat = {"dtype": torch.float32, "device": x.device}
    if not x.numel():
        return grad_input, *(torch.zeros(c if want else 0, **stat) for want in (want_w, want_b))
    w, b = _ptr(weight, mean), _ptr(bias, mean)
    flags = {
        "HAS_WEIGHT": weight is not None,
        "HAS_BIAS": bias is not None,
        "RELU": relu,
        "BLOCK_C": g.block_c,
        "BLOCK_HW": g.block_hw,
        "num_warps": g.num_warps,
    }
    sum_dy = sum_dyx = mean  # unread unless computed below
    if training or want_w or want_b:
        splits, per_split = g.splits(x.device)
        pdy, pdyx = torch.empty((2, splits, c), **stat)
        jit.bn_bwd_reduce_kernel[(splits, g.grid[1])](
            grad_out, x, mean, invstd, w, b, pdy, pdyx, *g.args(), g.grid[0], per_split, **flags
        )
        sum_dy, sum_dyx = _sum_rows(pdy), _sum_rows(pdyx)
    jit.bn_bwd_dx_kernel[g.grid](
        grad_out, x, grad_input, mean, invstd, w, b, sum_dy, sum_dyx, 1.0 / (x.numel() // c),
        *g.args(), TRAINING=training, **flags,
    )  # fmt: skip
    empty = torch.empty(0, **stat)
    return grad_input, sum_dyx if want_w else empty, sum_dy if want_b else empty.clone()


# ---------------------------------------------------------------- ahead-of-time configurations


@dataclass(frozen=True)
class AotConfig:
    """One specialization of a kernel, for tests/test_gpu_build.py to compile for sm_80/sm_90:
    ``triton.compile(ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
    attrs=attrs), target=..., options={"num_warps": num_warps})``. The attrs declare what the JIT
    finds on aligned shapes (16-byte aligned pointers, sizes and strides divisible by 16), which
    is what lets it emit 128-bit loads and stores."""

    kernel: object
    signature: dict[str, str]
    constexprs: dict[str, object]
    num_warps: int
    attrs: dict[tuple[int, ...], list[list[object]]]


_INTS = {"N", "M", "C", "HW"}
_FLOATS = {"eps", "inv_count"}
_DATA = {"X", "R", "S", "Y", "DY", "DS", "DX"}
_PARAMS = {"W", "B"}
_ALIGNED = {"N", "C", "HW", "s_n", "s_c", "s_hw"}


def _aot(kernel, num_warps: int, data: str = "fp32", param: str = "fp32", **constexprs):
    # Argument types by naming convention: data tensors in x's dtype, weight/bias in the
    # parameter dtype, every other pointer (statistics, partial sums) float32.
    def arg_type(name: str) -> str:
        if name in constexprs:
            return "constexpr"
        if name in _FLOATS:
            return "fp32"
        if name in _INTS or name.islower():
            return "i32"
        return "*" + (data if name in _DATA else param if name in _PARAMS else "fp32")

    signature = {name: arg_type(name) for name in kernel.arg_names}
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, (name, ty) in enumerate(signature.items())
        if ty.startswith("*") or (name in _ALIGNED and ty == "i32")
    }
    return AotConfig(kernel, signature, constexprs, num_warps, attrs)


def _norm(rms, block, one_block, flags, **overrides):
    return {"IS_RMS": rms, "BLOCK": block, "ONE_BLOCK": one_block, **flags, **overrides}


_FWD = {"HAS_RESIDUAL": True, "HAS_WEIGHT": True, "HAS_BIAS": True}
_BWD = {"HAS_DSUM": True, "HAS_WEIGHT": True, "HAS_DW": True, "HAS_DB": True}
# Strides of 1 are specialized to constants by the JIT, as these configurations do: stride_hw = 1
# is NCHW, stride_c = 1 channels_last.
_NCHW = {"s_hw": 1, "BLOCK_C": 4, "BLOCK_HW": 1024}
_NHWC = {"s_c": 1, "BLOCK_C": 64, "BLOCK_HW": 64}
_BN = {"HAS_WEIGHT": True, "HAS_BIAS": True, "RELU": True}
_BN_PLAIN = dict.fromkeys(_BN, False)

AOT: list[AotConfig] = [
    _aot(jit.norm_fwd_kernel, 4, **_norm(False, 1024, True, _FWD, HAS_RESIDUAL=False)),
    _aot(jit.norm_fwd_kernel, 16, "bf16", **_norm(False, MAX_FWD_BLOCK, True, _FWD)),
    _aot(jit.norm_fwd_kernel, 8, "fp16", "fp16", **_norm(False, CHUNK, False, _FWD)),
    _aot(jit.norm_fwd_kernel, 8, "bf16", "bf16", **_norm(True, 4096, True, _FWD)),
    _aot(jit.norm_bwd_kernel, 4, **_norm(False, 1024, True, _BWD, HAS_DSUM=False)),
    _aot(jit.norm_bwd_kernel, 16, "bf16", **_norm(False, MAX_BWD_BLOCK, True, _BWD)),
    _aot(jit.norm_bwd_kernel, 16, "fp16", "fp16", **_norm(True, CHUNK, False, _BWD)),
    _aot(jit.sum_rows_kernel, 4, BLOCK_R=16, BLOCK_N=128),
    _aot(jit.bn_stats_kernel, 8, **_NCHW),
    _aot(jit.bn_stats_kernel, 8, "bf16", **_NHWC),
    _aot(jit.bn_finalize_kernel, 4, BLOCK_C=256),
    _aot(jit.bn_fwd_kernel, 8, **_NCHW, **_BN),
    _aot(jit.bn_fwd_kernel, 8, "bf16", **_NHWC, **_BN),
    _aot(jit.bn_fwd_kernel, 8, "fp16", "fp16", **_NCHW, **_BN_PLAIN),
    _aot(jit.bn_bwd_reduce_kernel, 8, **_NCHW, **_BN),
    _aot(jit.bn_bwd_reduce_kernel, 8, "bf16", **_NHWC, **_BN),
    _aot(jit.bn_bwd_dx_kernel, 8, **_NCHW, **_BN, TRAINING=True),
    _aot(jit.bn_bwd_dx_kernel, 8, "bf16", **_NHWC, **_BN, TRAINING=False),
    _aot(jit.bn_bwd_dx_kernel, 8, "fp16", "fp16", **_NCHW, **_BN, TRAINING=True),
]
