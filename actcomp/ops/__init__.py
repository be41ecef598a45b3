"""Compressed-activation autograd functions. Each module states what is exact and what is approximated."""
from .act import CLOSED_FORM_ACTS, ClosedFormActivation, activation
from .code import CodedConv2d, coded_nbytes, decode, encode, pack_codes, unpack_codes
from .conv import PooledConv2d, pool_blocks, pooled_nbytes, unpool_blocks
from .linear import Int8Linear, Int8ScaleMul
from .mask import MaskedActivation, hardtanh, leaky_relu, relu
from .norm import ClosedFormNorm, batch_norm, group_norm, layer_norm
from .pool import CompactMaxPool2d, max_pool2d
from .quant import (
    dequantize_uint8,
    pack_bits,
    packed_bits_nbytes,
    quantize_uint8,
    quantized_nbytes,
    unpack_bits,
)
from .recompute import RecomputeFromInt8, recompute

__all__ = [
    "CodedConv2d", "coded_nbytes", "decode", "encode", "pack_codes", "unpack_codes",
    "PooledConv2d", "pool_blocks", "pooled_nbytes", "unpool_blocks", "Int8ScaleMul", "Int8Linear",
    "MaskedActivation", "hardtanh", "leaky_relu", "relu", "CompactMaxPool2d", "max_pool2d",
    "dequantize_uint8", "pack_bits", "packed_bits_nbytes", "quantize_uint8", "quantized_nbytes", "unpack_bits",
    "RecomputeFromInt8", "recompute", "CLOSED_FORM_ACTS", "ClosedFormActivation", "activation", "ClosedFormNorm",
    "batch_norm", "group_norm", "layer_norm",
]
