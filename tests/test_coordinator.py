"""The coordinator on a real broker, fed bad input: every message is refused with its reason (to the device when
it can be answered, always in the log and the metrics) and the server goes on enrolling and serving."""
import json
import queue
import threading
import time

import numpy as np
import pytest

from cloud_server.config import FederationConfig
from cloud_server.bundles import federation_bundles
from cloud_server.coordinator import Coordinator
from edge_client.profiles import load_profile
from sfp_common.split_spec import SplitSpec
from wire_protocol.envelope import Message
from wire_protocol.contracts import RoundPlan
from wire_protocol.link import Link, wait_for
from wire_protocol.receipts import sign
from wire_protocol.topics import Topics


@pytest.fixture(scope="module")
def server(tmp_path_factory, broker):
    """One coordinator for the module (exporting its bundle takes seconds); the tests use their own device ids."""
    cfg = FederationConfig(federation="coord", model="vit_tiny_patch16_224", classes=tuple(str(i) for i in range(10)),
                           state_dir=tmp_path_factory.mktemp("coord") / "state",
                           split=SplitSpec(2, 1, 0), img_size=16, pretrained=False)
    coordinator = Coordinator(cfg, broker, federation_bundles(cfg)).start()
    yield coordinator
    coordinator.close()


def enroll_request(server, device, token=None, profile=None, classes=("1", "2"), samples=10):
    """An enrollment; with a fresh single-use token for `device` unless one is given."""
    token = token if token is not None else server.security.issue_token(device, ttl_s=600)
    return Message("enroll", device, meta={"token": token, "profile": profile or load_profile("x86").as_dict(),
                                           "num_samples": samples, "classes": list(classes), "hardware": {}})


def ask(link, topics, device, message, kind=None, notes=None):
    """The server's answer; `notes` collects the "enrolling" notes that came before it."""
    replies = queue.Queue()
    link.subscribe(topics.device_down(device), lambda topic, m: replies.put(m))
    time.sleep(0.2)
    link.send(topics.up(device, message.type), message)
    while (reply := replies.get(timeout=30)).type == "enrolling":
        if notes is not None:
            notes.append(reply.meta["note"])
    return reply


def test_bad_enrollments_are_refused_with_reasons_and_a_good_one_then_succeeds(server, broker):
    topics, link = Topics("coord"), Link(broker, "attacker").connect()
    for device, message, reason in [
        ("d1", enroll_request(server, "d1", token="wrong"), "wrong enrollment token"),
        ("d3", enroll_request(server, "d3", classes=("1", "cat")), "are not the federation's"),
        ("d4", enroll_request(server, "d4", profile={"name": "half"}), "malformed enrollment"),
        ("d5", enroll_request(server, "d5", samples=0), "no training samples"),
    ]:
        reply = ask(link, topics, device, message)
        assert reply.type == "refused" and reason in reply.meta["reason"], (device, reply.meta)
    assert not {"d1", "d3", "d4", "d5"} & set(server.registry.devices)
    reply = ask(link, topics, "good", enroll_request(server, "good"))
    assert reply.type == "enrolled" and len(reply.tensors["bundle"]) > 1000
    assert server.registry.get("good").index == reply.meta["index"]
    # Its own broker account, issued now: the password the device got is the one the broker's files hold.
    from cloud_server.security import password_matches
    credentials, accounts = reply.meta["credentials"], server.security.accounts()
    assert credentials["username"] == "good" and accounts["good"]["kind"] == "device"
    assert password_matches(credentials["password"], accounts["good"]["hash"])
    link.close()


def test_each_device_gets_the_cut_its_profile_affords(server, broker, tmp_path):
    """The federation's split has one head block: a Raspberry Pi 4 (which runs none) is enrolled with a bundle cut
    before the first block, an x86 box with the federation's."""
    from sfp_common.bundle import install_bundle, read_bundle
    topics, link = Topics("coord"), Link(broker, "cuts").connect()
    for device, profile, k in (("pi", "raspberry-pi-4", 0), ("box", "x86", 1)):
        notes = []
        reply = ask(link, topics, device, enroll_request(server, device, profile=load_profile(profile).as_dict()),
                    notes=notes)
        assert reply.type == "enrolled" and server.registry.get(device).head_blocks == k
        # the pi's cut is exported now, and the pi told so (its wait restarts); the federation's cut was ready
        assert notes == (["exporting the portable bundle cut after 0 head blocks"] if k == 0 else []), notes
        install_bundle(reply.tensors["bundle"].tobytes(), tmp_path / device)
        manifest = read_bundle(tmp_path / device)
        assert manifest.head_blocks == k and manifest.trainable_names() == server.bundles.manifest().trainable_names()
    link.close()


