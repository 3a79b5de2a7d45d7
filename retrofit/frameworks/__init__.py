"""Models built by other libraries: Ultralytics YOLO, Hugging Face transformers and
segmentation_models_pytorch.

Each library has one adapter here that declares, in one place, what retrofit needs to know
about its models: how a model it built is named in a recipe (a spec such as
``transformers:ResNetForImageClassification`` and its constructor arguments as plain data),
how to build one again from that record without running code from a file or downloading
anything, what in such a record would run code, what a stage of its models is, which key
of its config carries a recipe, how it saves in its own format and what "offline" means
for it. Callers ask the adapter (:class:`Framework`), never test a library's name.

None of these libraries is imported until a model of theirs is met (a model's class names
its library) or a spec with their prefix is built: ``import retrofit`` imports none of
them.
"""

from __future__ import annotations

from . import _smp, _transformers, ultralytics  # noqa: F401  (each registers its adapter)
from ._base import Framework as Framework  # the contract an adapter implements
from ._base import framework_of, framework_of_class, framework_of_spec, registered_frameworks

__all__ = ["framework_of", "framework_of_class", "framework_of_spec", "registered_frameworks"]
