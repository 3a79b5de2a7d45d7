"""What "offline" means for Ultralytics: no downloads or network checks, and its console
output kept off stdout."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator

__all__ = ["offline"]


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """Ultralytics without downloads or network checks, its messages (model summaries) on
    stderr: what it prints while building is not a result."""
    saved = os.environ.get("YOLO_OFFLINE")
    os.environ["YOLO_OFFLINE"] = "1"
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is None:
            os.environ.pop("YOLO_OFFLINE", None)
        else:
            os.environ["YOLO_OFFLINE"] = saved
