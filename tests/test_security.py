"""Broker security on a real Mosquitto: TLS against the federation's own CA, accounts and ACLs that confine each
device to its own topics, and enrollment tokens that work once, for one device, before they expire."""
import getpass
import os
import queue
import shutil
import subprocess
import time

import pytest

from cryptography.hazmat.primitives import serialization

from click.testing import CliRunner

from cloud_server.broker import LocalBroker, free_port, listening
from cloud_server.cli import main as cloud_main
from cloud_server.dynsec import DynamicSecurity, role_name
from cloud_server.security import DASHBOARD, SERVICE, Security, make_certificates, password_matches, secure
from wire_protocol.contracts import enroll_account
from wire_protocol.envelope import Message
from wire_protocol.link import BrokerAccess, Link, LinkError, wait_for
from wire_protocol.topics import Topics

FED = "sec"


@pytest.fixture(scope="module", params=["files", "plugin"])
def secured(request, tmp_path_factory):
    """A TLS broker with accounts: the service, device 'dev-a' and 'dev-b', and an unused token for 'dev-c'. Each
    test runs twice: accounts in Mosquitto's password and ACL files (re-read on reload), and in its
    dynamic-security plugin (told over MQTT, `sfp-cloud secure --dynamic-security`)."""
    folder = tmp_path_factory.mktemp("security")
    if request.param == "files":
        broker = LocalBroker(security=folder)
        service = secure(folder, FED, ("localhost", "127.0.0.1"), broker.port)
        security = Security(folder, FED, reload=broker.reload)
        passwords = {d: security.add_device(d) for d in ("dev-a", "dev-b")}
        token = security.issue_token("dev-c", ttl_s=600)
        with broker as url:
            yield {"url": url, "folder": folder, "security": security, "service": service, "passwords": passwords,
                   "token": token, "broker": broker, "route": "files"}
        return
    folder = tmp_path_factory.mktemp("state") / "security"
    make_certificates(folder)                              # the broker's own TLS, its accounts the plugin's
    plugin = tmp_path_factory.mktemp("plugin") / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(plugin), "admin", "admin-password"], check=True,
                   stdout=subprocess.DEVNULL)
    broker = LocalBroker(security=folder, plugin=plugin)
    with broker as url:
        admin = tmp_path_factory.mktemp("admin") / "password"
        admin.write_text("admin-password\n")
        result = CliRunner().invoke(cloud_main, ["secure", "--state", str(folder.parent),
                                                 "--federation", FED, "--dynamic-security", url,
                                                 "--admin-password-file", str(admin), "--ca",
                                                 str(folder / "ca.crt")])
        assert result.exit_code == 0, result.output
        service = (folder / "server.password").read_text().strip()
        security = Security(folder, FED)                   # no reload hook: the plugin needs none
        passwords = {d: security.add_device(d) for d in ("dev-a", "dev-b")}
        token = security.issue_token("dev-c", ttl_s=600)
        yield {"url": url, "folder": folder, "security": security, "service": service, "passwords": passwords,
               "token": token, "broker": broker, "route": "plugin"}


def access(secured, user, password) -> BrokerAccess:
    return BrokerAccess(user, password, str(secured["folder"] / "ca.crt"))


