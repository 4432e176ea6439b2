"""The participant graph (workflows/base.py): what travels along its edges."""
from __future__ import annotations

from bids_uad.bids.layout import BIDSInputs
from bids_uad.cli.run import settings_from_args
from bids_uad.workflows.base import collect_participant_inputs, init_participant_wf
from tests.conftest import build_small_bids


def _edges(workflow) -> set[tuple[str, str, str, str]]:
    return {(src.name, dst.name, a, b) for src, dst, data in workflow._graph.edges(data=True)
            for a, b in data["connect"]}


def test_template_maps_take_the_transforms_of_the_same_graph(tmp_path):
    """With --model on a fresh output folder, the template-space anomaly maps must wait for the
    anatomical transforms: they come along edges, not from OUTPUT_DIR at whatever time the node runs."""
    bids = build_small_bids(tmp_path / "bids", n_controls=3, n_patients=1)
    models = tmp_path / "models"
    models.mkdir()
    (models / "model-dae.json").write_text("{}")
    (models / "model-dae.safetensors").write_bytes(b"")
    settings = settings_from_args([str(bids), str(tmp_path / "out"), "participant", "-w", str(tmp_path / "w"),
                                   "--participant-label", "pat01", "--nprocs", "1", "--model", str(models)])
    plan = collect_participant_inputs(settings, BIDSInputs(bids), ["pat01"])
    edges = _edges(init_participant_wf(settings, plan))
    anat = next(e[0] for e in edges if e[0].startswith("anat_sub_pat01"))
    anomaly = next(e[1] for e in edges if e[1].startswith("anomaly_sub_pat01"))
    assert (anat, anomaly, "outputnode.dwi2t1w_composite", "inputnode.dwi2t1w_xfm") in edges
    assert (anat, anomaly, "outputnode.t1w2mni_composite", "inputnode.t1w2template_xfm") in edges
