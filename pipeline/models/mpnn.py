"""The 2D message-passing encoder of Gilmer et al. 2017 ("Neural Message Passing for Quantum Chemistry").

Node states start as a projection of the atom features, then ``T`` steps of

.. math::

    m_v^{t+1} = \\sum_{w \\in N(v)} M(h_v^t, h_w^t, e_{vw}), \\qquad h_v^{t+1} = \\mathrm{GRU}(h_v^t, m_v^{t+1})

run with one message function ``M`` and one GRU shared by every step, and a readout (set2set, sum
or mean) pools the final states per graph. Only the 2D graph (``batch.g2d``: bonds for molecules,
neighbour topology for crystals) is used, never distances.

Message functions (``MPNNConfig.message``):

* ``edge_network``: ``M = A(e_vw) h_w`` with ``A`` an MLP from edge features to a ``d x d`` matrix.
  Edge features are discrete, so ``A`` is evaluated once per forward on the ``U`` distinct edge
  rows only. When ``U * hidden`` is small, ``h @ A_u^T`` is computed for every type ``u`` in one
  ``(N, U*d)`` matmul and summed into the destinations with one sparse kernel over a bipartite
  "(source atom, edge type) -> destination atom" graph, so no per-edge tensor is ever built;
  otherwise each edge gets its gathered matrix and a batched matmul.
* ``pair``: ``M = W_2 relu(W_1 [h_v, h_w, e_vw] + b_1)``.
* ``ggnn``: ``M = W_{type(e_vw)} h_w`` with one learned matrix per edge type (see :data:`EDGE_TYPES`).

Options: a master node per graph, virtual edges between unbonded atoms, and towers (the hidden
state split into ``k`` slices, each with its own message function, mixed by a linear layer).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
import dgl
import dgl.ops
from dgl.nn.pytorch.glob import Set2Set

from pipeline import MolmatError
from pipeline.config import MPNNConfig

if TYPE_CHECKING:
    from pipeline.graphs import GraphBatch

# MPNNConfig lives in pipeline.config so that reading a config never imports torch or dgl;
# pipeline.graphs (ATOM_DIM, BOND_DIM) is imported where used, to keep import order free.

#: GG-NN edge types, in index order.
EDGE_TYPES = ("single", "double", "triple", "aromatic", "crystal_neighbour", "virtual")
#: Largest ``U * hidden`` (edge types times width) for which typed messages use the dense
#: ``(N, U*hidden)`` projection instead of per-edge matrices. The projection does ``N*U*d*d`` work
#: against ``E*d*d`` per edge, but as one large matmul with no (E, d, d) tensor it wins while U is
#: small; with many distinct edge rows it would not.
UNIQUE_PATH_MAX = 4096
#: How typed messages are computed: dense per-type projection; ``A`` on distinct rows gathered per
#: edge; ``A`` evaluated on every edge's own features (the textbook reference).
MessagePath = Literal["unique", "unique_per_edge", "per_edge"]




# ------------------------------------------------------------------------------- edge utilities
def add_virtual_edges(g: dgl.DGLGraph, e: Tensor) -> tuple[dgl.DGLGraph, Tensor]:
    """Add edges, in both directions, between every pair of distinct atoms of a graph with no edge.

    A pair counts as bonded when an edge exists in either direction. Edges never cross graphs of
    the batch. Built with vectorised tensor ops over the whole batch.

    Args:
        g: batched graph with N nodes and E edges (batch sizes set).
        e: (E, BOND_DIM) edge features.
    Returns:
        A new batched graph whose edges are grouped per graph (originals first within each
        graph), and its (E + V, BOND_DIM + 1) edge features: the old ones with a zero last
        column (the virtual flag, index BOND_DIM), and for the V virtual edges zeros with that
        column set to 1.
    """
    from pipeline.graphs import BOND_DIM

    device = e.device
    n = g.batch_num_nodes().to(device)
    n_total = g.num_nodes()
    batch = n.numel()
    start = torch.cumsum(n, 0) - n
    squares = n * n
    # enumerate all ordered pairs (i, j) of each graph: pair k of graph b is (k // n_b, k % n_b)
    pair_graph = torch.repeat_interleave(torch.arange(batch, device=device), squares)
    first_pair = torch.cumsum(squares, 0) - squares
    k = torch.arange(int(squares.sum()), device=device) - torch.repeat_interleave(first_pair, squares)
    size = n[pair_graph]
    u = k // size + start[pair_graph]
    v = k % size + start[pair_graph]
    src, dst = g.edges()
    src, dst = src.to(device), dst.to(device)
    bonded = torch.cat([src * n_total + dst, dst * n_total + src])
    keep = (u != v) & ~torch.isin(u * n_total + v, bonded)
    u, v, pair_graph = u[keep], v[keep], pair_graph[keep]

    n_edges = g.batch_num_edges().to(device)
    edge_graph = torch.repeat_interleave(torch.arange(batch, device=device), n_edges)
    # a stable sort by graph keeps each graph's edges contiguous, which batch_num_edges requires
    order = torch.argsort(torch.cat([edge_graph, pair_graph]), stable=True)
    virtual = torch.zeros(u.numel(), BOND_DIM + 1, dtype=e.dtype, device=device)
    virtual[:, BOND_DIM] = 1.0
    feat = torch.cat([F.pad(e, (0, 1)), virtual])[order]
    out = dgl.graph((torch.cat([src, u])[order], torch.cat([dst, v])[order]), num_nodes=n_total, device=device)
    out.set_batch_num_nodes(n)
    out.set_batch_num_edges(n_edges + torch.bincount(pair_graph, minlength=batch))
    return out, feat


def edge_types(e: Tensor) -> Tensor:
    """GG-NN edge type index (see :data:`EDGE_TYPES`) of each edge.

    Args:
        e: (E, BOND_DIM) or (E, BOND_DIM + 1) edge features (the last column the virtual flag).
    Returns:
        (E,) int64 in ``0 .. len(EDGE_TYPES) - 1``: the bond-type one-hot (columns 0-3), 4 for a
        crystal neighbour edge (column 6), 5 for a virtual edge.
    """
    from pipeline.graphs import BOND_DIM

    types = e[:, :4].argmax(dim=1)
    types = torch.where(e[:, 6] > 0, torch.full_like(types, 4), types)
    if e.shape[1] > BOND_DIM:
        types = torch.where(e[:, BOND_DIM] > 0, torch.full_like(types, 5), types)
    return types


class EdgeContext:
    """Edge-dependent tensors computed at most once per forward and shared by all steps and towers.

    Args:
        g: the message graph (N nodes, E edges).
        e: (E, edge_dim) edge features.
    """

    def __init__(self, g: dgl.DGLGraph, e: Tensor) -> None:
        self.g = g
        self.e = e
        self._unique: tuple[Tensor, Tensor] | None = None
        self._types: Tensor | None = None
        self._typed_graphs: dict[str, dgl.DGLGraph] = {}

    def unique(self) -> tuple[Tensor, Tensor]:
        """Distinct edge-feature rows (U, edge_dim) and each edge's row index (E,) into them."""
        if self._unique is None:
            self._unique = torch.unique(self.e, dim=0, return_inverse=True)
        return self._unique

    def types(self) -> Tensor:
        """GG-NN edge type of each edge, (E,) int64 (see :func:`edge_types`)."""
        if self._types is None:
            self._types = edge_types(self.e)
        return self._types

    def typed_graph(self, key: str, etype: Tensor, n_types: int) -> dgl.DGLGraph:
        """Bipartite graph from the N*U "(atom, edge type)" slots to the N atoms.

        Edge ``w -> v`` of type ``u`` becomes ``(w * n_types + u) -> v``, so a sum over its
        in-edges of an ``(N * n_types, d)`` source tensor is ``sum_w P[w, type(w->v)]``.

        Args:
            key: cache key (one graph per kind of typing).
            etype: (E,) int64 type of each edge in ``0 .. n_types - 1``.
            n_types: number of types U.
        """
        graph = self._typed_graphs.get(key)
        if graph is None:
            src, dst = self.g.edges()
            n = self.g.num_nodes()
            graph = dgl.create_block(("coo", (src * n_types + etype, dst)), num_src_nodes=n * n_types,
                                     num_dst_nodes=n, device=self.e.device)
            self._typed_graphs[key] = graph
        return graph


