"""Where attention pays, measured before training: the records of a gradient score per
candidate site (:func:`retrofit.score_sites`, in :mod:`retrofit.scoring`, computes them).

Every module retrofit inserts starts as an exact identity, with the layer that makes its
gate's logit (or its added branch) at zero. The gradient of the loss with respect to that
zero layer, on a few batches of the user's own data, is a first-order measure of how much
the loss would drop if that module were allowed to open: a gradient step of size ``lr``
on it lowers the loss by about ``lr * |g|^2``. Growing networks decide where to add units
the same way (GradMax, Evci et al., ICLR 2022, arXiv:2201.05125; Firefly, Wu et al.,
NeurIPS 2020, arXiv:2102.08574). :func:`score_sites` inserts a module at every candidate
site, runs the batches forward and backward without changing any weight, and returns the
score of each site beside what it costs (parameters, FLOPs); rule files can then select by
score (``select = { top = 4 }``) or within a budget (``budget = { params = 0.02 }``).

Where it differs from those papers: they score new units by the gradient norm at the
moment of growth and grow the largest; here the score is the root mean square of the
gradient over the zero-initialised parameters (so sites of different widths compare), and
the choice is left to the rules, beside each site's cost.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SiteScore", "SiteScores"]


@dataclass(frozen=True)
class SiteScore:
    """One candidate site: how much its module's gradient says attention would help there."""

    path: str  # site path (what rules match)
    qualname: str  # the site's node ("layer3.2.add"), unique where a module holds two sites
    kind: str  # "residual-add" or "conv-block"
    position: str  # "branch", "mid" or "after"
    attn: str  # the attention scored
    channels: int  # channels the module sees
    size: tuple[int, int]  # spatial size it sees (at the scoring input)
    stage: int  # 1-based stage, as rules number them
    module: str  # the candidate module's name in the retrofitted model
    score: float  # RMS of the mean gradient over the module's zero-initialised parameters
    grad_norm: float  # L2 norm of that gradient (not normalised)
    params: int  # parameters the module adds
    flops: int  # FLOPs per sample the module adds (torch.utils.flop_counter)

    @property
    def key(self) -> tuple[str, str]:
        """What a plan matches a placement by: ``(site node, position)``."""
        return self.qualname, self.position


@dataclass(frozen=True)
class SiteScores:
    """The scores of every candidate site, in graph order, and what they were measured on."""

    rows: tuple[SiteScore, ...]  # candidate sites, in graph order
    attn: str  # the rule set or attention scored
    batches: int  # batches the gradient was averaged over
    images: int  # images in those batches
    model_params: int  # parameters of the model before any insertion
    model_flops: int | None  # FLOPs per sample of the model before any insertion

    def get(self, qualname: str, position: str) -> SiteScore | None:
        """The score of one site (by its node's qualified name) and position, if it was a candidate."""
        return next((r for r in self.rows if r.key == (qualname, position)), None)

    def ranked(self) -> tuple[SiteScore, ...]:
        """The rows, best score first (ties: graph order)."""
        return tuple(sorted(self.rows, key=lambda r: (r.score != r.score, -r.score if r.score == r.score else 0.0)))

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready plain data."""
        return {"attn": self.attn, "batches": self.batches, "images": self.images,
                "model_params": self.model_params, "model_flops": self.model_flops,
                "rows": [{**r.__dict__, "size": list(r.size)} for r in self.rows]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SiteScores:
        """The inverse of :meth:`to_dict` (a recipe keeps scores as plain data).

        Raises:
            ModelLoadError: ``d`` is not what :meth:`to_dict` writes.
        """
        from .errors import ModelLoadError

        try:
            rows = tuple(SiteScore(**{**r, "size": tuple(r["size"])}) for r in d["rows"])
            return cls(rows, d["attn"], d["batches"], d["images"], d["model_params"], d["model_flops"])
        except (KeyError, TypeError) as e:
            raise ModelLoadError(f"site scores in the recipe are not what score_sites writes: {e}") from e

    def table(self) -> str:
        """One row per site, best first: rank, site, score, gradient norm and costs."""
        from tabulate import tabulate

        rows = [[i, r.path or "<root>", r.position, r.channels, f"{r.size[0]}x{r.size[1]}", r.stage,
                 f"{r.score:.3e}", f"{r.grad_norm:.3e}", r.params,
                 f"{100 * r.params / max(self.model_params, 1):.3f}%", r.flops]
                for i, r in enumerate(self.ranked(), 1)]
        return tabulate(rows, headers=["rank", "site", "position", "C", "size", "stage", "score", "|grad|",
                                       "params", "of model", "FLOPs"], intfmt=",")

    def __str__(self) -> str:
        return (f"{self.attn} scores of {len(self.rows)} sites on {self.images} images ({self.batches} batches)\n"
                + self.table())
