"""Torch-free pieces both sides of the federation share: data, partitioning, aggregation, pruning."""
