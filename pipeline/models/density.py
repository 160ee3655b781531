"""Electron density at query points: a DeepDFT-style probe model (Jørgensen & Bhowmik 2022).

A 3D encoder (PaiNN or SchNet, :func:`pipeline.models.build_encoder`) turns the atoms into states;
query points ("probes") are extra vertices that only *receive* messages from the atoms within
``cutoff`` (periodic images included), so the atom states never depend on where the probes are,
and a structure is encoded once however many points are asked for.

Probe state. Every probe starts from one learned scalar state ``p0`` (F,) and a zero vector state
``q`` (3, F). Each of ``probe_layers`` layers sends, along every probe <- atom edge of length
``d`` with unit vector ``u`` (from the probe towards the atom),

.. math::

    \\Delta p = \\sum_a x^s_a + x^{sv}_a \\circ (v_a \\cdot u), \\qquad
    \\Delta q = \\sum_a x^{vs}_a \\, u + x^{vv}_a \\circ v_a, \\qquad
    x_a = \\phi(s_a) \\circ W(\\mathrm{rbf}(d)) f_c(d)

(SchNet's continuous filter ``W`` of Gaussian distance features, times a cosine envelope ``f_c``
that reaches zero at the cutoff, so the density is continuous as atoms cross it). The terms with the
atom vector states ``v_a`` exist for PaiNN only; ``v_a . u`` is invariant. PaiNN's update block
then mixes each probe's channels (norms and scalar products of its vectors), which is what lets a
probe see angles between the atoms around it (``|sum_a w_a u_a|^2 = sum_ab w_a w_b cos theta_ab``),
even with SchNet's scalar atom states. Everything a probe receives is rotation-invariant (scalars)
or rotates with the structure (vectors), so the density is invariant to rotation, translation
and atom order. A LayerNorm and an MLP read the density out of the final scalar state.

Output. The MLP gives ``u`` per probe and the density is ``rho = softplus(beta + u)``, with ``beta =
softplus^-1(promolecule)`` for ``baseline="promolecule"`` and ``beta = 0`` for ``none``. The
promolecule (:mod:`pipeline.promolecule`: spherical free atoms from PySCF at the labels' level of
theory) holds the nuclear cusps, up to 4e2 e/bohr^3 for F and 15% of a QM9 molecule's grid sum
within 0.3 bohr of a nucleus; the MLP's last layer starts at zero, so an untrained model predicts
the promolecule exactly (9.2-15.1% NMAE, mean 11.6%, on every 20th of the 872 QM9 PBE/def2-SVP
cubes). The prediction is ``promolecule + correction`` with a correction that is additive where the
promolecule is large (``softplus(x) = x`` above 20: ``rho = promolecule + u`` at the cores, in
e/bohr^3) and relative where it is small (``rho ~ promolecule * exp(u)`` in bonds and tails), and
the density stays positive. Why not ``promolecule + u``: NMAE, ``sum |err| / sum rho``, over a grid
that is mostly vacuum (1e-4 e/bohr^3) punishes any absolute offset there, and an optimiser's first
steps move ``u`` by about the learning rate everywhere. Measured by fitting a tiny model (PaiNN 32
wide, 2+2 layers) to 6 QM9 cubes, NMAE on fixed uniform probes of the same cubes, same probes and
seed, 300 AdamW steps at lr 1e-3: the additive output jumped from the promolecule's 15.9% to 99%
after one step and ended at 6.0%; this form went 15.9% -> 15.9% -> 3.0%. With ``baseline="none"``,
``softplus(u)`` is the same idea without a prior: linear for large densities (a linear-scale loss
sees them on the metric's scale), ``exp(u)`` for small ones, reaching 1e-6 e/bohr^3 tails without
exact cancellations. A log or asinh target scale was not used: it weights the vacuum tails like the
bonds, while NMAE is decided where the density is large.

Memory and speed: atom states are computed once per batch; probes go through the layers
``probe_chunk`` at a time (edges are sorted by probe, so a chunk's edges are one slice), and the
per-edge tensors that do not depend on the layer (envelope-weighted unit vectors and atom vectors)
once per chunk. Without gradients (evaluation, prediction on full grids) that bounds memory, and
each layer's filter ``W`` comes from a :class:`pipeline.models.radial_table.RadialTable` (the MLP
evaluated once on 515 distances, cubic interpolation, ~1e-6 of the MLP) in chunks of
``predict_chunk``; a training batch keeps every chunk for the backward pass. Measured on one thread,
a whole-grid prediction of a QM9 molecule with a PaiNN-128 model (stride 2, 41k network points)
took 4.9 s before the tables and per-chunk tensors and 3.0 s after. The tables are refreshed once per
call, not per chunk, and where they stay small (narrow models, small structures) each atom gets its
own, ``phi(s_a) * W``, so an edge reads its atom's rows instead of gathering ``phi(s)`` and
multiplying (the interpolation is linear: the same function). In inference the tables also carry
the envelope, and since a layer's messages depend on the atoms and the edge only (not on the probe
state), every layer's messages are summed in one pass over a chunk's edges, from the layers' tables
side by side; the update blocks then run on several chunks at once. Measured on the stride-3 grids
of 3 held-out QM9 molecules, median of 7 passes: PaiNN 32 (``qm9-density-fast``) 0.17 -> 0.14 s per
molecule on one thread and 0.22 -> 0.14 s on two; PaiNN 128 1.39 -> 1.06 s and 1.10 -> 0.81 s.

Units: positions and cutoffs in Angstrom, densities in e/bohr^3.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel
from torch import Tensor, nn

from pipeline import MolmatError
from pipeline.cube import BOHR_ANGSTROM
from pipeline.graphs import GraphBatch, collate
from pipeline.models import build_encoder, encoder_config
from pipeline.models.painn import Update
from pipeline.models.radial_table import RadialTable
from pipeline.models.schnet import GaussianRBF, ShiftedSoftplus, cosine_cutoff

BASELINES = ("none", "promolecule")
#: Smallest promolecule value passed to :func:`inverse_softplus` (beyond the free-atom table's
#: reach the promolecule is exactly 0, whose inverse is -inf).
_BASE_FLOOR = 1e-30


def inverse_softplus(y: Tensor) -> Tensor:
    """``x`` with ``softplus(x) = y`` for ``y > 0`` (any shape), stable from 1e-30 to 1e4:
    ``y + log(-expm1(-y))`` (``log(expm1(y))`` overflows float32 above y = 88)."""
    y = y.clamp_min(_BASE_FLOOR)
    return y + torch.log(-torch.expm1(-y))


# ------------------------------------------------------------------------------------ batches
@dataclass
class Probes:
    """Query points of a batch and their atom -> probe edges.

    Attributes:
        pos: (P, 3) float32 probe positions, Angstrom.
        structure: (P,) int64 index of each probe's structure in the batch.
        edge_probe: (E,) int64 receiving probe, sorted ascending.
        edge_atom: (E,) int64 sending atom (index into the batch's atoms).
        edge_image: (E, 3) float32 lattice offset of the atom: the edge vector from the probe to the
            atom is ``pos_atom + image @ cell[structure] - pos_probe`` (zeros for molecules).
    """

    pos: Tensor
    structure: Tensor
    edge_probe: Tensor
    edge_atom: Tensor
    edge_image: Tensor

    def __len__(self) -> int:
        return int(self.pos.shape[0])

    def to(self, device: torch.device | str) -> "Probes":
        """A copy on ``device``."""
        return Probes(self.pos.to(device), self.structure.to(device), self.edge_probe.to(device),
                      self.edge_atom.to(device), self.edge_image.to(device))


def make_probes(points: Sequence[np.ndarray], atom_pos: Sequence[np.ndarray], cells: Sequence[np.ndarray | None],
                radius: float) -> Probes:
    """:class:`Probes` for the structures of a batch, from arrays (edges by :func:`pipeline.density_data.probe_graph`).

    Args:
        points: per structure, (P_i, 3) probe positions, Angstrom.
        atom_pos: per structure, (N_i, 3) atom positions, Angstrom, in batch order (the atoms of
            structure ``i`` are batch atoms ``sum(N_<i) ..``).
        cells: per structure, its (3, 3) lattice rows (Angstrom) or None for a molecule.
        radius: edge radius (Angstrom); :attr:`DensityModel.probe_radius`.
    """
    from pipeline.density_data import probe_graph

    pos, structure, e_probe, e_atom, e_image = [], [], [], [], []
    p0 = a0 = 0
    for i, (pts, apos, cell) in enumerate(zip(points, atom_pos, cells)):
        pts = np.asarray(pts, dtype=np.float64).reshape(-1, 3)
        probe, atom, image = probe_graph(pts, np.asarray(apos, dtype=np.float64).reshape(-1, 3), radius, cell)
        pos.append(pts)
        structure.append(np.full(len(pts), i, dtype=np.int64))
        e_probe.append(probe + p0)
        e_atom.append(atom + a0)
        e_image.append(image)
        p0 += len(pts)
        a0 += len(apos)
    return Probes(torch.from_numpy(np.concatenate(pos).astype(np.float32)), torch.from_numpy(np.concatenate(structure)),
                  torch.from_numpy(np.concatenate(e_probe)), torch.from_numpy(np.concatenate(e_atom)),
                  torch.from_numpy(np.concatenate(e_image).astype(np.float32)))


@dataclass
class ProbeSample:
    """One record with its probes, as a density dataset view returns it (see ``finetune.density``).

    Attributes:
        record: the shard record without its grid arrays (what :func:`pipeline.graphs.collate` reads).
        points: (P, 3) float64 probe positions, Angstrom.
        values: (P,) float32 true densities at the probes, e/bohr^3.
        probe, atom: (E,) int64 edges of the record (:func:`pipeline.density_data.probe_graph`).
        image: (E, 3) int64 lattice offsets of the edges.
    """

    record: dict[str, Any]
    points: np.ndarray
    values: np.ndarray
    probe: np.ndarray
    atom: np.ndarray
    image: np.ndarray


@dataclass
class DensityBatch:
    """Structures and probes of a training or validation step.

    Attributes:
        graph: the collated structures (:class:`GraphBatch`, with ``g3d``).
        probes: their query points and edges.
        target: (P,) float32 true density at every probe, e/bohr^3.
        n_probes: (B,) int64 probes per structure.
    """

    graph: GraphBatch
    probes: Probes
    target: Tensor
    n_probes: Tensor
    index: list[int] = field(default_factory=list)

    @property
    def num_graphs(self) -> int:
        """Structures in the batch."""
        return self.graph.num_graphs

    def to(self, device: torch.device | str) -> "DensityBatch":
        """A copy on ``device``."""
        return DensityBatch(self.graph.to(device), self.probes.to(device), self.target.to(device),
                            self.n_probes.to(device), self.index)


def collate_probes(samples: Sequence[ProbeSample]) -> DensityBatch:
    """Batch :class:`ProbeSample` objects: the structures by :func:`pipeline.graphs.collate`, the
    probes and edges concatenated with probe and atom offsets (edges stay sorted by probe)."""
    from pipeline import records as R

    graph = collate([s.record for s in samples])
    n_probes = np.array([len(s.points) for s in samples], dtype=np.int64)
    n_atoms = np.array([len(s.record[R.Z]) for s in samples], dtype=np.int64)
    p_off = np.concatenate([[0], np.cumsum(n_probes)[:-1]])
    a_off = np.concatenate([[0], np.cumsum(n_atoms)[:-1]])
    probes = Probes(
        pos=torch.from_numpy(np.concatenate([s.points for s in samples]).astype(np.float32)),
        structure=torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), n_probes)),
        edge_probe=torch.from_numpy(np.concatenate([s.probe + o for s, o in zip(samples, p_off)]).astype(np.int64)),
        edge_atom=torch.from_numpy(np.concatenate([s.atom + o for s, o in zip(samples, a_off)]).astype(np.int64)),
        edge_image=torch.from_numpy(np.concatenate([s.image for s in samples]).astype(np.float32)))
    target = torch.from_numpy(np.concatenate([s.values for s in samples]).astype(np.float32))
    return DensityBatch(graph, probes, target, torch.from_numpy(n_probes), list(graph.index))


# -------------------------------------------------------------------------------- promolecule
class Promolecule(nn.Module):
    """Sum of tabulated free-atom densities over probe <- atom edges (see :mod:`pipeline.promolecule`).

    The table is held in buffers (saved with the weights, so a model directory carries the exact
    baseline it was trained with): ``log_rho`` and ``dlog`` (n, K), log density and its derivative
    in the grid coordinate ``t = log1p(r / a) / b`` at the radii ``a (exp(b k) - 1)`` (bohr), and
    ``row_of_z`` (119,) (-1 for elements the table lacks). Interpolation is cubic Hermite in
    ``log rho``, as :meth:`pipeline.promolecule.FreeAtomTable.density` does.

    Args:
        elements: atomic numbers of the table rows (ascending).
        points: K, radii per element.
        a, b: the radial grid (bohr, and the log step).
        table: a :class:`pipeline.promolecule.FreeAtomTable` to fill the buffers from; None leaves
            zeros (a model being rebuilt from its directory, whose weights bring the table).
    """

    def __init__(self, elements: Sequence[int], points: int, a: float, b: float, table: Any = None) -> None:
        super().__init__()
        self.elements = [int(z) for z in elements]
        self.a, self.b, self.points = float(a), float(b), int(points)
        self.radius_bohr = self.a * math.expm1(self.b * (self.points - 1))
        row = torch.full((119,), -1, dtype=torch.int64)
        row[torch.tensor(self.elements, dtype=torch.int64)] = torch.arange(len(self.elements))
        self.register_buffer("row_of_z", row)
        self.register_buffer("log_rho", torch.zeros(len(self.elements), self.points))
        self.register_buffer("dlog", torch.zeros(len(self.elements), self.points))
        if table is not None:
            log_rho, dlog = table.log_nodes()
            self.log_rho.copy_(torch.from_numpy(log_rho))
            self.dlog.copy_(torch.from_numpy(dlog))

    @classmethod
    def from_table(cls, table: Any) -> "Promolecule":
        """The module holding a :class:`pipeline.promolecule.FreeAtomTable`."""
        return cls(table.z.tolist(), table.rho.shape[1], table.a, table.b, table)

    def describe(self) -> dict[str, Any]:
        """What rebuilds the buffers' shapes: elements, radii count, grid (config.json)."""
        return {"elements": self.elements, "points": self.points, "a_bohr": self.a, "b": self.b}

    @property
    def radius_angstrom(self) -> float:
        """Last tabulated radius, Angstrom; free-atom densities are zero beyond it."""
        return self.radius_bohr * BOHR_ANGSTROM

    def missing(self, z: Tensor) -> list[int]:
        """Atomic numbers among ``z`` that the table lacks."""
        z = z.clamp(0, 118)
        bad = torch.unique(z[self.row_of_z[z] < 0])
        return bad.tolist()

    def forward(self, d: Tensor, z: Tensor) -> Tensor:
        """Free-atom density of element ``z`` (E,) at distance ``d`` (E,) Angstrom -> (E,) e/bohr^3."""
        r = d / BOHR_ANGSTROM
        t = torch.log1p(r / self.a) / self.b
        k = torch.clamp(torch.floor(t).long(), 0, self.points - 2)
        w = t - k
        rows = self.row_of_z[z]
        w2, w3 = w * w, w * w * w
        log_value = ((2 * w3 - 3 * w2 + 1) * self.log_rho[rows, k] + (w3 - 2 * w2 + w) * self.dlog[rows, k]
                     + (3 * w2 - 2 * w3) * self.log_rho[rows, k + 1] + (w3 - w2) * self.dlog[rows, k + 1])
        return torch.where(r <= self.radius_bohr, torch.exp(log_value), torch.zeros_like(r))


# ---------------------------------------------------------------------------------- layers
#: Largest per-atom filter table (values, N x (K + 3) x C) a layer builds for inference; beyond it
#: the shared table and a gather of phi(s) are used. Measured on one thread, stride-3 whole grids of
#: 3 QM9 test molecules: PaiNN 32 (1.2M values) 0.35 s per molecule against 0.37-0.41 s with the
#: shared table; PaiNN 64 (2.4M, 9.5 MB, out of cache) 0.82 s against 0.74-0.79 s.
PER_ATOM_TABLE_FLOATS = 1_500_000


class ProbeLayer(nn.Module):
    """One round of atom -> probe messages and a PaiNN update of the probes (see the module docstring).

    Args:
        hidden: F, width of the atom scalar states and of the probe's scalar and vector channels.
        n_rbf: distance feature width.
        atom_vectors: the atoms carry vector states (PaiNN); adds the ``v_a`` and ``v_a . u`` channels.
        cutoff: probe-atom cutoff (Angstrom), the range of the filter table.
    """

    def __init__(self, hidden: int, n_rbf: int, atom_vectors: bool, cutoff: float) -> None:
        super().__init__()
        self.hidden = hidden
        self.atom_vectors = atom_vectors
        channels = 4 if atom_vectors else 2
        self.phi = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, channels * hidden))
        self.filter = nn.Sequential(nn.Linear(n_rbf, hidden), ShiftedSoftplus(), nn.Linear(hidden, channels * hidden))
        self.update = Update(hidden)
        self.table = RadialTable(cutoff)

    def inference_rows(self, s: Tensor, rbf: nn.Module) -> tuple[Tensor, bool]:
        """The filter table this layer reads without gradients, for atom states ``s`` (N, F).

        Returns:
            ``(rows, per_atom)``. With ``per_atom``, rows is (N * (K + 3), C): ``phi(s_a) * W(d_j) f_c(d_j)``
            for every atom a and table node j, so an edge reads its atom's block and needs neither
            the gather of ``phi(s)`` nor the product (the interpolation is linear, so this is the
            same function). Otherwise (more than :data:`PER_ATOM_TABLE_FLOATS` values) rows is the
            shared (K + 3, C) table of ``W f_c``.
        """
        # the envelope is folded into the table (a smooth factor of the same distance), so the
        # per-edge tensors of inference need not carry it
        nodes = self.table.nodes(lambda d: self.filter(rbf(d)) * cosine_cutoff(d, self.table.cutoff).unsqueeze(-1),
                                 self.filter, s)
        if s.shape[0] * nodes.numel() > PER_ATOM_TABLE_FLOATS:
            return nodes, False
        return (self.phi(s).unsqueeze(1) * nodes.unsqueeze(0)).reshape(-1, nodes.shape[1]), True

    def forward(self, p: Tensor, q: Tensor, s: Tensor, edges: "ProbeEdges", rbf: nn.Module) -> tuple[Tensor, Tensor]:
        """Update the probe states (with gradients; inference reads :meth:`inference_rows` in
        :meth:`DensityModel.probe_densities` instead).

        Args:
            p: (P, F) probe scalars. q: (3, P, F) probe vectors, Cartesian component first.
            s: (N, F) atom scalars.
            edges: the chunk's atom -> probe edges with their distance features (:class:`ProbeEdges`).
            rbf: the model's distance expansion (what ``edges.rbf`` was made with).
        Returns:
            updated ``p`` (P, F) and ``q`` (3, P, F).
        """
        # the envelope multiplies every message, so it is carried by the per-edge tensors that all
        # layers share (edges.unit, .vu, .va) rather than applied to each layer's (E, 4F) filter
        x = self.phi(s).index_select(0, edges.atom) * self.filter(edges.rbf)
        parts = x.split(self.hidden, dim=-1)
        if self.atom_vectors:
            dp = torch.addcmul(parts[0] * edges.envelope, parts[3], edges.vu)
            dq = torch.addcmul(edges.unit * parts[1], edges.va, parts[2])
        else:
            dp, dq = parts[0] * edges.envelope, edges.unit * parts[1]
        p = p.index_add(0, edges.probe, dp)
        q = q.index_add(1, edges.probe, dq)
        return self.update(p, q)


