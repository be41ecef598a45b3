"""Saved-for-backward accounting: what autograd keeps after a forward pass, by op and by layer.

A walk over the autograd graph reads every node's saved tensors (``_saved_*`` of built-in nodes,
``saved_tensors`` of custom functions), counts each storage once (a storage saved by several ops is counted
under the op that runs last in the forward pass) and leaves out parameters and buffers. Works on CPU, CUDA
and ``meta`` (storages are told apart by their C++ identity, not by data pointers, which are 0 on meta).

Models converted with a hook-based peer (``ckpt``, ``int8``, ``offload``) hide their saved tensors behind
hooks; use :mod:`actcomp.measure` (peak of a training step) for those.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn

# Built-in autograd node name prefixes -> op kind.
_KINDS = [
    ("Convolution", "conv input"), ("Cudnn", "conv input"), ("MkldnnConvolution", "conv input"),
    ("NativeBatchNorm", "norm input"), ("CudnnBatchNorm", "norm input"), ("NativeLayerNorm", "norm input"),
    ("NativeGroupNorm", "norm input"), ("BatchNorm", "norm input"),
    ("Relu", "activation"), ("Threshold", "activation"), ("Hardtanh", "activation"), ("LeakyRelu", "activation"),
    ("Silu", "activation"), ("Gelu", "activation"), ("Hardswish", "activation"), ("Hardsigmoid", "activation"),
    ("Sigmoid", "activation"), ("Tanh", "activation"), ("Mish", "activation"), ("Elu", "activation"),
    ("MaxPool", "pool"), ("AvgPool", "pool"), ("AdaptiveMaxPool", "pool"),
    ("Addmm", "linear input"), ("Mm", "linear input"), ("Linear", "linear input"), ("Bmm", "matmul"),
    ("Mul", "mul"), ("Div", "mul"), ("ScaledDotProduct", "attention"), ("Softmax", "attention"),
]


def kind_of(node) -> str:
    k = getattr(node, "kind", None)
    if isinstance(k, str):
        return k
    name = node.name()
    for prefix, kind in _KINDS:
        if name.startswith(prefix):
            return kind
    return "other"


def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


def _storage_nbytes(t: torch.Tensor) -> int:
    return t.untyped_storage().nbytes()


def _saved_of(node):
    if hasattr(node, "saved_tensors") and hasattr(node, "_forward_cls"):
        try:
            return [t for t in node.saved_tensors if isinstance(t, torch.Tensor)]
        except RuntimeError:
            return []
    out = []
    for attr in dir(node):
        if not attr.startswith("_saved_"):
            continue
        v = getattr(node, attr)
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, (tuple, list)):
            out.extend(t for t in v if isinstance(t, torch.Tensor))
    return out


def walk(roots):
    """All autograd nodes reachable from ``roots`` (grad_fns), each once."""
    seen, stack, nodes = set(), [r for r in roots if r is not None], []
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        nodes.append(n)
        stack.extend(nxt for nxt, _ in n.next_functions if nxt is not None)
    return nodes


@dataclass
class SavedReport:
    """Bytes saved for backward; ``rows``: one dict per counted storage (node, kind, layer, bytes, dtype, shape)."""

    total_bytes: int
    by_kind: dict[str, int]
    rows: list[dict] = field(repr=False)

    def frame(self):
        import pandas as pd

        return pd.DataFrame(self.rows)

    def by_layer(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.rows:
            if r["layer"]:
                out[r["layer"]] = out.get(r["layer"], 0) + r["bytes"]
        return out


def report_from_graph(outputs, exclude: nn.Module | None = None) -> SavedReport:
    roots = [o.grad_fn for o in (outputs if isinstance(outputs, (list, tuple)) else [outputs])
             if isinstance(o, torch.Tensor)]
    excluded = set()
    if exclude is not None:
        excluded = {_storage_key(t) for t in list(exclude.parameters()) + list(exclude.buffers())}
    # Latest forward op first, so a shared storage is attributed to the op that ran last.
    nodes = sorted(walk(roots), key=lambda n: -n._sequence_nr())
    seen, rows, by_kind = set(excluded), [], {}
    for n in nodes:
        kind = kind_of(n)
        for t in _saved_of(n):
            key = _storage_key(t)
            if key in seen:
                continue
            seen.add(key)
            nb = _storage_nbytes(t)
            rows.append(dict(node=n.name(), kind=kind, layer=getattr(n, "actcomp_name", "") or "",
                             bytes=nb, dtype=str(t.dtype), shape=tuple(t.shape)))
            by_kind[kind] = by_kind.get(kind, 0) + nb
    return SavedReport(sum(by_kind.values()), by_kind, rows)


def saved_bytes(model: nn.Module, example_input: torch.Tensor) -> SavedReport:
    """One training-mode forward of ``model`` on ``example_input``; what autograd keeps for backward."""
    from .convert import config_of

    cfg = config_of(model)
    if cfg is not None and cfg.peer != "none":
        raise ValueError(f"saved_bytes() cannot see through peer {cfg.peer!r}'s hooks; use actcomp.measure instead")
    was = model.training
    model.train()
    try:
        with torch.enable_grad():
            out = model(example_input)
        return report_from_graph(out, exclude=model)
    finally:
        model.train(was)


def conv_table(model: nn.Module, example_input: torch.Tensor, blocks=(2, 4)):
    """Per-conv table as in the study: weight MiB, saved-input MiB and b×b-pooled MiB, measured.

    Each column is the bytes the conv's autograd node really saves when the model is run through the
    compressed function with that b (b=1 is the full input, measured via the authors' copy path).
    """
    import pandas as pd

    from .convert import compress, config_of, restore

    prev = config_of(model)
    mib = 2.0**20
    cols = {}
    try:
        for b in (1, *blocks):
            compress(model, {"block": b, "copy_b1": b == 1, "name": f"pool{b}"})
            rep = saved_bytes(model, example_input)
            cols[b] = {r["layer"]: r["bytes"] for r in rep.rows if r["kind"] == "conv input" and r["layer"]}
    finally:
        restore(model)
        if prev is not None:
            compress(model, prev)
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    rows = []
    for name, m in convs.items():
        row = dict(layer=name, weight_mib=m.weight.numel() * m.weight.element_size() / mib,
                   input_mib=cols[1].get(name, 0) / mib)
        for b in blocks:
            row[f"pool{b}_mib"] = cols[b].get(name, 0) / mib
        rows.append(row)
    df = pd.DataFrame(rows)
    total = {"layer": "TOTAL", **{c: df[c].sum() for c in df.columns if c != "layer"}}
    return pd.concat([df, pd.DataFrame([total])], ignore_index=True)
