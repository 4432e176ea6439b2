"""Group level: train the anomaly models on the controls, calibrate, evaluate, report.

This level is torch training, not a nipype graph: it reads the participant derivatives of
the controls from ``OUTPUT_DIR``, trains every requested model with k-fold cross-validation
(calibrating thresholds on each fold's held-out controls), saves the models under
``OUTPUT_DIR/models/`` (safetensors + JSON), evaluates them on subjects with lesion masks,
and writes the tables under ``OUTPUT_DIR/group/``.

Training is data-parallel (DDP) with ``--nprocs N > 1`` (N spawned processes on CPU, at most
one per GPU on CUDA; see :func:`training_processes`) or when started by torchrun, where rank
0 runs the whole level and the other ranks only take part in training
(:func:`torchrun_worker_main`).
"""
from __future__ import annotations

import logging
import os
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bids_uad.bids import outputs
from bids_uad.bids.derivatives import write_tsv
from bids_uad.bids.layout import BIDSInputs
from bids_uad.bids.preprocessed import PreprocessedDwi, find_preprocessed_dwi, order_sessions
from bids_uad.config import Settings
from bids_uad.errors import InputValidationError, NoFilesSelectedError
from bids_uad.models import has_score_reference, is_trainable
from bids_uad.models.inputs import covering_grid
from bids_uad.models.settings import DWI_ONLY_MODELS, default_inputs, needs_template, preset

LOGGER = logging.getLogger("bids_uad.group")

#: Methods text of this stage (as nipreps' LiterateWorkflow ``__desc__``/``__postdesc__``), per
#: trained model; :func:`describe_training` fills it in and the group report assembles it.
__desc__ = ("The {name} model, trained on {n_subjects} healthy control subject(s) with {k}-fold "
            "cross-validation{repeats} in PyTorch{budget}, is {model}")
__postdesc__ = ("Held-out controls' anomaly scores formed the null sample for calibrated thresholds "
                "(false-positive rate on healthy tissue of the post-processed map) and conformal p-values, with "
                "Benjamini-Hochberg control of the false discovery rate, from {calibration}")
#: where a model file's null sample came from (its top-level ``calibration``: out of fold, else its best fold's)
CALIBRATION_SOURCES = {True: "every control's out-of-fold scores (each scored by the fold that held it out)",
                       False: "the selected fold's held-out controls"}


def describe_training(name: str, meta: dict) -> list[tuple[str, list[str]]]:
    """Methods sentences (with citation keys) for one trained model, from its model JSON ``meta``.

    The model's own clause comes from its class (:func:`bids_uad.models.describe_model`), so
    the text says what that architecture does (only RecDiscNet trains on synthetic anomalies).
    """
    from bids_uad.models import describe_model

    settings = meta.get("settings", {}) if isinstance(meta.get("settings"), dict) else {}
    training = settings.get("training", {}) if isinstance(settings.get("training"), dict) else {}
    budget = (f" ({training.get('epochs')} epochs at most, seed {training.get('seed')})"
              if training.get("epochs") is not None else "")
    model = settings.get("model") if isinstance(settings.get("model"), dict) else None
    repeats = training.get("repeats", 1) if isinstance(training.get("repeats", 1), int) else 1
    repeats = max(1, repeats)
    text = __desc__.format(name=name, model=describe_model(name, model), n_subjects=len(meta.get("training_subjects", [])),
                           k=len(meta.get("folds", [])) // repeats, budget=budget,
                           repeats=f" repeated {repeats} times with other splits (all networks averaged)"
                           if repeats > 1 else "")
    post = __postdesc__.format(calibration=CALIBRATION_SOURCES[bool(meta.get("calibration"))])
    return [(text, ["reference", "pytorch"]), (post, ["bh"])]


def baseline_derivatives(settings: Settings, bids: BIDSInputs, subject: str) -> PreprocessedDwi | None:
    """The preprocessed dwi of a subject's first session (by ``acq_time``) that has one."""
    sessions = order_sessions(bids.sessions(subject, settings.session_labels), bids.sessions_table(subject))
    for session in sessions:
        found = find_preprocessed_dwi(settings.output_dir, subject, session)
        if found is not None:
            return found
    return None


