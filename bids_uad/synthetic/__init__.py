"""Synthetic BIDS datasets with known truth: anatomy, diffusion, artefacts and gliomas.

``generate_dataset(output_dir, preset="tiny", seed=0)`` writes the dataset; the command
``bids_uad-synth`` is its command line.  See docs/synthetic.md.
"""
from __future__ import annotations


def generate_dataset(*args, **kwargs):
    """Write a synthetic BIDS dataset; see :func:`bids_uad.synthetic.generate.generate_dataset`."""
    from bids_uad.synthetic.generate import generate_dataset as _generate

    return _generate(*args, **kwargs)


__all__ = ["generate_dataset"]
