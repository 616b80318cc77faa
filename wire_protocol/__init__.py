"""The federation's wire protocol, shared by the cloud server and the devices (numpy only, no torch, no MQTT)."""
