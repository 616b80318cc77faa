"""A real clustered MQTT 5 broker for the tests: two ejabberd nodes (Debian's `ejabberd`, its `mod_mqtt`) joined
into one cluster on loopback, each with its own MQTT port.

What ejabberd 23.01 does differently from Mosquitto (measured here, README "At fleet scale"): no shared
subscriptions (its CONNACK says so, and a `$share/` SUBSCRIBE closes the session), a message that matches two
subscriptions of one client comes as two PUBLISHes (one per subscription identifier), retained messages first
retained on one node are not delivered to a later subscriber on the other, and a client must log in with a user
name (any name and password: anonymous login here, as an open Mosquitto takes anyone).

`ejabberdctl` run as root switches to the `ejabberd` user, so the nodes' folders live outside pytest's private
temporary folder, owned by that user.
"""
from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from pathlib import Path

from cloud_server.broker import free_port

CONFIG = """loglevel: warning
log_rotate_count: 0
hosts:
  - localhost
listen:
  -
    port: {port}
    ip: "127.0.0.1"
    module: mod_mqtt
    backlog: 1000
    max_payload_size: 4194304
auth_method: anonymous
anonymous_protocol: login_anon
allow_multiple_connections: true
acl:
  local:
    user_regexp: ""
access_rules:
  local:
    allow: local
api_permissions:
  "console commands":
    from:
      - ejabberd_ctl
    who: all
    what: "*"
modules:
  mod_mqtt:
    access_subscribe:
      "#":
        - allow: local
    access_publish:
      "#":
        - allow: local
"""


def available() -> str | None:
    """Why a cluster cannot be started here, or None."""
    if shutil.which("ejabberdctl") is None:
        return "ejabberd is not installed (`make test` installs it: Debian package ejabberd)"
    if os.geteuid() != 0:
        return "ejabberdctl runs its nodes as the ejabberd user, which needs root to start them"
    return None


class EjabberdCluster:
    """Two nodes, `a` and `b`, clustered; `urls` are their MQTT addresses."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sfp-ejabberd-"))
        self.root.chmod(0o755)
        tag = f"{os.getpid()}{secrets.token_hex(2)}"
        self.nodes = {n: f"sfp{n}{tag}@localhost" for n in "ab"}
        self.ports = {n: free_port() for n in "ab"}
        self.started: list[str] = []
        for n in "ab":
            config, data = self.root / n, self.root / f"{n}-data"
            (data / "db").mkdir(parents=True)
            (data / "log").mkdir()
            config.mkdir()
            (config / "ejabberd.yml").write_text(CONFIG.format(port=self.ports[n]))
            (config / "ejabberdctl.cfg").write_text(
                f"ERLANG_NODE={self.nodes[n]}\nEJABBERD_BYPASS_WARNINGS=true\nINET_DIST_INTERFACE=127.0.0.1\n"
                f"EJABBERD_PID_PATH={data}/ejabberd.pid\n")
            shutil.copyfile("/etc/ejabberd/inetrc", config / "inetrc")
            shutil.chown(data, "ejabberd", "ejabberd")
            for sub in data.iterdir():
                shutil.chown(sub, "ejabberd", "ejabberd")
        for path in self.root.rglob("*"):
            path.chmod(path.stat().st_mode | 0o055)

    @property
    def urls(self) -> dict[str, str]:
        return {n: f"mqtt://127.0.0.1:{p}" for n, p in self.ports.items()}

    def ctl(self, node: str, *args: str, timeout: float = 60) -> str:
        done = subprocess.run(["ejabberdctl", "--config-dir", str(self.root / node), "--spool",
                               str(self.root / f"{node}-data" / "db"), "--logs", str(self.root / f"{node}-data" / "log"),
                               *args], capture_output=True, text=True, timeout=timeout, cwd=self.root)
        if done.returncode != 0:
            raise RuntimeError(f"ejabberdctl {' '.join(args)} on node {node}: {done.stdout}{done.stderr}\n"
                               f"{self.log(node)}")
        return done.stdout

    def log(self, node: str) -> str:
        path = self.root / f"{node}-data" / "log" / "ejabberd.log"
        return path.read_text()[-3000:] if path.exists() else ""

    def start(self) -> EjabberdCluster:
        for n in "ab":
            self.ctl(n, "start")
            self.started.append(n)
            self.ctl(n, "started")
        self.ctl("b", "join_cluster", self.nodes["a"])
        self.ctl("b", "started")
        members = self.ctl("a", "list_cluster").split()
        assert sorted(members) == sorted(self.nodes.values()), members
        return self

    def stop(self) -> None:
        for n in reversed(self.started):
            try:
                self.ctl(n, "stop")
                self.ctl(n, "stopped")
            except (RuntimeError, subprocess.TimeoutExpired):
                pass
        self.started.clear()
        shutil.rmtree(self.root, ignore_errors=True)
