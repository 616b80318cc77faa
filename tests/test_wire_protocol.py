"""The wire protocol: the numpy codec equals the reference meter's torch codec bit for bit, messages and chunks
round-trip, and every malformed message is refused with its reason."""
import json
import struct
import zlib

import numpy as np
import pytest
import torch

from simulation.accounting import decode as torch_decode
from simulation.accounting import encode as torch_encode
from simulation.accounting import wire_bytes
from wire_protocol.chunking import Reassembler, split
from wire_protocol.codec import FLOAT_WIRES, decode, encode, encoded_bytes, part_layout
from wire_protocol.envelope import MAGIC, Message, WireError, frame, pack, unpack
from wire_protocol.topics import Topics, check_name


def awkward_tensor(rng, shape=(3, 5, 7)):
    """Random values plus the cases where rounding differs between careless implementations: exact ties for
    int8 and bf16, fp16 subnormals and overflow-adjacent values, an all-zero row."""
    x = rng.standard_normal(shape).astype(np.float32) * 3
    x[0, 0, :4] = [0.5, -1.5, 2.5, 127.0]
    x[0, 1, :] = 0.0
    x[1, 0, :3] = [1e-7, -6e-8, 65504.0]
    bits = np.array([0x3F808000, 0x3F818000, 0xBF808000], np.uint32).view(np.float32)   # bf16 ties
    x[1, 1, :3] = bits
    return x


@pytest.mark.parametrize("wire", FLOAT_WIRES)
def test_numpy_codec_equals_the_reference_meter_bit_for_bit(wire):
    x = awkward_tensor(np.random.default_rng(0))
    ours, theirs = encode(x, wire), torch_encode(torch.from_numpy(x), wire)
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs):
        b = b.view(torch.int16).numpy().view(np.uint16) if b.dtype == torch.bfloat16 else b.numpy()
        assert a.shape == b.shape and a.tobytes() == b.tobytes(), wire
    assert sum(p.nbytes for p in ours) == wire_bytes(theirs) == encoded_bytes(x.shape, wire)
    got = decode(ours, wire, x.shape)
    want = torch_decode(theirs, wire).numpy()
    assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
    assert [(d, s) for d, s in part_layout(x.shape, wire)] == [(p.dtype, p.shape) for p in ours]


def test_a_message_round_trips_and_counts_its_payload():
    rng = np.random.default_rng(1)
    tokens = rng.standard_normal((4, 9, 32)).astype(np.float32)
    prompts = rng.standard_normal((3, 32)).astype(np.float32)
    blob = np.frombuffer(b"a bundle, say", np.uint8)
    msg = Message("forward", "dev-1", round=3, seq=17, meta={"lr": 0.01, "worker": None},
                  tensors={"tokens": tokens, "prompts": prompts, "blob": blob},
                  wires={"tokens": "int8", "blob": "bytes"})
    data = pack(msg)
    expected_payload = encoded_bytes(tokens.shape, "int8") + prompts.nbytes + blob.nbytes
    assert msg.payload_bytes == expected_payload
    back = unpack(data)
    assert (back.type, back.device, back.round, back.seq, back.meta) == ("forward", "dev-1", 3, 17, msg.meta)
    assert back.payload_bytes == expected_payload and len(data) > expected_payload
    np.testing.assert_array_equal(back.tensors["prompts"], prompts)
    np.testing.assert_array_equal(back.tensors["tokens"], decode(encode(tokens, "int8"), "int8", tokens.shape))
    assert bytes(back.tensors["blob"]) == b"a bundle, say"
    assert back.wires == {"tokens": "int8", "prompts": "fp32", "blob": "bytes"}


def test_the_written_out_header_is_what_json_writes():
    """frame writes the header without json; it must be byte for byte what json.dumps writes, escapes included."""
    msg = Message("enrolling", 'pi-\u00e9t\u00e9 "4"\n', round=2**40, seq=-1,
                  meta={"note": "exporting \u2192 done", "x": [1.5, None, True], "n": {"a": 1}},
                  tensors={"t\u00f6kens": np.zeros((2, 0, 3), np.float32), "ids": np.arange(5),
                           "blob": np.frombuffer(b"xy", np.uint8), "s": np.float32(2.0)},
                  wires={"ids": "int32", "blob": "bytes", "t\u00f6kens": "bf16"})
    for message in (msg, Message("report", "d")):
        data = pack(message)
        head = data[8:8 + struct.unpack_from("<I", data, 4)[0]]
        assert head == json.dumps(json.loads(head), separators=(",", ":")).encode()
        back = unpack(data)
        assert (back.device, back.round, back.seq, back.meta) == (message.device, message.round, message.seq,
                                                                  message.meta)
        assert {k: v.shape for k, v in back.tensors.items()} == {k: np.shape(v) if message.wires.get(k) != "bytes"
                                                                 else (2,) for k, v in message.tensors.items()}


