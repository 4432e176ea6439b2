"""Frozen settings for models, training, synthetic anomalies and scoring.

Every option the reference paper varied is a field here (latent size, output activation,
threshold method, anomaly-patch distribution, opening), so experiments are settings, not
edits.  ``Settings.to_dict``/``Settings.from_dict`` give a JSON-safe round trip that is
stored inside every model file.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields, replace
from typing import Any

from bids_uad.errors import UsageError

MODEL_NAMES = ("dae", "recdisc", "cdae", "cevae", "normative", "meansignal")
#: models trained at the group level when --models is not given, the best measured detector first:
#: the cdae, whose signed score referred to the controls' leads on the three seeds of graded hard
#: lesions through the whole pipeline (standard preset, template grid, dw volumes + invariant features:
#: AUPRC 0.259 vs the normative model's 0.129; docs/models.md, *The cdae's inputs on the template grid*);
#: then the template-space normative model (no training, the best on infiltration), the reference's
#: two networks, and the mean-signal baseline (README's *Models*)
DEFAULT_MODELS = ("cdae", "normative", "dae", "recdisc", "meansignal")
SCORE_REDUCTIONS = ("abs-sum", "sum-abs", "sum")
#: what the networks see (bids_uad.models.inputs): the normalised dw channels in the reference's
#: direction order, per-shell rotation-invariant features + FA + MD (protocol-invariant), or
#: both side by side (the dw channels, then the features)
INPUT_REPRESENTATIONS = ("dwi", "invariant", "both")
#: models that read the dw channels themselves (their own metrics): always "dwi" inputs
DWI_ONLY_MODELS = ("normative", "meansignal")
#: a network's input representation at the group level when --model-inputs is not given: the cdae sees
#: the dw volumes and the invariant features ("both"; through the whole pipeline on the three hard-lesion
#: seeds on the template grid it beat the dw volumes alone: docs/models.md, *The cdae's inputs ...*),
#: every other network the dw volumes
DEFAULT_INPUTS = {"cdae": "both"}


def default_inputs(model: str) -> str:
    """The group level's input representation for ``model`` when none is asked for."""
    return "dwi" if model in DWI_ONLY_MODELS else DEFAULT_INPUTS.get(model, "dwi")
#: where the normative model fits its centre/spread (docs/models.md, *normative*)
NORMATIVE_SPACES = ("template", "dwi")
#: where a network sees the subjects (ModelSettings.network_space)
NETWORK_SPACES = ("dwi", "template")
THRESHOLD_METHODS = ("fixed", "otsu", "meanpool", "healthy-fpr", "fdr")
ORACLE_METHODS = ("oracle-youden", "oracle-dice")
OOD_MODES = ("random", "directional", "isotropic")
POSTPROCESS = ("cluster", "opening")
#: arithmetic of the training steps (TrainingSettings.precision)
PRECISIONS = ("float32", "auto")


#: width in voxels of every score map's masked median filter (``ModelSettings.score_median``), also
#: applied to the evaluation's one-line detectors so that every detector is compared filtered alike
SCORE_MEDIAN = 3


