"""End-to-end run of the diffusion preprocessing workflow on a tiny phantom series (Linear plugin)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage

nib = pytest.importorskip("nibabel")

from bids_uad.algorithms.sdc import distort  # noqa: E402
from bids_uad.config import Settings  # noqa: E402
from bids_uad.workflows.dwi import init_dwi_preproc_wf  # noqa: E402

TRT = 0.04


def make_series(root: Path, with_rpe: bool = True, shape=(28, 32, 20), n_dirs=12, seed=0):
    """A small distorted, moved DWI series (j-) and a reverse-PE b0 (j) in a BIDS layout."""
    rng = np.random.default_rng(seed)
    g = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    r = np.sqrt((g[0] / 0.75) ** 2 + (g[1] / 0.8) ** 2 + (g[2] / 0.8) ** 2)
    brain = r < 1
    s0 = ndimage.gaussian_filter(brain * (1 + 0.3 * ndimage.gaussian_filter(rng.standard_normal(shape), 1.5) * 3), 1)
    s0 = (s0 * 1000).astype(np.float32)
    dirs = rng.standard_normal((n_dirs, 3))
    dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    bvals = np.r_[0.0, np.full(n_dirs, 1000.0)]
    bvecs = np.r_[np.zeros((1, 3)), dirs]
    fibre = np.array([1.0, 0.0, 0.0])
    evals = (1.5e-3, 0.4e-3)
    field = (40 * np.exp(-((g[0] - 0.1) ** 2 + (g[1] - 0.3) ** 2 + g[2] ** 2) / 0.3)).astype(np.float32)
    vols = []
    for b, d in zip(bvals, bvecs):
        adc = evals[1] + (evals[0] - evals[1]) * (d @ fibre) ** 2
        clean = s0 * np.exp(-b * adc)
        shift = rng.normal(0, 0.3, 3) if b > 0 else np.zeros(3)
        moved = ndimage.shift(clean, shift, order=1)
        vols.append(distort(moved, field, 1, -TRT))
    data = np.stack(vols, -1) + rng.normal(0, 5, shape + (len(bvals),)).astype(np.float32)
    affine = np.diag([3.0, 3.0, 3.0, 1.0])
    dwi_dir = root / "sub-01" / "ses-pre" / "dwi"
    dwi_dir.mkdir(parents=True)
    base = dwi_dir / "sub-01_ses-pre_dir-AP_dwi"
    nib.save(nib.Nifti1Image(np.clip(data, 0, None), affine), str(base) + ".nii.gz")
    (Path(str(base) + ".bval")).write_text(" ".join(f"{b:g}" for b in bvals) + "\n")
    (Path(str(base) + ".bvec")).write_text("\n".join(" ".join(f"{v:.6f}" for v in row) for row in bvecs.T) + "\n")
    meta = {"PhaseEncodingDirection": "j-", "TotalReadoutTime": TRT}
    (Path(str(base) + ".json")).write_text(json.dumps(meta))
    out = {"dwi": str(base) + ".nii.gz", "bval": str(base) + ".bval", "bvec": str(base) + ".bvec",
           "meta": meta, "rpe": "", "rpe_meta": {}, "field": field, "mask": brain}
    if with_rpe:
        fmap = root / "sub-01" / "ses-pre" / "fmap"
        fmap.mkdir(parents=True)
        rpe = fmap / "sub-01_ses-pre_dir-PA_epi.nii.gz"
        pa = distort(s0, field, 1, TRT) + rng.normal(0, 5, shape).astype(np.float32)
        nib.save(nib.Nifti1Image(np.clip(pa, 0, None), affine), str(rpe))
        rmeta = {"PhaseEncodingDirection": "j", "TotalReadoutTime": TRT}
        (fmap / "sub-01_ses-pre_dir-PA_epi.json").write_text(json.dumps(rmeta))
        out.update(rpe=str(rpe), rpe_meta=rmeta)
    return out


def _settings(tmp_path, backend="python"):
    return Settings(bids_dir=tmp_path / "bids", output_dir=tmp_path / "out", analysis_level="participant",
                    work_dir=tmp_path / "work", preproc_backend=backend)


def _run(tmp_path, series):
    settings = _settings(tmp_path)
    wf = init_dwi_preproc_wf(settings)
    wf.base_dir = str(tmp_path / "work")
    i = wf.get_node("inputnode").inputs
    i.dwi_file, i.bval_file, i.bvec_file = series["dwi"], series["bval"], series["bvec"]
    i.dwi_metadata, i.rpe_file, i.rpe_metadata = series["meta"], series["rpe"], series["rpe_meta"]
    i.source_file = series["dwi"]
    wf.config["execution"]["crashdump_dir"] = str(tmp_path / "crash")
    graph = wf.run(plugin="Linear")
    return settings, graph


def test_workflow_writes_all_derivatives(tmp_path):
    series = make_series(tmp_path / "bids")
    settings, _ = _run(tmp_path, series)
    out = settings.output_dir / "sub-01" / "ses-pre" / "dwi"
    stem = "sub-01_ses-pre_dir-AP_space-dwi"
    expected = [f"{stem}_desc-preproc_dwi.nii.gz", f"{stem}_desc-preproc_dwi.bval", f"{stem}_desc-preproc_dwi.bvec",
                f"{stem}_desc-preproc_dwi.json", f"{stem}_desc-b0_dwiref.nii.gz", f"{stem}_desc-brain_mask.nii.gz",
                f"{stem}_desc-susceptibility_fieldmap.nii.gz", "sub-01_ses-pre_dir-AP_desc-motion_timeseries.tsv",
                "sub-01_ses-pre_dir-AP_desc-motion_timeseries.json"]
    expected += [f"{stem}_model-tensor_param-{p}_dwimap.nii.gz" for p in ("fa", "md", "ad", "rd", "s0")]
    for name in expected:
        assert (out / name).exists(), name
    # the raw dwi's dir-AP names every derivative (a second run, dir-PA, would get its own set)
    assert all("_dir-AP_" in p.name for p in out.iterdir())
    side = json.loads((out / f"{stem}_desc-preproc_dwi.json").read_text())
    assert side["Backend"] == "python"
    assert side["SusceptibilityDistortionCorrection"].startswith("TOPUP")
    tsv = (out / "sub-01_ses-pre_dir-AP_desc-motion_timeseries.tsv").read_text().splitlines()
    assert tsv[0].split("\t")[:7] == ["trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z",
                                      "framewise_displacement"]
    assert len(tsv) == 1 + 13
    field = nib.load(str(out / f"{stem}_desc-susceptibility_fieldmap.nii.gz")).get_fdata()
    m = series["mask"] & (ndimage.binary_erosion(series["mask"], iterations=2))
    assert np.median(np.abs(field - series["field"])[m]) * TRT < 0.3
    fa = nib.load(str(out / f"{stem}_model-tensor_param-fa_dwimap.nii.gz")).get_fdata()
    mask = nib.load(str(out / f"{stem}_desc-brain_mask.nii.gz")).get_fdata() > 0
    assert 0.55 < np.median(fa[mask & m]) < 0.82  # true FA of (1.5, .4, .4)e-3 is 0.686


def test_workflow_without_reverse_pe(tmp_path):
    series = make_series(tmp_path / "bids", with_rpe=False)
    settings, _ = _run(tmp_path, series)
    out = settings.output_dir / "sub-01" / "ses-pre" / "dwi"
    side = json.loads((out / "sub-01_ses-pre_dir-AP_space-dwi_desc-preproc_dwi.json").read_text())
    assert side["SusceptibilityDistortionCorrection"] == "None (no reverse phase-encoding image)"
    assert not list(out.glob("*fieldmap*"))
    assert (out / "sub-01_ses-pre_dir-AP_space-dwi_model-tensor_param-md_dwimap.nii.gz").exists()


def test_fsl_backend_chosen_when_installed(tmp_path, monkeypatch):
    import bids_uad.config as config

    monkeypatch.setenv("FSLDIR", "/opt/fsl")
    monkeypatch.setattr(config.shutil, "which", lambda p: f"/opt/fsl/bin/{p}")
    wf = init_dwi_preproc_wf(_settings(tmp_path, "auto"))
    assert "fsl_preproc" in wf.list_node_names()
    monkeypatch.delenv("FSLDIR")
    wf = init_dwi_preproc_wf(_settings(tmp_path, "auto"))
    assert "sdc" in wf.list_node_names() and "fsl_preproc" not in wf.list_node_names()


REAL = Path(__file__).resolve().parents[2] / ".." / "shared" / "realdata" / "xa30_dwi_apa"


@pytest.mark.slow
@pytest.mark.skipif(not REAL.exists(), reason="real xa30 pair not available")
def test_workflow_on_real_ap_pa_series(tmp_path):
    """Real AP dwi series with the PA dwi series as reverse-PE image (b0 picked from its .bval)."""
    ap, pa = REAL / "17_DWI_dir80_AP", REAL / "10_DWI_dir80_PA"
    series = {"dwi": f"{ap}.nii.gz", "bval": f"{ap}.bval", "bvec": f"{ap}.bvec",
              "meta": json.loads(Path(f"{ap}.json").read_text()), "rpe": f"{pa}.nii.gz",
              "rpe_meta": json.loads(Path(f"{pa}.json").read_text())}
    (tmp_path / "bids").mkdir()
    settings, _ = _run(tmp_path, series)
    out = settings.output_dir / "sub-01" / "ses-pre" / "dwi"
    raw = [p for p in (tmp_path / "work").rglob("sdc_raw_*.nii.gz")]
    cor = [p for p in (tmp_path / "work").rglob("sdc_cor_*.nii.gz")]
    mask = nib.load(str(out / "sub-01_ses-pre_dir-AP_space-dwi_desc-brain_mask.nii.gz")).get_fdata() > 0

    def corr(files):
        a, b = (nib.load(str(f)).get_fdata() for f in sorted(files))
        return np.corrcoef(a[mask], b[mask])[0, 1]

    assert corr(cor) > corr(raw) + 0.1
    fa = nib.load(str(out / "sub-01_ses-pre_dir-AP_space-dwi_model-tensor_param-fa_dwimap.nii.gz")).get_fdata()
    assert 0.1 < np.median(fa[mask]) < 0.6


@pytest.mark.slow
def test_workflow_on_generated_synthetic_subject(tmp_path):
    """One tiny subject of bids_uad.synthetic: field and motion against the truth folder."""
    from bids_uad.synthetic import generate_dataset

    bids = generate_dataset(tmp_path / "bids", preset="tiny", n_controls=1, n_patients=0,
                            no_reverse_pe_fraction=0, progress=False, n_jobs=1)
    base = bids / "sub-ctrl01" / "ses-pre"
    dwi = base / "dwi" / "sub-ctrl01_ses-pre_dir-AP_dwi"
    rpe = base / "fmap" / "sub-ctrl01_ses-pre_dir-PA_epi"
    settings = Settings(bids_dir=bids, output_dir=tmp_path / "out", analysis_level="participant",
                        work_dir=tmp_path / "work", preproc_backend="python")
    wf = init_dwi_preproc_wf(settings)
    wf.base_dir = str(tmp_path / "work")
    i = wf.get_node("inputnode").inputs
    i.dwi_file, i.bval_file, i.bvec_file = f"{dwi}.nii.gz", f"{dwi}.bval", f"{dwi}.bvec"
    i.dwi_metadata = json.loads(Path(f"{dwi}.json").read_text())
    i.rpe_file, i.rpe_metadata = f"{rpe}.nii.gz", json.loads(Path(f"{rpe}.json").read_text())
    i.source_file = f"{dwi}.nii.gz"
    wf.run(plugin="Linear")
    out = settings.output_dir / "sub-ctrl01" / "ses-pre" / "dwi"
    truth = bids / "derivatives" / "synthetic-truth" / "sub-ctrl01" / "ses-pre" / "dwi"
    mask = nib.load(str(truth / "sub-ctrl01_ses-pre_space-dwi_desc-brain_mask.nii.gz")).get_fdata() > 0
    trt = i.dwi_metadata["TotalReadoutTime"]
    est = nib.load(str(out / "sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-susceptibility_fieldmap.nii.gz")).get_fdata()
    true = nib.load(str(truth / "sub-ctrl01_ses-pre_desc-susceptibility_fieldmap.nii.gz")).get_fdata()
    assert np.median(np.abs(est - true)[mask]) * trt < 0.2
    import csv

    def read(path):
        with open(path) as handle:
            rows = list(csv.DictReader(handle, delimiter="\t"))
        return np.array([[float(r[c]) for c in ("trans_x", "trans_y", "trans_z", "rot_x", "rot_y", "rot_z")]
                         for r in rows])

    m_est = read(out / "sub-ctrl01_ses-pre_dir-AP_desc-motion_timeseries.tsv")
    m_true = read(truth / "sub-ctrl01_ses-pre_desc-motion_timeseries.tsv")
    assert np.abs(m_est[:, :3] - m_true[:, :3]).mean() < 0.6  # 4 mm voxels
    assert np.rad2deg(np.abs(m_est[:, 3:] - m_true[:, 3:])).mean() < 0.4
    mask_est = nib.load(str(out / "sub-ctrl01_ses-pre_dir-AP_space-dwi_desc-brain_mask.nii.gz")).get_fdata() > 0
    assert 2 * (mask_est & mask).sum() / (mask_est.sum() + mask.sum()) > 0.9
