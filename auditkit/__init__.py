"""auditkit: audit LoRA adapters for text-to-image diffusion models against a safety module."""

__version__ = "0.1.0"
