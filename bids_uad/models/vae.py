"""DAE: 3D convolutional variational autoencoder with a dense latent.

Loss = MSE + kl_weight * KL; score = |sum_c (x_hat_c - x_c)| (sum over channels first).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from bids_uad.models.blocks import Decoder, Encoder, feature_list, output_activation
from bids_uad.training.settings import ModelSettings


class VAE3d(nn.Module):
    """Conv encoder -> dense (mu, logvar) -> dense -> conv decoder."""

    needs_ood = False

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        feats = feature_list(settings.features, settings.max_features, settings.depth)
        self.bottleneck = tuple(g // 2**settings.depth for g in settings.grid)
        n_flat = feats[-1] * math.prod(self.bottleneck)
        self.encoder = Encoder(settings.n_channels, feats, settings.norm)
        self.fc_mu = nn.Linear(n_flat, settings.latent_size)
        self.fc_logvar = nn.Linear(n_flat, settings.latent_size)
        self.fc_dec = nn.Linear(settings.latent_size, n_flat)
        self.decoder = Decoder(feats, settings.norm)
        self.head = nn.Conv3d(feats[0], settings.n_channels, 1)
        self.act = output_activation(settings.output_activation)
        self._feats = feats

    def forward(self, x: torch.Tensor):
        """Return (reconstruction, mu, logvar); samples z only in training mode."""
        h = self.encoder(x).flatten(1)
        mu, logvar = self.fc_mu(h), self.fc_logvar(h).clamp(-20, 20)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        h = F.leaky_relu(self.fc_dec(z), 0.01).view(-1, self._feats[-1], *self.bottleneck)
        return self.act(self.head(self.decoder(h))), mu, logvar

    def loss(self, batch: dict[str, torch.Tensor]):
        """MSE to the clean input + weighted KL (summed over latent, mean over batch)."""
        x = batch["clean"]
        recon, mu, logvar = self(x)
        mse = F.mse_loss(recon, x)
        kl = (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(1)).mean()
        return mse + self.settings.kl_weight * kl, {"mse": mse.detach(), "kl": kl.detach()}

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score (B, X, Y, Z) = |sum over channels of the residual|."""
        recon = self(x)[0]
        return (recon - x).sum(1).abs()