def model_settings_for(settings: Settings, model: str, ref_bvals, shape: tuple[int, int, int],
                       voxel_ml: float | None = None, voxel_mm: float | None = None):
    """Training settings from the preset, sized to the data: channels (for the input representation
    of the reference's dw b-values ``ref_bvals``), a grid that covers it and
    the post-processing's minimum cluster in voxels of ``voxel_ml``; ``--threshold`` and
    ``--ensemble/--no-ensemble`` (if given; else the fold ensemble for a network whose score is
    referred to the controls', :data:`REFERRED_ENSEMBLE`) are stored in the model file.  The normative model works
    in template space (:func:`normative_template_settings`, at the data's ``voxel_mm``), and so do the
    reconstruction networks' score references (:mod:`bids_uad.models.normaliser`); with
    ``--network-space template`` (the default) those networks also see the subjects on that template
    grid (``network_space``), padded to a grid their depth divides."""
    from bids_uad.models.inputs import sized_to_inputs

    base = preset(settings.train_preset, model)
    grid = covering_grid(shape, base.model.depth)
    processes = training_processes(settings, base.training.batch_size)
    space = normative_template_settings(settings, voxel_mm) if model == "normative" or has_score_reference(model) else {}
    inputs = "dwi" if model in DWI_ONLY_MODELS else settings.model_inputs or default_inputs(model)
    if space and model != "normative" and inputs != "invariant":  # a referred network on the dw volumes
        space["score_reduction"] = REFERRED_REDUCTION
    if space and model != "normative" and settings.network_space == "template":  # on the template's grid
        grid = covering_grid(space["normative_template_shape"], base.model.depth)
        space.update(network_space="template", normative_template_shape=grid)
    return replace(
        base,
        model=sized_to_inputs(replace(base.model, grid=grid, **space), ref_bvals, inputs),
        training=replace(base.training, seed=settings.seed, threads=settings.omp_nthreads * processes,
                         processes=processes, device=settings.device, progress=True,
                         repeats=settings.train_repeats if settings.train_repeats and is_trainable(model)
                         else base.training.repeats),
        scoring=_scoring_for(base.scoring, settings.threshold, voxel_ml,
                             REFERRED_ENSEMBLE if settings.ensemble is None and space and model != "normative"
                             else settings.ensemble),
    )


#: a network whose score is referred to its controls' scores with the mean of its fold models unless
#: --no-ensemble: measured, the fold ensemble's AUPRC was higher for each referred network
#: (docs/models.md, *The reconstruction networks' score reference*)
REFERRED_ENSEMBLE = True
#: and its score the signed channel sum of its residual, whose referred z is two-sided: measured on
#: the three hard-lesion seeds, AUPRC rose for every seed and network (docs/models.md, *Score
#: reduction*).  Networks on invariant features keep their preset's (their signed sum was worse)
REFERRED_REDUCTION = "sum"


def normative_template_settings(settings: Settings, voxel_mm: float | None) -> dict:
    """The normative model's space for BIDS runs: the template the anatomical workflow registers to
    (:func:`~bids_uad.algorithms.templates.template_for_output_spaces`), on a grid covering its
    brain at the controls' dwi voxel size (``voxel_mm``: their
    :func:`~bids_uad.algorithms.templates.native_resolution_mm`; 2 mm when unknown)."""
    from bids_uad.algorithms.templates import template_for_output_spaces, template_grid

    template = template_for_output_spaces(settings.output_spaces)
    shape, affine = template_grid(template.brain_mask, voxel_mm or 2.0)
    return {"normative_space": "template", "normative_template": template.name,
            "normative_template_shape": tuple(shape),
            "normative_template_affine": tuple(float(v) for v in np.asarray(affine).ravel())}


def template_routes(settings: Settings, found: list[PreprocessedDwi], items: list[dict], template: str,
                    refuse: bool = True) -> list:
    """Each run's :class:`~bids_uad.algorithms.registration.TemplateRoute` to ``template`` and back
    (from OUTPUT_DIR), also stored in its loaded ``items`` entry as ``"route"`` (None when missing).

    ``refuse``: the controls of a template-space model must all have them: exit 66 naming the
    controls without and what is missing (no fallback to the dwi grid: another detector).
    """
    from bids_uad.errors import InputMissingError
    from bids_uad.interfaces.anomaly import template_route

    routes, missing = [], {}
    for run, item in zip(found, items):
        route, lacking = template_route(settings.output_dir, run.dwi, template, item["affine"])
        item["route"] = route
        routes.append(route)
        if route is None:
            missing[f"sub-{run.subject}"] = ", ".join(lacking)
    if missing and refuse:
        raise InputMissingError(
            f"the normative model works in template space ({template}) and needs every control's transforms to "
            "the template and back, written by the participant level's anatomical workflow (a T1w per "
            "session); missing for " + "; ".join(f"{s}: {m}" for s, m in missing.items())
            + ": run the participant level with a T1w for them (e.g. --output-spaces dwi MNI152NLin2009cAsym), "
            "or train without it (--models without normative)", settings.output_dir)
    return routes