@dataclass(frozen=True)
class ModelSettings:
    """Architecture of one network (both model kinds read the fields they need)."""

    name: str = "dae"
    grid: tuple[int, int, int] = (96, 96, 64)
    n_channels: int = 64  # network input channels: dw volumes ("dwi"), features ("invariant") or both
    # "both": how many of the channels (the last ones) are invariant features; the score reduces the
    # dw channels and the features separately (bids_uad.models.blocks.residual_score)
    feature_channels: int = 0
    inputs: str = "dwi"  # input representation, one of INPUT_REPRESENTATIONS
    invariant_sh_order: int = 4  # "invariant": highest even SH order whose power is a feature
    features: int = 16  # feature maps after the first block; doubled at each level
    max_features: int = 128
    depth: int = 4  # number of stride-2 downsamplings
    latent_size: int = 128  # DAE dense latent (16-512 in the paper)
    variational: bool = True  # DAE: False = plain convolutional autoencoder (z = mu, no KL term)
    noise_std: float = 0.2  # cdae: standard deviation of the coarse training noise (signal ratio units)
    noise_scale: int = 8  # cdae: side in voxels of the low-resolution cells the noise is drawn on
    # cdae: coarse noise also along the k leading principal directions of the healthy signal across
    # the channels (each with its spread over the training brains), so that the patterns the channels
    # vary by together (mean signal, anisotropy) must be restored from anatomy too; 0: off.  6: a
    # diffusion tensor's degrees of freedom (at most n_channels are used; docs/models.md)
    noise_modes: int = 6
    # dae/cevae: context-encoding term (ceVAE): boxes masked out of each training volume, which the
    # network must fill in from their context (0 = off; the cevae preset uses 2)
    context_boxes: int = 0
    context_box_fraction: float = 0.25  # largest box side as a fraction of the grid side (smallest: half)
    # dae/cdae/cevae score: |sum_c r_c| ("abs-sum"), sum_c |r_c| ("sum-abs"), or the signed sum_c r_c
    # ("sum": only with a score reference, whose z is then two-sided; the group level's choice for a
    # referred network on dw inputs, docs/models.md)
    score_reduction: str = "abs-sum"
    # every model: the score map's masked median filter, width in voxels of the model grid (1: none), applied
    # before calibration and thresholding (Kascenas et al. 2022 median-filter their residual maps); a lone
    # voxel's deviation is noise more often than a lesion, which spans its neighbours (docs/models.md)
    score_median: int = SCORE_MEDIAN
    output_activation: str = "sigmoid"  # "sigmoid" | "linear"
    norm: str = "instance"  # "instance" | "group"
    kl_weight: float = 1.22e-5  # DAE: loss = MSE + kl_weight * KL (MSE a mean, KL summed over latent)
    mse_region: str = "brain"  # MSE averaged over "brain" voxels (x channels) or the whole "grid"
    latent_scaling: str = "none"  # DAE dense mu/logvar layers: "none" (PyTorch default) or "fan-in"
    logvar_bound: float = 20.0  # DAE: logvar clamped to +-bound, straight-through gradient
    bce_weight: float = 1.0  # RecDiscNet: loss = MSE + bce_weight * BCE
    pos_weight: float = 3.0  # RecDiscNet: BCE positive-class weight p1
    normative_pool_below: int = 20  # normative: pool each voxel's neighbourhood when fewer controls
    normative_pool_radius: int = 1  # normative: neighbourhood half-width in voxels (1: 3x3x3)
    normative_smoothing: float = 1.0  # normative: Gaussian sigma (voxels) of the centre/spread maps
    # where the controls' per-voxel centre/spread are fitted: "template" (the group level's setting
    # for BIDS runs: maps carried to the template grid below with each subject's transforms, z back
    # to dwi space) or "dwi" (the model grid in each subject's diffusion space, or for a network no
    # reference at all: arrays without registrations, e.g. benchmarks/models.py, and older model
    # files).  The normative model's metrics; a network's score (its out-of-fold control scores:
    # bids_uad.models.normaliser); meansignal has none
    normative_space: str = "dwi"
    normative_template: str = ""  # template name (the transforms' to-<template>), "template" space only
    normative_template_shape: tuple[int, int, int] = (0, 0, 0)  # template grid the model is fitted on
    normative_template_affine: tuple[float, ...] = ()  # its voxel-to-world affine, 16 values row by row
    # a network's grid: "dwi" (each subject's own diffusion grid, centred on the model grid) or
    # "template" (each subject's normalised channels carried to the template grid above through its own
    # transforms, so that a voxel is the same anatomical place in every brain; the network's grid is then
    # that template grid, and its score comes back to the subject's dwi grid in one resampling:
    # bids_uad.models.inputs.carry_to_template, docs/models.md).  Needs the score reference's template
    # space (normative_space "template")
    network_space: str = "dwi"

    @property
    def n_score_maps(self) -> int:
        """Raw score maps a score reference refers: 2 for the signed score of inputs ``"both"``
        (the residual's signed sum over the dw volumes and over the features), else 1."""
        return 2 if self.score_reduction == "sum" and self.feature_channels > 0 else 1

    def __post_init__(self) -> None:
        if self.output_activation not in ("sigmoid", "linear"):
            raise UsageError(f"output_activation must be sigmoid or linear, not {self.output_activation!r}")
        if self.mse_region not in ("brain", "grid"):
            raise UsageError(f"mse_region must be brain or grid, not {self.mse_region!r}")
        if self.latent_scaling not in ("none", "fan-in"):
            raise UsageError(f"latent_scaling must be none or fan-in, not {self.latent_scaling!r}")
        if not self.logvar_bound > 0:
            raise UsageError("logvar_bound must be positive")
        if self.norm not in ("instance", "group"):
            raise UsageError(f"norm must be instance or group, not {self.norm!r}")
        if self.inputs not in INPUT_REPRESENTATIONS:
            raise UsageError(f"inputs must be one of {INPUT_REPRESENTATIONS}, not {self.inputs!r}")
        if self.normative_space not in NORMATIVE_SPACES:
            raise UsageError(f"normative_space must be one of {NORMATIVE_SPACES}, not {self.normative_space!r}")
        if self.network_space not in NETWORK_SPACES:
            raise UsageError(f"network_space must be one of {NETWORK_SPACES}, not {self.network_space!r}")
        if self.network_space == "template" and (
                self.name in ("normative", "meansignal") or self.normative_space != "template"
                or tuple(self.grid) != tuple(self.normative_template_shape)):
            raise UsageError(f"network_space 'template' is for a network whose score is referred in template space "
                             f"(normative_space 'template') on that template's grid; got {self.name} with "
                             f"normative_space {self.normative_space!r}, grid {tuple(self.grid)} and template grid "
                             f"{tuple(self.normative_template_shape)}")
        if self.normative_space == "template" and self.name == "meansignal":
            raise UsageError("the meansignal baseline has no controls' reference: normative_space must be 'dwi'")
        if self.normative_space == "template":
            import numpy as np

            affine = np.asarray(self.normative_template_affine, float)
            if (not self.normative_template or len(self.normative_template_shape) != 3
                    or min(self.normative_template_shape) < 1 or affine.size != 16
                    or not np.isfinite(affine).all() or abs(np.linalg.det(affine.reshape(4, 4)[:3, :3])) < 1e-9):
                raise UsageError(f"a template-space {self.name} model needs normative_template (a name), "
                                 "normative_template_shape (3 positive sizes) and normative_template_affine "
                                 f"(16 finite values, invertible); got {self.normative_template!r}, "
                                 f"{self.normative_template_shape}, {len(self.normative_template_affine)} values")
        if self.inputs != "dwi" and self.name in DWI_ONLY_MODELS:
            raise UsageError(f"the {self.name} baseline reads the dw channels itself: inputs must be 'dwi'")
        if (self.inputs == "both") != (self.feature_channels > 0) or not 0 <= self.feature_channels < self.n_channels:
            raise UsageError(f"feature_channels ({self.feature_channels}) must be in [1, n_channels) with inputs "
                             f"'both' and 0 otherwise (inputs {self.inputs!r}, n_channels {self.n_channels})")
        if self.invariant_sh_order not in (2, 4, 6, 8):
            raise UsageError(f"invariant_sh_order must be 2, 4, 6 or 8, not {self.invariant_sh_order!r}")
        if self.score_reduction not in SCORE_REDUCTIONS:
            raise UsageError(f"score_reduction must be one of {SCORE_REDUCTIONS}, not {self.score_reduction!r}")
        if self.score_reduction == "sum" and (self.normative_space != "template" or self.inputs == "invariant"):
            raise UsageError("score_reduction 'sum' (a signed score) needs a score reference (normative_space "
                             "'template') and the dw volumes among the inputs (their channels move together in a "
                             "lesion)")
        if not 0 <= self.noise_std <= 10 or not 1 <= self.noise_scale <= 512:
            raise UsageError("noise_std must lie in [0, 10] and noise_scale in [1, 512]")
        if self.score_median not in (1, 3, 5, 7):
            raise UsageError(f"score_median must be 1 (none), 3, 5 or 7 voxels, not {self.score_median!r}")
        if not 0 <= self.noise_modes <= 64:
            raise UsageError(f"noise_modes must lie in [0, 64], not {self.noise_modes}")
        if not 0 <= self.context_boxes <= 64 or not 0 < self.context_box_fraction <= 1:
            raise UsageError("context_boxes must lie in [0, 64] and context_box_fraction in (0, 1]")
        if self.name == "cevae" and self.context_boxes < 1:
            raise UsageError("the cevae model needs context_boxes >= 1 (its context-encoding term)")
        if not 1 <= self.latent_size <= 4096:
            raise UsageError(f"latent_size {self.latent_size} out of range")
        div = 2 ** self.depth
        if any(g % div for g in self.grid):
            raise UsageError(f"grid {self.grid} must be divisible by 2**depth = {div}")


