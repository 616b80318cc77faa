"""The cloud side of the federation: the ViT body, round coordination, aggregation, enrollment, fleet status."""
