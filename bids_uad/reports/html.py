"""HTML assembly: jinja2 templates from ``bids_uad/data/reports`` with autoescaping always on.

Every string that comes from the dataset (labels, sidecar values, file names, crash files)
reaches the page only through template expressions, which jinja2 escapes; nothing is
marked safe.  CSS is inlined and figures are relative links, so the page is self-contained.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import jinja2


@dataclass
class Section:
    id: str
    title: str
    items: list[dict] = field(default_factory=list)
    flag: bool = False   # e.g. the Errors section has something to show


def environment() -> jinja2.Environment:
    """The template environment (autoescape on for every template, including .css includes)."""
    return jinja2.Environment(
        loader=jinja2.PackageLoader("bids_uad", "data/reports"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        keep_trailing_newline=True,
    )


def render_report(**context: Any) -> str:
    """Render ``report.html`` (title, heading, subtitle, sections, methods, version)."""
    context.setdefault("methods", None)
    context.setdefault("links", [])
    return environment().get_template("report.html").render(**context)
