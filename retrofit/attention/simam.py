"""SimAM: a simple, parameter-free attention module.

Yang, Zhang, Li, Xie: "SimAM: A Simple, Parameter-Free Attention Module for Convolutional
Neural Networks", ICML 2021, PMLR 139:11863-11874 (the paper has no arXiv id); official code
github.com/ZjjConan/SimAM.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._gate import check_gate, zero_init_
from ._registry import register_attention

__all__ = ["SimAM"]


@register_attention("simam")
class SimAM(nn.Module):
    """SimAM: every activation's inverse minimal energy,
    ``e = (x - mu)^2 / (4 * (var + e_lambda)) + 1/2`` (mean and variance over the channel's
    map, variance with ``H*W - 1`` in the denominator), gives the gate ``sigma(e)``.

    Where it differs: the paper's gate has no parameter, so nothing can start it at identity.
    This module blends it with one learnable weight per channel,
    ``gate = 1 + alpha * (sigma(e) - 1)``: ``alpha = 0`` is the identity (the ``identity``
    form's init), ``alpha = 1`` the paper's gate (the ``sigmoid`` form's init, equal to it
    up to rounding). That adds ``C`` parameters. A 1x1 map (a single activation, no
    variance) gets ``e = 1/2`` instead of the official code's division by zero.

    Args:
        channels: input (and output) channels.
        e_lambda: the energy's regularizer lambda.
        gate: ``"identity"`` (output equals input at init) or ``"sigmoid"`` (the paper).
        device: where to create the parameters.
        dtype: dtype of the parameters.
    """

    fused_gates = ("scale",)  # forward is x * scale(x): the rewrite may fuse it into a residual add

    def __init__(
        self,
        channels: int,
        e_lambda: float = 1e-4,
        gate: str = "identity",
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.gate = check_gate(gate)
        self.e_lambda = e_lambda
        self.alpha = nn.Parameter(torch.empty(channels, 1, 1, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``alpha = 0`` with the identity gate, 1 (the paper's gate) with the sigmoid one."""
        if self.gate == "identity":
            zero_init_(self.alpha)
        else:
            nn.init.constant_(self.alpha, 1.0)

    def energy(self, x: Tensor) -> Tensor:
        """The inverse energy ``e`` of every activation, shape ``(N, C, H, W)``."""
        n = max(x.shape[-2] * x.shape[-1] - 1, 1)
        d = (x - x.mean((2, 3), keepdim=True)).square()
        return d / (4 * (d.sum((2, 3), keepdim=True) / n + self.e_lambda)) + 0.5

    def scale(self, x: Tensor) -> Tensor:
        """The gate, shape ``(N, C, H, W)``."""
        return 1.0 + self.alpha * (torch.sigmoid(self.energy(x)) - 1.0)

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale(x)
