"""paho-mqtt's client with four of its per-message costs taken out; everything else (sessions, QoS flows,
keepalive, TLS, reconnects, callbacks) is paho's own.

- Reading: paho asks the socket for a packet's first byte, then each byte of its length, then the rest (a system
  call each) and reads one packet per select(). Here one read fills a buffer, and every packet in it is handled
  before select() is called again: a 16 KB message costs a fraction of a read instead of five.
- A received PUBLISH: paho copies its payload four times while decoding it (struct.unpack and slicing) and parses
  an empty property set into an object. Here the payload is the received buffer itself with the packet's header
  cut off in place (a bytearray, not bytes), and properties are parsed only when there are some.
- A PUBACK: paho builds a reason code and a property set (objects) for each, to hand an on_publish callback;
  here none is built when there is no such callback.
- Writing: paho copies a payload into its packet, and slices the unsent part of the packet (another copy) for
  every socket write. Here a large payload is not copied: the packet is its header and the payload, written
  together with sendmsg, and a slice of it is a view (plain TCP; over TLS paho's path is kept).

What each bought (bench/transport.py): README.md, "The server and the transport". The overrides lean on paho
2.x internals (`_sock_recv`, `loop_read`, `_handle_publish`, `_handle_pubackcomp`, `_send_publish`, `_sock_send`),
so setup.cfg keeps paho below 3, and `make test` runs tests/test_mqtt_client.py (each path against stock paho over
a real broker) and tests/test_link.py with the newest paho and with the oldest allowed.
"""
from __future__ import annotations

import ssl

import paho.mqtt.client as mqtt
from paho.mqtt.enums import MQTTErrorCode, MQTTProtocolVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties, VariableByteIntegers
from paho.mqtt.reasoncodes import ReasonCode

READ_BYTES = 256 << 10      # one read's buffer; a packet's remainder at least this large is read straight
GATHER_BYTES = 4 << 10      # payloads from this size on are sent without being copied into their packet
PUBLISH = 0x30
PUBACK_REASON, NO_PROPERTIES = ReasonCode(PacketTypes.PUBACK), Properties(PacketTypes.PUBACK)


