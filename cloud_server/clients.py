"""Who is in the federation: the enrolled devices (the registry, kept on disk) and which of them are online (their
retained presence, as the broker reports it). Written from the MQTT thread, read by the enrollment and round
threads: one lock."""
from __future__ import annotations

import threading

from cloud_server.registry import Registry


class ClientManager:
    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._present: set[str] = set()
        self._lock = threading.Lock()

    def set_presence(self, device: str, online: bool) -> None:
        """A device's presence, enrolled or not yet (its presence may arrive before its enrollment is saved)."""
        with self._lock:
            (self._present.add if online else self._present.discard)(device)

    def is_online(self, device: str) -> bool:
        with self._lock:
            return device in self._present

    def online(self) -> list[str]:
        """The enrolled devices that are online, sorted."""
        with self._lock:
            present = sorted(self._present)
        return [d for d in present if self.registry.get(d) is not None]

    def enrolled(self) -> list[str]:
        return sorted(self.registry.devices)
