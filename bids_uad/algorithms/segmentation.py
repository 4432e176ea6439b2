"""Brain tissue segmentation (CSF/GM/WM), lateral ventricles and the analysis mask.

``segment_tissues`` runs Atropos (antspyx, in-process): k-means initialisation or, with
tissue priors warped from the template, prior-guided EM with an MRF term.  Classes are
ordered by mean T1w intensity (CSF < GM < WM), so labels follow BIDS-derivative ``dseg``
conventions: 1 CSF, 2 GM, 3 WM.  FSL FAST is chosen in the interface layer instead.
"""
from __future__ import annotations

import contextlib

import logging

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from bids_uad.algorithms.masking import bounding_box, subgrid_affine
from bids_uad.algorithms.registration import configure_ants, from_ants, to_ants

LOGGER = logging.getLogger(__name__)

#: dseg label values and names (the dseg.tsv content).
LABELS = {1: "CSF", 2: "GM", 3: "WM"}
CLASS_ORDER = ("CSF", "GM", "WM")


#: Atropos' ``--use-random-seed``: 0 is its constant seed (1, its default, seeds from the clock)
ATROPOS_RANDOM_SEED = 0
#: voxels kept around the mask's bounding box when Atropos runs on it (:func:`segment_tissues`)
ATROPOS_MARGIN = 10


def dseg_tsv_rows() -> list[dict]:
    """Rows of the ``dseg.tsv`` look-up table (index, name)."""
    return [{"index": k, "name": v} for k, v in LABELS.items()]


def segment_tissues(
    img: nib.Nifti1Image,
    mask: nib.Nifti1Image | np.ndarray,
    priors: dict | None = None,
    prior_weight: float = 0.25,
    mrf: float = 0.2,
    iterations: int = 3,
    seed: int | None = 0,
    threads: int = 1,
) -> tuple[nib.Nifti1Image, dict[str, nib.Nifti1Image]]:
    """Three-class segmentation inside ``mask``; returns (dseg, {"CSF","GM","WM": probseg}).

    ``priors``: {"CSF","GM","WM": nibabel image on the same grid}, e.g. template priors
    warped to the subject; used as Atropos prior probability images.

    Atropos runs with its constant random seed (``--use-random-seed 0``): its default seeds
    from the clock and reads neither ``--random-seed`` nor ``ANTS_RANDOM_SEED``, so the same
    call gave different tissue probabilities in every process (measured on the tiny study's
    T1w with priors, one thread: up to 1.0 apart, 0.3 % of the voxels by more than 0.01; with
    the constant seed three processes were identical).  ``seed`` therefore does not change
    Atropos' result; it still seeds ANTs elsewhere (:func:`configure_ants`).
    """
    import ants

    configure_ants(threads, seed)
    mask_arr = np.asarray(mask.dataobj if hasattr(mask, "dataobj") else mask) > 0
    data = np.asarray(img.dataobj, dtype=np.float32)
    # Atropos only labels voxels of the mask (its MRF neighbourhood reaches one voxel beyond):
    # it runs on the mask's bounding box, the same result on fewer voxels (paper-geometry T1w,
    # one thread: 28.8 s instead of 30.2 s, probabilities identical).  The margin is wide
    # because ITK's neighbourhood iterators take a slow, bounds-checked path near the grid's
    # edge: with 2 voxels it took 32.5 s.
    box = bounding_box(mask_arr, margin=ATROPOS_MARGIN)
    affine = subgrid_affine(img.affine, box)
    aimg = to_ants(nib.Nifti1Image(np.ascontiguousarray(data[box]), affine))
    amask = to_ants(nib.Nifti1Image(mask_arr[box].astype(np.float32), affine))
    m = f"[{mrf},1x1x1]"
    c = f"[{int(iterations)},0]"
    with _private_tempdir():  # ants.atropos leaves its probability files in the temp folder
        if priors:
            init = [to_ants(nib.Nifti1Image(
                np.ascontiguousarray(np.asarray(_load(priors[k]).dataobj, dtype=np.float32)[box]), affine))
                for k in CLASS_ORDER]
            res = ants.atropos(a=aimg, x=amask, i=init, m=m, c=c, priorweight=prior_weight, r=ATROPOS_RANDOM_SEED)
        else:
            res = ants.atropos(a=aimg, x=amask, i="Kmeans[3]", m=m, c=c, r=ATROPOS_RANDOM_SEED)
        probs = []
        for p in res["probabilityimages"]:
            full = np.zeros(data.shape[:3], dtype=np.float32)
            full[box] = p.numpy()
            probs.append(full)
    if not priors:  # k-means classes: order by mean intensity (CSF darkest on T1w)
        means = [float((p[mask_arr] * data[mask_arr]).sum() / max(p[mask_arr].sum(), 1e-6)) for p in probs]
        probs = [probs[i] for i in np.argsort(means)]
    stack = np.stack(probs)
    dseg = (np.argmax(stack, axis=0) + 1).astype(np.int16) * mask_arr
    out_probs = {}
    for name, p in zip(CLASS_ORDER, probs):
        out_probs[name] = nib.Nifti1Image((p * mask_arr).astype(np.float32), img.affine)
    dseg_img = nib.Nifti1Image(dseg.astype(np.int16), img.affine)
    dseg_img.set_data_dtype(np.int16)
    return dseg_img, out_probs


