"""Shard records to batched ``dgl.DGLGraph`` objects: the only module that builds DGL graphs.

:func:`collate` concatenates the arrays of a list of records and builds each batched graph with
one ``dgl.graph`` call (setting the per-graph node/edge counts), which is much faster than
building one graph per record and calling ``dgl.batch``. It builds only the views a model reads
(``views``): a crystal's 2D view (neighbour shells, edge one-hots) costs ~10x the collation of
its 3D graph, which a 3D-only model would otherwise pay at every step for nothing
(``bench/results/collate_views``).

Feature expansion (the integer columns stored in shards to float vectors):

* atom features ``x`` (N, ATOM_DIM): one-hot element (Z 1..94, index 0 = unknown), aromatic,
  one-hot hybridisation (6), one-hot H count 0..4 (5), donor, acceptor, formal charge (scalar),
  in ring, and a molecule/crystal flag.
* bond features ``e`` (E, BOND_DIM): one-hot single/double/triple/aromatic, conjugated, in ring,
  and a 'neighbour edge' flag for crystal graphs (whose 2D view has no chemical bonds).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Collection, Sequence

import numpy as np
import torch

import pipeline  # noqa: F401  (sets DGLBACKEND before dgl is imported)
import dgl

from pipeline import MolmatError
from pipeline import records as R
from pipeline.featurize import MAX_Z

ATOM_DIM = (MAX_Z + 1) + 1 + 6 + 5 + 1 + 1 + 1 + 1 + 1
#: Coordination shells told apart on crystal neighbour edges: first, second, third and further.
N_SHELLS = 3
#: Column of the first shell flag in the edge features.
SHELL_COLUMN = 7
#: Bond type one-hot (4), conjugated, in ring, crystal-neighbour flag, shell one-hot (N_SHELLS).
BOND_DIM = 4 + 1 + 1 + 1 + N_SHELLS
#: A new coordination shell starts where the next neighbour is farther by more than this (Angstrom).
SHELL_GAP = 0.1
#: The graph views :func:`collate` can build: ``g2d`` and ``g3d`` of :class:`GraphBatch`.
VIEWS = ("2d", "3d")


@dataclass
class GraphBatch:
    """A collated batch.

    Attributes:
        g2d: bond graph (molecules; both directions) or neighbour topology (crystals), with
            ndata ``x`` (N, ATOM_DIM) and ``z`` (N,) and edata ``e`` (E, BOND_DIM); None when
            the batch was collated for a model that reads only the 3D view.
        g3d: 3D neighbour graph or None when a record has no coordinates; ndata ``z`` (N,),
            ``pos`` (N, 3) float32; edata ``image`` (E, 3) float32 lattice offsets of the source
            atom; ``cell`` (B, 3, 3) holds each graph's lattice (zeros for molecules), so edge
            vectors are ``pos[src] + image @ cell[graph] - pos[dst]``.
        cell: (B, 3, 3) float32.
        y: (B, T) float32 targets in source units, 0 where missing.
        mask: (B, T) bool, True where a label exists.
        n_atoms: (B,) int64 atoms per graph.
        conformers: list per record of (K, N_i, 3) float32 arrays (extra conformers) or None.
        ids, kinds, smiles: per-record metadata; index: global record indices.
    """

    g2d: dgl.DGLGraph | None
    g3d: dgl.DGLGraph | None
    cell: torch.Tensor
    y: torch.Tensor
    mask: torch.Tensor
    n_atoms: torch.Tensor
    ids: list[str]
    kinds: list[str]
    index: list[int] = field(default_factory=list)
    smiles: list[str] = field(default_factory=list)
    conformers: list[np.ndarray | None] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        """Number of structures in the batch."""
        return len(self.ids)

    @property
    def z(self) -> torch.Tensor:
        """(N,) int64 atomic numbers of all atoms, from whichever graph the batch holds."""
        return (self.g2d if self.g2d is not None else self.g3d).ndata["z"]

    def to(self, device: torch.device | str) -> "GraphBatch":
        """Move graphs and tensors to ``device`` (returns a new batch)."""
        return GraphBatch(None if self.g2d is None else self.g2d.to(device),
                          None if self.g3d is None else self.g3d.to(device),
                          self.cell.to(device), self.y.to(device), self.mask.to(device), self.n_atoms.to(device),
                          self.ids, self.kinds, self.index, self.smiles, self.conformers)


_HYB_OFFSET = MAX_Z + 2
_NH_OFFSET = _HYB_OFFSET + 6
_TAIL = _NH_OFFSET + 5


def atom_features(atom_feat: np.ndarray, is_crystal: np.ndarray) -> np.ndarray:
    """Expand stored integer atom columns (N, 8) to float32 features (N, ATOM_DIM)."""
    n = atom_feat.shape[0]
    x = np.zeros((n, ATOM_DIM), dtype=np.float32)
    rows = np.arange(n)
    z = atom_feat[:, 0].astype(np.int64)
    x[rows, np.where((z >= 1) & (z <= MAX_Z), z, 0)] = 1.0
    x[:, MAX_Z + 1] = atom_feat[:, 1]
    x[rows, _HYB_OFFSET + np.clip(atom_feat[:, 2], 0, 5)] = 1.0
    x[rows, _NH_OFFSET + np.clip(atom_feat[:, 3], 0, 4)] = 1.0
    x[:, _TAIL] = atom_feat[:, 4]
    x[:, _TAIL + 1] = atom_feat[:, 5]
    x[:, _TAIL + 2] = atom_feat[:, 6]
    x[:, _TAIL + 3] = atom_feat[:, 7]
    x[:, _TAIL + 4] = is_crystal
    # crystals carry only the element column: hybridisation/H-count one-hots stay empty for them
    x[is_crystal.astype(bool), _HYB_OFFSET:_TAIL] = 0.0
    return x


def bond_features(bond_feat: np.ndarray) -> np.ndarray:
    """Expand stored integer bond columns (E, 3) to float32 features (E, BOND_DIM)."""
    e = np.zeros((bond_feat.shape[0], BOND_DIM), dtype=np.float32)
    kind = np.clip(bond_feat[:, 0].astype(np.int64), 1, 4) - 1
    e[np.arange(len(kind)), kind] = 1.0
    e[:, 4] = bond_feat[:, 1]
    e[:, 5] = bond_feat[:, 2]
    return e


def neighbour_shells(dst: np.ndarray, dist: np.ndarray, gap: float = SHELL_GAP) -> np.ndarray:
    """Coordination shell index of every neighbour edge: 0 for the nearest shell of its centre.

    Args:
        dst: (E,) centre atom of each edge.
        dist: (E,) edge length (Angstrom).
        gap: a jump in distance larger than this, between consecutive neighbours of a centre,
            starts the next shell; neighbours at equal distance always share a shell.
    Returns:
        (E,) int64 shell indices, in the order of the input edges.
    """
    if dst.size == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((dist, dst))
    c, d = dst[order], dist[order]
    first = np.r_[True, c[1:] != c[:-1]]
    jump = np.r_[False, np.diff(d) > gap] & ~first
    count = np.cumsum(jump)
    starts = np.flatnonzero(first)
    shell_sorted = count - np.repeat(count[starts], np.diff(np.r_[starts, c.size]))
    shell = np.empty(c.size, dtype=np.int64)
    shell[order] = shell_sorted
    return shell


def _graph(src: np.ndarray, dst: np.ndarray, n_nodes: np.ndarray, n_edges: np.ndarray) -> dgl.DGLGraph:
    g = dgl.graph((torch.from_numpy(src), torch.from_numpy(dst)), num_nodes=int(n_nodes.sum()))
    g.set_batch_num_nodes(torch.from_numpy(n_nodes))
    g.set_batch_num_edges(torch.from_numpy(n_edges))
    return g


def collate(records: Sequence[dict[str, Any]], views: Collection[str] = VIEWS) -> GraphBatch:
    """Batch decoded shard records into a :class:`GraphBatch` (graphs, targets, mask).

    Args:
        records: decoded shard records.
        views: the graphs to build (:data:`VIEWS`; a model's ``views()``). Without ``"2d"``,
            ``g2d`` is None, unless a record has no coordinates: then the 2D graph is built
            anyway, so that the 3D encoder meets a batch without ``g3d`` and says why.
    """
    n_atoms = np.array([len(r[R.Z]) for r in records], dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    kinds = [r.get(R.KIND, R.MOLECULE) for r in records]
    z = np.concatenate([r[R.Z] for r in records]).astype(np.int64)
    has_3d = all(R.POS in r and R.NBR_INDEX in r for r in records)
    g2d = _graph_2d(records, starts, kinds, n_atoms, z) if "2d" in views or not has_3d else None

    cell = np.zeros((len(records), 3, 3), dtype=np.float32)
    g3d = None
    if has_3d:
        src3, dst3, img, ne3 = [], [], [], []
        for i, (r, s0) in enumerate(zip(records, starts)):
            idx = r[R.NBR_INDEX].astype(np.int64)
            src3.append(idx[0] + s0)
            dst3.append(idx[1] + s0)
            img.append(r[R.NBR_IMAGE])
            ne3.append(idx.shape[1])
            if R.CELL in r:
                cell[i] = r[R.CELL]
        g3d = _graph(np.concatenate(src3), np.concatenate(dst3), n_atoms, np.array(ne3, dtype=np.int64))
        g3d.ndata["z"] = torch.from_numpy(z)
        g3d.ndata["pos"] = torch.from_numpy(np.concatenate([r[R.POS] for r in records]).astype(np.float32))
        g3d.edata["image"] = torch.from_numpy(np.concatenate(img).astype(np.float32))

    widths = {r[R.Y].size for r in records}
    if len(widths) > 1:
        # happens when shard directories with different target lists are concatenated
        first = {r[R.Y].size: r for r in reversed(records)}
        ids = ", ".join(f"{r.get(R.ID)} has {w}" for w, r in sorted(first.items()))
        raise MolmatError(f"cannot batch records with different numbers of targets ({ids}, ...); "
                          "select common targets first or use one shard directory per target set")
    y = np.stack([r[R.Y] for r in records]).astype(np.float64) if records[0][R.Y].size else np.zeros((len(records), 0))
    mask = np.isfinite(y)
    return GraphBatch(
        g2d=g2d, g3d=g3d, cell=torch.from_numpy(cell),
        y=torch.from_numpy(np.where(mask, y, 0.0).astype(np.float32)), mask=torch.from_numpy(mask),
        n_atoms=torch.from_numpy(n_atoms), ids=[str(r.get(R.ID, "")) for r in records], kinds=kinds,
        index=[int(r.get(R.INDEX, -1)) for r in records], smiles=[r.get(R.SMILES, "") for r in records],
        conformers=[r.get(R.CONFORMERS) for r in records],
    )


def _graph_2d(records: Sequence[dict[str, Any]], starts: np.ndarray, kinds: list[str], n_atoms: np.ndarray,
              z: np.ndarray) -> dgl.DGLGraph:
    """The batched 2D view of :func:`collate`: bonds, or a crystal's neighbour topology with shells."""
    crystal = np.repeat(np.array([k == R.CRYSTAL for k in kinds], dtype=np.float32), n_atoms)
    x = atom_features(np.concatenate([r[R.ATOM_FEAT] for r in records]), crystal)

    # 2D view: chemical bonds in both directions, or (crystals) neighbour topology without distances
    src2, dst2, e2, ne2 = [], [], [], []
    # shells of every crystal edge of the batch in one pass: centres are unique once offset
    shell_feats, shell_dst, shell_dist = [], [], []
    for r, s0, kind in zip(records, starts, kinds):
        if kind == R.CRYSTAL or R.BOND_INDEX not in r:
            # the topology carries which coordination shell a neighbour is in, never its distance
            idx = r[R.NBR_INDEX].astype(np.int64)
            feat = np.zeros((idx.shape[1], BOND_DIM), dtype=np.float32)
            feat[:, 6] = 1.0
            if idx.shape[1] and R.POS in r:
                vec = r[R.POS][idx[0]] - r[R.POS][idx[1]]
                if R.NBR_IMAGE in r and R.CELL in r:
                    vec = vec + r[R.NBR_IMAGE] @ r[R.CELL]
                shell_feats.append(feat)
                shell_dst.append(idx[1] + s0)
                shell_dist.append(np.linalg.norm(vec, axis=1))
            src2.append(idx[0] + s0)
            dst2.append(idx[1] + s0)
        else:
            idx = r[R.BOND_INDEX].astype(np.int64)
            f = bond_features(r[R.BOND_FEAT])
            feat = np.concatenate([f, f])
            src2.append(np.concatenate([idx[0], idx[1]]) + s0)
            dst2.append(np.concatenate([idx[1], idx[0]]) + s0)
        e2.append(feat)
        ne2.append(len(feat))
    if shell_feats:
        shell = np.minimum(neighbour_shells(np.concatenate(shell_dst), np.concatenate(shell_dist)), N_SHELLS - 1)
        start = 0
        for feat in shell_feats:  # views into e2's arrays: filled in place
            feat[np.arange(len(feat)), SHELL_COLUMN + shell[start:start + len(feat)]] = 1.0
            start += len(feat)
    g2d = _graph(np.concatenate(src2), np.concatenate(dst2), n_atoms, np.array(ne2, dtype=np.int64))
    g2d.ndata["x"] = torch.from_numpy(x)
    g2d.ndata["z"] = torch.from_numpy(z)
    g2d.edata["e"] = torch.from_numpy(np.concatenate(e2))
    return g2d


def edge_vectors(g3d: dgl.DGLGraph, cell: torch.Tensor, pos: torch.Tensor | None = None) -> torch.Tensor:
    """Edge vectors ``pos[src] + image @ cell[graph] - pos[dst]`` (E, 3), differentiable in ``pos``/``cell``.

    Args:
        g3d: batched 3D graph with ndata ``pos`` and edata ``image``.
        cell: (B, 3, 3) lattice per graph (zeros for molecules).
        pos: optional positions (N, 3) to use instead of ``g3d.ndata['pos']`` (for forces/gradients).
    """
    pos = g3d.ndata["pos"] if pos is None else pos
    src, dst = g3d.edges()
    graph_of_edge = torch.repeat_interleave(torch.arange(g3d.batch_size, device=pos.device), g3d.batch_num_edges())
    shift = torch.einsum("ei,eij->ej", g3d.edata["image"], cell[graph_of_edge])
    return pos[src] + shift - pos[dst]
