"""The reference federation in one process (PyTorch): SFPrompt, its ablations and the baselines."""
