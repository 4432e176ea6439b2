"""Model inputs from preprocessed dwi arrays: normalise, reconcile gradients, fit the grid.

* :func:`normalise_dwi` divides each diffusion-weighted volume by the mean b0, clips to
  [0, 1], drops the b0s and masks.
* :func:`reconcile_gradients` puts channels in the model's reference direction order:
  a permutation when the directions match (antipodal directions are equal), otherwise a
  regularised spherical-harmonic fit per shell resampled onto the reference directions.
  A b-value the reference lacks (or the reverse) is an error.
* :func:`invariant_features` is the other input representation (``ModelSettings.inputs =
  "invariant"``): per b-value shell the mean dw ratio and the rotation-invariant power of each
  even spherical-harmonic order, then FA and MD.  These do not depend on the gradient
  directions, their number or order, or the head's orientation, only on the shells, so a model
  trained on one protocol reads another with the same shells without resampling.  ``"both"``
  gives the network the reconciled dw channels followed by these features
  (:func:`channel_layout`).
* :func:`to_grid` / :func:`from_grid` centre-pad or crop to the model grid and back exactly;
  :func:`grid_affine` gives the affine of the padded array.
* A network on the template grid (``ModelSettings.network_space = "template"``) sees each subject
  carried there through its own transforms (:func:`carry_to_template`): :func:`subject_grid` is the
  grid a subject's arrays are prepared on before that (its own dwi shape), and
  :func:`template_route` the identity route of arrays already on the template grid.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, replace

import numpy as np

from bids_uad.bids.gradients import B0_THRESHOLD
from bids_uad.errors import InputValidationError

LOG = logging.getLogger(__name__)


def normalise_dwi(dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
                  b0_threshold: float = B0_THRESHOLD) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Return (signal ratios X,Y,Z,C float32 in [0,1], masked; dw bvals (C,); dw bvecs (C,3))."""
    dwi = np.asarray(dwi)
    bvals = np.asarray(bvals, dtype=float).ravel()
    bvecs = _as_nx3(bvecs)
    if dwi.ndim != 4 or dwi.shape[-1] != bvals.size or bvecs.shape[0] != bvals.size:
        raise InputValidationError(
            f"dwi shape {dwi.shape} does not match {bvals.size} b-values / {bvecs.shape[0]} b-vectors")
    if mask.shape != dwi.shape[:3]:
        raise InputValidationError(f"mask shape {mask.shape} differs from dwi {dwi.shape[:3]}")
    b0 = bvals <= b0_threshold
    if not b0.any():
        raise InputValidationError("dwi has no b0 volume to normalise by")
    if b0.all():
        raise InputValidationError("dwi has no diffusion-weighted volume")
    mean_b0 = dwi[..., b0].astype(np.float32).mean(-1)
    inside = (mask > 0) & (mean_b0 > 0)
    out = np.zeros(dwi.shape[:3] + (int((~b0).sum()),), dtype=np.float32)
    out[inside] = dwi[inside][:, ~b0].astype(np.float32) / mean_b0[inside][:, None]
    np.clip(out, 0.0, 1.0, out=out)
    return out, bvals[~b0], bvecs[~b0]