def test_enrollment_tokens_work_once_for_their_device_until_they_expire(server, broker):
    topics, link = Topics("coord"), Link(broker, "token-tests").connect()
    token = server.security.issue_token("once", ttl_s=600)
    assert ask(link, topics, "other", enroll_request(server, "other", token=token)).meta["reason"] == (
        "wrong enrollment token for this device")                 # a token is bound to its device
    assert ask(link, topics, "once", enroll_request(server, "once", token=token)).type == "enrolled"
    again = ask(link, topics, "once", enroll_request(server, "once", token=token))
    assert again.type == "refused" and again.meta["reason"] == "enrollment token already used"
    # A device that asks again with the same request (its first answer was slow to come) gets the same answer;
    # the spent token with another request id (enrolling again by hand) is refused.
    token = server.security.issue_token("twice", ttl_s=600)
    request = enroll_request(server, "twice", token=token)
    request.meta["request"] = "f" * 32
    first, second = (ask(link, topics, "twice", request) for _ in range(2))
    assert first.type == second.type == "enrolled" and first.meta == second.meta
    assert bytes(first.tensors["bundle"]) == bytes(second.tensors["bundle"])
    request.meta["request"] = "0" * 32
    assert ask(link, topics, "twice", request).meta["reason"] == "enrollment token already used"
    late = server.security.issue_token("late", ttl_s=0.01)
    time.sleep(0.05)
    reply = ask(link, topics, "late", enroll_request(server, "late", token=late))
    assert reply.type == "refused" and reply.meta["reason"] == "enrollment token expired"
    assert server.registry.get("late") is None
    link.close()


def test_forged_garbled_and_misplaced_messages_are_refused_and_counted(server, broker):
    topics, link = Topics("coord"), Link(broker, "attacker2").connect()
    before = sum(server.link.refused.values())
    link.client.publish(topics.up("x", "update"), b"\x00garbage", qos=1)                  # not a message
    link.send(topics.up("x", "update"), Message("update", "someone-else"))                  # id != topic
    link.send(topics.up("nobody", "update"), Message("update", "nobody", 1))                # not enrolled
    link.send(topics.up("x", "features"), Message("features", "x"))                         # not a device's type
    assert wait_for(lambda: sum(server.link.refused.values()) - before == 4, 10), server.link.refused
    reasons = " | ".join(reason for _, reason in server.link.recent_refusals)
    for expected in ("bad magic", "does not match the topic", "unknown device", "does not send"):
        assert expected in reasons, reasons
    assert ask(link, topics, "after", enroll_request(server, "after")).type == "enrolled"       # still serving
    link.close()


def test_an_update_that_does_not_fit_is_refused_and_the_round_goes_on(server, broker):
    topics, link = Topics("coord"), Link(broker, "dev-link").connect()
    assert ask(link, topics, "dev", enroll_request(server, "dev")).type == "enrolled"
    link.publish_json(topics.device_presence("dev"), {"device": "dev", "state": "online"}, retain=True)
    assert wait_for(lambda: server.clients.online() == ["dev"], 5)
    good = {k: v + 0.5 for k, v in server.global_state.items()}
    bad = {**good, "head.prompts": np.zeros((3, 3), np.float32)}
    rounds = queue.Queue()
    link.subscribe(topics.down("dev", "round"), lambda topic, m: rounds.put(m))
    time.sleep(0.2)
    done = {}
    threading.Thread(target=lambda: done.update(server.run_round(1)), daemon=True).start()
    plan = rounds.get(timeout=10)
    sent = RoundPlan.from_dict(plan.meta["plan"])        # the federation's recipe, with the device's batch and wire
    assert plan.meta["train"] and sent.recipe == server.cfg.recipe.but(batch_size=load_profile("x86").batch_size,
                                                                       wire=load_profile("x86").wire)
    attempt = plan.seq                      # the devices echo it: answers to other attempts never count
    other = {k: v - 9.0 for k, v in good.items()}
    # What the body workers signed for two split batches of 3 (the default recipe: 2 passes over the kept half):
    # enough for 5 or 6 samples; a copy of a batch's receipt counts once.
    receipts = [sign(server.receipts, "dev", 1, 1, 3), sign(server.receipts, "dev", 1, 2, 3)]
    claim = {"num_samples": 5, "receipts": receipts + receipts[:1]}
    link.send(topics.up("dev", "update"), Message("update", "dev", 7, attempt, claim, good))  # stale
    link.send(topics.up("dev", "update"), Message("update", "dev", 1, attempt + 1, claim, other))
    link.send(topics.up("dev", "update"), Message("update", "dev", 1, attempt, claim, bad))
    # lying devices, never counted: a FedAvg weight far beyond the 10 samples it enrolled with; its enrolled
    # count, with receipts for less work than that needs; receipts made up, or signed for another round
    for lie in ({"num_samples": 10**6, "receipts": receipts}, {"num_samples": 10, "receipts": receipts},
                {"num_samples": 5, "receipts": [[1, 300, "0" * 32]]},
                {"num_samples": 5, "receipts": [sign(server.receipts, "dev", 7, 1, 6)]},
                {"num_samples": 5}):
        link.send(topics.up("dev", "update"), Message("update", "dev", 1, attempt, lie, other))
    updates_before = server.metrics.updates._value.get()
    for _ in range(2):                      # delivered twice (QoS 1 may): one update per device is kept
        link.send(topics.up("dev", "update"), Message("update", "dev", 1, attempt, claim, good))
    evaluation = rounds.get(timeout=10)
    assert evaluation.meta["train"] is False and evaluation.seq != attempt
    link.send(topics.up("dev", "report"), Message("report", "dev", 1, evaluation.seq,
                                                  meta={"correct": 9, "samples": 4}))      # impossible: refused
    link.send(topics.up("dev", "report"), Message("report", "dev", 1, evaluation.seq,
                                                  meta={"correct": 3, "samples": 4}))
    assert wait_for(lambda: bool(done), 10)
    assert done["participants"] == ["dev"] and done["accuracy"] == 0.75
    assert server.metrics.updates._value.get() - updates_before == 1
    for name, value in good.items():
        np.testing.assert_array_equal(server.global_state[name], value)     # FedAvg of one update is that update
    reasons = " | ".join(reason for _, reason in server.link.recent_refusals)
    assert "a message for round 7; round in progress: 1" in reasons and "head.prompts is float32[3, 3]" in reasons
    assert f"round 1 (attempt {attempt + 1}) during round 1 (attempt {attempt})" in reasons
    assert "dev claims 1000000 training samples; it enrolled with 10" in reasons
    assert "dev claims 10 training samples; the body trained 6 for it this round, which supports at most 6" in reasons
    assert reasons.count("dev's update carries a body receipt no worker signed (batch 1)") == 2
    assert "dev's update carries no body receipts" in reasons
    assert "dev reports 9 correct of 4 samples" in reasons
    summary = json.loads((server.cfg.state_dir / "rounds.jsonl").read_text().splitlines()[-1])
    assert summary["round"] == 1
    link.close()


