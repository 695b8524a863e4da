"""Canonical adapters: per target module the down factor A (k×in), up factor B (out×k) and scale.

ΔW = scale · B · A, with conv kernels flattened (A is k × in·kh·kw). Every layout and every
algorithm (LoRA/LoCon, LyCORIS LoHa/LoKr/full, see :mod:`auditkit.lora.algorithms`) is read into
this one exact form, and every module's shape is validated against a known architecture: an
adapter that maps nothing fails closed (exit 3), one whose shapes fit no architecture is refused
(exit 2). DoRA modules keep their magnitude vector: their exact update needs the base weights
(:meth:`Adapter.with_base`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from auditkit.errors import BadInput, Unscannable
from auditkit.fsutil import parse_json, read_json
from auditkit.lora import algorithms, formats
from auditkit.lora.io import SafetensorsFile, open_safetensors
from auditkit.models import architectures
from auditkit.models.architectures import Architecture, ModuleShape

# Share of an adapter's modules that must be read (and, to render it, loaded) for a scan to test it: the default
# of StaticThresholds.min_coverage (--min-coverage) and of the dynamic loader's fail-closed check.
MIN_COVERAGE = 0.95
# Share of a file's weight keys that must map to an architecture for the file to be named that architecture
# with certainty (the coverage default: below it the static verdict is inconclusive too).
# A Qwen-Image LoRA read against Flux.1 alone maps 44% of its keys (blocks 0-18 have Flux.1's names and shapes).
NAMING_COVERAGE = MIN_COVERAGE


@dataclass(frozen=True, eq=False)
class LoraModule:
    """One module's update ΔW = scale · up @ down (exact for every algorithm read).

    A LoKr module is held as its Kronecker halves (``kron`` = up₁, down₁, up₂, down₂ with
    ΔW = scale · kron(up₁@down₁, up₂@down₂)): ``up`` and ``down`` are then kron(up₁, up₂) and
    kron(down₁, down₂), formed only when asked for (their rank is the product of the halves').

    A DoRA module also carries its magnitude vector: its exact update is
    m · (W₀ + ΔW) / ‖W₀ + ΔW‖ − W₀, which needs the base weight W₀ (:meth:`Adapter.with_base`);
    until then ``up @ down`` is only its low-rank direction.
    """

    name: str
    factor_down: np.ndarray | None  # A: k × in (conv kernels flattened); None when held as ``kron``
    factor_up: np.ndarray | None  # B: out × k
    scale: float
    algorithm: str = "lora"  # auditkit.lora.algorithms.ALGORITHMS key
    form: str = "factors"  # how ΔW is held: factors, khatri-rao, kronecker, dense
    magnitude: np.ndarray | None = None  # DoRA magnitude (per output row or input channel)
    magnitude_axis: str | None = None  # "out" or "in"
    bias: np.ndarray | None = None  # the bias update Δb (scale included), if the file changes biases
    kron: tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray] | None = None  # LoKr halves' factors

    @property
    def down(self) -> np.ndarray:
        return self.factor_down if self.kron is None else np.kron(self.kron[1], self.kron[3])

    @property
    def up(self) -> np.ndarray:
        return self.factor_up if self.kron is None else np.kron(self.kron[0], self.kron[2])

    @property
    def rank(self) -> int:
        if self.kron is not None:
            return int(self.kron[1].shape[0] * self.kron[3].shape[0])
        return int(self.factor_down.shape[0])

    @property
    def needs_base(self) -> bool:
        """True for a DoRA module whose exact update has not been computed with the base weights."""
        return self.magnitude is not None

    def delta(self) -> np.ndarray:
        """The dense low-rank update (for tests and small modules; the scan never calls this)."""
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
    # the architecture the file's metadata (or peft config) names, if any: it breaks ties, never the structure
    architecture_claim: str | None = None
    architecture_forced: bool = False  # given by the caller (--arch, a --base), not identified from the file
    # a full model's exact update (auditkit.models.difference.FullModelUpdate); None for an adapter file
    update: object | None = None

    @property
    def architecture_certainty(self) -> str:
        """How surely the file names its architecture: ``certain`` (its keys map to it, at least
        :data:`NAMING_COVERAGE` of them, and no other architecture fits as well, or its metadata names the one
        it adapts among those that do), ``ambiguous`` (several fit alike: Flux.1 and Kontext, Wan 2.1 14B and
        Wan 2.2 A14B; see :attr:`architecture_candidates`), ``partial`` (too few of its keys map to the best fit:
        it may adapt a model auditkit does not know), or ``given`` (by the caller: --arch, a --base)."""
        if self.architecture_forced or self.update is not None:
            return "given"
        if self.coverage.fraction < NAMING_COVERAGE:
            return "partial"
        if len(self.architecture_candidates) > 1 and self.architecture_claim not in self.architecture_candidates:
            return "ambiguous"
        return "certain"

    @property
    def kind(self) -> str:
        """``adapter`` (a LoRA file) or ``full model`` (an erased checkpoint or a full fine-tune)."""
        return "adapter" if self.update is None else "full model"

    def exact(self):
        """What applies this update to a model exactly: an adapter file's modules, or a full model's
        per-tensor differences (:class:`auditkit.models.difference.TensorDeltas`) as the dynamic scan renders
        them (a full fine-tune over the safe model, so it runs as itself), never its truncation."""
        return self.modules if self.update is None else self.update.rendered_deltas()

    def exact_modules(self, suffixes: tuple[str, ...]) -> dict[str, LoraModule]:
        """The modules whose names end with one of ``suffixes``, each with its exact update: a full model's
        dense difference split by its SVD (every direction), an adapter's own modules as they are."""
        names = [n for n in self.modules if n.endswith(suffixes)]
        if self.update is None:
            return {n: self.modules[n] for n in names}
        out = {}
        for name in names:
            down, up = algorithms.split_dense(self.update.dense(name))
            out[name] = replace(self.modules[name], factor_down=down, factor_up=up, scale=1.0, form="exact")
        return out

    def summary(self) -> dict:
        ranks = sorted({m.rank for m in self.modules.values()})
        scales = sorted({round(m.scale, 6) for m in self.modules.values()})
        components: dict[str, int] = {}
        for name in self.modules:
            comp = name.split(".", 1)[0]
            components[comp] = components.get(comp, 0) + 1
        algorithms_used: dict[str, int] = {}
        forms: dict[str, int] = {}
        for m in self.modules.values():
            algorithms_used[m.algorithm] = algorithms_used.get(m.algorithm, 0) + 1
            forms[m.form] = forms.get(m.form, 0) + 1
        return {
            "path": str(self.path),
            "kind": self.kind,
            "full_model": self.update.summary() if self.update is not None else None,
            "sha256": self.sha256,
            "size_bytes": self.size,
            "format": self.layout,
            "architecture": self.architecture.name,
            "architecture_label": self.architecture.label,
            "architecture_candidates": self.architecture_candidates,
            "architecture_certainty": self.architecture_certainty,
            "modules": len(self.modules),
            "components": components,
            "algorithms": algorithms_used,
            "forms": forms,
            "dora_modules": sum(m.magnitude is not None for m in self.modules.values()),
            "bias_modules": sum(m.bias is not None for m in self.modules.values()),
            "ranks": ranks,
            "scales": scales,
            "coverage": self.coverage.to_dict(),
            "notes": self.notes,
        }


    def with_base(self, weights) -> Adapter:
        """This adapter with every DoRA module's exact update, computed from the base weights.

        ``weights.get(canonical name)`` gives the base weight W₀ flattened to out × in·kh·kw (or
        None: that module stays direction-only and the adapter keeps its note). The exact update
        m · (W₀ + ΔW) / ‖W₀ + ΔW‖ − W₀ is a dense matrix, held as its SVD (form ``dense``).
        Multipliers other than 1 then scale this update linearly, as a merge at that weight does.
        """
        if not any(m.needs_base for m in self.modules.values()):
            return self
        modules = dict(self.modules)
        missing = []
        for name, m in self.modules.items():
            if not m.needs_base:
                continue
            w0 = weights.get(name)
            if w0 is None:
                missing.append(name)
                continue
            w0 = np.asarray(w0, dtype=np.float64).reshape(m.up.shape[0], -1)
            exact = algorithms.dora_update(w0, m.delta(), m.magnitude, m.magnitude_axis)
            down, up = algorithms.split_dense(exact)
            modules[name] = LoraModule(name, down, up, 1.0, m.algorithm, "dense", bias=m.bias)
        notes = [n for n in self.notes if "DoRA" not in n]
        done = sum(m.needs_base for m in self.modules.values()) - len(missing)
        notes.append(f"{done} DoRA module(s): exact update computed with the base weights")
        if missing:
            notes.append(f"{len(missing)} DoRA module(s) have no base weight ({missing[0]}, …): direction only")
        return replace(self, modules=modules, notes=notes)


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
        raise Unscannable(path, f"{algorithm} adapters are not supported yet; LoRA, LoCon, LoHa, LoKr, "
                                "full-diff and DoRA can be scanned")
    unreadable = formats.unreadable_layout(keys)
    if unreadable:
        raise BadInput(path, f"a file in {unreadable}")
    layout = formats.detect_layout(keys)
    if layout is None:
        raise Unscannable(path, "no LoRA keys recognised (expected kohya, LyCORIS, diffusers or peft layout)"
                          + _what_it_is(st))

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
    shapes, incomplete = _module_shapes(st, path, parts)
    if not shapes and not incomplete:
        raise Unscannable(path, "no LoRA keys recognised" + _what_it_is(st))
    if not shapes:
        module, reason = next(iter(incomplete.items()))
        raise Unscannable(path, f"no complete adapter module: '{module}' {reason}")
    hint = _declared_architecture(st, path, layout)
    try:
        chosen, resolved, fitting = _choose_architecture(path, layout, shapes, choices, hint)
    except Unscannable as exc:  # names of no architecture: say what the file is when it can be told
        raise Unscannable(path, exc.problem + _what_it_is(st)) from None

    coverage = Coverage(ignored=ignored, unmapped=list(unparsed))
    notes: list[str] = []
    scale_of = _scale_rule(st, path, layout, notes)
    modules: dict[str, LoraModule] = {}
    for module, keyset in parts.items():
        canonical = resolved.get(module)
        if canonical is None:  # an unknown name, or an incomplete module
            coverage.unmapped.extend(keyset.values())
            continue
        read = _read_module(st, path, canonical, keyset, shapes[module][0], scale_of, chosen.shape(canonical))
        for piece in _unfused(path, read, chosen.fused.get(canonical)):
            if piece.name in modules:
                raise BadInput(path, f"two modules of the file update {piece.name} (one of them '{module}')")
            modules[piece.name] = piece
        coverage.mapped.extend(keyset.values())

    if not modules:
        raise Unscannable(path, "no complete adapter module maps to the architecture")
    dora = sum(m.magnitude is not None for m in modules.values())
    if dora:
        notes.append(f"{dora} DoRA module(s): their exact update needs the base weights; without them the "
                     "static scan compares the low-rank direction only")
    coverage.unmapped.sort()
    if len(fitting) > 1 and hint not in fitting:
        notes.append(f"its module names and shapes fit several architectures ({', '.join(fitting)}); "
                     f"{chosen.name} is assumed: pass --arch (or a --base) to say which model it adapts")
    if arch is None and coverage.fraction < NAMING_COVERAGE:
        notes.append(f"only {coverage.fraction:.0%} of its keys map to {chosen.name}, the best fit: it may adapt a "
                     "model auditkit does not know, so its architecture is uncertain")
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
        architecture_claim=hint,
        architecture_forced=arch is not None,
    )


