"""The participant graph (workflows/base.py): what travels along its edges."""
from __future__ import annotations

from dataclasses import replace

import numpy as np

from bids_uad.bids.layout import BIDSInputs
from bids_uad.cli.run import settings_from_args
from bids_uad.models.settings import preset
from bids_uad.training.fit import train_from_dwi
from bids_uad.training.toydata import fibonacci_directions, make_toy_subject
from bids_uad.workflows.base import collect_participant_inputs, init_participant_wf
from tests.conftest import build_small_bids


def _model_file(folder, bvalue: float = 1000.0):
    """A real (fitted, calibrated, validated) model file: the graph is built only for valid models."""
    bvecs = fibonacci_directions(12)
    subjects = [make_toy_subject((12, 12, 10), bvecs, 100 + i) for i in range(3)]
    raws = [np.concatenate([1000.0 * s.mask[..., None], 1000.0 * s.mask[..., None] * s.data], -1)
            for s in subjects]
    s = preset("quick", "meansignal")
    s = replace(s, model=replace(s.model, grid=(16, 16, 12), n_channels=12))
    bundle = train_from_dwi(s, raws, [np.r_[0.0, np.full(12, bvalue)]] * 3,
                            [np.vstack([[0, 0, 0], bvecs])] * 3, [x.mask for x in subjects],
                            [f"c{i}" for i in range(3)])
    bundle.save(folder)


def _edges(workflow) -> set[tuple[str, str, str, str]]:
    return {(src.name, dst.name, a, b) for src, dst, data in workflow._graph.edges(data=True)
            for a, b in data["connect"]}


def _pat01_plan(tmp_path, second_session: str | None = None):
    """Settings (``--model``, a fresh output folder) and plan of sub-pat01 of a small dataset,
    with a copy of its session as ``second_session`` when given."""
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    if second_session:
        _add_session(bids, "pat01", "pre", second_session)
    models = tmp_path / "models"
    models.mkdir()
    _model_file(models)
    settings = settings_from_args([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                                   "--participant-label", "pat01", "--nprocs", "1", "--model", str(models)])
    return settings, collect_participant_inputs(settings, BIDSInputs(bids), ["pat01"])


def test_template_maps_take_the_transforms_of_the_same_graph(tmp_path):
    """With --model on a fresh output folder, the template-space anomaly maps must wait for the
    anatomical transforms: they come along edges, not from OUTPUT_DIR at whatever time the node runs."""
    settings, plan = _pat01_plan(tmp_path)
    edges = _edges(init_participant_wf(settings, plan))
    anat = next(e[0] for e in edges if e[0].startswith("anat_sub_pat01"))
    anomaly = next(e[1] for e in edges if e[1].startswith("anomaly_sub_pat01"))
    assert (anat, anomaly, "outputnode.dwi2t1w_composite", "inputnode.dwi2t1w_xfm") in edges
    assert (anat, anomaly, "outputnode.t1w2mni_composite", "inputnode.t1w2template_xfm") in edges
    # the way back, for a template-space model's z map (the normative model)
    assert (anat, anomaly, "outputnode.t1w2dwi_composite", "inputnode.t1w2dwi_xfm") in edges
    assert (anat, anomaly, "outputnode.mni2t1w_composite", "inputnode.template2t1w_xfm") in edges
    # the findings' deviation signature takes the run's tensor maps and the dwi-space tissue classes
    dwi = next(e[0] for e in edges if e[1] == anomaly and e[2] == "outputnode.fa")
    for field in ("fa", "md", "ad", "rd"):
        assert (dwi, anomaly, f"outputnode.{field}", f"inputnode.{field}") in edges
    assert (anat, anomaly, "outputnode.dwi_dseg", "inputnode.dseg") in edges


def test_findings_min_volume_reaches_the_findings_node(tmp_path):
    from bids_uad.workflows.anomaly import init_anomaly_wf

    models = tmp_path / "models"
    models.mkdir()
    _model_file(models)
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    settings = settings_from_args([str(bids), str(tmp_path / "out"), "participant", "--model", str(models),
                                   "--findings-min-volume", "0.2"])
    node = init_anomaly_wf(settings).get_node("findings_meansignal")
    assert node.inputs.min_volume_ml == 0.2
    default = settings_from_args([str(bids), str(tmp_path / "out"), "participant", "--model", str(models)])
    assert init_anomaly_wf(default).get_node("findings_meansignal").inputs.min_volume_ml == -1.0  # the model's


