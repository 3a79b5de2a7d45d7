"""retrofit: add identity-initialized attention to trained CNNs without touching their code."""

from . import attention
from .api import analyze, get_report, plan, retrofit
from .attention import create_attention, get_attention, list_attention, register_attention
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
from .hub import push_to_hub
from .models import create_model
from .recipe import Recipe, get_recipe
from .report import Report
from .rulefile import RuleSet, list_builtin_rules, load_rules
from .saving import load, save
from .scores import SiteScores, score_sites

# The one place the version is written (pyproject.toml reads it from here).
__version__ = "0.2.0"
# The name this project installs under (`pip install torch-retrofit`); the import name and
# the command are `retrofit`. The distribution called `retrofit` on PyPI is another project.
DISTRIBUTION = "torch-retrofit"

__all__ = [
    "retrofit",
    "analyze",
    "plan",
    "get_report",
    "score_sites",
    "SiteScores",
    "save",
    "load",
    "push_to_hub",
    "create_model",
    "Recipe",
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
