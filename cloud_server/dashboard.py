"""`sfp-cloud dashboard`: the fleet page. One static page (`fleet_page/`) that reads the broker itself, over MQTT
over WebSockets, as the read-only dashboard account (`security.DASHBOARD`: the retained server, device and worker
status and the round summaries; it can publish nothing), and shows the fleet live.

The page's WebSocket goes to /mqtt on this server, which relays it byte for byte to the broker's MQTT port (TLS
with the federation's CA for a secured broker): the broker authenticates the dashboard account and applies its
ACL, as for any client. The relay is there because a WebSocket listener is not a given: Mosquitto needs to be
built with libwebsockets, and Debian's 2.0.11 here fails to open one (`protocol websockets`: "Unable to start any
listening sockets"). The browser libraries (MQTT.js, Chart.js) come from npm (`make dashboard-assets`).
"""
from __future__ import annotations

import asyncio
import json
import logging
import ssl
from dataclasses import dataclass
from pathlib import Path

from websockets.asyncio.server import ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from sfp_common.errors import ConfigError
from wire_protocol.link import parse_broker
from wire_protocol.topics import Topics

log = logging.getLogger(__name__)
PAGE = Path(__file__).resolve().parent / "fleet_page"
LIBRARIES = {"mqtt.min.js": "mqtt/dist/mqtt.min.js", "chart.umd.min.js": "chart.js/dist/chart.umd.min.js"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8", ".json": "application/json"}


@dataclass(frozen=True)
class PageConfig:
    """What the page is told (config.json): which broker and federation, the account it logs in as, the topics."""

    broker: str
    federation: str
    username: str | None = None
    password: str | None = None

    def as_json(self) -> bytes:
        t = Topics(self.federation)
        return json.dumps({"broker": self.broker, "federation": self.federation, "username": self.username,
                           "password": self.password,
                           "topics": {"server": t.server_status(), "enrolled": t.enrolled(), "status": t.all_status(),
                                      "presence": t.all_presence(), "workers": t.worker_status("+"),
                                      "rounds": t.round_summary_filter()}}).encode()


def page_files(assets: Path) -> dict[str, Path]:
    """URL path -> file; a one-line error when the npm libraries are not installed."""
    files = {"/": PAGE / "index.html", "/fleet.js": PAGE / "fleet.js"}
    for name, relative in LIBRARIES.items():
        path = assets / relative
        if not path.is_file():
            raise ConfigError(f"the fleet page's browser libraries are missing ({path}): run `make dashboard-assets` "
                              f"(npm install in {PAGE})")
        files[f"/assets/{name}"] = path
    return files


class FleetPage:
    """The page's files, its config.json and the /mqtt relay, on one HTTP port."""

    def __init__(self, config: PageConfig, ca_file: str | None, assets: Path = PAGE / "node_modules") -> None:
        self.config, self.files = config, page_files(assets)
        self.host, self.port, tls = parse_broker(config.broker)
        self.tls = ssl.create_default_context(cafile=ca_file) if tls else None

    def respond(self, connection: ServerConnection, request: Request) -> Response | None:
        """Files and config.json over plain HTTP; None lets the WebSocket handshake of /mqtt go on."""
        path = request.path.split("?")[0]
        if path == "/mqtt":
            return None
        if path == "/config.json":
            return self._ok(self.config.as_json(), TYPES[".json"])
        file = self.files.get(path)
        if file is None:
            return connection.respond(404, "not here\n")
        return self._ok(file.read_bytes(), TYPES.get(file.suffix, "application/octet-stream"))

    @staticmethod
    def _ok(body: bytes, content_type: str) -> Response:
        return Response(200, "OK", Headers([("Content-Type", content_type), ("Content-Length", str(len(body))),
                                            ("Cache-Control", "no-store")]), body)

    async def relay(self, ws: ServerConnection) -> None:
        """One browser's MQTT connection, carried to the broker and back until either side closes."""
        try:
            reader, writer = await asyncio.open_connection(self.host, self.port, ssl=self.tls,
                                                           server_hostname=self.host if self.tls else None)
        except (OSError, ssl.SSLError) as err:
            log.warning("fleet page: cannot reach the broker at %s:%d: %s", self.host, self.port, err)
            await ws.close(1011, "the broker cannot be reached")
            return

        async def up() -> None:
            async for data in ws:
                writer.write(data if isinstance(data, bytes) else data.encode())
                await writer.drain()

        async def down() -> None:
            while data := await reader.read(1 << 16):
                await ws.send(data)
        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            writer.close()
            try:
                await ws.close()
            except ConnectionClosed:
                pass

    async def serve(self, bind: str, port: int, ready=None) -> None:
        """Serve until cancelled; `ready(port)` once listening (port 0: any free one)."""
        async with serve(self.relay, bind, port, process_request=self.respond, subprotocols=["mqtt"],
                         max_size=None) as server:
            actual = server.sockets[0].getsockname()[1]
            if ready is not None:
                ready(actual)
            await asyncio.Future()