def typed_messages(h: Tensor, ctx: EdgeContext, weight: Tensor, etype: Tensor, key: str) -> Tensor:
    """Aggregated typed linear messages ``m_v = sum_{w -> v} W[type(w->v)] h_w``, without per-edge tensors.

    Args:
        h: (N, d_in) node states.
        ctx: the edge context of the message graph.
        weight: (U, d_out, d_in) one matrix per edge type.
        etype: (E,) type index of each edge into ``weight``.
        key: cache key of the typed bipartite graph in ``ctx``.
    Returns:
        (N, d_out) summed messages per destination atom.
    """
    n_types, d_out, d_in = weight.shape
    # one (N, d_in) x (d_in, U*d_out) matmul gives every atom's message under every edge type
    proj = (h @ weight.reshape(n_types * d_out, d_in).t()).reshape(-1, d_out)
    return dgl.ops.copy_u_sum(ctx.typed_graph(key, etype, n_types), proj)


def per_edge_messages(h: Tensor, ctx: EdgeContext, matrices: Tensor) -> Tensor:
    """Aggregated messages ``m_v = sum_{w -> v} A_{wv} h_w`` with one matrix per edge.

    Args:
        h: (N, d_in) node states.
        ctx: the edge context of the message graph.
        matrices: (E, d_out, d_in) the matrix of every edge.
    Returns:
        (N, d_out) summed messages per destination atom.
    """
    src, _ = ctx.g.edges()
    msg = torch.bmm(matrices, h[src].unsqueeze(-1)).squeeze(-1)
    return dgl.ops.copy_e_sum(ctx.g, msg)