@pytest.mark.parametrize("rows", [1, 14, 15, 300, 1200])     # around the slice size and past CRC_WHOLE
def test_the_checksum_is_zlibs_crc32_of_the_payload(rows):
    """The envelope may use a faster CRC-32 implementation, in slices; the value must still be zlib's over the
    whole payload, or old peers refuse."""
    x = np.random.default_rng(2).standard_normal((rows, 70)).astype(np.float32)
    header, payload = good_parts(Message("update", "d", tensors={"x": x, "y": x[:3]}, wires={"y": "int8"}))
    assert header["crc32"] == zlib.crc32(payload) and len(payload) == header["payload"]


def test_chunks_cut_from_the_frame_equal_chunks_cut_from_the_joined_message():
    message = Message("round", "dev", tensors={"a": np.arange(3000, dtype=np.float32),
                                               "b": np.arange(10, dtype=np.float32)}, wires={"b": "fp16"})
    for max_packet in (1024, 4000, 12_136, 1 << 20):
        assert split(frame(message), max_packet, "m") == split(pack(message), max_packet, "m")


def rebuild(header: dict, payload: bytes) -> bytes:
    head = json.dumps(header).encode()
    return struct.pack("<4sI", MAGIC, len(head)) + head + payload


def good_parts(message=None):
    data = pack(message or Message("update", "dev-1", 1, 1, {}, {"x": np.ones((2, 3), np.float32)}))
    head_len = struct.unpack_from("<I", data, 4)[0]
    return json.loads(data[8:8 + head_len]), data[8 + head_len:]


def edited(**changes):
    header, payload = good_parts()
    return rebuild({**header, **changes}, payload)


BAD = [
    (b"", "too short"),
    (b"XXXX" + b"\0" * 20, "bad magic"),
    (struct.pack("<4sI", MAGIC, 10_000) + b"{}", "exceeds the message"),
    (struct.pack("<4sI", MAGIC, 3) + b"{x}", "not JSON"),
    (struct.pack("<4sI", MAGIC, 2) + b"[]", "not a JSON object"),
    (edited(v=2), "protocol version 2"),
    (edited(type="format_disk"), "unknown message type"),
    (edited(device=7), "'device' is missing"),
    (edited(round=True), "'round' is missing"),
    (edited(meta=[1]), "'meta' is missing"),
    (edited(tensors=[{"name": "x", "wire": "fp64", "shape": [2, 3]}]), "unknown wire encoding"),
    (edited(tensors=[{"name": "x", "wire": "fp32", "shape": [2, -3]}]), "not a list of non-negative"),
    (edited(tensors=[{"name": "x", "wire": "fp32", "shape": [2, 3]}, {"name": "x", "wire": "fp32", "shape": [0]}]),
     "repeated"),
    (edited(tensors=[{"name": "x", "wire": "fp32", "shape": [1 << 20, 1 << 20]}]), "not acceptable"),
    (edited(tensors=[{"name": "x", "wire": "fp32", "shape": [200, 300]}], payload=240000), "need 240000 bytes"),
    (edited(payload=999), "header says 999"),
    (edited(crc32=1), "checksum mismatch"),
]


@pytest.mark.parametrize("data,reason", BAD, ids=[r for _, r in BAD])
def test_a_malformed_message_is_refused_with_its_reason(data, reason):
    with pytest.raises(WireError, match=reason):
        unpack(data)


def test_truncated_oversized_and_non_finite_messages_are_refused():
    data = pack(Message("update", "d", tensors={"x": np.ones((64, 64), np.float32)}))
    with pytest.raises(WireError, match="payload is"):
        unpack(data[:-1])
    with pytest.raises(WireError, match="exceeds the limit"):
        unpack(data, max_bytes=len(data) - 1)
    bad = np.ones(4, np.float32)
    bad[2] = np.inf
    with pytest.raises(WireError, match="NaN or Inf"):
        unpack(pack(Message("update", "d", tensors={"x": bad})))
    header, payload = good_parts()
    flipped = bytearray(payload)
    flipped[0] ^= 1
    with pytest.raises(WireError, match="checksum"):
        unpack(rebuild(header, bytes(flipped)))


