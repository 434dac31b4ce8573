"""mira: federated multi-task LoRA fine-tuning with MIRA Laplacian regularisation."""

__version__ = "0.1.0"
