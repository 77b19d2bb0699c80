"""Recurrent cases: LSTM and GRU layers over whole sequences, forward and forward+backward.

The baseline is torch's own layer op (torch.lstm / torch.gru, what nn.LSTM / nn.GRU call); the
variable-length case runs torch's packed-sequence path (pack, layer, pad) against fastdl's
``lengths``. Shapes from the rnn issue: a 512-wide layer on batch 64 x 128 steps (GEMM-bound:
the figures are FLOPs against the fp32 GEMM peak), batch-1 latency over 512 steps of a 256-wide
layer (per-step overhead bound), and a 2-layer bidirectional LSTM with variable lengths.
"""

import torch
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fastdl
from bench.cases import Case, Inputs, Target

BIG = (128, 64, 512, 512)  # (T, B, input_size, hidden_size)
LATENCY = (512, 1, 256, 256)
PACKED = (64, 32, 256, 256)
GATES = {"lstm": 4, "gru": 3}


def _params(kind, shape, layers, dirs, dtype, device, grad):
    _, _, i, h = shape
    g = GATES[kind] * h
    bound = h**-0.5
    params = []
    for layer in range(layers):
        inp = i if layer == 0 else dirs * h
        for _ in range(dirs):
            for size in ((g, inp), (g, h), (g,), (g,)):
                w = torch.empty(size, device=device).uniform_(-bound, bound).to(dtype)
                params.append(w.requires_grad_(grad))
    return params


def _inputs(kind, layers=1, dirs=1, lengths=False):
    def make(case: Case, device: torch.device) -> Inputs:
        torch.manual_seed(0)
        grad = case.mode == "fwd+bwd"
        t, b, i, h = case.shape
        x = torch.randn(t, b, i, device=device).to(case.dtype).requires_grad_(grad)
        args = [x]
        if lengths:
            # Sorted lengths from T down to T/4: a typical bucketed batch.
            args.append(torch.linspace(t, t // 4, b, device=device).long())
        args += _params(kind, case.shape, layers, dirs, case.dtype, device, grad)
        g = torch.randn(t, b, dirs * h, device=device).to(case.dtype) if grad else None
        return Inputs(tuple(args), g)

    return make


def _layer(kind, layers=1, bidirectional=False):
    fastdl_fn = fastdl.lstm if kind == "lstm" else fastdl.gru
    torch_fn = torch.lstm if kind == "lstm" else torch.gru

    def ours(x, *params):
        return fastdl_fn(x, None, params, True, layers, 0.0, False, bidirectional)

    def eager(x, *params):
        h = x.new_zeros(layers * (2 if bidirectional else 1), x.shape[1], params[1].shape[1])
        hx = [h, h] if kind == "lstm" else h
        return torch_fn(x, hx, params, True, layers, 0.0, False, bidirectional, False)

    return ours, eager


def _packed(kind, layers, bidirectional):
    fastdl_fn = fastdl.lstm if kind == "lstm" else fastdl.gru

    def ours(x, lengths, *params):
        return fastdl_fn(x, None, params, True, layers, 0.0, False, bidirectional, lengths=lengths)

    def eager(x, lengths, *params):
        mod_fn = torch.lstm if kind == "lstm" else torch.gru
        packed = pack_padded_sequence(x, lengths.cpu())
        h = x.new_zeros(layers * (2 if bidirectional else 1), x.shape[1], params[1].shape[1])
        hx = [h, h] if kind == "lstm" else h
        out = mod_fn(
            packed.data, packed.batch_sizes, hx, params, True, layers, 0.0, False, bidirectional
        )
        y, _ = pad_packed_sequence(packed._replace(data=out[0]), total_length=x.shape[0])
        return (y, *out[1:])

    return ours, eager


def _flops(kind, shape, mode, layers=1, dirs=1):
    t, b, i, h = shape
    g = GATES[kind] * h
    fwd = sum(
        2 * t * b * g * ((i if layer == 0 else dirs * h) + h) * dirs for layer in range(layers)
    )
    return fwd * (3 if mode == "fwd+bwd" else 1)


def _case(kind, mode, shape, dtype, target=None, variant="", layers=1, bidir=False, lengths=False):
    ours, eager = _packed(kind, layers, bidir) if lengths else _layer(kind, layers, bidir)
    dirs = 2 if bidir else 1
    return Case(
        family="rnn",
        op=kind,
        mode=mode,
        shape=shape,
        dtype=dtype,
        make=_inputs(kind, layers, dirs, lengths),
        fastdl=ours,
        eager=eager,
        flops=_flops(kind, shape, mode, layers, dirs),
        variant=variant,
        target=target,
    )


CASES = [
    _case(kind, mode, BIG, torch.float32, Target(eager=1.2))
    for kind in ("lstm", "gru")
    for mode in ("fwd", "fwd+bwd")
]
CASES += [
    _case(kind, "fwd", LATENCY, torch.float32, Target(eager=2.0), "batch1")
    for kind in ("lstm", "gru")
]
CASES += [
    _case("lstm", mode, PACKED, torch.float32, None, "2layer-bi-lengths", 2, True, True)
    for mode in ("fwd", "fwd+bwd")
]
CASES += [_case("lstm", mode, BIG, torch.bfloat16) for mode in ("fwd", "fwd+bwd")]
CASES += [_case("gru", "fwd", BIG, torch.bfloat16)]
