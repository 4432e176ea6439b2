"""Shared pieces of the report builders: cached figure files and the items sections hold.

A section is a list of *items* (plain dicts with a ``type``) that the jinja2 templates
render: ``figure``, ``flicker``, ``note``, ``warning``, ``table``, ``kv``, ``text``,
``heading``, ``pre``.  Figures are written once into ``sub-<label>/figures/`` and remade
only when an input is newer than the figure, so rebuilding a report is cheap and
idempotent.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

LOGGER = logging.getLogger("bids_uad.reports")


def note(text: str) -> dict:
    """'Not available' style remark shown instead of a figure."""
    return {"type": "note", "text": text}


def warning(text: str) -> dict:
    return {"type": "warning", "text": text}


def heading(text: str) -> dict:
    return {"type": "heading", "text": text}


def text(body: str) -> dict:
    return {"type": "text", "text": body}


def kv(rows: Iterable[tuple[str, Any]]) -> dict:
    """A two-column key/value table."""
    return {"type": "kv", "rows": [(str(k), _fmt(v)) for k, v in rows]}


def table(columns: Sequence[str], rows: Iterable[Sequence[Any]], caption: str = "") -> dict:
    return {"type": "table", "columns": [str(c) for c in columns],
            "rows": [[_fmt(v) for v in row] for row in rows], "caption": caption,
            "collapsed": False}


def pre(title: str, body: str, open_: bool = False) -> dict:
    return {"type": "pre", "title": title, "text": body, "open": open_}


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return "n/a" if value != value else f"{value:.4g}"
    if isinstance(value, (list, tuple)):
        return ", ".join(_fmt(v) for v in value)
    return "n/a" if value is None else str(value)


class FigureMaker:
    """Writes figures under ``figures_dir`` unless an up-to-date one is there."""

    def __init__(self, output_dir: Path, figures_dir: Path):
        self.output_dir = Path(output_dir)
        self.figures_dir = Path(figures_dir)
        self.errors: list[str] = []

    def rel(self, path: Path) -> str:
        return path.relative_to(self.output_dir).as_posix()

    def _fresh(self, target: Path, inputs: Sequence[Path | None]) -> bool:
        if not target.is_file():
            return False
        stamp = target.stat().st_mtime
        return all(p is None or not Path(p).exists() or Path(p).stat().st_mtime <= stamp for p in inputs)

    def make(self, name: str, inputs: Sequence[Path | None], render: Callable[[], Any]) -> str | None:
        """Path (relative to OUTPUT_DIR) of figure ``name``, rendering it when needed.

        Returns None when rendering fails; the failure is logged and the report goes on.
        """
        from bids_uad.reports.figures import save_figure

        target = self.figures_dir / name
        if not self._fresh(target, inputs):
            try:
                save_figure(render(), target)
            except Exception as exc:  # a figure must never break the report
                LOGGER.warning("figure %s could not be made: %s", name, exc)
                self.errors.append(f"{name}: {type(exc).__name__}: {exc}")
                return None
        return self.rel(target)

    def figure(self, name: str, inputs: Sequence[Path | None], render: Callable[[], Any],
               caption: str, alt: str, wide: bool = True) -> dict:
        """A ``figure`` item, or a note saying why the figure is missing."""
        src = self.make(name, inputs, render)
        if src is None:
            return note(f"{alt}: the figure could not be made (see the log).")
        return {"type": "figure", "src": src, "caption": caption, "alt": alt, "wide": wide}

    def flicker(self, names: tuple[str, str], inputs: Sequence[Path | None],
                renders: tuple[Callable[[], Any], Callable[[], Any]], labels: tuple[str, str],
                caption: str, alt: str) -> dict:
        """Two figures of identical layout shown on top of each other; hovering alternates them."""
        srcs = [self.make(n, inputs, r) for n, r in zip(names, renders)]
        if None in srcs:
            return note(f"{alt}: the figure could not be made (see the log).")
        return {"type": "flicker", "src": srcs[0], "src2": srcs[1], "labels": list(labels),
                "caption": caption, "alt": alt}
