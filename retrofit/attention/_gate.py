"""The two gate forms every attention module supports.

``sigmoid`` is the papers' gate, ``sigma(z)`` in (0, 1). ``identity`` is ``2 * sigma(z)`` in
(0, 2): the module's last layer starts at zero, so ``z == 0`` and the gate is exactly
``2 * 0.5 == 1.0`` in any float format. Multiplying by exactly one leaves the input bit for
bit unchanged, while the gradient of the gate at ``z == 0`` is 0.5, so training moves it
at once. A zero last layer passes no gradient to the layers before it, but the first
optimizer step makes it non-zero, so every parameter is learning from the second step on.
A paper whose gate is another function that is 0.5 at zero (effective SE's hard sigmoid)
gets that function doubled instead.

Which methods compute a module's gates is declared once, by its class:
``fused_gates = ("scale",)`` says ``forward(x)`` is exactly ``x * self.scale(x)``;
``("channel_scale", "spatial_scale")`` a chain of such products, in order; an empty tuple
(or no attribute) that the forward is not a product of gates (``x + f(x)``). The rewrite
fuses the last product into a residual add (:mod:`retrofit.fuse`) and gate inspection
(:mod:`retrofit.gates`) reads the gates, both through :func:`gate_methods`.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor, nn

from ..errors import AttentionError

__all__ = ["GATES", "check_gate", "apply_gate", "zero_init_", "zero_init_params", "gate_methods"]

GATES: tuple[str, ...] = ("identity", "sigmoid")
# The parameters zero_init_ zeroed (what makes a module's gate logit, or its added branch),
# by id: tensors compare element-wise, so they cannot be set members themselves.
_ZEROED: weakref.WeakValueDictionary[int, Tensor] = weakref.WeakValueDictionary()


def check_gate(gate: str) -> str:
    """Return ``gate`` if it is a known gate form, else raise naming the valid ones."""
    if gate not in GATES:
        raise AttentionError(f"unknown gate {gate!r} (valid: {', '.join(GATES)})")
    return gate


def apply_gate(z: Tensor, gate: str) -> Tensor:
    """Turn the logits ``z`` into a multiplicative gate of the given form."""
    if gate == "identity":
        return torch.sigmoid(z) * 2.0
    return torch.sigmoid(z)


def zero_init_(*layers: nn.Module | nn.Parameter) -> None:
    """Zero each layer's weight and bias (or a parameter itself): the last layer of a gate
    or an added branch, so the module starts as an exact identity.

    The zeroed parameters are remembered (:func:`zero_init_params`): their gradient at
    identity is what :func:`retrofit.score_sites` measures.
    """
    for layer in layers:
        params = [layer] if isinstance(layer, nn.Parameter) else \
            [p for p in (layer.weight, getattr(layer, "bias", None)) if isinstance(p, Tensor)]
        for p in params:
            nn.init.zeros_(p)
            _ZEROED[id(p)] = p


def zero_init_params(module: nn.Module) -> list[nn.Parameter]:
    """The parameters of ``module`` that :func:`zero_init_` zeroed when it was built, in
    ``parameters()`` order (empty for a module that was not started at identity that way)."""
    return [p for p in module.parameters() if _ZEROED.get(id(p)) is p]


def gate_methods(module: nn.Module) -> tuple[str, ...] | None:
    """The methods whose products make up ``module.forward``, in order, as its class declares
    them in ``fused_gates``; None when it declares none or an empty chain.

    A declaration holds for the ``forward`` it was written beside: a subclass that overrides
    ``forward`` without declaring ``fused_gates`` again inherits none (its forward may no
    longer be that product). A property works too, for a class whose instances differ
    (``GlobalContext`` is a product of gates only with scale fusion alone).

    Example:
        >>> gate_methods(Cbam(64))
        ('channel_scale', 'spatial_scale')
    """
    mro = type(module).__mro__
    declared = next((c for c in mro if "fused_gates" in vars(c)), None)
    forward_at = next((c for c in mro if "forward" in vars(c)), None)
    if declared is None or (forward_at is not None and not issubclass(declared, forward_at)):
        return None
    methods = getattr(module, "fused_gates", None)
    return tuple(methods) if methods else None
