"""Attention in Ultralytics YOLO training: a trainer to pass to ``YOLO.train``.

``YOLO(...).train()`` does not train the model object it holds: its trainer builds a fresh
model from the yaml and copies over the weights whose names match (``get_model`` +
``intersect_dicts``), so attention inserted beforehand is silently dropped, and callbacks
run too early or too late to insert it. :func:`trainer` returns a trainer for the model's
task (detect, segment, classify, pose, obb, ...) whose ``get_model`` builds the model,
inserts the attention, *then* loads the weights:

* from a checkpoint without attention (``yolov8n.pt``): the inserted modules are identity
  gates, so training starts from exactly the pretrained model (its first validation equals
  the original's);
* from a retrofitted checkpoint (``last.pt`` / ``best.pt`` of such a run): the checkpoint
  carries its recipe; the same modules are inserted once and its attention weights load;
* ``resume=True`` continues a stopped run (pass the same trainer).

The attention parameters join Ultralytics' own parameter groups, as any parameter of the
model would: conv and linear weights in ``weight`` (with weight decay; MuSGD's ``muon`` group
when that optimizer is chosen), biases in ``bias`` (no decay), and 1-D weights (GE's and
SimAM's ``alpha``) in ``weight`` too. ``lr_mult`` puts them in groups of their own with the
learning rate multiplied (warm-up and schedule scale them alike).

Checkpoints (``last.pt``, ``best.pt``) are Ultralytics' pickles of the model: they hold the
attention, and ``YOLO("best.pt")`` loads them in any process where retrofit is installed
(``pip install torch-retrofit``; Ultralytics' own auto-install would fetch the unrelated
``retrofit`` package). ``predict``, ``val``, ``fuse()`` and ``export(format="onnx")`` work
on them. A pickle runs code when read: retrofit itself reads one only with ``trust_code``.

Example:
    >>> from ultralytics import YOLO
    >>> import retrofit.ultralytics
    >>> YOLO("yolov8n.pt").train(data="coco8.yaml", epochs=10, trainer=retrofit.ultralytics.trainer("cbam"))
"""

from __future__ import annotations

from .frameworks.ultralytics.checkpoint import save_checkpoint
from .frameworks.ultralytics.training import FIRST_VERSION, TRAINERS, RetrofitTrainer, trainer

__all__ = ["trainer", "RetrofitTrainer", "TRAINERS", "FIRST_VERSION", "save_checkpoint"]
