"""bfloat16 mixed-precision training steps (``TrainingSettings.precision``): used only where the device
does bfloat16 natively, the weights and losses stay float32, and a fold trains to about the same
validation losses as in float32."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.errors import UsageError
from bids_uad.models.settings import TrainingSettings, preset
from bids_uad.training import precision
from bids_uad.training.trainer import train_fold


def test_bfloat16_only_where_it_is_native(monkeypatch):
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert precision.training_dtype("auto", "cpu") == torch.float32
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    assert precision.training_dtype("auto", "cpu") == torch.bfloat16
    assert precision.training_dtype("float32", "cpu") == torch.float32
    with pytest.raises(UsageError, match="precision"):
        TrainingSettings(precision="float16")
    assert preset("standard", "cdae").training.precision == "auto"
    assert preset("quick", "cdae").training.precision == "float32"
    assert preset("standard", "dae").training.precision == "float32"


def test_native_flag_reads_the_cpu_flags(monkeypatch, tmp_path):
    import builtins

    fake = tmp_path / "cpuinfo"
    real_open = builtins.open
    precision.cpu_has_native_bf16.cache_clear()
    try:
        for flags, expected in (("fpu avx2 avx512f", False), ("fpu avx512f avx512_bf16", True),
                                ("fpu amx_bf16 amx_tile", True)):
            fake.write_text(f"processor\t: 0\nflags\t\t: {flags}\n")
            monkeypatch.setattr(builtins, "open",
                                lambda f, *a, **k: real_open(fake if f == "/proc/cpuinfo" else f, *a, **k))
            precision.cpu_has_native_bf16.cache_clear()
            assert precision.cpu_has_native_bf16() is expected
    finally:
        monkeypatch.undo()
        precision.cpu_has_native_bf16.cache_clear()


def test_a_bfloat16_fold_trains_like_a_float32_one(monkeypatch):
    """The same fold in both: float32 weights, validation losses within a few per cent, and under
    "auto" the training steps' convolutions in autocast, the validation's not."""
    s = preset("quick", "cdae")
    s = replace(s, model=replace(s.model, n_channels=6), training=replace(s.training, epochs=3))
    rng = np.random.default_rng(0)
    data = [(rng.random((6, 16, 16, 16)) * 0.3 + 0.3).astype(np.float32) for _ in range(4)]
    masks = [np.ones((16, 16, 16), bool)] * 4
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    seen = []
    real = torch.nn.Conv3d.forward
    monkeypatch.setattr(torch.nn.Conv3d, "forward",
                        lambda self, x: seen.append(torch.is_autocast_enabled("cpu")) or real(self, x))
    runs = {}
    for name in ("float32", "auto"):
        seen.clear()
        res = train_fold(replace(s, training=replace(s.training, precision=name)), data[:3], masks[:3], data[3:],
                         masks[3:])
        runs[name] = [h["val_loss"] for h in res.history]
        assert all(p.dtype == torch.float32 for p in res.model.parameters())
        # "auto": the training steps under autocast, the validation passes not; float32: none
        assert set(seen) == ({True, False} if name == "auto" else {False})
    np.testing.assert_allclose(runs["auto"], runs["float32"], rtol=0.05)
