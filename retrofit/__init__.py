"""retrofit: add identity-initialized attention to trained CNNs without touching their code."""

from . import attention
from .api import analyze, get_report, plan, retrofit
from .attention import (
    create_attention,
    get_attention,
    list_attention,
    register_attention,
    registered_types,
    unregister_attention,
)
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
from .readfile import Limits
from .recipe import Recipe, get_recipe
from .report import Report
from .rulefile import RuleSet, list_builtin_rules, load_rules
from .scores import SiteScores
from .scoring import score_sites
from .version import DISTRIBUTION, __version__

__all__ = [
    "retrofit",
    "analyze",
    "plan",
    "get_report",
    "score_sites",
    "param_groups",
    "SiteScores",
    "save",
    "load",
    "Limits",
    "push_to_hub",
    "create_model",
    "Recipe",
    "RetrofitOptions",
    "get_recipe",
    "Report",
    "RuleSet",
    "load_rules",
    "list_builtin_rules",
    "attention",
    "register_attention",
    "get_attention",
    "list_attention",
    "create_attention",
    "registered_types",
    "unregister_attention",
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
    "DISTRIBUTION",
]
