"""Flux.1 Kontext: Flux.1's transformer (its table says ``same_as`` flux), told apart by a
file's metadata only. Static scan only: its adapters are read against its architecture table; no
pipeline of it loads (no ``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("flux-kontext", "Flux.1 Kontext (dev)", ("flux-kontext",))
