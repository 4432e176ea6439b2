"""Anomaly-detection networks, registered by name.

Every model is a ``torch.nn.Module`` built from a :class:`ModelSettings` with
``loss(batch) -> (loss, parts)`` and ``score(x) -> (B, X, Y, Z)``, a class attribute
``needs_ood`` saying whether training feeds it synthetic anomalies, and ``__desc__``: how it
learns, in one clause of the methods text (:func:`describe_model`).
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from bids_uad.errors import UsageError
from bids_uad.models.recdisc import RecDiscNet
from bids_uad.models.settings import ModelSettings
from bids_uad.models.vae import VAE3d

MODELS: dict[str, Callable[[ModelSettings], nn.Module]] = {"dae": VAE3d, "recdisc": RecDiscNet}
FIXED_THRESHOLDS = {"dae": 0.3, "recdisc": 0.5}  # reference paper's fixed thresholds


def register_model(name: str, factory: Callable[[ModelSettings], nn.Module]) -> None:
    """Add a model factory under ``name``."""
    MODELS[name] = factory


def describe_model(name: str) -> str:
    """The methods-text clause of model ``name`` (its class's ``__desc__``)."""
    factory = MODELS.get(name)
    return getattr(factory, "__desc__", "") or f"the registered model {name!r}"


def get_model(name: str, settings: ModelSettings) -> nn.Module:
    """Build the registered model ``name`` from ``settings``."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    return factory(settings)


__all__ = ["MODELS", "FIXED_THRESHOLDS", "describe_model", "get_model", "register_model", "VAE3d", "RecDiscNet"]
