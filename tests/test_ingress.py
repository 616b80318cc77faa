"""The coordinator's checks on what devices send, without a broker: who sent it, for which round, and what it
claims against what the server knows (the enrolled count, the body workers' signed receipts)."""
import numpy as np
import pytest

from cloud_server.bundles import federation_bundles
from cloud_server.config import FederationConfig
from cloud_server.ingress import Ingress, Refused
from cloud_server.registry import Registry
from sfp_common.split_spec import SplitSpec
from wire_protocol.envelope import Message
from wire_protocol.receipts import receipt_key, sign
from wire_protocol.topics import Topics

KEY = receipt_key("ing", "service-password")


@pytest.fixture(scope="module")
def ingress(tmp_path_factory, module_digits_checkpoint):
    state = tmp_path_factory.mktemp("ingress")
    cfg = FederationConfig(federation="ing", model=module_digits_checkpoint, classes=tuple(str(i) for i in range(10)),
                           state_dir=state, split=SplitSpec(4))
    bundles = federation_bundles(cfg)
    registry = Registry(state)
    registry.enroll("dev", {}, {}, 40, "portable")
    return Ingress(Topics("ing"), registry, bundles.manifest, cfg.recipe, KEY), bundles


def refusal(check, *args) -> tuple[str, str]:
    with pytest.raises(Refused) as refused:
        check(*args)
    return refused.value.kind, refused.value.reason


def test_a_message_is_admitted_only_from_its_enrolled_sender_for_the_round_in_progress(ingress):
    ingress, _ = ingress
    up = Topics("ing").up
    ingress.admit(up("dev", "update"), Message("update", "dev", 3), 3)
    ingress.admit(up("new", "enroll"), Message("enroll", "new"), None)        # not enrolled yet: may enroll
    assert refusal(ingress.admit, up("dev", "update"), Message("update", "other", 3), 3)[0] == "forged"
    assert refusal(ingress.admit, up("dev", "update"), Message("features", "dev", 3), 3)[0] == "unexpected type"
    assert refusal(ingress.admit, up("new", "update"), Message("update", "new", 3), 3)[0] == "unknown device"
    assert refusal(ingress.admit, up("dev", "report"), Message("report", "dev", 2), 3) == (
        "stale", "a message for round 2; round in progress: 3")
    assert refusal(ingress.admit, up("dev", "update"), Message("update", "dev", 3), None)[0] == "stale"
    presence = Topics("ing").device_presence("dev")
    assert ingress.presence(presence, {"state": "online"}) == ("dev", True)
    assert ingress.presence(presence, {"state": "offline", "cause": "lost"}) == ("dev", False)
    assert refusal(ingress.presence, presence, "online")[0] == "malformed"


def test_an_update_weighs_only_what_the_enrollment_and_the_body_receipts_support(ingress):
    ingress, bundles = ingress
    tensors = bundles.initial_state()
    # 40 samples: round 1 trains every one (never scored yet), later rounds the kept half; two passes each
    first = [sign(KEY, "dev", 1, seq, 10) for seq in range(1, 9)]            # 2 passes x 40
    later = [sign(KEY, "dev", 2, seq, 10) for seq in range(1, 5)]            # 2 passes x 20
    for index, receipts in ((1, first), (2, later)):
        ingress.check_claims(Message("update", "dev", index, 0, {"num_samples": 40, "receipts": receipts}, tensors))
    lies = [
        ({"num_samples": 41, "receipts": first}, "dev claims 41 training samples; it enrolled with 40"),
        ({"num_samples": 40, "receipts": later[:3]}, "the body trained 30 for it this round, which supports at most 30"),
        ({"num_samples": 40, "receipts": later[:3] * 2}, "the body trained 30"),        # copies count once
        ({"num_samples": 40, "receipts": [[1, 80, "0" * 32]]}, "a body receipt no worker signed"),
        ({"num_samples": 40, "receipts": first[:4]}, "a body receipt no worker signed"),   # round 1's, in round 2
        ({"num_samples": 40}, "carries no body receipts"),
        ({"receipts": later}, "'num_samples'"),
        # what the round's summary averages must be numbers, or one device would stop the round
        ({"num_samples": 40, "receipts": later, "loss": "low"}, "reports loss 'low': not a number >= 0"),
        ({"num_samples": 40, "receipts": later, "seconds": float("nan")}, "reports seconds nan"),
        ({"num_samples": 40, "receipts": later, "payload_up": -1}, "reports payload_up -1"),
        ({"num_samples": 40, "receipts": later, "kept": True}, "reports kept True"),
    ]
    for meta, reason in lies:
        kind, why = refusal(ingress.check_claims, Message("update", "dev", 2, 0, meta, tensors))
        assert kind == "bad update" and reason in why, (meta, why)
    wrong = {**tensors, "head.prompts": np.zeros((1, 1), np.float32)}
    assert "head.prompts is float32[1, 1]" in refusal(
        ingress.check_claims, Message("update", "dev", 2, 0, {"num_samples": 40, "receipts": later}, wrong))[1]
    ingress.check_claims(Message("report", "dev", 2, 0, {"correct": 3, "samples": 4}))
    assert refusal(ingress.check_claims, Message("report", "dev", 2, 0, {"correct": 5, "samples": 4})) == (
        "bad report", "dev reports 5 correct of 4 samples")
