"""chorus-p2p: serverless federated LoRA fine-tuning with exact (FedEx-LoRA) aggregation."""

__version__ = "0.1.0"
