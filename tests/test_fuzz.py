"""Every topic the server listens on, fed bad input: each packet is refused with a logged reason and counted in
the Prometheus metrics, and the server (coordinator and body worker) goes on enrolling and serving."""
import io
import json
import queue
import tarfile
import threading
import time
import urllib.request
import zlib

import numpy as np
import pytest

from cloud_server.broker import free_port
from cloud_server.body import start_worker
from cloud_server.config import FederationConfig
from cloud_server.bundles import federation_bundles
from cloud_server.coordinator import Coordinator
from edge_client.profiles import load_profile
from sfp_common.split_spec import SplitSpec
from sfp_common.bundle import BundleError, install_bundle
from wire_protocol.chunking import CHUNK_MAGIC, PREFIX as CHUNK_PREFIX, split
from wire_protocol.envelope import PREFIX, Message, pack
from wire_protocol.link import Link, wait_for
from wire_protocol.topics import Topics

FED = "fuzz"
WORKER = "fuzz-w0"


@pytest.fixture(scope="module")
def server(tmp_path_factory, broker):
    """A coordinator and a body worker sharing the coordinator's metrics; one enrolled, online device 'dev'."""
    cfg = FederationConfig(federation=FED, model="vit_tiny_patch16_224", classes=tuple(str(i) for i in range(10)),
                           state_dir=tmp_path_factory.mktemp("fuzz") / "state", split=SplitSpec(2, 0, 0),
                           img_size=16, pretrained=False)
    coordinator = Coordinator(cfg, broker, federation_bundles(cfg)).start()
    worker = start_worker(broker, FED, coordinator.bundles.model, WORKER, "cpu", "fp32", 1 << 20,
                          metrics=coordinator.metrics)      # as `sfp-cloud serve` starts its workers
    device = Link(broker, "dev").connect()
    assert enroll(coordinator, device, "dev").type == "enrolled"
    device.publish_json(Topics(FED).device_presence("dev"), {"device": "dev", "state": "online"}, retain=True)
    assert wait_for(lambda: coordinator.clients.online() == ["dev"], 5)
    yield coordinator, worker, device
    device.close()
    worker.stop()
    worker.link.close()
    coordinator.close()


def enroll(coordinator, link, device):
    topics, replies = Topics(FED), queue.Queue()
    link.subscribe(topics.device_down(device), lambda t, m: replies.put(m) if m.type in ("enrolled", "refused")
                   else None)
    time.sleep(0.2)
    link.send(topics.up(device, "enroll"), Message("enroll", device, meta={
        "token": coordinator.security.issue_token(device, 600), "profile": load_profile("x86").as_dict(),
        "num_samples": 10, "classes": ["1"], "hardware": {}}))
    return replies.get(timeout=60)


def refusals(coordinator, worker) -> int:
    return sum(coordinator.link.refused.values()) + sum(worker.link.refused.values())


def with_header(valid: bytes, **changes) -> bytes:
    """`valid` with header fields changed (the payload and its CRC kept)."""
    head_len = PREFIX.unpack_from(valid)[1]
    header = json.loads(valid[PREFIX.size:PREFIX.size + head_len])
    header.update(changes)
    head = json.dumps(header).encode()
    return PREFIX.pack(b"SFPW", len(head)) + head + valid[PREFIX.size + head_len:]


