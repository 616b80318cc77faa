"""Messages larger than the broker's maximum packet travel as chunks, reassembled by the receiver.

A chunk is `SFPC`, a little-endian uint32 header length, a JSON header {id, index, count, total} and a slice of
the message. Chunks may arrive in any order and more than once; a message is handed over once, when all its
chunks are in and their sizes add up (the message's own CRC-32, checked by `unpack`, covers its contents).
Limits bound what a sender can make the receiver hold: the size of one message, the bytes held in partial
messages, and how long a partial message may wait.
"""
from __future__ import annotations

import json
import struct
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Union

import numpy as np

from wire_protocol.envelope import MAGIC, WireError

CHUNK_MAGIC = b"SFPC"
PREFIX = struct.Struct("<4sI")
CHUNK_HEADER_ROOM = 160          # bytes kept free in each packet for the chunk header
# Large messages go in chunks of at most this, even under a broker that takes larger packets: paho copies a
# packet's unsent remainder on every socket write and grows a packet it receives by concatenation, both quadratic
# in the packet's size. Measured (bench/transport.py, 1 MB messages): 0.81x raw paho in 1 MiB chunks, 1.03x in
# 512 KiB ones; 20 MB messages 1.9x and 2.6x (raw paho sends those whole).
CHUNK_BYTES = 512 << 10
Buffer = Union[bytes, bytearray, memoryview, np.ndarray]


def split(message: bytes | bytearray | Sequence[Buffer], max_packet: int, message_id: str) -> list[bytes]:
    """The packets to publish: the message itself if it fits, otherwise its chunks, each <= max_packet. The message
    may be given as the buffers `envelope.frame` returns: each packet is then copied straight from them."""
    pieces = ([memoryview(message)] if isinstance(message, (bytes, bytearray, memoryview))
              else [memoryview(p).cast("B") for p in message])
    total = sum(p.nbytes for p in pieces)
    if total <= max_packet:
        return [message if isinstance(message, bytes) else b"".join(pieces)]
    step = max_packet - CHUNK_HEADER_ROOM
    if step <= 0:
        raise ValueError(f"max packet size {max_packet} leaves no room for data")
    count = -(-total // step)
    step = -(-total // count)                  # even chunks: no last one of a few bytes costing a whole publish
    packets, piece, offset = [], 0, 0          # offset: where pieces[piece] starts in the message
    for index in range(count):
        head = json.dumps({"id": message_id, "index": index, "count": count, "total": total},
                          separators=(",", ":")).encode()
        out: list[Buffer] = [PREFIX.pack(CHUNK_MAGIC, len(head)), head]
        start, end = index * step, min(total, (index + 1) * step)
        while start < end:
            while offset + pieces[piece].nbytes <= start:
                offset += pieces[piece].nbytes
                piece += 1
            take = min(end, offset + pieces[piece].nbytes)
            out.append(pieces[piece][start - offset:take - offset])
            start = take
        packets.append(b"".join(out))
    return packets


@dataclass
class _Partial:
    count: int
    total: int
    started: float
    pieces: dict[int, memoryview] = field(default_factory=dict)    # views of the packets: copied once, joined
    held: int = 0


class Reassembler:
    """Feed it every packet received from one source (key); it returns whole messages."""

    def __init__(self, max_message: int = 256 << 20, max_pending: int = 512 << 20, timeout_s: float = 120.0,
                 clock=time.monotonic) -> None:
        self.max_message, self.max_pending, self.timeout_s, self.clock = max_message, max_pending, timeout_s, clock
        self.partial: dict[tuple[str, str], _Partial] = {}   # in the order they started
        self.done: dict[tuple[str, str], float] = {}         # recently completed, in that order: late duplicates
        self.expired = 0                                      # partial messages dropped for waiting too long
        self.dropped: list[tuple[str, str]] = []              # (key, why) of those, for the owner to report
        self._held = 0                                        # bytes in all partial messages

    def pending_bytes(self) -> int:
        return self._held

    def feed(self, key: str, packet: bytes) -> bytes | None:
        """A whole message, None while one is incomplete (or for a duplicate chunk); WireError for a bad one."""
        if self.partial or self.done:
            self._expire()
        if packet[:4] == MAGIC:
            if len(packet) > self.max_message:
                raise WireError(f"message of {len(packet)} bytes exceeds the limit of {self.max_message}")
            return packet
        if packet[:4] != CHUNK_MAGIC or len(packet) < PREFIX.size:
            raise WireError("not a protocol message or chunk (bad magic)")
        _, head_len = PREFIX.unpack_from(packet)
        if head_len > min(4096, len(packet) - PREFIX.size):
            raise WireError(f"chunk header length {head_len} exceeds the packet")
        try:
            head = json.loads(packet[PREFIX.size:PREFIX.size + head_len])
            mid, index, count, total = head["id"], head["index"], head["count"], head["total"]
        except (ValueError, KeyError, TypeError) as err:
            raise WireError(f"chunk header is malformed: {err}") from None
        if not (isinstance(mid, str) and all(isinstance(v, int) for v in (index, count, total))
                and 0 <= index < count and 0 < total):
            raise WireError(f"chunk header is inconsistent: {head}")
        if total > self.max_message:
            raise WireError(f"chunked message of {total} bytes exceeds the limit of {self.max_message}")
        slot = (key, mid)
        if slot in self.done:
            return None
        data = memoryview(packet)[PREFIX.size + head_len:]
        part = self.partial.get(slot)
        if part is None:
            part = self.partial[slot] = _Partial(count, total, self.clock())
        elif (part.count, part.total) != (count, total):
            self._drop(slot)
            raise WireError(f"chunk {index} of {mid} disagrees with the earlier chunks")
        if index in part.pieces:
            return None
        if self._held + len(data) > self.max_pending:
            self._drop(slot)
            raise WireError(f"partial messages would hold more than {self.max_pending} bytes; {mid} dropped")
        part.pieces[index] = data
        part.held += len(data)
        self._held += len(data)
        if part.held > total:
            self._drop(slot)
            raise WireError(f"chunks of {mid} carry more than the declared {total} bytes")
        if len(part.pieces) < count:
            return None
        self._drop(slot)
        message = b"".join(part.pieces[i] for i in range(count))
        if len(message) != total:
            raise WireError(f"reassembled {mid} is {len(message)} bytes, not the declared {total}")
        self.done[slot] = self.clock()
        return message

    def _drop(self, slot: tuple[str, str]) -> _Partial:
        part = self.partial.pop(slot)
        self._held -= part.held
        return part

    def _expire(self) -> None:
        """Drop what has waited too long: both dicts are in time order, so only their oldest entries are looked at."""
        now = self.clock()
        stale = []
        for slot, part in self.partial.items():
            if now - part.started <= self.timeout_s:
                break
            stale.append(slot)
        for slot in stale:
            part = self._drop(slot)
            self.dropped.append((slot[0], f"message {slot[1]} incomplete after {self.timeout_s:.0f} s: "
                                          f"{len(part.pieces)} of {part.count} chunks arrived"))
        self.expired += len(stale)
        old = []
        for slot, finished in self.done.items():
            if now - finished <= self.timeout_s:
                break
            old.append(slot)
        for slot in old:
            del self.done[slot]