@dataclass(frozen=True)
class OODSettings:
    """Synthetic just-out-of-distribution ellipsoids drawn on the fly (RecDiscNet)."""

    count_probabilities: tuple[float, float, float] = (0.2, 0.6, 0.2)  # 0, 1, 2 ellipsoids
    distribution: str = "both"  # "normal" | "uniform" | "both" (random per ellipsoid)
    modes: tuple[str, ...] = ("random", "directional", "isotropic")  # >1 entry = "mix"
    mean_scales: tuple[float, ...] = (1.0, 0.5)  # value mean = brain mean * one of these
    min_radius: float = 0.05  # semi-axis range as a fraction of the grid size
    max_radius: float = 0.2

    def __post_init__(self) -> None:
        if self.distribution not in ("normal", "uniform", "both"):
            raise UsageError(f"OOD distribution must be normal, uniform or both, not {self.distribution!r}")
        bad = [m for m in self.modes if m not in OOD_MODES]
        if bad or not self.modes:
            raise UsageError(f"OOD modes must be a non-empty subset of {OOD_MODES}, got {self.modes}")
        if len(self.count_probabilities) != 3 or abs(sum(self.count_probabilities) - 1) > 1e-6:
            raise UsageError("count_probabilities must be three probabilities summing to 1")


@dataclass(frozen=True)
class TrainingSettings:
    """Optimisation, cross-validation and runtime choices."""

    epochs: int = 100
    learning_rate: float = 1e-4
    lr_decay: float = 0.95  # exponential decay per epoch
    batch_size: int = 4
    steps_per_epoch: int | None = None  # None: one pass over the training subjects
    n_folds: int = 7
    # independent k-fold trainings (other splits, initialisations and draws): every one of the
    # repeats x k networks joins the fold ensemble (1: one k-fold training, as model files written
    # before the setting)
    repeats: int = 1
    patience: int = 15  # early stopping: epochs without validation improvement
    seed: int = 0
    device: str = "auto"  # "auto" | "cpu" | "cuda"
    threads: int = 1  # torch threads in total; each of `processes` workers gets threads // processes
    processes: int = 1  # data-parallel (DDP) training processes spawned per fold run; see distributed.py
    checkpoint_every: int = 1  # epochs between checkpoints (when a directory is given)
    progress: bool = True
    # the training steps' arithmetic (bids_uad.training.precision): "float32", or "auto" = bfloat16
    # mixed precision (torch.autocast: weights, gradients and losses in float32) where the device does
    # bfloat16 natively (a CPU with AVX512-BF16 or AMX, a GPU that supports it), else float32.
    # Validation, calibration and scoring are always float32
    precision: str = "float32"

    def __post_init__(self) -> None:
        if self.device not in ("auto", "cpu", "cuda"):
            raise UsageError(f"device must be auto, cpu or cuda, not {self.device!r}")
        if self.n_folds < 2:
            raise UsageError("n_folds must be at least 2")
        if self.repeats < 1:
            raise UsageError("repeats must be at least 1")
        if self.epochs < 1 or self.batch_size < 1:
            raise UsageError("epochs and batch_size must be positive")
        if self.threads < 1 or self.processes < 1:
            raise UsageError("threads and processes must be positive")
        if self.precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {PRECISIONS}, not {self.precision!r}")