def test_prometheus_metrics_count_what_happened(server):
    import urllib.request

    from cloud_server.broker import free_port
    port = free_port()
    server.metrics.serve(port)
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    refused = {line.split("{")[1].split("}")[0]: float(line.split()[-1]) for line in text.splitlines()
               if line.startswith("sfp_messages_refused_total{")}
    assert refused.get('kind="malformed"', 0) >= 1 and refused.get('kind="forged"', 0) >= 1, refused
    assert refused.get('kind="enrollment"', 0) >= 5, refused
    assert "sfp_devices_enrolled" in text and "sfp_rounds_completed_total" in text


def test_a_device_that_asked_before_the_server_was_up_asks_again_when_it_comes_up(broker, tmp_path):
    """No server status at all (a cluster node may not deliver a status retained on another): the device asks
    anyway after edge_client.enrollment.NO_STATUS_S. That request finds nobody; when the server's status then
    arrives, the device asks again at once instead of waiting out its re-ask interval (15 s, beyond this
    enrollment's own 12 s timeout)."""
    from PIL import Image

    from edge_client.enrollment import ASK_AGAIN_S, NO_STATUS_S, enroll
    assert NO_STATUS_S + 8 < 12 < ASK_AGAIN_S
    cfg = FederationConfig(federation="late", model="vit_tiny_patch16_224", classes=("0", "1"),
                           state_dir=tmp_path / "state", split=SplitSpec(2, 0, 0), img_size=16, pretrained=False)
    coordinator = Coordinator(cfg, broker, federation_bundles(cfg))      # bundles made; not on the broker yet
    for label in ("0", "1"):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        Image.new("RGB", (16, 16), (60 * int(label),) * 3).save(tmp_path / "data" / "train" / label / "a.png")
    asked, done = threading.Event(), {}
    probe = Link(broker, "late-probe").connect()
    probe.subscribe(Topics("late").up("early", "enroll"), lambda topic, m: asked.set())
    token = coordinator.security.issue_token("early", ttl_s=600)

    def device() -> None:
        try:
            done["config"] = enroll(broker, token, load_profile("x86"), str(tmp_path / "data"), tmp_path / "device",
                                    "early", "late", timeout=12)
        except Exception as err:          # noqa: BLE001 - the test reports it
            done["error"] = err
    thread = threading.Thread(target=device)
    thread.start()
    try:
        assert asked.wait(10), "the device never asked"
        coordinator.start()
        thread.join(30)
        assert "config" in done, done.get("error")
        assert coordinator.registry.get("early") is not None
    finally:
        probe.close()
        coordinator.close()