@dataclass
class ProbeEdges:
    """Per-edge tensors of a chunk of probes, computed once and shared by every :class:`ProbeLayer`
    (the atom states do not change between probe layers, so neither do their gathers).

    Attributes:
        probe: (E,) receiving probe within the chunk. atom: (E,) sending atom.
        distance: (E,) probe-atom distance d, Angstrom.
        rbf: (E, n_rbf) distance features (None in inference, which reads the layers' tables).
        envelope: (E, 1) cutoff envelope ``f_c(d)``.
        unit: (3, E, 1) ``f_c(d) u``, u the unit vector from the probe towards the atom.
        va: (3, E, F) ``f_c(d) v_atom`` (PaiNN atoms; None for SchNet).
        vu: (E, F) ``f_c(d) (v_atom . u)`` (PaiNN atoms; None for SchNet).

    In inference (``rbf`` None) ``unit``, ``va`` and ``vu`` lack the factor ``f_c(d)``, which the
    layers' tables carry (:meth:`ProbeLayer.inference_rows`).
    """

    probe: Tensor
    atom: Tensor
    distance: Tensor
    rbf: Tensor | None
    envelope: Tensor
    unit: Tensor
    va: Tensor | None
    vu: Tensor | None


#: Message chunks (of ``predict_chunk`` probes) whose probes go through the update blocks and the
#: head together in inference. The messages need small chunks (their gathered filter rows must stay
#: in cache); the per-probe blocks are a dozen small matrix products whose cost is mostly the call.
#: Measured on one thread (PaiNN 32, stride-3 grids of 3 QM9 molecules, median of 7 passes, twice):
#: 0.154-0.159 s per molecule at 8 against 0.160-0.164 s at 1, a small gain.
UPDATE_CHUNKS = 8