@dataclass(frozen=True)
class ScoringSettings:
    """Calibration, thresholding and post-processing of the binary map.

    ``threshold_method`` here is the one default of the product: the group level stores it in
    every model file and participant-level inference uses it unless ``--threshold`` overrides.
    ``healthy-fpr`` is calibrated for the map that is written (after post-processing), see
    :func:`bids_uad.models.calibration.calibrate_written`.
    """

    threshold_method: str = "healthy-fpr"
    fpr: float = 0.01  # healthy-fpr: target false-positive rate on healthy tissue of the written map
    fdr_q: float = 0.05  # fdr: Benjamini-Hochberg level on conformal p-values
    fixed_threshold: float | None = None  # None: 0.3 for DAE, 0.5 for RecDiscNet (reference score scale)
    meanpool_size: int = 16
    # post-processing of the thresholded map: "cluster" removes 26-connected clusters smaller than
    # min_cluster_voxels (the group level sizes it to min_cluster_ml from the controls' voxel size),
    # "opening" is the reference's binary opening with an opening_size^3 cube
    postprocess: str = "cluster"
    min_cluster_ml: float = 0.5
    min_cluster_voxels: int = 8
    opening_size: int = 3  # cube side of the morphological opening; 0 or 1 disables it
    max_null_samples: int = 200_000  # healthy scores kept per fold for p-values
    # score with the mean of all fold models (True) or the fold with the lowest validation loss;
    # the group level stores it in the model file, --ensemble/--no-ensemble overrides it at inference
    ensemble: bool = False
    # findings: the smallest finding is calibrated so that at most this fraction of healthy
    # calibration controls would have any finding (the largest-cluster volume's order statistic,
    # see :func:`bids_uad.models.calibration.calibrate_finding_volume`)
    finding_familywise: float = 0.05
    # voxel volume (mL) of the training data; set by :meth:`sized_to` at the group level
    voxel_ml: float | None = None

    def __post_init__(self) -> None:
        if not 0 < self.finding_familywise < 1:
            raise UsageError("finding_familywise must lie in (0, 1)")
        if self.voxel_ml is not None and not self.voxel_ml > 0:
            raise UsageError("voxel_ml must be positive")
        if not isinstance(self.ensemble, bool):
            raise UsageError(f"ensemble must be true or false, not {self.ensemble!r}")
        if self.threshold_method not in THRESHOLD_METHODS:
            raise UsageError(f"threshold method must be one of {THRESHOLD_METHODS}, not {self.threshold_method!r}")
        if not 0 < self.fpr < 1 or not 0 < self.fdr_q < 1:
            raise UsageError("fpr and fdr_q must lie in (0, 1)")
        if self.postprocess not in POSTPROCESS:
            raise UsageError(f"postprocess must be one of {POSTPROCESS}, not {self.postprocess!r}")
        if self.min_cluster_voxels < 1 or not self.min_cluster_ml >= 0:
            raise UsageError("min_cluster_voxels must be >= 1 and min_cluster_ml >= 0")

    def sized_to(self, voxel_ml: float) -> "ScoringSettings":
        """The same settings with ``min_cluster_voxels`` = ``min_cluster_ml`` in voxels of ``voxel_ml``."""
        return replace(self, min_cluster_voxels=max(1, int(self.min_cluster_ml / voxel_ml)), voxel_ml=float(voxel_ml))