def test_chunks_reassemble_in_any_order_once():
    message = pack(Message("round", "dev", tensors={"x": np.arange(10_000, dtype=np.float32)}))
    packets = split(message, 4096, "m1")
    assert len(packets) > 1 and all(len(p) <= 4096 for p in packets)
    receiver = Reassembler()
    order = list(reversed(packets)) + [packets[0]]
    results = [receiver.feed("dev", p) for p in order]
    assert [r for r in results if r is not None] == [message]
    assert results[-1] is None                      # a late duplicate after completion is ignored
    assert receiver.pending_bytes() == 0
    assert split(message, len(message), "m2") == [message]


def test_chunk_limits_and_inconsistencies_are_refused():
    message = pack(Message("round", "dev", tensors={"x": np.arange(4000, dtype=np.float32)}))
    packets = split(message, 1024, "m")
    with pytest.raises(WireError, match="exceeds the limit"):
        Reassembler(max_message=1000).feed("dev", packets[0])
    small = Reassembler(max_pending=1500)
    small.feed("dev", packets[0])
    with pytest.raises(WireError, match="more than 1500 bytes"):
        small.feed("dev", packets[1])
    other = split(pack(Message("round", "dev", tensors={"x": np.zeros(5000, np.float32)})), 1024, "m")
    mixed = Reassembler()
    mixed.feed("dev", packets[0])
    with pytest.raises(WireError, match="disagrees"):
        mixed.feed("dev", other[1])
    with pytest.raises(WireError, match="bad magic"):
        Reassembler().feed("dev", b"garbage")
    now = [0.0]
    slow = Reassembler(timeout_s=10, clock=lambda: now[0])
    slow.feed("dev", packets[0])
    now[0] = 11.0
    slow.feed("dev", pack(Message("report", "dev")))
    assert slow.pending_bytes() == 0 and slow.expired == 1
    lying = bytearray(packets[-1])
    lying[-1] ^= 0xFF
    tampered = Reassembler()
    for p in packets[:-1]:
        tampered.feed("dev", p)
    with pytest.raises(WireError, match="checksum"):          # the message's own CRC-32 catches it
        unpack(tampered.feed("dev", bytes(lying)))
    short = Reassembler()
    for p in packets[:-1]:
        short.feed("dev", p)
    with pytest.raises(WireError, match="not the declared"):
        short.feed("dev", packets[-1][:-5])


def test_topics_confine_ids_and_find_the_device():
    t = Topics("fed1")
    assert t.device_of(t.up("dev-3", "update")) == "dev-3"
    assert t.device_of(t.forward("dev-4")) == "dev-4"
    assert t.device_of(t.backward("w1", "dev-5")) == "dev-5"
    assert t.device_of("sfp/other/devices/x/up/update") is None
    for bad in ["", "a/b", "+", "#", "x" * 65, "dev 1"]:
        with pytest.raises(ValueError):
            check_name("device", bad)


def test_body_receipts_count_each_signed_batch_once_and_refuse_anything_else():
    from wire_protocol.receipts import receipt_key, served_samples, sign
    key = receipt_key("fed", "service-password")
    batches = [sign(key, "dev", 3, seq, 16) for seq in (1, 2, 3)]
    assert served_samples(key, "dev", 3, batches + batches[:2]) == 48           # a copy counts once
    assert served_samples(key, "dev", 3, []) == 0
    other_key = receipt_key("fed", "another-password")
    for receipts, why in [(None, "no body receipts"), ([[1, 16]], "malformed"), ([[1, -1, "x"]], "malformed"),
                          ([[1, 17, batches[0][2]]], "no worker signed"),              # the count raised
                          ([sign(key, "dev", 2, 1, 16)], "no worker signed"),           # another round's
                          ([sign(key, "dev-2", 3, 1, 16)], "no worker signed"),         # another device's
                          ([sign(other_key, "dev", 3, 1, 16)], "no worker signed")]:    # another key's
        with pytest.raises(ValueError, match=why):
            served_samples(key, "dev", 3, receipts)
