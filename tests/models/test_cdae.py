"""The coarse-noise denoising autoencoder (cdae) and the plain-autoencoder setting of the DAE."""
import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.errors import InputValidationError, UsageError
from bids_uad.models import get_model
from bids_uad.models.bundle import load_bundle, score_volume
from bids_uad.models.cdae import coarse_noise
from bids_uad.models.settings import ModelSettings, preset
from bids_uad.models.validate import validate_model_file
from bids_uad.training.fit import train_model
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _smooth_batch(s: ModelSettings, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, s.n_channels, *s.grid, generator=g)
    x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    return {"clean": x, "mask": torch.ones(b, *s.grid)}


def _autocorrelation_length(noise: torch.Tensor) -> float:
    """Lag (voxels, along x) at which the mean autocorrelation first drops below 1/e."""
    v = noise - noise.mean()
    var = float((v * v).mean())
    for lag in range(1, v.shape[2]):
        if float((v[:, :, lag:] * v[:, :, :-lag]).mean()) / var < np.exp(-1):
            return float(lag)
    return float(v.shape[2])


def test_coarse_noise_shape_std_and_correlation_length():
    g = torch.Generator().manual_seed(0)
    fine = coarse_noise(4, 3, (32, 24, 16), std=0.2, scale=1, generator=g)
    coarse = coarse_noise(4, 3, (32, 24, 16), std=0.2, scale=8, generator=g)
    assert fine.shape == coarse.shape == (4, 3, 32, 24, 16)
    assert 0.1 < float(coarse.std()) < 0.25 and 0.15 < float(fine.std()) < 0.25
    assert _autocorrelation_length(fine) == 1  # white noise: uncorrelated at lag 1
    assert _autocorrelation_length(coarse) >= 4  # lesion-sized blobs: correlated over half a cell
    # channels are independent draws
    c = torch.corrcoef(coarse[:, :2].transpose(0, 1).reshape(2, -1))[0, 1]
    assert abs(float(c)) < 0.2


@pytest.mark.parametrize("variant", [{}, {"norm": "group", "output_activation": "linear", "grid": (16, 8, 16)},
                                     {"score_reduction": "sum-abs"}])
def test_forward_shapes_and_scores(variant):
    s = replace(preset("quick", "cdae").model, **variant)
    model = get_model("cdae", s)
    batch = _smooth_batch(s)
    noise = model.training_noise(2, "cpu")
    assert noise.shape == batch["clean"].shape
    loss, parts = model.loss(dict(batch, noise=noise))
    assert loss.ndim == 0 and torch.isfinite(loss) and set(parts) == {"mse"}
    x = batch["clean"]
    recon = model(x)
    assert recon.shape == x.shape
    r = recon - x
    want = r.sum(1).abs() if s.score_reduction == "abs-sum" else r.abs().sum(1)
    torch.testing.assert_close(model.eval().score(x), want)


def test_noise_only_inside_the_mask():
    s = preset("quick", "cdae").model
    model = get_model("cdae", s)
    seen = {}
    model.forward = lambda inp: seen.setdefault("input", inp) * 1.0  # identity network, records its input
    x = torch.zeros(1, s.n_channels, *s.grid)
    mask = torch.zeros(1, *s.grid)
    mask[:, 4:12, 4:12, 4:12] = 1
    model.loss({"clean": x, "mask": mask, "noise": torch.ones_like(x)})
    inp = seen["input"]
    assert torch.all(inp[:, :, 4:12, 4:12, 4:12] == 1) and float(inp.sum()) == 8 ** 3 * s.n_channels


def test_training_reduces_denoising_loss():
    torch.manual_seed(0)
    s = replace(preset("quick", "cdae").model, n_channels=8)
    model = get_model("cdae", s)
    batch = _smooth_batch(s)
    fixed = dict(batch, noise=model.training_noise(2, "cpu"))
    with torch.no_grad():
        before = float(model.loss(fixed)[0])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(30):
        opt.zero_grad()
        model.loss(dict(batch, noise=model.training_noise(2, "cpu")))[0].backward()
        opt.step()
    with torch.no_grad():
        after = float(model.loss(fixed)[0])
    assert after < 0.5 * before


def test_bad_noise_settings_refused():
    with pytest.raises(UsageError):
        ModelSettings(name="cdae", noise_scale=0)
    with pytest.raises(UsageError):
        ModelSettings(name="cdae", score_reduction="max")


def test_plain_autoencoder_setting():
    s = replace(preset("quick", "dae").model, variational=False)
    model = get_model("dae", s)
    assert model.training_noise(2, "cpu") is None and model.fc_logvar is None
    batch = _smooth_batch(s)
    loss, parts = model.loss(batch)
    assert set(parts) == {"mse"} and torch.isfinite(loss)
    model.train()
    torch.testing.assert_close(model(batch["clean"])[0], model(batch["clean"])[0])  # no sampling


