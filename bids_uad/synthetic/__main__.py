"""``python -m bids_uad.synthetic`` is ``bids_uad-synth``."""
from bids_uad.synthetic.cli import main

raise SystemExit(main())
