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
from dataclasses import dataclass, field
from typing import Any

import numpy as np

try:            # the same CRC-32, about 15x faster (SIMD, x86 and ARM); zlib's where zlib-ng has no wheel
    from zlib_ng.zlib_ng import crc32
except ImportError:                 # pragma: no cover
    from zlib import crc32

from wire_protocol.codec import FLOAT_WIRES, WIRES, decode, encode, encoded_bytes, part_layout

# zlib's and zlib-ng's crc32 release the GIL for more than 5 KiB; while paho's network thread wants it, each
# release and reacquisition costs more CPU than the checksum itself (measured: 10-14 us of a 16 KB message's 36 us
# of sender CPU; bench/transport.py). So a small buffer is checksummed in slices that keep it; a large one whole,
# where running beside the network thread pays.
CRC_SLICE = 4 << 10
CRC_WHOLE = 256 << 10

MAGIC = b"SFPW"
VERSION = 1
PREFIX = struct.Struct("<4sI")
MAX_HEADER = 1 << 20            # 1 MiB of JSON is far more than any header needs
MAX_ELEMENTS = 1 << 31          # per tensor
_JSON = json.JSONEncoder(separators=(",", ":"), allow_nan=False)   # json.dumps(**options) builds one per call
TYPES = (
    "enroll", "enrolled", "refused",           # device <-> server: registration and its bundle
    "enrolling",                               # server -> device: the answer is being made (a bundle exported)
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


def frame(message: Message) -> list[bytes | memoryview]:
    """The message as a list of buffers, not yet joined: the prefix and header, then each encoded tensor part.
    `pack` joins them; chunking copies each straight into its packet, so a tensor is copied once on the way out.
    Sets `payload_bytes` (the encoded tensors alone)."""
    if message.type not in TYPES:
        raise WireError(f"unknown message type {message.type!r}")
    specs, parts, size, crc = [], [], 0, 0
    for name, tensor in message.tensors.items():
        wire = message.wires.get(name, "fp32")
        encoded = [memoryview(np.ascontiguousarray(p).reshape(-1)).cast("B") for p in encode(tensor, wire)]
        shape = np.shape(tensor) if wire != "bytes" else (encoded[0].nbytes,)
        specs.append(f'{{"name":{_JSON.encode(name)},"wire":"{wire}","shape":[{",".join(map(str, shape))}]}}')
        for part in encoded:
            size += part.nbytes
            crc = checksum(part, crc)
        parts += encoded
    # The header written out rather than by json (a third of frame's time for a small message); what
    # json.dumps gives with separators=(",", ":"): tests/test_wire_protocol.py checks it against json
    head = (f'{{"v":{VERSION},"type":{_JSON.encode(message.type)},"device":{_JSON.encode(message.device)},'
            f'"round":{int(message.round)},"seq":{int(message.seq)},'
            f'"meta":{_JSON.encode(message.meta) if message.meta else "{}"},"tensors":[{",".join(specs)}],'
            f'"payload":{size},"crc32":{crc}}}').encode()
    message.payload_bytes = size
    return [PREFIX.pack(MAGIC, len(head)) + head, *parts]


def checksum(data: bytes | memoryview | np.ndarray, crc: int = 0) -> int:
    """CRC-32 of the bytes, continuing `crc`; see CRC_SLICE for why small buffers go in slices."""
    view = memoryview(data).cast("B") if not isinstance(data, memoryview) or data.format != "B" else data
    if view.nbytes >= CRC_WHOLE:
        return crc32(view, crc)
    for start in range(0, view.nbytes, CRC_SLICE):
        crc = crc32(view[start:start + CRC_SLICE], crc)
    return crc


def pack(message: Message) -> bytes:
    """The message as bytes; sets `payload_bytes`."""
    return b"".join(frame(message))


_HEADER = (("type", str), ("device", str), ("round", int), ("seq", int), ("meta", dict), ("tensors", list),
           ("payload", int), ("crc32", int))


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
        header = json.loads(bytes(data[PREFIX.size:PREFIX.size + head_len]).decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise WireError(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise WireError("header is not a JSON object")
    if header.get("v") != VERSION:
        raise WireError(f"protocol version {header.get('v')!r} is not supported (this side speaks {VERSION})")
    values = [header.get(name) for name, _ in _HEADER]
    for (name, kind), value in zip(_HEADER, values):
        if type(value) is not kind:        # JSON gives exact types: a bool is not an int here
            raise WireError(f"header field {name!r} is missing or not {kind.__name__}")
    kind, device, round_index, seq, meta, specs, declared, crc = values
    if kind not in TYPES:
        raise WireError(f"unknown message type {kind!r}")
    payload = memoryview(data)[PREFIX.size + head_len:]
    layouts, wires, total = [], {}, 0
    for spec in specs:
        if not isinstance(spec, dict):
            raise WireError("a tensor spec is not an object")
        name, wire, shape = spec.get("name"), spec.get("wire"), spec.get("shape")
        if not isinstance(name, str) or name in wires:
            raise WireError(f"tensor name {name!r} is missing or repeated")
        if wire not in WIRES:
            raise WireError(f"tensor {name}: unknown wire encoding {wire!r}")
        if (not isinstance(shape, list) or len(shape) > 8
                or not all(type(d) is int and d >= 0 for d in shape)):
            raise WireError(f"tensor {name}: shape {shape!r} is not a list of non-negative integers")
        if math.prod(shape) > MAX_ELEMENTS or (wire == "int8" and not shape):
            raise WireError(f"tensor {name}: shape {shape} is not acceptable")
        wires[name] = wire
        parts = [(dtype, part_shape, math.prod(part_shape)) for dtype, part_shape in part_layout(tuple(shape), wire)]
        layouts.append((name, tuple(shape), wire, parts))
        total += sum(dtype.itemsize * count for dtype, _, count in parts)
    if total != declared or declared != len(payload):
        raise WireError(f"declared tensors need {total} bytes, header says {declared}, payload is {len(payload)}")
    if checksum(payload) != crc:
        raise WireError("payload checksum mismatch: corrupted in transit")
    tensors, offset = {}, 0
    for name, shape, wire, parts in layouts:
        arrays = []
        for dtype, part_shape, count in parts:
            arrays.append(np.frombuffer(payload, dtype, count, offset).reshape(part_shape))
            offset += count * dtype.itemsize
        value = decode(arrays, wire, shape)
        # A bool mask and its all(): 4x faster at 1 MB than the float64 sum this replaced (bench/transport.py).
        if wire in FLOAT_WIRES and not np.isfinite(value).all():
            raise WireError(f"tensor {name} holds NaN or Inf")
        tensors[name] = value
    return Message(kind, device, round_index, seq, meta, tensors, wires, len(payload))
