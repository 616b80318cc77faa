"""What a person or a log shipper reads: one line per round, a device's phases and progress, JSON lines."""
import json
import logging

import pytest

from cloud_server.fleet import format_round
from edge_client.agent import PROGRESS_EVERY_S, RoundProgress
from sfp_common.cli import JsonLogFormatter, configure_logging
from sfp_common.errors import ConfigError

SUMMARY = {"round": 3, "selected": ["a", "b", "c"], "participants": ["a", "c"], "accuracy": 0.91234,
           "evaluated_on": 300, "payload_up": 41000.0, "payload_down": 22568.0, "seconds": 1.25}


def test_a_round_is_one_line():
    assert format_round(SUMMARY, 10) == ("round 3/10: 2/3 updates, accuracy 0.9123 on 300 test images, 41.0 KB up + "
                                         "22.6 KB down per device, 1.2 s")
    assert "accuracy -," in format_round({**SUMMARY, "accuracy": None}, 10)


def test_json_lines_carry_the_message_and_the_structured_fields():
    record = logging.LogRecord("cloud_server.coordinator", logging.INFO, __file__, 1, "round %d done", (3,), None)
    record.fields = {"summary": SUMMARY}
    line = json.loads(JsonLogFormatter().format(record))
    assert line["message"] == "round 3 done" and line["level"] == "info"
    assert line["logger"] == "cloud_server.coordinator" and line["summary"] == SUMMARY
    assert line["time"].endswith("Z") and "T" in line["time"]
    with pytest.raises(ConfigError, match="unknown log format 'xml'"):
        configure_logging("xml")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_device_shows_its_phases_and_the_progress_of_long_split_training(caplog):
    published, clock = [], Clock()
    progress = RoundProgress("dev-1", 4, lambda **status: published.append(status), clock)
    with caplog.at_level(logging.INFO, logger="edge_client"):
        progress.phase("split training")
        for done in range(1, 101):          # 100 batches, a quarter of the progress interval each
            clock.now += PROGRESS_EVERY_S / 4
            progress.batch(done, 100)
        progress.phase("local update")
        progress.batch(1, 1)                 # a short phase shows no progress
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0] == "dev-1: round 4: split training" and lines[-1] == "dev-1: round 4: local update"
    shown = [line for line in lines if "%" in line]
    assert shown[0] == "dev-1: round 4: split training 4% (4/100 batches)"
    assert shown[-1] == "dev-1: round 4: split training 100% (100/100 batches)"
    assert len(shown) == 25                  # once per interval, the last batch included
    assert published[0] == {"activity": "split training", "progress": None}
    assert {"progress": 100} in published and published[-1] == {"activity": "local update", "progress": None}
