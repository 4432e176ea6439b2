"""The lesion generators of ``bids_uad-synth`` and the lesions of one patient's sessions.

``glioma`` is the necrotic glioma of :mod:`bids_uad.synthetic.lesions` (either shape; ``mixed``
is its old name, ``ellipsoid``/``irregular`` fix the shape); ``infiltration``, ``oedema``,
``restricted`` and ``mass-effect`` are the graded types of :mod:`bids_uad.synthetic.graded`;
``mixed-hard`` gives each patient one to three lesions of different graded types.
"""
from __future__ import annotations

import numpy as np

from .anatomy import Template
from .graded import GRADED_TYPES, GradedLesion, grow_graded_lesion, make_graded_lesion
from .lesions import GLIOMA_SHAPES, Lesion, grow_lesion, make_lesion

LESION_GENERATORS = ("glioma",) + GRADED_TYPES + ("mixed-hard",) + GLIOMA_SHAPES
DEFAULT_GENERATOR = "glioma"
#: lesions per patient with ``mixed-hard`` (1, 2 or 3) and their probabilities
MIXED_HARD_COUNTS = ((1, 2, 3), (0.4, 0.35, 0.25))
#: ``mixed-hard`` lesions keep at least this distance (mm) from each other's region
MIXED_HARD_GAP_MM = 8.0


def is_glioma(generator: str) -> bool:
    return generator == "glioma" or generator in GLIOMA_SHAPES


def lesion_type(lesion) -> str:
    """The truth's ``type`` of a lesion: ``glioma`` or the graded type."""
    return "glioma" if isinstance(lesion, Lesion) else lesion.kind


def lesion_severity(lesion) -> float | None:
    """The severity of a graded lesion (``None`` for a glioma, which has no severity setting)."""
    return lesion.severity if isinstance(lesion, GradedLesion) else None


def lesion_info(lesion, index: int) -> dict:
    return {"index": index, "type": lesion_type(lesion), "severity": lesion_severity(lesion), **lesion.info()}


def patient_lesions(tpl2: Template, rng: np.random.Generator, generator: str, sessions, severity: float | None,
                    min_core_mm3: float, min_radius_mm: float) -> dict[str, list]:
    """Lesions of every session of a patient: drawn for ``pre``, grown for ``followup``.

    The lesions keep their order (and so their truth index) across sessions.  ``severity``
    fixes the severity of graded lesions (``None``: drawn uniformly in [0, 1] per lesion).
    """
    if is_glioma(generator):
        shape = "mixed" if generator == "glioma" else generator
        pre = [make_lesion(tpl2, rng, shape, min_core_mm3=min_core_mm3, min_radius_mm=min_radius_mm)]
    elif generator == "mixed-hard":
        counts, probs = MIXED_HARD_COUNTS
        count = int(rng.choice(counts, p=probs))
        kinds = [str(k) for k in rng.permutation(GRADED_TYPES)[:count]]
        pre = []
        for kind in kinds:
            avoid = None
            if pre:
                avoid = np.logical_or.reduce([les.sdist < MIXED_HARD_GAP_MM for les in pre])
            pre.append(make_graded_lesion(tpl2, rng, kind, severity, avoid=avoid))
    elif generator in GRADED_TYPES:
        pre = [make_graded_lesion(tpl2, rng, generator, severity)]
    else:
        raise ValueError(f"lesion generator must be one of {LESION_GENERATORS}")
    out = {"pre": pre}
    if "followup" in sessions:
        out["followup"] = [grow_lesion(tpl2, les, rng, min_core_mm3=min_core_mm3) if isinstance(les, Lesion)
                           else grow_graded_lesion(tpl2, les, rng) for les in pre]
    return out
