"""What the networks' score reference buys: raw score vs referred (best fold) vs referred fold ensemble.

Reads a finished group level (its ``models/`` and the participant level's derivatives in the same
OUTPUT_DIR) and the patients' lesion masks, and scores every patient with each referred network
three ways, from the *same* fold networks:

* ``raw`` — the best fold's reconstruction score before the reference (what the networks wrote
  before :mod:`bids_uad.models.normaliser`), thresholded by nothing (AUPRC/AUROC only);
* ``referred`` — the best fold's positive robust z against its controls' scores in the template;
* ``referred-ensemble`` — the folds' z averaged and put back on one fold's null scale
  (:func:`bids_uad.models.normaliser.ensemble_z`; the group level's default for these models);

next to the model files' baselines (``normative``, ``meansignal``) scored by the same code on
the same voxels.  ``--reductions``: also each other score reduction (``model.score_reduction``,
e.g. ``sum``, the signed score) of the same fold networks, their references refitted from the
controls for it (:func:`refitted`), as a referred ensemble; no Dice for those (the model file's
threshold was calibrated for its own score).  Prints a table (AUPRC, AUROC, written-map Dice,
per lesion type) and keeps it in ``benchmarks/results/score_reference_<name>.{json,md}``.  No timing is reported beyond wall
time: scoring only.

    python benchmarks/score_reference.py BIDS_DIR OUTPUT_DIR --lesion-masks DIR --name demo [--reductions sum]
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _measure import markdown_table, publish  # noqa: E402

from bids_uad.models import has_score_reference  # noqa: E402
from bids_uad.models.bundle import load_bundle, score_volume  # noqa: E402
from bids_uad.models.inputs import from_grid, route_on_grid  # noqa: E402
from bids_uad.models.normaliser import ScoreNormaliser  # noqa: E402
from bids_uad.models.settings import needs_template  # noqa: E402
from bids_uad.scoring.inference import prepare_for  # noqa: E402


def raw_score(bundle, arrays: dict) -> np.ndarray:
    """The best fold's raw reconstruction score of one patient, in its dwi grid (analysis mask)."""
    prepared = prepare_for(bundle, arrays["dwi"], arrays["bvals"], arrays["bvecs"], arrays["brain_mask"])
    score = score_volume(bundle.folds[bundle.best_fold()].model, prepared.data, raw=True)
    return np.where(np.asarray(arrays["analysis_mask"]) > 0, from_grid(score, prepared.grid_map), 0)


