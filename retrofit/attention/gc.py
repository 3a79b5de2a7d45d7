"""Global Context block.

Cao, Xu, Lin, Wei, Hu: "GCNet: Non-local Networks Meet Squeeze-Excitation Networks and
Beyond", ICCV Workshops 2019, arXiv:1904.11492.

Two types: ``gc`` as GCNet's official code builds it, and ``gca``, the add fusion as timm
builds it (so timm's weights load).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..errors import AttentionError
from ._act import get_act_layer
from ._additive import check_additive_gate
from ._factory import FactoryKwargs
from ._gate import apply_gate, check_gate, zero_init_
from ._reduction import reduced_channels
from ._registry import register_attention

__all__ = ["GlobalContext", "GlobalContextAdd"]


def _transform(channels: int, rd_channels: int, act_layer: type[nn.Module], dd: FactoryKwargs) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(channels, rd_channels, **dd),
        nn.LayerNorm(rd_channels, **dd),
        act_layer(),
        nn.Linear(rd_channels, channels, **dd),
    )


@register_attention("gc")
class GlobalContext(nn.Module):
    """Global Context: softmax-weighted pooling of the map into one context vector (a 1x1
    convolution scores every position), a bottleneck transform with LayerNorm, then fusion
    into every position: ``x + transform(context)`` (the paper's default, ``fuse_add``)
    and/or ``x * gate(transform'(context))`` (``fuse_scale``).

    Arguments follow timm's ``GlobalContext``; defaults are the paper's (add fusion only,
    ratio 1/16; timm's are scale fusion and 1/8). The add branch's last layer starts at
    zero in both gate forms, as in the official code, so the add fusion alone is an
    identity at init; the ``gate`` argument chooses the form of the scale branch and so
    needs ``fuse_scale=True`` to mean anything: ``gate="sigmoid"`` without it raises.
    Where it differs: the bottleneck layers are ``nn.Linear`` on the pooled vector (the
    paper's 1x1 convolutions on a 1x1 map, same parameters). ``scale(x)`` (scale fusion
    only) returns the gate, shape ``(N, C, 1, 1)``; ``delta(x)`` the added term.

    Args:
        channels: input (and output) channels.
        fuse_add: add the transformed context (the paper's best fusion).
        fuse_scale: multiply by a gate from a second transform of the context.
        rd_ratio: bottleneck width as a fraction of ``channels``.
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this.
        act_layer: activation in the bottleneck (class or timm name).
        gate: ``"identity"`` (output equals input at init) or, with ``fuse_scale``,
            ``"sigmoid"`` (the paper's scale fusion and init).
        device: where to create the parameters.
        dtype: dtype of the parameters.

    Raises:
        AttentionError: neither fusion is on, or ``gate="sigmoid"`` without ``fuse_scale``.
    """

    def __init__(
        self,
        channels: int,
        fuse_add: bool = True,
        fuse_scale: bool = False,
        rd_ratio: float = 1.0 / 16,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not (fuse_add or fuse_scale):
            raise AttentionError("gc: set fuse_add, fuse_scale or both; with neither the block does nothing")
        self.gate = check_gate(gate) if fuse_scale else check_additive_gate(
            "gc", gate, ", or fuse_scale=True for the paper's scale fusion"
        )
        rd_channels = reduced_channels("gc", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        act = get_act_layer("gc", act_layer)
        self.conv_attn = nn.Conv2d(channels, 1, 1, **dd)
        self.mlp_add = _transform(channels, rd_channels, act, dd) if fuse_add else None
        self.mlp_scale = _transform(channels, rd_channels, act, dd) if fuse_scale else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The official init (Kaiming fan-in scores, add branch's last layer at zero); with
        the identity gate the scale branch's last layer starts at zero too."""
        nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
        if self.conv_attn.bias is not None:  # always: the scoring convolution is built with a bias
            nn.init.zeros_(self.conv_attn.bias)
        for mlp in (self.mlp_add, self.mlp_scale):
            if mlp is None:
                continue
            for layer in mlp:
                reset = getattr(layer, "reset_parameters", None)  # the activation has none
                if callable(reset):
                    reset()
            if mlp is self.mlp_add or self.gate == "identity":
                zero_init_(mlp[-1])

    __jit_unused_properties__ = ["fused_gates"]  # torch.jit.script: not part of forward

    @property
    def fused_gates(self) -> tuple[str, ...]:
        """``("scale",)`` with scale fusion alone (forward is then ``x * scale(x)``), else ``()``:
        with add fusion the forward adds a term and is no product of gates."""
        return ("scale",) if self.mlp_add is None else ()

    def context(self, x: Tensor) -> Tensor:
        """The softmax-pooled context, shape ``(N, C)``."""
        n, c, h, w = x.shape
        attn = self.conv_attn(x).reshape(n, 1, h * w).softmax(dim=-1)  # (N, 1, HW)
        return torch.bmm(x.reshape(n, c, h * w), attn.transpose(1, 2)).reshape(n, c)

    def scale(self, x: Tensor) -> Tensor:
        """The scale fusion's gate, shape ``(N, C, 1, 1)``."""
        if self.mlp_scale is None:
            raise AttentionError("gc: scale() needs fuse_scale=True")
        return apply_gate(self.mlp_scale(self.context(x)), self.gate)[:, :, None, None]

    def delta(self, x: Tensor) -> Tensor:
        """The add fusion's term, shape ``(N, C, 1, 1)``."""
        if self.mlp_add is None:
            raise AttentionError("gc: delta() needs fuse_add=True")
        return self.mlp_add(self.context(x))[:, :, None, None]

    def forward(self, x: Tensor) -> Tensor:
        ctx = self.context(x)
        if self.mlp_scale is not None:
            x = x * apply_gate(self.mlp_scale(ctx), self.gate)[:, :, None, None]
        if self.mlp_add is not None:
            x = x + self.mlp_add(ctx)[:, :, None, None]
        return x


class _ConvMlp(nn.Module):
    """timm's ``ConvMlp`` with ``LayerNorm2d`` on a pooled ``(N, C, 1, 1)`` context: 1x1
    convolution, LayerNorm over the hidden channels (eps 1e-6), activation, 1x1 convolution;
    the state-dict keys are timm's (``fc1``, ``norm``, ``fc2``)."""

    def __init__(self, channels: int, rd_channels: int, act_layer: type[nn.Module], dd: FactoryKwargs) -> None:
        super().__init__()
        self.fc1 = nn.Conv2d(channels, rd_channels, 1, **dd)
        self.norm = nn.LayerNorm(rd_channels, eps=1e-6, **dd)
        self.act = act_layer()
        self.fc2 = nn.Conv2d(rd_channels, channels, 1, **dd)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm(self.fc1(x).permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LayerNorm over channels
        return self.fc2(self.act(x))


@register_attention("gca")
class GlobalContextAdd(nn.Module):
    """Global Context with add fusion, as timm builds it (timm's ``gca``): softmax-weighted
    pooling into one context vector, a 1x1-convolution bottleneck with LayerNorm, added to
    every position, ``x + transform(context)``.

    Arguments, defaults and state-dict keys are timm's ``GlobalContext(fuse_add=True,
    fuse_scale=False)`` (bottleneck ratio 1/8; ``conv_attn``, ``mlp_add.fc1``,
    ``mlp_add.norm``, ``mlp_add.fc2``), so its weights load into it and, with the same
    weights, the output is timm's. There is one form, additive: it is an identity at init
    because ``mlp_add.fc2`` starts at zero, weight and bias (timm zeroes only the weight,
    so timm's module at init adds ``fc2``'s random bias); ``fc2`` learns from the first step,
    the layers before it from the second. ``gate="sigmoid"`` raises. Where it differs from
    retrofit's ``gc`` (GCNet's official code): timm's bottleneck width (1/8, not 1/16),
    1x1 convolutions and LayerNorm eps (1e-6), and ``use_attn=False`` to pool by the mean.
    ``delta(x)`` returns the added term.

    Args:
        channels: input (and output) channels.
        use_attn: pool by a softmax over positions scored by a 1x1 convolution (the
            paper's); ``False``: the plain mean.
        rd_ratio: bottleneck width as a fraction of ``channels``.
        rd_channels: bottleneck width; overrides ``rd_ratio``.
        rd_divisor: round the bottleneck width to a multiple of this.
        act_layer: activation in the bottleneck (class or timm name).
        gate: ``"identity"``, the only form.
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    def __init__(
        self,
        channels: int,
        use_attn: bool = True,
        rd_ratio: float = 1.0 / 8,
        rd_channels: int | None = None,
        rd_divisor: int = 1,
        act_layer: type[nn.Module] | str = nn.ReLU,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_additive_gate("gca", gate, ", or attn='gc' with fuse_scale=True for a scale fusion")
        rd_channels = reduced_channels("gca", channels, rd_ratio, rd_channels, rd_divisor)
        dd: FactoryKwargs = {"device": device, "dtype": dtype}
        self.conv_attn = nn.Conv2d(channels, 1, 1, **dd) if use_attn else None
        self.mlp_add = _ConvMlp(channels, rd_channels, get_act_layer("gca", act_layer), dd)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's init (Kaiming fan-in scores; the bias, which the softmax ignores, at zero);
        the bottleneck's last layer at zero, weight and bias."""
        if self.conv_attn is not None:
            nn.init.kaiming_normal_(self.conv_attn.weight, mode="fan_in", nonlinearity="relu")
            if self.conv_attn.bias is not None:  # always: the scoring convolution is built with a bias
                nn.init.zeros_(self.conv_attn.bias)
        self.mlp_add.fc1.reset_parameters()
        self.mlp_add.norm.reset_parameters()
        zero_init_(self.mlp_add.fc2)

    def context(self, x: Tensor) -> Tensor:
        """The pooled context, shape ``(N, C, 1, 1)``."""
        if self.conv_attn is None:
            return x.mean((2, 3), keepdim=True)
        n, c, h, w = x.shape
        attn = self.conv_attn(x).reshape(n, 1, h * w).softmax(dim=-1)  # (N, 1, HW)
        return torch.bmm(x.reshape(n, c, h * w), attn.transpose(1, 2)).reshape(n, c, 1, 1)

    def delta(self, x: Tensor) -> Tensor:
        """The added term, shape ``(N, C, 1, 1)``."""
        return self.mlp_add(self.context(x))

    def forward(self, x: Tensor) -> Tensor:
        return x + self.delta(x)
