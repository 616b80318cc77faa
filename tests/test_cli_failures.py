"""Every console script answers an unreachable, silent or refusing broker with one line naming the cause and what
to do, and exit status 2: never a traceback. Each runs as the user runs it, in its own process."""
import os
import socket
import subprocess
import sys
import threading

import pytest
from PIL import Image

from cloud_server.broker import LocalBroker, free_port
from cloud_server.security import Security, secure
from wire_protocol.link import Link, wait_for
from wire_protocol.topics import Topics

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SFP_LOG": "WARNING"}
FED = "clifail"
TINY_SERVER = ["--model", "vit_tiny_patch16_224", "--random-init", "--img-size", "16", "--classes", "2",
               "--prompts", "2", "--federation", FED]


def run(tool: str, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    module = {"sfp-edge": "edge_client.cli", "sfp-cloud": "cloud_server.cli"}[tool]
    return subprocess.run([sys.executable, "-m", module, *args], env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def one_line_error(done: subprocess.CompletedProcess, *expected: str) -> str:
    assert "Traceback" not in done.stderr + done.stdout, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for text in expected:
        assert text in lines[0], lines[0]
    tool = {"edge_client.cli": "sfp-edge", "cloud_server.cli": "sfp-cloud"}[done.args[2]]
    print(f"\n| `{tool} {done.args[3]}` | {lines[0]} |")            # the table in the issue notes (pytest -s)
    return lines[0]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    folder = tmp_path_factory.mktemp("device-data")
    for label in ("0", "1"):
        (folder / "train" / label).mkdir(parents=True)
        Image.new("L", (16, 16), 60 * int(label)).save(folder / "train" / label / "a.png")
    return folder


@pytest.fixture(scope="module")
def silent_port():
    """A port that accepts TCP connections and never says a word."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    held = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                continue
    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield server.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    server.close()


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    """A TLS broker with accounts, as `sfp-cloud secure` sets one up, and a token issued for device 'dev-t'."""
    folder = tmp_path_factory.mktemp("server-state") / "security"
    folder.mkdir()
    broker = LocalBroker(security=folder)
    secure(folder, FED, ("localhost", "127.0.0.1"), broker.port)
    token = Security(folder, FED, reload=broker.reload).issue_token("dev-t", ttl_s=600)
    with broker as url:
        yield {"url": url, "ca": str(folder / "ca.crt"), "token": token, "state": folder.parent}


def enroll(data, tmp_path, broker, *extra):
    return run("sfp-edge", "enroll", "--broker", broker, "--data", str(data), "--device-id", "dev-t", "--federation",
               FED, "--profile", "x86", "--state", str(tmp_path / "state"), "--timeout", "4", *extra)


def test_enroll_with_no_broker_at_the_address(data, tmp_path):
    one_line_error(enroll(data, tmp_path, f"mqtt://127.0.0.1:{free_port()}", "--token", "t"),
                   "nothing accepts connections", "is the broker running")


def test_enroll_against_a_port_that_never_answers(data, tmp_path, silent_port):
    one_line_error(enroll(data, tmp_path, f"mqtt://127.0.0.1:{silent_port}", "--token", "t"),
                   "no answer from the broker", "mqtts://")


def test_enroll_with_a_wrong_token_says_the_token_is_the_problem(data, tmp_path, secured):
    line = one_line_error(enroll(data, tmp_path, secured["url"], "--token", "not-the-token", "--ca", secured["ca"]),
                          "enrollment account enroll-dev-t", "token", "sfp-cloud token --device dev-t")
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").iterdir()), line


def test_tls_without_the_federations_ca(data, tmp_path, secured):
    one_line_error(enroll(data, tmp_path, secured["url"], "--token", secured["token"]), "not trusted", "--ca")
    one_line_error(run("sfp-cloud", "fleet", "--broker", secured["url"], "--federation", FED), "not trusted", "--ca")


def test_fleet_finds_the_ca_and_service_account_in_its_state_folder(secured):
    """It gets in (no TLS or account error) and says plainly that no server runs for the federation."""
    done = run("sfp-cloud", "fleet", "--broker", secured["url"], "--federation", FED, "--state", str(secured["state"]),
               "--wait", "0.5")
    one_line_error(done, f"no server status for federation {FED!r}", "sfp-cloud serve")


def test_fleet_finds_the_federation_and_lists_devices_never_seen(tmp_path):
    with LocalBroker(log=tmp_path / "broker.log") as url:
        link = Link(url, "fake-server").connect()
        empty = run("sfp-cloud", "fleet", "--broker", url, "--wait", "0.5")
        one_line_error(empty, "no federation's server status", "--federation")
        a = Topics("fa")
        link.publish_json(a.server_status(), {"state": "waiting for devices", "round": 1, "rounds": 5,
                                              "enrolled": 2, "online": 1}, retain=True)
        link.publish_json(a.enrolled(), ["d1", "d2"], retain=True)
        link.publish_json(a.device_status("d1"), {"device": "d1", "activity": "idle"}, retain=True)
        link.publish_json(a.device_presence("d1"), {"device": "d1", "state": "online"}, retain=True)
        link.close()        # waits for what it published
        found = run("sfp-cloud", "fleet", "--broker", url, "--wait", "0.5")
        assert found.returncode == 0, found.stderr
        assert "federation fa: server waiting for devices" in found.stdout
        rows = {line.split()[0]: line for line in found.stdout.splitlines() if line.startswith("d")}
        assert "online" in rows["d1"] and "never seen" in rows["d2"], found.stdout
        other = Link(url, "fake-server-b").connect()
        other.publish_json(Topics("fb").server_status(), {"state": "finished"}, retain=True)
        other.close()
        one_line_error(run("sfp-cloud", "fleet", "--broker", url, "--wait", "0.5"), "federations on this broker: fa, fb")


@pytest.mark.parametrize("command", ["fleet", "serve", "worker"])
def test_server_side_commands_with_no_broker(command, tmp_path):
    broker = f"mqtt://127.0.0.1:{free_port()}"
    args = {"fleet": ["fleet", "--broker", broker, "--federation", FED],
            "serve": ["serve", "--broker", broker, "--state", str(tmp_path / "server"), *TINY_SERVER],
            "worker": ["worker", "--broker", broker, *TINY_SERVER]}[command]
    one_line_error(run("sfp-cloud", *args), "nothing accepts connections", "is the broker running")


def test_enrollment_checks_the_images_before_it_connects(data, tmp_path):
    """A broken image is named before the token is spent: with no broker at the address the answer is about the
    data, so the check ran first. An empty class folder and a README are fine."""
    broken = tmp_path / "broken"
    for label in ("0", "1", "2"):
        (broken / "train" / label).mkdir(parents=True)
    Image.new("L", (16, 16), 10).save(broken / "train" / "0" / "a.png")
    (broken / "train" / "0" / "README.txt").write_text("where these came from")
    (broken / "train" / "1" / "b.png").write_bytes((data / "train" / "1" / "a.png").read_bytes()[:30])
    one_line_error(enroll(broken, tmp_path, f"mqtt://127.0.0.1:{free_port()}", "--token", "t"),
                   "cannot be read as images", "1/b.png", "remove or replace them")
    (broken / "train" / "1" / "b.png").unlink()
    one_line_error(enroll(broken, tmp_path, f"mqtt://127.0.0.1:{free_port()}", "--token", "t"),
                   "nothing accepts connections")


def test_run_when_the_broker_is_gone_and_before_enrolling(data, tmp_path):
    """Enrolled for real against a server on its own broker; the broker then stops: `sfp-edge run` says so in
    one line. And a state folder that holds no enrollment."""
    one_line_error(run("sfp-edge", "run", "--state", str(tmp_path / "nowhere")), "holds no enrolled device",
                   "sfp-edge enroll")
    broker = LocalBroker(log=tmp_path / "broker.log")
    with broker as url:
        server = subprocess.Popen([sys.executable, "-m", "cloud_server.cli", "serve", "--broker", url, "--state",
                                   str(tmp_path / "server"), *TINY_SERVER, "--rounds", "1", "--min-devices", "2"],
                                  env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            watcher, status = Link(url, "watch-serve").connect(), {}
            watcher.subscribe_json(Topics(FED).server_status(), lambda topic, value: status.update(value))
            assert wait_for(lambda: status.get("state") == "waiting for devices" or server.poll() is not None, 120)
            watcher.close()
            token = run("sfp-cloud", "token", "--state", str(tmp_path / "server"), "--federation", FED,
                        "--device", "dev-r")
            assert token.returncode == 0, token.stderr
            enrolled = run("sfp-edge", "enroll", "--broker", url, "--data", str(data), "--device-id", "dev-r",
                           "--federation", FED, "--profile", "x86", "--state", str(tmp_path / "device"),
                           "--token", token.stdout.strip(), "--timeout", "120")
            assert enrolled.returncode == 0, enrolled.stderr
        finally:
            server.terminate()
            server.wait(30)
    one_line_error(run("sfp-edge", "run", "--state", str(tmp_path / "device")), "nothing accepts connections",
                   "is the broker running")
