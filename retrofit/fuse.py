"""Fused gates: the gate's multiply and the residual add as one op.

A gating module (SE, ECA, CBAM) returns ``x * g``; at a residual-add site the block then
adds the shortcut. Computed apart, ``x * g`` is written to memory and read back by the
add: one full read and one full write of the activation that do nothing useful. The
fused form computes the gate ``g`` alone and emits ``torch.addcmul(shortcut, x, g)``,
which reads ``x`` and the shortcut once and writes the sum once (torchvision's
``SqueezeExcitation._scale`` is split off from its forward for the same reason).

:func:`gated_residual` is the op the rewrite puts in the graph in place of the module call
and the add. It computes ``shortcut + attn(branch)``, bit for bit at init (the identity
gate is exactly 1.0, and ``s + x * 1.0`` rounds once either way). Once a gate moves away
from 1.0 the two forms differ by at most one rounding per element: PyTorch's CPU
``addcmul`` rounds ``s + x * g`` once (a fused multiply-add), the unfused ``mul`` then
``add`` round twice, so the fused form is the more accurate one. It falls back to calling
the module when the module has hooks of its own (so ``register_forward_pre_hook`` and
friends still see every call) or when it is no longer a known gating module (a user
replaced it).

Without autograd (``torch.no_grad``, ``torch.inference_mode``) and when nothing else reads
the branch tensor (the rewrite checks that a conv, a norm or a gating module made it and
the attention is its only reader: ``donate``), the products and the sum are written into
the branch's memory, as timm's and torchvision's ``x += shortcut`` do, so the fused block
allocates no activation-sized tensor at all. As in those blocks, a forward hook that keeps
a reference to that conv's or norm's output sees it overwritten; ``fuse=False`` avoids it.

A module is fusable when its class declares its forward as a chain of gates, ``x = x *
getattr(self, m)(x)`` for each method name ``m`` of ``fused_gates`` in order (the one
declaration, read by :func:`~retrofit.attention.gate_methods`): SE and ECA declare
``("scale",)``, CBAM ``("channel_scale", "spatial_scale")``, and any other class can do the
same.

Under TorchScript (``torch.jit.script`` of a fused result) :func:`gated_residual` calls the
module and adds, ``attn(branch) + shortcut``: the unfused form, so a scripted model equals
the model run with ``fuse=False`` bit for bit, and the fused one bit for bit at init and
within one rounding per element after training.
"""

from __future__ import annotations

import warnings

import torch
from torch import Tensor, nn

from .attention import gate_methods

__all__ = ["gate_methods", "gated_residual"]


with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)  # torch deprecates TorchScript; this serves only it

    @torch.jit.interface
    class _Gating(nn.Module):
        """What TorchScript needs to know of the module :func:`gated_residual` is given."""

        # TorchScript rejects any interface body but a lone `pass`, which mypy reads as a
        # missing return: the declaration is right, the checker cannot know the decorator.
        def forward(self, x: Tensor) -> Tensor:  # type: ignore[empty-body]
            pass


def _observed(module: nn.Module) -> bool:
    """Whether hooks are registered on ``module`` itself, so it must be called, not bypassed.

    The same dictionaries ``nn.Module.__call__`` checks for its own fast path. Global hooks
    (``register_module_forward_hook``) are left out: tools such as ``FlopCounterMode``
    install them, and they should measure the fused form, not turn it off.
    """
    return bool(
        module._forward_pre_hooks or module._forward_hooks or module._backward_pre_hooks or module._backward_hooks
    )


def gated_residual(attn: _Gating, branch: Tensor, shortcut: Tensor, donate: bool = False) -> Tensor:
    """``shortcut + attn(branch)``, with ``attn``'s last gate multiplied in by the add.

    Args:
        attn: the attention module on the residual branch.
        branch: the residual branch's output (the module's input).
        shortcut: the other summand.
        donate: nothing reads ``branch`` after this op, so without autograd the products
            and the sum may be written into its memory (saving allocations, as timm's and
            torchvision's ``x += shortcut`` do).

    Returns:
        The block's sum; equal to ``attn(branch) + shortcut``.
    """
    if torch.jit.is_scripting():
        return attn.forward(branch) + shortcut
    return _fused(attn, branch, shortcut, donate)


@torch.jit.unused
def _fused(attn: nn.Module, branch: Tensor, shortcut: Tensor, donate: bool) -> Tensor:
    """:func:`gated_residual` in Python: the gates by name, the last one fused into the add."""
    methods = gate_methods(attn)
    if methods is None or _observed(attn):
        return attn(branch) + shortcut  # float addition commutes: same bits as the traced order
    # Without autograd nothing keeps `x` for a backward pass, so once `x` is ours (donated,
    # or a temporary made here) each product can be written into it.
    reuse = donate and not torch.is_grad_enabled()
    x = branch
    for name in methods[:-1]:
        gate = getattr(attn, name)(x)
        x = x.mul_(gate) if reuse and _fits(x, gate) else x * gate
        reuse = not torch.is_grad_enabled()
    gate = getattr(attn, methods[-1])(x)
    if reuse and _fits(x, gate, shortcut):
        return torch.addcmul(shortcut, x, gate, out=x)
    return torch.addcmul(shortcut, x, gate)


def _fits(x: Tensor, *others: Tensor) -> bool:
    """Whether an element-wise result of ``x`` and ``others`` can be written into ``x``."""
    if any(o.dtype != x.dtype for o in others):
        return False
    return torch.broadcast_shapes(x.shape, *(o.shape for o in others)) == x.shape
