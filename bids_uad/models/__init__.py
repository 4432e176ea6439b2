"""Anomaly-detection networks, registered by name.

Every model is a ``torch.nn.Module`` built from a :class:`ModelSettings` with
``loss(batch) -> (loss, parts)`` and ``score(x) -> (B, X, Y, Z)``, a class attribute
``needs_ood`` saying whether training feeds it synthetic anomalies, and ``__desc__``: how it
learns, in one clause of the methods text (:func:`describe_model`).  Baseline detectors
(:mod:`bids_uad.models.baselines`: ``meansignal``, ``normative``) have ``trainable = False`` and
``fit(data, masks, bvals, bvecs)`` instead of a loss; everything else treats them alike.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from bids_uad.errors import UsageError
from bids_uad.models.baselines import MeanSignal, NormativeModel
from bids_uad.models.cdae import CoarseDAE
from bids_uad.models.normaliser import ScoreNormaliser
from bids_uad.models.recdisc import RecDiscNet
from bids_uad.models.settings import ModelSettings
from bids_uad.models.vae import ContextVAE, VAE3d

MODELS: dict[str, Callable[[ModelSettings], nn.Module]] = {"dae": VAE3d, "recdisc": RecDiscNet, "cdae": CoarseDAE,
                                                           "cevae": ContextVAE, "normative": NormativeModel,
                                                           "meansignal": MeanSignal}
# the reference paper's fixed thresholds, on its score scales (DAE: residual of sigmoid outputs in
# [0, 1]; RecDiscNet: a probability); the baselines and cdae have none
FIXED_THRESHOLDS = {"dae": 0.3, "recdisc": 0.5}


def is_trainable(name: str) -> bool:
    """Whether the registered model ``name`` is optimised (False: fitted, e.g. the baselines)."""
    return bool(getattr(MODELS.get(name), "trainable", True))


def has_score_reference(name: str) -> bool:
    """Whether the registered network ``name`` gets a score reference in template space at the group
    level (:mod:`bids_uad.models.normaliser`; its class's ``score_reference``)."""
    return is_trainable(name) and bool(getattr(MODELS.get(name), "score_reference", False))


def register_model(name: str, factory: Callable[[ModelSettings], nn.Module]) -> None:
    """Add a model factory under ``name``."""
    MODELS[name] = factory


def describe_model(name: str, model_settings: dict | None = None) -> str:
    """The methods-text clause of model ``name``: its class's ``describe(model_settings)`` where it
    has one and the model file's ``settings.model`` is given (a variant-dependent text), else
    its class's ``__desc__``; then the score's median filter, where the model file has one."""
    width = int((model_settings or {}).get("score_median", 1))
    smoothed = (f"; the score map is median-filtered over each brain voxel's {width}x{width}x{width} neighbourhood "
                "inside the brain" if width > 1 else "")
    return _describe(name, model_settings) + smoothed


def _describe(name: str, model_settings: dict | None) -> str:
    factory = MODELS.get(name)
    describe = getattr(factory, "describe", None)
    if model_settings is not None and callable(describe):
        return describe(model_settings)
    text = getattr(factory, "__desc__", "") or f"the registered model {name!r}"
    model_settings = model_settings or {}
    inputs = model_settings.get("inputs") if is_trainable(name) else None
    signed = model_settings.get("score_reduction") == "sum"
    if inputs in ("invariant", "both"):
        features = ("protocol-invariant features: per shell the mean dw signal ratio and the rotation-invariant "
                    "spherical-harmonic power of each even order up to "
                    f"{int(model_settings.get('invariant_sh_order', 4))}, with FA and MD")
        if inputs == "invariant":
            text += f"; its inputs are {features}, instead of the dw volumes"
        else:
            text += f"; its inputs are the dw volumes and {features}"
            if not signed:
                text += ", and its score adds the mean residual of the dw volumes and that of the features"
    if model_settings.get("normative_space") == "template" and has_score_reference(name):
        template = model_settings.get("normative_template") or "template"
        if model_settings.get("network_space") == "template":
            text += (f"; it sees each subject on the {template} grid (at the controls' dwi voxel size, cut to the box "
                     "where their brains land): the normalised signal carried there in one linear resampling through "
                     "the subject's own transforms, so that a voxel is the same anatomical place in every brain")
        if not signed:
            z = "the positive robust z there"
        elif model_settings.get("feature_channels"):
            z = ("the larger magnitude of the robust z there of the residual's signed sum over the dw volumes "
                 "and of that over the features")
        else:
            z = "the magnitude of the robust z there of the residual's signed sum over the dw volumes"
        text += ("; its score is referred to the controls' own: each control scored by the fold that held it out, "
                 "per-voxel robust centre and spread of those scores (each fold's scale set by its held-out "
                 "controls' median and spread; a fold's reference from the controls it trained on) in "
                 f"{template} space, the score being {z}, mapped back to diffusion space with the inverse "
                 "transforms")
    return text


def get_model(name: str, settings: ModelSettings) -> nn.Module:
    """Build the registered model ``name`` from ``settings``: a network whose ``normative_space`` is
    ``template`` gets its (unfitted) score reference as ``model.normaliser``
    (:mod:`bids_uad.models.normaliser`)."""
    try:
        factory = MODELS[name]
    except KeyError:
        raise UsageError(f"unknown model {name!r}; registered: {sorted(MODELS)}") from None
    model = factory(settings)
    if is_trainable(name) and settings.normative_space == "template":
        if not has_score_reference(name):
            raise UsageError(f"the {name} model's score is not referred to the controls' (normative_space must "
                             "be 'dwi')")
        model.normaliser = ScoreNormaliser(settings)
    return model


__all__ = ["MODELS", "FIXED_THRESHOLDS", "describe_model", "get_model", "has_score_reference", "is_trainable",
           "register_model", "VAE3d", "RecDiscNet", "CoarseDAE", "ContextVAE", "MeanSignal", "NormativeModel"]
