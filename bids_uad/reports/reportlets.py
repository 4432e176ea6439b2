"""Shared pieces of the report builders: cached figure files and the items sections hold.

A section is a list of *items* (plain dicts with a ``type``) that the jinja2 templates
render: ``figure``, ``flicker``, ``note``, ``warning``, ``table``, ``kv``, ``text``,
``heading``, ``pre``.  Figures are written once into ``sub-<label>/figures/`` and remade
only when their inputs change (a signature of the input files is kept in the figure's
metadata), so rebuilding a report is cheap and idempotent.
"""
from __future__ import annotations

import hashlib
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

    @staticmethod
    def signature(inputs: Sequence[Path | None]) -> str:
        """Identity of a figure's inputs (which files, their sizes and times), kept in the figure."""
        parts = []
        for p in inputs:
            if p is None or not Path(p).exists():
                parts.append("-")
                continue
            st = Path(p).stat()
            parts.append(f"{Path(p).name}:{st.st_size}:{st.st_mtime_ns}")
        return "bids_uad-inputs:" + hashlib.sha1("|".join(parts).encode()).hexdigest()

    def _fresh(self, target: Path, signature: str) -> bool:
        """The figure exists and was made from exactly these inputs (none added, removed or changed)."""
        if not target.is_file():
            return False
        try:
            with open(target, "rb") as handle:
                head = handle.read(8192)
        except OSError:
            return False
        return signature.encode() in head

    def make(self, name: str, inputs: Sequence[Path | None], render: Callable[[], Any]) -> str | None:
        """Path (relative to OUTPUT_DIR) of figure ``name``, rendering it when needed.

        Returns None when rendering fails; the failure is logged and the report goes on.
        """
        from bids_uad.reports.figures import save_figure

        target = self.figures_dir / name
        signature = self.signature(inputs)
        if not self._fresh(target, signature):
            try:
                save_figure(render(), target, signature)
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
