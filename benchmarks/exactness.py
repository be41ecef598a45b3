"""Per-op exactness (README "Exactness, per op"): each compressed op's forward output and gradients against
native PyTorch on fixed-seed inputs, one CSV.

    python -m benchmarks.exactness                          # -> scratch/exactness/exactness.csv (make reproduce: results/)
    python -m benchmarks.exactness conv_inputs=[noise]      # no data needed

One row per (op, preset, input, output): ``output`` is ``forward``, ``input`` (the gradient to the op's input) or
a parameter name (its gradient). Columns: ``bitwise`` (torch.equal with native), ``rel_l2`` (||g - g_native|| /
||g_native||), ``cosine``, ``max_abs_err``, ``exact_by_design`` (what the op's docstring claims) + provenance.
Conv ops run under the conv presets; every other op under the whole-set settings of ``full2``/``full4`` (the same
for every non-conv op) and under the ``int8`` peer. Inputs: ``noise`` is i.i.d. N(0, 1) for convs (a hard case for
pooling: no spatial correlation) and N(1, 3²) for the others; ``block_constant`` is constant over aligned 4×4
blocks (where avg-pooling loses nothing); ``fashion_mnist`` is 16 real test images at 32 px. One torch thread, so
the numbers repeat run to run.
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import hydra
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F
from omegaconf import DictConfig

import actcomp

from .common import atomic_write_csv, fail, provenance_row

# Non-conv ops under the whole-set settings of full2/full4 (block=1: nothing to pool in a bare op).
WHOLE_SET = "full2/full4"
CONV_INPUTS = ("noise", "block_constant", "fashion_mnist")


def _spec(preset: str):
    return {"preset": "full4", "block": 1, "name": WHOLE_SET} if preset == WHOLE_SET else preset


def _elementwise_cases():
    """(op label, module factory, input shape, exact_by_design per output)."""
    from timm.layers import LayerScale2d, SqueezeExcite

    act_shape, tok_shape = (8, 16, 14, 14), (8, 49, 64)
    exact_in = {"forward": True, "input": True}
    # A norm's bias gradient is sum(dy): it does not depend on the coded input.
    approx = {"forward": True, "input": False, "weight": False, "bias": True}
    return [
        ("ReLU, 1-bit mask", nn.ReLU, act_shape, exact_in),
        ("ReLU6, 1-bit mask", nn.ReLU6, act_shape, exact_in),
        ("LeakyReLU(0.2), 1-bit mask", lambda: nn.LeakyReLU(0.2), act_shape, exact_in),
        ("max-pool 3×3 s2, uint8 window offsets", lambda: nn.MaxPool2d(3, 2, 1), act_shape, exact_in),
        ("BatchNorm2d, uint8 + recompute", lambda: nn.BatchNorm2d(16), act_shape, approx),
        ("LayerNorm, uint8 + recompute", lambda: nn.LayerNorm(64), tok_shape, approx),
        ("GroupNorm, uint8 + recompute", lambda: nn.GroupNorm(4, 16), act_shape, approx),
        ("SiLU, uint8 + recompute", nn.SiLU, act_shape, {"forward": True, "input": False}),
        ("GELU, uint8 + recompute", nn.GELU, tok_shape, {"forward": True, "input": False}),
        ("Sigmoid, uint8 + recompute", nn.Sigmoid, act_shape, {"forward": True, "input": False}),
        ("Hardswish, uint8 + recompute", nn.Hardswish, act_shape, {"forward": True, "input": False}),
        ("Linear, uint8 input", lambda: nn.Linear(64, 32), tok_shape,
         {"forward": True, "input": True, "weight": False, "bias": True}),
        ("layer-scale γ (timm LayerScale2d), uint8 input", lambda: LayerScale2d(16, 0.5), act_shape,
         {"forward": True, "input": True, "gamma": False}),
        # The gate's gradient is approximate, and it flows back into the input through the gate branch.
        ("SE gate (timm SqueezeExcite), uint8 input", lambda: SqueezeExcite(16, rd_ratio=0.25), act_shape,
         {"forward": True, "input": False}),
    ]


def _compare(m0: nn.Module, spec, x: torch.Tensor, dy_seed: int) -> list[dict]:
    """Forward output and every gradient of ``spec`` against native, same module, input and output gradient."""
    outs = []
    for s in (None, spec):
        m = copy.deepcopy(m0).train()
        if s is not None:
            actcomp.compress(m, s)
        xi = x.clone().requires_grad_(True)
        # Non-leaf input, as inside a network (an in-place op on a leaf that needs grad is an error).
        y = m(xi * 1.0)
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(dy_seed))
        y.backward(dy)
        outs.append({"forward": y.detach(), "input": xi.grad,
                     **{n: p.grad for n, p in m.named_parameters() if p.grad is not None}})
    ref, got = outs
    rows = []
    for k, r in ref.items():
        g = got.get(k)
        a, b = g.double().flatten(), r.double().flatten()
        nb = b.norm().item()
        rows.append(dict(output=k, bitwise=bool(torch.equal(g, r)),
                         rel_l2=(a - b).norm().item() / nb if nb > 0 else float("nan"),
                         cosine=F.cosine_similarity(a, b, dim=0).item() if nb > 0 and a.norm() > 0 else float("nan"),
                         max_abs_err=(a - b).abs().max().item()))
    return rows


def _conv_input(kind: str, seed: int) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(seed)
    if kind == "noise":
        return torch.randn(8, 16, 32, 32, generator=g), "N(0, 1) i.i.d."
    if kind == "block_constant":
        x = torch.randn(8, 16, 8, 8, generator=g).repeat_interleave(4, 2).repeat_interleave(4, 3)
        return x, "N(0, 1), constant on 4×4 blocks"
    if kind == "fashion_mnist":
        from actcomp.data import build_data

        val = build_data("fashion_mnist", image_size=32, resize="resize").val
        return torch.stack([val[i][0] for i in range(16)]), "Fashion-MNIST test images 0-15"
    raise actcomp.ActcompError(f"conv_inputs: unknown input {kind!r}; known: {', '.join(CONV_INPUTS)}")


def _shape(x: torch.Tensor) -> str:
    return "×".join(map(str, x.shape))


def measure(cfg: DictConfig) -> pd.DataFrame:
    for p in list(cfg.conv_presets) + list(cfg.presets):
        if p != WHOLE_SET:
            actcomp.get_preset(p)
    if not cfg.conv_inputs:
        raise actcomp.ActcompError("conv_inputs is empty; give e.g. conv_inputs=[noise]")
    rows = []
    conv_exact = {"forward": True, "input": True, "weight": False, "bias": True}
    for kind in cfg.conv_inputs:
        x, desc = _conv_input(kind, cfg.seed)
        torch.manual_seed(cfg.seed)
        conv = nn.Conv2d(x.shape[1], 32, 3, padding=1)
        for p in cfg.conv_presets:
            for r in _compare(conv, p, x, cfg.seed + 1):
                exact = conv_exact.get(r["output"], False) or p == "authors_b1"
                rows.append(dict(op=f"conv 3×3 {x.shape[1]}→32, pooled input", preset=p, input=desc,
                                 shape=_shape(x), exact_by_design=exact, **r))
    for label, make, shape, exact in _elementwise_cases():
        torch.manual_seed(cfg.seed)
        m = make()
        # N(1, 3²): off-centre and wide, so codes cross ReLU/Hardswish kinks and norm statistics are non-trivial.
        x = torch.randn(shape, generator=torch.Generator().manual_seed(cfg.seed)) * 3 + 1
        for p in cfg.presets:
            for r in _compare(m, _spec(p), x, cfg.seed + 1):
                by_design = exact.get(r["output"], False) if p == WHOLE_SET else r["output"] == "forward"
                rows.append(dict(op=label, preset=p, input="N(1, 3²)", shape=_shape(x), exact_by_design=by_design,
                                 **r))
    df = pd.DataFrame(rows)
    df["seed"], df["torch_threads"] = cfg.seed, torch.get_num_threads()
    for k, v in provenance_row("cpu").items():
        df[k] = v
    return df


@hydra.main(version_base=None, config_path="../conf", config_name="exactness")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))  # reduction order depends on the thread count
    path = Path(hydra.utils.to_absolute_path(cfg.out_dir)) / "exactness.csv"
    try:
        df = measure(cfg)
        atomic_write_csv(df, path)
    except (actcomp.ActcompError, OSError) as e:
        fail(e)
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_colwidth", 48):
        print(df[["op", "preset", "output", "bitwise", "rel_l2", "cosine"]].to_string(
            index=False, float_format="{:.3g}".format))
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