@dataclass(frozen=True)
class Settings:
    """Everything needed to train, calibrate and apply one model."""

    model: ModelSettings = field(default_factory=ModelSettings)
    training: TrainingSettings = field(default_factory=TrainingSettings)
    ood: OODSettings = field(default_factory=OODSettings)
    scoring: ScoringSettings = field(default_factory=ScoringSettings)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe nested dict (tuples become lists)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Settings":
        """Inverse of :meth:`to_dict`; unknown keys are an error, missing keys take defaults (those
        of :data:`WRITTEN_BEFORE`: the behaviour before the key existed)."""
        parts = {}
        for f in fields(cls):
            sub_cls = {"model": ModelSettings, "training": TrainingSettings,
                       "ood": OODSettings, "scoring": ScoringSettings}[f.name]
            parts[f.name] = _build(sub_cls, data.get(f.name, {}))
        return cls(**parts)

    def with_model(self, name: str) -> "Settings":
        """Same settings for another registered model."""
        return replace(self, model=replace(self.model, name=name))


#: keys added with a default other than the behaviour before them: the value a settings dict
#: written without the key (an older model file or checkpoint) was trained with
WRITTEN_BEFORE: dict[type, dict[str, Any]] = {ModelSettings: {"noise_modes": 0, "score_median": 1}}


