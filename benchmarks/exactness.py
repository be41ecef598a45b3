"""Per-op exactness (README "Exactness, per op"): each compressed op's forward output and gradients against
native PyTorch on fixed-seed inputs, plus the known limits (self-padding convs, whole-model cosine on tiny
batches/maps). One CSV per part:

    python -m benchmarks.exactness                          # -> scratch/exactness/{exactness,padding,whole_model}.csv
    python -m benchmarks.exactness conv_inputs=[noise] padding.inputs=[block_constant]   # no data needed
    python -m benchmarks.exactness parts=[padding]          # one part only (the other CSVs are left as they are)

One row per (op, preset, input, output): ``output`` is ``forward``, ``input`` (the gradient to the op's input) or
a parameter name (its gradient). Columns: ``bitwise`` (torch.equal with native), ``rel_l2`` (||g - g_native|| /
||g_native||), ``cosine``, ``max_abs_err``, ``exact_by_design`` (what the op's docstring claims) + provenance.
Conv ops run under the conv presets; every other op under the whole-set settings of ``full2``/``full4`` (the same
for every non-conv op) and under the ``int8`` peer. Inputs: ``noise`` is i.i.d. N(0, 1) for convs (a hard case for
pooling: no spatial correlation) and N(1, 3²) for the others; ``block_constant`` is constant over aligned 4×4
blocks (where avg-pooling loses nothing); ``fashion_mnist`` is 16 real test images at 32 px. One torch thread, so
the numbers repeat run to run.

``padding.csv``: convs that pad their input themselves (``padding_mode`` reflect/replicate/circular, timm
``Conv2dSame``) and timm ``StdConv2d``, next to the same conv with zero padding: the weight gradient's error under
pooling (the conv then pools the *padded* tensor, so its blocks no longer line up with the image), and the bytes
saved after forward relative to native (``F.pad``'s own saved input and StdConv's standardized weight stay full).
``whole_model.csv``: cosine of all parameter gradients concatenated, compressed vs native, for a few models over
batch size × image size (same init and batch: Fashion-MNIST test images 0..batch-1, or i.i.d. noise).
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
from actcomp.errors import check_int

from .common import atomic_write_csv, fail, provenance_row
from .hydra_conf import CONF_DIR, VERSION_BASE

# Non-conv ops under the whole-set settings of full2/full4 (block=1: nothing to pool in a bare op).
WHOLE_SET = "full2/full4"
CONV_INPUTS = ("noise", "block_constant", "fashion_mnist")
PARTS = ("ops", "padding", "whole_model", "grad_cosine")
CSV_OF = {"ops": "exactness.csv", "padding": "padding.csv", "whole_model": "whole_model.csv",
          "grad_cosine": "grad_cosine.csv"}


def _spec(preset: str):
    return {"preset": "full4", "block": 1, "name": WHOLE_SET} if preset == WHOLE_SET else preset


def _elementwise_cases():
    """(op label, module factory, input shape, exact_by_design per output)."""
    from timm.layers import BatchNormAct2d, LayerNorm2d, LayerScale2d, SqueezeExcite

    act_shape, tok_shape = (8, 16, 14, 14), (8, 49, 64)
    exact_in = {"forward": True, "input": True}
    # A norm's bias gradient is sum(dy): it does not depend on the coded input.
    approx = {"forward": True, "input": False, "weight": False, "bias": True}
    return [
        ("ReLU, 1-bit mask", nn.ReLU, act_shape, exact_in),
        ("ReLU6, 1-bit mask", nn.ReLU6, act_shape, exact_in),
        ("LeakyReLU(0.2), 1-bit mask", lambda: nn.LeakyReLU(0.2), act_shape, exact_in),
        ("max-pool 3×3 s2, uint8 window offsets", lambda: nn.MaxPool2d(3, 2, 1), act_shape, exact_in),
        ("BatchNorm2d, uint8 + closed-form backward", lambda: nn.BatchNorm2d(16), act_shape, approx),
        ("LayerNorm, uint8 + closed-form backward", lambda: nn.LayerNorm(64), tok_shape, approx),
        ("LayerNorm2d (timm, NHWC permute), uint8 + closed-form backward", lambda: LayerNorm2d(16), act_shape,
         approx),
        ("GroupNorm, uint8 + closed-form backward", lambda: nn.GroupNorm(4, 16), act_shape, approx),
        ("GroupNorm (a group per channel), uint8 + closed-form backward", lambda: nn.GroupNorm(16, 16), act_shape,
         approx),
        ("SiLU, uint8 + closed-form backward", nn.SiLU, act_shape, {"forward": True, "input": False}),
        # A SiLU right after a BatchNorm: as two modules each codes its own input; in timm's BatchNormAct2d the
        # SiLU saves the norm input's code mapped through the norm's affine (ops.norm.output_code).
        ("BatchNorm2d then SiLU (two modules), separate uint8 codes",
         lambda: nn.Sequential(nn.BatchNorm2d(16), nn.SiLU()), act_shape, {"forward": True}),
        ("BatchNormAct2d with SiLU (timm), the SiLU's code shared with the norm input",
         lambda: BatchNormAct2d(16, act_layer=nn.SiLU), act_shape, {"forward": True}),
        ("GELU, uint8 + closed-form backward", nn.GELU, tok_shape, {"forward": True, "input": False}),
        ("GELU (tanh approximation), uint8 + closed-form backward", lambda: nn.GELU(approximate="tanh"), tok_shape,
         {"forward": True, "input": False}),
        ("Sigmoid, uint8 + closed-form backward", nn.Sigmoid, act_shape, {"forward": True, "input": False}),
        ("Tanh, uint8 + closed-form backward", nn.Tanh, act_shape, {"forward": True, "input": False}),
        ("Hardswish, uint8 + closed-form backward", nn.Hardswish, act_shape, {"forward": True, "input": False}),
        ("Hardsigmoid, uint8 + closed-form backward", nn.Hardsigmoid, act_shape, {"forward": True, "input": False}),
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


def _padding_convs(c_in: int):
    """(label, module factory, zero-padded reference label) for convs that pad their input themselves."""
    from timm.layers import StdConv2d, create_conv2d

    ref1, ref2 = "zero padding 3×3 s1 (reference)", "zero padding 3×3 s2 (reference)"
    return [
        (ref1, lambda: nn.Conv2d(c_in, 32, 3, padding=1), ref1),
        ("reflect padding 3×3 s1", lambda: nn.Conv2d(c_in, 32, 3, padding=1, padding_mode="reflect"), ref1),
        ("replicate padding 3×3 s1", lambda: nn.Conv2d(c_in, 32, 3, padding=1, padding_mode="replicate"), ref1),
        ("circular padding 3×3 s1", lambda: nn.Conv2d(c_in, 32, 3, padding=1, padding_mode="circular"), ref1),
        # 'same' with an even kernel pads 1 before and 2 after: the blocks shift by one pixel.
        ("timm Conv2dSame 4×4 s1 ('same')", lambda: create_conv2d(c_in, 32, 4, stride=1, padding="same"), ref1),
        (ref2, lambda: nn.Conv2d(c_in, 32, 3, stride=2, padding=1), ref2),
        # stride 2 on an even map pads 0 before and 1 after: the blocks still start at the image's corner.
        ("timm Conv2dSame 3×3 s2 ('same')", lambda: create_conv2d(c_in, 32, 3, stride=2, padding="same"), ref2),
        ("timm StdConv2d 3×3 s1", lambda: StdConv2d(c_in, 32, 3, padding=1), ref1),
    ]


def _saved(m0: nn.Module, spec, x: torch.Tensor) -> int:
    m = copy.deepcopy(m0)
    if spec is not None:
        actcomp.compress(m, spec)
    # A leaf that needs grad, as a feature map inside a network: F.pad then keeps its input for backward.
    return actcomp.saved_bytes(m, x.clone().requires_grad_(True)).total_bytes


def measure_padding(cfg: DictConfig) -> pd.DataFrame:
    """Weight-gradient error (per input, per pooling preset) and saved bytes of self-padding convs."""
    c = cfg.padding
    for p in list(c.presets) + list(c.bytes_presets):
        actcomp.get_preset(p)
    for p in c.bytes_presets:
        if actcomp.get_preset(p).peer != "none":  # saved_bytes cannot see through a peer's hooks
            raise actcomp.ActcompError(f"padding.bytes_presets: {p!r} is a peer preset; give a conversion preset")
    if not c.inputs:
        raise actcomp.ActcompError("padding.inputs is empty; give e.g. padding.inputs=[block_constant]")
    rows = []
    for kind in c.inputs:
        x, desc = _conv_input(kind, cfg.seed)
        for label, make, ref in _padding_convs(x.shape[1]):
            torch.manual_seed(cfg.seed)
            conv = make()
            for p in c.presets:
                w = next(r for r in _compare(conv, p, x, cfg.seed + 1) if r["output"] == "weight")
                rows.append(dict(part="weight_grad", conv=label, reference=ref, preset=p, input=desc,
                                 shape=_shape(x), bitwise=w["bitwise"], rel_l2=w["rel_l2"], cosine=w["cosine"]))
            if kind == c.inputs[0]:  # bytes depend on shapes only
                native = _saved(conv, None, x)
                for p in c.bytes_presets:
                    b = _saved(conv, p, x)
                    rows.append(dict(part="saved_bytes", conv=label, reference=ref, preset=p, input=desc,
                                     shape=_shape(x), saved_bytes_native=native, saved_bytes=b,
                                     ratio_to_native=b / native))
    df = pd.DataFrame(rows)
    df["seed"], df["torch_threads"] = cfg.seed, torch.get_num_threads()
    return df


def _all_grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    F.cross_entropy(model(x), y).backward()
    return torch.cat([p.grad.flatten() if p.grad is not None else torch.zeros(p.numel())
                      for p in model.parameters()]).double()


def measure_whole_model(cfg: DictConfig) -> pd.DataFrame:
    """Cosine and rel. L2 of all parameter gradients concatenated, compressed vs native, per batch × image size."""
    from actcomp.models import build_model

    c = cfg.whole_model
    for p in c.presets:
        actcomp.get_preset(p)
    points = [tuple(int(v) for v in pt) for pt in c.points]
    if not points or any(len(pt) != 2 or min(pt) < 1 for pt in points):
        raise actcomp.ActcompError(f"whole_model.points: give [batch, img_size] pairs of positive ints, got {points}")
    if c.input not in ("fashion_mnist", "noise"):
        raise actcomp.ActcompError(f"whole_model.input: unknown input {c.input!r}; known: fashion_mnist, noise")
    batches = {}
    for batch, size in points:
        if c.input == "noise":  # i.i.d. pixels: the hard case for conv pooling, nothing like an image
            g = torch.Generator().manual_seed(cfg.seed)
            batches[batch, size] = (torch.randn(batch, 1, size, size, generator=g),
                                    torch.randint(0, 10, (batch,), generator=g))
        else:
            from actcomp.data import build_data

            val = build_data("fashion_mnist", image_size=size, resize="resize").val
            items = [val[i] for i in range(batch)]
            batches[batch, size] = (torch.stack([t[0] for t in items]), torch.tensor([int(t[1]) for t in items]))
    rows = []
    for name in c.models:
        torch.manual_seed(cfg.seed)
        m0 = build_model(name, num_classes=10, in_chans=1).train()
        for batch, size in points:
            x, y = batches[batch, size]
            ref = _all_grads(copy.deepcopy(m0), x, y)
            for p in c.presets:
                m = actcomp.compress(copy.deepcopy(m0), p)
                got = _all_grads(m, x, y)
                rows.append(dict(model=name, preset=p, batch_size=batch, img_size=size, input=c.input,
                                 cosine=F.cosine_similarity(got, ref, dim=0).item(),
                                 rel_l2=((got - ref).norm() / ref.norm()).item()))
    df = pd.DataFrame(rows)
    df["seed"], df["torch_threads"] = cfg.seed, torch.get_num_threads()
    return df


def measure_grad_cosine(cfg: DictConfig) -> pd.DataFrame:
    """Per-layer cosine between compressed and exact weight gradients on one real Fashion-MNIST batch, after
    ``warm_steps`` native SGD steps (a fresh init has zero gradients behind its zero-init last BN gammas).

    Runs with ``grad_cosine.threads`` torch threads (restored after): the warm-up steps' summation order depends
    on the thread count, and the cosines of the warmed-up model amplify that (up to 0.2 between 1 and 2 threads;
    at a fixed count a re-run gives bitwise the same cosines on the same kind of CPU).
    """
    from .sweep import check_block

    c = cfg.grad_cosine
    for key, lo in (("batch_size", 1), ("img_size", 1), ("warm_steps", 0), ("threads", 1)):
        check_int(c.get(key), f"grad_cosine.{key}", lo)
    if not c.presets:
        raise actcomp.ActcompError("grad_cosine.presets is empty; give e.g. grad_cosine.presets=[pool4]")
    for p in c.presets:
        check_block(c.img_size, p)  # also rejects an unknown preset
    n = torch.get_num_threads()
    torch.set_num_threads(int(c.threads))
    try:
        df = _grad_cosines(c)
    finally:
        torch.set_num_threads(n)
    df["seed"], df["torch_threads"] = 0, int(c.threads)
    return df


def _grad_cosines(c) -> pd.DataFrame:
    from actcomp.data import build_data
    from actcomp.diagnostics import grad_cosine
    from actcomp.models import build_model
    from actcomp.step import train_step

    torch.manual_seed(0)
    data = build_data("fashion_mnist", image_size=c.img_size, channels=3, resize="pad", subset_train=2048, subset_seed=0)
    loader = torch.utils.data.DataLoader(data.train, batch_size=c.batch_size, shuffle=True,
                                         generator=torch.Generator().manual_seed(0))
    model = build_model(c.model, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    batches = iter(loader)
    for _ in range(c.warm_steps):
        train_step(model, opt, *next(batches))
    x, y = next(batches)
    rows = [dict(model=c.model, preset=p, layer=layer, cosine=cos)
            for p in c.presets for layer, cos in grad_cosine(model, p, x, y).items()]
    return pd.DataFrame(rows)


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
    return df


def measure_parts(cfg: DictConfig) -> dict[str, pd.DataFrame]:
    """Every requested part, measured before anything is written (bad input leaves earlier CSVs untouched)."""
    parts = list(cfg.parts)
    bad = [p for p in parts if p not in PARTS]
    if bad or not parts:
        raise actcomp.ActcompError(f"parts: unknown or empty {bad or parts}; known: {', '.join(PARTS)}")
    fns = {"ops": measure, "padding": measure_padding, "whole_model": measure_whole_model,
           "grad_cosine": measure_grad_cosine}
    out = {}
    for p in parts:
        df = fns[p](cfg)
        for k, v in provenance_row("cpu").items():
            df[k] = v
        out[p] = df
    return out


@hydra.main(config_path=str(CONF_DIR), config_name="exactness", version_base=VERSION_BASE)
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(int(cfg.threads))  # reduction order depends on the thread count
    out = Path(hydra.utils.to_absolute_path(cfg.out_dir)) / "exactness"
    try:
        dfs = measure_parts(cfg)
        for part, df in dfs.items():
            atomic_write_csv(df, out / CSV_OF[part])
    except (actcomp.ActcompError, OSError) as e:
        fail(e)
    cols = {"ops": ["op", "preset", "output", "bitwise", "rel_l2", "cosine"],
            "padding": ["part", "conv", "preset", "input", "rel_l2", "cosine", "ratio_to_native"],
            "whole_model": ["model", "preset", "batch_size", "img_size", "cosine", "rel_l2"],
            "grad_cosine": ["model", "preset", "layer", "cosine"]}
    with pd.option_context("display.width", 200, "display.max_rows", 500, "display.max_colwidth", 48):
        for part, df in dfs.items():
            print(df[[c for c in cols[part] if c in df]].to_string(index=False, float_format="{:.3g}".format))
            print(f"wrote {out / CSV_OF[part]}")


if __name__ == "__main__":
    sys.exit(main())
