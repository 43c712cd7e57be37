"""Local LoRA training for a node: datasets, a tiny offline model, the trainer and its loops."""
