"""How a float32 tensor travels: as fp32, fp16, bf16, or int8 with one fp32 scale per row (last axis); sample
ids travel as int32.

Bit for bit the encoding of the reference federation's meter (simulation/accounting.py, in torch), so a device
and the server decode exactly what the reference's receiver decoded: fp16 and bf16 round to nearest even, int8
is round-half-even of value / scale with scale = max(|row|, 1e-12) / 127. `bytes` carries opaque data (a bundle).
"""
from __future__ import annotations

import math

import numpy as np

WIRES = ("fp32", "fp16", "bf16", "int8", "bytes", "int32")
FLOAT_WIRES = WIRES[:4]


def float_to_bf16_bits(x: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), round to nearest even; NaN stays NaN."""
    bits = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))) >> np.uint32(16))
    nan = np.isnan(x)
    return np.where(nan, np.uint32(0x7FC0), rounded).astype(np.uint16)


def bf16_bits_to_float(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def encode(tensor: np.ndarray, wire: str) -> list[np.ndarray]:
    """The arrays that are sent for one tensor (little-endian, C order)."""
    if wire == "bytes":
        return [np.frombuffer(bytes(tensor), np.uint8) if not isinstance(tensor, np.ndarray) else
                np.ascontiguousarray(tensor).view(np.uint8).reshape(-1)]
    if wire == "int32":
        ids = np.asarray(tensor)
        if ids.dtype.kind not in "iu" or (ids.size and (ids.min() < -2**31 or ids.max() >= 2**31)):
            raise ValueError(f"int32 carries integers that fit 32 bits, got {ids.dtype} values")
        return [ids.astype("<i4")]
    x = np.ascontiguousarray(tensor, dtype=np.float32)
    if wire == "fp32":
        return [x.astype("<f4", copy=False)]      # no copy: the message copies it into its buffer
    if wire == "fp16":
        return [x.astype("<f2")]
    if wire == "bf16":
        return [float_to_bf16_bits(x).astype("<u2")]
    if wire == "int8":
        if x.ndim == 0:
            x = x.reshape(1)
        scale = (np.maximum(np.abs(x).max(axis=-1, keepdims=True, initial=0.0), np.float32(1e-12))
                 / np.float32(127.0)).astype(np.float32)
        values = np.clip(np.round(x / scale), -127, 127).astype(np.int8)
        return [values, scale.astype("<f4")]
    raise ValueError(f"unknown wire encoding {wire!r}; choose one of {', '.join(WIRES)}")


_F32, _F16, _U16, _I8, _U8, _I32 = (np.dtype(t) for t in ("<f4", "<f2", "<u2", np.int8, np.uint8, "<i4"))


def part_layout(shape: tuple[int, ...], wire: str) -> list[tuple[np.dtype, tuple[int, ...]]]:
    """(dtype, shape) of each part `encode` produces for a tensor of this shape: what a receiver expects."""
    if wire == "fp32":
        return [(_F32, shape)]
    if wire == "fp16":
        return [(_F16, shape)]
    if wire == "bf16":
        return [(_U16, shape)]
    if wire == "int8":
        rows = shape if shape else (1,)
        return [(_I8, rows), (_F32, (*rows[:-1], 1))]
    if wire == "bytes":
        return [(_U8, shape)]
    if wire == "int32":
        return [(_I32, shape)]
    raise ValueError(f"unknown wire encoding {wire!r}; choose one of {', '.join(WIRES)}")


def decode(parts: list[np.ndarray], wire: str, shape: tuple[int, ...]) -> np.ndarray:
    """float32 for the float wires (what the receiver computes with); uint8 for bytes, int32 for ids."""
    if wire in ("bytes", "int32"):
        return parts[0]
    if wire == "fp32":
        return parts[0].astype(np.float32, copy=False)   # a view of the received bytes when it can be
    if wire == "fp16":
        return parts[0].astype(np.float32)
    if wire == "bf16":
        return bf16_bits_to_float(parts[0])
    values, scale = parts
    return (values.astype(np.float32) * scale).reshape(shape)


def encoded_bytes(shape: tuple[int, ...], wire: str) -> int:
    return sum(dtype.itemsize * math.prod(s) for dtype, s in part_layout(shape, wire))
