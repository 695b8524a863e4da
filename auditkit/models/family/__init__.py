"""One module per model family: everything auditkit knows about a family that the others do not.

A family module declares ``FAMILY``, one :class:`~auditkit.models.family.record.Family` record: its built-in
architecture tables (``configs/<table>.json``, built into ``tables/`` by :mod:`auditkit.models.build`), and,
for a family whose pipelines auditkit loads, the diffusers pipeline class, its denoiser and text-encoder
components, load options, kohya prefixes, native and written layouts, and the functions that differ from
the other families: its prompt encoding, its :class:`~auditkit.models.denoising.Denoising` record (how
the denoiser is called, trained and sampled: the diffusion process and its training target), its render
options. A family module only picks and parametrises the shared machinery
(:mod:`auditkit.models.conditioning`, :mod:`auditkit.models.denoising`); the registry is
:data:`auditkit.models.families.FAMILIES`, which lists the modules.

Family modules import no torch or diffusers at import time (their functions import them when called), so
the registry, the architecture tables and the static scan load without them.

Adding a family: a module here with its ``FAMILY``, its entry in ``auditkit.models.families.MODULES``, its
config table (``configs/<table>.json``, then ``python -m auditkit.models.build``) and, when a tiny
pipeline of it can be built, its entry in ``tests/models/test_family_contract.py``.
"""
