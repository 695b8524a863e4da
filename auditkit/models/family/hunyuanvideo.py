"""HunyuanVideo 1.5: a video DiT. Static scan only: its adapters are read
against its architecture table; no pipeline of it loads (no ``pipeline_class``)."""

from __future__ import annotations

from auditkit.models.family.record import Family

FAMILY = Family("hunyuanvideo15", "HunyuanVideo 1.5", ("hunyuanvideo15",))