@pytest.fixture(scope="module")
def controls():
    bvecs = fibonacci_directions(12)
    subs = [make_toy_subject((16, 16, 16), bvecs, i) for i in range(3)]
    return [np.moveaxis(s.data, -1, 0).copy() for s in subs], [s.mask for s in subs], bvecs


def test_cdae_bundle_round_trip_and_validation(tmp_path, controls):
    data, masks, bvecs = controls
    s = preset("quick", "cdae")
    s = replace(s, model=replace(s.model, n_channels=12, score_reduction="sum-abs"),
                training=replace(s.training, epochs=2))
    bundle = train_model(s, data, masks, ["a", "b", "c"], np.full(12, 1000.0), bvecs)
    out = bundle.save(tmp_path)
    assert out.name == "model-cdae.json"
    checked = validate_model_file(out)
    assert checked.settings.model.name == "cdae" and checked.settings.model.score_reduction == "sum-abs"
    loaded = load_bundle(out)
    assert loaded.settings == bundle.settings
    for f0, f1 in zip(bundle.folds, loaded.folds):
        assert np.array_equal(score_volume(f0.model, data[0]), score_volume(f1.model, data[0]))
        assert len(f0.history) == 2 and np.isfinite(f0.best_val_loss)
    # sizes in the JSON are bounded before anything is built
    meta = json.loads(out.read_text())
    meta["settings"]["model"]["noise_scale"] = 100_000
    out.write_text(json.dumps(meta))
    with pytest.raises(InputValidationError, match="noise_scale"):
        validate_model_file(out)


def test_noise_along_the_signals_principal_directions():
    """noise_modes: the basis is the training brains' leading principal directions across channels
    (times their spreads), saved with the model; the added noise lies along them."""
    s = replace(preset("quick", "cdae").model, n_channels=6, noise_modes=2, noise_std=0.0)
    model = get_model("cdae", s)
    rng = np.random.default_rng(0)
    mask = np.zeros(s.grid, bool)
    mask[2:14, 2:14, 2:14] = True
    # channels vary together along two known directions (spreads 0.3 and 0.1) plus a little noise
    a, b = np.array([1, 1, 1, 1, 1, 1]) / np.sqrt(6), np.array([1, -1, 1, -1, 1, -1]) / np.sqrt(6)
    f1, f2 = rng.standard_normal((2, *s.grid))
    data = [(0.3 * f1[None] * a[:, None, None, None] + 0.1 * f2[None] * b[:, None, None, None]
             + 0.01 * rng.standard_normal((6, *s.grid))).astype(np.float32)]
    model.fit_noise_basis(data, [mask])
    basis = model.noise_basis.numpy()
    assert np.allclose(np.abs(basis @ a), [0.3, 0], atol=0.01) and np.allclose(np.abs(basis @ b), [0, 0.1], atol=0.01)
    noise = model.training_noise(2, "cpu")  # noise_std 0: only the modes
    rest = noise - torch.einsum("ncxyz,kc,kd->ndxyz", noise, torch.as_tensor(np.stack([a, b]), dtype=noise.dtype),
                                torch.as_tensor(np.stack([a, b]), dtype=noise.dtype))
    assert float(noise.std()) > 0.05 and float(rest.std()) < 0.01 * float(noise.std())
    assert "noise_basis" in model.state_dict()
    assert get_model("cdae", replace(s, noise_modes=9)).noise_basis.shape == (6, 6)  # at most one per channel
    assert "noise_basis" not in get_model("cdae", replace(s, noise_modes=0)).state_dict()
    with pytest.raises(UsageError, match="noise_modes"):
        replace(s, noise_modes=-1)


def test_a_settings_dict_without_noise_modes_is_an_older_models():
    """Model files written before noise_modes existed were trained without it: they load as 0."""
    from bids_uad.models.settings import Settings

    data = preset("quick", "cdae").to_dict()
    assert data["model"]["noise_modes"] == 6
    del data["model"]["noise_modes"]
    assert Settings.from_dict(data).model.noise_modes == 0


def test_a_settings_dict_without_score_median_is_an_older_models():
    """Model files written before the score's median filter existed were calibrated on unfiltered
    maps: they load with a width of 1 (none), so their thresholds keep meaning what they meant; a
    width the filter cannot have is refused."""
    from bids_uad.models.settings import Settings

    data = preset("quick", "cdae").to_dict()
    assert data["model"]["score_median"] == 3
    del data["model"]["score_median"]
    assert Settings.from_dict(data).model.score_median == 1
    for bad in (0, 2, 9):
        with pytest.raises(UsageError, match="score_median"):
            replace(preset("quick", "cdae").model, score_median=bad)
