"""Chroma: a Flux.1-schnell derivative without the modulation inputs (its own transformer class).
Static scan only: its adapters are read against its architecture table; no pipeline of it loads (no
``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("chroma", "Chroma", ("chroma",))
