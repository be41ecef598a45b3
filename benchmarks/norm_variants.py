"""Which 8-bit code and which statistics give the closest normalization gradients (the design of ops/norm.py).

    python -m benchmarks.norm_variants        # prints a markdown table; writes nothing

For each normalization case, the relative L2 error of the input and weight gradients against the exact gradient
(float64 closed form at the true input), for three ways of running the closed-form backward at the same saved
bytes (a uint8 code per group as ``quant.quantize_uint8`` makes it):

- ``code x, stats of x̃`` — what ops/norm.py does: decode x̃, take its mean/rstd (= the gradient of the op at x̃);
- ``code x, exact stats`` — decode x̃, normalize it with the mean/rstd of the exact forward;
- ``code x̂, exact stats`` — code x̂ = (x − mean)·rstd instead of x, normalize nothing in backward.

The exact statistics would cost 8 bytes per row for LayerNorm/GroupNorm on top of the code. Inputs: N(1, 3²)
("iid"), and the same with each reduction row's scale spread over 10⁻²..10² ("scaled rows": tokens or
channels of very different size, where a code group spanning several rows hurts). Seed 0, one thread.
"""
from __future__ import annotations

import torch

from actcomp.ops import dequantize_uint8, quantize_uint8


def _cases():
    """(label, input shape as the op sees it, reduction dims, γ shape, reshape for the reduction or None)."""
    return [
        ("BatchNorm2d 8×16×14×14", (8, 16, 14, 14), (0, 2, 3), (1, 16, 1, 1), None),
        ("BatchNorm2d 8×16×3×3 (per-channel code groups)", (8, 16, 3, 3), (0, 2, 3), (1, 16, 1, 1), None),
        ("LayerNorm(64) 8×49×64", (8, 49, 64), (2,), (64,), None),
        ("LayerNorm(32) 8×9×32 (code group: a sample)", (8, 9, 32), (2,), (32,), None),
        ("LayerNorm2d 16 ch, NHWC 8×14×14×16 (code group: an image row)", (8, 14, 14, 16), (3,), (16,), None),
        ("GroupNorm(4, 16) 8×16×14×14", (8, 16, 14, 14), (2, 3), (1, 4, 4, 1), (8, 4, 4, 196)),
        ("GroupNorm(16, 16) 8×16×14×14", (8, 16, 14, 14), (2, 3), (1, 16, 1, 1), (8, 16, 1, 196)),
    ]


def _grads(xhat, rstd, dy, gamma, red):
    g = dy * gamma
    dx = rstd * (g - g.mean(red, keepdim=True) - xhat * (g * xhat).mean(red, keepdim=True))
    full = gamma.reshape([1] * (dy.dim() - gamma.dim()) + list(gamma.shape))
    dgamma = (dy * xhat).sum([i for i in range(dy.dim()) if full.shape[i] == 1], keepdim=True)
    return dx, dgamma


def _stats(x, red, eps=1e-5):
    var, mean = torch.var_mean(x, red, correction=0, keepdim=True)
    return mean, (var + eps).rsqrt()


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def measure(kind: str):
    rows = []
    for label, shape, red, gshape, view in _cases():
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(shape, generator=gen) * 3 + 1
        if kind == "scaled rows":
            # spread the scale over the rows the op normalizes (BN: channels; LN: tokens; GN: (sample, group))
            rshape = [1 if i in red else s for i, s in enumerate(view or shape)]
            scale = torch.logspace(-2, 2, int(torch.tensor(rshape).prod())).view(rshape)
            scale = scale.flatten()[torch.randperm(scale.numel(), generator=gen)].view(rshape)
            x = ((x.view(view) if view else x) * scale).reshape(shape)
        dy = torch.randn(shape, generator=gen).double()
        gamma = (torch.rand(gshape, generator=gen) + 0.5).double()

        def v(t, view=view):
            return t.reshape(view) if view else t

        xd = v(x.double())
        mean, rstd = _stats(xd, red)
        ref = _grads((xd - mean) * rstd, rstd, v(dy), gamma, red)
        xt = v(dequantize_uint8(*quantize_uint8(x), torch.float32).double())
        m_t, r_t = _stats(xt, red)
        xhat = ((xd - mean) * rstd).float().reshape(shape)
        xhat_t = v(dequantize_uint8(*quantize_uint8(xhat), torch.float32).double())
        variants = {
            "code x, stats of x̃": _grads((xt - m_t) * r_t, r_t, v(dy), gamma, red),
            "code x, exact stats": _grads((xt - mean) * rstd, rstd, v(dy), gamma, red),
            "code x̂, exact stats": _grads(xhat_t, rstd, v(dy), gamma, red),
        }
        for name, (dx, dg) in variants.items():
            rows.append((kind, label, name, _rel(dx, ref[0]), _rel(dg, ref[1])))
    return rows


def main():
    torch.set_num_threads(1)
    print("| input | case | variant | input grad rel. L2 | weight grad rel. L2 |")
    print("|---|---|---|---|---|")
    for kind in ("iid", "scaled rows"):
        for k, label, name, ex, eg in measure(kind):
            print(f"| {k} | {label} | {name} | {ex:.3%} | {eg:.3%} |")


if __name__ == "__main__":
    main()