def dw_gradients(bvals: np.ndarray, bvecs: np.ndarray, b0_threshold: float = B0_THRESHOLD
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Diffusion-weighted part (b0s removed) of a gradient table: (bvals (C,), bvecs (C, 3))."""
    bvals = np.asarray(bvals, dtype=float).ravel()
    keep = bvals > b0_threshold
    return bvals[keep], _as_nx3(bvecs)[keep]


def _as_nx3(bvecs: np.ndarray) -> np.ndarray:
    bvecs = np.asarray(bvecs, dtype=float)
    if bvecs.ndim == 2 and bvecs.shape[0] == 3 and bvecs.shape[1] != 3:
        bvecs = bvecs.T
    return bvecs


def _unit(v: np.ndarray) -> np.ndarray:
    n = np.linalg.norm(v, axis=1, keepdims=True)
    if np.any(n < 1e-6):
        raise InputValidationError("a diffusion-weighted volume has a zero b-vector")
    return v / n


def shells(bvals: np.ndarray, ref_shells: np.ndarray | None = None, rel_tol: float = 0.05,
           abs_tol: float = 50.0) -> tuple[np.ndarray, np.ndarray]:
    """Group b-values into shells; return (shell values, shell index per volume)."""
    bvals = np.asarray(bvals, float)
    if ref_shells is None:
        values: list[float] = []
        for b in np.sort(bvals):
            if not values or b - values[-1] > max(abs_tol, rel_tol * values[-1]):
                values.append(b)
        ref_shells = np.array([bvals[np.abs(bvals - v) <= max(abs_tol, rel_tol * v)].mean() for v in values])
    idx = np.full(bvals.size, -1)
    for k, v in enumerate(ref_shells):
        idx[np.abs(bvals - v) <= max(abs_tol, rel_tol * v)] = k
    return np.asarray(ref_shells), idx


def match_directions(dirs: np.ndarray, ref_dirs: np.ndarray, angle_tol_deg: float = 5.0) -> np.ndarray | None:
    """Index into ``dirs`` for each reference direction, or None if not a one-to-one match.

    Antipodal vectors are the same direction (|cos|).
    """
    if len(dirs) != len(ref_dirs):
        return None
    cos = np.abs(_unit(ref_dirs) @ _unit(dirs).T)
    order = cos.argmax(1)
    if len(set(order.tolist())) != len(order):
        return None
    if np.any(cos[np.arange(len(order)), order] < np.cos(np.deg2rad(angle_tol_deg))):
        return None
    return order


def sh_resampling_matrix(dirs: np.ndarray, ref_dirs: np.ndarray, sh_order_max: int | None = None,
                         smooth: float = 1e-4) -> np.ndarray:
    """Matrix M (n_ref, n_dirs) mapping signals on ``dirs`` to ``ref_dirs`` via an even SH fit.

    The fit uses dipy's real symmetric (Descoteaux) basis with Laplace-Beltrami
    regularisation ``smooth``; the order is the largest even order the directions support, at most 8.
    """
    from dipy.reconst.shm import real_sh_descoteaux

    n = len(dirs)
    if sh_order_max is None:
        sh_order_max = 0
        while sh_order_max < 8 and (sh_order_max + 3) * (sh_order_max + 4) // 2 <= n:
            sh_order_max += 2

    def basis(v):
        v = _unit(v)
        theta = np.arccos(np.clip(v[:, 2], -1, 1))
        phi = np.arctan2(v[:, 1], v[:, 0])
        b, _, l_values = real_sh_descoteaux(sh_order_max, theta, phi, legacy=False)
        return b, l_values

    b_src, l_values = basis(dirs)
    b_ref, _ = basis(ref_dirs)
    lb = (l_values * (l_values + 1)).astype(float) ** 2
    fit = np.linalg.solve(b_src.T @ b_src + smooth * np.diag(lb), b_src.T)
    return b_ref @ fit


def shell_mismatch(bvals: np.ndarray, ref_bvals: np.ndarray) -> str | None:
    """Why diffusion-weighted volumes of b-values ``bvals`` cannot feed a model of reference
    b-values ``ref_bvals`` (a shell on one side only), or None when the shells match.

    ``bvals`` without b0s (as the model's inputs).  Used at inference and, on the raw
    ``.bval`` files, at start-up, so that a run the model cannot score is refused before any work.
    """
    bvals = np.asarray(bvals, float).ravel()
    ref_shells, _ = shells(np.asarray(ref_bvals, float).ravel())
    _, idx = shells(bvals, ref_shells)
    if np.any(idx < 0):
        bad = sorted(set(np.round(bvals[idx < 0]).astype(int).tolist()))
        return f"b-values {bad} are not in the model's reference shells {np.round(ref_shells).astype(int).tolist()}"
    missing = [int(round(ref_shells[k])) for k in range(len(ref_shells)) if not np.any(idx == k)]
    if missing:
        return f"the data lack the model's b-value shell(s) {missing}"
    return None


def _match_shells(bvals: np.ndarray, ref_bvals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference shells, shell index of each reference volume, of each volume); a b-value the
    reference lacks, or a reference shell the data lack, raises :class:`InputValidationError`
    (:func:`shell_mismatch` says which)."""
    problem = shell_mismatch(bvals, ref_bvals)
    if problem:
        raise InputValidationError(problem)
    ref_shells, ref_idx = shells(ref_bvals)
    _, idx = shells(bvals, ref_shells)
    return ref_shells, ref_idx, idx


def reconcile_gradients(data: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray,
                        ref_bvals: np.ndarray, ref_bvecs: np.ndarray, angle_tol_deg: float = 5.0,
                        clip: bool = True) -> tuple[np.ndarray, str]:
    """Return (data with channels in the reference order (X,Y,Z,C_ref), method used).

    ``method`` is ``"identity"``, ``"permutation"`` or ``"sh"``.  b-values are compared
    shell by shell; a shell present on one side only raises :class:`InputValidationError`.
    """
    bvals = np.asarray(bvals, float).ravel()
    ref_bvals = np.asarray(ref_bvals, float).ravel()
    bvecs, ref_bvecs = _as_nx3(bvecs), _as_nx3(ref_bvecs)
    if data.shape[-1] != bvals.size:
        raise InputValidationError(f"{data.shape[-1]} channels but {bvals.size} b-values")
    ref_shells, ref_idx, idx = _match_shells(bvals, ref_bvals)
    if bvals.size == ref_bvals.size and np.array_equal(idx, ref_idx):
        order = match_directions(bvecs, ref_bvecs, angle_tol_deg)
        same_order = order is not None and np.array_equal(order, np.arange(bvals.size))
    else:
        same_order = False
    if same_order:
        return data, "identity"
    out = np.zeros(data.shape[:-1] + (ref_bvals.size,), dtype=np.float32)
    method = "permutation"
    for k in range(len(ref_shells)):
        src, dst = np.flatnonzero(idx == k), np.flatnonzero(ref_idx == k)
        order = match_directions(bvecs[src], ref_bvecs[dst], angle_tol_deg)
        if order is not None:
            out[..., dst] = data[..., src[order]]
            continue
        method = "sh"
        m = sh_resampling_matrix(bvecs[src], ref_bvecs[dst]).astype(np.float32)
        out[..., dst] = data[..., src] @ m.T
    if method == "sh":
        LOG.info("gradient directions resampled onto the reference with a spherical-harmonic fit")
        if clip:
            np.clip(out, 0.0, 1.0, out=out)
    return out, method


#: MD divisor that maps tissue and CSF (MD up to ~3e-3 mm²/s) onto [0, 1] like the other features
MD_SCALE = 3e-3


def sh_order_supported(n_directions: int, max_order: int = 8) -> int:
    """Largest even SH order (<= ``max_order``) whose (L+1)(L+2)/2 coefficients ``n_directions`` determine."""
    order = 0
    while order < max_order and (order + 3) * (order + 4) // 2 <= n_directions:
        order += 2
    return order


def invariant_feature_names(ref_bvals: np.ndarray, sh_order: int) -> list[str]:
    """Channel names of the invariant representation for the reference's shells."""
    ref_shells, _ = shells(np.asarray(ref_bvals, float).ravel())
    names = []
    for b in np.round(ref_shells).astype(int):
        names += [f"b{b}-mean"] + [f"b{b}-sh{order}" for order in range(2, sh_order + 1, 2)]
    return names + ["fa", "md"]


def channel_layout(inputs: str, sh_order: int, ref_bvals: np.ndarray) -> tuple[int, int]:
    """(network input channels, of which invariant features at the end) of an input representation
    for the reference's dw b-values: ``"dwi"`` the dw volumes, ``"invariant"`` the features,
    ``"both"`` the dw volumes then the features."""
    n_dw = int(np.asarray(ref_bvals).size)
    n_features = len(invariant_feature_names(ref_bvals, sh_order)) if inputs != "dwi" else 0
    if inputs == "invariant":
        return n_features, 0  # one group: every channel is a feature
    return n_dw + n_features, n_features


def input_channels(model, ref_bvals: np.ndarray) -> int:
    """Network input channels of ``model`` (a :class:`ModelSettings`) for the reference's dw b-values."""
    return channel_layout(model.inputs, model.invariant_sh_order, ref_bvals)[0]


def sized_to_inputs(model, ref_bvals: np.ndarray, inputs: str | None = None):
    """``model`` (a :class:`ModelSettings`) with its channel counts sized to the reference's b-values,
    for its own input representation or ``inputs``; invariant features up to the SH order the
    reference's sparsest shell determines (at most the model's ``invariant_sh_order``)."""
    inputs = model.inputs if inputs is None else inputs
    order = model.invariant_sh_order
    if inputs != "dwi":
        _, idx = shells(np.asarray(ref_bvals, float).ravel())
        order = min(order, min(sh_order_supported(int((idx == k).sum())) for k in range(int(idx.max()) + 1)))
    n, n_features = channel_layout(inputs, order, ref_bvals)
    return replace(model, inputs=inputs, n_channels=n, feature_channels=n_features, invariant_sh_order=order)


def invariant_features(ratios: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
                       ref_bvals: np.ndarray, sh_order: int = 4, smooth: float = 1e-3) -> np.ndarray:
    """Protocol-invariant features (X, Y, Z, F) float32 in [0, 1] from dw signal ratios (X, Y, Z, C).

    Per reference shell (in ``ref_bvals``' shell order): the mean ratio over the shell's
    directions and, for each even order l = 2..``sh_order``, the rotation-invariant power of the
    order-l part of the signal on the sphere, as its root mean square over the sphere,
    sqrt(sum_m c_lm^2 / 4 pi) (dipy's orthonormal real SH basis, Laplace-Beltrami regularised fit;
    the same quantity for l = 0 is the mean).  Then FA and MD / 3e-3 mm²/s of the tensor fitted to
    all shells.  A shell with too few directions for ``sh_order`` raises :class:`InputValidationError`.
    """
    from dipy.reconst.shm import real_sh_descoteaux

    from bids_uad.algorithms.tensor import tensor_metrics_from_ratios

    bvals = np.asarray(bvals, float).ravel()
    bvecs = _as_nx3(bvecs)
    inside = np.asarray(mask, bool)
    _, _, idx = _match_shells(bvals, np.asarray(ref_bvals, float).ravel())
    values = np.asarray(ratios, np.float32)[inside]  # (N, C)
    features = []
    for k in range(int(idx.max()) + 1):
        src = np.flatnonzero(idx == k)
        shell = values[:, src]
        features.append(shell.mean(1))
        if sh_order_supported(len(src)) < sh_order:
            raise InputValidationError(
                f"the b={int(round(bvals[src].mean()))} shell has {len(src)} directions, too few for the "
                f"invariant features up to SH order {sh_order} (needs {(sh_order + 1) * (sh_order + 2) // 2})")
        v = _unit(bvecs[src])
        basis, _, l_values = real_sh_descoteaux(sh_order, np.arccos(np.clip(v[:, 2], -1, 1)),
                                                np.arctan2(v[:, 1], v[:, 0]), legacy=False)
        lb = (l_values * (l_values + 1)).astype(float) ** 2
        fit = np.linalg.solve(basis.T @ basis + smooth * np.diag(lb), basis.T)  # (K, n_dirs)
        coef = shell @ fit.T.astype(np.float32)  # (N, K)
        for order in range(2, sh_order + 1, 2):
            power = (coef[:, l_values == order] ** 2).sum(1) / (4 * np.pi)
            features.append(np.sqrt(power))
    moved = np.moveaxis(np.asarray(ratios, np.float32), -1, 0)
    maps = tensor_metrics_from_ratios(moved, bvals, bvecs, inside)
    features += [maps["fa"][inside], maps["md"][inside] / MD_SCALE]
    out = np.zeros(inside.shape + (len(features),), np.float32)
    out[inside] = np.clip(np.stack(features, 1), 0.0, 1.0)
    return out


@dataclass(frozen=True)
class GridMap:
    """How an array of spatial ``shape`` sits in the model ``grid`` (centre pad/crop)."""

    shape: tuple[int, int, int]
    grid: tuple[int, int, int]
    src_start: tuple[int, int, int]  # first copied voxel in the original array
    dst_start: tuple[int, int, int]  # where it lands in the grid
    length: tuple[int, int, int]  # voxels copied per axis

    def to_dict(self) -> dict:
        return {k: list(getattr(self, k)) for k in ("shape", "grid", "src_start", "dst_start", "length")}


def grid_map(shape: tuple[int, ...], grid: tuple[int, ...]) -> GridMap:
    """Centre the original array in the grid (padding) or the grid in the array (cropping)."""
    src, dst, length = [], [], []
    for n, g in zip(shape[:3], grid):
        if n <= g:
            src.append(0), dst.append((g - n) // 2), length.append(n)
        else:
            src.append((n - g) // 2), dst.append(0), length.append(g)
    return GridMap(tuple(int(s) for s in shape[:3]), tuple(int(g) for g in grid), tuple(src), tuple(dst), tuple(length))


def _slices(start, length):
    return tuple(slice(s, s + n) for s, n in zip(start, length))


def to_grid(arr: np.ndarray, grid: tuple[int, int, int], fill: float = 0) -> tuple[np.ndarray, GridMap]:
    """Pad/crop the first three axes of ``arr`` to ``grid``; other axes are kept."""
    gm = grid_map(arr.shape, grid)
    out = np.full(tuple(grid) + arr.shape[3:], fill, dtype=arr.dtype)
    out[_slices(gm.dst_start, gm.length)] = arr[_slices(gm.src_start, gm.length)]
    return out, gm


def from_grid(arr: np.ndarray, gm: GridMap, fill: float = 0) -> np.ndarray:
    """Map a grid array back to the original shape; cropped-away voxels get ``fill``."""
    if tuple(arr.shape[:3]) != gm.grid:
        raise InputValidationError(f"array shape {arr.shape[:3]} is not the grid {gm.grid}")
    out = np.full(gm.shape + arr.shape[3:], fill, dtype=arr.dtype)
    out[_slices(gm.src_start, gm.length)] = arr[_slices(gm.dst_start, gm.length)]
    return out


def grid_affine(affine: np.ndarray, gm: GridMap) -> np.ndarray:
    """Affine of the grid array so that it overlays the original image exactly."""
    shift = np.eye(4)
    shift[:3, 3] = np.subtract(gm.src_start, gm.dst_start)
    return np.asarray(affine, float) @ shift


def subject_grid(model, shape) -> tuple[int, int, int]:
    """The grid a subject of spatial ``shape`` is prepared on for a network (``model``: its
    :class:`~bids_uad.models.settings.ModelSettings`): the model grid, or for a network on the template
    grid the subject's own shape (its arrays are carried from there by :func:`carry_to_template`)."""
    if model.network_space == "template":
        return tuple(int(s) for s in shape[:3])
    return tuple(int(g) for g in model.grid)


def template_route(model):
    """The :class:`~bids_uad.algorithms.registration.TemplateRoute` of arrays already on the template
    grid of ``model`` (identity transforms): what the score reference of a network on that grid is
    given in place of each subject's own route."""
    from bids_uad.algorithms.registration import TemplateRoute

    return TemplateRoute(model.normative_template, tuple(float(v) for v in model.normative_template_affine))


def covering_grid(shape, depth: int) -> tuple[int, int, int]:
    """The smallest network grid (sides divisible by 2**``depth``) that holds ``shape`` (a template grid is
    padded at its far end, so it keeps its affine; a dwi array is centred on it by :func:`to_grid`)."""
    div = 2 ** depth
    return tuple(int(np.ceil(n / div) * div) for n in shape)


def template_affine(model) -> np.ndarray:
    """The voxel-to-world affine (4x4) of the template grid of ``model`` (its settings)."""
    return np.asarray(model.normative_template_affine, float).reshape(4, 4)


def controls_box(model, masks, routes, margin: int = 2):
    """``model`` (settings of a network with ``network_space = "template"``) with its template grid cut
    down to the box where the controls' brains land (``masks`` on their grids, ``routes`` there), widened
    by ``margin`` voxels per side and to sides its depth divides (the affine shifted to the box's corner):
    the network works where the brains are, not on the whole template's field of view."""
    affine = template_affine(model)
    union = np.zeros(tuple(model.grid), bool)
    for mask, route in zip(masks, routes):
        inside = np.asarray(mask, bool)
        union |= route.forward(inside[None].astype(np.float32), inside, model.grid, affine)[1]
    if not union.any():
        raise InputValidationError(f"no control's brain lands on the {model.normative_template} grid: check the "
                                   "transforms to the template")
    found = np.argwhere(union)
    low = np.maximum(found.min(0) - margin, 0)
    size = covering_grid(found.max(0) + 1 + margin - low, model.depth)
    shift = np.eye(4)
    shift[:3, 3] = low
    return replace(model, grid=size, normative_template_shape=size,
                   normative_template_affine=tuple(float(v) for v in (affine @ shift).ravel()))


def carry_to_template(data: np.ndarray, mask: np.ndarray, route, model,
                      analysis_mask: np.ndarray | None = None):
    """A subject's channels ``data`` (C, X, Y, Z, defined in ``mask``) carried onto the template grid of
    a network with ``network_space = "template"`` (``model``: its settings) through ``route`` (the
    subject's TemplateRoute for that array's grid): one linear resampling normalised by the carried mask
    (:meth:`~bids_uad.algorithms.registration.TemplateRoute.forward`), the ``analysis_mask`` in the same
    call as one more channel.  Returns (the channels there, 0 outside the carried brain; that brain, bool;
    the carried ``analysis_mask`` inside it, or None)."""
    if route is None:
        raise InputValidationError(f"the {model.name} network works on the {model.normative_template} grid: the "
                                   "subject's transforms to the template are needed")
    maps = np.asarray(data, np.float32)
    if analysis_mask is not None:
        maps = np.concatenate([maps, np.asarray(analysis_mask, np.float32)[None]], 0)
    values, brain = route.forward(maps, np.asarray(mask, bool), model.grid, template_affine(model))
    carried = None
    if analysis_mask is not None:
        values, carried = values[:-1], brain & (values[-1] >= 0.5)
    return np.where(brain, values, 0).astype(np.float32), brain, carried


def route_on_grid(route, gm: GridMap):
    """A :class:`~bids_uad.algorithms.registration.TemplateRoute` of the original image, for the
    array put on the model grid by ``gm`` (None stays None)."""
    return None if route is None else route.with_affine(grid_affine(route.matrix, gm))


@dataclass
class Prepared:
    """One subject ready for a model: channels-first array on the grid plus its masks."""

    data: np.ndarray  # (C, X, Y, Z) float32 on the grid
    mask: np.ndarray  # (X, Y, Z) bool brain mask on the grid
    grid_map: GridMap
    method: str  # gradient reconciliation used


def prepare_subject(dwi: np.ndarray, bvals: np.ndarray, bvecs: np.ndarray, mask: np.ndarray,
                    grid: tuple[int, int, int], ref_bvals: np.ndarray | None = None,
                    ref_bvecs: np.ndarray | None = None, inputs: str = "dwi", sh_order: int = 4) -> Prepared:
    """Normalise a raw 4D dwi (with b0s) and put it on the model grid: the dw channels in
    reference order (``inputs="dwi"``), the :func:`invariant_features` (``"invariant"``,
    computed from the subject's own directions; only its shells must match the reference's), or
    the dw channels followed by the features (``"both"``)."""
    data, bv, bvec = normalise_dwi(dwi, bvals, bvecs, mask)
    method = "identity"
    features = None
    if inputs in ("invariant", "both"):
        features = invariant_features(data, bv, bvec, mask, bv if ref_bvals is None else ref_bvals, sh_order)
    if inputs == "invariant":
        data, method = features, "invariant-features"
    elif ref_bvals is not None:
        data, method = reconcile_gradients(data, bv, bvec, ref_bvals, ref_bvecs)
    if inputs == "both":
        data, method = np.concatenate([np.asarray(data, np.float32), features], axis=-1), f"{method}+invariant-features"
    grid_data, gm = to_grid(data, grid)
    grid_mask, _ = to_grid(np.asarray(mask) > 0, grid)
    return Prepared(np.ascontiguousarray(np.moveaxis(grid_data, -1, 0)), grid_mask, gm, method)
