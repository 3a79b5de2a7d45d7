"""Ultralytics YOLO: the adapter (models built from their yaml, as plain data), its
checkpoint layout, and the trainer that inserts attention in ``YOLO.train``.

Importing this package registers the adapter and imports neither Ultralytics nor the
trainer (:mod:`retrofit.frameworks.ultralytics.training`, whose public path is
:mod:`retrofit.ultralytics`).
"""

from __future__ import annotations

from ._adapter import Ultralytics as Ultralytics  # importing it registers the adapter

__all__: list[str] = []
