"""The gate check of additive mechanisms: ``x + f(x)`` with ``f``'s last layer at zero.

Non-local, PSA and channel self-attention (and GC's add fusion) have no sigmoid gate to
switch to the paper's form: they reach identity because their output projection starts at
zero, which is also how the papers initialize them (non-local and GCNet) or the only way
to start at identity (PSA, channel self-attention). They accept only ``gate="identity"``.
"""

from __future__ import annotations

from ..errors import AttentionError
from ._gate import check_gate

__all__ = ["check_additive_gate"]


def check_additive_gate(name: str, gate: str, hint: str = "") -> str:
    """Return ``gate`` if it is ``"identity"``; another known gate form raises.

    Args:
        name: the attention's registered name, for the message.
        gate: the requested gate form.
        hint: an extra way out to add to the message (", or ...").
    """
    check_gate(gate)
    if gate != "identity":
        raise AttentionError(
            f"attention {name!r} has no sigmoid gate: it adds a branch whose output projection "
            f"starts at zero (x + f(x)); use gate='identity'{hint}"
        )
    return gate
