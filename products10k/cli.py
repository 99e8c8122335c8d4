"""What every stage script shares: logging set-up and the one way a stage fails.

A stage script parses its arguments and hands its work to :func:`run_stage`. A
:class:`~products10k.errors.Products10kError` (bad params, bad data, a missing input) is a problem
the user can fix: it is logged as one clear line, without a traceback, and the process exits with
status 1. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import TypeVar

from products10k.errors import Products10kError
from products10k.logs import setup_logging

T = TypeVar("T")


def run_stage(log: logging.Logger, work: Callable[..., T], *args, **kwargs) -> T:
    """Set up logging, run ``work(*args, **kwargs)`` and return its result.

    On a Products10kError, log its message on ``log`` (the stage's logger) and exit with status 1.
    """
    setup_logging()
    try:
        return work(*args, **kwargs)
    except Products10kError as exc:
        log.error("%s", exc)
        sys.exit(1)
