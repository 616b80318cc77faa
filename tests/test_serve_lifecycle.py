"""`sfp-cloud serve` stopped the way an operator stops it (`kill`, `systemctl stop`, Ctrl-C) leaves a current
retained status for the dashboards, not the snapshot its Last Will took at start-up; and while nothing changes it
publishes nothing."""
import os
import signal
import subprocess
import sys
import time

import pytest

from wire_protocol.link import Link, wait_for
from wire_protocol.topics import Topics

FED = "lifecycle"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_server_leaves_its_current_status(broker, tmp_path, sig):
    topics, seen = Topics(FED), {}
    watcher = Link(broker, f"watch-{sig.name}").connect()
    messages = []
    watcher.subscribe_json(topics.server_status(), lambda topic, value: (seen.update(value), messages.append(value)))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "SFP_LOG": "WARNING"}
    server = subprocess.Popen(
        [sys.executable, "-m", "cloud_server.cli", "serve", "--broker", broker, "--federation", FED, "--state",
         str(tmp_path / "state"), "--model", "vit_tiny_patch16_224", "--random-init", "--img-size", "16",
         "--classes", "2", "--prompts", "2", "--rounds", "3", "--min-devices", "2"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: seen.get("state") == "waiting for devices" and seen.get("round") == 1, 120), seen
        waiting, count = dict(seen), len(messages)
        time.sleep(3)                 # waiting for devices, nothing changes: nothing is published again
        assert len(messages) == count, messages[count:]
        server.send_signal(sig)
        out, _ = server.communicate(timeout=60)
    finally:
        if server.poll() is None:
            server.kill()
    assert server.returncode == 0 and "Traceback" not in out, out
    assert wait_for(lambda: seen.get("state") == "offline", 10), seen
    watcher.close()
    # The Will carries what was known at start-up (round None, no counts); a clean stop keeps the last round and
    # the enrolled count, with a newer timestamp.
    assert seen["round"] == waiting["round"] == 1 and seen["rounds"] == 3
    assert seen["enrolled"] == 0 and seen["updated"] >= waiting["updated"]
