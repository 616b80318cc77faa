"""Who may talk to the federation's broker, and about what: TLS certificates, accounts, ACLs, enrollment tokens.

Everything lives in `<state>/security/`:

    ca.crt, ca.key          a local certificate authority (devices get ca.crt to check the broker)
    broker.crt, broker.key  the broker's TLS certificate, signed by the CA, for the names it is reached by
    accounts.json           the one source of truth: every account, its password hash, its kind, expiry
    passwd, acl             Mosquitto's password file and ACL file, rewritten from accounts.json on each change
    mosquitto.conf          a listener section that uses all of the above (copy it into /etc/mosquitto/conf.d/)
    server.password         the coordinator's and body workers' account password (mode 0600)
    broker.group            the group the broker runs as (Mosquitto started as root drops to user `mosquitto`):
                            broker.key, passwd and acl are 0640 in it, so the broker reads them and nobody else

Accounts and what each may touch (everything under `sfp/<federation>/`):
- `service` (the coordinator, body workers, `sfp-cloud fleet`): all of it.
- `enroll-<device>`: one device's enrollment only: publish `devices/<device>/up/enroll`, read its replies and the
  server's status. Its password is the device's enrollment token: single-use (the server marks it used when it
  enrolls the device, and drops the account soon after) and it expires.
- `<device>` (issued at enrollment, password sent to the device in its `enrolled` reply): publish its own
  `up/`, `status`, `presence`, body forward and backward requests; read its own `down/` and the server's status. So a device
  can neither act as another nor read another's replies; the broker enforces it, and the server also drops any
  message whose claimed device id is not the one in its topic.

Mosquitto reads `passwd` and `acl` at start and on SIGHUP: whoever runs the broker passes a reload hook. Or,
after `secure_with_plugin`, the broker's dynamic-security plugin holds the accounts (cloud_server/dynsec.py):
each change is sent to it over MQTT, and no broker file is written.
"""
from __future__ import annotations

import base64
import fcntl
import grp
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

from cloud_server.dynsec import SETTINGS, DynamicSecurity, plugin_acls
from sfp_common.errors import ConfigError
from sfp_common.files import write_atomic
from wire_protocol.contracts import enroll_account
from wire_protocol.link import BrokerAccess
from wire_protocol.topics import Topics, check_name

log = logging.getLogger(__name__)
SERVICE = "sfp-server"
DASHBOARD = "sfp-dashboard"        # the fleet page's read-only account
USED_TOKEN_GRACE_S = 120.0      # an enroll account outlives its use a little: its bundle reply may still be in flight
PBKDF2_ITERATIONS = 101         # what mosquitto_passwd writes ($7$ = PBKDF2-HMAC-SHA512)


