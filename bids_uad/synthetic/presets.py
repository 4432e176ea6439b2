"""Preset definitions for the synthetic dataset generator (sizes, grids, acquisition)."""
from __future__ import annotations

from dataclasses import dataclass, replace

from bids_uad.errors import UsageError


@dataclass(frozen=True)
class Preset:
    """Everything that differs between ``tiny``, ``small`` and ``paper``.

    Grids are axis-aligned: RAS for T1w/FLAIR, LAS for the dwi (as dcm2niix stores scanner data,
    so FSL b-vectors are voxel-frame vectors); voxel axis j = posterior->anterior = phase encoding.
    """

    name: str
    n_controls: int
    n_patients: int
    t1w_voxel_mm: float
    t1w_shape: tuple[int, int, int]
    dwi_voxel_mm: float
    dwi_shape: tuple[int, int, int]
    #: shells as (b-value, number of volumes); b=0 entries are b0 volumes.
    shells: tuple[tuple[int, int], ...] = ((0, 1), (1000, 64))
    total_readout_time: float = 0.0534
    echo_time: float = 0.089
    b0_snr: float = 25.0
    followup_dwi: bool = True
    n_controls_two_sessions: int = 1
    no_reverse_pe_fraction: float = 5 / 60
    #: template resolution used as the source for anatomical images (1 or 2 mm).
    t1w_source_mm: int = 1


PRESETS: dict[str, Preset] = {
    # tiny: T1w/FLAIR at 2 mm (not 1 mm) and dwi at 4 mm with 1 b0 + 32 directions to stay fast.
    "tiny": Preset(
        name="tiny", n_controls=3, n_patients=2,
        t1w_voxel_mm=2.0, t1w_shape=(96, 112, 88),
        dwi_voxel_mm=4.0, dwi_shape=(54, 54, 34),
        shells=((0, 1), (1000, 32)), total_readout_time=0.0265,
        followup_dwi=True, n_controls_two_sessions=1, no_reverse_pe_fraction=0.2,
        t1w_source_mm=2,
    ),
    # small: the demo's dataset (make demo): more subjects than tiny on tiny's grids, so that the
    # whole demo (participant, group training, inference, longitudinal) fits in 20 min on 2 cores.
    "small": Preset(
        name="small", n_controls=5, n_patients=3,
        t1w_voxel_mm=2.0, t1w_shape=(96, 112, 88),
        dwi_voxel_mm=4.0, dwi_shape=(54, 54, 34),
        shells=((0, 1), (1000, 32)), total_readout_time=0.0265,
        followup_dwi=True, n_controls_two_sessions=1, no_reverse_pe_fraction=1 / 8,
        t1w_source_mm=2,
    ),
    "paper": Preset(
        name="paper", n_controls=28, n_patients=32,
        t1w_voxel_mm=1.0, t1w_shape=(192, 224, 176),
        dwi_voxel_mm=2.4, dwi_shape=(90, 90, 54),
        shells=((0, 1), (1000, 64)), total_readout_time=0.0534,
        followup_dwi=False, n_controls_two_sessions=0, no_reverse_pe_fraction=5 / 60,
    ),
}


def get_preset(name: str, **overrides) -> Preset:
    """Return the named preset, with non-None keyword overrides applied."""
    if name not in PRESETS:
        raise UsageError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    changes = {k: v for k, v in overrides.items() if v is not None}
    return replace(PRESETS[name], **changes)
