"""RecDiscNet: reconstruction network + discriminative U-Net on (input, reconstruction).

Loss = MSE(reconstruction, clean input) + bce_weight * BCE(logit, synthetic-anomaly mask)
with positive-class weight ``pos_weight``; score = sigmoid(logit).  The MSE is a mean over
channels and brain voxels (``mse_region="brain"``) or the whole grid; the BCE a mean over the grid.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from bids_uad.models.blocks import Decoder, Encoder, feature_list, masked_mse, output_activation
from bids_uad.models.settings import ModelSettings


class RecDiscNet(nn.Module):
    """Encoder-decoder without skips, then a U-Net giving one logit channel."""

    #: how this model learns, for the methods text (nipreps' ``__desc__``)
    __desc__ = ("a reconstruction-discrimination network (RecDiscNet): an encoder-decoder that learns to "
                "reconstruct the healthy diffusion-weighted signal and a U-Net that learns to segment "
                "synthetic anomalies (ellipsoidal out-of-distribution patches) added to the training "
                "inputs as in the reference study; its anomaly score is the U-Net's output")
    needs_ood = True
    #: not referred to the controls' (bids_uad.models.normaliser): a discriminator's probability, near 0
    #: on most healthy voxels, has no robust spread to refer it to (measured: docs/models.md)
    score_reference = False

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        c = settings.n_channels
        feats = feature_list(settings.features, settings.max_features, settings.depth)
        self.rec_encoder = Encoder(c, feats, settings.norm)
        self.rec_decoder = Decoder(feats, settings.norm)
        self.rec_head = nn.Conv3d(feats[0], c, 1)
        self.act = output_activation(settings.output_activation)
        self.disc_encoder = Encoder(2 * c, feats, settings.norm)
        self.disc_decoder = Decoder(feats, settings.norm, skip=True)
        self.disc_head = nn.Conv3d(feats[0], 1, 1)

    def forward(self, x: torch.Tensor):
        """Return (reconstruction, logit) with logit shaped (B, 1, X, Y, Z)."""
        recon = self.act(self.rec_head(self.rec_decoder(self.rec_encoder(x))))
        skips = self.disc_encoder(torch.cat([x, recon], dim=1), skips=True)
        logit = self.disc_head(self.disc_decoder(skips[-1], skips))
        return recon, logit

    def loss(self, batch: dict[str, torch.Tensor]):
        """Reconstruction MSE to the clean volume + weighted BCE on the anomaly mask."""
        recon, logit = self(batch["input"])
        mask = batch.get("mask") if self.settings.mse_region == "brain" else None
        mse = masked_mse(recon, batch["clean"], mask, batch.get("mask_count"))
        pos_weight = torch.tensor(self.settings.pos_weight, dtype=logit.dtype, device=logit.device)
        bce = F.binary_cross_entropy_with_logits(logit[:, 0], batch["anomaly"], pos_weight=pos_weight)
        return mse + self.settings.bce_weight * bce, {"mse": mse.detach(), "bce": bce.detach()}

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly probability (B, X, Y, Z)."""
        return torch.sigmoid(self(x)[1][:, 0])
