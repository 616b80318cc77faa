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
from dataclasses import dataclass, field

from wire_protocol.envelope import MAGIC, WireError

CHUNK_MAGIC = b"SFPC"
PREFIX = struct.Struct("<4sI")
CHUNK_HEADER_ROOM = 160          # bytes kept free in each packet for the chunk header


def split(message: bytes | bytearray, max_packet: int, message_id: str) -> list[bytes | bytearray]:
    """The packets to publish: the message itself if it fits, otherwise its chunks, each <= max_packet."""
    if len(message) <= max_packet:
        return [message]
    step = max_packet - CHUNK_HEADER_ROOM
    if step <= 0:
        raise ValueError(f"max packet size {max_packet} leaves no room for data")
    count = -(-len(message) // step)
    view = memoryview(message)
    packets = []
    for index in range(count):
        head = json.dumps({"id": message_id, "index": index, "count": count, "total": len(message)},
                          separators=(",", ":")).encode()
        packets.append(PREFIX.pack(CHUNK_MAGIC, len(head)) + head + view[index * step:(index + 1) * step])
    return packets


@dataclass
class _Partial:
    count: int
    total: int
    started: float
    pieces: dict[int, bytes] = field(default_factory=dict)

    @property
    def held(self) -> int:
        return sum(len(p) for p in self.pieces.values())


class Reassembler:
    """Feed it every packet received from one source (key); it returns whole messages."""

    def __init__(self, max_message: int = 256 << 20, max_pending: int = 512 << 20, timeout_s: float = 120.0,
                 clock=time.monotonic) -> None:
        self.max_message, self.max_pending, self.timeout_s, self.clock = max_message, max_pending, timeout_s, clock
        self.partial: dict[tuple[str, str], _Partial] = {}
        self.done: dict[tuple[str, str], float] = {}     # recently completed, so late duplicates are ignored
        self.expired = 0                                  # partial messages dropped for waiting too long
        self.dropped: list[tuple[str, str]] = []          # (key, why) of those, for the owner to report

    def pending_bytes(self) -> int:
        return sum(p.held for p in self.partial.values())

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
        data = packet[PREFIX.size + head_len:]
        part = self.partial.get(slot)
        if part is None:
            part = self.partial[slot] = _Partial(count, total, self.clock())
        elif (part.count, part.total) != (count, total):
            del self.partial[slot]
            raise WireError(f"chunk {index} of {mid} disagrees with the earlier chunks")
        if index in part.pieces:
            return None
        if self.pending_bytes() + len(data) > self.max_pending:
            del self.partial[slot]
            raise WireError(f"partial messages would hold more than {self.max_pending} bytes; {mid} dropped")
        part.pieces[index] = data
        if part.held > total:
            del self.partial[slot]
            raise WireError(f"chunks of {mid} carry more than the declared {total} bytes")
        if len(part.pieces) < count:
            return None
        del self.partial[slot]
        message = b"".join(part.pieces[i] for i in range(count))
        if len(message) != total:
            raise WireError(f"reassembled {mid} is {len(message)} bytes, not the declared {total}")
        self.done[slot] = self.clock()
        return message

    def _expire(self) -> list[str]:
        now = self.clock()
        stale = [slot for slot, p in self.partial.items() if now - p.started > self.timeout_s]
        for slot in stale:
            part = self.partial.pop(slot)
            self.dropped.append((slot[0], f"message {slot[1]} incomplete after {self.timeout_s:.0f} s: "
                                          f"{len(part.pieces)} of {part.count} chunks arrived"))
        self.expired += len(stale)
        for slot in [s for s, t in self.done.items() if now - t > self.timeout_s]:
            del self.done[slot]
        return [mid for _, mid in stale]