class Client(mqtt.Client):
    """A drop-in paho client (MQTT 5 over TCP or TLS; MQTT 3 and QoS 2 take paho's own paths)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._read_buffer = bytearray(READ_BYTES)
        self._read_view = memoryview(self._read_buffer)
        self._read_start = self._read_end = 0      # the unread bytes: _read_buffer[_read_start:_read_end]
        self._read_socket = None                   # the socket they came from (a reconnect starts afresh)

    # ------------------------------------------------------------------ reading
    def _sock_recv(self, bufsize: int) -> bytes | memoryview:
        """Up to `bufsize` bytes, from the buffer while it holds some; a view into it, which paho copies at once."""
        sock = self._sock
        if sock is not self._read_socket:
            self._read_socket, self._read_start, self._read_end = sock, 0, 0
        if self._read_start == self._read_end:
            if bufsize >= READ_BYTES:
                return super()._sock_recv(bufsize)
            if sock is None:
                raise ConnectionError("self._sock is None")
            try:
                self._read_end = sock.recv_into(self._read_buffer)
            except ssl.SSLWantReadError as err:
                raise BlockingIOError() from err
            except ssl.SSLWantWriteError as err:
                self._call_socket_register_write()
                raise BlockingIOError() from err
            self._read_start = 0
            if self._read_end == 0:
                return b""                      # the connection closed
        start = self._read_start
        self._read_start = min(start + bufsize, self._read_end)
        return self._read_view[start:self._read_start]

    def loop_read(self, max_packets: int = 1) -> MQTTErrorCode:
        """paho's, then every packet already in the buffer: select() does not see what is buffered here."""
        rc = super().loop_read(max_packets)
        while rc == MQTTErrorCode.MQTT_ERR_SUCCESS and self._sock is not None and self._read_start < self._read_end:
            rc = self._packet_read()
            if rc > 0:
                return self._loop_rc_handle(rc)
        return MQTTErrorCode.MQTT_ERR_SUCCESS if rc == MQTTErrorCode.MQTT_ERR_AGAIN else rc

    def _handle_publish(self) -> MQTTErrorCode:
        header = self._in_packet["command"]
        qos = (header & 0x06) >> 1
        if qos == 2 or self._protocol != MQTTProtocolVersion.MQTTv5:
            return super()._handle_publish()           # not used by this project: paho's own path
        packet: bytearray = self._in_packet["packet"]  # paho starts a new one for the next packet
        if len(packet) < 3:
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        at = 2 + int.from_bytes(packet[:2], "big")
        topic = bytes(packet[2:at])
        mid = 0
        if qos:
            mid = int.from_bytes(packet[at:at + 2], "big")
            at += 2
        properties = None
        if at < len(packet) and packet[at]:
            properties = Properties(PacketTypes.PUBLISH)
            try:
                length, used = VariableByteIntegers.decode(packet[at:at + 4])
                properties.unpack(bytes(packet[at:at + used + length]))
            except Exception:                          # paho's own decoder calls any failure malformed too
                return MQTTErrorCode.MQTT_ERR_PROTOCOL
            at += used + length
        else:
            at += 1
        if at > len(packet):
            return MQTTErrorCode.MQTT_ERR_PROTOCOL
        del packet[:at]                                # in place: a bytearray moves its start
        message = mqtt.MQTTMessage(mid, topic)
        message.dup, message.qos, message.retain = bool(header & 0x08), qos, bool(header & 0x01)
        message.properties, message.payload = properties, packet
        message.timestamp = mqtt.time_func()
        self._handle_on_message(message)
        if qos == 0 or self._manual_ack:
            return MQTTErrorCode.MQTT_ERR_SUCCESS
        return self._send_puback(mid)

    def _handle_pubackcomp(self, cmd: str) -> MQTTErrorCode:
        """A PUBACK without paho's reason-code and property objects, which only an on_publish callback would see
        (this project sets none); paho's own path otherwise."""
        packet = self._in_packet["packet"]
        if cmd != "PUBACK" or self.on_publish is not None or len(packet) < 2:
            return super()._handle_pubackcomp(cmd)
        mid = int.from_bytes(packet[:2], "big")
        with self._out_message_mutex:
            if mid in self._out_messages:
                return self._do_on_publish(mid, PUBACK_REASON, NO_PROPERTIES)
        return MQTTErrorCode.MQTT_ERR_SUCCESS

    # ------------------------------------------------------------------ writing
    def _send_publish(self, mid: int, topic: bytes, payload: bytes | bytearray = b"", qos: int = 0,
                      retain: bool = False, dup: bool = False, info: mqtt.MQTTMessageInfo | None = None,
                      properties: Properties | None = None) -> MQTTErrorCode:
        """A large payload is not copied into the packet: the packet is its header and the payload, written
        together with sendmsg (plain TCP; over TLS paho's own path)."""
        sock = self._sock
        if (len(payload) < GATHER_BYTES or sock is None or isinstance(sock, ssl.SSLSocket)
                or self._protocol != MQTTProtocolVersion.MQTTv5 or not isinstance(topic, bytes)):
            return super()._send_publish(mid, topic, payload, qos, retain, dup, info, properties)
        packed_properties = b"\x00" if properties is None else properties.pack()
        header = bytearray((PUBLISH | ((dup & 1) << 3) | (qos << 1) | retain,))
        self._pack_remaining_length(header, 2 + len(topic) + (2 if qos else 0) + len(packed_properties)
                                    + len(payload))
        self._pack_str16(header, topic)
        if qos:
            header += mid.to_bytes(2, "big")
        header += packed_properties
        return self._packet_queue(PUBLISH, Gather((header, payload)), mid, qos, info)

    def _sock_send(self, buf: bytes | bytearray | Gather) -> int:
        if isinstance(buf, Gather):
            if self._sock is None:
                raise ConnectionError("self._sock is None")
            return self._sock.sendmsg(buf.parts)
        return super()._sock_send(buf)


class Gather:
    """Buffers that go out as one packet without being joined: what paho's writer needs of a packet (its length,
    and its unsent remainder as packet[pos:]), each slice a view."""

    __slots__ = ("parts", "size")

    def __init__(self, parts: tuple[bytes | bytearray | memoryview, ...]) -> None:
        self.parts = tuple(memoryview(p).cast("B") for p in parts)
        self.size = sum(p.nbytes for p in self.parts)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, cut: slice) -> Gather:
        skip, rest = cut.start or 0, []
        for part in self.parts:
            if skip >= part.nbytes:
                skip -= part.nbytes
            else:
                rest.append(part[skip:])
                skip = 0
        return Gather(tuple(rest))
