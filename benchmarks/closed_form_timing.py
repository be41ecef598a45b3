"""Time of one layer's forward+backward: native, the recompute backward full2/full4 used before, the closed form.

    python -m benchmarks.closed_form_timing [repeats] [iters]     # prints a markdown table; writes nothing

Cases: BatchNorm2d + ReLU (training mode, 16×256×32×32) and SiLU (same shape), fp32 on CPU, one torch thread.
"recompute" is the path convert.py took before ops/norm.py and ops/act.py: save the uint8 code, re-run the op
under autograd at the decoded input in backward (``ops.recompute``). The variants run interleaved, one round of
each per repeat, so a change in machine load hits all of them alike; each timing is the mean over ``iters``
forward+backward calls, and the table gives the median and interquartile range over the repeats. "quantize +
dequantize" times the uint8 code alone, the part both compressed paths share.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F

from actcomp import ops


def _bn_relu_cases(shape):
    c = shape[1]
    rm, rv = torch.zeros(c), torch.ones(c)
    w, b = torch.ones(c, requires_grad=True), torch.zeros(c, requires_grad=True)

    def native(x):
        return F.relu(F.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

    def fwd(x_, w_, b_):
        return F.batch_norm(x_, rm, rv, w_, b_, True, 0.1, 1e-5)

    def bwd(x_, w_, b_):  # as convert.py did: batch statistics of x̂, running buffers untouched
        return F.batch_norm(x_, None, None, w_, b_, True, 0.0, 1e-5)

    def recompute(x):
        return ops.relu(ops.recompute(fwd, bwd, "norm input", x, (w, b)))

    def closed(x):
        return ops.relu(ops.batch_norm(x, rm, rv, w, b, True, 0.1, 1e-5))

    return {"native": native, "recompute (before)": recompute, "closed form": closed}


def _silu_cases():
    return {"native": F.silu, "recompute (before)": lambda x: ops.recompute(F.silu, F.silu, "activation", x),
            "closed form": lambda x: ops.activation("silu", x)}


def _codec(x):
    return ops.dequantize_uint8(*ops.quantize_uint8(x.detach()), x.dtype)


def _time(fn, x, dy, iters):
    t0 = time.perf_counter()
    for _ in range(iters):
        x.grad = None
        y = fn(x)
        if y.requires_grad:
            y.backward(dy)
    return (time.perf_counter() - t0) / iters


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    repeats, iters = (int(argv[0]) if argv else 7), (int(argv[1]) if len(argv) > 1 else 3)
    torch.set_num_threads(1)
    shape = (16, 256, 32, 32)
    gen = torch.Generator().manual_seed(0)
    x = (torch.randn(shape, generator=gen) * 3 + 1).requires_grad_(True)
    dy = torch.randn(shape, generator=gen)
    layers = {"BatchNorm2d + ReLU": _bn_relu_cases(shape), "SiLU": _silu_cases()}
    for cases in layers.values():
        cases["quantize + dequantize"] = _codec
    times = {(layer, v): [] for layer, cases in layers.items() for v in cases}
    for cases in layers.values():  # warm-up
        for fn in cases.values():
            _time(fn, x, dy, 1)
    for _ in range(repeats):
        for layer, cases in layers.items():
            for v, fn in cases.items():
                times[(layer, v)].append(_time(fn, x, dy, iters))
    print(f"CPU fp32, 1 thread, input {'×'.join(map(str, shape))}, {repeats} repeats × {iters} iterations, "
          f"torch {torch.__version__}")
    print("| layer | variant | forward+backward, median ms | IQR ms | vs native |")
    print("|---|---|---|---|---|")
    for layer, cases in layers.items():
        base = statistics.median(times[(layer, "native")])
        for v in cases:
            t = times[(layer, v)]
            q1, _, q3 = statistics.quantiles(t, n=4)
            med = statistics.median(t)
            print(f"| {layer} | {v} | {med * 1e3:.1f} | {q1 * 1e3:.1f}–{q3 * 1e3:.1f} | {med / base:.2f}× |")


if __name__ == "__main__":
    main()
