"""Canonical adapters: per target module the down factor A (r×in), up factor B (out×r) and scale.

ΔW = scale · B · A, with conv kernels flattened (A is r × in·kh·kw). Every layout is read into
this one form, and every module's shape is validated against a known architecture: an adapter
that maps nothing fails closed (exit 3), one whose shapes fit no architecture is refused (exit 2).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput, Unscannable
from auditkit.lora import formats
from auditkit.lora.io import SafetensorsFile, open_safetensors
from auditkit.models import architectures
from auditkit.models.architectures import Architecture, ModuleShape


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One module's low-rank update ΔW = scale · up @ down."""

    name: str
    down: np.ndarray  # A: rank × in (conv kernels flattened)
    up: np.ndarray  # B: out × rank
    scale: float

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    def delta(self) -> np.ndarray:
        """The dense update (for tests and small modules; the scan never calls this)."""
        return self.scale * (self.up.astype(np.float64) @ self.down.astype(np.float64))


@dataclass
class Coverage:
    mapped: list[str] = field(default_factory=list)
    unmapped: list[str] = field(default_factory=list)
    ignored: list[str] = field(default_factory=list)

    @property
    def fraction(self) -> float:
        """Share of the weight keys (ignored keys excluded) that were mapped to a module."""
        total = len(self.mapped) + len(self.unmapped)
        return len(self.mapped) / total if total else 0.0

    def to_dict(self, max_listed: int = 50) -> dict:
        return {
            "mapped": len(self.mapped),
            "unmapped": len(self.unmapped),
            "ignored": len(self.ignored),
            "fraction": self.fraction,
            "unmapped_keys": self.unmapped[:max_listed],
            "ignored_keys": self.ignored[:max_listed],
        }


@dataclass
class Adapter:
    path: Path
    sha256: str
    size: int
    layout: str
    architecture: Architecture
    modules: dict[str, LoraModule]
    metadata: dict[str, str]
    coverage: Coverage
    notes: list[str] = field(default_factory=list)
    architecture_candidates: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({round(m.scale, 6) for m in self.modules.values()})
        components: dict[str, int] = {}
        for name in self.modules:
            comp = name.split(".", 1)[0]
            components[comp] = components.get(comp, 0) + 1
        return {
            "path": str(self.path),
            "sha256": self.sha256,
            "size_bytes": self.size,
            "format": self.layout,
            "architecture": self.architecture.name,
            "architecture_label": self.architecture.label,
            "architecture_candidates": self.architecture_candidates,
            "modules": len(self.modules),
            "components": components,
            "ranks": ranks,
            "scales": scales,
            "coverage": self.coverage.to_dict(),
            "notes": self.notes,
        }


# --------------------------------------------------------------------------------------------
# reading