def _scoring_for(scoring, threshold: str | None, voxel_ml: float | None, ensemble: bool | None = None):
    if threshold:
        scoring = replace(scoring, threshold_method=threshold)
    if ensemble is not None:
        scoring = replace(scoring, ensemble=ensemble)
    return scoring if voxel_ml is None else scoring.sized_to(voxel_ml)


def training_processes(settings: Settings, batch_size: int) -> int:
    """Data-parallel training processes, each with ``--omp-nthreads`` threads.

    Under torchrun: its world size.  Otherwise ``--nprocs``, capped at the batch size (a
    process beyond it would only idle on an empty shard) and, on CUDA, at the number of GPUs.
    """
    from bids_uad.training import distributed
    from bids_uad.models.bundle import resolve_device

    env = distributed.torchrun_env()
    if env is not None:
        return env["world_size"]
    return distributed.plan_processes(min(settings.nprocs, batch_size), resolve_device(settings.device))


def select_controls(settings: Settings, bids: BIDSInputs) -> list[str]:
    """The controls to train on: ``--group-column`` = ``--control-value`` in participants.tsv (at
    least 3 there), restricted to ``--participant-label`` when given."""
    controls = bids.controls(settings.group_column, settings.control_value)
    if len(controls) < 3:
        raise InputValidationError(
            f"only {len(controls)} control(s) with {settings.group_column}={settings.control_value!r} "
            "in participants.tsv; at least 3 are needed to train and calibrate",
            settings.bids_dir / "participants.tsv",
        )
    if settings.participant_labels:
        controls = [c for c in controls if c in settings.participant_labels]
    return controls


def torchrun_worker_main(settings: Settings) -> int | None:
    """For torchrun ranks other than 0: take part in group-level training, write nothing, and
    return the exit status; None in every other process (which then runs the level normally).

    Rank 0 runs the whole level (validation, logs, models, evaluation, report); the other
    ranks select the same controls, load the same derivatives and join each fold's DDP training.
    """
    if os.environ.get("RANK", "0") in ("", "0"):  # cheap check before importing torch
        return None
    from bids_uad.bids.layout import BIDSInputs
    from bids_uad.training import distributed

    if distributed.torchrun_env() is None:
        return None
    if settings.analysis_level != "group":
        LOGGER.info("torchrun rank %s: nothing to do at the participant level", os.environ["RANK"])
        return 0
    bids = BIDSInputs(settings.bids_dir, validate=False, filters=settings.bids_filters)
    run_group_training(settings, bids, select_controls(settings, bids), run_id="")
    return 0


def _load_controls(found: list[PreprocessedDwi]) -> dict:
    from bids_uad.algorithms.templates import native_resolution_mm

    loaded = [f.load() for f in found]
    shapes = {d["dwi"].shape[:3] for d in loaded}
    shape = tuple(int(max(s[i] for s in shapes)) for i in range(3))
    zooms = loaded[0]["header"].get_zooms()[:3]
    return {"items": loaded, "shape": shape, "voxel_ml": float(np.prod(zooms)) / 1000.0,
            "voxel_mm": native_resolution_mm(zooms)}


def shell_signature(bvals) -> tuple[int, ...]:
    """The diffusion-weighted shells of a series, rounded to 100 s/mm² (b900 and b929 are one shell)."""
    from bids_uad.models.inputs import dw_gradients, shells

    dw, _ = dw_gradients(bvals, np.zeros((len(np.ravel(bvals)), 3)) + 1.0)
    return tuple(int(round(v, -2)) for v in shells(dw)[0]) if dw.size else ()


