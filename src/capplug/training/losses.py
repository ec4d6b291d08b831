"""The scorer's training losses, as named objects: each one documented, testable alone, and
combined by :class:`ScorerObjective` the way a run's settings ask.

Every loss takes the scorer's logits for a batch of (instruction, response) pairs, their labels
in [0, 1], and, for the losses that compare responses, each pair's example (``groups``: pairs of
one example share an id, and a batch holds whole examples).

- :class:`PointwiseLoss`: each pair alone against its label (``bce`` on the logits, or ``mse``
  on the scores); the Cappy recipe's regression.
- :class:`RankLoss`: for every two responses of one example whose labels differ, a logistic loss
  on the gap of their logits, weighted by the gap of their labels.
- :class:`ListwiseLoss`: the softmax over one example's responses against its labels (normalised
  to sum to one): the decision multiple choice makes.

    objective = ScorerObjective("bce", rank_weight=1.0, listwise_weight=0.5)
    total, parts = objective(logits, labels, groups)   # parts: each loss alone, for the log
    objective.name                                     # "bce + 1.0 x rank + 0.5 x listwise"
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

__all__ = ["ListwiseLoss", "PointwiseLoss", "RankLoss", "ScorerObjective", "ordered_pairs"]

PointwiseKind = Literal["bce", "mse"]


def ordered_pairs(labels: torch.Tensor, groups: torch.Tensor) -> torch.Tensor:
    """``mask[a, b]``: a and b answer the same example and a's label is the higher one."""
    label_gap = labels[:, None] - labels[None, :]
    return (groups[:, None] == groups[None, :]) & (label_gap > 1e-6)


@dataclass(frozen=True)
class PointwiseLoss:
    """Each pair against its own label: binary cross-entropy on the logit (``bce``), or the
    squared error of the score (``mse``)."""

    kind: PointwiseKind = "bce"

    def __post_init__(self) -> None:
        if self.kind not in ("bce", "mse"):
            raise ValueError(f"the pointwise loss is 'bce' or 'mse'; got {self.kind!r}")

    def __call__(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "bce":
            return torch.nn.functional.binary_cross_entropy_with_logits(logits, labels)
        return torch.nn.functional.mse_loss(torch.sigmoid(logits), labels)


@dataclass(frozen=True)
class RankLoss:
    """Label-gap-weighted logistic loss over the ordered pairs of each example's responses;
    0 (with a graph, so ``backward()`` works) when no two labels differ."""

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        mask = ordered_pairs(labels, groups)
        if not bool(mask.any()):
            return logits.sum() * 0.0
        weight = (labels[:, None] - labels[None, :])[mask]
        logit_gap = (logits[:, None] - logits[None, :])[mask]
        return (weight * torch.nn.functional.softplus(-logit_gap)).sum() / weight.sum()


@dataclass(frozen=True)
class ListwiseLoss:
    """Mean over the examples whose labels differ of the cross-entropy between the softmax of
    the example's logits and its labels normalised to sum to one; 0 when none qualifies."""

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
    ) -> torch.Tensor:
        total = logits.sum() * 0.0  # keeps the graph, so backward() works on any batch
        counted = 0
        for group in torch.unique(groups):
            member = groups == group
            target = labels[member]
            if int(member.sum()) < 2 or float(target.max() - target.min()) <= 1e-6:
                continue
            log_probs = torch.log_softmax(logits[member], dim=0)
            total = total - (target / target.sum() * log_probs).sum()
            counted += 1
        return total / max(1, counted)


@dataclass(frozen=True)
class ScorerObjective:
    """The pointwise loss plus the weighted losses that compare an example's responses."""

    pointwise: PointwiseKind = "bce"
    rank_weight: float = 0.0
    listwise_weight: float = 0.0

    def __post_init__(self) -> None:
        PointwiseLoss(self.pointwise)  # checks the kind
        for name in ("rank_weight", "listwise_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0; got {getattr(self, name)}")

    @property
    def name(self) -> str:
        """The objective as the model card writes it, e.g. ``bce + 1.0 x rank``."""
        name = self.pointwise
        if self.rank_weight:
            name += f" + {self.rank_weight} x rank"
        if self.listwise_weight:
            name += f" + {self.listwise_weight} x listwise"
        return name

    @property
    def compares(self) -> bool:
        """Whether a loss compares an example's responses, so batches must hold whole
        examples."""
        return self.rank_weight > 0 or self.listwise_weight > 0

    def point(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The pointwise loss alone."""
        return PointwiseLoss(self.pointwise)(logits, labels)

    def compared(
        self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The weighted sum of the losses that compare responses, and each one alone."""
        total = logits.sum() * 0.0
        parts: dict[str, float] = {}
        for weight, loss, key in (
            (self.rank_weight, RankLoss(), "rank_loss"),
            (self.listwise_weight, ListwiseLoss(), "listwise_loss"),
        ):
            if weight > 0:
                value = loss(logits, labels, groups)
                total = total + weight * value
                parts[key] = float(value.detach())
        return total, parts

    def __call__(
        self, logits: torch.Tensor, labels: torch.Tensor, groups: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """The whole objective and its parts (``pointwise_loss`` and each compared one)."""
        point = self.point(logits, labels)
        if not self.compares or groups is None:
            return point, {"pointwise_loss": float(point.detach())}
        compared, parts = self.compared(logits, labels, groups)
        return point + compared, {"pointwise_loss": float(point.detach()), **parts}
