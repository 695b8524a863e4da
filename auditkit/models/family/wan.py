"""Wan 2.1 (1.3B, 14B) and Wan 2.2 (A14B, either expert): video DiTs. Static scan only: its adapters are read
against its architecture tables; no pipeline of it loads (no ``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("wan", "Wan 2.1 / 2.2 (T2V)", ("wan21-1.3b", "wan21-14b", "wan22-a14b"))
