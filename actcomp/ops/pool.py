"""Max-pool that saves window offsets (uint8) instead of its input and int64 indices.

Exact: the gradient of max-pooling only routes each output gradient to its argmax, and the argmax is
stored losslessly as an offset inside the k×k window (k*k <= 256).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair


class CompactMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, name):
        k, s, p, d = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding), _pair(dilation)
        y, idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
        h0, w0 = _window_origins(y.shape[-2:], s, p, x.device)
        width = x.shape[-1]
        ih, iw = idx // width, idx % width
        off = ((ih - h0) // d[0]) * k[1] + (iw - w0) // d[1]
        ctx.conf = (k, s, p, d, x.shape)
        ctx.actcomp_name, ctx.kind = name, "pool"
        ctx.save_for_backward(off.to(torch.uint8))
        return y

    @staticmethod
    def backward(ctx, dy):
        (off,) = ctx.saved_tensors
        k, s, p, d, shape = ctx.conf
        h0, w0 = _window_origins(dy.shape[-2:], s, p, dy.device)
        off = off.long()
        idx = (h0 + (off // k[1]) * d[0]) * shape[-1] + (w0 + (off % k[1]) * d[1])
        n, c, h, w = shape
        dx = dy.new_zeros(n, c, h * w).scatter_add_(2, idx.flatten(2), dy.flatten(2))
        return dx.view(shape), None, None, None, None, None, None


def _window_origins(out_hw, s, p, device):
    h0 = (torch.arange(out_hw[0], device=device) * s[0] - p[0]).view(-1, 1)
    w0 = (torch.arange(out_hw[1], device=device) * s[1] - p[1]).view(1, -1)
    return h0, w0


def max_pool2d(x, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False, name=""):
    k = _pair(kernel_size)
    if k[0] * k[1] > 256:
        return F.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode=ceil_mode)
    return CompactMaxPool2d.apply(x, kernel_size, stride, padding, dilation, ceil_mode, name)