def controls_sharing_shells(found: list, items: list[dict]) -> tuple[list, list[dict]]:
    """Keep the largest group of controls acquired with the same shells, with a clear note.

    A model learns the signal of given b-values; controls with other shells cannot be
    reconciled (a b2000 signal is not a b1000 one), so mixing them is never silent: the note
    names every control's shells and which ones are left out.  Fewer than 3 left: exit 16.
    """
    groups: dict[tuple[int, ...], list[int]] = {}
    for index, item in enumerate(items):
        groups.setdefault(shell_signature(item["bvals"]), []).append(index)
    if len(groups) == 1:
        return found, items
    listing = "; ".join(f"b={'/'.join(map(str, sig)) or 'none'}: "
                        + ", ".join(f"sub-{found[i].subject}" for i in members) for sig, members in groups.items())
    best_sig, best = max(groups.items(), key=lambda kv: (len(kv[1]), kv[0]))
    if len(best) < 3:
        raise InputValidationError(
            f"the controls mix diffusion shells ({listing}); no shell set is shared by 3 or more controls, "
            "so no model can be trained: train per protocol (--participant-label / --bids-filter-file)",
            found[0].dwi.parent)
    LOGGER.warning("the controls mix diffusion shells (%s): training on the %d controls with b=%s; the others "
                   "are left out (a model learns one protocol's signal)", listing, len(best),
                   "/".join(map(str, best_sig)))
    return [found[i] for i in best], [items[i] for i in best]


def run_group_training(settings: Settings, bids: BIDSInputs, controls: list[str], run_id: str) -> None:
    """Train, calibrate and evaluate every model in ``settings.models`` (under torchrun, ranks
    other than 0 only train)."""
    from bids_uad.training import distributed
    from bids_uad.training.fit import train_from_dwi
    from bids_uad.training.trainer import checkpoint_key
    from bids_uad.models.inputs import dw_gradients

    found, missing = [], []
    for subject in controls:
        item = baseline_derivatives(settings, bids, subject)
        (found if item is not None else missing).append(item or subject)
    if missing:
        LOGGER.warning("controls without preprocessed dwi (run the participant level for them): %s",
                       ", ".join(f"sub-{m}" for m in missing))
    if len(found) < 3:
        raise NoFilesSelectedError(
            f"only {len(found)} control(s) have preprocessed dwi in {settings.output_dir}; at least 3 are "
            "needed: run the participant level first",
            settings.output_dir,
        )
    data = _load_controls(found)
    found, data["items"] = controls_sharing_shells(found, data["items"])
    items = data["items"]
    ref_bvals, _ = dw_gradients(items[0]["bvals"], items[0]["bvecs"])
    models_dir = settings.output_dir / "models"
    group_dir = settings.output_dir / "group"
    subjects = [f.subject for f in found]
    bundles = []
    for model in settings.models:
        msettings = model_settings_for(settings, model, ref_bvals, data["shape"], data["voxel_ml"],
                                       data["voxel_mm"])
        routes = None
        if needs_template(msettings.model) and has_score_reference(model):
            routes = template_routes(settings, found, items, msettings.model.normative_template, refuse=False)
            if any(r is None for r in routes):  # the raw score then (the normative model refuses instead)
                LOGGER.warning("%s: not every control has transforms to %s and back, so its score is not referred "
                               "to the controls' there (the raw reconstruction score is used)", model,
                               msettings.model.normative_template)
                raw_score = preset(settings.train_preset, model).model.score_reduction  # no signed score
                routes, msettings = None, replace(msettings, model=replace(
                    msettings.model, normative_space="dwi", normative_template="", normative_template_shape=(0, 0, 0),
                    normative_template_affine=(), score_reduction=raw_score, network_space="dwi",
                    grid=covering_grid(data["shape"], msettings.model.depth)),
                    scoring=replace(msettings.scoring, ensemble=bool(settings.ensemble)))
        elif needs_template(msettings.model):
            started = time.perf_counter()
            routes = template_routes(settings, found, items, msettings.model.normative_template)
            LOGGER.info("%s works in %s (grid %s): transforms found for all %d controls (%.1f s)", model,
                        msettings.model.normative_template, msettings.model.normative_template_shape,
                        len(found), time.perf_counter() - started)
        if len(found) < msettings.training.n_folds:
            msettings = replace(msettings, training=replace(msettings.training, n_folds=len(found)))
        repeats = msettings.training.repeats
        LOGGER.info("training %s on %d controls (%d folds%s, %s grid %s, %d %s channels)", model, len(found),
                    msettings.training.n_folds, f" x {repeats} repeats" if repeats > 1 else "",
                    msettings.model.normative_template if msettings.model.network_space == "template" else "dwi",
                    "(where the controls land)" if msettings.model.network_space == "template" else msettings.model.grid,
                    msettings.model.n_channels, msettings.model.inputs)
        trained_from = time.perf_counter()
        bundle = train_from_dwi(
            msettings,
            [i["dwi"] for i in items], [i["bvals"] for i in items], [i["bvecs"] for i in items],
            [i["brain_mask"] for i in items], subjects,
            analysis_masks=[i["analysis_mask"] for i in items],
            checkpoint_dir=settings.code_work_dir / "training" / model / checkpoint_key(msettings, subjects),
            routes=routes,
        )
        if distributed.rank() != 0:
            continue
        path = bundle.save(models_dir)
        LOGGER.info("%s: trained and calibrated in %.1f s wall; saved %s", model, time.perf_counter() - trained_from, path)
        write_tsv(outputs.group_path(settings.output_dir, "folds_tsv", model=model), [
            {"fold": f.fold, "best_epoch": f.best_epoch, "best_val_loss": f.best_val_loss,
             "heldout": " ".join(f"sub-{subjects[i]}" for i in f.val_idx),
             "threshold_at_fpr": None if f.calibration is None else f.calibration.threshold(msettings.scoring.fpr)}
            for f in bundle.folds
        ])
        bundles.append(bundle)
    if bundles and distributed.rank() == 0:
        from bids_uad.workflows.group_evaluation import evaluate_detectors, load_patients

        # after training (the patients are not held in memory while it runs), loaded once for every
        # model's evaluation and the detection tables; each patient is scored once per model
        candidates = [baseline_derivatives(settings, bids, s) for s in bids.subjects() if s not in controls]
        candidates = [c for c in candidates if c is not None]
        patients = load_patients(settings, candidates)
        for bundle in bundles:
            if needs_template(bundle.settings.model):  # the patients' routes for its evaluation
                for arrays in patients:
                    run = next(c for c in candidates if c.subject == arrays["subject"])
                    template_routes(settings, [run], [arrays], bundle.settings.model.normative_template, refuse=False)
                break
        patient_results = {b.name: evaluate_bundle(settings, b, patients, group_dir) for b in bundles}
        evaluate_detectors(settings, patients, bundles, items, subjects, group_dir, patient_results)


