"""The server's Prometheus metrics (`sfp-cloud serve --metrics-port`), in a registry of its own: counters for what
only grows, gauges for what goes up and down, a histogram for round durations."""
from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import CounterMetricFamily

from wire_protocol.link import Traffic

ROUND_SECONDS_BUCKETS = (1, 2, 5, 10, 30, 60, 120, 300, 600, 1200, 3600, float("inf"))


class _TrafficCollector:
    """The coordinator connection's byte counts, read when Prometheus scrapes (never stale between rounds)."""

    def __init__(self, traffic: Traffic) -> None:
        self.traffic = traffic

    def collect(self) -> Iterator[CounterMetricFamily]:
        yield CounterMetricFamily("sfp_bytes_received", "Bytes received by the coordinator's connection",
                                  value=self.traffic.received)
        yield CounterMetricFamily("sfp_bytes_sent", "Bytes sent by the coordinator's connection",
                                  value=self.traffic.sent)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("sfp_rounds_completed", "Rounds aggregated and checkpointed", registry=r)
        self.round_seconds = Histogram("sfp_round_seconds", "Wall time of each aggregated round",
                                       buckets=ROUND_SECONDS_BUCKETS, registry=r)
        self.accuracy = Gauge("sfp_accuracy", "Accuracy of the global model after the last round", ["source"],
                              registry=r)
        self.enrolled = Gauge("sfp_devices_enrolled", "Devices enrolled", registry=r)
        self.online = Gauge("sfp_devices_online", "Enrolled devices whose retained presence says online", registry=r)
        self.updates = Counter("sfp_updates_accepted", "Device updates accepted into FedAvg", registry=r)
        self.refused = Counter("sfp_messages_refused", "Messages refused, by kind", ["kind"], registry=r)
        self.body_samples = Counter("sfp_body_samples", "Samples through the body's forward, by this server's "
                                    "body workers", registry=r)

    def watch(self, traffic: Traffic) -> None:
        """Expose a connection's byte counts (the coordinator's)."""
        self.registry.register(_TrafficCollector(traffic))

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
