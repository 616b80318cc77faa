"""The README's by-hand broker set-up, run as written: its three lines (with this test's folders in place of
/var/lib/sfp and /etc/mosquitto, and Mosquitto started the way Debian's service starts it: as root, with Debian's
main configuration, dropping to user `mosquitto`); then the service account gets in over TLS, and an enrollment
token issued afterwards works once the broker has re-read its files on SIGHUP."""
import os
import pwd
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from cloud_server.broker import free_port, listening
from cloud_server.security import SERVICE
from wire_protocol.contracts import enroll_account
from wire_protocol.link import BrokerAccess, Link, LinkError, wait_for

README = Path(__file__).resolve().parents[1] / "README.md"
# Debian's /etc/mosquitto/mosquitto.conf (package mosquitto 2.0), with its paths under this test's folder.
DEBIAN_MAIN_CONF = """pid_file {root}/run/mosquitto.pid
persistence true
persistence_location {root}/var-lib-mosquitto/
log_dest stderr
include_dir {root}/etc/mosquitto/conf.d
"""


def _mosquitto_user() -> bool:
    try:
        pwd.getpwnam("mosquitto")
        return os.geteuid() == 0
    except KeyError:
        return False


pytestmark = pytest.mark.skipif(not _mosquitto_user(), reason="needs root and Debian's mosquitto user")


def readme_broker_steps() -> list[str]:
    """The shell lines of the README block after the `broker-setup` marker."""
    text = README.read_text()
    block = re.search(r"<!-- broker-setup -->\n```sh\n(.*?)```", text, re.S)
    assert block, "the README has no broker-setup block"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_the_readme_broker_setup_works_as_written():
    steps = readme_broker_steps()
    assert steps[-1] == "systemctl restart mosquitto", steps
    root = Path(tempfile.mkdtemp(prefix="sfp-broker-setup-", dir="/tmp"))
    root.chmod(0o755)                       # like / and /var/lib: the broker's user may pass through
    (root / "etc" / "mosquitto" / "conf.d").mkdir(parents=True)
    for folder in ("run", "var-lib-mosquitto"):       # the package's (and the service's RuntimeDirectory)
        (root / folder).mkdir()
        shutil.chown(root / folder, "mosquitto")
    port = free_port()
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    broker = None
    try:
        for line in steps[:-1]:             # secure, cp: as written, in this test's folders
            line = (line.replace("/var/lib/sfp", str(root / "var-lib-sfp"))
                    .replace("/etc/mosquitto", str(root / "etc" / "mosquitto"))
                    .replace("broker.example.org", "localhost").replace("8883", str(port)))
            done = subprocess.run(line, shell=True, env=env, capture_output=True, text=True)
            assert done.returncode == 0, (line, done.stdout, done.stderr)
        main_conf = root / "etc" / "mosquitto" / "mosquitto.conf"
        main_conf.write_text(DEBIAN_MAIN_CONF.format(root=root))
        broker = subprocess.Popen(["mosquitto", "-c", str(main_conf)], stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)       # what `systemctl restart` runs
        assert wait_for(lambda: listening(port) or broker.poll() is not None, 10)
        assert broker.poll() is None, broker.stdout.read()
        uid = next(int(line.split()[1]) for line in Path(f"/proc/{broker.pid}/status").read_text().splitlines()
                   if line.startswith("Uid:"))
        assert uid == pwd.getpwnam("mosquitto").pw_uid          # it dropped privileges, and still read its key
        security = root / "var-lib-sfp" / "security"
        assert {oct(p.stat().st_mode)[-3:] for p in (security / "broker.key", security / "passwd")} == {"640"}
        assert oct((security / "ca.key").stat().st_mode)[-3:] == "600"
        url, ca = f"mqtts://localhost:{port}", str(security / "ca.crt")
        service = (security / "server.password").read_text().strip()
        Link(url, "service", access=BrokerAccess(SERVICE, service, ca)).connect(timeout=10).close()
        # an account added afterwards: the files are rewritten by root, the broker re-reads them on SIGHUP
        token = subprocess.run(["sfp-cloud", "token", "--state", str(root / "var-lib-sfp"), "--device", "pi-07",
                                "--broker-reload", f"kill -HUP {broker.pid}"], env=env, capture_output=True,
                               text=True)
        assert token.returncode == 0, token.stderr
        enroll = BrokerAccess(enroll_account("pi-07"), token.stdout.strip(), ca)
        assert wait_for(lambda: _connects(url, enroll), 10)
        assert oct((security / "passwd").stat().st_mode)[-3:] == "640"
        with pytest.raises(LinkError, match="refused"):
            Link(url, "wrong", access=BrokerAccess(enroll_account("pi-07"), "wrong", ca)).connect(timeout=10)
    finally:
        if broker is not None and broker.poll() is None:
            broker.send_signal(signal.SIGTERM)
            broker.wait(10)
        shutil.rmtree(root, ignore_errors=True)


def _connects(url: str, access: BrokerAccess) -> bool:
    try:
        Link(url, f"probe-{os.getpid()}", access=access).connect(timeout=5).close()
        return True
    except LinkError:
        return False