def password_hash(password: str, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """A password in Mosquitto 2's password-file format."""
    salt = salt if salt is not None else secrets.token_bytes(12)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def password_matches(password: str, stored: str) -> bool:
    try:
        _, kind, iterations, salt, _ = stored.split("$")
        if kind != "7":
            return False
        expected = password_hash(password, base64.b64decode(salt), int(iterations))
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(expected, stored)


def account_rules(topics: Topics, account: dict) -> list[tuple[str, str]]:
    """What one account may touch, as (access, topic filter), access one of read, write, readwrite: the one
    statement of the rules, which both the ACL file and the dynamic-security plugin are written from."""
    if account["kind"] == "service":
        return [("readwrite", f"{topics.base}/#")]
    if account["kind"] == "dashboard":      # the fleet page: what the broker retains for dashboards, read-only
        return [("read", t) for t in (topics.server_status(), topics.enrolled(), topics.all_status(),
                                       topics.all_presence(), topics.worker_status("+"), topics.round_summary_filter())]
    device = account["device"]
    if account["kind"] == "enroll":
        return [("write", topics.up(device, "enroll")), ("read", topics.device_down(device)),
                ("read", topics.server_status())]
    return [("write", topics.up(device, "+")), ("write", topics.device_status(device)),
            ("write", topics.device_presence(device)), ("write", topics.forward(device)),
            ("write", topics.backward("+", device)), ("read", topics.device_down(device)),
            ("read", topics.server_status())]


def acl_lines(topics: Topics, username: str, account: dict) -> list[str]:
    """Mosquitto ACL file lines for one account."""
    return [f"user {username}", *(f"topic {access} {topic}" for access, topic in account_rules(topics, account)), ""]


@dataclass(frozen=True)
class Redemption:
    ok: bool
    reason: str = ""


class Security:
    """The accounts of one federation's broker, kept in `<state>/security/`; safe to use from several processes
    (the running server and `sfp-cloud token`): every change holds a file lock."""

    def __init__(self, folder: Path, federation: str, reload: Callable[[], None] | None = None) -> None:
        self.folder, self.topics, self.reload_hook = Path(folder), Topics(federation), reload
        self.folder.mkdir(parents=True, exist_ok=True)
        marker = self.folder / "federation"
        if marker.exists() and marker.read_text().strip() != federation:
            raise ConfigError(f"{self.folder} holds the accounts of federation {marker.read_text().strip()!r}, "
                              f"not {federation!r}")
        marker.write_text(federation + "\n")
        self.plugin = DynamicSecurity.from_folder(self.folder)     # None: the broker reads passwd and acl
        self._passwords: dict[str, str] = {}        # accounts made in the open change, for the plugin
        self._open: tuple[int, dict] | None = None   # (thread, accounts) of a batch in progress

    # ------------------------------------------------------------------ accounts
    @contextmanager
    def batch(self) -> Iterator[None]:
        """Several account changes read, written and told to the broker once (enrolling many devices at once: each
        change alone rewrites every account and makes the broker re-read them all)."""
        with self._accounts() as accounts:
            self._open = (threading.get_ident(), accounts)
            try:
                yield
            finally:
                self._open = None

    @contextmanager
    def _accounts(self) -> Iterator[dict]:
        """accounts.json under the lock; written back (with passwd and acl) when the block changed it. Inside a
        `batch`, its accounts, written when it ends (another thread waits for the lock, as another process does)."""
        if self._open is not None and self._open[0] == threading.get_ident():
            yield self._open[1]
            return
        with open(self.folder / ".lock", "a+") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            path = self.folder / "accounts.json"
            accounts = json.loads(path.read_text()) if path.exists() else {}
            before = json.dumps(accounts, sort_keys=True)
            earlier = json.loads(before)
            self._passwords.clear()
            yield accounts
            changed = reread = json.dumps(accounts, sort_keys=True) != before
            if changed:
                if self.plugin is not None:          # the broker first: if it cannot be told, nothing changes
                    self._tell_plugin(earlier, accounts)
                reread = self._write(accounts)
        if reread:
            self.reload_broker()

    def _tell_plugin(self, earlier: dict, accounts: dict) -> None:
        """The broker's plugin told of each account made or removed (an account's other fields are ours only)."""
        for user in sorted(set(earlier) - set(accounts)):
            self.plugin.remove_account(user)
        for user, account in sorted(accounts.items()):
            if earlier.get(user, {}).get("hash") != account["hash"]:
                self.plugin.set_account(user, self._passwords.pop(user),
                                        plugin_acls(account_rules(self.topics, account)))

    def _write(self, accounts: dict, force: bool = False) -> bool:
        """accounts.json, and the broker's passwd and acl where they changed; whether they did (only then must the
        broker re-read them: marking a token used changes neither, and each reload makes Mosquitto check every
        connected client against the new accounts)."""
        write_atomic(self.folder / "accounts.json", json.dumps(accounts, indent=1, sort_keys=True) + "\n", 0o600)
        if self.plugin is not None:
            return False
        mode, gid = broker_file_access(self.folder)
        files = {"passwd": "".join(f"{user}:{a['hash']}\n" for user, a in sorted(accounts.items())),
                 "acl": "\n".join(line for user, a in sorted(accounts.items())
                                  for line in acl_lines(self.topics, user, a)) + "\n"}
        changed = False
        for name, text in files.items():
            path = self.folder / name
            if force or not path.exists() or path.read_text() != text:
                write_atomic(path, text, mode, gid)
                changed = True
        return changed

    def reload_broker(self) -> None:
        """Ask the broker to re-read its accounts (the file route; the plugin applies each change as told)."""
        if self.plugin is None and self.reload_hook is not None:
            self.reload_hook()

    def rewrite(self) -> None:
        """Write passwd and acl again from accounts.json (after the broker's group changed)."""
        with self._accounts() as accounts:
            self._write(accounts, force=True)

    def accounts(self) -> dict:
        with self._accounts() as accounts:
            return {user: dict(a) for user, a in accounts.items()}

    def _add_account(self, username: str, kind: str, **fields: str) -> str:
        """An account with a new password (replacing any earlier one of that name); returns the password."""
        check_name(kind, username)
        password = secrets.token_urlsafe(24)
        with self._accounts() as accounts:
            accounts[username] = {"kind": kind, **fields, "hash": password_hash(password)}
            self._passwords[username] = password
        return password

    def add_service(self, username: str = SERVICE) -> str:
        """A new password for a server-side account (the coordinator, body workers, the fleet view)."""
        return self._add_account(username, "service")

    def add_dashboard(self, username: str = DASHBOARD) -> str:
        """A new password for the read-only account the fleet page's browsers use (`sfp-cloud dashboard`)."""
        return self._add_account(username, "dashboard")

    def issue_token(self, device: str, ttl_s: float) -> str:
        """A single-use enrollment token for one device, valid `ttl_s` seconds; also its enroll account's password."""
        check_name("device", device)
        if ttl_s <= 0:
            raise ConfigError(f"a token's time to live must be > 0 seconds, got {ttl_s}")
        token = secrets.token_urlsafe(24)
        with self._accounts() as accounts:
            accounts[enroll_account(device)] = {"kind": "enroll", "device": device, "hash": password_hash(token),
                                                "expires": time.time() + ttl_s, "used": None}
            self._passwords[enroll_account(device)] = token
        return token

    def redeem(self, device: str, token: str) -> Redemption:
        """Check a device's token and mark it used; a token is good once, for its device, before it expires."""
        with self._accounts() as accounts:
            entry = accounts.get(enroll_account(device))
            if entry is None or entry.get("kind") != "enroll" or not password_matches(token, entry["hash"]):
                return Redemption(False, "wrong enrollment token for this device")
            if entry["used"] is not None:
                return Redemption(False, "enrollment token already used")
            if time.time() > entry["expires"]:
                return Redemption(False, "enrollment token expired")
            entry["used"] = time.time()
        return Redemption(True)

    def add_device(self, device: str) -> str:
        """The device's own account (replacing any earlier one); returns its password, sent to the device once."""
        return self._add_account(device, "device", device=device)

    def prune(self, now: float | None = None) -> list[str]:
        """Drop enroll accounts that expired or were used more than a grace period ago; returns their names."""
        now = time.time() if now is None else now
        with self._accounts() as accounts:
            gone = [u for u, a in accounts.items() if a["kind"] == "enroll" and (
                now > a["expires"] or (a["used"] is not None and now - a["used"] > USED_TOKEN_GRACE_S))]
            for user in gone:
                del accounts[user]
        return gone


# ---------------------------------------------------------------------------------------------------- TLS
def default_broker_group() -> str | None:
    """`mosquitto` when this runs as root and that group exists (Debian's package: Mosquitto started as root
    drops to it); otherwise none: the broker runs as whoever runs this."""
    try:
        return grp.getgrnam("mosquitto").gr_name if os.geteuid() == 0 else None
    except KeyError:
        return None


def broker_file_access(folder: Path) -> tuple[int, int | None]:
    """Mode and group of broker.key, passwd and acl: 0640 in the broker's group when `secure` recorded one,
    else 0600 (the broker runs as this user)."""
    marker = folder / "broker.group"
    if marker.exists():
        try:
            return 0o640, grp.getgrnam(marker.read_text().strip()).gr_gid
        except KeyError:
            raise ConfigError(f"{marker} names group {marker.read_text().strip()!r}, which does not exist here: "
                              "run `sfp-cloud secure --broker-group` again") from None
    return 0o600, None


def _write_key(path: Path, key, mode: int = 0o600, group: int | None = None) -> None:
    """A private key, created with its final mode (never readable by others, not even between write and chmod)."""
    from cryptography.hazmat.primitives import serialization
    data = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    write_atomic(path, data, mode, group)


def _certificate(subject: str, public_key, issuer, signing_key, days: int, extensions: list):
    """An X.509 certificate for `subject` (a common name) signed by `signing_key` as `issuer` (an x509.Name)."""
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(issuer)
               .public_key(public_key).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days)))
    for extension, critical in extensions:
        builder = builder.add_extension(extension, critical=critical)
    return builder.sign(signing_key, hashes.SHA256())