def evaluate_bundle(settings: Settings, bundle, patients: list[dict], group_dir: Path) -> list:
    """Per-subject AUROC/AUPRC/Dice for the ``patients`` (:func:`load_patients`: subjects with a
    dwi-space lesion mask); mean ± SD table.  Returns each patient's inference result (reused by
    the detection tables)."""
    from bids_uad.scoring.inference import evaluate, infer
    from bids_uad.workflows.group_evaluation import can_score

    rows, results = [], []
    for arrays in patients:
        truth = arrays["truth"]
        if not can_score(bundle, arrays):
            results.append(None)
            continue
        result = infer(bundle, arrays["dwi"], arrays["bvals"], arrays["bvecs"], arrays["brain_mask"],
                       arrays["analysis_mask"], route=arrays.get("route"))
        results.append(result)
        metrics = evaluate(result.score, truth, arrays["analysis_mask"], bundle.name, bundle.settings.scoring,
                           bundle.calibration())
        row = {"participant_id": f"sub-{arrays['subject']}", "session": arrays.get("session") or "n/a",
               "auroc": metrics["auroc"], "auprc": metrics["auprc"]}
        for method, value in metrics["dice"].items():
            row[f"dice_{method}"] = value
        for method, value in metrics["dice_written"].items():
            row[f"dice_written_{method}"] = value
        rows.append(row)
    if not rows:
        LOGGER.info("%s: no subject with a dwi-space lesion mask: evaluation skipped", bundle.name)
        return results
    write_tsv(outputs.group_path(settings.output_dir, "evaluation_tsv", model=bundle.name), rows)
    columns = [c for c in rows[0] if c not in ("participant_id", "session")]
    summary = []
    for c in columns:
        values = np.array([r[c] for r in rows if r.get(c) is not None], float)
        values = values[np.isfinite(values)]
        summary.append({"metric": c, "mean": values.mean() if values.size else None,
                        "sd": values.std(ddof=1) if values.size > 1 else None, "n": int(values.size)})
    write_tsv(outputs.group_path(settings.output_dir, "evaluation_summary_tsv", model=bundle.name), summary)
    auroc = next(s for s in summary if s["metric"] == "auroc")
    LOGGER.info("%s: AUROC %.3f over %d subjects", bundle.name, auroc["mean"] or float("nan"), auroc["n"])
    return results
