"""bids_uad: unsupervised anomaly detection in diffusion MRI as a BIDS-App."""
from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["__version__"]
