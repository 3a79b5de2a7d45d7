"""Attention modules, one paper per file, all registered by short name.

``__all__`` is the public part: the registry, the gates and every built-in type. The other
names imported here (``X as X``) are for the rest of the package, not part of the API.
"""

from ._gate import GATES, gate_methods
from ._gate import zero_init_params as zero_init_params
from ._identity import identity_error as identity_error
from ._reduction import check_reduction_args as check_reduction_args
from ._registry import (
    create_attention,
    get_attention,
    list_attention,
    register_attention,
    registered_types,
    unregister_attention,
)
from ._registry import is_registered as is_registered
from .bam import Bam
from .cbam import Cbam, LightCbam
from .chsa import ChannelSelfAttn
from .coord import CoordAttn, SimpleCoordAttn
from .eca import CircularEfficientChannelAttn, EfficientChannelAttn, EfficientChannelAttnMlp, eca_kernel_size
from .ela import EfficientLocalAttn
from .ema import EfficientMultiScaleAttn
from .ese import EffectiveSqueezeExcite
from .gam import GlobalAttnMechanism
from .gc import GlobalContext, GlobalContextAdd
from .ge import GatherExcite
from .lska import LSKA_KERNELS, LargeSeparableKernelAttn
from .mlca import MixedLocalChannelAttn, mlca_kernel_size
from .nonlocal_ import NonLocal
from .polarized import PolarizedSelfAttn
from .psa import PointwiseSpatialAttn
from .scse import ConcurrentSqueezeExcite
from .se import SqueezeExcite
from .sge import SpatialGroupEnhance
from .shuffle import ShuffleAttn
from .simam import SimAM
from .strip import StripAttn
from .triplet import TripletAttn

__all__ = [
    "GATES",
    "gate_methods",
    "register_attention",
    "unregister_attention",
    "registered_types",
    "get_attention",
    "list_attention",
    "create_attention",
    "SqueezeExcite",
    "EfficientChannelAttn",
    "eca_kernel_size",
    "Cbam",
    "CoordAttn",
    "GatherExcite",
    "GlobalContext",
    "SimAM",
    "NonLocal",
    "ChannelSelfAttn",
    "PointwiseSpatialAttn",
    "EffectiveSqueezeExcite",
    "EfficientChannelAttnMlp",
    "CircularEfficientChannelAttn",
    "GlobalContextAdd",
    "LightCbam",
    "SimpleCoordAttn",
    "EfficientLocalAttn",
    "StripAttn",
    "EfficientMultiScaleAttn",
    "GlobalAttnMechanism",
    "ShuffleAttn",
    "TripletAttn",
    "Bam",
    "ConcurrentSqueezeExcite",
    "LargeSeparableKernelAttn",
    "LSKA_KERNELS",
    "MixedLocalChannelAttn",
    "mlca_kernel_size",
    "SpatialGroupEnhance",
    "PolarizedSelfAttn",
]