def subject_alt_names(hostnames: tuple[str, ...]) -> list:
    """DNS names and IP addresses (v4 or v6, told apart by `ipaddress`) for the broker certificate."""
    import ipaddress

    from cryptography import x509
    names = []
    for host in hostnames:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def make_certificates(folder: Path, hostnames: tuple[str, ...] = ("localhost", "127.0.0.1")) -> None:
    """A local CA (kept if it exists) and a broker certificate it signs for `hostnames` (DNS names or IPs).
    P-256 keys, written 0600; nothing else is left in the folder."""
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "ca.crt").exists() and (folder / "ca.key").exists():
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
        ca_name = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes()).subject
    else:
        ca_name = x509.Name([x509.NameAttribute(x509.oid.NameOID.COMMON_NAME, "SFPrompt federation CA")])
        ca_key = ec.generate_private_key(ec.SECP256R1())
        usage = x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                              data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
                              encipher_only=False, decipher_only=False)
        ca = _certificate("SFPrompt federation CA", ca_key.public_key(), ca_name, ca_key, 3650,
                          [(x509.BasicConstraints(ca=True, path_length=None), True), (usage, True),
                           (x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), False)])
        _write_key(folder / "ca.key", ca_key)
        write_atomic(folder / "ca.crt", ca.public_bytes(serialization.Encoding.PEM), 0o644)
    key = ec.generate_private_key(ec.SECP256R1())
    usage = x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=True,
                          data_encipherment=False, key_agreement=False, key_cert_sign=False, crl_sign=False,
                          encipher_only=False, decipher_only=False)
    cert = _certificate(hostnames[0], key.public_key(), ca_name, ca_key, 825,
                        [(x509.SubjectAlternativeName(subject_alt_names(hostnames)), False),
                         (x509.BasicConstraints(ca=False, path_length=None), True), (usage, True),
                         (x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), False),
                         (x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), False)])
    _write_key(folder / "broker.key", key, *broker_file_access(folder))
    write_atomic(folder / "broker.crt", cert.public_bytes(serialization.Encoding.PEM), 0o644)


