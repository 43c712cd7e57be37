"""Exact FedEx-LoRA inside Flower: the example app (see ../pyproject.toml)."""
