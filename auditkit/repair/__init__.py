"""Repairs: Modular-LoRA retraining, data-free projections, adapter packs and verification re-scans."""