def listener_config(folder: Path, port: int = 8883, bind: str = "", plugin: Path | None = None) -> str:
    """A Mosquitto listener section: TLS with the broker certificate, accounts from passwd, ACLs from acl (or,
    with `plugin`, from the dynamic-security plugin keeping its state in that file); on `bind` (an address) or
    every interface."""
    folder = folder.resolve()
    accounts = ([f"password_file {folder / 'passwd'}", f"acl_file {folder / 'acl'}"] if plugin is None else
                [f"plugin {plugin_library()}", f"plugin_opt_config_file {Path(plugin).resolve()}"])
    return "\n".join([f"listener {port} {bind}".rstrip(), f"cafile {folder / 'ca.crt'}",
                      f"certfile {folder / 'broker.crt'}", f"keyfile {folder / 'broker.key'}",
                      "tls_version tlsv1.2", "allow_anonymous false", *accounts, ""])


def plugin_library() -> Path:
    """Mosquitto's dynamic-security plugin as the OS package installs it (Debian: in the mosquitto package)."""
    found = sorted(Path("/usr/lib").glob("*/mosquitto_dynamic_security.so")) + sorted(
        Path("/usr/lib").glob("mosquitto_dynamic_security.so"))
    if not found:
        raise ConfigError("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) is not installed")
    return found[0]


def secure(folder: Path, federation: str, hostnames: tuple[str, ...], port: int = 8883, bind: str = "",
           broker_group: str | None = None) -> str:
    """Set up a federation's broker security (certificates, the service account, the files Mosquitto reads, in
    `broker_group` when the broker runs as another user); returns the service account's password (also kept in
    server.password)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SETTINGS).unlink(missing_ok=True)         # the file route from now on, if the plugin's was taken
    marker = folder / "broker.group"
    if broker_group:
        write_atomic(marker, broker_group + "\n", 0o644)
        broker_file_access(folder)                  # the group exists
    else:
        marker.unlink(missing_ok=True)
    make_certificates(folder, hostnames)
    security = Security(folder, federation)
    password = security.add_service()
    security.rewrite()                              # passwd and acl in the broker's group, even if unchanged
    write_atomic(folder / "server.password", password + "\n", 0o600)
    (folder / "mosquitto.conf").write_text(listener_config(folder, port, bind))
    return password


def secure_with_plugin(folder: Path, federation: str, broker: str, admin: BrokerAccess) -> str:
    """A federation's accounts on a running broker's dynamic-security plugin (cloud_server/dynsec.py), reached at
    `broker` as the plugin's admin (`admin`, with the CA of the broker's certificate): the service account is
    created there and may manage accounts from then on; returns its password (also kept in server.password).
    Nothing is written for the broker to read; no certificates are made (the broker has its own)."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / SETTINGS).exists():
        raise ConfigError(f"{folder} already uses the dynamic-security plugin of "
                          f"{json.loads((folder / SETTINGS).read_text())['broker']}")
    security = Security(folder, federation)
    password = security.add_service()
    DynamicSecurity(broker, admin).create_service(security.topics, SERVICE, password,
                                                  account_rules(security.topics, {"kind": "service"}))
    write_atomic(folder / "server.password", password + "\n", 0o600)
    settings = {"broker": broker, "username": SERVICE, "ca": str(Path(admin.ca_file).resolve()) if admin.ca_file
                else None}
    write_atomic(folder / SETTINGS, json.dumps(settings, indent=1) + "\n", 0o644)
    for stale in ("passwd", "acl", "mosquitto.conf"):      # the file route's, never read by this broker
        (folder / stale).unlink(missing_ok=True)
    return password
