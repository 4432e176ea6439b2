"""Forward shapes, losses and the registry of the anomaly-detection networks."""
from dataclasses import replace

import pytest
import torch

from bids_uad.errors import UsageError
from bids_uad.models import MODELS, get_model
from bids_uad.models.settings import ModelSettings, Settings, preset


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def _batch(s: ModelSettings, b=2):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, s.n_channels, *s.grid, generator=g)
    # smooth structured signal so that a network can learn something in a few steps
    x = torch.nn.functional.avg_pool3d(x, 5, stride=1, padding=2, count_include_pad=False)
    anomaly = (torch.rand(b, *s.grid, generator=g) > 0.9).float()
    return {"clean": x, "input": x, "anomaly": anomaly}


@pytest.mark.parametrize("name", ["dae", "recdisc"])
@pytest.mark.parametrize("variant", [{}, {"norm": "group", "output_activation": "linear", "grid": (16, 8, 16)}])
def test_forward_shapes(name, variant):
    s = replace(preset("quick", name).model, **variant)
    model = get_model(name, s)
    batch = _batch(s)
    loss, parts = model.loss(batch)
    assert loss.ndim == 0 and torch.isfinite(loss)
    assert set(parts) == ({"mse", "kl"} if name == "dae" else {"mse", "bce"})
    score = model.score(batch["clean"])
    assert score.shape == (2, *s.grid)
    if name == "recdisc":
        assert float(score.min()) >= 0 and float(score.max()) <= 1
    recon = model(batch["clean"])[0]
    assert recon.shape == batch["clean"].shape
    if s.output_activation == "sigmoid":
        recon = recon.detach()
        assert float(recon.min()) >= 0 and float(recon.max()) <= 1


def test_dae_score_is_abs_of_channel_sum():
    s = preset("quick", "dae").model
    model = get_model("dae", s).eval()
    x = _batch(s)["clean"]
    recon = model(x)[0]
    torch.testing.assert_close(model.score(x), (recon - x).sum(1).abs())


def test_both_inputs_score_each_channel_group_as_its_mean_residual():
    """inputs "both": the dw channels and the features are reduced apart, as means, and added, so
    the 5 features weigh as much as the 32 dw channels; the other inputs keep the plain reduction."""
    from bids_uad.models.blocks import residual_score

    x = torch.zeros(1, 37, 2, 2, 2)
    recon = x.clone()
    recon[:, :32, 0] = 0.5  # every dw channel 0.5 off at x = 0
    recon[:, 32, 1] = 1.0  # one feature 1.0 off at x = 1
    score = residual_score(recon, x, "abs-sum", feature_channels=5)
    torch.testing.assert_close(score[0, 0], torch.full((2, 2), 0.5))
    torch.testing.assert_close(score[0, 1], torch.full((2, 2), 0.2))
    torch.testing.assert_close(residual_score(recon, x, "abs-sum"), (recon - x).sum(1).abs())
    s = ModelSettings(name="cdae", n_channels=37, inputs="both", feature_channels=5, grid=(16, 16, 16), features=4,
                      max_features=8, depth=2)
    model = get_model("cdae", s).eval()
    xb = torch.rand(1, 37, 16, 16, 16)
    torch.testing.assert_close(model.score(xb), residual_score(model(xb), xb, "abs-sum", 5))
    for bad in ({"inputs": "both"}, {"inputs": "both", "feature_channels": 37}, {"feature_channels": 5}):
        with pytest.raises(UsageError, match="feature_channels"):
            ModelSettings(name="cdae", n_channels=37, **bad)


@pytest.mark.parametrize("name", ["dae", "recdisc"])
def test_loss_decreases(name):
    torch.manual_seed(0)
    s = replace(preset("quick", name).model, n_channels=8)
    model = get_model(name, s)
    batch = _batch(s)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss, _ = model.loss(batch)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0]


def test_registry_and_settings_errors():
    assert {"dae", "recdisc"} <= set(MODELS)
    with pytest.raises(UsageError):
        get_model("nope", ModelSettings())
    with pytest.raises(UsageError):
        ModelSettings(grid=(90, 90, 54), depth=4)  # not divisible by 16
    with pytest.raises(UsageError):
        ModelSettings(output_activation="tanh")


def test_settings_round_trip():
    for name in ("quick", "paper"):
        s = preset(name, "recdisc")
        assert Settings.from_dict(s.to_dict()) == s
    with pytest.raises(UsageError):
        Settings.from_dict({"model": {"bogus": 1}})


def test_masked_mse_and_fan_in_linear():
    from bids_uad.models.blocks import FanInLinear, masked_mse

    g = torch.Generator().manual_seed(1)
    pred, target = torch.rand(2, 3, 4, 5, 6, generator=g), torch.rand(2, 3, 4, 5, 6, generator=g)
    full = torch.ones(2, 4, 5, 6)
    torch.testing.assert_close(masked_mse(pred, target, full), torch.nn.functional.mse_loss(pred, target))
    assert masked_mse(pred, target, None) == torch.nn.functional.mse_loss(pred, target)
    half = torch.zeros(2, 4, 5, 6)
    half[:, :2] = 1
    torch.testing.assert_close(masked_mse(pred, target, half),
                               torch.nn.functional.mse_loss(pred[:, :, :2], target[:, :, :2]))
    layer = FanInLinear(10_000, 4)
    out = layer(torch.ones(1, 10_000))
    assert float(out.abs().max()) < 6  # sum of 10,000 N(0, 1) weights / sqrt(10,000) ~ N(0, 1)
    assert abs(float(layer.weight.std()) - 1) < 0.05


@pytest.mark.parametrize("region", ["brain", "grid"])
def test_dae_mse_region(region):
    s = replace(preset("quick", "dae").model, n_channels=4, mse_region=region)
    model = get_model("dae", s).eval()
    batch = _batch(s)
    batch["mask"] = torch.zeros(2, *s.grid)
    batch["mask"][:, 4:12, 4:12, 4:12] = 1
    _, parts = model.loss(batch)
    recon = model(batch["clean"])[0]
    inside = batch["mask"].bool().unsqueeze(1).expand_as(recon)
    want = ((recon - batch["clean"]) ** 2)[inside].mean() if region == "brain" else \
        torch.nn.functional.mse_loss(recon, batch["clean"])
    torch.testing.assert_close(parts["mse"], want.detach())
