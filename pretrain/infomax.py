"""3D Infomax (Stärk et al. 2022): align a 2D MPNN with a 3D encoder by a contrastive objective.

Each structure is seen as a 2D graph (bonds, or a crystal's neighbour topology without
distances) and as one or more 3D views (the stored geometry plus, for molecules, stored ETKDG
conformers). Both embeddings go through projection heads and are compared by cosine similarity.
The NT-Xent loss is symmetric: a 2D embedding must pick out its own 3D views among all views in
the batch (several positives when there are conformers: the mean of their log-probabilities, as
in supervised contrastive learning), and each 3D view must pick out its own 2D embedding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from pipeline.neighbours import molecule_neighbours
from pipeline.graphs import GraphBatch, collate


@dataclass
class PretrainBatch:
    """2D graphs of B structures and their M >= B 3D views.

    Attributes:
        graphs: batch of the B structures (``g2d`` used).
        views: batch of the M 3D views (``g3d`` used).
        owner: (M,) index in 0..B-1 of the structure each view belongs to.
    """

    graphs: GraphBatch
    views: GraphBatch
    owner: torch.Tensor

    @property
    def num_graphs(self) -> int:
        """Number of structures (B); what the trainer's throughput counts."""
        return self.graphs.num_graphs

    def to(self, device: torch.device | str) -> "PretrainBatch":
        """Move to ``device``."""
        return PretrainBatch(self.graphs.to(device), self.views.to(device), self.owner.to(device))


def conformer_records(rec: dict[str, Any], cutoff: float) -> list[dict[str, Any]]:
    """One record per stored extra conformer (``conformers`` (K, N, 3)), each a molecule record
    whose ``pos`` (N, 3) is that conformer and whose neighbour graph (``nbr_index`` (2, E),
    ``nbr_image`` (E, 3) zeros) is rebuilt within ``cutoff`` (Angstrom) by the same search as
    featurisation (:func:`pipeline.neighbours.molecule_neighbours`), from the arrays alone."""
    out = []
    for conf in rec.get("conformers", np.zeros((0, 0, 3)))[:]:
        pos = conf.astype(np.float64)
        src, dst = molecule_neighbours(pos, cutoff)
        view = {k: v for k, v in rec.items() if k != "conformers"}
        view.update(pos=pos, nbr_index=np.stack([src, dst]).astype(np.int32),
                    nbr_image=np.zeros((src.size, 3), dtype=np.int8))
        out.append(view)
    return out


def make_collate(molecule_cutoff: float, use_conformers: bool) -> Any:
    """A collate function producing :class:`PretrainBatch` (targets are dropped)."""
    def collate_pretrain(records: Sequence[dict[str, Any]]) -> PretrainBatch:
        records = [dict(r, y=np.zeros(0)) for r in records]  # mixed datasets have different targets
        views, owner = [], []
        for i, r in enumerate(records):
            if "pos" not in r:
                raise ValueError(f"record {r.get('_id')} has no 3D coordinates; pretraining needs a 3D view")
            views.append({k: v for k, v in r.items() if k != "conformers"})
            owner.append(i)
            if use_conformers and r.get("_kind") == "molecule":
                extra = conformer_records(r, molecule_cutoff)
                views += extra
                owner += [i] * len(extra)
        return PretrainBatch(collate(records), collate(views), torch.tensor(owner, dtype=torch.long))
    return collate_pretrain


def nt_xent(z2d: torch.Tensor, z3d: torch.Tensor, owner: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric NT-Xent with several positive 3D views per structure.

    Args:
        z2d: (B, D) normalised 2D embeddings. z3d: (M, D) normalised 3D view embeddings.
        owner: (M,) structure index of each view. temperature: softmax temperature.
    Returns:
        Scalar loss: mean of the 2D->3D term (mean log-probability over each structure's views)
        and the 3D->2D term.
    """
    logits = z2d @ z3d.T / temperature                                   # (B, M)
    positive = owner.unsqueeze(0) == torch.arange(z2d.shape[0], device=z2d.device).unsqueeze(1)
    log_p_2to3 = logits.log_softmax(dim=1)
    loss_2d = -(log_p_2to3 * positive).sum(1) / positive.sum(1).clamp_min(1)
    log_p_3to2 = logits.log_softmax(dim=0)                                # over structures, per view
    loss_3d = -log_p_3to2[owner, torch.arange(z3d.shape[0], device=z3d.device)]
    return 0.5 * (loss_2d.mean() + loss_3d.mean())


#: Names of the metrics :func:`contrastive_metrics` returns, in order.
CONTRASTIVE_METRICS = ("accuracy", "alignment", "uniformity")


@torch.no_grad()
def contrastive_metrics(z2d: torch.Tensor, z3d: torch.Tensor, owner: torch.Tensor) -> dict[str, float]:
    """Alignment, uniformity (Wang & Isola 2020) and contrastive accuracy.

    accuracy: fraction of 3D views whose nearest 2D embedding is their own structure's.
    alignment: mean squared distance between each view and its structure's 2D embedding.
    uniformity: log of the mean Gaussian potential over pairs of 2D embeddings (lower = more uniform).
    """
    sim = z3d @ z2d.T
    acc = (sim.argmax(1) == owner).float().mean().item()
    align = (z2d[owner] - z3d).pow(2).sum(1).mean().item()
    if z2d.shape[0] > 1:
        d2 = torch.pdist(z2d).pow(2)
        uniform = d2.mul(-2).exp().mean().log().item()
    else:
        uniform = float("nan")
    return {"accuracy": acc, "alignment": align, "uniformity": uniform}
