"""Random conv2d / conv_transpose2d cases against float64 (not collected by pytest: a tool).

    PYTHONPATH=. python tests/fuzz_conv.py SEED SECONDS [FILTER]

Each case (float32 or bfloat16, NCHW or channels_last, groups, strides, dilations, padding,
with or without gradients) is drawn from SEED alone and printed before it runs, so a crash names
the case it reached; FILTER, a Python expression over the case's names (e.g. "grad and dt ==
torch.bfloat16"), runs only the matching cases of the same sequence. float32 outputs and
gradients must be within 2e-5, bfloat16 ones within twice torch's own bfloat16 error (one
bfloat16 ulp where torch's has NaNs) + 1e-3, both relative to the largest sum of |terms| (the
float64 op on absolute values, at least 1: sums that cancel keep their terms' rounding).
torch's float32 convs are not run: on a Sapphire Rapids Xeon with torch 2.13.0+cpu its oneDNN
convs corrupt the heap in long random runs with 2 threads, with fastdl not even imported (a
segfault or `free(): invalid next size` after hundreds to ~30,000 cases; caught at once in
dnnl::impl::malloc under glibc's MALLOC_CHECK_=3 with libc_malloc_debug.so preloaded).
"""

import random
import sys
import time

import torch
import torch.nn.functional as F

import fastdl


def draw(rng):
    groups = rng.choice([1, 1, 1, 2, 4])
    cg, kg = rng.choice([1, 3, 8, 16, 32, 33, 64]), rng.choice([1, 4, 8, 16, 40, 64])
    R, S = rng.choice([(1, 1), (3, 3), (3, 3), (5, 5), (2, 3), (7, 7), (4, 4)])
    st = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
    dl = (rng.choice([1, 1, 2]), rng.choice([1, 1, 2]))
    pd = (rng.randint(0, R // 2 + 1), rng.randint(0, S // 2 + 1))
    N, H, W = rng.choice([1, 2, 3]), rng.randint(R * dl[0], 40), rng.randint(S * dl[1], 40)
    dt = rng.choice([torch.float32, torch.float32, torch.bfloat16])
    cl, grad = rng.random() < 0.5, rng.random() < 0.6
    tr = rng.random() < 0.2
    # output_padding below the stride or the dilation
    op = tuple(rng.randint(0, max(s, d) - 1) for s, d in zip(st, dl, strict=True)) if tr else (0, 0)
    return {
        "N": N,
        "C": cg * groups,
        "K": kg * groups,
        "cg": cg,
        "H": H,
        "W": W,
        "R": R,
        "S": S,
        "st": st,
        "pd": pd,
        "dl": dl,
        "op": op,
        "g": groups,
        "dt": dt,
        "cl": cl,
        "tr": tr,
        "grad": grad,
    }


def run(c, fn, ts):
    if c["tr"]:
        return fn.conv_transpose2d(*ts, c["st"], c["pd"], c["op"], c["g"], c["dl"])
    return fn.conv2d(*ts, c["st"], c["pd"], c["dl"], c["g"])


def close(got, want, lowp, bound, dt):
    scale = max(bound.max().item(), 1.0)
    err = (got.double() - want).abs().max().item() / scale
    if dt == torch.float32:
        return err <= 2e-5, err
    theirs = (lowp.double() - want).abs().max().item() / scale
    if theirs != theirs:  # torch's own bfloat16 result has NaNs (e.g. some grouped convs): one ulp
        theirs = 2.0**-8
    return err <= 2 * theirs + 1e-3, err


def main():
    seed, seconds = int(sys.argv[1]), float(sys.argv[2])
    only = sys.argv[3] if len(sys.argv) > 3 else None
    rng = random.Random(seed)
    torch.manual_seed(seed)
    end, index, fails = time.time() + seconds, 0, 0
    while time.time() < end:
        index += 1
        c = draw(rng)
        x = torch.randn(c["N"], c["C"], c["H"], c["W"]).to(c["dt"])
        if c["cl"]:
            x = x.contiguous(memory_format=torch.channels_last)
        fan = (c["C"] if c["tr"] else c["cg"]) * c["R"] * c["S"]
        wshape = (c["C"], c["K"] // c["g"]) if c["tr"] else (c["K"], c["cg"])
        w = (torch.randn(*wshape, c["R"], c["S"]) / fan**0.5).to(c["dt"])
        b = torch.randn(c["K"]).to(c["dt"])
        if only is not None and not eval(only, {"torch": torch}, dict(c)):
            continue
        print("case", index, c, flush=True)
        ts = [t.clone().requires_grad_(c["grad"]) for t in (x, w, b)]
        td = [t.detach().double().requires_grad_(c["grad"]) for t in ts]
        tl = [t.detach().clone().requires_grad_(c["grad"]) for t in ts]
        try:
            y = run(c, fastdl, ts)
        except RuntimeError as e:  # e.g. a kernel larger than the padded input, refused alike
            try:  # float64: torch's float32 conv_transpose2d returns an empty output for size 0
                run(c, F, td)
            except RuntimeError:
                continue
            raise e
        bf16 = c["dt"] == torch.bfloat16  # torch's own result only bounds bfloat16's error
        ta = [t.detach().abs().requires_grad_(c["grad"]) for t in td]  # the sums of |terms|
        yd, yl, ya = run(c, F, td), run(c, F, tl) if bf16 else None, run(c, F, ta)
        checks = [("out", y, yd, yl, ya)]
        if c["grad"]:
            g = torch.randn_like(yd)
            pairs = zip(
                torch.autograd.grad(y, ts, g.to(c["dt"])),
                torch.autograd.grad(yd, td, g),
                torch.autograd.grad(yl, tl, g.to(c["dt"])) if bf16 else [None] * 3,
                torch.autograd.grad(ya, ta, g.abs()),
                strict=True,
            )
            checks += [(f"grad{i}", *p) for i, p in enumerate(pairs)]
        for what, got, want, lowp, bound in checks:
            ok, err = close(got, want, lowp, bound, c["dt"])
            if not ok:
                fails += 1
                print("FAIL", index, what, f"{err:.3g}", flush=True)
    print("cases", index, "fails", fails)


if __name__ == "__main__":
    main()
