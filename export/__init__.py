"""Cut a timm ViT for SFPrompt, get its weights, and (later) export the client slice to ONNX."""
