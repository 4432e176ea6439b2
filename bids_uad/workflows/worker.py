"""Set-up of nipype's MultiProc worker processes.

Workers start from a fork server (:data:`bids_uad.workflows.execution.MULTIPROC_START_METHOD`)
that imports this module once, before it forks any worker, so every worker starts with:

* nipype's own chatter (``[Node] Setting-up / Executing / Finished``) below WARNING dropped:
  the main process already logs one progress line per finished node;
* warnings and errors of nipype and of bids_uad on stderr, one line each, in the console's
  format (a crashed node's full traceback still reaches the main process and its crash file);
* nipype imported, so a worker is ready as soon as it is forked.
"""
from __future__ import annotations

import logging
import sys

WORKER_LOGGERS = ("bids_uad", "nipype.workflow", "nipype.interface", "nipype.utils")


def configure_worker_logging(stream=None) -> logging.Handler:
    """Route the loggers of :data:`WORKER_LOGGERS` to one WARNING handler on ``stream``."""
    import nipype  # noqa: F401  (creates nipype's loggers and their default handlers first)

    from bids_uad.workflows.execution import FirstLineFormatter

    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setLevel(logging.WARNING)
    handler.setFormatter(FirstLineFormatter("%(asctime)s [%(levelname)s] %(message)s", "%H:%M:%S"))
    for name in WORKER_LOGGERS:
        logger = logging.getLogger(name)
        for old in list(logger.handlers):
            logger.removeHandler(old)
        logger.addHandler(handler)
        logger.setLevel(logging.WARNING)
        logger.propagate = False
    return handler


configure_worker_logging()
import nipype.pipeline.engine  # noqa: E402,F401  (preloaded for the workers)
