"""Enrollment: check the data folder (a token works once), register with the server as the one-off account its
token opens, receive and verify the bundle and the device's own broker account, keep them in the state folder."""
from __future__ import annotations

import json
import logging
import queue
import secrets
import shutil
import time
from pathlib import Path
from typing import Any

from edge_client.device_state import BUNDLE, CA, CREDENTIALS, DeviceConfig, hardware_facts
from edge_client.profiles import execution_providers
from sfp_common.bundle import install_bundle
from sfp_common.datasets import load_device_folder
from sfp_common.errors import ConfigError
from sfp_common.files import write_atomic
from wire_protocol.contracts import Profile, enroll_account
from wire_protocol.envelope import Message
from wire_protocol.link import BrokerAccess, Link, LinkError
from wire_protocol.topics import Topics, check_name

log = logging.getLogger(__name__)
ASK_AGAIN_S = 15.0         # no answer to an enrollment request this long: ask again (then after 30, 60, 120 s)
# No server status at all this long after connecting: ask anyway. A clustered broker may not deliver a message
# retained on another of its nodes (ejabberd 23.01: tests/ejabberd_cluster.py), so the status is a hint.
NO_STATUS_S = 3.0


def check_device_folder(data: str) -> tuple[int, list[str]]:
    """Decode every training and test image once, before anything is sent (an enrollment token works once): the
    sample count the server registers is what the device will train on, and the class folders that hold images."""
    names = sorted(p.name for p in (Path(data) / "train").iterdir()
                   if p.is_dir() and not p.name.startswith(".")) if (Path(data) / "train").is_dir() else []
    test = Path(data) / "test"
    if test.is_dir():
        names = sorted(set(names) | {p.name for p in test.iterdir() if p.is_dir() and not p.name.startswith(".")})
    folder = load_device_folder(data, names)
    present = sorted({names[int(y)] for y in folder.train.labels})
    return len(folder.train), present


def enroll(broker: str, token: str, profile: Profile, data: str, state: Path, device: str, federation: str,
           timeout: float = 300.0, ca_file: str | None = None, server_may_keep_tokens: bool = False) -> DeviceConfig:
    """Register with the server (as the one-off account its token opens), receive and verify the bundle and its
    own broker account, and keep them in `state`. `server_may_keep_tokens`: the owner's consent to
    `Recipe.server_keeps_tokens` (used only where the device's cut has no head blocks)."""
    check_name("device", device)
    topics = Topics(federation)
    num_samples, classes = check_device_folder(data)
    _, lacking = execution_providers(profile)          # refused here when nothing the profile allows is there
    if lacking:
        log.warning("%s", lacking)
    replies: queue.Queue[Message] = queue.Queue()
    server: dict[str, Any] = {}
    access = BrokerAccess(enroll_account(device), token, ca_file)
    # the request id: asked again, the server answers this request again instead of refusing the spent token
    request = Message("enroll", device, meta={"token": token, "profile": profile.as_dict(),
                                              "hardware": hardware_facts(), "num_samples": num_samples,
                                              "classes": classes, "request": secrets.token_hex(16)})

    def connect() -> Link:
        server.clear()
        try:
            link = Link(broker, f"{device}-enroll", max_packet=profile.max_packet, access=access).connect(
                timeout=min(15.0, timeout))
        except LinkError as err:
            if err.refused:
                raise ConfigError(f"the broker refused this device's enrollment account {enroll_account(device)}: "
                                  "the token is wrong, already used, expired or another device's; ask the operator "
                                  f"for a new one (`sfp-cloud token --device {device}`)") from None
            raise
        link.subscribe(topics.device_down(device), lambda topic, m: replies.put(m))
        link.subscribe_json(topics.server_status(), lambda topic, value: server.update(value))
        return link

    link = connect()
    try:
        connected = time.monotonic()
        deadline, sent, wait, blind = connected + timeout, None, ASK_AGAIN_S, False
        while True:
            # Ask once the server's retained status says it is up; no answer in a while (a server that was
            # still starting or restarted never saw the request; one busy enrolling many devices has not come to
            # it yet): ask again, on the same connection (an answer on its way is not lost), less and less often.
            # The server answers a request it has answered before again (the request id).
            if sent is not None and time.monotonic() - sent > wait:
                sent, wait = None, min(2 * wait, 8 * ASK_AGAIN_S)
            if server.get("state") in ("finished", "stopped"):
                raise ConfigError(f"federation {federation!r} has {server['state']}: there is nothing to enroll in")
            up = server.get("state") not in (None, "offline", "starting")
            if sent is not None and server and not up:     # the server went down after the request: ask again
                blind = True
            if up and blind:          # asked before the server was heard of: it may not have been listening yet
                sent, blind = None, False
            unheard = not server and time.monotonic() - connected > NO_STATUS_S
            if (up or unheard) and sent is None:
                link.send(topics.up(device, "enroll"), request)
                sent, blind = time.monotonic(), not up
            try:
                reply = replies.get(timeout=0.5)
            except queue.Empty:
                if time.monotonic() > deadline:
                    raise ConfigError(f"no answer to the enrollment within {timeout:.0f} s: is `sfp-cloud serve` "
                                      f"running for federation {federation!r}?") from None
                continue
            if reply.type == "refused":
                raise ConfigError(f"enrollment refused: {reply.meta.get('reason')}")
            if reply.type == "enrolling":     # the server is making the answer: wait for it, not for a re-ask
                log.info("the server is %s; waiting up to %.0f s more", reply.meta.get("note", "at work"), timeout)
                now = time.monotonic()
                deadline, sent, wait = now + timeout, now, timeout
            if reply.type == "enrolled":
                break
    finally:
        link.close()
    state.mkdir(parents=True, exist_ok=True)
    manifest = install_bundle(bytes(reply.tensors["bundle"]), state / BUNDLE)
    if server_may_keep_tokens and not manifest.prompt_gradient_only:
        log.warning("%s: this device's cut runs %d head block(s), so its tokens depend on more than the prompts: "
                    "the server cannot keep them, and they travel every round", device, manifest.head_blocks)
    credentials = reply.meta.get("credentials")
    if not isinstance(credentials, dict) or not {"username", "password"} <= set(credentials):
        raise ConfigError("the server's enrollment reply carries no broker account for this device")
    write_atomic(state / CREDENTIALS, json.dumps(credentials) + "\n", 0o600)
    if ca_file:
        shutil.copyfile(ca_file, state / CA)
    config = DeviceConfig(federation, device, broker, profile.as_dict(), str(Path(data).resolve()),
                          list(reply.meta["classes"]), num_samples, tls_ca=bool(ca_file),
                          server_may_keep_tokens=server_may_keep_tokens)
    config.save(state)
    return config
