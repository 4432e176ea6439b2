"""Phase-encoding direction of a dwi run: from its sidecar, the user, or its ``dir-`` entity.

Susceptibility correction needs the polarity of the phase encoding (``j`` or ``j-``).  dcm2niix
cannot always tell it: Canon, Toshiba, Philips and UIH sidecars often give only
``PhaseEncodingAxis``.  A careful neuroimager then looks at how the runs are named.  This
module does the same, in this order, and always says which source it used:

1. ``--pe-polarity SPEC=DIR`` (the user's statement; wins over the sidecar, with a warning
   when they disagree);
2. the sidecar's ``PhaseEncodingDirection``;
3. ``PhaseEncodingAxis`` plus an anatomical ``dir-`` entity (``AP``, ``PA``, ``LR``, ``RL``,
   ``SI``, ``IS``): ``dir-AP`` means "phase encoded from anterior to posterior", so the
   direction points to posterior; with the image affine this gives the polarity of the voxel
   axis (for the usual LAS/RAS dcm2niix output ``dir-AP`` is ``j-``, as Siemens sidecars say).
   The ``dir-`` entity must name the same anatomical axis as ``PhaseEncodingAxis``;
4. otherwise the polarity is unknown (``None``): no susceptibility correction, with a warning.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from bids_uad.errors import UsageError

LOGGER = logging.getLogger("bids_uad.bids")

VALID_DIRECTIONS = ("i", "i-", "j", "j-", "k", "k-")
#: each anatomical letter and its opposite
OPPOSITE_LETTER = {"A": "P", "P": "A", "L": "R", "R": "L", "S": "I", "I": "S"}
#: recorded in the dwi metadata handed to the workflow (and so in the derivative sidecars)
SOURCE_KEY = "PhaseEncodingDirectionSource"


@dataclass(frozen=True)
class PhaseEncoding:
    """A resolved phase-encoding direction (``None`` when unknown) and where it came from."""

    direction: str | None
    source: str


def parse_pe_polarity(specs: Sequence[str]) -> tuple[tuple[str, str], ...]:
    """``["dir-AP=j-", "sub-01_dwi.nii.gz=j"]`` -> ((spec, direction), ...); bad text: UsageError (64)."""
    out = []
    for text in specs or ():
        spec, sep, direction = str(text).rpartition("=")
        if not sep or not spec or direction not in VALID_DIRECTIONS:
            raise UsageError(
                f"--pe-polarity {text!r}: expected FILE_OR_ENTITY=DIRECTION with DIRECTION one of "
                f"{', '.join(VALID_DIRECTIONS)} (e.g. dir-AP=j- or sub-01_dwi.nii.gz=j)")
        out.append((spec, direction))
    return tuple(out)


def spec_matches(spec: str, path: str | Path) -> bool:
    """A ``--pe-polarity`` spec names this file: its name (with or without extension) or one of its entities."""
    name = Path(path).name
    stem = name.removesuffix(".gz").removesuffix(".nii")
    if spec in (name, stem):
        return True
    return "-" in spec and spec in stem.split("_")


def direction_from_dir_entity(label: str, axis: str, affine: np.ndarray) -> str | None:
    """BIDS direction (``j-``) of a run named ``dir-<label>`` along voxel ``axis``; None if not anatomical.

    ``label`` is two opposite anatomical letters, from where to where the phase is encoded;
    the voxel axis' positive direction is read from ``affine``.  None when the label is not such
    a pair or names another anatomical axis than ``axis``.
    """
    import nibabel as nib

    label = str(label).upper()
    if len(label) != 2 or OPPOSITE_LETTER.get(label[0]) != label[1] or axis not in ("i", "j", "k"):
        return None
    positive = nib.orientations.aff2axcodes(np.asarray(affine))["ijk".index(axis)]
    if positive not in (label[0], label[1]):
        return None
    return axis if positive == label[1] else axis + "-"


def resolve_phase_encoding(path: str | Path, metadata: Mapping[str, Any], entities: Mapping[str, Any],
                           affine: np.ndarray | None,
                           overrides: Sequence[tuple[str, str]] = ()) -> PhaseEncoding:
    """The phase-encoding direction of one run and its source (see the module docstring)."""
    name = Path(path).name
    sidecar = metadata.get("PhaseEncodingDirection")
    sidecar = sidecar if sidecar in VALID_DIRECTIONS else None
    for spec, direction in overrides:
        if spec_matches(spec, path):
            if sidecar and sidecar != direction:
                LOGGER.warning("%s: --pe-polarity %s=%s overrides the sidecar's PhaseEncodingDirection %s",
                               name, spec, direction, sidecar)
            return PhaseEncoding(direction, f"--pe-polarity {spec}={direction}")
    if sidecar:
        return PhaseEncoding(sidecar, "sidecar PhaseEncodingDirection")
    axis = metadata.get("PhaseEncodingAxis")
    label = entities.get("direction") or entities.get("dir")
    if axis in ("i", "j", "k") and label and affine is not None:
        direction = direction_from_dir_entity(str(label), axis, affine)
        if direction is not None:
            return PhaseEncoding(direction, f"dir-{label} entity with PhaseEncodingAxis {axis} "
                                            "(the sidecar gives no polarity)")
        return PhaseEncoding(None, f"PhaseEncodingAxis {axis} without polarity; dir-{label} does not "
                                   f"name the anatomical direction of axis {axis}")
    if axis:
        return PhaseEncoding(None, f"PhaseEncodingAxis {axis} without polarity and no anatomical dir- entity")
    return PhaseEncoding(None, "no PhaseEncodingDirection in the sidecar")


def with_phase_encoding(metadata: Mapping[str, Any], pe: PhaseEncoding) -> dict[str, Any]:
    """The run's metadata with the resolved direction and its source filled in."""
    out = dict(metadata)
    if pe.direction is not None:
        out["PhaseEncodingDirection"] = pe.direction
    out[SOURCE_KEY] = pe.source
    return out


#: Readout time assumed when a sidecar gives neither ``TotalReadoutTime`` nor
#: ``EffectiveEchoSpacing`` (typical of clinical 2-3 mm single-shot EPI dMRI, 40-60 ms).  With
#: a reverse-PE pair the correction does not depend on it: both images share the assumed value
#: and the fit estimates the displacement in voxels; only the field's scale in Hz does (the
#: field is then in units of this assumed time), which the field's sidecar flags.
NOMINAL_TOTAL_READOUT_TIME = 0.05


def readout_time_source(metadata: Mapping[str, Any]) -> str | None:
    """Which sidecar field gives the readout time, or None when neither does."""
    if metadata.get("TotalReadoutTime") not in (None, ""):
        return "sidecar TotalReadoutTime"
    if metadata.get("EffectiveEchoSpacing") not in (None, ""):
        return "sidecar EffectiveEchoSpacing * (ReconMatrixPE - 1)"
    return None
