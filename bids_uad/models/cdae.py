"""cDAE: a U-Net denoising autoencoder trained to remove coarse noise (Kascenas et al., MIDL 2022).

Training corrupts a healthy input with Gaussian noise drawn on a low-resolution grid (cells of
``noise_scale`` voxels) and upsampled trilinearly, so that one noise "blob" covers a region of
lesion size; the network learns to return the clean input (MSE over brain voxels).  Fine,
voxelwise noise is easy to remove with local filters and teaches nothing about anatomy; coarse
noise can only be removed by knowing what healthy tissue looks like there, which is what makes
the residual on a real lesion large.  Score = residual reduced over the channels
(:func:`bids_uad.models.blocks.residual_score`, setting ``score_reduction``).

With ``noise_modes`` (default 6) the noise also has coarse fields along the leading principal
directions of the training brains' signal across the channels (:meth:`CoarseDAE.fit_noise_basis`):
noise drawn per channel is white across the gradient directions, which smoothing across channels
removes without any anatomy, while the patterns the channels vary by together (mean signal,
anisotropy) then have to be restored from their context as well.

The noise is drawn by :meth:`CoarseDAE.training_noise` (the trainer supplies it as
``batch["noise"]``, so data-parallel ranks and the fixed validation draw share it) and is
added inside the brain mask only.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bids_uad.models.blocks import Decoder, Encoder, feature_list, masked_mse, output_activation, residual_score
from bids_uad.models.settings import ModelSettings


def coarse_noise(n: int, channels: int, grid: tuple[int, int, int], std: float, scale: int,
                 device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian noise (n, channels, *grid) drawn on cells of ``scale`` voxels, upsampled trilinearly.

    The low-resolution draw has one extra cell per axis and is cropped at a random offset (one
    per sample), so the cell boundaries do not sit at the same voxels in every draw.  Each value
    of the coarse draw has standard deviation ``std``; interpolation lowers the voxel variance a
    little between cell centres.
    """
    low = tuple(math.ceil(g / scale) + 1 for g in grid)
    draw = torch.randn((n, channels, *low), device=device, generator=generator) * std
    up = F.interpolate(draw, size=tuple(c * scale for c in low), mode="trilinear", align_corners=False)
    offsets = torch.randint(0, scale, (n, 3), generator=generator, device=device).tolist()
    return torch.stack([up[i, :, ox:ox + grid[0], oy:oy + grid[1], oz:oz + grid[2]]
                        for i, (ox, oy, oz) in enumerate(offsets)])


class CoarseDAE(nn.Module):
    """U-Net (encoder with skips, decoder merging them) mapping a noisy volume to the clean one."""

    #: how this model learns, for the methods text (nipreps' ``__desc__``)
    __desc__ = ("a 3D U-Net denoising autoencoder (cDAE, after Kascenas et al. 2022) that learns to remove "
                "coarse Gaussian noise (drawn at low resolution and upsampled, covering lesion-sized regions, "
                "per volume and along the healthy signal's leading principal directions across volumes) "
                "from the healthy diffusion-weighted signal; its anomaly score is the reconstruction residual "
                "reduced over the diffusion-weighted channels")
    needs_ood = False
    #: a reconstruction error: the group level refers it to the controls' in template space
    #: (bids_uad.models.normaliser)
    score_reference = True

    def __init__(self, settings: ModelSettings):
        super().__init__()
        self.settings = settings
        feats = feature_list(settings.features, settings.max_features, settings.depth)
        self.encoder = Encoder(settings.n_channels, feats, settings.norm)
        self.decoder = Decoder(feats, settings.norm, skip=True)
        self.head = nn.Conv3d(feats[0], settings.n_channels, 1)
        self.act = output_activation(settings.output_activation)
        self.noise_modes = min(settings.noise_modes, settings.n_channels)
        if self.noise_modes:
            # (k, C): the leading principal directions of the training brains' signal across the
            # channels, each scaled by its spread (fit_noise_basis); saved with the model
            self.register_buffer("noise_basis", torch.zeros(self.noise_modes, settings.n_channels))

    def fit_noise_basis(self, data, masks) -> None:
        """The ``noise_modes`` leading principal directions (times their standard deviations) of the
        channels' signal over the brain voxels of ``data`` (C, X, Y, Z arrays; ``masks`` their brains)."""
        k = self.noise_modes
        if not k:
            return
        rng = np.random.default_rng(0)
        voxels = np.concatenate([np.asarray(d, np.float32)[:, np.asarray(m, bool)] for d, m in zip(data, masks)], 1)
        if voxels.shape[1] > 200_000:  # a seeded subsample: the covariance of C channels needs few
            voxels = voxels[:, rng.choice(voxels.shape[1], 200_000, replace=False)]
        cov = np.cov(voxels.astype(np.float64))
        values, vectors = np.linalg.eigh(cov)
        order = np.argsort(values)[::-1][:k]
        basis = vectors[:, order].T * np.sqrt(np.maximum(values[order], 0))[:, None]
        self.noise_basis.copy_(torch.as_tensor(basis, dtype=torch.float32))

    def training_noise(self, n: int, device) -> torch.Tensor:
        """Coarse noise for ``n`` inputs from torch's (seeded) global generator: independent per
        channel, plus, with ``noise_modes``, coarse fields of unit spread along each principal direction."""
        s = self.settings
        noise = coarse_noise(n, s.n_channels, tuple(s.grid), s.noise_std, s.noise_scale, device=device)
        if self.noise_modes:
            fields = coarse_noise(n, self.noise_modes, tuple(s.grid), 1.0, s.noise_scale, device=device)
            noise = noise + torch.einsum("nkxyz,kc->ncxyz", fields, self.noise_basis.to(fields.device))
        return noise

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction (B, C, X, Y, Z) of ``x``."""
        skips = self.encoder(x, skips=True)
        return self.act(self.head(self.decoder(skips[-1], skips)))

    def loss(self, batch: dict[str, torch.Tensor]):
        """MSE between the reconstruction of the noised input and the clean input (brain voxels
        when ``batch["mask"]`` is given and mse_region="brain"); noise only inside the mask."""
        x = batch["clean"]
        noise = batch.get("noise")
        if noise is None:
            noise = self.training_noise(x.shape[0], x.device)
        mask = batch.get("mask")
        if mask is not None:
            noise = noise * mask.to(noise.dtype).unsqueeze(1)
        recon = self(x + noise)
        region = mask if self.settings.mse_region == "brain" else None
        mse = masked_mse(recon, x, region, batch.get("mask_count"))
        return mse, {"mse": mse.detach()}

    @torch.no_grad()
    def score(self, x: torch.Tensor) -> torch.Tensor:
        """Anomaly score (B, X, Y, Z): the residual reduced over channels (``score_reduction``)."""
        return residual_score(self(x), x, self.settings.score_reduction, self.settings.feature_channels)
