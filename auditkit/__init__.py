"""auditkit: audit LoRA adapters for text-to-image diffusion models against a safety module.

The library API is :func:`auditkit.scan` with one :class:`auditkit.ScanConfig`::

    import auditkit
    result = auditkit.scan(auditkit.ScanConfig(candidate=Path("cand.safetensors"),
                                               safety=Path("safety.safetensors"), base="lab"))
    result.verdict.verdict, result.verdict.evidence, result.report["reasons"]

Names are imported on first use, so ``import auditkit`` stays cheap.
"""

__version__ = "0.1.0"

_EXPORTS = {"scan": "auditkit.scan:scan", "ScanConfig": "auditkit.config:ScanConfig",
            "ScanResult": "auditkit.scan:ScanResult", "Verdict": "auditkit.verdict:Verdict",
            "StaticThresholds": "auditkit.config:StaticThresholds",
            "DynamicThresholds": "auditkit.config:DynamicThresholds"}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        import importlib

        module, _, attr = _EXPORTS[name].partition(":")
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'auditkit' has no attribute {name!r}")
