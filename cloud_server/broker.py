"""A Mosquitto broker on loopback for the demo and the tests, from the OS package (`apt-get install mosquitto`).

Production runs any MQTT 5 broker (Mosquitto, EMQX, HiveMQ) configured by its operator; this one is configured
as the federation needs: no size limit beyond `max_packet_size` (messages are chunked below it), TCP_NODELAY,
generous queues, no persistence.
"""
from __future__ import annotations

import getpass
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from cloud_server.security import listener_config
from sfp_common.errors import ConfigError


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Whether something accepts TCP connections there (a broker that has opened its port)."""
    try:
        with socket.create_connection((host, port), timeout=0.2):
            return True
    except OSError:
        return False


class LocalBroker:
    """`with LocalBroker() as url:` a running Mosquitto at mqtt://127.0.0.1:<port>; stopped on exit.

    With `security` (a folder made by `cloud_server.security.secure`): TLS with its certificates, no anonymous
    clients, its accounts and ACLs (re-read on `reload()`), at mqtts://127.0.0.1:<port>; with `plugin` too (a
    file `mosquitto_ctrl dynsec init` made), the accounts are the dynamic-security plugin's.
    """

    def __init__(self, port: int | None = None, max_packet: int = 64 << 20, log: Path | None = None,
                 security: Path | None = None, plugin: Path | None = None) -> None:
        self.port = port or free_port()
        self.max_packet = max_packet
        self.log = log
        self.security, self.plugin = security, plugin
        self.process: subprocess.Popen | None = None
        self.folder: Path | None = None

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.security else 'mqtt'}://127.0.0.1:{self.port}"

    def reload(self) -> None:
        """Make Mosquitto re-read its password and ACL files."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGHUP)

    def start(self) -> str:
        binary = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
        if binary is None:
            raise ConfigError("mosquitto is not installed (Debian/Ubuntu: apt-get install mosquitto)")
        self.folder = Path(tempfile.mkdtemp(prefix="sfp-broker-"))
        config = self.folder / "mosquitto.conf"
        listener = (listener_config(self.security, self.port, "127.0.0.1", self.plugin) if self.security
                    else f"listener {self.port} 127.0.0.1\nallow_anonymous true\n")
        config.write_text("\n".join([
            # as root, Mosquitto would switch to user 'mosquitto', who cannot read a test's or demo's files
            listener, f"user {getpass.getuser()}", "persistence false", "set_tcp_nodelay true",
            f"max_packet_size {self.max_packet}", "max_queued_messages 100000", "max_inflight_messages 0",
            "log_dest stderr", "log_type error", "log_type warning", ""]))
        out = open(self.log, "ab") if self.log else subprocess.DEVNULL
        self.process = subprocess.Popen([binary, "-c", str(config)], stdout=out, stderr=out)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ConfigError(f"mosquitto exited at start (status {self.process.returncode})")
            if listening(self.port):
                return self.url
            time.sleep(0.05)
        self.stop()
        raise ConfigError(f"mosquitto did not open port {self.port}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
        if self.folder is not None:
            shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> str:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
