"""Max-pool that saves window offsets (uint8) instead of its input and int64 indices.

Exact: the gradient of max-pooling only routes each output gradient to its argmax, and the argmax is
stored losslessly as an offset inside the k×k window (k*k <= 256).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from .quant import chunk_rows


class CompactMaxPool2d(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kernel_size, stride, padding, dilation, ceil_mode, name):
        k, s, p, d = _pair(kernel_size), _pair(stride or kernel_size), _pair(padding), _pair(dilation)
        y, idx = F.max_pool2d(x, k, s, p, d, ceil_mode=ceil_mode, return_indices=True)
        h0, w0 = _window_origins(y.shape[-2:], s, p, x.device)
        off = torch.empty(y.shape, dtype=torch.uint8, device=y.device)
        # Per chunk of (n, c) planes: the int64 index arithmetic at full size used to set the forward peak
        # (ResNet stem: five int64 temporaries the size of the pooled output).
        idx_r, off_r = idx.reshape(-1, *idx.shape[-2:]), off.view(-1, *off.shape[-2:])  # reshape: channels_last
        step = chunk_rows((idx_r.shape[0], idx_r.shape[1] * idx_r.shape[2]), idx.device)
        width = x.shape[-1]
        for i in range(0, idx_r.shape[0], step):
            ic = idx_r[i:i + step]
            ih = torch.div(ic, width, rounding_mode="floor")
            iw = torch.remainder(ic, width)
            ih.sub_(h0).div_(d[0], rounding_mode="floor").mul_(k[1])
            ih.add_(iw.sub_(w0).div_(d[1], rounding_mode="floor"))
            off_r[i:i + step].copy_(ih)
        ctx.conf = (k, s, p, d, x.shape)
        ctx.actcomp_name, ctx.kind = name, "pool"
        ctx.save_for_backward(off)
        return y

    @staticmethod
    def backward(ctx, dy):
        (off,) = ctx.saved_tensors
        k, s, p, d, shape = ctx.conf
        h0, w0 = _window_origins(dy.shape[-2:], s, p, dy.device)
        n, c, h, w = shape
        dx = dy.new_zeros(n * c, h * w)
        # (n, c) planes are independent: scatter per chunk, so the int64 indices exist for one chunk at a time.
        off_r, dy_r = off.view(n * c, -1), dy.reshape(n * c, -1)
        step = chunk_rows(off_r.shape, dy.device)
        for i in range(0, n * c, step):
            oc = off_r[i:i + step].long()
            idx = torch.div(oc, k[1], rounding_mode="floor").view(-1, *dy.shape[-2:])
            idx.mul_(d[0]).add_(h0).mul_(w)
            idx.add_(oc.remainder_(k[1]).mul_(d[1]).view_as(idx).add_(w0))
            dx[i:i + step].scatter_add_(1, idx.view(idx.shape[0], -1), dy_r[i:i + step])
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