def _build(cls, data: dict[str, Any]):
    data = {**WRITTEN_BEFORE.get(cls, {}), **data}
    known = {f.name: f for f in fields(cls)}
    unknown = set(data) - set(known)
    if unknown:
        raise UsageError(f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = tuple(value) if isinstance(value, list) else value
    return cls(**kwargs)


def preset(name: str, model: str = "dae") -> Settings:
    """Named settings: ``quick`` (tiny CPU model for tests/CI), ``standard`` (real training with early
    stopping on CPU) or ``paper`` (reference geometry).  ``cevae`` is the DAE's settings with the
    context-encoding term on (2 boxes per training volume)."""
    settings = _preset(name, "dae" if model == "cevae" else model)
    if model == "cevae":
        settings = replace(settings, model=replace(settings.model, name="cevae", context_boxes=2))
    return settings


def _preset(name: str, model: str) -> Settings:
    if name == "quick":
        # Sized for CI: a few dozen Adam steps per fold on CPU.  The DAE needs the fan-in
        # parametrisation of its dense latent layers at this learning rate (see FanInLinear).
        epochs, lr = (10, 1e-2) if model == "dae" else (5, 5e-3)
        return Settings(
            model=ModelSettings(name=model, grid=(16, 16, 16), n_channels=32, features=8,
                                max_features=32, depth=2, latent_size=32, latent_scaling="fan-in"),
            training=TrainingSettings(epochs=epochs, learning_rate=lr, lr_decay=0.95, batch_size=2,
                                      steps_per_epoch=4, n_folds=3, patience=5, progress=False),
            ood=OODSettings(min_radius=0.1, max_radius=0.3),
        )
    if name == "standard":
        # Real training on 2 CPU cores: a mid-size network trained until its validation loss stops
        # improving (patience), sized so that one model (3 folds) on the `small` synthetic dataset
        # (54x54x34 dwi, 32 directions, 56x56x40 grid) finishes in <= 15 min; the epoch cap only
        # bounds the time.  Measured (cdae, benchmarks/models.py): 2.8 CPU-s per epoch on one
        # thread, and at a 40-epoch cap every fold's validation loss was still falling (by ~1 %
        # per epoch at epoch 40), so the cap is 80: 3 x 80 x 2.8 s = 11 min of one core.  The cdae at
        # 1e-3 still improved at the cap on the hard-lesion controls (best epochs 77-79, 9 folds); at
        # 3e-3 every fold reaches an 18-29 % lower validation loss and 3 of 9 stop early
        # (docs/models.md, *The score's median filter and the standard cdae's learning rate*).
        # The cdae trains as two independent 3-fold runs (repeats), all six networks in its ensemble:
        # the training's run-to-run variation was as large as its lead over the normative model, and
        # two runs averaged scored higher than one on every seed (0.165 -> 0.201 AUPRC, three seeds;
        # docs/models.md, *Run-to-run variation ...*); ~11 min for the six on 2 cores in float32.  Its
        # training steps run in bfloat16 where the CPU has it natively (precision "auto"): the same
        # detection in about half the time (8-10 min for the six networks with calibration, 2 cores;
        # docs/models.md, *bfloat16 training steps ...*)
        lr, repeats = (3e-3, 2) if model == "cdae" else (1e-3, 1)
        return Settings(
            model=ModelSettings(name=model, grid=(64, 64, 64), n_channels=32, features=8,
                                max_features=32, depth=3, latent_size=128, latent_scaling="fan-in"),
            training=TrainingSettings(epochs=80, learning_rate=lr, lr_decay=0.98, batch_size=2,
                                      steps_per_epoch=4, n_folds=3, repeats=repeats, patience=6,
                                      precision="auto" if model == "cdae" else "float32"),
            ood=OODSettings(min_radius=0.1, max_radius=0.3),
        )
    if name == "paper":
        return Settings(
            model=ModelSettings(name=model, grid=(96, 96, 64), n_channels=64, features=16,
                                max_features=128, depth=4, latent_size=128),
            training=TrainingSettings(epochs=100, learning_rate=1e-4, lr_decay=0.95, batch_size=4,
                                      n_folds=7, patience=15),
        )
    raise UsageError(f"unknown preset {name!r}; choose quick, standard or paper")


def needs_template(model) -> bool:
    """Whether ``model`` (a module, or its :class:`ModelSettings`) scores in a template space and so
    needs each subject's transforms to it and back: the template-space normative model, and a
    network whose score is referred to its controls' in template space (:mod:`bids_uad.models.normaliser`)."""
    settings = getattr(model, "settings", model)
    return getattr(settings, "normative_space", "dwi") == "template"


def is_template_normative(model) -> bool:
    """Whether ``model`` (a module, or its :class:`ModelSettings`) is the template-space normative
    model (whose controls' metric values are the findings' reference)."""
    settings = getattr(model, "settings", model)
    return getattr(settings, "name", "") == "normative" and needs_template(settings)
