"""The device side: loads a client bundle and trains it with ONNX Runtime. Never imports torch."""