@contextlib.contextmanager
def _private_tempdir():
    """Point :mod:`tempfile` at a fresh folder for the block and remove it afterwards.

    ``ants.atropos`` writes its prior and posterior probability images under
    ``tempfile.gettempdir()`` and never deletes them (about 0.8 MB per class per call).
    """
    import tempfile

    previous = tempfile.tempdir
    with tempfile.TemporaryDirectory(prefix="bids_uad-atropos-") as folder:
        tempfile.tempdir = folder
        try:
            yield folder
        finally:
            tempfile.tempdir = previous


def _load(obj):
    if isinstance(obj, nib.spatialimages.SpatialImage):
        return obj
    return nib.load(str(obj))


def ventricle_mask(dseg: np.ndarray, prior: np.ndarray, threshold: float = 0.3,
                   min_overlap: float = 0.5) -> np.ndarray:
    """Lateral ventricles: CSF voxels where the warped ventricle prior exceeds ``threshold``.

    Connected CSF components are kept when at least ``min_overlap`` of their voxels lie in
    the prior region, so a ventricle displaced by mass effect is kept whole while sulcal
    CSF next to the prior is not.
    """
    csf = np.asarray(dseg) == 1
    region = np.asarray(prior) > threshold
    core = csf & region
    labels, n = ndi.label(csf)
    if n == 0:
        return core
    inside = ndi.sum(core, labels, range(1, n + 1))
    sizes = ndi.sum(csf, labels, range(1, n + 1))
    keep_ids = np.flatnonzero(inside >= min_overlap * np.maximum(sizes, 1)) + 1
    whole = np.isin(labels, keep_ids)
    return core | whole


def analysis_mask(dseg: np.ndarray, ventricles: np.ndarray | None = None) -> np.ndarray:
    """Where anomalies are scored: GM ∪ WM, minus the ventricles."""
    out = np.isin(np.asarray(dseg), (2, 3))
    if ventricles is not None:
        out &= ~(np.asarray(ventricles) > 0)
    return out


def fast_to_dseg(fast_seg: np.ndarray) -> np.ndarray:
    """FSL FAST 3-class T1w labels (1 CSF, 2 GM, 3 WM) are already our dseg labels."""
    return np.asarray(fast_seg).astype(np.int16)


def dice_per_class(pred: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """Dice for CSF, GM, WM between two dseg arrays."""
    out = {}
    for value, name in LABELS.items():
        a, b = np.asarray(pred) == value, np.asarray(truth) == value
        denom = a.sum() + b.sum()
        out[name] = 1.0 if denom == 0 else float(2.0 * (a & b).sum() / denom)
    return out


#: initial class centres (FA, MD / median MD in the brain) of :func:`diffusion_tissue_classes`:
#: CSF (isotropic, fast), GM (low FA), WM (anisotropic); k-means then adapts them to the data
#: (b-value, scanner), so no absolute MD threshold is assumed.
DWI_CLASS_INIT = {"CSF": (0.10, 3.0), "GM": (0.15, 1.0), "WM": (0.50, 0.9)}


def diffusion_tissue_classes(fa: np.ndarray, md: np.ndarray, mask: np.ndarray,
                             iterations: int = 30) -> tuple[np.ndarray, dict]:
    """CSF/GM/WM labels (dseg 1/2/3) from the tensor maps alone, for subjects without a T1w.

    A 3-class k-means on (FA, MD relative to the brain's median MD), started from
    :data:`DWI_CLASS_INIT`; classes are then named by their centres (CSF: highest MD, WM:
    highest FA of the other two).  Returns (dseg, info with centres and volumes in voxels).
    """
    from scipy.cluster.vq import kmeans2

    mask = np.asarray(mask, bool) & np.isfinite(fa) & np.isfinite(md)
    dseg = np.zeros(mask.shape, np.uint8)
    if mask.sum() < 30:
        return dseg, {"error": "brain mask too small for tissue classes"}
    rel = np.asarray(md, float)[mask] / max(float(np.median(md[mask])), 1e-12)
    feats = np.stack([np.clip(np.asarray(fa, float)[mask], 0, 1), np.clip(rel, 0, 6)], 1)
    scale = feats.std(0) + 1e-9
    init = np.array([DWI_CLASS_INIT[c] for c in CLASS_ORDER]) / scale
    centres, labels = kmeans2(feats / scale, init, iter=iterations, minit="matrix", seed=0)
    centres = centres * scale
    csf = int(np.argmax(centres[:, 1]))
    rest = [k for k in range(3) if k != csf]
    wm = max(rest, key=lambda k: centres[k, 0])
    gm = next(k for k in rest if k != wm)
    mapping = {csf: 1, gm: 2, wm: 3}
    dseg[mask] = np.vectorize(mapping.get)(labels).astype(np.uint8)
    info = {"method": "3-class k-means on FA and MD/median(MD) in the brain mask",
            "centres": {LABELS[mapping[k]]: {"FA": round(float(centres[k, 0]), 3),
                                             "MDRelative": round(float(centres[k, 1]), 3)} for k in range(3)},
            "voxels": {LABELS[v]: int((dseg == v).sum()) for v in LABELS}}
    return dseg, info