def _what_it_is(st: SafetensorsFile) -> str:
    """': <what the file is>' for a file that holds no adapter, when it can be told."""
    from auditkit.lora.identify import identify_keys

    found = identify_keys(list(st.tensors), st.metadata, {k: t.shape for k, t in st.tensors.items()})
    return f": {found}" if found else ""


def _module_shapes(
    st: SafetensorsFile, path: Path, parts: dict[str, dict[str, str]]
) -> tuple[dict[str, tuple[algorithms.Algorithm, tuple[int, int]]], dict[str, str]]:
    """Per layout module its algorithm and (out, in·kh·kw) from the header, and the incomplete
    modules with what they lack (their keys count as unmapped)."""
    shapes: dict[str, tuple[algorithms.Algorithm, tuple[int, int]]] = {}
    incomplete: dict[str, str] = {}
    for module, keyset in parts.items():
        header = {part: tuple(st.tensors[key].shape) for part, key in keyset.items()}
        try:
            algo = algorithms.algorithm_of(keyset)
            shapes[module] = (algo, algo.shape(header))
        except algorithms.Incomplete as exc:
            incomplete[module] = str(exc)
        except ValueError as exc:
            raise BadInput(path, f"module '{module}': {exc}") from None
    return shapes, incomplete


def _read_module(st: SafetensorsFile, path: Path, canonical: str, keyset: dict[str, str],
                 algo: algorithms.Algorithm, scale_of, shape: ModuleShape) -> LoraModule:
    arrays = {part: st.float_array(key) for part, key in keyset.items() if part not in algorithms.SHARED_PARTS}
    built = algo.build(arrays)
    alpha = None
    if "alpha" in keyset:
        alpha_arr = st.float_array(keyset["alpha"])
        if alpha_arr.size != 1:
            raise BadInput(path, f"alpha '{keyset['alpha']}' should be a scalar, has shape {alpha_arr.shape}")
        alpha = float(alpha_arr.reshape(()))
    scale = scale_of(canonical, built.scale_rank, alpha)
    if built.kron is not None:  # LoKr: the halves stay apart (their SVDs give ΔW's, see analysis.factors)
        down, up, form = None, None, built.form
    else:
        down, up, form = algorithms.compact(built.down, built.up, built.form)
    magnitude, axis = _magnitude(st, path, keyset, shape)
    bias = None
    if "bias" in keyset:
        bias = st.float_array(keyset["bias"]).astype(np.float64).reshape(-1)
        if bias.size != shape.out_features:
            raise BadInput(path, f"bias '{keyset['bias']}' has {bias.size} entries, the module has "
                                 f"{shape.out_features} outputs")
        bias = bias * (scale if algo.name == "lora" else 1.0)  # lora_B.bias is scaled like lora_B; diff_b is not
    return LoraModule(canonical, down, up, scale, algo.name, form, magnitude, axis, bias, built.kron)