def read_adapter(
    path: str | Path,
    arch: str | Architecture | None = None,
    extra_architectures: tuple[Architecture, ...] = (),
) -> Adapter:
    """Read a LoRA ``.safetensors`` file in any supported layout into canonical form.

    Args:
        path: the adapter file.
        arch: force an architecture (name or object); by default the one whose module names and
            shapes fit the file (ties broken by the file's own metadata).
        extra_architectures: more architectures to consider (e.g. the lab model).

    Example:
        >>> adapter = read_adapter("candidate.safetensors")  # doctest: +SKIP
        >>> adapter.architecture.name, len(adapter.modules)  # doctest: +SKIP
        ('sd15', 192)
    """
    st = open_safetensors(path)
    path = Path(path)
    keys = list(st.tensors)
    if not keys:
        raise Unscannable(path, "file holds no tensors")
    algorithm = formats.unsupported_algorithm(keys)
    if algorithm:
        raise Unscannable(path, f"{algorithm} adapters are not supported yet; only LoRA/LoCon can be scanned")
    layout = formats.detect_layout(keys)
    if layout is None:
        raise Unscannable(path, "no LoRA keys recognised (expected kohya, diffusers or peft layout)")

    parts: dict[str, dict[str, str]] = {}  # layout module -> part -> key
    ignored, unparsed = [], []
    for key in keys:
        kp = formats.split_key(key, layout)
        if kp is None:
            (ignored if formats.is_ignored(key) else unparsed).append(key)
        else:
            parts.setdefault(kp.module, {})[kp.part] = key

    choices = list(architectures.builtin()) + list(extra_architectures)
    if arch is not None:
        choices = [architectures.get(arch) if isinstance(arch, str) else arch]
    chosen, resolved, fitting = _choose_architecture(st, path, layout, parts, choices)

    coverage = Coverage(ignored=ignored, unmapped=list(unparsed))
    notes: list[str] = []
    scale_of = _scale_rule(st, path, layout, notes)
    modules: dict[str, LoraModule] = {}
    for module, keyset in parts.items():
        canonical = resolved.get(module)
        if canonical is None or "down" not in keyset or "up" not in keyset:
            coverage.unmapped.extend(keyset.values())
            continue
        down = st.float_array(keyset["down"])
        up = st.float_array(keyset["up"])
        down2, up2 = down.reshape(down.shape[0], -1), up.reshape(up.shape[0], -1)
        alpha = None
        if "alpha" in keyset:
            alpha_arr = st.float_array(keyset["alpha"])
            if alpha_arr.size != 1:
                raise BadInput(path, f"alpha '{keyset['alpha']}' should be a scalar, has shape {alpha_arr.shape}")
            alpha = float(alpha_arr.reshape(()))
        scale = scale_of(canonical, down2.shape[0], alpha)
        modules[canonical] = LoraModule(canonical, down2, up2, scale)
        coverage.mapped.extend(keyset.values())

    if not modules:
        raise Unscannable(path, "no complete LoRA module (down and up factors) maps to the architecture")
    coverage.unmapped.sort()
    return Adapter(
        path=path,
        sha256=st.sha256,
        size=st.size,
        layout=layout,
        architecture=chosen,
        modules=dict(sorted(modules.items())),
        metadata=st.metadata,
        coverage=coverage,
        notes=notes,
        architecture_candidates=fitting,
    )


def _choose_architecture(
    st: SafetensorsFile, path: Path, layout: str, parts: dict[str, dict[str, str]], choices: list[Architecture]
) -> tuple[Architecture, dict[str, str], list[str]]:
    """Pick the architecture whose names and shapes fit; fail closed when none does."""
    results = []  # (arch, resolved, misfits)
    for arch in choices:
        resolved: dict[str, str] = {}
        misfits: list[str] = []
        for module, options in formats.LAYOUTS[layout].resolve(list(parts), arch).items():
            keyset = parts[module]
            if "down" not in keyset or "up" not in keyset:
                continue
            down_shape = st.tensors[keyset["down"]].shape
            up_shape = st.tensors[keyset["up"]].shape
            fit = next((o for o in options if _fits(down_shape, up_shape, arch.modules[o])), None)
            if fit is None:
                s = arch.modules[options[0]]
                misfits.append(
                    f"'{module}' has down {list(down_shape)} and up {list(up_shape)}, but {arch.name} "
                    f"{options[0]} is {s.kind} {s.out_features}x{s.in_features}"
                    + (f" kernel {s.kernel[0]}x{s.kernel[1]}" if s.kernel != (1, 1) else "")
                )
            else:
                resolved[module] = fit
        results.append((arch, resolved, misfits))

    good = [r for r in results if r[1] and not r[2]]
    if not good:
        with_names = [r for r in results if r[1] or r[2]]
        if not with_names:
            names = ", ".join(a.name for a in choices)
            raise Unscannable(path, f"no module name maps to a known architecture ({names})")
        best = max(with_names, key=lambda r: len(r[1]) + len(r[2]))
        raise BadInput(path, f"shapes fit no known architecture: {best[2][0]}")
    hint = architectures.metadata_hint(st.metadata)
    best_count = max(len(r[1]) for r in good)
    top = [r for r in good if len(r[1]) == best_count]
    pick = next((r for r in top if r[0].name == hint), top[0])
    return pick[0], pick[1], [r[0].name for r in top]