def test_mosquitto_itself_accepts_our_password_file_and_we_accept_mosquitto_passwd(tmp_path):
    """Both directions against Mosquitto's own code: a plain broker started with a password file written by
    Security lets the right password in and refuses a wrong one; a hash made by `mosquitto_passwd` matches."""
    folder = tmp_path / "plain"
    security = Security(folder, FED)
    password = security.add_device("dev-p")
    port = free_port()
    conf = tmp_path / "mosquitto.conf"
    conf.write_text(f"listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {folder / 'passwd'}\n"
                    f"user {getpass.getuser()}\npersistence false\n")
    broker = subprocess.Popen([shutil.which("mosquitto") or "/usr/sbin/mosquitto", "-c", str(conf)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"mqtt://127.0.0.1:{port}"
        assert wait_for(lambda: listening(port), 10)
        Link(url, "right", access=BrokerAccess("dev-p", password)).connect(timeout=5).close()
        with pytest.raises(LinkError, match="refused"):
            Link(url, "wrong", access=BrokerAccess("dev-p", password + "x")).connect(timeout=5)
    finally:
        broker.terminate()
        broker.wait(10)
    theirs = tmp_path / "theirs"
    subprocess.run(["mosquitto_passwd", "-b", "-c", str(theirs), "someone", "s3cret"], check=True,
                   capture_output=True)
    stored = theirs.read_text().strip().split(":", 1)[1]
    assert password_matches("s3cret", stored) and not password_matches("S3cret", stored)


def test_certificates_are_made_in_process_with_private_keys_never_readable(tmp_path):
    """The CA and the broker certificate from the `cryptography` package: keys 0600 from the start (the umask
    cannot widen them), nothing left behind, IP and DNS names told apart by `ipaddress` (IPv6 included)."""
    from cryptography import x509
    folder = tmp_path / "tls"
    old = os.umask(0)                   # the most permissive umask: a key written then chmod-ed would show it
    try:
        make_certificates(folder, ("broker.example.org", "10.0.0.7", "::1", "localhost"))
    finally:
        os.umask(old)
    assert sorted(p.name for p in folder.iterdir()) == ["broker.crt", "broker.key", "ca.crt", "ca.key"]
    assert {oct(p.stat().st_mode)[-3:] for p in folder.glob("*.key")} == {"600"}
    cert = x509.load_pem_x509_certificate((folder / "broker.crt").read_bytes())
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["broker.example.org", "localhost"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7", "::1"]
    ca = x509.load_pem_x509_certificate((folder / "ca.crt").read_bytes())
    cert.verify_directly_issued_by(ca)
    make_certificates(folder, ("other.example.org",))           # the CA is kept; a new broker certificate
    assert (folder / "ca.crt").read_bytes() == ca.public_bytes(serialization.Encoding.PEM)
    x509.load_pem_x509_certificate((folder / "broker.crt").read_bytes()).verify_directly_issued_by(ca)


def test_tls_needs_the_federations_ca_and_an_account(secured, tmp_path):
    url = secured["url"]
    assert url.startswith("mqtts://")
    with pytest.raises(LinkError, match="TLS certificate .* is not trusted .*--ca"):
        Link(url, "no-ca", access=BrokerAccess(SERVICE, secured["service"])).connect(timeout=5)
    other = tmp_path / "other-ca"
    make_certificates(other)
    with pytest.raises(LinkError, match="TLS certificate .* is not trusted"):
        Link(url, "wrong-ca", access=BrokerAccess(SERVICE, secured["service"], str(other / "ca.crt"))).connect(5)
    for user, password in ((None, None), (SERVICE, "wrong"), ("dev-a", secured["passwords"]["dev-b"])):
        with pytest.raises(LinkError, match="refused"):
            Link(url, f"bad-{user}", access=access(secured, user, password)).connect(timeout=5)
    with pytest.raises(LinkError):
        Link(url.replace("mqtts", "mqtt"), "plain").connect(timeout=3)    # the TLS port does not speak plain MQTT
    link = Link(url, "good", access=access(secured, SERVICE, secured["service"])).connect(timeout=5)
    link.close()


def test_a_device_reaches_only_its_own_topics(secured):
    topics, url = Topics(FED), secured["url"]
    server = Link(url, "server", access=access(secured, SERVICE, secured["service"])).connect()
    a = Link(url, "dev-a", access=access(secured, "dev-a", secured["passwords"]["dev-a"])).connect()
    b = Link(url, "dev-b", access=access(secured, "dev-b", secured["passwords"]["dev-b"])).connect()
    at_server, at_a, at_b = queue.Queue(), queue.Queue(), queue.Queue()
    server.subscribe(topics.all_up(), lambda t, m: at_server.put((t, m.device)))
    server.subscribe(topics.shared_forward(), lambda t, m: at_server.put((t, m.device)))
    a.subscribe(topics.device_down("dev-a"), lambda t, m: at_a.put(t))
    a.subscribe(topics.device_down("dev-b"), lambda t, m: at_a.put(t))          # not allowed: never delivers
    a.subscribe(topics.all_up(), lambda t, m: at_a.put(t))                      # nor this
    b.subscribe(topics.device_down("dev-b"), lambda t, m: at_b.put(t))
    time.sleep(0.3)

    a.send(topics.up("dev-a", "update"), Message("update", "dev-a"))            # its own: delivered
    a.send(topics.forward("dev-a"), Message("forward", "dev-a"))
    a.send(topics.up("dev-b", "update"), Message("update", "dev-b"))            # as another device: dropped
    a.send(topics.forward("dev-b"), Message("forward", "dev-b"))
    a.send(topics.down("dev-b", "round"), Message("round", "dev-b"))            # to another's replies: dropped
    got = {at_server.get(timeout=5), at_server.get(timeout=5)}
    assert got == {(topics.up("dev-a", "update"), "dev-a"), (topics.forward("dev-a"), "dev-a")}
    server.send(topics.down("dev-b", "round"), Message("round", "dev-b"))       # the server's reply reaches b only
    assert at_b.get(timeout=5) == topics.down("dev-b", "round")
    time.sleep(0.5)
    assert at_server.empty() and at_a.empty() and at_b.empty()
    for link in (server, a, b):
        link.close()


def test_the_dashboard_account_reads_the_fleet_status_and_publishes_nothing(secured):
    """The fleet page's browsers log in as this account: the retained status and rounds, nothing else, read-only."""
    topics, url = Topics(FED), secured["url"]
    password = secured["security"].add_dashboard()
    server = Link(url, "server-d", access=access(secured, SERVICE, secured["service"])).connect()
    page = Link(url, "page", access=access(secured, DASHBOARD, password)).connect()
    shown = [(topics.server_status(), {"state": "training"}), (topics.enrolled(), ["dev-a"]),
             (topics.device_status("dev-a"), {"activity": "idle"}),
             (topics.device_presence("dev-a"), {"state": "online"}),
             (topics.worker_status("w0"), {"state": "up"}), (topics.round_summary(1), {"round": 1})]
    for topic, value in shown:
        server.publish_json(topic, value, retain=True)
    server.send(topics.down("dev-a", "round"), Message("round", "dev-a"))
    seen, at_server = queue.Queue(), queue.Queue()
    for pattern in (topics.server_status(), topics.enrolled(), topics.all_status(), topics.all_presence(),
                    topics.worker_status("+"), topics.round_summary_filter(), topics.device_down("dev-a"),
                    topics.all_up(), f"{topics.base}/#"):
        page.subscribe_json(pattern, lambda t, v: seen.put((t, v)))
    server.subscribe(topics.all_up(), lambda t, m: at_server.put(t))
    server.subscribe_json(topics.server_status(), lambda t, v: at_server.put((t, v)))
    assert at_server.get(timeout=5) == (topics.server_status(), {"state": "training"})      # retained, to the server
    got = {}
    while len(got) < len(shown):
        topic, value = seen.get(timeout=5)
        got[topic] = value
    assert got == dict(shown)
    page.publish_json(topics.server_status(), {"state": "forged"}, retain=True)             # dropped by the broker
    page.send(topics.up("dev-a", "update"), Message("update", "dev-a"))
    time.sleep(0.5)
    assert at_server.empty()
    while not seen.empty():                     # nothing else reached the page
        assert seen.get()[0] in got
    for link in (server, page):
        link.close()


def test_tokens_are_single_use_bound_to_a_device_and_expire(secured):
    security, url = secured["security"], secured["url"]
    topics = Topics(FED)
    # The enroll account reaches its device's enrollment topic and nothing else.
    enroll = Link(url, "dev-c-enroll", access=access(secured, enroll_account("dev-c"), secured["token"])).connect()
    server = Link(url, "server-2", access=access(secured, SERVICE, secured["service"])).connect()
    seen = queue.Queue()
    server.subscribe(topics.all_up(), lambda t, m: seen.put(t))
    time.sleep(0.3)
    enroll.send(topics.up("dev-c", "update"), Message("update", "dev-c"))
    enroll.send(topics.up("dev-c", "enroll"), Message("enroll", "dev-c"))
    assert seen.get(timeout=5) == topics.up("dev-c", "enroll")
    time.sleep(0.3)
    assert seen.empty()
    enroll.close()
    server.close()

    assert security.redeem("dev-a", secured["token"]).reason == "wrong enrollment token for this device"
    assert security.redeem("dev-c", "guess").reason == "wrong enrollment token for this device"
    assert security.redeem("dev-c", secured["token"]).ok
    assert security.redeem("dev-c", secured["token"]).reason == "enrollment token already used"
    short = security.issue_token("dev-d", ttl_s=0.05)
    time.sleep(0.1)
    assert security.redeem("dev-d", short).reason == "enrollment token expired"
    # Used and expired enroll accounts leave the broker: the used one after its grace period.
    now = time.time()
    assert security.prune(now) == [enroll_account("dev-d")]
    assert security.prune(now + 3600) == [enroll_account("dev-c")]
    assert not any(a["kind"] == "enroll" for a in security.accounts().values())
    with pytest.raises(LinkError, match="refused"):
        Link(url, "dev-c-again", access=access(secured, enroll_account("dev-c"), secured["token"])).connect(5)


def test_accounts_file_is_the_truth_and_secrets_are_not_in_it(secured):
    folder = secured["folder"]
    text = "".join((folder / f).read_text() for f in ("accounts.json", "passwd", "dynsec.json")
                   if (folder / f).exists())
    assert secured["service"] not in text and all(p not in text for p in secured["passwords"].values())
    assert oct((folder / "accounts.json").stat().st_mode)[-3:] == "600"
    assert oct((folder / "server.password").stat().st_mode)[-3:] == "600"
    assert (folder / "server.password").read_text().strip() == secured["service"]
    if secured["route"] == "plugin":      # nothing the broker would read is written; the plugin holds the rules
        assert not {"passwd", "acl", "mosquitto.conf"} & {p.name for p in folder.iterdir()}
        role = DynamicSecurity.from_folder(folder).run([{"command": "getRole", "rolename": role_name("dev-a")}])
        acls = {(a["acltype"], a["topic"]) for a in role[0]["data"]["role"]["acls"]}
        assert ("publishClientSend", f"sfp/{FED}/devices/dev-a/up/+") in acls
        assert ("subscribePattern", Topics(FED).device_down("dev-a")) in acls
        return
    acl = (folder / "acl").read_text()
    assert f"user dev-a\ntopic write sfp/{FED}/devices/dev-a/up/+" in acl


def test_a_federation_on_the_plugin_route_enrolls_and_trains_with_nothing_written_for_the_broker(tmp_path):
    """The by-hand steps with the plugin, each command in its own process: `sfp-cloud secure --dynamic-security`,
    `sfp-cloud token`, `serve`, `sfp-edge enroll` and `run`; the device's account is made over MQTT at enrollment
    (no file, no reload) and the round completes."""
    import json
    import sys

    from PIL import Image
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SFP_LOG": "WARNING"}

    def cli(module, *args, **kwargs):
        return subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                              timeout=120, **kwargs)
    for label in ("0", "1"):
        (tmp_path / "data" / "train" / label).mkdir(parents=True)
        Image.new("L", (16, 16), 60 * int(label)).save(tmp_path / "data" / "train" / label / "a.png")
    state, security = tmp_path / "server", tmp_path / "server" / "security"
    make_certificates(security)
    plugin = tmp_path / "dynamic-security.json"
    subprocess.run(["mosquitto_ctrl", "dynsec", "init", str(plugin), "admin", "admin-password"], check=True,
                   stdout=subprocess.DEVNULL)
    (tmp_path / "admin.password").write_text("admin-password\n")
    with LocalBroker(security=security, plugin=plugin) as url:
        ca = str(security / "ca.crt")
        done = cli("cloud_server.cli", "secure", "--state", str(state), "--federation", "plug", "--dynamic-security",
                   url, "--admin-password-file", str(tmp_path / "admin.password"), "--ca", ca)
        assert done.returncode == 0, done.stderr
        token = cli("cloud_server.cli", "token", "--state", str(state), "--federation", "plug", "--device", "dev-p")
        assert token.returncode == 0, token.stderr
        server = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "serve", "--broker", url, "--state",
                                   str(state), "--federation", "plug", "--model", "vit_tiny_patch16_224",
                                   "--random-init", "--img-size", "16", "--classes", "2", "--prompts", "2",
                                   "--rounds", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                  text=True)
        device = None
        try:
            enrolled = cli("edge_client.cli", "enroll", "--broker", url, "--ca", ca, "--data", str(tmp_path / "data"),
                           "--device-id", "dev-p", "--federation", "plug", "--profile", "x86", "--state",
                           str(tmp_path / "device"), "--token", token.stdout.strip(), "--timeout", "120")
            assert enrolled.returncode == 0, enrolled.stderr
            device = subprocess.Popen([sys.executable, "-m", "edge_client.cli", "run", "--state",
                                       str(tmp_path / "device")], env=env, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
            watcher, status = Link(url, "watch", access=BrokerAccess(
                SERVICE, (security / "server.password").read_text().strip(), ca)).connect(), {}
            watcher.subscribe_json(Topics("plug").server_status(), lambda topic, value: status.update(value))
            assert wait_for(lambda: status.get("state") == "finished" or server.poll() is not None, 120), status
            watcher.close()
        finally:
            for process in (device, server):
                if process is not None:
                    process.terminate()
                    process.wait(30)
        summary = json.loads((state / "rounds.jsonl").read_text().splitlines()[-1])
        assert summary["round"] == 1 and summary["participants"] == ["dev-p"], summary
        assert not {"passwd", "acl"} & {p.name for p in security.iterdir()}
        clients = DynamicSecurity.from_folder(security).run([{"command": "listClients"}])[0]["data"]["clients"]
        assert {SERVICE, "dev-p"} <= set(clients)


def test_with_the_plugin_unreachable_an_account_change_says_so_and_changes_nothing(tmp_path):
    """`sfp-cloud token` on the plugin route with the broker down: one line, exit 2, and no token kept that the
    broker never heard of."""
    import json
    import sys
    folder = tmp_path / "security"
    folder.mkdir()
    (folder / "server.password").write_text("pw\n")
    (folder / "dynsec.json").write_text(json.dumps({"broker": f"mqtt://127.0.0.1:{free_port()}",
                                                    "username": SERVICE, "ca": None}))
    done = subprocess.run([sys.executable, "-m", "cloud_server.cli", "token", "--state", str(tmp_path), "--federation",
                           FED, "--device", "dev-x"], capture_output=True, text=True, timeout=60,
                          env={**os.environ, "SFP_LOG": "WARNING"})
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.startswith("error: nothing accepts connections") and len(done.stderr.splitlines()) == 1
    assert not (folder / "accounts.json").exists()
