"""SchNet: continuous-filter convolutions on interatomic distances (Schütt et al. 2017).

Atoms start as an element embedding; each interaction block updates them residually with

.. math::

    h_i \\leftarrow h_i + f_{out}\\Big(\\sum_{j} f_{in}(h_j) \\odot W(\\mathrm{rbf}(d_{ij}))\\, f_c(d_{ij})\\Big)

where ``rbf`` expands a distance in Gaussians, ``W`` is the filter-generating MLP and ``f_c`` a
cosine envelope that goes smoothly to zero at the model cutoff. Distances are recomputed inside
``forward`` from positions, lattice and integer image offsets (:func:`pipeline.graphs.edge_vectors`),
so molecules and periodic crystals go through the same code, and gradients with respect to
positions (forces) are available. Because the envelope is exactly zero at and beyond the cutoff,
the output does not depend on which neighbours beyond the cutoff the shard happened to store.
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


#: Lowest exponent of a Gaussian feature (see :meth:`GaussianRBF.forward`).
EXP_FLOOR = -30.0


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
        # Most (E, n_rbf) entries are far in a Gaussian's tail (8 A from its centre: exp(-1200)).
        # Underflowing arguments make torch's CPU exp ~15x slower, and tails that stay just above
        # float32's normal range (exp(-80) = 2e-35) make the backward pass's products subnormal,
        # which CPUs that handle subnormals in microcode (Sapphire Rapids) run 4x slower for the
        # whole training step. The floor exp(-30) = 9e-14 keeps every product normal and changes
        # a filter by less than 1e-12.
        return torch.exp((self.coeff * (d.unsqueeze(-1) - self.centres) ** 2).clamp_min(EXP_FLOOR))


#: Image offsets are encoded in base ``_IMAGE_BASE`` around ``_IMAGE_OFFSET`` in pair keys.
_IMAGE_OFFSET = 64
_IMAGE_BASE = 2 * _IMAGE_OFFSET


def pair_order(src: Tensor, dst: Tensor, image: Tensor, num_nodes: int) -> tuple[Tensor, int, int]:
    """An edge order in which each edge and its reverse can share one filter row.

    The reverse of edge ``(src, dst, image)`` is ``(dst, src, -image)``: the same two atoms at the
    same distance. Edges whose reverse is absent (a crystal neighbour list cut at N neighbours is
    not symmetric) stand alone. The order is: one edge of each of the ``n_pairs`` reversible
    pairs, then the ``n_single`` lone edges, then the other edge of each pair in the same order;
    so per-edge values are ``cat([v, v[:n_pairs]])`` of ``n_pairs + n_single`` per-pair values,
    a copy instead of a gather.

    Args:
        src, dst: (E,) int64 atom indices of the batch.
        image: (E, 3) lattice offsets of the source atom (float, integer-valued; zeros for molecules).
        num_nodes: atoms in the batch (N).
    Returns:
        perm (E,) int64 (new edge k is old edge ``perm[k]``), n_pairs, n_single.
    Raises:
        ValueError: an image component beyond +-63 cells, or the same edge listed twice.
    """
    img = torch.round(image).long()
    if img.numel() and int(img.abs().max()) >= _IMAGE_OFFSET:
        raise ValueError(f"image offsets up to {int(img.abs().max())} cells; at most {_IMAGE_OFFSET - 1} supported")
    flip = src > dst
    a = torch.where(flip, dst, src)
    b = torch.where(flip, src, dst)
    img = torch.where(flip.unsqueeze(-1), -img, img)

    def encode(v: Tensor) -> Tensor:
        v = v + _IMAGE_OFFSET
        return (v[:, 0] * _IMAGE_BASE + v[:, 1]) * _IMAGE_BASE + v[:, 2]

    code = encode(img)
    # an atom bonded to its own image: (i, i, n) and (i, i, -n) are one pair; keep the larger code
    code = torch.where(a == b, torch.maximum(code, encode(-img)), code)
    key = (a * num_nodes + b) * _IMAGE_BASE ** 3 + code
    _, pair, counts = torch.unique(key, return_inverse=True, return_counts=True)
    if counts.numel() and int(counts.max()) > 2:
        raise ValueError("the neighbour graph lists the same edge twice")
    order = torch.argsort(pair, stable=True)            # edges grouped by pair, in edge order
    grouped = pair[order]
    second = torch.zeros_like(grouped, dtype=torch.bool)
    second[1:] = grouped[1:] == grouped[:-1]
    paired = counts[grouped] == 2
    first_of_pair = order[paired & ~second]
    lone = order[~paired]
    second_of_pair = order[second]
    return torch.cat([first_of_pair, lone, second_of_pair]), int(first_of_pair.numel()), int(lone.numel())


def ssp_mlp(layers: nn.Sequential, x: Tensor) -> Tensor:
    """``Linear -> ShiftedSoftplus -> Linear`` with the shift folded into the second bias.

    ``W (softplus(u) - log 2) + b = W softplus(u) + (b - log 2 * W 1)``: the same function
    without a subtraction over every row of ``u`` (E rows for a filter network).

    Args:
        layers: ``nn.Sequential(Linear, ShiftedSoftplus, Linear)``.
        x: (M, d_in) input.
    Returns:
        (M, d_out) output.
    """
    first, _, second = layers
    bias = second.bias - math.log(2.0) * second.weight.sum(dim=1)
    return F.linear(F.softplus(first(x)), second.weight, bias)


class ConvEdges:
    """The neighbour edges of a batch in :func:`pair_order`, and the continuous-filter convolution.

    Args:
        src, dst: (E,) atom indices in pair order.
        n_pairs: reversible pairs (the first and last ``n_pairs`` edges).
        n_single: edges without a reverse (between them).
        num_nodes: atoms in the batch (N).

    Filter rows: ``R = n_pairs + n_single``; row ``k < n_pairs`` serves edge ``k`` and its reverse,
    edge ``R + k``.
    """

    def __init__(self, src: Tensor, dst: Tensor, n_pairs: int, n_single: int, num_nodes: int) -> None:
        self.src, self.dst, self.n_pairs, self.num_nodes = src, dst, n_pairs, num_nodes
        self.rows = n_pairs + n_single

    def convolve(self, x: Tensor, w: Tensor) -> Tensor:
        """``out_i = sum_{edges j->i} x_j * w_edge``; x (N, F), w (R, F) -> (N, F).

        Plain gathers and ``index_add`` rather than DGL's ``u_mul_e``/sum: on CPU they are about
        twice as fast forward+backward (DGL's backward for the filter is a GSDDMM kernel), and
        their backward is itself differentiable, which Hessian-vector products need.
        """
        r, p = self.rows, self.n_pairs
        out = torch.zeros(self.num_nodes, x.shape[1], dtype=x.dtype, device=x.device)
        out.index_add_(0, self.dst[:r], x.index_select(0, self.src[:r]) * w)
        if p:
            out.index_add_(0, self.dst[r:], x.index_select(0, self.src[r:]) * w[:p])
        return out


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

    def forward(self, edges: ConvEdges, h: Tensor, u: Tensor, envelope: Tensor) -> Tensor:
        """Update atom states.

        Args:
            edges: the neighbour edges in :func:`pair_order` (see :class:`ConvEdges`).
            h: (N, hidden) atom states.
            u: (R, hidden) the filter network's hidden layer before the shift,
                ``softplus(filter[0](rbf))``, one row per filter row (an edge, or a pair of
                reverse edges); the shift ``- log 2`` is folded into the second layer's bias.
            envelope: (R, 1) cutoff envelope of the same rows.
        Returns:
            (N, hidden) updated states.
        """
        second = self.filter[2]
        bias = second.bias - math.log(2.0) * second.weight.sum(dim=1)
        w = F.linear(u, second.weight, bias) * envelope
        return h + ssp_mlp(self.f2out, edges.convolve(self.in2f(h), w))


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
        src, dst = g.edges()
        image = g.edata["image"]
        # edges at or beyond the cutoff have a zero envelope; dropping them only saves work
        inside = d < self.cfg.cutoff
        if not bool(inside.all()):
            src, dst, image, d = src[inside], dst[inside], image[inside], d[inside]
        # The filter network is most of the cost, and an edge and its reverse (same atoms, opposite
        # image) have the same distance: evaluate it once per pair (see pair_order).
        perm, n_pairs, n_single = pair_order(src, dst, image, g.num_nodes())
        edges = ConvEdges(src[perm], dst[perm], n_pairs, n_single, g.num_nodes())
        d = d[perm[:edges.rows]]
        envelope = cosine_cutoff(d, self.cfg.cutoff).unsqueeze(-1)
        rbf = self.rbf(d)
        h = self.embedding(g.ndata["z"])
        for block in self.interactions:
            h = block(edges, h, F.softplus(block.filter[0](rbf)), envelope)
        return dgl.ops.segment_reduce(g.batch_num_nodes(), h, self.cfg.readout), h
