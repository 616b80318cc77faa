"""The server's Prometheus metrics (`sfp-cloud serve --metrics-port`), in a registry of its own."""
from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.rounds = Counter("sfp_rounds_completed", "Rounds aggregated and checkpointed", registry=r)
        self.round_seconds = Gauge("sfp_round_seconds", "Duration of the last round", registry=r)
        self.accuracy = Gauge("sfp_accuracy", "Accuracy of the global model after the last round", ["source"],
                              registry=r)
        self.enrolled = Gauge("sfp_devices_enrolled", "Devices enrolled", registry=r)
        self.online = Gauge("sfp_devices_online", "Devices whose retained status says online", registry=r)
        self.updates = Counter("sfp_updates_accepted", "Device updates accepted into FedAvg", registry=r)
        self.refused = Counter("sfp_messages_refused", "Messages refused, by kind", ["kind"], registry=r)
        self.body_samples = Counter("sfp_body_samples", "Samples through the body (forward)", registry=r)
        self.bytes_received = Gauge("sfp_bytes_received", "Bytes received by the coordinator's connection",
                                    registry=r)

    def serve(self, port: int) -> None:
        start_http_server(port, addr="127.0.0.1", registry=self.registry)
