"""One protocol message as bytes: `SFPW`, a little-endian uint32 header length, a JSON header, the payload.

The header says what the message is (type, protocol version, device, round, sequence number, free-form `meta`)
and how to read the payload: each tensor's name, wire encoding and shape, in payload order, the payload's size
and its CRC-32. The payload is the encoded tensors' raw little-endian bytes, back to back: exactly the bytes the
reference federation counts, so what crosses the wire = payload + this envelope's overhead.

`unpack` trusts nothing: every field is checked, sizes are computed from the declared shapes and must equal the
payload received, and float tensors must be finite. A bad message raises WireError with the reason; the caller
logs it, counts it and carries on.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from wire_protocol.codec import FLOAT_WIRES, WIRES, decode, encode, encoded_bytes, part_layout

MAGIC = b"SFPW"
VERSION = 1
PREFIX = struct.Struct("<4sI")
MAX_HEADER = 1 << 20            # 1 MiB of JSON is far more than any header needs
MAX_ELEMENTS = 1 << 31          # per tensor
TYPES = (
    "enroll", "enrolled", "refused",           # device <-> server: registration and its bundle
    "round", "update", "report",               # a round's plan and global state; the trained tensors; evaluation
    "forward", "features", "backward", "gradient",   # split training: device <-> body worker
    "error",                                   # a request that could not be served, with its reason
)


class WireError(ValueError):
    """A message that cannot be accepted; str() is the reason, for the log and the refusal counter."""


@dataclass
class Message:
    type: str
    device: str
    round: int = 0
    seq: int = 0
    meta: dict[str, Any] = field(default_factory=dict)
    tensors: dict[str, np.ndarray] = field(default_factory=dict)   # float32 (decoded) or uint8 (bytes wire)
    wires: dict[str, str] = field(default_factory=dict)            # name -> wire encoding; default fp32
    payload_bytes: int = 0                                         # set by pack / unpack


def pack(message: Message) -> bytearray:
    """The message as bytes; sets `payload_bytes` (the encoded tensors alone)."""
    if message.type not in TYPES:
        raise WireError(f"unknown message type {message.type!r}")
    specs, parts = [], []
    for name, tensor in message.tensors.items():
        wire = message.wires.get(name, "fp32")
        encoded = encode(tensor, wire)
        shape = list(np.shape(tensor)) if wire != "bytes" else [int(encoded[0].size)]
        specs.append({"name": name, "wire": wire, "shape": shape})
        parts.extend(np.ascontiguousarray(p).reshape(-1).view(np.uint8) for p in encoded)
    size, crc = sum(p.nbytes for p in parts), 0
    for p in parts:
        crc = zlib.crc32(p, crc)
    header = {"v": VERSION, "type": message.type, "device": message.device, "round": int(message.round),
              "seq": int(message.seq), "meta": message.meta, "tensors": specs, "payload": size, "crc32": crc}
    head = json.dumps(header, separators=(",", ":"), allow_nan=False).encode()
    message.payload_bytes = size
    out = bytearray(PREFIX.size + len(head) + size)          # the tensors are copied once, straight in
    PREFIX.pack_into(out, 0, MAGIC, len(head))
    offset = PREFIX.size + len(head)
    out[PREFIX.size:offset] = head
    target = np.frombuffer(out, np.uint8)
    for p in parts:
        target[offset:offset + p.nbytes] = p
        offset += p.nbytes
    return out


def _field(header: dict, name: str, kind: type | tuple[type, ...]):
    value = header.get(name)
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise WireError(f"header field {name!r} is missing or not {getattr(kind, '__name__', kind)}")
    return value


def unpack(data: bytes | bytearray, max_bytes: int | None = None) -> Message:
    """Parse and check one message; raises WireError saying what is wrong."""
    if max_bytes is not None and len(data) > max_bytes:
        raise WireError(f"message of {len(data)} bytes exceeds the limit of {max_bytes}")
    if len(data) < PREFIX.size:
        raise WireError(f"message of {len(data)} bytes is too short for an envelope")
    magic, head_len = PREFIX.unpack_from(data)
    if magic != MAGIC:
        raise WireError("not a protocol message (bad magic)")
    if head_len > min(MAX_HEADER, len(data) - PREFIX.size):
        raise WireError(f"header length {head_len} exceeds the message")
    try:
        header = json.loads(data[PREFIX.size:PREFIX.size + head_len])
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    if header.get("v") != VERSION:
        raise WireError(f"protocol version {header.get('v')!r} is not supported (this side speaks {VERSION})")
    kind = _field(header, "type", str)
    if kind not in TYPES:
        raise WireError(f"unknown message type {kind!r}")
    device, round_index, seq = _field(header, "device", str), _field(header, "round", int), _field(header, "seq", int)
    meta, specs = _field(header, "meta", dict), _field(header, "tensors", list)
    declared, crc = _field(header, "payload", int), _field(header, "crc32", int)
    payload = memoryview(data)[PREFIX.size + head_len:]
    layouts, names, wires, total = [], [], {}, 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise WireError("a tensor spec is not an object")
        name, wire, shape = spec.get("name"), spec.get("wire"), spec.get("shape")
        if not isinstance(name, str) or name in wires:
            raise WireError(f"tensor name {name!r} is missing or repeated")
        if wire not in WIRES:
            raise WireError(f"tensor {name}: unknown wire encoding {wire!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape)):
            raise WireError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if math.prod(shape) > MAX_ELEMENTS or (wire == "int8" and not shape):
            raise WireError(f"tensor {name}: shape {shape} is not acceptable")
        names.append(name)
        wires[name] = wire
        layouts.append((name, tuple(shape), wire))
        total += encoded_bytes(tuple(shape), wire)
    if total != declared or declared != len(payload):
        raise WireError(f"declared tensors need {total} bytes, header says {declared}, payload is {len(payload)}")
    if zlib.crc32(payload) != crc:
        raise WireError("payload checksum mismatch: corrupted in transit")
    tensors, offset = {}, 0
    for name, shape, wire in layouts:
        parts = []
        for dtype, part_shape in part_layout(shape, wire):
            count = math.prod(part_shape)
            parts.append(np.frombuffer(payload, dtype, count, offset).reshape(part_shape))
            offset += count * dtype.itemsize
        value = decode(parts, wire, shape)
        # One pass, no copy: a float64 sum of float32 values cannot overflow, so it is finite iff they all are.
        if wire in FLOAT_WIRES and not np.isfinite(value.sum(dtype=np.float64)):
            raise WireError(f"tensor {name} holds NaN or Inf")
        tensors[name] = value
    return Message(kind, device, round_index, seq, meta, tensors, wires, len(payload))
