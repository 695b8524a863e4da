"""Qwen-Image (and Qwen-Image-Edit): an MMDiT whose original module names are its diffusers paths.
Static scan only: its adapters are read against its architecture table; no pipeline of it loads (no
``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("qwen-image", "Qwen-Image / Qwen-Image-Edit", ("qwen-image",))
