"""Report figures as plain functions on arrays: slice mosaics, plots, histograms.

Every function returns a :class:`matplotlib.figure.Figure` (no pyplot state, no display);
:func:`save_figure` writes it atomically as deterministic SVG (no date, fixed ids), so a
rebuild from the same data gives the same bytes.  Images are shown in RAS orientation
(left of the subject on the left of each panel, anterior/superior up).
"""
from __future__ import annotations

import io
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
from matplotlib import rcParams
from matplotlib.figure import Figure

from bids_uad.bids.derivatives import atomic_write

#: Views of a mosaic: name -> (axis sliced, horizontal axis, vertical axis).
VIEWS = {"x": (0, 1, 2), "y": (1, 0, 2), "z": (2, 0, 1)}
#: Contour colours (dseg labels 1 CSF, 2 GM, 3 WM; masks; anomalies).
COLORS = {"CSF": "#3aa0ff", "GM": "#39d353", "WM": "#ff4fd8", "brain": "#ff3b30",
          "anomaly": "#00e5ff", "truth": "#ffd60a", "edges": "#ff3b30"}
PLOT_STYLE = {"axes.spines.top": False, "axes.spines.right": False, "font.size": 9,
              "axes.titlesize": 10, "axes.grid": True, "grid.alpha": 0.3,
              "text.parse_math": False}  # dataset strings ("$x^") are text, never mathtext


def to_canonical(img) -> tuple[np.ndarray, np.ndarray]:
    """(3D float32 data in closest-RAS orientation, its affine); 4D images give volume 0."""
    import nibabel as nib

    while len(img.shape) > 3:  # first volume only, without reading the others
        img = img.slicer[..., 0]
    img = nib.as_closest_canonical(img)
    data = np.asarray(img.dataobj, dtype=np.float32)
    return np.nan_to_num(data), img.affine


def robust_range(data: np.ndarray, mask: np.ndarray | None = None, low: float = 2.0,
                 high: float = 98.0) -> tuple[float, float]:
    """Percentile window of the non-zero (or masked) voxels; (0, 1) for an empty image."""
    values = data[mask > 0] if mask is not None and np.any(mask > 0) else data[data != 0]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    lo, hi = np.percentile(values, [low, high])
    return float(lo), float(hi if hi > lo else lo + 1.0)


def pick_slices(shape: Sequence[int], mask: np.ndarray | None = None, n: int = 7,
                views: Sequence[str] = ("x", "y", "z")) -> dict[str, list[int]]:
    """``n`` evenly spaced slice indices per view, inside the mask's bounding box when given."""
    out: dict[str, list[int]] = {}
    for view in views:
        axis = VIEWS[view][0]
        lo, hi = 0, shape[axis] - 1
        if mask is not None and np.any(mask > 0):
            other = tuple(a for a in range(3) if a != axis)
            present = np.flatnonzero(np.any(mask > 0, axis=other))
            lo, hi = int(present[0]), int(present[-1])
        idx = np.linspace(lo, hi, n + 2)[1:-1] if hi - lo >= n + 1 else np.linspace(lo, hi, n)
        out[view] = sorted(set(int(round(i)) for i in idx))
    return out


def canonical_slices_in_grid(mask: np.ndarray, affine: np.ndarray, n: int, view: str
                             ) -> tuple[np.ndarray, dict[str, list[int]]]:
    """:func:`pick_slices` of one view for ``mask`` (an image on the grid ``affine``) once it is
    reoriented to RAS, as the figures show it; returns (the voxels of those slices back on the
    image's own grid, the slices).  A figure computes its map on those voxels only."""
    from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

    mask = np.asarray(mask, bool)
    own = io_orientation(affine)  # as nibabel's as_closest_canonical reorients
    canonical = apply_orientation(mask, own)
    slices = pick_slices(canonical.shape, canonical, n, (view,))
    chosen = np.zeros(canonical.shape, bool)
    chosen[(slice(None),) * VIEWS[view][0] + (slices[view],)] = True
    return apply_orientation(chosen, ornt_transform(axcodes2ornt(("R", "A", "S")), own)), slices


def _slice(data: np.ndarray, view: str, index: int) -> np.ndarray:
    axis = VIEWS[view][0]
    # basic indexing (a view): np.take copies the whole volume first when it is in Fortran
    # order, as nibabel loads it (17 ms a slice at 1 mm, ~2 s a report)
    return data[(slice(None),) * axis + (index,)].T  # rows = vertical axis, columns = horizontal