def _unfused(path: Path, module: LoraModule, pieces) -> list[LoraModule]:
    """The canonical modules of a fused one (Flux ``img_attn.qkv``: q, k, v): each keeps the shared
    down factor and takes its rows of the up factor (and of a bias), so ΔW is exact per module. A LoKr
    module's rows do not split along its Kronecker halves: its pieces are held as plain factors."""
    if not pieces:
        return [module]
    if module.magnitude is not None:
        raise Unscannable(path, f"DoRA on the fused module {module.name} is not supported: its norms mix the "
                                "modules it fuses")
    rows: dict[str, list[tuple[int, int, int]]] = {}  # canonical -> (source row, target row, count)
    offset = 0
    for canonical, start, stop in pieces:
        rows.setdefault(canonical, []).append((offset, start, stop - start))
        offset += stop - start
    out = []
    down, up, form = module.down, module.up, module.form if module.kron is None else "factors"
    for canonical, spans in rows.items():
        order = np.concatenate([np.arange(src, src + n) for src, _, n in sorted(spans, key=lambda s: s[1])])
        bias = None if module.bias is None else module.bias[order]
        u, d = up[order], down
        keep = np.flatnonzero(np.any(u != 0, axis=0))
        if 0 < keep.size < u.shape[1]:  # kohya's split_qkv files: each module's own block of columns
            u, d = u[:, keep], d[keep]
        d, u, f = algorithms.compact(d, u, form)
        out.append(replace(module, name=canonical, factor_down=d, factor_up=u, form=f, kron=None, bias=bias))
    return out