class DensityModel(nn.Module):
    """Density at query points from a 3D encoder's atom states (see the module docstring).

    Args:
        encoder: config of the 3D encoder (``painn`` or ``schnet``; plain data or config object).
        probe_layers: message rounds into the probes.
        probe_n_rbf: Gaussians on [0, cutoff] for the probe-atom distances.
        cutoff: probe-atom cutoff of the learned messages, Angstrom.
        baseline: ``none`` (``rho = softplus(out)``) or ``promolecule``
            (``rho = softplus(softplus^-1(promolecule) + out)``).
        promolecule: the free-atom table module (required for the promolecule baseline).
        probe_chunk: probes per pass through the layers when gradients are on (training).
        predict_chunk: the same without gradients (evaluation, prediction). Smaller, because there
            the filters come from tables whose gathered rows must stay in cache: on one thread a
            128-wide model took 42 us per probe at 256 and 63 us at 1,024 (PaiNN 64: 18 and 21).

    Attributes:
        encoder3d: the encoder (the name :func:`pipeline.checkpoint.load_pretrained_encoders` fills).
        probe_radius: radius (Angstrom) of the probe edges the model needs: the cutoff, or the
            free-atom table's reach when that is larger.
    """

    def __init__(self, encoder: BaseModel | dict[str, Any], probe_layers: int = 3, probe_n_rbf: int = 20,
                 cutoff: float = 4.0, baseline: str = "none", promolecule: Promolecule | None = None,
                 probe_chunk: int = 1024, predict_chunk: int = 256) -> None:
        super().__init__()
        cfg = encoder_config(encoder)
        if cfg.view != "3d":
            raise MolmatError(f"the density model needs a 3D encoder; '{cfg.name}' reads the {cfg.view} graph")
        if baseline not in BASELINES:
            raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
        if (baseline == "promolecule") != (promolecule is not None):
            raise ValueError("the promolecule baseline needs its free-atom table, and only it")
        self.encoder3d = build_encoder(cfg)
        hidden = self.encoder3d.node_dim
        self.atom_vectors = hasattr(self.encoder3d, "atom_states")   # PaiNN: scalar and vector states
        self.cutoff, self.baseline, self.probe_chunk = float(cutoff), baseline, int(probe_chunk)
        self.predict_chunk = int(predict_chunk)
        self.probe_n_rbf, self.n_layers = int(probe_n_rbf), int(probe_layers)
        self.p0 = nn.Parameter(torch.randn(hidden) * 0.1)
        self.rbf = GaussianRBF(probe_n_rbf, cutoff)
        self.layers = nn.ModuleList(ProbeLayer(hidden, probe_n_rbf, self.atom_vectors, cutoff) for _ in range(probe_layers))
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Sequential(nn.Linear(hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        # An untrained model predicts the promolecule exactly (training starts from its 9-15% NMAE,
        # not from a random field), or without a baseline a constant 1e-2 e/bohr^3, the mean density
        # of a QM9 molecule's box (10 electrons in 1200 bohr^3) and of Li's valence density: from
        # softplus(0) = 0.69 an optimiser moving the bias by ~lr per step needs thousands of steps.
        nn.init.zeros_(self.head[2].weight)
        nn.init.constant_(self.head[2].bias, 0.0 if baseline == "promolecule" else math.log(math.expm1(1e-2)))
        self.promolecule = promolecule
        self.probe_radius = max(self.cutoff, promolecule.radius_angstrom if promolecule is not None else 0.0)

    # ---------------------------------------------------------------------------- config
    def describe(self) -> dict[str, Any]:
        """The architecture as plain data (``config.json``'s ``model``)."""
        return {"encoder": self.encoder3d.cfg.model_dump(mode="json"), "probe_layers": self.n_layers,
                "probe_n_rbf": self.probe_n_rbf, "cutoff": self.cutoff, "baseline": self.baseline,
                "promolecule": self.promolecule.describe() if self.promolecule is not None else None}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "DensityModel":
        """A model with zero-filled tables and random weights from a model directory's ``config.json``.

        Args:
            config: plain data with ``model`` (:meth:`describe`).
        """
        m = config["model"]
        pro = m.get("promolecule")
        promolecule = Promolecule(pro["elements"], pro["points"], pro["a_bohr"], pro["b"]) if pro else None
        # the training run's probe_chunk is not used: it is a speed and memory knob, not architecture
        # (models trained at 8192 evaluate 2.5x faster at today's default)
        return cls(m["encoder"], int(m["probe_layers"]), int(m["probe_n_rbf"]), float(m["cutoff"]), m["baseline"],
                   promolecule)

    def views(self) -> list[str]:
        """Graph views the model reads (for featurisation checks)."""
        return ["3d"]

    # ------------------------------------------------------------------------------ pass
    def atom_states(self, graph: GraphBatch) -> tuple[Tensor, Tensor | None]:
        """Atom scalar states (N, F) and, for PaiNN, vector states (3, N, F) (component first).

        Raises:
            MolmatError: an element the promolecule table lacks.
        """
        if self.promolecule is not None and graph.g3d is not None:
            missing = self.promolecule.missing(graph.g3d.ndata["z"])
            if missing:
                from pipeline.elements import element_symbol

                raise MolmatError(f"the promolecule table has no free-atom density for "
                                  f"{', '.join(element_symbol(z) for z in missing)}; make one with python -m "
                                  "pipeline.promolecule and set density.promolecule_table, or density.baseline=none")
        if self.atom_vectors:
            s, v = self.encoder3d.atom_states(graph)
            return s, v.permute(1, 0, 2)
        _, s = self.encoder3d(graph)
        return s, None

    def probe_densities(self, graph: GraphBatch, states: tuple[Tensor, Tensor | None], probes: Probes,
                        parts: bool = False) -> Tensor | tuple[Tensor, Tensor]:
        """Density at the probes, ``probe_chunk`` (``predict_chunk`` without gradients) probes at a time.

        Args:
            graph: the structures (positions, cells, atomic numbers).
            states: :meth:`atom_states` of ``graph``.
            probes: the query points, edges sorted by probe, within :attr:`probe_radius`.
            parts: also return the baseline.
        Returns:
            (P,) density, e/bohr^3; with ``parts``, also (P,) the baseline (promolecule, or zeros).
        """
        n = len(probes)
        if n == 0:
            empty = probes.pos.new_zeros(0)
            return (empty, empty) if parts else empty
        if not torch.is_grad_enabled():
            out, base = self._infer(graph, states, probes)
            return (out, base) if parts else out
        chunk = self.probe_chunk
        starts = torch.arange(0, n, chunk, device=probes.pos.device)
        bounds = torch.searchsorted(probes.edge_probe, torch.cat([starts, starts.new_tensor([n])])).tolist()
        outs, bases = [], []
        for c, start in enumerate(starts.tolist()):
            out, base = self._chunk(graph, states, probes, start, min(start + chunk, n), bounds[c], bounds[c + 1])
            outs.append(out)
            bases.append(base)
        out, base = torch.cat(outs), torch.cat(bases)
        return (out, base) if parts else out

    def _infer(self, graph: GraphBatch, states: tuple[Tensor, Tensor | None], probes: Probes) -> tuple[Tensor, Tensor]:
        """(P,) density and (P,) baseline without gradients (see :meth:`_messages`).

        The messages of every layer depend on the atoms and the edges only, not on the probe
        states, so all layers' messages are summed in one pass over the edges (``predict_chunk``
        probes at a time) and the update blocks then run on :data:`UPDATE_CHUNKS` such chunks at once.
        """
        n = len(probes)
        tables = [layer.inference_rows(states[0], self.rbf) for layer in self.layers]
        rows = torch.cat([t[0] for t in tables], dim=1)
        phis = None if all(t[1] for t in tables) else torch.cat([layer.phi(states[0]) for layer in self.layers], dim=1)
        chunk = self.predict_chunk
        starts = torch.arange(0, n, chunk, device=probes.pos.device)
        bounds = torch.searchsorted(probes.edge_probe, torch.cat([starts, starts.new_tensor([n])])).tolist()
        starts = starts.tolist()
        outs, bases = [], []
        for b in range(0, len(starts), UPDATE_CHUNKS):
            sums = [self._messages(graph, states, probes, starts[c], min(starts[c] + chunk, n), bounds[c],
                                   bounds[c + 1], rows, phis) for c in range(b, min(b + UPDATE_CHUNKS, len(starts)))]
            base = torch.cat([x[0] for x in sums])
            dp, dq = torch.cat([x[1] for x in sums]), torch.cat([x[2] for x in sums], dim=1)
            p = self.p0.expand(len(base), -1)
            q = p.new_zeros(3, len(base), p.shape[1])
            for i, layer in enumerate(self.layers):
                p, q = layer.update(p + dp[:, i], q + dq[:, :, i])
            outs.append(self._output(self.head(self.norm(p)).squeeze(-1), base))
            bases.append(base)
        return torch.cat(outs), torch.cat(bases)

    def _output(self, out: Tensor, base: Tensor) -> Tensor:
        """(M,) density from the head's (M,) output and the (M,) baseline (see the module docstring)."""
        if self.baseline == "promolecule":
            return F.softplus(inverse_softplus(base) + out)
        return F.softplus(out)

    @staticmethod
    def _edge_geometry(graph: GraphBatch, probes: Probes, start: int, stop: int, e0: int, e1: int
                       ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Edges ``e0:e1`` of probes ``start:stop``: probe within the chunk (E,), atom (E,), vector
        from the probe to the atom's image (E, 3) and its length (E,), Angstrom."""
        pos = graph.g3d.ndata["pos"]
        probe = probes.edge_probe[e0:e1] - start
        atom = probes.edge_atom[e0:e1]
        structure = probes.structure[start:stop].index_select(0, probe)
        shift = torch.einsum("ei,eij->ej", probes.edge_image[e0:e1], graph.cell.index_select(0, structure))
        vec = pos.index_select(0, atom) + shift - probes.pos[start:stop].index_select(0, probe)
        return probe, atom, vec, vec.norm(dim=-1)

    def _baseline(self, graph: GraphBatch, probe: Tensor, atom: Tensor, d: Tensor, m: int) -> Tensor:
        """(m,) promolecule (zeros without the baseline) at ``m`` probes from their edges."""
        base = torch.zeros(m, dtype=d.dtype, device=d.device)
        if self.promolecule is None:
            return base
        return base.index_add(0, probe, self.promolecule(d, graph.g3d.ndata["z"].index_select(0, atom)))

    def baseline_densities(self, graph: GraphBatch, probes: Probes) -> Tensor:
        """(P,) the baseline alone (promolecule, periodic images included; zeros without it), e/bohr^3:
        no network, so cheap on whole grids. ``probes`` edges must reach :attr:`probe_radius`."""
        n = len(probes)
        if n == 0 or self.promolecule is None:
            return probes.pos.new_zeros(n)
        chunk = 8 * self.predict_chunk
        starts = list(range(0, n, chunk))
        bounds = torch.searchsorted(probes.edge_probe, torch.tensor(starts + [n], device=probes.pos.device)).tolist()
        out = []
        for c, start in enumerate(starts):
            stop = min(start + chunk, n)
            probe, atom, _, d = self._edge_geometry(graph, probes, start, stop, bounds[c], bounds[c + 1])
            out.append(self._baseline(graph, probe, atom, d, stop - start))
        return torch.cat(out)

    def _edges(self, graph: GraphBatch, states: tuple[Tensor, Tensor | None], probes: Probes, start: int, stop: int,
               e0: int, e1: int, with_rbf: bool) -> tuple[ProbeEdges, Tensor]:
        """The message edges (within :attr:`cutoff`) of probes ``start:stop`` (edges ``e0:e1``) and
        the (m,) baseline of those probes (from all their edges, up to :attr:`probe_radius`);
        ``with_rbf`` False: for the tables of inference (see :class:`ProbeEdges`)."""
        v = states[1]
        probe, atom, vec, d = self._edge_geometry(graph, probes, start, stop, e0, e1)
        base = self._baseline(graph, probe, atom, d, stop - start)
        inside = d < self.cutoff
        if not bool(inside.all()):  # the promolecule's longer edges carry no messages
            probe, atom, vec, d = probe[inside], atom[inside], vec[inside], d[inside]
        # a probe on top of an atom has no direction to it; its vector messages vanish instead of NaN
        envelope = cosine_cutoff(d, self.cutoff).unsqueeze(-1)
        scale = envelope if with_rbf else 1.0
        unit = (vec * (scale / d.clamp_min(1e-9).unsqueeze(-1))).T.unsqueeze(-1)
        va = vu = None
        if v is not None:
            va = v.index_select(1, atom)
            vu = (va * unit).sum(dim=0)
            if with_rbf:
                va = va * envelope
        return ProbeEdges(probe, atom, d, self.rbf(d) if with_rbf else None, envelope, unit, va, vu), base

    def _chunk(self, graph: GraphBatch, states: tuple[Tensor, Tensor | None], probes: Probes, start: int, stop: int,
               e0: int, e1: int) -> tuple[Tensor, Tensor]:
        """(m,) density and (m,) baseline of probes ``start:stop`` through the layers' filter MLPs
        (the path gradients flow through)."""
        edges, base = self._edges(graph, states, probes, start, stop, e0, e1, True)
        p = self.p0.expand(stop - start, -1)
        q = p.new_zeros(3, stop - start, p.shape[1])
        for layer in self.layers:
            p, q = layer(p, q, states[0], edges, self.rbf)
        return self._output(self.head(self.norm(p)).squeeze(-1), base), base

    def _messages(self, graph: GraphBatch, states: tuple[Tensor, Tensor | None], probes: Probes, start: int,
                  stop: int, e0: int, e1: int, rows: Tensor, phis: Tensor | None) -> tuple[Tensor, Tensor, Tensor]:
        """Every layer's summed messages into probes ``start:stop`` (m of them), from tables.

        Args:
            rows: the layers' :meth:`ProbeLayer.inference_rows` side by side, (R, L * C): per-atom
                tables (rows ``atom * (K + 3) + node``) or, with ``phis``, the shared tables.
            phis: None for per-atom tables, else (N, L * C) every layer's ``phi(s)`` side by side.
        Returns:
            (m,) baseline, (m, L, F) scalar and (3, m, L, F) vector messages of the L layers.
        """
        edges, base = self._edges(graph, states, probes, start, stop, e0, e1, False)
        table = self.layers[0].table   # every layer's table has the same nodes: one lookup serves all
        node, weights = table.coefficients(edges.distance)
        if phis is None:
            x = RadialTable.interpolate(rows, edges.atom * (table.intervals + 3) + node, weights)
        else:
            x = phis.index_select(0, edges.atom) * RadialTable.interpolate(rows, node, weights)
        hidden = self.encoder3d.node_dim
        x = x.view(len(node), len(self.layers), 4 if self.atom_vectors else 2, hidden)   # (E, L, channels, F)
        unit = edges.unit.unsqueeze(-1)
        if self.atom_vectors:
            dp = torch.addcmul(x[:, :, 0], x[:, :, 3], edges.vu.unsqueeze(1))
            dq = torch.addcmul(unit * x[:, :, 1], edges.va.unsqueeze(2), x[:, :, 2])
        else:
            dp, dq = x[:, :, 0], unit * x[:, :, 1]
        m = stop - start
        sums_p = x.new_zeros(m, len(self.layers), hidden).index_add_(0, edges.probe, dp)
        sums_q = x.new_zeros(3, m, len(self.layers), hidden).index_add_(1, edges.probe, dq)
        return base, sums_p, sums_q

    def forward(self, batch: DensityBatch) -> Tensor:
        """(P,) density (e/bohr^3) at the probes of a :class:`DensityBatch`."""
        return self.probe_densities(batch.graph, self.atom_states(batch.graph), batch.probes)