def test_runs_a_model_cannot_score_are_refused_before_any_work(tmp_path):
    """--model trained on other shells than a run's: exit 16 at start-up naming the .bval and the
    model, not a crash of the inference step after the whole preprocessing."""
    import pytest

    from bids_uad.errors import InputValidationError

    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    models = tmp_path / "models"
    models.mkdir()
    _model_file(models, bvalue=2000.0)
    settings = settings_from_args([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                                   "--participant-label", "pat01", "--nprocs", "1", "--model", str(models)])
    plan = collect_participant_inputs(settings, BIDSInputs(bids), ["pat01"])
    with pytest.raises(InputValidationError) as err:
        init_participant_wf(settings, plan)
    assert "not in the model's reference shells [2000] of model-meansignal.json" in str(err.value)
    assert err.value.path.endswith(".bval")
    assert err.value.exit_code == 16


def test_one_controls_reference_serves_the_findings_of_every_model(tmp_path):
    """With a template-space normative model among --model, one node carries its controls' values to the
    run's dwi grid (along the same transform edges as the normative score) and every model's findings
    take it; without one, the node says so and the findings use the subject's tissue."""
    from bids_uad.workflows.anomaly import init_anomaly_wf
    from tests.interfaces.test_findings_interface import _normative_model_file

    models = tmp_path / "models"
    models.mkdir()
    _model_file(models)
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    args = [str(bids), str(tmp_path / "out"), "participant", "--model", str(models)]
    workflow = init_anomaly_wf(settings_from_args(args))
    assert workflow.get_node("controls_reference").inputs.model_file == ""
    _normative_model_file(models)
    workflow = init_anomaly_wf(settings_from_args(args))
    node = workflow.get_node("controls_reference")
    assert node.inputs.model_file.endswith("model-normative.json")
    edges = _edges(workflow)
    for field in ("dwi2t1w_xfm", "t1w2template_xfm", "t1w2dwi_xfm", "template2t1w_xfm"):
        assert ("inputnode", "controls_reference", field, field) in edges
    for model in ("meansignal", "normative"):
        assert ("controls_reference", f"findings_{model}", "out_file", "controls_reference") in edges
        assert ("controls_reference", f"findings_{model}", "meta", "controls_meta") in edges
    # a run the normative model cannot score (skipped): the reference node still names the model, and
    # finds no transforms at run time (its sidecar says why) instead of claiming there is no such model
    skipped = init_anomaly_wf(settings_from_args(args), skip=("normative",))
    assert skipped.get_node("controls_reference").inputs.model_file.endswith("model-normative.json")


def _add_session(bids, subject: str, old: str, new: str) -> None:
    """A copy of session ``old`` of ``subject`` as session ``new`` (names and IntendedFor renamed)."""
    src = bids / f"sub-{subject}" / f"ses-{old}"
    for path in sorted(p for p in src.rglob("*") if p.is_file()):
        target = bids / f"sub-{subject}" / f"ses-{new}" / path.relative_to(src).parent / path.name.replace(
            f"ses-{old}", f"ses-{new}")
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".json":
            target.write_text(path.read_text().replace(f"ses-{old}", f"ses-{new}"))
        else:
            target.write_bytes(path.read_bytes())


def test_longitudinal_comparison_waits_for_every_derivative_it_could_read(tmp_path):
    """The comparison reads the sessions' derivatives from OUTPUT_DIR: it must come after every
    sink of both sessions (it once followed the anomaly workflow's mask and findings merges only,
    and read the baseline before its score maps were written)."""
    import networkx as nx

    from bids_uad.interfaces.derivatives import DerivativesDataSink

    settings, plan = _pat01_plan(tmp_path, second_session="post")
    flat = init_participant_wf(settings, plan)._create_flat_graph()
    names = {node: node.fullname for node in flat.nodes}
    files = {name.rsplit(".", 1)[1]: n for n, name in names.items() if ".longitudinal_sub_pat01." in name
             and (name.endswith(".baseline_files") or ".followup_files_" in name)}
    assert sorted(files) == ["baseline_files", "followup_files_pre"], sorted(names.values())  # "post" sorts first
    sinks = [n for n in flat.nodes if isinstance(n.interface, DerivativesDataSink)
             and ".longitudinal_" not in names[n]]
    kinds = {names[n].split(".")[1].split("_")[0] for n in sinks}
    assert {"anat", "dwi", "anomaly"} <= kinds
    for sink in sinks:  # each session's sinks come before the node that reads that session
        reader = files["followup_files_pre"] if "_ses_pre" in names[sink] else files["baseline_files"]
        assert nx.has_path(flat, sink, reader), names[sink]
    assert any("ds_anomaly_score_" in names[n] and "_ses_post" in names[n] for n in sinks)
