"""Measured cost of a client's round: the bytes of the exact tensors that cross the wire, and its FLOPs.

Every tensor that crosses between client and server in the simulation goes through `ClientMeter.up` or
`ClientMeter.down`, which encode it in its wire dtype, count the encoded bytes and hand the receiver the decoded
tensor, so accuracy includes the precision lost on the wire. Client compute runs inside
`ClientMeter.client_compute()`, counted by `torch.utils.flop_counter.FlopCounterMode` on the ops actually run
(matmuls, convolutions, attention; forward and backward). Both work on meta tensors, so the same code counts a
ViT-B/16 round without computing it.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

from sfp_common.errors import ConfigError

_aten = torch.ops.aten
# FlopCounterMode knows the CUDA attention kernels but not the CPU one timm's fused attention runs here; without
# these two formulas a CPU round silently counts no attention at all. The backward counts attention's four
# matmuls (2x the forward), as the unfused path does on every device; the kernel's recomputation is not counted.
if _aten._scaled_dot_product_flash_attention_for_cpu not in flop_counter.flop_registry:
    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu)
    def _cpu_attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

    @flop_counter.register_flop_formula(_aten._scaled_dot_product_flash_attention_for_cpu_backward)
    def _cpu_attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, out_shape=None,
                                      **kwargs) -> int:
        return 2 * flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)

WIRE_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16, "int8": torch.int8,
               "int32": torch.int32}      # int32: sample ids


def encode(tensor: torch.Tensor, wire: str) -> list[torch.Tensor]:
    """The tensors that are actually sent: a cast, or int8 values plus one fp32 scale per row (last axis)."""
    if wire not in WIRE_DTYPES:
        raise ConfigError(f"unknown wire dtype {wire!r}; choose one of {', '.join(WIRE_DTYPES)}")
    tensor = tensor.detach()
    if wire != "int8":
        # Always a copy: what was sent must not change when the sender's tensor is later updated in place.
        return [tensor.to(WIRE_DTYPES[wire], copy=True)]
    scale = tensor.abs().amax(dim=-1, keepdim=True).float().clamp_min(1e-12) / 127.0
    return [torch.round(tensor / scale).clamp(-127, 127).to(torch.int8), scale]


def decode(parts: list[torch.Tensor], wire: str) -> torch.Tensor:
    if wire == "int32":
        return parts[0]
    if wire == "int8":
        values, scale = parts
        return values.float() * scale
    return parts[0].float()


def wire_bytes(parts: list[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in parts)


@dataclass
class ClientMeter:
    """What one client cost in one round."""

    bytes_up: int = 0
    bytes_down: int = 0
    flops: int = 0
    count_flops: bool = True    # the counter costs ~0.2 ms an op; the engine counts once on meta tensors instead

    def up(self, tensor: torch.Tensor, wire: str = "fp32") -> torch.Tensor:
        """Client -> server; returns what the server decodes."""
        parts = encode(tensor, wire)
        self.bytes_up += wire_bytes(parts)
        return decode(parts, wire)

    def down(self, tensor: torch.Tensor, wire: str = "fp32") -> torch.Tensor:
        """Server -> client; returns what the client decodes."""
        parts = encode(tensor, wire)
        self.bytes_down += wire_bytes(parts)
        return decode(parts, wire)

    @contextmanager
    def client_compute(self) -> Iterator[None]:
        if not self.count_flops:
            yield
            return
        counter = FlopCounterMode(display=False)
        with counter:
            yield
        self.flops += counter.get_total_flops()
