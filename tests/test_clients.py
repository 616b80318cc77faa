"""Who is in the federation, without a broker: online means enrolled and present."""
from cloud_server.clients import ClientManager
from cloud_server.registry import Registry


def test_online_is_enrolled_and_present_whatever_order_they_arrive_in(tmp_path):
    registry = Registry(tmp_path)
    clients = ClientManager(registry)
    clients.set_presence("pi-2", True)                  # presence before its enrollment was saved
    assert clients.online() == [] and clients.enrolled() == []
    for device in ("pi-2", "pi-1", "pi-3"):
        registry.enroll(device, {"name": "x86"}, {}, 10, "portable")
    assert clients.online() == ["pi-2"]
    clients.set_presence("pi-1", True)
    clients.set_presence("pi-1", True)                  # QoS 1 may deliver twice
    assert clients.online() == ["pi-1", "pi-2"]
    clients.set_presence("pi-2", False)
    clients.set_presence("never-enrolled", True)
    assert clients.online() == ["pi-1"] and clients.enrolled() == ["pi-1", "pi-2", "pi-3"]
    assert ClientManager(Registry(tmp_path)).enrolled() == ["pi-1", "pi-2", "pi-3"]     # enrollment survives
