"""Controls acquired with different shells: a clear note (or a clear refusal), never a silent mix."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from bids_uad.errors import InputValidationError
from bids_uad.workflows.group import controls_sharing_shells, shell_signature


def _control(label, b):
    return SimpleNamespace(subject=label, dwi=Path(f"/d/sub-{label}/dwi/x.nii.gz")), \
        {"bvals": np.array([0.0] + [float(b)] * 6)}


def test_shell_signature_rounds_scanner_values():
    assert shell_signature(np.array([1.25, 928.3, 928.3])) == (900,)
    assert shell_signature(np.array([0, 1000, 1000, 2000])) == (1000, 2000)


def test_mixed_shells_keep_the_largest_group_with_a_note(caplog):
    pairs = [_control(f"c{i}", b) for i, b in enumerate([1000, 1000, 1000, 2000, 1500])]
    found, items = zip(*pairs)
    caplog.set_level("WARNING")
    kept, kept_items = controls_sharing_shells(list(found), list(items))
    assert [f.subject for f in kept] == ["c0", "c1", "c2"]
    assert "mix diffusion shells" in caplog.text and "sub-c3" in caplog.text and "b=2000" in caplog.text


def test_no_shared_shell_set_is_a_clear_error():
    pairs = [_control(f"c{i}", b) for i, b in enumerate([900, 1000, 1500, 2000, 1000])]
    found, items = zip(*pairs)
    with pytest.raises(InputValidationError, match="mix diffusion shells"):
        controls_sharing_shells(list(found), list(items))
