"""The group methods text is assembled from the training stage and the models' own descriptions."""
from __future__ import annotations

from bids_uad.reports.methods import build_group_methods


def _meta(n_subjects: int, k: int) -> dict:
    return {"training_subjects": [f"s{i}" for i in range(n_subjects)], "folds": [{}] * k,
            "settings": {"training": {"epochs": 5, "seed": 0}}}


def test_only_recdisc_is_said_to_train_on_synthetic_anomalies():
    text = build_group_methods({"dae": _meta(3, 3), "recdisc": _meta(3, 3)}, "0")["paragraphs"]
    dae = next(p for p in text if p.startswith("The dae model"))
    recdisc = next(p for p in text if p.startswith("The recdisc model"))
    assert "synthetic anomalies" not in dae and "variational autoencoder" in dae
    assert "synthetic anomalies" in recdisc
    assert "3 healthy control subject(s) with 3-fold cross-validation" in dae
