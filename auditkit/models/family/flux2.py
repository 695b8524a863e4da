"""Flux.2: dev and the Klein 4B / 9B distillations. Static scan only: its adapters are read
against its architecture tables; no pipeline of it loads (no ``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("flux2", "Flux.2 (dev, Klein 4B / 9B)", ("flux2-dev", "flux2-klein-4b", "flux2-klein-9b"))
