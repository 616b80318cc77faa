"""Cut a timm ViT for SFPrompt and get its weights; (with issue 3) export the client slice to ONNX."""