def _magnitude(st: SafetensorsFile, path: Path, keyset: dict[str, str], shape: ModuleShape):
    """DoRA magnitude and its axis: (out,) or (out, 1, …) per output row; (1, in, …) per input channel."""
    if "magnitude" not in keyset:
        return None, None
    key = keyset["magnitude"]
    m = st.float_array(key).astype(np.float64)
    if m.ndim == 1 or (m.shape[0] == shape.out_features and m.size == shape.out_features):
        axis = "out"
    elif m.shape[0] == 1 and m.size == shape.in_features:
        axis = "in"
    else:
        axis = None
    if axis is None or m.size != (shape.out_features if axis == "out" else shape.in_features):
        raise BadInput(path, f"DoRA magnitude '{key}' has shape {list(m.shape)}, the module is "
                             f"{shape.out_features}x{shape.in_features}")
    return m.reshape(-1), axis


def _declared_architecture(st: SafetensorsFile, path: Path, layout: str) -> str | None:
    """The architecture the file says it adapts: its metadata's claim (kohya, modelspec), else the base model
    its peft ``adapter_config.json`` names (``base_model_name_or_path``): what settles a tie between
    architectures whose shapes the file fits alike (SDXL's first text encoder is SD1.x's)."""
    claim = architectures.metadata_hint(st.metadata)
    if claim is None and formats.LAYOUTS[layout].config_file:
        base = (_peft_config_file(path) or {}).get("base_model_name_or_path")
        claim = architectures.named_hint(base) if isinstance(base, str) else None
    return claim


