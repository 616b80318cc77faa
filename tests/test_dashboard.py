"""The fleet page in a real browser: headless Chromium (Debian's `chromium`; `.ci/run` installs it) opens
`sfp-cloud dashboard` during a small secured federation and the test reads the rendered page, against the
federation itself: every enrolled device listed online, the round number advancing with the server's, and a
device killed shown lost within its keepalive (the broker's Last Will). The page's screenshot is saved (to
$SFP_SCREENSHOT_DIR too, when set)."""
import base64
import json
import os
import re
import shutil
import signal
import subprocess
import time
import urllib.request
from contextlib import ExitStack
from pathlib import Path

import numpy as np
import pytest
from websockets.sync.client import connect

from bench.chaos import profile_file
from cloud_server.broker import free_port
from cloud_server.demo import LocalFederation
from sfp_common.datasets import load_dataset, write_device_folder
from sfp_common.recipe import Recipe

ROOT = Path(__file__).resolve().parents[1]
KEEPALIVE = 5


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        pytest.fail("chromium is not installed (Debian: apt-get install chromium; `.ci/run` does): the fleet page "
                    "is tested in a real browser")
    return found


class Browser:
    """Headless Chromium over the DevTools protocol: enough to open a page, evaluate in it and take a picture."""

    def __init__(self, folder: Path) -> None:
        port = free_port()
        self.proc = subprocess.Popen([chromium(), "--headless=new", "--no-sandbox", "--disable-gpu",
                                      "--disable-dev-shm-usage", f"--remote-debugging-port={port}",
                                      f"--user-data-dir={folder}", "--window-size=1200,900", "about:blank"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 60
        while True:
            try:
                targets = json.load(urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2))
                page = next(t for t in targets if t["type"] == "page")
                break
            except (OSError, StopIteration):
                if time.monotonic() > deadline or self.proc.poll() is not None:
                    raise RuntimeError("headless chromium did not start") from None
                time.sleep(0.2)
        self.stack = ExitStack()
        self.ws, self.next_id = self.stack.enter_context(connect(page["webSocketDebuggerUrl"], max_size=None)), 0

    def call(self, method: str, **params) -> dict:
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            reply = json.loads(self.ws.recv(timeout=60))
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply["result"]

    def evaluate(self, expression: str):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def screenshot(self, path: Path) -> None:
        path.write_bytes(base64.b64decode(self.call("Page.captureScreenshot", format="png")["data"]))

    def close(self) -> None:
        self.stack.close()
        self.proc.kill()
        self.proc.wait(10)


ROWS = "[...document.querySelectorAll('#devices tbody tr')].map(r => [...r.cells].map(c => c.textContent))"


def wait_until(read, check, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: the page shows {value!r} after {timeout:.0f} s")
        time.sleep(0.25)


def test_the_fleet_page_shows_the_fleet_live_in_a_browser(tmp_path):
    data = load_dataset("mnist5k")
    rng = np.random.default_rng(0)
    shares = []
    for i in range(2):
        picked = rng.choice(len(data.train), 24, replace=False)
        shares.append(write_device_folder(tmp_path / f"device-{i}" / "data", data.train.subset(picked[:20]),
                                          data.train.subset(picked[20:]), data.classes))
    fed = LocalFederation(tmp_path, shares, data.classes, [
        "--model", str(ROOT / "models" / "vit-fmnist.pth"), "--rounds", "500", "--min-devices", "1"],
        str(profile_file(tmp_path, Recipe(), name="page-x86", keepalive=KEEPALIVE)), tls=True)
    browser = None
    try:
        fed.start_broker()
        fed.watch()
        fed.start_server()
        for i in range(2):
            fed.enroll(i)
            fed.start_device(i)
        address = fed.start_dashboard()         # as `make demo` starts it: `sfp-cloud dashboard`, the read-only account
        browser = Browser(tmp_path / "chromium")
        browser.call("Page.navigate", url=address)

        rows = wait_until(lambda: browser.evaluate(ROWS), lambda r: r and len(r) == 2 and all(
            row[1] == "online" for row in r), 60, "both devices online")
        assert [row[0] for row in rows] == ["device-0", "device-1"]
        assert all(row[4] == "20" for row in rows)                       # samples, from each device's status

        def server_round():
            text = browser.evaluate("document.getElementById('server').textContent") or ""
            found = re.search(r"round (\d+)/500", text)
            return int(found.group(1)) if found else 0
        first = wait_until(server_round, lambda r: r >= 1, 60, "a round")
        later = wait_until(server_round, lambda r: r > first, 60, "the round advancing")
        summaries = []
        while not fed.summaries.empty():
            summaries.append(fed.summaries.get())
        assert later <= max(s["round"] for s in summaries) + 1          # the server's own count, from the broker
        plotted = browser.evaluate("Object.keys(window.fleet.rounds).length")
        assert plotted >= 1 and browser.evaluate("document.getElementById('connection').textContent").startswith(
            "live from the broker")

        fed.devices[1].send_signal(signal.SIGKILL)      # its connection closes: the broker publishes its Will
        killed = time.monotonic()
        wait_until(lambda: browser.evaluate(ROWS), lambda r: r[1][1] == "lost" and r[0][1] == "online",
                   1.5 * KEEPALIVE + 10, "device-1 lost")
        seen_lost_after = time.monotonic() - killed
        assert seen_lost_after <= 1.5 * KEEPALIVE + 10

        picture = tmp_path / "fleet-page.png"
        browser.screenshot(picture)
        assert picture.stat().st_size > 20_000
        if os.environ.get("SFP_SCREENSHOT_DIR"):
            shutil.copy(picture, Path(os.environ["SFP_SCREENSHOT_DIR"]) / "fleet-page.png")
    finally:
        if browser is not None:
            browser.close()
        fed.close()