def _row(volume: np.ndarray, view: str, indices: Sequence[int], gap: int, fill: float) -> np.ndarray:
    """Slices of one view side by side (gap columns of ``fill`` between them)."""
    panels = [_slice(volume, view, k) for k in indices]
    spacer = np.full((panels[0].shape[0], gap), fill, dtype=np.float32)
    parts: list[np.ndarray] = []
    for i, panel in enumerate(panels):
        parts.extend([spacer, panel.astype(np.float32)] if i else [panel.astype(np.float32)])
    return np.concatenate(parts, axis=1)


def mosaic(background: np.ndarray, affine: np.ndarray | None = None, *,
           contours: Sequence[tuple[np.ndarray, str, str]] = (),
           overlay: np.ndarray | None = None, overlay_range: tuple[float, float] | None = None,
           overlay_cmap: str = "hot", slices: Mapping[str, Sequence[int]] | None = None,
           window: tuple[float, float] | None = None, cmap: str = "gray", n_slices: int = 7,
           width_in: float = 11.0) -> Figure:
    """Rows of slices (sagittal, coronal, axial) of ``background`` with optional overlays.

    ``contours``: (mask, colour, label) drawn as 0.5 iso-lines; ``overlay``: a map shown
    above ``overlay_range[0]`` with ``overlay_cmap``; ``slices``: fixed indices (use the same
    for two figures that must line up, e.g. a flicker pair).  Each view is one image (its
    slices side by side), which keeps figures light.  A 4-D ``background`` ``(X, Y, Z, 3)`` is an
    RGB image (e.g. direction-coloured FA), shown in ``window`` (default 0-1).
    """
    import matplotlib

    affine = np.eye(4) if affine is None else np.asarray(affine)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    rgb = background.ndim == 4  # (X, Y, Z, 3) colours in [0, 1], shown as they are
    slices = dict(slices or pick_slices(background.shape[:3], None, n_slices))
    views = [v for v in ("x", "y", "z") if slices.get(v)]
    vmin, vmax = window or ((0.0, 1.0) if rgb else robust_range(background))
    gap = max(1, int(round(0.02 * max(background.shape[:3]))))
    rows, ratios, widths = [], [], []
    for v in views:
        _, h_ax, v_ax = VIEWS[v]
        canvas = np.stack([_row(background[..., c], v, slices[v], gap, 0.0) for c in range(3)], -1) if rgb \
            else _row(background, v, slices[v], gap, np.nan)
        rows.append(canvas)
        widths.append(canvas.shape[1] * zooms[h_ax])
        ratios.append(canvas.shape[0] * zooms[v_ax])
    scale = max(widths)
    fig = Figure(figsize=(width_in, width_in * sum(ratios) / scale * 1.0), facecolor="black")
    axes = fig.subplots(len(views), 1, squeeze=False, gridspec_kw={"height_ratios": ratios, "hspace": 0.01})
    fig.subplots_adjust(0, 0, 1, 1)
    gray = matplotlib.colormaps[cmap].with_extremes(bad="black")
    if overlay is not None:
        lo, hi = overlay_range or robust_range(overlay, low=50, high=99.5)
        shown = np.where(overlay > lo, overlay, np.nan)
        hot = matplotlib.colormaps[overlay_cmap].with_extremes(bad=(0, 0, 0, 0))
    for row, view in enumerate(views):
        axis, h_ax, v_ax = VIEWS[view]
        ax = axes[row, 0]
        ax.set_facecolor("black")
        ax.set_axis_off()
        aspect = zooms[v_ax] / zooms[h_ax]
        canvas = rows[row]
        if rgb:
            ax.imshow(np.clip((canvas - vmin) / max(vmax - vmin, 1e-6), 0, 1), origin="lower", aspect=aspect,
                      interpolation="none")
        else:
            ax.imshow(canvas, cmap=gray, vmin=vmin, vmax=vmax, origin="lower", aspect=aspect, interpolation="none")
        if overlay is not None:
            ax.imshow(_row(shown, view, slices[view], gap, np.nan), cmap=hot, vmin=lo, vmax=hi,
                      origin="lower", aspect=aspect, interpolation="none", alpha=0.85)
        for mask, color, _label in contours:
            band = _row(np.asarray(mask), view, slices[view], gap, 0.0)
            if band.max() > 0.5 > band.min():
                ax.contour(band, levels=[0.5], colors=[color], linewidths=0.8)
        width = canvas.shape[1] * zooms[h_ax]
        pad = (scale - width) / zooms[h_ax] / 2  # centre narrower rows
        ax.set_xlim(-0.5 - pad, canvas.shape[1] - 0.5 + pad)
        panel_w = _slice(background[..., 0] if rgb else background, view, slices[view][0]).shape[1]
        for col, k in enumerate(slices[view]):
            coord = (affine @ np.r_[[k if a == axis else 0 for a in range(3)], 1.0])[axis]
            ax.text(col * (panel_w + gap) + 1, canvas.shape[0] - 1.5, f"{view}={coord:.0f}", color="white",
                    fontsize=7, va="top", ha="left")
    return fig