def _fits(down_shape: tuple[int, ...], up_shape: tuple[int, ...], s: ModuleShape) -> bool:
    if len(down_shape) not in (2, 4) or len(up_shape) not in (2, 4):
        return False
    rank = down_shape[0]
    if up_shape[0] != s.out_features or up_shape[1] != rank:
        return False
    if len(up_shape) == 4 and tuple(up_shape[2:]) != (1, 1):
        return False
    if len(down_shape) == 4:
        return tuple(down_shape[1:]) == (s.in_features, *s.kernel)
    return down_shape[1] == s.flat_in


# --------------------------------------------------------------------------------------------
# scale rules: kohya alpha/r, diffusers alphas or adapter metadata, peft adapter_config.json


def _scale_rule(st: SafetensorsFile, path: Path, layout: str, notes: list[str]):
    """A function (canonical name, rank, alpha key value or None) -> scale."""
    configs = _peft_configs(st, path, layout, notes)

    def scale(canonical: str, rank: int, alpha: float | None) -> float:
        if alpha is not None:  # an explicit alpha tensor always wins, as in kohya and diffusers
            return alpha / rank
        component, _, relative = canonical.partition(".")
        cfg = configs.get(component) or configs.get("*")
        if cfg is None:
            return 1.0
        lora_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, relative, cfg.get("lora_alpha", rank), path)
        return float(lora_alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    if not configs and not any(k.endswith(".alpha") for k in st.tensors):
        notes.append("no alpha keys or adapter config: scale taken as 1.0 (alpha = rank, the trainers' default)")
    return scale


def _peft_configs(st: SafetensorsFile, path: Path, layout: str, notes: list[str]) -> dict[str, dict]:
    """peft LoraConfig dicts per component ('*' = applies to all) from adapter_config.json or metadata."""
    configs: dict[str, dict] = {}
    if formats.LAYOUTS[layout].config_file:
        cfg_path = path.with_name("adapter_config.json")
        if cfg_path.exists():
            try:
                cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError):
                raise BadInput(cfg_path, "adapter_config.json is not valid JSON") from None
            if not isinstance(cfg, dict):
                raise BadInput(cfg_path, "adapter_config.json is not a JSON object")
            configs["*"] = _checked_config(cfg, cfg_path)
            notes.append(f"scale from {cfg_path.name}")
    raw = st.metadata.get("lora_adapter_metadata")
    if raw and not configs:
        try:
            meta = json.loads(raw)
        except json.JSONDecodeError:
            raise BadInput(path, "metadata 'lora_adapter_metadata' is not valid JSON") from None
        if not isinstance(meta, dict):
            raise BadInput(path, "metadata 'lora_adapter_metadata' is not a JSON object")
        for key, value in meta.items():
            component, dot, field_name = key.partition(".")
            if dot and component in ("unet", "text_encoder", "text_encoder_2"):
                configs.setdefault(component, {})[field_name] = value
            else:
                configs.setdefault("*", {})[key] = value
        configs = {c: _checked_config(v, path) for c, v in configs.items()}
        notes.append("scale from the file's lora_adapter_metadata")
    return configs


def _checked_config(cfg: dict, where: Path) -> dict:
    alpha = cfg.get("lora_alpha")
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise BadInput(where, f"lora_alpha must be a number, got {alpha!r}")
    for name in ("alpha_pattern", "rank_pattern"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise BadInput(where, f"{name} must be a JSON object")
    return cfg


def _pattern_value(patterns: dict, relative: str, default, where: Path):
    """peft's per-module override: a pattern key matches a module name or any dotted suffix of it."""
    for pattern, value in patterns.items():
        try:
            if re.fullmatch(rf"(.*\.)?{pattern}", relative):
                return value
        except re.error:
            raise BadInput(where, f"invalid pattern {pattern!r} in alpha_pattern") from None
    return default