def refitted(bundle, reduction: str, settings, bids):
    """A copy of ``bundle`` whose fold networks score with ``reduction``, their score references
    refitted for it from the training controls as the group level fits them."""
    from dataclasses import replace

    from bids_uad.training.normalise import fit_score_normalisers
    from bids_uad.workflows.group import baseline_derivatives, template_routes

    model = replace(bundle.settings.model, score_reduction=reduction)  # validated: "sum" needs a reference
    out = copy.deepcopy(bundle)
    out.settings = replace(out.settings, model=model)
    for fold in out.folds:
        fold.model.settings = model
        fold.model.normaliser = ScoreNormaliser(model)
    found = [baseline_derivatives(settings, bids, subject) for subject in out.subjects]
    if any(f is None for f in found):
        raise SystemExit("a training control's derivatives are missing: cannot refit the score reference")
    items = [f.load() for f in found]
    routes = template_routes(settings, found, items, model.normative_template)
    prepared = [prepare_for(out, i["dwi"], i["bvals"], i["bvecs"], i["brain_mask"]) for i in items]
    fit_score_normalisers(out.folds, [p.data for p in prepared],
                          [route_on_grid(r, p.grid_map) for r, p in zip(routes, prepared)])
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bids_dir", type=Path)
    parser.add_argument("output_dir", type=Path, help="a finished group level's OUTPUT_DIR")
    parser.add_argument("--lesion-masks", type=Path, required=True)
    parser.add_argument("--name", default="run", help="results file suffix")
    parser.add_argument("--reductions", nargs="*", default=[], choices=["abs-sum", "sum-abs", "sum"],
                        help="also score the referred networks with these score reductions (reference refitted)")
    args = parser.parse_args(argv)

    from bids_uad.bids.layout import BIDSInputs
    from bids_uad.cli.run import settings_from_args
    from bids_uad.scoring.evaluation import evaluate_detector
    from bids_uad.scoring.inference import infer
    from bids_uad.workflows.group import baseline_derivatives, select_controls, template_routes
    from bids_uad.workflows.group_evaluation import _case, can_score, load_patients

    started = time.perf_counter()
    settings = settings_from_args([str(args.bids_dir), str(args.output_dir), "group", "-w",
                                   str(args.output_dir / ".score_reference_work"), "--lesion-masks",
                                   str(args.lesion_masks)])
    bids = BIDSInputs(settings.bids_dir, validate=False)
    controls = select_controls(settings, bids)
    found = [baseline_derivatives(settings, bids, s) for s in bids.subjects() if s not in controls]
    found = [f for f in found if f is not None]
    patients = load_patients(settings, found)
    if not patients:
        raise SystemExit(f"no patient with a lesion mask under {args.lesion_masks}")
    rows = []
    for path in sorted((args.output_dir / "models").glob("model-*.json")):
        bundle = load_bundle(path)
        name = bundle.name
        if needs_template(bundle.settings.model):
            template_routes(settings, found, patients, bundle.settings.model.normative_template, refuse=False)
        ways = {name: (bundle, None)}
        if has_score_reference(name) and needs_template(bundle.settings.model):
            own = bundle.settings.model.score_reduction
            ways = {f"{name} raw": (bundle, "raw"), f"{name} referred": (bundle, False),
                    f"{name} referred-ensemble": (bundle, True)}
            ways.update({f"{name} referred-ensemble [{r}]": (refitted(bundle, r, settings, bids), True)
                         for r in args.reductions if r != own})
        elif has_score_reference(name):
            continue  # a network trained without its reference: nothing to compare
        if bundle.settings.model.network_space == "template":
            raise SystemExit(f"{path}: the {name} network works on the template grid (--network-space template, the "
                             "default); this benchmark compares dwi-grid networks' raw and referred scores: train "
                             "with --network-space dwi")
        for label, (scored, how) in ways.items():
            cases = []
            for arrays in patients:
                if not can_score(bundle, arrays):  # no transforms to the template: left out, with a warning
                    continue
                if how == "raw":
                    cases.append(_case(arrays, raw_score(bundle, arrays)))
                    continue
                res = infer(scored, arrays["dwi"], arrays["bvals"], arrays["bvecs"], arrays["brain_mask"],
                            arrays["analysis_mask"], ensemble=how, route=arrays.get("route"))
                cases.append(_case(arrays, res.score, res.mask if scored is bundle else None, bundle))
            r = evaluate_detector(cases, [])
            row = {"detector": label, "auprc": round(r["auprc"], 4), "auroc": round(r["auroc"], 4),
                   "dice_written": None if how == "raw" or not np.isfinite(r["dice_calibrated"])
                   else round(r["dice_calibrated"], 4)}
            row.update({f"auprc_{t}": round(v["auprc"], 4) for t, v in r["by_type"].items()})
            rows.append(row)
            print(row, flush=True)
    result = {"benchmark": "score_reference", "name": args.name, "date": time.strftime("%Y-%m-%d %H:%M"),
              "machine": f"{platform.machine()}, {os.cpu_count()} cores", "output_dir": str(args.output_dir),
              "patients": len(patients), "wall_s": round(time.perf_counter() - started, 1),
              "load_1min_end": round(os.getloadavg()[0], 2), "rows": rows}
    md = (f"# Networks' score reference: raw vs referred vs ensemble ({args.name}, {result['date']})\n\n"
          f"{len(patients)} patients, models in `{args.output_dir}/models`; the same fold networks scored "
          "three ways (and with other score reductions, `[...]`, references refitted); Dice of the written "
          "map (the model file's threshold), none for the raw score and the refitted ones.\n\n"
          + markdown_table(rows))
    return publish(f"score_reference_{args.name}", result, md)


if __name__ == "__main__":
    raise SystemExit(main())
