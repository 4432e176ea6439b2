"""Phase-encoding polarity from the sidecar, the user or the ``dir-`` entity."""
from __future__ import annotations

import numpy as np
import pytest

from bids_uad.bids.phase_encoding import (
    direction_from_dir_entity,
    parse_pe_polarity,
    resolve_phase_encoding,
    spec_matches,
)
from bids_uad.errors import UsageError

LAS = np.diag([-2.0, 2.0, 2.0, 1.0])
RPI = np.diag([2.0, -2.0, -2.0, 1.0])


def test_direction_from_dir_entity_follows_the_affine():
    assert direction_from_dir_entity("AP", "j", LAS) == "j-"
    assert direction_from_dir_entity("PA", "j", LAS) == "j"
    assert direction_from_dir_entity("AP", "j", RPI) == "j"  # j points posterior here
    assert direction_from_dir_entity("LR", "i", LAS) == "i-"  # i points left in LAS
    assert direction_from_dir_entity("RL", "i", LAS) == "i"
    assert direction_from_dir_entity("AP", "i", LAS) is None  # dir names another axis
    assert direction_from_dir_entity("AA", "j", LAS) is None
    assert direction_from_dir_entity("b1000", "j", LAS) is None


def test_resolution_order_and_sources():
    meta = {"PhaseEncodingAxis": "j"}
    got = resolve_phase_encoding("sub-1_dir-AP_dwi.nii.gz", meta, {"direction": "AP"}, LAS)
    assert got.direction == "j-" and "dir-AP" in got.source
    got = resolve_phase_encoding("sub-1_dwi.nii.gz", meta, {}, LAS)
    assert got.direction is None and "without polarity" in got.source
    got = resolve_phase_encoding("sub-1_dir-AP_dwi.nii.gz", meta, {"direction": "AP"}, LAS, [("dir-AP", "j")])
    assert got.direction == "j" and got.source == "--pe-polarity dir-AP=j"
    got = resolve_phase_encoding("sub-1_dwi.nii.gz", {"PhaseEncodingDirection": "j"}, {}, LAS)
    assert got.direction == "j" and got.source == "sidecar PhaseEncodingDirection"
    got = resolve_phase_encoding("sub-1_dir-LR_dwi.nii.gz", meta, {"direction": "LR"}, LAS)
    assert got.direction is None and "does not name" in got.source


def test_pe_polarity_option_parsing():
    assert parse_pe_polarity(["dir-AP=j-", "sub-01_dwi.nii.gz=j"]) == (("dir-AP", "j-"), ("sub-01_dwi.nii.gz", "j"))
    for bad in ("dir-AP", "dir-AP=x", "=j"):
        with pytest.raises(UsageError, match="--pe-polarity"):
            parse_pe_polarity([bad])
    assert spec_matches("dir-AP", "/x/sub-1_dir-AP_dwi.nii.gz")
    assert spec_matches("sub-1_dir-AP_dwi", "/x/sub-1_dir-AP_dwi.nii.gz")
    assert not spec_matches("dir-A", "/x/sub-1_dir-AP_dwi.nii.gz")
