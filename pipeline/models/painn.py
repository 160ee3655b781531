"""PaiNN: polarizable atom interaction network with scalar and vector atom states (Schütt, Unke
and Gastegger, ICML 2021).

Each atom carries a scalar state ``s`` (F,) and a vector state ``v`` (3, F). A message block
passes both along the neighbour edges; the edge direction enters only through the vector
channel, so scalars stay invariant and vectors rotate with the structure:

.. math::

    \\Delta s_i = \\sum_j \\phi_s(s_j) \\circ W_s(d_{ij}), \\qquad
    \\Delta v_i = \\sum_j v_j \\circ \\phi_{vv}(s_j) \\circ W_{vv}(d_{ij})
                 + \\phi_{vs}(s_j) \\circ W_{vs}(d_{ij}) \\, \\hat r_{ij}

and an update block mixes the channels of each atom through norms and scalar products of
linear combinations of its vectors. The graph embedding is the mean (or sum) of the final
scalars, invariant to rotation, translation, atom order and, for crystals, the choice of cell.
Unlike SchNet, which sees distances only, the vector channel lets a message depend on the
angles between bonds (it is what makes PaiNN angle-aware at the cost of 3x the edge features).

With ``block_norm`` (:attr:`PaiNNConfig.block_norm`, off by default so that saved models keep
their architecture) each block reads its input through a LayerNorm on the scalars and
:func:`vector_rms_norm` on the vectors and adds increments bounded by its weights. The plain
update multiplies states by functions of themselves, so one large state compounds through the
blocks: on MP crystals at lr 2e-3 a scalar grew 10 -> 331 -> 1.1e6 -> 2.7e25 and overflowed.

With ``element_descriptors`` each atom starts from its learned embedding plus a learned linear
map of tabulated element properties (:mod:`pipeline.element_descriptors`: period, group,
electronegativity, valence electrons, ...), so chemically similar elements start close together
instead of at independent random points; the table is a buffer saved with the weights. With
``readout: softmax`` the graph embedding is the mean of the final scalars next to a learned
per-channel softmax-weighted average (:class:`pipeline.models.readout.SoftmaxReadout`).

Radial features are ``sin(n pi d / cutoff) / d``; each filter is multiplied by a cosine envelope
that reaches zero at the cutoff, so the output is continuous as neighbours cross it and
neighbours stored beyond the model cutoff do not matter. Message passing uses
gathers and ``index_add`` (twice differentiable, for Hessian-vector products and forces).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
import dgl

from pipeline import MolmatError
from pipeline.config import PaiNNConfig
from pipeline.models.readout import SoftmaxReadout
from pipeline.models.schnet import cosine_cutoff

if TYPE_CHECKING:
    from pipeline.graphs import GraphBatch

# A norm of a vector channel that is exactly zero (every v starts at zero) has no derivative;
# the small shift keeps the gradient finite and changes a norm by at most 1e-4.
_NORM_EPS = 1e-8


def vector_rms_norm(v: Tensor) -> Tensor:
    """Each atom's vector channels divided by ``sqrt(1 + m)``, ``m`` their mean squared length over
    the channels: (3, N, F) -> (3, N, F), component first.

    Lengths are rotation-invariant, so the result rotates with ``v``. Its RMS length is below 1,
    and vectors much shorter than 1 pass nearly unchanged: a plain division by ``sqrt(m)`` would
    blow the float noise left where a crystal's symmetry cancels the vectors (``m`` ~ 1e-12) up to
    unit length, differently in a supercell, and break the cell-choice invariance.
    """
    mean_sq = (v * v).sum(dim=0).mean(dim=-1, keepdim=True)  # (N, 1)
    return v * torch.rsqrt(1.0 + mean_sq)


class SineRBF(nn.Module):
    """``sin(n pi d / cutoff) / d`` for ``n = 1..n_rbf``: (E,) distances -> (E, n_rbf)."""

    def __init__(self, n_rbf: int, cutoff: float) -> None:
        super().__init__()
        self.register_buffer("freq", torch.arange(1, n_rbf + 1, dtype=torch.float32) * (math.pi / cutoff))

    def forward(self, d: Tensor) -> Tensor:
        """(E,) -> (E, n_rbf)."""
        d = d.unsqueeze(-1)
        return torch.sin(d * self.freq) / d


class Message(nn.Module):
    """Message block: scalar and vector messages from neighbours, added residually.

    Args:
        hidden: F, the width of the scalar state and of each vector channel.
        n_rbf: radial feature width.
        block_norm: the senders' scalars go through a LayerNorm and their vectors through
            :func:`vector_rms_norm` before they shape a message, so a message is bounded by the
            weights whatever the states have grown to (``PaiNNConfig.block_norm``).
    """

    #: compiled by ``train.compile`` (pipeline.compiled): a function of tensors alone
    compilable = True

    def __init__(self, hidden: int, n_rbf: int, block_norm: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.filter = nn.Linear(n_rbf, 3 * hidden)
        self.s_norm = nn.LayerNorm(hidden) if block_norm else None

    def forward(self, s: Tensor, v: Tensor, src: Tensor, dst: Tensor, radial: Tensor, unit: Tensor,
                v_zero: bool = False) -> tuple[Tensor, Tensor]:
        """One round of messages.

        Args:
            s: (N, F) scalars. v: (3, N, F) vectors, Cartesian component first.
            src, dst: (E,) edges j -> i (messages flow from ``src`` to ``dst``).
            radial: (E, n_rbf + 1) radial features times the cutoff envelope, then the envelope
                itself (:func:`enveloped_radial`): the filter ``(W rbf + b) * envelope`` is one
                matrix product, and an edge's message fades to exactly zero at the cutoff.
            unit: (3, E, 1) unit vectors along the edges, component first.
            v_zero: ``v`` is known to be all zeros (the first block), so the ``v_j`` term, zero with
                zero gradient, is skipped: the same values and gradients without its filter, gather,
                product and their backward.
        Returns:
            updated ``s`` (N, F) and ``v`` (3, N, F).
        """
        f = self.hidden
        hid = self.phi[1](self.phi[0](s if self.s_norm is None else self.s_norm(s)))
        w_out, b_out = self.phi[2].weight, self.phi[2].bias
        w_filter = torch.cat([self.filter.weight, self.filter.bias.unsqueeze(-1)], dim=1)

        def part(k: int) -> Tensor:
            # the k-th F columns of phi(s_j) * W(d_ij), computed on their own: on one CPU thread
            # the (E, F) products are memory-bound, and a split of one (E, 3F) product cost a copy
            # of each part forward and a concatenation of their gradients backward
            rows = slice(k * f, (k + 1) * f)
            return F.linear(hid, w_out[rows], b_out[rows]).index_select(0, src) * F.linear(radial, w_filter[rows])

        x_s = part(1)
        # component-first layout: every product below broadcasts over a leading or trailing
        # dimension, which torch's CPU kernels do ~8x faster than over the middle one of (E, 3, F)
        dv = unit * part(2)
        if not v_zero:
            # rows of the (3N, F) view, the edge indices repeated per component: one contiguous
            # row gather is ~3x faster than a gather along dim 1 (the sum below is not: it stays)
            n = v.shape[1]
            v_in = v if self.s_norm is None else vector_rms_norm(v)
            v_src = v_in.reshape(-1, f).index_select(0, torch.cat([src, src + n, src + 2 * n])).view(dv.shape)
            dv = torch.addcmul(dv, v_src, part(0))
        s = s.index_add(0, dst, x_s)
        v = v.index_add(1, dst, dv)
        return s, v


class Update(nn.Module):
    """Update block: per-atom mixing of scalar and vector channels, added residually.

    Args:
        hidden: F.
        block_norm: the block reads its input through a LayerNorm (scalars) and
            :func:`vector_rms_norm` (vectors) and adds bounded increments: without it the
            ``<U v, V v>`` and ``a_vv U v`` terms multiply states by functions of themselves, and a
            large state compounds through the blocks (it overflowed float32 at lr 2e-3 on MP).
    """

    #: compiled by ``train.compile`` (pipeline.compiled): a function of tensors alone
    compilable = True

    def __init__(self, hidden: int, block_norm: bool = False) -> None:
        super().__init__()
        self.hidden = hidden
        self.mix = nn.Linear(hidden, 2 * hidden, bias=False)  # U and V of the paper, side by side
        self.mlp = nn.Sequential(nn.Linear(2 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 3 * hidden))
        self.s_norm = nn.LayerNorm(hidden) if block_norm else None

    def forward(self, s: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """(N, F) scalars and (3, N, F) vectors -> updated scalars and vectors."""
        f = self.hidden
        s_in, v_in = (s, v) if self.s_norm is None else (self.s_norm(s), vector_rms_norm(v))
        # U and V applied separately: contiguous results, no strided halves of one product
        uv, vv = F.linear(v_in, self.mix.weight[:f]), F.linear(v_in, self.mix.weight[f:])
        norm = torch.sqrt((vv * vv).sum(dim=0) + _NORM_EPS)
        a = self.mlp(torch.cat([s_in, norm], dim=-1))
        a_vv, a_sv, a_ss = a.split(f, dim=-1)
        v = v + a_vv * uv
        s = s + a_sv * (uv * vv).sum(dim=0) + a_ss
        return s, v


def enveloped_radial(rbf: Tensor, envelope: Tensor) -> Tensor:
    """Radial input of the message filters: ``[rbf * envelope, envelope]``, (E, n_rbf), (E, 1) ->
    (E, n_rbf + 1); a linear map of it with the bias as its last weight column is
    ``(W rbf + b) * envelope``."""
    return torch.cat([rbf * envelope, envelope], dim=-1)


class PaiNN(nn.Module):
    """PaiNN encoder on the 3D neighbour graph of a :class:`GraphBatch` (molecules and crystals).

    Args:
        cfg: hyper-parameters (:class:`PaiNNConfig`; defaults when None).

    Attributes:
        out_dim: graph embedding width (``hidden``; ``2 * hidden`` with the softmax readout).
        node_dim: atom scalar state width (``hidden``).
    """

    def __init__(self, cfg: PaiNNConfig | None = None) -> None:
        from pipeline.featurize import MAX_Z

        super().__init__()
        self.cfg = cfg = cfg or PaiNNConfig()
        self.node_dim = cfg.hidden
        self.out_dim = 2 * cfg.hidden if cfg.readout == "softmax" else cfg.hidden
        self.pool = SoftmaxReadout(cfg.hidden) if cfg.readout == "softmax" else None
        self.embedding = nn.Embedding(MAX_Z + 1, cfg.hidden)
        if cfg.element_descriptors:
            from pipeline.element_descriptors import load_table

            # a persistent buffer: a saved model carries the table it was trained with
            self.register_buffer("descriptors", torch.from_numpy(load_table()))
            self.descriptor_proj = nn.Linear(self.descriptors.shape[1], cfg.hidden, bias=False)
        self.rbf = SineRBF(cfg.n_rbf, cfg.cutoff)
        self.messages = nn.ModuleList(Message(cfg.hidden, cfg.n_rbf, cfg.block_norm) for _ in range(cfg.interactions))
        self.updates = nn.ModuleList(Update(cfg.hidden, cfg.block_norm) for _ in range(cfg.interactions))
        self.norm = nn.LayerNorm(cfg.hidden)

    def atom_states(self, batch: GraphBatch, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Final atom states.

        Args:
            batch: collated batch with ``g3d`` (ndata ``z`` (N,), ``pos`` (N, 3); edata ``image``
                (E, 3)) and ``cell`` (B, 3, 3).
            pos: optional (N, 3) positions replacing ``g3d.ndata['pos']`` (forces, gradients).
        Returns:
            scalars (N, hidden) (invariant) and vectors (N, 3, hidden) (equivariant; a view of
            the component-first (3, N, hidden) tensor the blocks use).
        Raises:
            MolmatError: the batch has no 3D graph.
        """
        from pipeline.graphs import edge_vectors

        g = batch.g3d
        if g is None:
            raise MolmatError("PaiNN needs 3D coordinates, but this batch has none (records from SMILES "
                              "preprocessed with preprocess.molecule.embed_smiles=false?)")
        vec = edge_vectors(g, batch.cell, pos)
        d = vec.norm(dim=-1)
        src, dst = g.edges()
        inside = d < self.cfg.cutoff
        if not bool(inside.all()):
            src, dst, vec, d = src[inside], dst[inside], vec[inside], d[inside]
        unit = (vec / d.unsqueeze(-1)).T.unsqueeze(-1)  # (3, E, 1), from the receiver towards the sender
        radial = enveloped_radial(self.rbf(d), cosine_cutoff(d, self.cfg.cutoff).unsqueeze(-1))
        s = self.embedding(g.ndata["z"])
        if self.cfg.element_descriptors:
            s = s + self.descriptor_proj(self.descriptors[g.ndata["z"]])
        v = s.new_zeros(3, s.shape[0], self.cfg.hidden)
        for i, (message, update) in enumerate(zip(self.messages, self.updates)):
            s, v = message(s, v, src, dst, radial, unit, v_zero=i == 0)
            s, v = update(s, v)
        return self.norm(s), v.permute(1, 0, 2)

    def forward(self, batch: GraphBatch, pos: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Graph embeddings (B, out_dim) and atom scalar states (N, hidden); see :meth:`atom_states`."""
        s, _ = self.atom_states(batch, pos)
        g = batch.g3d
        if self.pool is not None:
            return self.pool(s, g.batch_num_nodes()), s
        return dgl.ops.segment_reduce(g.batch_num_nodes(), s, self.cfg.readout), s
