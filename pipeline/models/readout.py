"""Graph readouts of atom states that stay invariant to the choice of a crystal's unit cell.

A crystal's graph-level output must not change when the same crystal is described by a
supercell: the readout must be *intensive*. The mean is, the sum is not. Band gaps are set by
the band edges, which a few atoms (the most and least electronegative, a defect-like site) can
decide; a mean dilutes them by the number of atoms. :class:`SoftmaxReadout` adds, per channel, a
softmax-weighted average over the atoms of each graph (scores learned from the states), which can
move anywhere between the mean (equal scores) and the maximum (one score much larger) and stays
intensive: replicating every atom k times multiplies numerator and denominator by k.

Everything is gathers, exponentials and ``index_add``: twice differentiable, for the
Hessian-vector products of the curvature stage and for forces.
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
import dgl


def graph_index(batch_num_nodes: Tensor) -> Tensor:
    """(B,) atom counts -> (N,) int64 index of each atom's graph."""
    return torch.repeat_interleave(torch.arange(len(batch_num_nodes), device=batch_num_nodes.device),
                                   batch_num_nodes)


def segment_softmax_pool(x: Tensor, score: Tensor, index: Tensor, num_graphs: int) -> Tensor:
    """Per-channel softmax-weighted average of ``x`` over the atoms of each graph.

    Args:
        x: (N, F) atom states.
        score: (N, F) scores; channel c of graph b averages ``x[i, c]`` with weights
            ``softmax_i(score[i, c])`` over the atoms i of graph b.
        index: (N,) graph of each atom (:func:`graph_index`).
        num_graphs: B.
    Returns:
        (B, F). A graph with no atoms gets zeros.
    """
    f = x.shape[1]
    # the shift only keeps exp() finite; softmax does not depend on it, so it needs no gradient
    top = torch.full((num_graphs, f), float("-inf"), dtype=score.dtype, device=score.device)
    top = top.scatter_reduce(0, index.unsqueeze(1).expand(-1, f), score.detach(), "amax", include_self=True)
    w = torch.exp(score - top[index])
    den = x.new_zeros(num_graphs, f).index_add(0, index, w)
    num = x.new_zeros(num_graphs, f).index_add(0, index, w * x)
    return num / den.clamp_min(torch.finfo(x.dtype).tiny)


class SoftmaxReadout(nn.Module):
    """Mean of the atom states next to their per-channel softmax pool (module docstring).

    Args:
        hidden: F, the atom state width; the output is (B, 2F).
    """

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.score = nn.Linear(hidden, hidden)

    def forward(self, x: Tensor, batch_num_nodes: Tensor) -> Tensor:
        """(N, F) atom states, (B,) atom counts -> (B, 2F): ``[mean, softmax pool]``."""
        pool = segment_softmax_pool(x, self.score(x), graph_index(batch_num_nodes), len(batch_num_nodes))
        return torch.cat([dgl.ops.segment_reduce(batch_num_nodes, x, "mean"), pool], dim=1)
