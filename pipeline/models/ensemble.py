"""Ensemble of property models: members trained apart (other seeds, other encoders), averaged.

Two models trained side by side on the two cores of a small machine (or as a Slurm array) and
averaged predict better than one model given both cores: the members' errors are partly
independent, while a second thread speeds one model up far less than 2x (the cores are
hyperthread pairs here). Measured in ``bench/results/crystal_encoders.md``.

The members must learn the same targets in the same space: the same target specs and the same
normalisation buffers (element references, means, standard deviations), which members
fine-tuned on the same training split of the same shards have. Then averaging is done where
the members are trained, in the normalised learned space: regressions are averaged there (for
log10 targets that is the geometric mean of the moduli) and gate logits are averaged before the
gate decides, so a band gap is exactly zero only where the members together say "metal". The
ensemble answers the calls a :class:`~pipeline.models.property.PropertyModel` answers
(``outputs``, ``predict``, ``to_physical``, ``normalize``, ``views``, ``targets``), so
evaluation, prediction and curvature analysis take either.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from pipeline import MolmatError
from pipeline.graphs import GraphBatch
from pipeline.models.property import PropertyModel, TargetSpec

#: Buffers that define a member's learned space; they must be equal across members.
_SPACE_BUFFERS = ("mean", "std", "element_ref", "is_log10", "is_extensive", "is_gated", "has_baseline")


class PropertyEnsemble(nn.Module):
    """The mean of several property models of the same targets and normalisation.

    Args:
        members: two or more property models (their weights are used as they are).
        check: refuse members of other targets or normalisation (off only while building
            members whose weights are loaded next).
    Raises:
        MolmatError: fewer than two members, or members that learn other targets or another
            normalised space.
    Shapes: ``outputs(batch)`` returns the members' mean normalised predictions (B, T) and mean
    gate logits (B, T); ``predict(batch)`` physical values (B, T) float64.
    """

    def __init__(self, members: Sequence[PropertyModel], check: bool = True) -> None:
        super().__init__()
        if len(members) < 2:
            raise MolmatError(f"an ensemble needs at least two members, got {len(members)}")
        if check:
            check_members(members)
        self.members = nn.ModuleList(members)
        self.targets: list[TargetSpec] = list(members[0].targets)

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "PropertyEnsemble":
        """Randomly initialised members from an ensemble directory's ``config.json``.

        Args:
            config: plain data with ``members``, one property model config (``model`` and
                ``targets``) per member.
        """
        # the normalisation buffers are still unfitted here: the weights bring them, and
        # load_state_dict checks them then
        return cls([PropertyModel.from_config(m) for m in config["members"]], check=False)

    def load_state_dict(self, state: Any, strict: bool = True, assign: bool = False) -> Any:
        """Load the members' weights, then check that they share one learned space."""
        result = super().load_state_dict(state, strict=strict, assign=assign)
        check_members(list(self.members))
        return result

    @property
    def first(self) -> PropertyModel:
        """The member whose transforms (all members share them) turn outputs into physical units."""
        return self.members[0]

    def views(self) -> list[str]:
        """The graph views any member reads (``"2d"``, ``"3d"``)."""
        seen: list[str] = []
        for m in self.members:
            seen += [v for v in m.views() if v not in seen]
        return seen

    def outputs(self, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean normalised regression outputs (B, T) and mean gate logits (B, T) of the members."""
        preds, logits = zip(*(m.outputs(batch) for m in self.members))
        return torch.stack(preds).mean(0), torch.stack(logits).mean(0)

    def forward(self, batch: GraphBatch, gates: bool = False) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Mean normalised outputs (B, T); with ``gates`` also the mean gate logits (B, T)."""
        return self.outputs(batch) if gates else self.outputs(batch)[0]

    def normalize(self, y: torch.Tensor, mask: torch.Tensor, batch: GraphBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Physical targets (B, T) -> the shared normalised learned space (B, T), with the mask."""
        return self.first.normalize(y, mask, batch)

    def gate_labels(self, y: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What the gates learn: (B, T) float ``y > 0`` and (B, T) bool mask."""
        return self.first.gate_labels(y, mask)

    def to_physical(self, pred: torch.Tensor, batch: GraphBatch, logits: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised predictions (B, T) (and gate logits (B, T)) -> physical units (B, T) float64."""
        return self.first.to_physical(pred, batch, logits)

    @torch.no_grad()
    def predict(self, batch: GraphBatch) -> torch.Tensor:
        """Predictions in physical units (B, T) float64."""
        pred, logits = self.outputs(batch)
        return self.to_physical(pred, batch, logits)

    def describe(self) -> list[dict[str, Any]]:
        """Target specs as plain data (for config.json)."""
        return self.first.describe()


def check_members(members: Sequence[PropertyModel]) -> None:
    """Refuse members that cannot be averaged in one learned space.

    Raises:
        MolmatError: other targets (names, order, transforms) or other normalisation buffers
            than the first member's, naming the member and what differs.
    """
    first = members[0]
    for i, m in enumerate(members[1:], start=1):
        if m.describe() != first.describe():
            raise MolmatError(f"ensemble member {i} learns other targets than member 0 "
                              f"({[t.name for t in m.targets]} vs {[t.name for t in first.targets]}, "
                              "or other transforms or weights)")
        for name in _SPACE_BUFFERS:
            a, b = getattr(first, name), getattr(m, name)
            if a.shape != b.shape or not torch.equal(a, b):
                raise MolmatError(f"ensemble member {i} normalises its targets differently from member 0 ({name} "
                                  "differs): members must be fine-tuned on the same training split of the same "
                                  "shards (finetune.max_train and the split seed included)")