def motion_figure(columns: Mapping[str, Sequence[float]]) -> Figure:
    """Translations (mm), rotations (degrees) and framewise displacement per volume."""
    with rcParams_context(PLOT_STYLE):
        fig = Figure(figsize=(10, 4.4), layout="constrained")
        axes = fig.subplots(3, 1, sharex=True)
        groups = (("trans", "translation (mm)", 1.0), ("rot", "rotation (degrees)", 180 / np.pi))
        for ax, (prefix, label, scale) in zip(axes[:2], groups):
            for axis_name in "xyz":
                key = f"{prefix}_{axis_name}"
                if key in columns:
                    ax.plot(np.asarray(columns[key], float) * scale, lw=1.2, label=axis_name)
            ax.set_ylabel(label)
            ax.legend(loc="upper right", ncols=3, frameon=False)
        fd = np.asarray(columns.get("framewise_displacement", []), float)
        if fd.size:
            axes[2].bar(np.arange(fd.size), np.nan_to_num(fd), color="#4c72b0", width=0.8)
            mean = float(np.nanmean(fd)) if np.isfinite(fd).any() else 0.0
            axes[2].axhline(mean, color="#dd5555", lw=1, ls="--", label=f"mean {mean:.3f} mm")
            axes[2].legend(loc="upper right", frameon=False)
        from matplotlib.ticker import MaxNLocator

        axes[2].xaxis.set_major_locator(MaxNLocator(integer=True))
        axes[2].set_ylabel("FD (mm)")
        axes[2].set_xlabel("volume")
    return fig


def histogram_figure(values: np.ndarray, thresholds: Mapping[str, float], title: str = "",
                     truth: np.ndarray | None = None) -> Figure:
    """Histogram of scores inside the analysis mask with each threshold as a vertical line.

    With ``truth`` (boolean, same length as ``values``) healthy and lesion voxels are
    stacked in two colours.
    """
    values = np.asarray(values, float)
    with rcParams_context(PLOT_STYLE):
        fig = Figure(figsize=(7, 3.2), layout="constrained")
        ax = fig.subplots()
        bins = np.histogram_bin_edges(values, bins=60) if values.size else 10
        if truth is not None and np.any(truth):
            ax.hist([values[~truth], values[truth]], bins=bins, stacked=True, log=True,
                    color=["#8da0cb", "#fc8d62"], label=["healthy", "lesion (ground truth)"])
        else:
            ax.hist(values, bins=bins, log=True, color="#8da0cb", label="voxels")
        for i, (name, t) in enumerate(thresholds.items()):
            ax.axvline(t, color=["#d62728", "#2ca02c", "#9467bd", "#8c564b"][i % 4], lw=1.5,
                       ls="--", label=f"{name}: {t:.4g}")
        ax.set_xlabel("anomaly score")
        ax.set_ylabel("voxels (log)")
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=8)
    return fig


def curves_figure(series: Sequence[tuple[str, Sequence[float], Sequence[float], str]],
                  title: str = "", xlabel: str = "epoch", ylabel: str = "loss",
                  marks: Sequence[tuple[float, str]] = ()) -> Figure:
    """Line plot of (label, x, y, linestyle) series, e.g. training/validation loss per fold."""
    with rcParams_context(PLOT_STYLE):
        fig = Figure(figsize=(6.5, 3.4), layout="constrained")
        ax = fig.subplots()
        colors: dict[str, str] = {}
        palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3"]
        for label, x, y, style in series:
            group = label.split(" ")[0]
            colors.setdefault(group, palette[len(colors) % len(palette)])
            ax.plot(x, y, ls=style, color=colors[group], lw=1.4, label=label)
        for x, label in marks:
            ax.axvline(x, color="#999999", lw=0.8, ls=":")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        if series:
            ax.legend(frameon=False, fontsize=7, ncols=2)
    return fig


