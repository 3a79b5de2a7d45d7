"""Activation layers named by class or by timm name, without importing timm for a class."""

from __future__ import annotations

from torch import nn

from ..errors import AttentionError

__all__ = ["get_act_layer"]


def get_act_layer(attn: str, act_layer: type[nn.Module] | str) -> type[nn.Module]:
    """The activation class for ``act_layer``: a class as given, a name looked up in timm
    (``"relu"``, ``"silu"``, ``"hard_swish"``, ...; timm is imported only then).

    Raises:
        AttentionError: an unknown name, or no activation at all.
    """
    if isinstance(act_layer, str) and act_layer:
        from timm.layers import get_act_layer as timm_get_act_layer

        try:
            return timm_get_act_layer(act_layer)
        except KeyError:
            raise AttentionError(
                f"{attn}: unknown activation act_layer = {act_layer!r}; give a timm activation name "
                "(relu, silu, gelu, hard_swish, ...) or an nn.Module class"
            ) from None
    if not callable(act_layer):
        raise AttentionError(f"{attn}: act_layer = {act_layer!r} is not an activation; give an nn.Module class "
                             "or a timm activation name such as 'relu'")
    return act_layer