# ---------------------------------------------------------------------------- message functions
class EdgeNetworkMessage(nn.Module):
    """Edge network message ``A(e_vw) h_w`` (Gilmer et al. sec. 5.1) on a state slice of width ``dim``.

    Args:
        edge_dim: edge feature width.
        dim: node state width of this tower.
        edge_hidden: width of the hidden layer of the MLP that generates ``A``.
    """

    def __init__(self, edge_dim: int, dim: int, edge_hidden: int) -> None:
        super().__init__()
        self.dim = dim
        self.net = nn.Sequential(nn.Linear(edge_dim, edge_hidden), nn.ReLU(), nn.Linear(edge_hidden, dim * dim))

    def prepare(self, ctx: EdgeContext, path: MessagePath) -> dict[str, Tensor | None]:
        """Evaluate ``A`` once for the whole forward pass.

        Args:
            ctx: edge context.
            path: ``"unique"`` (dense per-type projection), ``"unique_per_edge"`` (A on distinct
                rows, gathered per edge) or ``"per_edge"`` (A evaluated on every edge's features).
        Returns:
            State for :meth:`forward`: ``weight`` (U, d, d) and ``per_edge`` (E, d, d) or None.
        """
        if path == "per_edge":
            return {"weight": None, "per_edge": self.net(ctx.e).view(-1, self.dim, self.dim)}
        rows, inverse = ctx.unique()
        weight = self.net(rows).view(-1, self.dim, self.dim)
        return {"weight": weight, "per_edge": weight[inverse] if path == "unique_per_edge" else None}

    def forward(self, h: Tensor, ctx: EdgeContext, state: dict[str, Tensor | None]) -> Tensor:
        """(N, dim) states -> (N, dim) summed messages."""
        if state["per_edge"] is not None:
            return per_edge_messages(h, ctx, state["per_edge"])
        return typed_messages(h, ctx, state["weight"], ctx.unique()[1], "unique")


