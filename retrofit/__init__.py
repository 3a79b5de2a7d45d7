"""retrofit: add identity-initialized attention to trained CNNs without touching their code.

``__all__`` is the public API, every name of it in the API reference (docs/api.md); so are
the public submodules a user imports himself: ``retrofit.attention`` (every registered type
and the registry), ``retrofit.optim``, ``retrofit.finetune``, ``retrofit.data``,
``retrofit.distributed``, ``retrofit.gates``, ``retrofit.publish`` and
``retrofit.ultralytics``, each with its own ``__all__``. Every other module is internal: its
``__all__`` lists what the rest of the package imports from it, and may change in any release.
"""

from . import attention as attention  # the public submodule, as retrofit.attention
from .api import analyze, get_report, plan, retrofit
from .attention import create_attention, get_attention, list_attention, register_attention
from .build import load, save
from .errors import (
    AttentionError,
    DataError,
    ModelLoadError,
    OptionError,
    RetrofitError,
    RuleError,
    SaveError,
    SiteError,
    TraceError,
    UntrustedCodeError,
)
from .models import create_model
from .optim import param_groups
from .options import RetrofitOptions
from .publish import push_to_hub
from .readfile import Limits, limits_applied
from .recipe import Recipe, get_recipe
from .report import Report
from .rulefile import RuleSet, list_builtin_rules, load_rules, parse_rules, resolve_rules
from .scores import SiteScores
from .scoring import score_sites
from .version import __version__

__all__ = [
    # retrofitting
    "retrofit",
    "analyze",
    "plan",
    "get_report",
    "Report",
    "RetrofitOptions",
    # placement by score
    "score_sites",
    "SiteScores",
    # models, saves and the Hub
    "create_model",
    "save",
    "load",
    "Limits",
    "limits_applied",
    "Recipe",
    "get_recipe",
    "push_to_hub",
    # rule files
    "RuleSet",
    "load_rules",
    "parse_rules",
    "resolve_rules",
    "list_builtin_rules",
    # attention types (the whole registry: retrofit.attention)
    "register_attention",
    "get_attention",
    "list_attention",
    "create_attention",
    # optimizer groups
    "param_groups",
    # errors
    "RetrofitError",
    "RuleError",
    "AttentionError",
    "TraceError",
    "SiteError",
    "ModelLoadError",
    "OptionError",
    "SaveError",
    "DataError",
    "UntrustedCodeError",
    "__version__",
]
