"""Broker accounts through Mosquitto's dynamic-security plugin, for a broker the server does not run next to.

The plugin keeps accounts and ACLs inside the broker and takes changes as JSON commands published to
`$CONTROL/dynamic-security/v1` by an account allowed to (answers on `.../response`): nothing to write on the
broker's disk, nothing to reload. `sfp-cloud secure --dynamic-security URL` uses the plugin's admin account once,
to create the federation's service account with the right to manage accounts; from then on every change
(`cloud_server/security.py`: tokens, device accounts, their removal) is sent as the service account. Each account
gets a role of its own holding exactly the rules `security.account_rules` states, the ones the ACL-file route
writes.

Mosquitto's ACL file says `read`; the plugin splits it: subscribing needs `subscribePattern`, and receiving is
allowed by default (`publishClientReceive`), so what a client may read is what it may subscribe to.
"""
from __future__ import annotations

import json
import queue
import secrets
from pathlib import Path
from typing import Any

from sfp_common.errors import ServiceError
from wire_protocol.link import BrokerAccess, Link
from wire_protocol.topics import Topics

CONTROL = "$CONTROL/dynamic-security/v1"
SETTINGS = "dynsec.json"          # in <state>/security/: where the broker is, when this route is taken
MANAGE = "sfp-manage-accounts"    # the role that lets the service account manage accounts


def role_name(username: str) -> str:
    return f"sfp-account-{username}"


def plugin_acls(rules: list[tuple[str, str]]) -> list[dict]:
    """(access, topic filter) rules as the plugin's ACL entries. The plugin checks a shared subscription with its
    `$share/<group>/` prefix (the ACL file does not): what may be read may also be read in a share group."""
    acls = []
    for access, topic in rules:
        if access in ("read", "readwrite"):
            acls += [{"acltype": "subscribePattern", "topic": t, "allow": True} for t in (topic, f"$share/+/{topic}")]
        if access in ("write", "readwrite"):
            acls.append({"acltype": "publishClientSend", "topic": topic, "allow": True})
    return acls


MANAGE_ACLS = [{"acltype": kind, "topic": f"{CONTROL}/#", "allow": True}
               for kind in ("publishClientSend", "publishClientReceive", "subscribePattern")]


class DynamicSecurity:
    """One broker's plugin, reached as one account: every call connects, sends its commands, waits for the answers
    and disconnects (account changes are rare; no connection is kept across processes)."""

    def __init__(self, broker: str, access: BrokerAccess, timeout_s: float = 10.0) -> None:
        self.broker, self.access, self.timeout_s = broker, access, timeout_s

    @classmethod
    def from_folder(cls, folder: Path, password: str | None = None) -> DynamicSecurity | None:
        """The plugin route as `sfp-cloud secure` recorded it in `folder`, as the service account; None when the
        federation uses the ACL-file route."""
        path = Path(folder) / SETTINGS
        if not path.exists():
            return None
        settings = json.loads(path.read_text())
        if password is None:
            password = (Path(folder) / "server.password").read_text().strip()
        return cls(settings["broker"], BrokerAccess(settings["username"], password, settings.get("ca")))

    def run(self, commands: list[dict], tolerate: tuple[str, ...] = ()) -> list[dict]:
        """Send the commands, return the plugin's answers; ServiceError for an error not in `tolerate` (e.g.
        deleting what is already gone)."""
        answers: queue.Queue[Any] = queue.Queue()
        correlation = secrets.token_hex(8)
        link = Link(self.broker, f"sfp-accounts-{correlation}", access=self.access).connect()
        try:
            link.subscribe_json(f"{CONTROL}/response", lambda topic, value: answers.put(value))
            link.publish_json(CONTROL, {"commands": [{**c, "correlationData": f"{correlation}-{i}"}
                                                     for i, c in enumerate(commands)]})
            got: dict[str, dict] = {}
            while len(got) < len(commands):
                try:
                    value = answers.get(timeout=self.timeout_s)
                except queue.Empty:
                    raise ServiceError(f"the broker at {self.broker} did not answer its dynamic-security commands "
                                       f"within {self.timeout_s:.0f} s: is the plugin loaded, and may "
                                       f"{self.access.username!r} use {CONTROL}?") from None
                for answer in value.get("responses", []) if isinstance(value, dict) else []:
                    if str(answer.get("correlationData", "")).startswith(correlation):
                        got[answer["correlationData"]] = answer
        finally:
            link.close()
        ordered = [got[f"{correlation}-{i}"] for i in range(len(commands))]
        for command, answer in zip(commands, ordered):
            error = answer.get("error")
            if error and not any(t in error for t in tolerate):
                raise ServiceError(f"the broker's dynamic-security plugin refused {command['command']} "
                                   f"{command.get('username') or command.get('rolename', '')}: {error}")
        return ordered

    def set_account(self, username: str, password: str, acls: list[dict]) -> None:
        """The account with this password and exactly these ACLs, replacing any account of that name."""
        role = role_name(username)
        self.run([{"command": "deleteClient", "username": username}, {"command": "deleteRole", "rolename": role}],
                 tolerate=("not found",))
        self.run([{"command": "createRole", "rolename": role, "acls": acls},
                  {"command": "createClient", "username": username, "password": password,
                   "roles": [{"rolename": role}]}])

    def remove_account(self, username: str) -> None:
        self.run([{"command": "deleteClient", "username": username},
                  {"command": "deleteRole", "rolename": role_name(username)}], tolerate=("not found",))

    def create_service(self, topics: Topics, username: str, password: str, rules: list[tuple[str, str]]) -> None:
        """Run once as the plugin's admin: the service account, with its federation rules and the right to manage
        accounts from now on. An account of that name already there (another federation's?) is left alone."""
        if not self.run([{"command": "getClient", "username": username}], tolerate=("not found",))[0].get("error"):
            raise ServiceError(f"the broker at {self.broker} already has an account {username!r} (another "
                               f"federation's service account?); if it is stale, remove it: mosquitto_ctrl "
                               f"dynsec deleteClient {username}")
        self.run([{"command": "createRole", "rolename": MANAGE, "acls": MANAGE_ACLS}],
                 tolerate=("already exists",))              # other federations on this broker share it
        self.set_account(username, password, plugin_acls(rules))
        self.run([{"command": "addClientRole", "username": username, "rolename": MANAGE}])
