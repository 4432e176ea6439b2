"""The context-encoding VAE (cevae, StRegA's model): the DAE with boxes masked out in training."""
from dataclasses import replace

import numpy as np
import pytest
import torch

from bids_uad.errors import UsageError
from bids_uad.models import get_model
from bids_uad.models.bundle import load_bundle
from bids_uad.models.settings import ModelSettings, preset
from bids_uad.models.vae import context_boxes
from bids_uad.training.fit import train_model
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from bids_uad.training.trainer import attach_noise, latent_noise, shard_batch


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(1)


def test_context_boxes_sizes_and_count():
    torch.manual_seed(0)
    m = context_boxes(3, (16, 8, 20), boxes=1, fraction=0.5)
    assert m.shape == (3, 1, 16, 8, 20) and set(m.unique().tolist()) <= {0.0, 1.0}
    for i in range(3):
        idx = torch.nonzero(m[i, 0])
        sides = (idx.max(0).values - idx.min(0).values + 1).tolist()
        assert all(lo <= s <= hi for s, lo, hi in zip(sides, (4, 2, 5), (8, 4, 10)))
        assert int(m[i].sum()) == int(np.prod(sides))  # one solid box
    torch.manual_seed(0)
    assert torch.equal(context_boxes(3, (16, 8, 20), 1, 0.5), m)  # from torch's seeded generator


def test_cevae_loss_has_the_context_term_and_the_noise_is_sharded():
    s = preset("quick", "cevae")
    assert s.model.name == "cevae" and s.model.context_boxes == 2
    assert preset("quick", "dae").model.context_boxes == 0
    model = get_model("cevae", s.model)
    torch.manual_seed(1)
    noise = latent_noise(model, s, 3, "cpu")
    assert set(noise) == {"noise", "context_mask"} and noise["context_mask"].shape == (3, 1, *s.model.grid)
    x = torch.rand(3, s.model.n_channels, *s.model.grid)
    batch = {"clean": x, "mask": torch.ones(3, *s.model.grid)}
    attach_noise(batch, noise)
    loss, parts = model.loss(batch)
    assert set(parts) == {"mse", "kl", "context"} and torch.isfinite(loss) and float(parts["context"]) > 0
    arrays = {"clean": x.numpy(), "mask": np.ones((3, *s.model.grid), np.float32)}
    shard, _ = shard_batch(arrays, noise, world=2, rank=1, device="cpu")
    assert torch.equal(shard["context_mask"], noise["context_mask"][2:])  # rank 1's share of the batch
    assert torch.equal(shard["noise"], noise["noise"][2:])
    # the context term is the reconstruction (z = mu) of the boxed-out input compared with the clean one
    model.eval()
    boxed = x * (1 - noise["context_mask"])
    with torch.no_grad():
        filled = model.decode(model.encode(boxed)[0])
        want = float(((filled - x) ** 2).mean())
        got = float(model.loss(dict(batch))[1]["context"])
    assert abs(got - want) < 1e-5


def test_cevae_settings_refused_without_boxes():
    with pytest.raises(UsageError, match="context_boxes"):
        ModelSettings(name="cevae")
    with pytest.raises(UsageError):
        ModelSettings(name="dae", context_boxes=-1)


def test_cevae_trains_saves_and_scores(tmp_path):
    bvecs = fibonacci_directions(8)
    subs = [make_toy_subject((16, 16, 16), bvecs, i) for i in range(3)]
    data, masks = [np.moveaxis(x.data, -1, 0).copy() for x in subs], [x.mask for x in subs]
    s = preset("quick", "cevae")
    s = replace(s, model=replace(s.model, n_channels=8), training=replace(s.training, epochs=2))
    bundle = train_model(s, data, masks, ["a", "b", "c"], np.full(8, 1000.0), bvecs)
    assert all("context" not in h for f in bundle.folds for h in f.history)  # history: losses only
    loaded = load_bundle(bundle.save(tmp_path))
    assert loaded.settings.model.context_boxes == 2 and type(loaded.folds[0].model).__name__ == "ContextVAE"
    from bids_uad.models.bundle import score_volume
    np.testing.assert_allclose(score_volume(loaded.folds[0].model, data[0]),
                               score_volume(bundle.folds[0].model, data[0]), rtol=1e-5, atol=1e-6)