def _choose_architecture(
    path: Path, layout: str, shapes: dict, choices: list[Architecture], hint: str | None
) -> tuple[Architecture, dict[str, str], list[str]]:
    """Pick the architecture whose names and shapes fit (ties broken by the file's ``hint``); fail closed
    when none does."""
    results = []  # (arch, resolved, misfits)
    for arch in choices:
        resolved: dict[str, str] = {}
        misfits: list[str] = []
        for module, options in formats.LAYOUTS[layout].resolve(list(shapes), arch).items():
            algo, (out_dim, in_dim) = shapes[module]
            fit = next((o for o in options if (out_dim, in_dim) == (arch.shape(o).out_features,
                                                                    arch.shape(o).flat_in)), None)
            if fit is None:
                s = arch.shape(options[0])
                misfits.append(
                    f"'{module}' ({algo.label}) updates a {out_dim}x{in_dim} weight, but {arch.name} "
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
    best_count = max(len(r[1]) for r in good)
    top = [r for r in good if len(r[1]) == best_count]
    pick = next((r for r in top if r[0].name == hint), top[0])
    return pick[0], pick[1], [r[0].name for r in top]


# --------------------------------------------------------------------------------------------
# scale rules: kohya alpha/r, diffusers alphas or adapter metadata, peft adapter_config.json


def _scale_rule(st: SafetensorsFile, path: Path, layout: str, notes: list[str]):
    """A function (canonical name, rank, alpha key value or None) -> scale."""
    configs = _peft_configs(st, path, layout, notes)

    def scale(canonical: str, rank: int | None, alpha: float | None) -> float:
        """``rank`` None: the algorithm ignores alpha (LyCORIS LoKr with both halves whole)."""
        component, _, relative = canonical.partition(".")
        cfg = configs.get(component) or configs.get("*")
        if cfg is not None and cfg.get("peft_type") in ("LOHA", "LOKR"):
            # peft's LoHa/LoKr scale by alpha / the configured r, whatever the halves' shapes
            rank = int(_pattern_value(cfg.get("rank_pattern") or {}, relative, cfg.get("r", rank or 1), path))
        if rank is None:
            return 1.0
        if alpha is not None:  # an explicit alpha tensor always wins, as in kohya and diffusers
            return alpha / rank if alpha != 0 else 1.0  # kohya and LyCORIS read alpha 0 as alpha = rank
        if cfg is None:
            return 1.0
        default = cfg.get("lora_alpha", cfg.get("alpha", rank))  # peft LoRA: lora_alpha; LoHa/LoKr: alpha
        lora_alpha = _pattern_value(cfg.get("alpha_pattern") or {}, relative, default, path)
        return float(lora_alpha) / (math.sqrt(rank) if cfg.get("use_rslora") else rank)

    if not configs and not any(k.endswith(".alpha") for k in st.tensors):
        notes.append("no alpha keys or adapter config: scale taken as 1.0 (alpha = rank, the trainers' default)")
    return scale


PEFT_CONFIG_LIMIT = 1 << 20  # peft's adapter_config.json is a few KiB


def _peft_configs(st: SafetensorsFile, path: Path, layout: str, notes: list[str]) -> dict[str, dict]:
    """peft LoraConfig dicts per component ('*' = applies to all) from adapter_config.json or metadata."""
    configs: dict[str, dict] = {}
    cfg = _peft_config_file(path) if formats.LAYOUTS[layout].config_file else None
    if cfg is not None:
        configs["*"] = _checked_config(cfg, path.with_name("adapter_config.json"))
        notes.append("scale from adapter_config.json")
    raw = st.metadata.get("lora_adapter_metadata")
    if raw and not configs:
        meta = parse_json(raw, path, "metadata 'lora_adapter_metadata'", limit=PEFT_CONFIG_LIMIT, unique="key")
        if not isinstance(meta, dict):
            raise BadInput(path, "metadata 'lora_adapter_metadata' is not a JSON object")
        for key, value in meta.items():
            component, dot, field_name = key.partition(".")
            if dot and (component in ("unet", "transformer") or component.startswith("text_encoder")):
                configs.setdefault(component, {})[field_name] = value
            else:
                configs.setdefault("*", {})[key] = value
        configs = {c: _checked_config(v, path) for c, v in configs.items()}
        notes.append("scale from the file's lora_adapter_metadata")
    return configs


def _peft_config_file(path: Path) -> dict | None:
    """The ``adapter_config.json`` beside a peft file (None when there is none), bounded and a JSON object."""
    cfg_path = path.with_name("adapter_config.json")
    if not (cfg_path.exists() or cfg_path.is_symlink()):
        return None
    cfg = read_json(cfg_path, "adapter_config.json", limit=PEFT_CONFIG_LIMIT, unique="key")
    if not isinstance(cfg, dict):
        raise BadInput(cfg_path, "adapter_config.json is not a JSON object")
    return cfg


def _checked_config(cfg: dict, where: Path) -> dict:
    alpha = cfg.get("lora_alpha", cfg.get("alpha"))
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise BadInput(where, f"lora_alpha must be a number, got {alpha!r}")
    for name in ("alpha_pattern", "rank_pattern"):
        if cfg.get(name) is not None and not isinstance(cfg[name], dict):
            raise BadInput(where, f"{name} must be a JSON object")
    ranks = [("r", cfg.get("r"))] + [(f"rank_pattern {k!r}", v) for k, v in (cfg.get("rank_pattern") or {}).items()]
    for label, r in ranks:
        if r is not None and (isinstance(r, bool) or not isinstance(r, int) or r <= 0):
            raise BadInput(where, f"{label} must be a positive integer, got {r!r}")
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