def scatter_figure(points: Sequence[tuple[str, float, float]], title: str, xlabel: str, ylabel: str,
                   diagonal: bool = True) -> Figure:
    """Labelled points (e.g. nominal vs observed false-positive rate) with the identity line."""
    with rcParams_context(PLOT_STYLE):
        fig = Figure(figsize=(4.2, 3.6), layout="constrained")
        ax = fig.subplots()
        groups: dict[str, list[tuple[float, float]]] = {}
        for label, x, y in points:
            groups.setdefault(label, []).append((x, y))
        for label, xy in groups.items():
            xy_arr = np.asarray(sorted(xy))
            ax.plot(xy_arr[:, 0], xy_arr[:, 1], "o-", ms=4, lw=1, label=label)
        if diagonal and points:
            lim = max(max(p[1] for p in points), max(p[2] for p in points))
            ax.plot([0, lim], [0, lim], color="#999999", lw=0.8, ls="--", label="ideal")
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.legend(frameon=False, fontsize=7)
    return fig


class rcParams_context:  # noqa: N801 - used like matplotlib.rc_context, without pyplot
    """Temporarily update matplotlib rcParams."""

    def __init__(self, params: Mapping[str, object]):
        self.params, self.saved = dict(params), {}

    def __enter__(self):
        self.saved = {k: rcParams[k] for k in self.params}
        rcParams.update(self.params)
        return self

    def __exit__(self, *exc):
        rcParams.update(self.saved)
        return False


def figure_bytes(fig: Figure, fmt: str = "svg", description: str | None = None) -> bytes:
    """Serialise a figure deterministically (no date in the metadata, fixed SVG ids)."""
    buffer = io.BytesIO()
    metadata = {"Date": None, "Creator": "bids_uad"} if fmt == "svg" else {"Software": "bids_uad"}
    if description:
        metadata["Description"] = description
    with rcParams_context({"svg.hashsalt": "bids_uad", "svg.fonttype": "path"}):
        fig.savefig(buffer, format=fmt, facecolor=fig.get_facecolor(), metadata=metadata,
                    dpi=110 if fmt == "png" else rcParams["savefig.dpi"])
    return buffer.getvalue()


def save_figure(fig: Figure, path: str | Path, description: str | None = None) -> Path:
    """Write ``fig`` atomically to ``path`` (format from the extension)."""
    path = Path(path)
    data = figure_bytes(fig, path.suffix.lstrip(".") or "svg", description)
    with atomic_write(path, "wb") as handle:
        handle.write(data)
    return path


