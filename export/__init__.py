"""Cut a timm ViT for SFPrompt, get its weights, and export the client slice as a checked ONNX bundle."""
