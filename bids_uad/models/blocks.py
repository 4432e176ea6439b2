"""Shared 3D building blocks: normalised convolutions with LeakyReLU(0.01)."""
from __future__ import annotations

import torch
from torch import nn

LEAK = 0.01


def norm_layer(kind: str, channels: int) -> nn.Module:
    """InstanceNorm (affine) or GroupNorm with up to 8 groups."""
    if kind == "instance":
        return nn.InstanceNorm3d(channels, affine=True)
    groups = next(g for g in (8, 4, 2, 1) if channels % g == 0)
    return nn.GroupNorm(groups, channels)


class ConvBlock(nn.Sequential):
    """3x3x3 convolution (optionally strided) -> norm -> LeakyReLU."""

    def __init__(self, c_in: int, c_out: int, norm: str, stride: int = 1):
        super().__init__(
            nn.Conv3d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
            norm_layer(norm, c_out),
            nn.LeakyReLU(LEAK, inplace=True),
        )


class UpBlock(nn.Sequential):
    """2x transposed convolution -> norm -> LeakyReLU (deterministic on CPU)."""

    def __init__(self, c_in: int, c_out: int, norm: str):
        super().__init__(
            nn.ConvTranspose3d(c_in, c_out, 2, stride=2, bias=False),
            norm_layer(norm, c_out),
            nn.LeakyReLU(LEAK, inplace=True),
        )


def feature_list(features: int, max_features: int, depth: int) -> list[int]:
    """Feature maps per resolution level, doubling up to a cap."""
    return [min(features * 2**i, max_features) for i in range(depth + 1)]


class Encoder(nn.Module):
    """Stem block then ``depth`` stride-2 levels (no skip outputs unless asked)."""

    def __init__(self, c_in: int, feats: list[int], norm: str):
        super().__init__()
        self.stem = ConvBlock(c_in, feats[0], norm)
        self.down = nn.ModuleList(
            nn.Sequential(ConvBlock(feats[i], feats[i + 1], norm, stride=2),
                          ConvBlock(feats[i + 1], feats[i + 1], norm))
            for i in range(len(feats) - 1)
        )

    def forward(self, x: torch.Tensor, skips: bool = False):
        h = self.stem(x)
        outs = [h]
        for level in self.down:
            h = level(h)
            outs.append(h)
        return outs if skips else h


class Decoder(nn.Module):
    """Mirror of :class:`Encoder`; with ``skip=True`` it is a U-Net decoder."""

    def __init__(self, feats: list[int], norm: str, skip: bool = False):
        super().__init__()
        self.skip = skip
        self.up = nn.ModuleList()
        self.merge = nn.ModuleList()
        for i in reversed(range(len(feats) - 1)):
            self.up.append(UpBlock(feats[i + 1], feats[i], norm))
            self.merge.append(ConvBlock(feats[i] * (2 if skip else 1), feats[i], norm))

    def forward(self, h: torch.Tensor, skips: list[torch.Tensor] | None = None) -> torch.Tensor:
        for j, (up, merge) in enumerate(zip(self.up, self.merge)):
            h = up(h)
            if self.skip:
                h = torch.cat([h, skips[-2 - j]], dim=1)
            h = merge(h)
        return h


class FanInLinear(nn.Linear):
    """Dense layer with weights ~ N(0, 1) used as ``W / sqrt(fan_in)`` ("equalised learning rate").

    Same initial output scale as a standard layer, but one Adam step (which moves every weight
    by about ``lr``) changes an output by ~ ``lr * sqrt(fan_in) * E|h|`` instead of
    ``lr * fan_in * E|h|``: with a flattened 3D feature map of tens of thousands of inputs the
    standard parametrisation throws the VAE latent statistics far out of range in one step.
    """

    def reset_parameters(self) -> None:
        nn.init.normal_(self.weight)
        nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.linear(x, self.weight * self.in_features ** -0.5, self.bias)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
               count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean squared error over channels and the voxels where ``mask`` (B, X, Y, Z) is set;
    over the whole grid when ``mask`` is None.  ``count`` replaces the number of mask voxels
    in the denominator (sharded training: the batch's share of the whole batch's count)."""
    if mask is None:
        return nn.functional.mse_loss(pred, target)
    m = mask.to(pred.dtype).unsqueeze(1)
    n = m.sum() if count is None else torch.as_tensor(count, dtype=pred.dtype, device=pred.device)
    return (((pred - target) ** 2) * m).sum() / (n * pred.shape[1]).clamp(min=1)


def output_activation(kind: str) -> nn.Module:
    """Sigmoid (signals in [0, 1]) or identity."""
    return nn.Sigmoid() if kind == "sigmoid" else nn.Identity()


def residual_score(recon: torch.Tensor, x: torch.Tensor, reduction: str = "abs-sum",
                   feature_channels: int = 0) -> torch.Tensor:
    """Voxel score (B, X, Y, Z) from the residual over channels: ``"abs-sum"`` = |sum_c (x̂_c - x_c)|
    (the reference DAE's: a lesion moves the signal of most channels the same way) or ``"sum-abs"``
    = sum_c |x̂_c - x_c| (also counts channel changes of opposite sign, and all noise) or ``"sum"`` =
    sum_c (x̂_c - x_c), signed: a network whose score is referred to its controls' centres it per
    voxel before its magnitude is taken, so a lesion that moves the residual against the network's
    usual bias there is not folded onto normal values (:mod:`bids_uad.models.normaliser`).

    ``feature_channels`` > 0 (inputs ``"both"``): the last channels are invariant features, another
    quantity than the dw channels before them.  Each group is reduced on its own, as a mean over its
    channels, and the two are added, so each group weighs the same however many channels it has;
    with ``"sum"`` the two signed sums are returned as two maps (B, 2, X, Y, Z), which the score
    reference refers each on its own."""
    r = recon - x
    if feature_channels:
        split = recon.shape[1] - feature_channels
        if reduction == "sum":  # two signed maps (B, 2, X, Y, Z), referred apart
            return torch.stack([r[:, :split].sum(1), r[:, split:].sum(1)], 1)
        dw = residual_score(recon[:, :split], x[:, :split], reduction) / split
        return dw + residual_score(recon[:, split:], x[:, split:], reduction) / feature_channels
    if reduction == "abs-sum":
        return r.sum(1).abs()
    if reduction == "sum-abs":
        return r.abs().sum(1)
    if reduction == "sum":
        return r.sum(1)
    raise ValueError(f"unknown score reduction {reduction!r}")