def _centre_slices(*masks: np.ndarray, shape) -> tuple[int, int, int]:
    for m in masks:
        if m is not None and np.any(m):
            idx = np.argwhere(m)
            return tuple(int(v) for v in np.round(idx.mean(0)))
    return tuple(s // 2 for s in shape[:3])


def plot_longitudinal(baseline_bg: np.ndarray, followup_bg: np.ndarray, anomaly: np.ndarray,
                      baseline_lesion: np.ndarray, followup_lesion: np.ndarray, mismatch: np.ndarray,
                      zooms=(1.0, 1.0, 1.0), title: str = "", lesion_label: str = "lesion",
                      fmt: str = "svg") -> str | bytes:
    """Baseline (top) and follow-up (bottom) side by side in baseline dwi space; SVG text.

    Baseline: anomaly map filled (orange), baseline lesion outlined (cyan), mismatch
    outlined (magenta).  Follow-up: follow-up lesion outlined (yellow) and the same mismatch
    outline, so mismatch that became lesion is visible.  Three planes through the mismatch.
    Returns SVG text (``fmt="svg"``) or the bytes of another matplotlib format.
    """
    z = np.asarray(zooms, float)[:3]
    centre = _centre_slices(mismatch, anomaly, baseline_lesion, shape=baseline_bg.shape)
    planes = [("axial", 2), ("coronal", 1), ("sagittal", 0)]

    def cut(vol, axis):
        return _slice(np.asarray(vol), ("x", "y", "z")[axis], centre[axis])

    def aspect(axis):
        dims = [d for d in range(3) if d != axis]
        return z[dims[1]] / z[dims[0]]

    fig = Figure(figsize=(9, 6.4), facecolor="black")
    axes = fig.subplots(2, 3)
    rows = [("baseline", baseline_bg), ("follow-up", followup_bg)]
    for r, (label, bg) in enumerate(rows):
        bgv = np.asarray(bg, float)
        hi = np.percentile(bgv[bgv > 0], 99) if np.any(bgv > 0) else 1.0
        for c, (plane, axis) in enumerate(planes):
            ax = axes[r, c]
            ax.imshow(cut(bgv, axis), cmap="gray", origin="lower", vmin=0, vmax=hi, aspect=aspect(axis),
                      interpolation="nearest")
            if r == 0:
                an = cut(anomaly, axis).astype(float)
                ax.imshow(np.ma.masked_where(an == 0, an), cmap="autumn", alpha=0.45, origin="lower",
                          aspect=aspect(axis), interpolation="nearest")
            for mask, color in ((mismatch, "magenta"),
                                (baseline_lesion if r == 0 else followup_lesion, "cyan" if r == 0 else "yellow")):
                sl = cut(mask, axis).astype(float)
                if sl.any() and sl.min() != sl.max():
                    ax.contour(sl, levels=[0.5], colors=color, linewidths=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"{label} · {plane}", color="white", fontsize=9)
    fig.suptitle(title + f"\nbaseline: anomaly (orange), {lesion_label} (cyan), mismatch (magenta) · "
                 f"follow-up: {lesion_label} (yellow)", color="white", fontsize=9)
    fig.tight_layout()
    data = figure_bytes(fig, fmt)
    return data.decode() if fmt == "svg" else data


def finding_planes(backgrounds: Sequence[tuple[str, np.ndarray]], score: np.ndarray, finding: np.ndarray,
                   centre: Sequence[int], affine: np.ndarray, overlay_range: tuple[float, float],
                   others: np.ndarray | None = None, title: str = "") -> Figure:
    """Three planes (sagittal, coronal, axial) through ``centre`` (RAS voxel indices), one row per
    background (e.g. MD, FA): the score above ``overlay_range[0]`` in hot colours, the finding
    outlined in cyan and other flagged voxels (``others``) in white."""
    import matplotlib

    affine = np.asarray(affine, float)
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lo, hi = overlay_range
    hot = matplotlib.colormaps["hot"].with_extremes(bad=(0, 0, 0, 0))
    shown = np.where(score > lo, score, np.nan)
    fig = Figure(figsize=(7.5, 2.6 * len(backgrounds) + 0.4), facecolor="black")
    axes = fig.subplots(len(backgrounds), 3, squeeze=False)
    for r, (name, bg) in enumerate(backgrounds):
        vmin, vmax = robust_range(bg, high=99.0)
        for c, view in enumerate(("x", "y", "z")):
            axis, h_ax, v_ax = VIEWS[view]
            index = int(centre[axis])
            ax = axes[r, c]
            ax.set_axis_off()
            aspect = zooms[v_ax] / zooms[h_ax]
            ax.imshow(_slice(bg, view, index), cmap="gray", vmin=vmin, vmax=vmax, origin="lower", aspect=aspect,
                      interpolation="none")
            ax.imshow(_slice(shown, view, index), cmap=hot, vmin=lo, vmax=hi, origin="lower", aspect=aspect,
                      interpolation="none", alpha=0.8)
            for mask, color in ((others, "white"), (finding, COLORS["anomaly"])):
                if mask is None:
                    continue
                band = _slice(np.asarray(mask, np.float32), view, index)
                if band.max() > 0.5 > band.min():
                    ax.contour(band, levels=[0.5], colors=[color], linewidths=0.9)
            coord = (affine @ np.r_[[index if a == axis else 0 for a in range(3)], 1.0])[axis]
            ax.set_title(f"{name} · {view}={coord:.0f} mm", color="white", fontsize=8)
    if title:
        fig.suptitle(title, color="white", fontsize=9)
    fig.tight_layout()
    return fig
