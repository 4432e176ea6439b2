"""DAE: 3D convolutional variational autoencoder with a dense latent.

Loss = MSE + kl_weight * KL; score = |sum_c (x_hat_c - x_c)| (sum over channels first; or
sum_c |x_hat_c - x_c| with ``score_reduction="sum-abs"``).  With ``variational=False`` it is a
plain convolutional autoencoder (Luo et al.): z = the dense code, no sampling, no KL term.

With ``context_boxes`` > 0 it is a context-encoding VAE (ceVAE; Zimmerer et al. 2019, the model
of StRegA): each training volume also has ``context_boxes`` random boxes zeroed out, and the
network's deterministic reconstruction (z = mu) of that masked volume must match the clean
input (a second MSE term, weight 1, no KL): it has to fill in tissue from its context, which
makes its reconstructions lean on anatomy rather than copy the input.  Registered as ``cevae``.

Reductions (see docs/models.md): the MSE is a *mean* over channels and brain voxels
(``mse_region="brain"``, the default) or over the whole padded grid (``"grid"``); the KL is
*summed* over the latent dimensions and averaged over the batch.  With a mean MSE the paper's
weight 1.22e-5 keeps the KL a small regulariser whatever the volume size, and averaging over
brain voxels only makes the balance independent of how much zero padding the grid adds.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bids_uad.models.blocks import (Decoder, Encoder, FanInLinear, feature_list, masked_mse, output_activation,
                                   residual_score)
from bids_uad.models.settings import ModelSettings


def context_boxes(n: int, grid: tuple[int, int, int], boxes: int, fraction: float, device=None) -> torch.Tensor:
    """(n, 1, *grid) float mask with ``boxes`` random axis-aligned boxes (1 inside) per sample.

    Each side is drawn uniformly between half of ``fraction`` x the grid side and that, at a
    uniform position, from torch's (seeded) global generator."""
    out = torch.zeros((n, 1, *grid), device=device)
    hi = [max(1, int(round(fraction * g))) for g in grid]
    lo = [max(1, h // 2) for h in hi]
    for i in range(n):
        for _ in range(boxes):
            sides = [int(torch.randint(a, b + 1, (1,))) for a, b in zip(lo, hi)]
            start = [int(torch.randint(0, g - s + 1, (1,))) for g, s in zip(grid, sides)]
            out[i, 0, start[0]:start[0] + sides[0], start[1]:start[1] + sides[1], start[2]:start[2] + sides[2]] = 1
    return out


class VAE3d(nn.Module):
    """Conv encoder -> dense (mu, logvar) -> dense -> conv decoder."""

    #: how this model learns, for the methods text (nipreps' ``__desc__``)
    __desc__ = ("a 3D convolutional variational autoencoder (DAE) that learns to reconstruct the healthy "
                "diffusion-weighted signal; its anomaly score is the reconstruction residual summed over "
                "the diffusion-weighted channels")
    needs_ood = False
    #: a reconstruction error: the group level refers it to the controls' in template space
    #: (bids_uad.models.normaliser)
    score_reference = True
    needs_noise = True  # training draws latent noise: the trainer may supply it as batch["noise"]

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        feats = feature_list(settings.features, settings.max_features, settings.depth)
        self.bottleneck = tuple(g // 2**settings.depth for g in settings.grid)
        n_flat = feats[-1] * math.prod(self.bottleneck)
        dense = FanInLinear if settings.latent_scaling == "fan-in" else nn.Linear
        self.encoder = Encoder(settings.n_channels, feats, settings.norm)
        self.fc_mu = dense(n_flat, settings.latent_size)
        self.variational = settings.variational
        self.needs_noise = settings.variational
        self.fc_logvar = dense(n_flat, settings.latent_size) if settings.variational else None
        self.fc_dec = nn.Linear(settings.latent_size, n_flat)
        self.decoder = Decoder(feats, settings.norm)
        self.head = nn.Conv3d(feats[0], settings.n_channels, 1)
        self.act = output_activation(settings.output_activation)
        self._feats = feats

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mu, logvar).  logvar is clamped to +-logvar_bound in value but with a straight-through
        gradient: a plain clamp (or a saturating tanh) has zero gradient outside the range, which
        traps a latent whose logvar once overshoots (KL ~ exp(bound) for ever)."""
        h = self.encoder(x).flatten(1)
        if self.fc_logvar is None:  # plain autoencoder: a deterministic code (logvar 0 is never used)
            mu = self.fc_mu(h)
            return mu, torch.zeros_like(mu)
        raw = self.fc_logvar(h)
        bound = self.settings.logvar_bound
        return self.fc_mu(h), raw + (raw.clamp(-bound, bound) - raw).detach()

    def training_noise(self, n: int, device) -> torch.Tensor | dict | None:
        """Standard normal latent draw (n, latent) from torch's seeded generator (None: not variational);
        with the context-encoding term, ``{"noise": that draw, "context_mask": (n, 1, X, Y, Z) boxes}``."""
        eps = torch.randn(n, self.settings.latent_size, device=device) if self.variational else None
        if not self.settings.context_boxes:
            return eps
        return {"noise": eps, "context_mask": context_boxes(n, tuple(self.settings.grid), self.settings.context_boxes,
                                                            self.settings.context_box_fraction, device)}

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        h = F.leaky_relu(self.fc_dec(z), 0.01).view(-1, self._feats[-1], *self.bottleneck)
        return self.act(self.head(self.decoder(h)))

    def forward(self, x: torch.Tensor, noise: torch.Tensor | None = None):
        """Return (reconstruction, mu, logvar); samples z only in training mode (with ``noise``
        (B, latent) as the standard normal draw when given, e.g. a slice of a larger batch's)."""
        mu, logvar = self.encode(x)
        if not (self.training and self.variational):
            return self.decode(mu), mu, logvar
        eps = torch.randn_like(mu) if noise is None else noise
        z = mu + eps * torch.exp(0.5 * logvar)
        return self.decode(z), mu, logvar

    def loss(self, batch: dict[str, torch.Tensor]):
        """Mean MSE to the clean input (brain voxels if ``batch["mask"]`` and mse_region="brain")
        + kl_weight * KL (summed over the latent, mean over the batch)."""
        x = batch["clean"]
        recon, mu, logvar = self(x, batch.get("noise"))
        mask = batch.get("mask") if self.settings.mse_region == "brain" else None
        mse = masked_mse(recon, x, mask, batch.get("mask_count"))
        loss, parts = mse, {"mse": mse.detach()}
        if self.variational:
            kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
            loss, parts["kl"] = loss + self.settings.kl_weight * kl, kl.detach()
        if self.settings.context_boxes:  # ceVAE: reconstruct the clean input from the boxed-out one
            boxes = batch.get("context_mask")
            if boxes is None:
                boxes = context_boxes(x.shape[0], tuple(self.settings.grid), self.settings.context_boxes,
                                      self.settings.context_box_fraction, x.device)
            filled = self.decode(self.encode(x * (1 - boxes))[0])
            ce = masked_mse(filled, x, mask, batch.get("mask_count"))
            loss, parts["context"] = loss + ce, ce.detach()
        return loss, parts

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score (B, X, Y, Z): the residual reduced over channels (``score_reduction``)."""
        return residual_score(self(x)[0], x, self.settings.score_reduction, self.settings.feature_channels)


class ContextVAE(VAE3d):
    """ceVAE (StRegA's model): the DAE with its context-encoding term on (``context_boxes`` >= 1)."""

    __desc__ = ("a 3D convolutional context-encoding variational autoencoder (ceVAE, as in StRegA) that learns to "
                "reconstruct the healthy diffusion-weighted signal and to fill in boxes masked out of it from "
                "their context; its anomaly score is the reconstruction residual summed over the "
                "diffusion-weighted channels")