class GGNNMessage(nn.Module):
    """GG-NN message ``W_{type(e_vw)} h_w`` (Li et al. 2016) with one matrix per :data:`EDGE_TYPES` entry.

    Args:
        dim: node state width of this tower.
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(len(EDGE_TYPES), dim, dim))
        bound = dim ** -0.5  # the same scale as nn.Linear's default init
        nn.init.uniform_(self.weight, -bound, bound)

    def prepare(self, ctx: EdgeContext, path: MessagePath) -> dict[str, Tensor | None]:
        """Gather per-edge matrices when ``path`` is not ``"unique"``; see :meth:`EdgeNetworkMessage.prepare`."""
        return {"per_edge": None if path == "unique" else self.weight[ctx.types()]}

    def forward(self, h: Tensor, ctx: EdgeContext, state: dict[str, Tensor | None]) -> Tensor:
        """(N, dim) states -> (N, dim) summed messages."""
        if state["per_edge"] is not None:
            return per_edge_messages(h, ctx, state["per_edge"])
        return typed_messages(h, ctx, self.weight, ctx.types(), "ggnn")


class PairMessage(nn.Module):
    """Pair message ``W_2 relu(W_1 [h_v, h_w, e_vw] + b_1)`` (Gilmer et al. sec. 5.1).

    ``W_1`` is applied as three blocks, so the node blocks run once per atom and the edge block
    once per forward; ``W_2`` has no bias and is linear, so it is applied after the sum over
    edges, on atoms instead of edges.

    Args:
        edge_dim: edge feature width.
        dim: node state width of this tower.
        pair_hidden: width of the hidden layer.
    """

    def __init__(self, edge_dim: int, dim: int, pair_hidden: int) -> None:
        super().__init__()
        self.dst_proj = nn.Linear(dim, pair_hidden, bias=False)
        self.src_proj = nn.Linear(dim, pair_hidden, bias=False)
        self.edge_proj = nn.Linear(edge_dim, pair_hidden)
        self.out = nn.Linear(pair_hidden, dim, bias=False)

    def prepare(self, ctx: EdgeContext, path: MessagePath) -> dict[str, Tensor | None]:
        """Edge block of the first layer, (E, pair_hidden), shared by all steps (``path`` is ignored)."""
        return {"edge": self.edge_proj(ctx.e)}

    def forward(self, h: Tensor, ctx: EdgeContext, state: dict[str, Tensor | None]) -> Tensor:
        """(N, dim) states -> (N, dim) summed messages."""
        hidden = F.relu(dgl.ops.u_add_v(ctx.g, self.src_proj(h), self.dst_proj(h)) + state["edge"])
        return self.out(dgl.ops.copy_e_sum(ctx.g, hidden))


class Towers(nn.Module):
    """Split the state into towers, each with its own message function; mix the concatenated messages.

    With one tower this is the message function itself (no mixing layer).

    Args:
        make: builds the message function of one tower from its width.
        hidden: full state width (divisible by ``towers``).
        towers: number of towers k.
    """

    def __init__(self, make: Callable[[int], nn.Module], hidden: int, towers: int) -> None:
        super().__init__()
        self.width = hidden // towers
        self.towers = nn.ModuleList(make(self.width) for _ in range(towers))
        self.mix = nn.Linear(hidden, hidden) if towers > 1 else None

    def prepare(self, ctx: EdgeContext, path: MessagePath) -> list[dict[str, Tensor | None]]:
        """Per-tower message state for one forward pass."""
        return [tower.prepare(ctx, path) for tower in self.towers]

    def forward(self, h: Tensor, ctx: EdgeContext, states: list[dict[str, Tensor | None]]) -> Tensor:
        """(N, hidden) states -> (N, hidden) messages."""
        chunks = h.split(self.width, dim=1)
        parts = [tower(chunk, ctx, state) for tower, chunk, state in zip(self.towers, chunks, states)]
        m = torch.cat(parts, dim=1)
        return m if self.mix is None else self.mix(m)


# ------------------------------------------------------------------------------------------ MPNN
class MPNN(nn.Module):
    """Gilmer et al. 2017 message-passing network on the 2D graph of a :class:`GraphBatch`.

    Args:
        cfg: hyper-parameters (:class:`MPNNConfig`; defaults when None).
        force_per_edge: evaluate typed messages (edge network, GG-NN) edge by edge, the edge
            network's matrices from every edge's own features: the textbook form, kept as a
            reference for tests and benchmarks. Also settable later as an attribute.

    The edge network's MLP is ``edge_dim -> hidden -> d*d`` (d = hidden / towers); the pair
    message's hidden layer is ``2*d`` wide; the input projection is ``relu(Linear(ATOM_DIM, hidden))``.

    Attributes:
        out_dim: graph embedding width (``2 * hidden`` for set2set, else ``hidden``).
        node_dim: node state width (``hidden``).
    """

    def __init__(self, cfg: MPNNConfig | None = None, force_per_edge: bool = False) -> None:
        from pipeline.graphs import ATOM_DIM, BOND_DIM

        super().__init__()
        self.cfg = cfg = cfg or MPNNConfig()
        self.force_per_edge = force_per_edge
        hidden = cfg.hidden
        edge_dim = BOND_DIM + (1 if cfg.virtual_edges else 0)
        self.node_dim = hidden
        self.out_dim = 2 * hidden if cfg.readout == "set2set" else hidden
        self.project = nn.Linear(ATOM_DIM, hidden)
        if cfg.message == "edge_network":
            make: Callable[[int], nn.Module] = lambda d: EdgeNetworkMessage(edge_dim, d, hidden)
        elif cfg.message == "pair":
            make = lambda d: PairMessage(edge_dim, d, 2 * d)
        else:
            make = GGNNMessage
        self.message = Towers(make, hidden, cfg.towers)
        self.dropout = nn.Dropout(cfg.dropout)
        self.gru = nn.GRUCell(hidden, hidden)
        if cfg.master_node:
            self.node_to_master = nn.Linear(hidden, hidden)
            self.master_to_node = nn.Linear(hidden, hidden)
            self.master_gru = nn.GRUCell(hidden, hidden)
        self.set2set = Set2Set(hidden, cfg.set2set_iters, 1) if cfg.readout == "set2set" else None

    def _path(self, ctx: EdgeContext) -> MessagePath:
        """How typed messages are computed this forward (see :meth:`EdgeNetworkMessage.prepare`)."""
        if self.force_per_edge:
            return "per_edge"
        if self.cfg.message == "edge_network":
            n_types = ctx.unique()[0].shape[0]
        elif self.cfg.message == "ggnn":
            n_types = len(EDGE_TYPES)
        else:
            return "unique"
        return "unique" if n_types * self.cfg.hidden <= UNIQUE_PATH_MAX else "unique_per_edge"

    def _pool(self, g: dgl.DGLGraph, h: Tensor, op: str) -> Tensor:
        """(N, d) node tensor -> (B, d) per-graph ``op`` ("sum" or "mean")."""
        with g.local_scope():
            g.ndata["h"] = h
            return dgl.readout_nodes(g, "h", op=op)

    def forward(self, batch: GraphBatch) -> tuple[Tensor, Tensor]:
        """Encode the 2D graphs of a batch.

        Args:
            batch: collated batch; only ``batch.g2d`` (ndata ``x`` (N, ATOM_DIM), edata ``e``
                (E, BOND_DIM)) is read.
        Returns:
            graph embeddings (B, out_dim) and final node states (N, hidden).
        """
        g = batch.g2d
        if g is None:
            raise MolmatError("the MPNN reads the 2D graph, but this batch was collated without it "
                              "(pipeline.graphs.collate with views that omit '2d')")
        e = g.edata["e"]
        if not self.cfg.crystal_shells:
            from pipeline.graphs import N_SHELLS, SHELL_COLUMN

            e = e.clone()
            e[:, SHELL_COLUMN:SHELL_COLUMN + N_SHELLS] = 0.0
        if self.cfg.virtual_edges:
            g, e = add_virtual_edges(g, e)
        ctx = EdgeContext(g, e)
        states = self.message.prepare(ctx, self._path(ctx))
        h = F.relu(self.project(batch.g2d.ndata["x"]))
        master = None
        if self.cfg.master_node:
            master = self.master_gru(self.node_to_master(self._pool(g, h, "sum")))
        for _ in range(self.cfg.steps):
            m = self.message(h, ctx, states)
            if master is not None:
                m = m + dgl.broadcast_nodes(g, self.master_to_node(master))
            h = self.gru(self.dropout(m), h)
            if master is not None:
                master = self.master_gru(self.node_to_master(self._pool(g, h, "sum")), master)
        if self.set2set is not None:
            return self.set2set(g, h), h
        return self._pool(g, h, self.cfg.readout), h