def bad_envelopes(valid: bytes, rng: np.random.Generator) -> list[tuple[str, bytes]]:
    """Malformed versions of one valid message: each must be refused by whoever receives it."""
    head_len = PREFIX.unpack_from(valid)[1]
    body = PREFIX.size + head_len
    flipped = bytearray(valid)
    flipped[body + int(rng.integers(len(valid) - body))] ^= 0x10
    cases = [("random bytes", rng.bytes(int(n))) for n in rng.integers(1, 3000, 6)]
    cases += [
        ("empty", b""),
        ("bad magic", b"XXXX" + valid[4:]),
        ("header length beyond the packet", PREFIX.pack(b"SFPW", 1 << 30) + valid[PREFIX.size:]),
        ("header not JSON", PREFIX.pack(b"SFPW", 5) + b"{nope" + valid[body:]),
        ("header a JSON list", PREFIX.pack(b"SFPW", 2) + b"[]" + valid[body:]),
        ("unknown version", with_header(valid, v=99)),
        ("unknown type", with_header(valid, type="launch")),
        ("missing field", with_header(valid, round=None)),
        ("negative shape", with_header(valid, tensors=[{"name": "x", "wire": "fp32", "shape": [-4]}])),
        ("huge shape", with_header(valid, tensors=[{"name": "x", "wire": "fp32", "shape": [1 << 20, 1 << 20]}])),
        ("unknown wire dtype", with_header(valid, tensors=[{**t, "wire": "fp64"} for t in
                                                           json.loads(valid[PREFIX.size:body])["tensors"]])),
        ("declared size far larger than the payload", with_header(valid, payload=1 << 30)),
        ("truncated payload", valid[:body + (len(valid) - body) // 2]),
        ("payload bit flipped (CRC)", bytes(flipped)),
    ]
    return cases


def test_every_server_topic_refuses_bad_input_and_counts_it(server, broker):
    coordinator, worker, device = server
    topics, rng = Topics(FED), np.random.default_rng(0)
    tokens_shape = (2, worker.num_tokens, worker.embed_dim)
    tokens = rng.standard_normal(tokens_shape).astype(np.float32)
    update = Message("update", "dev", 1, 0, {"num_samples": 5}, coordinator.global_state)
    forward = Message("forward", "dev", 1, 1, {}, {"tokens": tokens})
    backward = Message("backward", "dev", 1, 1, {}, {"dfeatures": tokens[:, :1]})
    targets = [(topics.up("dev", "update"), bytes(pack(update))),
               (topics.forward("dev"), bytes(pack(forward))),
               (topics.backward(WORKER, "dev"), bytes(pack(backward)))]
    packets = [(f"{topic}: {label}", topic, data) for topic, valid in targets
               for label, data in bad_envelopes(valid, rng)]
    nan = tokens.copy()
    nan[0, 0, 0] = np.nan
    inf = tokens.copy()
    inf[1, 2, 3] = -np.inf
    semantic = [
        ("NaN in tokens", topics.forward("dev"), Message("forward", "dev", 1, 2, {}, {"tokens": nan})),
        ("Inf in tokens", topics.forward("dev"), Message("forward", "dev", 1, 3, {}, {"tokens": inf})),
        ("tokens of the wrong shape", topics.forward("dev"),
         Message("forward", "dev", 1, 4, {}, {"tokens": tokens[:, :3]})),
        ("tokens as raw bytes", topics.forward("dev"),
         Message("forward", "dev", 1, 5, {}, {"tokens": tokens.view(np.uint8)}, {"tokens": "bytes"})),
        ("a backward with no forward", topics.backward(WORKER, "dev"), backward),
        ("dfeatures as raw bytes", topics.backward(WORKER, "dev"),
         Message("backward", "dev", 1, 1, {}, {"dfeatures": tokens.view(np.uint8)}, {"dfeatures": "bytes"})),
        ("a replay of an old round", topics.up("dev", "update"), update),
        ("NaN in an update", topics.up("dev", "update"), Message("update", "dev", 1, 0, {"num_samples": 5}, {
            k: np.full_like(v, np.nan) for k, v in coordinator.global_state.items()})),
        ("a forged device id", topics.forward("dev"), Message("forward", "other", 1, 6, {}, {"tokens": tokens})),
        ("a cut deeper than the federation's", topics.forward("dev"),
         Message("forward", "dev", 1, 7, {"head_blocks": 3}, {"tokens": tokens})),
        ("a cut that is not a number", topics.forward("dev"),
         Message("forward", "dev", 1, 8, {"head_blocks": "2"}, {"tokens": tokens})),
    ]
    packets += [(label, topic, bytes(pack(m))) for label, topic, m in semantic]
    # Chunks: malformed headers, an index out of range, a total beyond any message, disagreeing chunks.
    whole = bytes(pack(Message("update", "dev", 1, 0, {"num_samples": 5}, coordinator.global_state)))
    chunks = split(whole, 4096, "fz.1")
    assert len(chunks) > 2

    def chunk(head: dict, data: bytes = b"x") -> bytes:
        raw = json.dumps(head).encode()
        return CHUNK_PREFIX.pack(CHUNK_MAGIC, len(raw)) + raw + data
    up = topics.up("dev", "update")
    packets += [
        ("chunk header not JSON", up, CHUNK_PREFIX.pack(CHUNK_MAGIC, 3) + b"{{{" + b"x"),
        ("chunk index out of range", up, chunk({"id": "fz.2", "index": 5, "count": 2, "total": 10})),
        ("chunk total beyond the limit", up, chunk({"id": "fz.3", "index": 0, "count": 2, "total": 1 << 40})),
        ("chunks that disagree", up, chunks[0]),
        ("chunks that disagree", up, chunk({"id": "fz.1", "index": 1, "count": len(chunks) + 1,
                                            "total": len(whole)})),
        ("presence not JSON", topics.device_presence("dev"), b"\xff\xfe"),
        ("presence not an object", topics.device_presence("dev"), b"[1, 2]"),
    ]
    expected = len(packets) - 1               # the first of the disagreeing chunks is accepted and waits
    before, before_metric = refusals(coordinator, worker), prometheus_refused(coordinator)
    for _, topic, data in packets:
        device.client.publish(topic, data, qos=1)
    assert wait_for(lambda: refusals(coordinator, worker) - before >= expected, 30), (
        refusals(coordinator, worker) - before, expected, coordinator.link.recent_refusals)
    time.sleep(0.5)
    assert refusals(coordinator, worker) - before == expected
    assert prometheus_refused(coordinator) - before_metric == expected
    reasons = [r for _, r in list(coordinator.link.recent_refusals)[-60:] + list(worker.link.recent_refusals)[-60:]]
    for needle in ("bad magic", "checksum mismatch", "header is not JSON", "version 99", "unknown message type",
                   "NaN or Inf", "a forward needs float tokens", "no forward is waiting", "round in progress",
                   "does not match the topic", "disagrees with the earlier chunks", "exceeds the limit",
                   "payload is", "a device's presence must be a JSON object", "not JSON"):
        assert any(needle in r for r in reasons), (needle, reasons)

    # A message whose chunks never all arrive is dropped after the reassembly timeout, with a reason.
    coordinator.link.reassembler.timeout_s = 0.5
    for packet in split(whole, 4096, "fz.9")[:-1]:
        device.client.publish(up, packet, qos=1)
    time.sleep(1.0)
    device.client.publish(up, b"poke", qos=1)                      # the next packet sweeps expired messages
    assert wait_for(lambda: coordinator.link.refused["incomplete"] >= 1, 10)
    assert any("incomplete after" in r for _, r in coordinator.link.recent_refusals)

    # Still serving: a valid forward gets its features, and a new device enrolls.
    features = queue.Queue()
    device.subscribe(topics.down("dev", "features"), lambda t, m: features.put(m))
    time.sleep(0.2)
    device.send(topics.forward("dev"), Message("forward", "dev", 1, 99, {}, {"tokens": tokens}))
    got = features.get(timeout=30)
    assert got.seq == 99 and got.tensors["features"].shape == (2, 1, worker.embed_dim)
    newcomer = Link(broker, "newcomer").connect()
    assert enroll(coordinator, newcomer, "newcomer").type == "enrolled"
    newcomer.close()


def prometheus_refused(coordinator) -> float:
    if not hasattr(coordinator, "_fuzz_port"):
        coordinator._fuzz_port = free_port()
        coordinator.metrics.serve(coordinator._fuzz_port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{coordinator._fuzz_port}/metrics", timeout=5).read().decode()
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith("sfp_messages_refused_total{"))


def test_a_bundle_that_fails_its_hashes_is_not_installed(server, tmp_path):
    """A device verifies every file of the bundle it receives against the manifest's hashes."""
    coordinator, _, _ = server
    _, archive = coordinator.bundles.get("portable")
    with tarfile.open(fileobj=io.BytesIO(archive), mode="r:gz") as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    onnx = next(name for name in members if name.endswith(".onnx"))
    tampered = bytearray(members[onnx])
    tampered[len(tampered) // 2] ^= 0xFF
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w:gz") as tar:
        for name, data in {**members, onnx: bytes(tampered)}.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    target = tmp_path / "bundle"
    install_bundle(archive, target)                                # the genuine one installs
    before = {p.name: zlib.crc32(p.read_bytes()) for p in target.iterdir() if p.is_file()}
    with pytest.raises(BundleError, match="hash|sha256|checksum"):
        install_bundle(out.getvalue(), target)
    assert {p.name: zlib.crc32(p.read_bytes()) for p in target.iterdir() if p.is_file()} == before   # kept


def scrape(coordinator) -> dict[str, float]:
    """The server's /metrics page as {sample name with labels: value}."""
    prometheus_refused(coordinator)                    # starts the endpoint once
    text = urllib.request.urlopen(f"http://127.0.0.1:{coordinator._fuzz_port}/metrics", timeout=5).read().decode()
    return {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
            if line and not line.startswith("#")}


def test_prometheus_after_a_real_round_agrees_with_the_round_summaries(server):
    """Scraped over HTTP after a round that went through the body worker: counters for counts, a histogram for
    round seconds, byte counters read live; each value against what the round summaries and the wire say."""
    coordinator, worker, device = server
    topics, rng = Topics(FED), np.random.default_rng(1)
    before = scrape(coordinator)
    replies, rounds = queue.Queue(), queue.Queue()
    for kind in ("features", "gradient"):
        device.subscribe(topics.down("dev", kind), lambda t, m: replies.put(m))
    device.subscribe(topics.down("dev", "round"), lambda t, m: rounds.put(m))
    index, done = coordinator.next_round, {}
    threading.Thread(target=lambda: done.update(coordinator.run_round(index)), daemon=True).start()
    plan = rounds.get(timeout=30)
    # one split batch of 3 through the worker, as a device trains: its receipt supports a FedAvg weight of 2 (the
    # default recipe's two passes over the kept half)
    tokens = rng.standard_normal((3, worker.num_tokens, worker.embed_dim)).astype(np.float32)
    device.send(topics.forward("dev"), Message("forward", "dev", index, 500, {}, {"tokens": tokens}))
    features = replies.get(timeout=30)
    assert (features.type, features.seq) == ("features", 500)
    device.send(topics.backward(WORKER, "dev"), Message("backward", "dev", index, 500, {},
                                                        {"dfeatures": np.ones_like(features.tensors["features"])}))
    gradient = replies.get(timeout=30)
    assert gradient.type == "gradient" and gradient.meta["receipt"][:2] == [500, 3]
    update = Message("update", "dev", index, plan.seq, {"num_samples": 2, "receipts": [gradient.meta["receipt"]]},
                     {k: v + 0.1 for k, v in coordinator.global_state.items()})
    sent = device.send(topics.up("dev", "update"), update)
    evaluation = rounds.get(timeout=30)
    device.send(topics.up("dev", "report"), Message("report", "dev", index, evaluation.seq,
                                                    meta={"correct": 3, "samples": 4}))
    assert wait_for(lambda: bool(done), 30)
    after = scrape(coordinator)
    summaries = [json.loads(line) for line in (coordinator.cfg.state_dir / "rounds.jsonl").read_text().splitlines()]
    assert summaries[-1]["round"] == index and summaries[-1]["participants"] == ["dev"]
    assert after["sfp_rounds_completed_total"] == len(summaries)
    assert after["sfp_round_seconds_count"] == len(summaries)
    assert after["sfp_round_seconds_sum"] == pytest.approx(sum(s["seconds"] for s in summaries))
    assert after['sfp_round_seconds_bucket{le="+Inf"}'] == len(summaries)
    assert after['sfp_accuracy{source="devices"}'] == summaries[-1]["accuracy"] == 0.75
    assert after["sfp_updates_accepted_total"] - before.get("sfp_updates_accepted_total", 0) == 1
    assert after["sfp_body_samples_total"] - before.get("sfp_body_samples_total", 0) == len(tokens)
    assert after["sfp_bytes_received_total"] - before["sfp_bytes_received_total"] >= sent   # the update came in
    assert after["sfp_bytes_sent_total"] > before["sfp_bytes_sent_total"]     # the round plan and evaluation
    assert after["sfp_devices_online"] == 1


def test_a_worker_keeps_tokens_sent_with_ids_and_rebuilds_them_from_the_prompts(server):
    """The opt-in traffic (Recipe.server_keeps_tokens) at the body worker: ids + prompts before the tokens were
    sent get "missing" (not a refusal: the device sends the batch whole); tokens sent with ids are kept, and ids +
    new prompts then give exactly the features of the tokens with those prompts put in. Malformed kept-token
    requests are refused with their reason, and the worker goes on serving."""
    coordinator, worker, device = server
    topics, rng = Topics(FED), np.random.default_rng(2)
    replies = queue.Queue()
    for kind in ("features", "error"):
        device.subscribe(topics.down("dev", kind), lambda t, m: replies.put(m))
    time.sleep(0.2)
    first, count, dim = worker.compute.first_prompt, worker.compute.prompts, worker.embed_dim
    tokens = rng.standard_normal((3, worker.num_tokens, dim)).astype(np.float32)
    ids = np.array([7, 3, 11], np.int32)
    prompts = rng.standard_normal((count, dim)).astype(np.float32)

    def ask(seq: int, tensors: dict, wires: dict | None = None, meta: dict | None = None) -> Message:
        device.send(topics.forward("dev"), Message("forward", "dev", 1, seq, {"evaluate": True, **(meta or {})},
                                                   tensors, {"ids": "int32", **(wires or {})}))
        reply = replies.get(timeout=30)
        assert reply.seq == seq
        return reply

    refused = refusals(coordinator, worker)
    missing = ask(600, {"prompts": prompts, "ids": ids})
    assert missing.type == "error" and missing.meta["missing"] is True
    assert ask(601, {"tokens": tokens, "ids": ids}).type == "features"
    rebuilt = ask(602, {"prompts": prompts, "ids": ids[::-1].copy()})
    expected = tokens[::-1].copy()
    expected[:, first:first + count] = prompts
    direct = ask(603, {"tokens": expected})
    assert rebuilt.type == direct.type == "features"
    np.testing.assert_array_equal(rebuilt.tensors["features"], direct.tensors["features"])
    assert refusals(coordinator, worker) == refused and worker.served["rebuilt"] >= 1

    bad = [
        ("ids and tokens of different lengths", {"tokens": tokens, "ids": ids[:2].copy()}, {}),
        ("negative ids", {"tokens": tokens, "ids": np.array([1, -2, 3], np.int32)}, {}),
        ("repeated ids", {"tokens": tokens, "ids": np.array([1, 1, 3], np.int32)}, {}),
        ("ids as floats", {"tokens": tokens, "ids": ids.astype(np.float32)}, {"ids": "fp32"}),
        ("prompts of the wrong shape", {"prompts": prompts[:1].copy(), "ids": ids}, {}),
        ("prompts without ids", {"prompts": prompts}, {}),
        ("tokens and prompts together", {"tokens": tokens, "prompts": prompts, "ids": ids}, {}),
    ]
    for seq, (label, tensors, wires) in enumerate(bad, 610):
        reply = ask(seq, tensors, wires)
        assert reply.type == "error" and not reply.meta.get("missing"), label
    assert refusals(coordinator, worker) - refused == len(bad)
    reasons = " ".join(r for _, r in list(worker.link.recent_refusals)[-len(bad):])
    for needle in ("ids are distinct int32", "kept tokens needs their ids and prompts", "either tokens or"):
        assert needle in reasons, (needle, reasons)
    assert ask(620, {"prompts": prompts, "ids": ids}).type == "features"         # still serving
