"""SchNet exactly as molmat e99ab7b (2026-11-23, before the speed work) wrote it: the same-run
baseline of bench/bench_schnet.py. A frozen copy, not used by molmat itself; the same parameter
names as pipeline.models.schnet.SchNet, so one state_dict loads into both.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
import dgl
import dgl.function as fn

from pipeline import MolmatError
from pipeline.config import SchNetConfig

if TYPE_CHECKING:
    from pipeline.graphs import GraphBatch

# SchNetConfig lives in pipeline.config so that reading a config never imports torch or dgl;
# pipeline.featurize and pipeline.graphs are imported where used, to keep import order free.




def shifted_softplus(x: Tensor) -> Tensor:
    """``softplus(x) - log 2``: zero at zero, elementwise on any shape."""
    return F.softplus(x) - math.log(2.0)


class ShiftedSoftplus(nn.Module):
    """Module form of :func:`shifted_softplus`."""

    def forward(self, x: Tensor) -> Tensor:
        """Any shape in, same shape out."""
        return shifted_softplus(x)


def cosine_cutoff(d: Tensor, cutoff: float) -> Tensor:
    """Envelope ``0.5 (cos(pi d / cutoff) + 1)`` for ``d < cutoff``, else 0; (E,) -> (E,)."""
    return torch.where(d < cutoff, 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0), torch.zeros_like(d))


class GaussianRBF(nn.Module):
    """Expand distances in ``n_rbf`` Gaussians centred evenly on ``[0, cutoff]``, width = spacing.

    Args:
        n_rbf: number of Gaussians.
        cutoff: last centre (Angstrom).
    """

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        centres = torch.linspace(0.0, cutoff, n_rbf)
        self.register_buffer("centres", centres)
        self.coeff = -0.5 / float(centres[1] - centres[0]) ** 2

    def forward(self, d: Tensor) -> Tensor:
        """(E,) distances -> (E, n_rbf) features."""
        return torch.exp(self.coeff * (d.unsqueeze(-1) - self.centres) ** 2)


class Interaction(nn.Module):
    """One SchNet interaction block: atom-wise layer, cfconv, atom-wise MLP, residual update.

    Args:
        hidden: atom state width.
        n_rbf: distance feature width.
    """

    def __init__(self, hidden: int, n_rbf: int) -> None:
        super().__init__()
        self.filter = nn.Sequential(nn.Linear(n_rbf, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))
        self.in2f = nn.Linear(hidden, hidden, bias=False)
        self.f2out = nn.Sequential(nn.Linear(hidden, hidden), ShiftedSoftplus(), nn.Linear(hidden, hidden))

    def forward(self, g: dgl.DGLGraph, h: Tensor, rbf: Tensor, envelope: Tensor) -> Tensor:
        """Update atom states.

        Args:
            g: neighbour graph (N nodes, E edges).
            h: (N, hidden) atom states.
            rbf: (E, n_rbf) distance features of the edges.
            envelope: (E,) cutoff envelope of the edges.
        Returns:
            (N, hidden) updated states.
        """
        with g.local_scope():
            g.ndata["x"] = self.in2f(h)
            g.edata["w"] = self.filter(rbf) * envelope.unsqueeze(-1)
            g.update_all(fn.u_mul_e("x", "w", "m"), fn.sum("m", "x"))
            return h + self.f2out(g.ndata["x"])


class SchNet(nn.Module):
    """SchNet encoder on the 3D neighbour graph of a :class:`GraphBatch` (molecules and crystals).

    Args:
        cfg: hyper-parameters (:class:`SchNetConfig`; defaults when None).

    Attributes:
        out_dim: graph embedding width (``hidden``).
        node_dim: atom state width (``hidden``).
    """

    def __init__(self, cfg: SchNetConfig | None = None) -> None:
        from pipeline.featurize import MAX_Z

        super().__init__()
        self.cfg = cfg = cfg or SchNetConfig()
        self.out_dim = self.node_dim = cfg.hidden
        self.embedding = nn.Embedding(MAX_Z + 1, cfg.hidden)
        self.rbf = GaussianRBF(cfg.n_rbf, cfg.cutoff)
        self.interactions = nn.ModuleList(Interaction(cfg.hidden, cfg.n_rbf) for _ in range(cfg.interactions))

    def check_cutoff(self, shard_cutoff: float, where: str = "the shards") -> None:
        """Raise :class:`MolmatError` when the model sees further than the stored neighbour graph.

        Args:
            shard_cutoff: neighbour cutoff (Angstrom) the shards were made with.
            where: what to name in the message (a shard directory, a config key).
        """
        if self.cfg.cutoff > shard_cutoff + 1e-9:
            raise MolmatError(f"SchNet cutoff {self.cfg.cutoff} A exceeds the neighbour cutoff {shard_cutoff} A of "
                              f"{where}; lower the model cutoff or preprocess again with a larger cutoff")

    def forward(self, batch: GraphBatch, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Encode the 3D structures of a batch.

        Args:
            batch: collated batch with ``g3d`` (ndata ``z`` (N,), ``pos`` (N, 3); edata ``image``
                (E, 3)) and ``cell`` (B, 3, 3).
            pos: optional (N, 3) positions replacing ``g3d.ndata['pos']``, e.g. with
                ``requires_grad`` for forces.
        Returns:
            graph embeddings (B, hidden) and atom states (N, hidden).
        Raises:
            MolmatError: the batch has no 3D graph.
        """
        from pipeline.graphs import edge_vectors

        g = batch.g3d
        if g is None:
            raise MolmatError("SchNet needs 3D coordinates, but this batch has none (records from SMILES "
                              "preprocessed with preprocess.molecule.embed_smiles=false?)")
        d = edge_vectors(g, batch.cell, pos).norm(dim=-1)
        # edges at or beyond the cutoff have a zero envelope; dropping them only saves work
        inside = d < self.cfg.cutoff
        conv_graph = g
        if not bool(inside.all()):
            src, dst = g.edges()
            conv_graph = dgl.graph((src[inside], dst[inside]), num_nodes=g.num_nodes(), device=d.device)
            d = d[inside]
        rbf = self.rbf(d)
        envelope = cosine_cutoff(d, self.cfg.cutoff)
        h = self.embedding(g.ndata["z"])
        for block in self.interactions:
            h = block(conv_graph, h, rbf, envelope)
        with g.local_scope():
            g.ndata["h"] = h
            return dgl.readout_nodes(g, "h", op=self.cfg.readout), h
