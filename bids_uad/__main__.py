"""``python -m bids_uad`` runs the BIDS-App command line."""
from bids_uad.cli.run import main

if __name__ == "__main__":
    raise SystemExit(main())
