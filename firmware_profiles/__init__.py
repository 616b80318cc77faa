"""Device classes: what each decides about how a device takes part (one JSON file per class)."""
