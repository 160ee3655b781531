"""Encoders on real QM9 molecules and Materials Project crystals: shapes, invariances, fast paths."""
from __future__ import annotations

import math
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

import dgl
from pipeline import MolmatError
from pipeline import testing as T
from pipeline.config import PreprocessConfig
from pipeline.featurize import featurize
from pipeline.graphs import BOND_DIM, GraphBatch, collate
from pipeline.models import (ENCODERS, MPNN, MPNNConfig, PaiNN, PaiNNConfig, SchNet, SchNetConfig, build_encoder,
                             check_encoder_cutoff)
from pipeline.models import mpnn as mpnn_module
from pipeline.models.mpnn import EDGE_TYPES, add_virtual_edges, edge_types
from pipeline.readers import RawRecord
from pipeline.shards import ShardDataset

MESSAGES = ("edge_network", "pair", "ggnn")
READOUTS = ("set2set", "sum", "mean")
OPTIONS: list[dict[str, Any]] = [{}, {"master_node": True}, {"virtual_edges": True}, {"towers": 2}]
# neighbour lists complete to 5 A, so a supercell sees exactly the same environments
CRYSTAL_CFG = PreprocessConfig(crystal={"cutoff": 5.0, "max_neighbors": 200})
CRYSTAL_IDS = ("mp-1008676", "mp-1016928", "mp-11114")  # TiS2 (3 atoms), MgSiO3 (5), KCuPdSe5 (16, triclinic)


def _close(a: torch.Tensor, b: torch.Tensor, tol: float = 1e-4) -> None:
    torch.testing.assert_close(a.detach().double(), b.detach().double(), atol=tol, rtol=tol)


@pytest.fixture(scope="module")
def qm9_records(qm9_shards: Path) -> list[dict[str, Any]]:
    """The first 24 real QM9 records."""
    ds = ShardDataset(qm9_shards)
    return [ds[i] for i in range(24)]


@pytest.fixture(scope="module")
def mp_structures(datasets_dir: Path) -> list[Any]:
    """A few real MP crystals as pymatgen Structures, read from the shipped CIF archive."""
    from pymatgen.core import Structure

    out = []
    with tarfile.open(datasets_dir / "mp" / "cifs.tar.gz") as tf, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF parser warns about rounding
        for rid in CRYSTAL_IDS:
            out.append(Structure.from_str(tf.extractfile(f"{rid}.cif").read().decode(), fmt="cif"))
    return out


def crystal_record(structure: Any) -> dict[str, Any]:
    """Featurise a pymatgen Structure exactly as preprocessing does (with :data:`CRYSTAL_CFG`)."""
    raw = RawRecord(source="test", rid="x", kind="crystal", fmt="pymatgen", data=structure.as_dict(), labels={})
    return featurize(raw, [], CRYSTAL_CFG)


def unlabelled(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records without targets, so molecules and crystals (different target lists) share a batch."""
    return [dict(r, y=np.zeros(0)) for r in records]


def _mpnn(**kwargs: Any) -> MPNN:
    torch.manual_seed(0)
    return MPNN(MPNNConfig(**{"hidden": 16, "steps": 2, **kwargs})).eval()


def _schnet(**kwargs: Any) -> SchNet:
    torch.manual_seed(0)
    return SchNet(SchNetConfig(**{"hidden": 16, "interactions": 2, "n_rbf": 20, **kwargs})).eval()


# ------------------------------------------------------------------------------------------ MPNN
@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("readout", READOUTS)
def test_mpnn_shapes_every_message_and_readout(message: str, readout: str, qm9_records: list, mp_records: list) -> None:
    net = _mpnn(message=message, readout=readout)
    assert net.out_dim == (32 if readout == "set2set" else 16) and net.node_dim == 16
    for records in (qm9_records, mp_records):
        batch = collate(records)
        with torch.no_grad():
            graph, nodes = net(batch)
        assert graph.shape == (len(records), net.out_dim)
        assert nodes.shape == (batch.g2d.num_nodes(), 16)
        assert torch.isfinite(graph).all() and torch.isfinite(nodes).all()


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("option", OPTIONS[1:], ids=lambda o: next(iter(o)))
def test_mpnn_options_shapes_and_batch_independence(message: str, option: dict, qm9_records: list,
                                                    mp_records: list) -> None:
    """Each graph's embedding in a batch equals its embedding alone: nothing leaks between graphs."""
    net = _mpnn(message=message, **option)
    for records in (qm9_records, mp_records):
        batch = collate(records)
        with torch.no_grad():
            graph, nodes = net(batch)
            alone = torch.cat([net(collate([r]))[0] for r in records[:4]])
        assert graph.shape == (len(records), 32) and nodes.shape == (batch.g2d.num_nodes(), 16)
        assert torch.isfinite(graph).all()
        _close(graph[:4], alone)
        assert not torch.allclose(graph[0], graph[1])


def test_mpnn_reads_only_the_2d_graph(qm9_records: list) -> None:
    net = _mpnn()
    batch = collate(qm9_records[:6])
    with torch.no_grad():
        ref, _ = net(batch)
        batch.g3d = None
        no3d, _ = net(batch)
    _close(ref, no3d, 0.0)


def test_mpnn_crystal_shells_switch(mp_records: list) -> None:
    """With ``crystal_shells`` the shell flags change the embedding; without, they are ignored."""
    from pipeline.graphs import N_SHELLS, SHELL_COLUMN

    batch = collate(mp_records[:6])
    other = collate(mp_records[:6])
    other.g2d.edata["e"][:, SHELL_COLUMN:SHELL_COLUMN + N_SHELLS] = 0.0
    torch.manual_seed(0)
    on = _mpnn()
    torch.manual_seed(0)
    off = _mpnn(crystal_shells=False)
    with torch.no_grad():
        assert not torch.allclose(on(batch)[0], on(other)[0])
        _close(off(batch)[0], off(other)[0], 0.0)


@pytest.mark.parametrize("message", MESSAGES)
@pytest.mark.parametrize("option", OPTIONS, ids=lambda o: next(iter(o), "plain"))
def test_mpnn_permutation_invariance(message: str, option: dict, qm9_records: list, mp_records: list) -> None:
    rng = np.random.default_rng(1)
    molecules = [r for r in qm9_records if len(r["z"]) >= 9][:3]
    records = unlabelled(molecules + [r for r in mp_records if len(r["z"]) >= 4][:1])
    perms = [rng.permutation(len(r["z"])) for r in records]
    permuted = [T.permute(r, p) for r, p in zip(records, perms)]
    net = _mpnn(message=message, **option)
    with torch.no_grad():
        graph, nodes = net(collate(records))
        graph_p, nodes_p = net(collate(permuted))
    _close(graph, graph_p)
    order = torch.from_numpy(T.batch_node_order(perms))
    _close(nodes[order], nodes_p)  # node states are equivariant
    assert not torch.allclose(nodes[order], nodes)


@pytest.mark.parametrize("records_name", ["qm9_records", "mp_records"])
@pytest.mark.parametrize("option", [{}, {"virtual_edges": True}, {"towers": 2}, {"master_node": True}],
                         ids=["plain", "virtual", "towers", "master"])
def test_edge_network_unique_path_equals_per_edge(records_name: str, option: dict, request: pytest.FixtureRequest,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    batch = collate(request.getfixturevalue(records_name))
    net = _mpnn(**option)
    e = batch.g2d.edata["e"]
    if option.get("virtual_edges"):
        e = add_virtual_edges(batch.g2d, e)[1]
    n_unique = torch.unique(e, dim=0).shape[0]
    assert n_unique * 16 <= mpnn_module.UNIQUE_PATH_MAX  # so the default path is the dense per-type one
    with torch.no_grad():
        fast, fast_nodes = net(batch)
        monkeypatch.setattr(mpnn_module, "UNIQUE_PATH_MAX", 0)  # distinct rows, gathered per edge
        gathered, _ = net(batch)
        net.force_per_edge = True  # A evaluated on every edge's own features
        slow, slow_nodes = net(batch)
    _close(fast, slow, 1e-5)
    _close(fast_nodes, slow_nodes, 1e-5)
    _close(gathered, slow, 1e-5)


def test_ggnn_dense_path_equals_per_edge(qm9_records: list, mp_records: list) -> None:
    net = _mpnn(message="ggnn", virtual_edges=True)
    batch = collate(unlabelled(qm9_records[:8] + mp_records[:8]))
    with torch.no_grad():
        fast, _ = net(batch)
        net.force_per_edge = True
        slow, _ = net(batch)
    _close(fast, slow, 1e-5)


def test_add_virtual_edges_completes_each_graph(qm9_records: list, mp_records: list) -> None:
    records = unlabelled(qm9_records[:6] + mp_records[:4])
    batch = collate(records)
    g, feat = add_virtual_edges(batch.g2d, batch.g2d.edata["e"])
    n = batch.n_atoms
    assert feat.shape == (g.num_edges(), BOND_DIM + 1)
    src, dst = g.edges()
    graph_of_node = torch.repeat_interleave(torch.arange(len(records)), n)
    assert torch.equal(graph_of_node[src], graph_of_node[dst])  # never across graphs
    assert torch.equal(torch.repeat_interleave(torch.arange(len(records)), g.batch_num_edges()), graph_of_node[dst])
    virtual = feat[:, BOND_DIM] == 1
    assert torch.all(feat[virtual, :BOND_DIM] == 0)
    vs, vd = src[virtual], dst[virtual]
    assert torch.all(vs != vd)
    keys = vs * g.num_nodes() + vd
    assert keys.unique().numel() == keys.numel()
    assert torch.equal(keys.sort().values, (vd * g.num_nodes() + vs).sort().values)  # both directions
    old = batch.g2d.edata["e"]
    torch.testing.assert_close(feat[~virtual, :BOND_DIM], old)
    for i, r in enumerate(records[:6]):  # molecules: virtual + bonds (both ways) = all ordered pairs
        nb = r["bond_index"].shape[1]
        assert int(g.batch_num_edges()[i]) == len(r["z"]) * (len(r["z"]) - 1)
        assert int((graph_of_node[vd] == i).sum()) == len(r["z"]) * (len(r["z"]) - 1) - 2 * nb
    assert torch.equal(g.batch_num_nodes(), batch.g2d.batch_num_nodes())


def test_edge_types_follow_bond_columns(qm9_records: list, mp_records: list) -> None:
    batch = collate(unlabelled(qm9_records[:10] + mp_records[:3]))
    g, feat = add_virtual_edges(batch.g2d, batch.g2d.edata["e"])
    types = edge_types(feat)
    bond_kinds = np.concatenate([r["bond_feat"][:, 0] for r in qm9_records[:10]]).astype(np.int64)
    for code in range(1, 5):  # single, double, triple, aromatic; every bond appears twice
        assert int((types == code - 1).sum()) == 2 * int((bond_kinds == code).sum())
    n_crystal_edges = sum(r["nbr_index"].shape[1] for r in mp_records[:3])
    assert int((types == EDGE_TYPES.index("crystal_neighbour")).sum()) == n_crystal_edges
    assert int((types == EDGE_TYPES.index("virtual")).sum()) == int(feat[:, BOND_DIM].sum())


# ---------------------------------------------------------------------------------------- SchNet
def test_schnet_shapes(qm9_records: list, mp_records: list) -> None:
    net = _schnet(readout="sum")
    assert net.out_dim == net.node_dim == 16
    for records in (qm9_records, mp_records):
        batch = collate(records)
        with torch.no_grad():
            graph, nodes = net(batch)
        assert graph.shape == (len(records), 16) and nodes.shape == (batch.g3d.num_nodes(), 16)
        assert torch.isfinite(graph).all()
        assert not torch.allclose(graph[0], graph[1])


BUILDERS_3D = {"schnet": lambda **kw: _schnet(**kw), "painn": lambda **kw: _painn(**kw),
               "painn_block_norm": lambda **kw: _painn(block_norm=True, **kw),
               "painn_elements": lambda **kw: _painn(block_norm=True, element_descriptors=True, **kw),
               "painn_softmax": lambda **kw: _painn(**{"block_norm": True, "readout": "softmax", **kw})}


@pytest.mark.parametrize("encoder", list(BUILDERS_3D))
def test_3d_encoder_molecule_rotation_translation_permutation(encoder: str, qm9_records: list) -> None:
    records = [r for r in qm9_records if len(r["z"]) >= 9][:4]
    net = BUILDERS_3D[encoder]()
    rot = T.random_rotation(0)
    with torch.no_grad():
        T.assert_invariant(lambda rs: net(collate(rs))[0], records, {
            "rotation and translation": lambda r: T.translate(T.rotate(r, rot), [3.1, -7.2, 0.4]),
            "permutation": lambda r: T.permute(r, T.random_permutation(r, seed=2)),
        }, atol=1e-4, rtol=1e-4)
        # a geometry change the model should see, so the checks above can fail
        ref, _ = net(collate(records))
        bent = [dict(r, pos=r["pos"] * 1.05) for r in records]
        assert (net(collate(bent))[0] - ref).abs().max() > 1e-3


@pytest.mark.parametrize("encoder", list(BUILDERS_3D))
def test_3d_encoder_crystal_cell_choice(encoder: str, mp_structures: list) -> None:
    """Same crystal, other cells: 2x1x1 supercell, another basis, atoms shifted and wrapped, rotated."""
    build = BUILDERS_3D[encoder]
    net_mean, net_sum = build(cutoff=5.0), build(cutoff=5.0, readout="sum")
    rot = T.random_rotation(3)
    variants = {
        "super": lambda r: T.supercell(r, (2, 1, 1), CRYSTAL_CFG),
        "basis": lambda r: T.supercell(r, [[1, 1, 0], [0, 1, 0], [0, 0, 1]], CRYSTAL_CFG),
        "wrapped": lambda r: T.wrap(T.translate(r, np.full(3, 0.37) @ r["cell"])),
        "rotated": lambda r: T.rotate(r, rot),
    }
    records = [crystal_record(s) for s in mp_structures]
    with torch.no_grad():
        ref, ref_sum = net_mean(collate(records))[0], net_sum(collate(records))[0]
        assert torch.cdist(ref, ref).fill_diagonal_(1.0).min() > 1e-3  # the crystals are told apart
        T.assert_invariant(lambda rs: net_mean(collate(rs))[0], records, variants, atol=1e-4, rtol=1e-4)
        for name, variant in variants.items():
            factor = 2.0 if name == "super" else 1.0  # sum readout is extensive
            _close(factor * ref_sum, net_sum(collate([variant(r) for r in records]))[0])


def _trimmed(records: list[dict[str, Any]], cutoff: float) -> list[dict[str, Any]]:
    """The records with their stored neighbour lists cut to ``cutoff`` (each loses some edges)."""
    out = []
    for r in records:
        src, dst = r["nbr_index"]
        keep = np.linalg.norm(r["pos"][src] - r["pos"][dst], axis=1) < cutoff
        assert not keep.all()
        out.append(dict(r, nbr_index=r["nbr_index"][:, keep], nbr_image=r["nbr_image"][keep]))
    return out


def test_schnet_ignores_edges_beyond_its_cutoff(qm9_records: list) -> None:
    records = qm9_records[10:16]
    trimmed = _trimmed(records, 3.0)
    net = _schnet(cutoff=3.0)
    with torch.no_grad():
        _close(net(collate(records))[0], net(collate(trimmed))[0], 1e-5)
        assert (_schnet(cutoff=5.0)(collate(records))[0] - net(collate(records))[0]).abs().max() > 1e-3


def test_schnet_continuous_as_an_edge_crosses_the_cutoff(qm9_records: list) -> None:
    record = next(r for r in qm9_records if len(r["z"]) >= 9)
    src, dst = record["nbr_index"]
    d = np.linalg.norm(record["pos"][src] - record["pos"][dst], axis=1)
    d0 = d[np.argmin(np.abs(d - 3.0))]
    net = _schnet(cutoff=3.0)
    outputs, counts = [], []
    for target in (3.0 - 1e-4, 3.0 + 1e-4):  # scale the molecule so that pair moves across 3.0 A
        scaled = dict(record, pos=record["pos"] * (target / d0))
        counts.append(int((d * target / d0 < 3.0).sum()))
        with torch.no_grad():
            outputs.append(net(collate([scaled]))[0])
    assert counts[0] > counts[1]  # an edge really left the cutoff sphere
    _close(outputs[0], outputs[1], 1e-3)


def test_schnet_interaction_matches_dense_reference(qm9_records: list) -> None:
    """cfconv on the graph equals the all-pairs sum ``h_i + f_out(sum_j f_in(h_j) * W(d_ij) f_c(d_ij))``."""
    from pipeline.models.schnet import ConvEdges, cosine_cutoff

    record = next(r for r in qm9_records if len(r["z"]) >= 12)
    net = _schnet(cutoff=4.0)
    batch = collate([record])
    pos = batch.g3d.ndata["pos"]
    with torch.no_grad():
        h = net.embedding(batch.g3d.ndata["z"])
        dist = torch.cdist(pos, pos)
        block = net.interactions[0]
        w = block.filter(net.rbf(dist)) * cosine_cutoff(dist, 4.0).unsqueeze(-1)
        w = w * (~torch.eye(len(pos), dtype=torch.bool)).unsqueeze(-1)  # no self-interaction
        dense = h + block.f2out(torch.einsum("ijh,jh->ih", w, block.in2f(h)))
        d_edges = dist[batch.g3d.edges()[0], batch.g3d.edges()[1]]
        keep = d_edges < 4.0
        edges = ConvEdges(batch.g3d.edges()[0][keep], batch.g3d.edges()[1][keep], 0, int(keep.sum()), len(pos))
        rbf = net.rbf(d_edges[keep])
        graph = block(edges, h, F.softplus(block.filter[0](rbf)), cosine_cutoff(d_edges[keep], 4.0).unsqueeze(-1))
    _close(graph, dense, 1e-5)


@pytest.mark.parametrize("encoder", list(BUILDERS_3D))
@pytest.mark.parametrize("records_name", ["qm9_records", "mp_records"])
def test_3d_encoder_position_gradients(encoder: str, records_name: str, request: pytest.FixtureRequest) -> None:
    batch: GraphBatch = collate(request.getfixturevalue(records_name)[:8])
    net = BUILDERS_3D[encoder](cutoff=4.0)
    pos = batch.g3d.ndata["pos"].clone().requires_grad_(True)
    graph = net(batch, pos)[0]
    # not graph.sum(): PaiNN's final LayerNorm makes each row sum to a constant
    probe = torch.randn(graph.shape, generator=torch.Generator().manual_seed(0))
    (grad,) = torch.autograd.grad((graph * probe).sum(), pos)
    assert torch.isfinite(grad).all()
    assert grad.abs().max() > 1e-4
    # translating all atoms of one structure changes nothing, so its gradients sum to zero
    per_graph = torch.zeros(batch.num_graphs, 3, dtype=torch.float64).index_add_(
        0, torch.repeat_interleave(torch.arange(batch.num_graphs), batch.n_atoms), grad.double())
    assert per_graph.abs().max() < 1e-4


def test_schnet_needs_3d(qm9_records: list) -> None:
    batch = collate(qm9_records[:2])
    batch.g3d = None
    with pytest.raises(MolmatError, match="3D"):
        _schnet()(batch)
    with pytest.raises(MolmatError, match="cutoff 6.0 A exceeds the neighbour cutoff 5.0 A of the shards"):
        check_encoder_cutoff(SchNetConfig(cutoff=6.0), 5.0, "the shards")
    check_encoder_cutoff(SchNetConfig(cutoff=5.0), 5.0, "the shards")
    check_encoder_cutoff(MPNNConfig(), 0.1, "the shards")  # a 2D encoder has no cutoff of its own


# ------------------------------------------------------------------------------- configs, build
def test_build_encoder_and_configs() -> None:
    assert set(ENCODERS) == {"mpnn", "schnet", "painn"}
    net = build_encoder("mpnn", {"hidden": 8, "readout": "sum"})
    assert isinstance(net, MPNN) and net.out_dim == 8
    assert isinstance(build_encoder("schnet", SchNetConfig(hidden=8)), SchNet)
    assert build_encoder("mpnn", None).out_dim == 128  # defaults: hidden 64, set2set
    # by config alone: the name inside picks the encoder
    assert isinstance(build_encoder({"name": "schnet", "hidden": 8}), SchNet)
    assert build_encoder(MPNNConfig(hidden=4, readout="mean")).out_dim == 4
    with pytest.raises(MolmatError, match="mpnn, painn, schnet"):
        build_encoder("gin", {})
    with pytest.raises(MolmatError, match="hiden"):
        build_encoder("mpnn", {"hiden": 8})
    with pytest.raises(MolmatError, match="towers"):
        build_encoder("mpnn", {"hidden": 10, "towers": 3})
    with pytest.raises(MolmatError, match="readout"):
        build_encoder("schnet", {"readout": "set2set"})
    with pytest.raises(ValidationError):
        MPNNConfig(message="gcn")


def _schnet_reference(net: SchNet, batch: GraphBatch) -> torch.Tensor:
    """SchNet written edge by edge from its definition: one filter per directed edge, the
    shifted softplus as a module, messages summed with index_add (no DGL kernel, no pairing)."""
    from pipeline.graphs import edge_vectors
    from pipeline.models.schnet import cosine_cutoff

    g = batch.g3d
    src, dst = g.edges()
    d = edge_vectors(g, batch.cell).norm(dim=-1)
    keep = d < net.cfg.cutoff
    src, dst, d = src[keep], dst[keep], d[keep]
    h = net.embedding(g.ndata["z"])
    for block in net.interactions:
        w = block.filter(net.rbf(d)) * cosine_cutoff(d, net.cfg.cutoff).unsqueeze(-1)
        m = torch.zeros_like(h).index_add_(0, dst, block.in2f(h)[src] * w)
        h = h + block.f2out(m)
    graph = torch.repeat_interleave(torch.arange(batch.num_graphs), g.batch_num_nodes())
    return torch.zeros(batch.num_graphs, h.shape[1]).index_add_(0, graph, h) / g.batch_num_nodes().unsqueeze(-1)


@pytest.mark.parametrize("records_name", ["qm9_records", "mp_records"])
def test_schnet_matches_an_edge_by_edge_reference(records_name: str, request: pytest.FixtureRequest) -> None:
    """The paired filters, the folded softplus shift and DGL's kernels give SchNet's outputs."""
    batch = collate(request.getfixturevalue(records_name))
    net = _schnet(cutoff=5.0)
    with torch.no_grad():
        _close(net(batch)[0], _schnet_reference(net, batch), 1e-5)


@pytest.mark.parametrize("records_name", ["qm9_records", "mp_records"])
def test_pair_order_pairs_each_edge_with_its_reverse(records_name: str, request: pytest.FixtureRequest) -> None:
    from pipeline.models.schnet import pair_order

    g = collate(request.getfixturevalue(records_name)).g3d
    src, dst = (t.tolist() for t in g.edges())
    image = [tuple(int(round(v)) for v in row) for row in g.edata["image"].tolist()]
    perm, n_pairs, n_single = pair_order(g.edges()[0], g.edges()[1], g.edata["image"], g.num_nodes())
    assert sorted(perm.tolist()) == list(range(len(src))) and 2 * n_pairs + n_single == len(src)
    edges = {(s, d, i) for s, d, i in zip(src, dst, image)}
    reverse = lambda e: (dst[e], src[e], tuple(-v for v in image[e]))  # noqa: E731
    for k in range(n_pairs):
        first, second = int(perm[k]), int(perm[n_pairs + n_single + k])
        assert reverse(first) == (src[second], dst[second], image[second])
    for k in range(n_pairs, n_pairs + n_single):
        assert reverse(int(perm[k])) not in edges
    if records_name == "qm9_records":
        assert n_single == 0  # a molecule's neighbour list is symmetric
    else:
        assert n_pairs > n_single  # most crystal neighbours are mutual


def test_batched_crystal_shells_equal_one_record_at_a_time(mp_records: list) -> None:
    """Shells are found for the whole batch at once; no record's shells may depend on another's."""
    together = collate(mp_records).g2d.edata["e"]
    alone = torch.cat([collate([r]).g2d.edata["e"] for r in mp_records])
    assert torch.equal(together, alone)
    assert together[:, 8:].sum() > 0  # second and further shells occur: the comparison covers them


# ----------------------------------------------------------------------------------------- PaiNN
def _painn(**kwargs: Any) -> PaiNN:
    torch.manual_seed(0)
    return PaiNN(PaiNNConfig(**{"hidden": 16, "interactions": 2, "n_rbf": 12, **kwargs})).eval()


@pytest.mark.parametrize("block_norm", [False, True])
def test_painn_shapes_and_vector_equivariance(block_norm: bool, qm9_records: list, mp_records: list) -> None:
    net = _painn(readout="sum", block_norm=block_norm)
    assert net.out_dim == net.node_dim == 16
    rot = T.random_rotation(5)
    for records in (qm9_records[:8], mp_records[:8]):
        batch = collate(records)
        with torch.no_grad():
            graph, nodes = net(batch)
            s, v = net.atom_states(batch)
            s_rot, v_rot = net.atom_states(collate([T.rotate(r, rot) for r in records]))
        assert graph.shape == (len(records), 16) and nodes.shape == (batch.g3d.num_nodes(), 16)
        assert torch.isfinite(graph).all() and not torch.allclose(graph[0], graph[1])
        # scalars invariant, vectors rotate with the structure: v(R x) = R v(x), row vectors
        _close(s_rot, s)
        _close(v_rot, torch.einsum("ij,njf->nif", torch.as_tensor(rot, dtype=v.dtype), v))
        assert v.abs().max() > 1e-3  # the vector channel is used


def test_painn_sees_angles_that_distances_alone_miss(qm9_records: list) -> None:
    """Real QM9 ammonia with one H-N-H angle opened from the real ~107 to 150 degrees, bond
    lengths kept and only the N-H edges listed: every atom sees the same distances, so SchNet's
    atom states cannot change; PaiNN's must, through its vector channel."""
    nh3 = next(r for r in qm9_records if sorted(r["z"].tolist()) == [1, 1, 1, 7])
    o = int(np.flatnonzero(nh3["z"] == 7)[0])
    hs = np.flatnonzero(nh3["z"] == 1)
    h1, h2 = int(hs[0]), int(hs[1])
    src = np.concatenate([hs, np.full(3, o)]); dst = np.concatenate([np.full(3, o), hs])
    base = dict(nh3, nbr_index=np.stack([src, dst]), nbr_image=np.zeros((6, 3)))

    def opened(angle_deg: float) -> dict[str, Any]:
        pos = nh3["pos"].copy()
        a, b = pos[h1] - pos[o], pos[h2] - pos[o]
        axis = np.cross(a, b) / np.linalg.norm(np.cross(a, b))
        e1 = a / np.linalg.norm(a)
        e2 = np.cross(axis, e1)
        t = np.deg2rad(angle_deg)
        pos[h2] = pos[o] + np.linalg.norm(b) * (np.cos(t) * e1 + np.sin(t) * e2)
        return dict(base, pos=pos)

    painn = _painn(cutoff=5.0)
    schnet = SchNet(SchNetConfig(hidden=16, interactions=2, n_rbf=12, cutoff=5.0)).eval()
    with torch.no_grad():
        p = [painn(collate([r]))[1] for r in (base, opened(150.0))]
        q = [schnet(collate([r]))[1] for r in (base, opened(150.0))]
    _close(q[0], q[1], 1e-5)
    assert (p[0] - p[1]).abs().max() > 1e-3


def test_painn_cutoff_and_continuity(qm9_records: list) -> None:
    records = qm9_records[10:16]
    trimmed = _trimmed(records, 3.0)
    net = _painn(cutoff=3.0)
    with torch.no_grad():
        _close(net(collate(records))[0], net(collate(trimmed))[0], 1e-5)
    record = next(r for r in qm9_records if len(r["z"]) >= 9)
    src, dst = record["nbr_index"]
    d = np.linalg.norm(record["pos"][src] - record["pos"][dst], axis=1)
    d0 = d[np.argmin(np.abs(d - 3.0))]
    with torch.no_grad():
        out = [net(collate([dict(record, pos=record["pos"] * (t / d0))]))[0] for t in (3.0 - 1e-4, 3.0 + 1e-4)]
    _close(out[0], out[1], 1e-3)


@pytest.mark.parametrize("block_norm", [False, True])
def test_painn_message_matches_dense_reference(block_norm: bool, qm9_records: list) -> None:
    """The first message block on the graph equals its all-pairs definition with einsum (with
    block_norm: on the LayerNorm of the scalars and the RMS-normalised vectors, written out)."""
    from pipeline.models.painn import enveloped_radial
    from pipeline.models.schnet import cosine_cutoff

    record = next(r for r in qm9_records if len(r["z"]) >= 12)
    net = _painn(cutoff=4.0, block_norm=block_norm)
    batch = collate([record])
    pos = batch.g3d.ndata["pos"].double()
    net = net.double()
    with torch.no_grad():
        s = net.embedding(batch.g3d.ndata["z"])
        v = torch.randn(len(pos), 3, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        rij = pos.unsqueeze(0) - pos.unsqueeze(1)            # [i, j] = r_j - r_i
        dist = rij.norm(dim=-1)
        off = ~torch.eye(len(pos), dtype=torch.bool)
        d_safe = torch.where(off, dist, torch.ones_like(dist))
        block = net.messages[0]
        w = block.filter(net.rbf(d_safe)) * cosine_cutoff(d_safe, 4.0).unsqueeze(-1) * off.unsqueeze(-1)
        s_in, v_in = s, v
        if block_norm:
            norm = block.s_norm
            s_in = (s - s.mean(-1, keepdim=True)) / torch.sqrt(s.var(-1, unbiased=False, keepdim=True) + norm.eps)
            s_in = s_in * norm.weight + norm.bias
            v_in = v / torch.sqrt(1.0 + (v ** 2).sum(dim=(1, 2), keepdim=True) / 16)
        phi = block.phi(s_in)
        x = phi.unsqueeze(0) * w                             # [i, j, 3F]
        x_vv, x_s, x_vs = x.split(16, dim=-1)
        s_ref = s + x_s.sum(1)
        unit = rij / d_safe.unsqueeze(-1)
        v_ref = v + torch.einsum("ijf,jcf->icf", x_vv, v_in) + torch.einsum("ijf,ijc->icf", x_vs, unit)
        src, dst = batch.g3d.edges()
        vec = pos[src] - pos[dst]
        dd = vec.norm(dim=-1)
        keep = dd < 4.0
        radial = enveloped_radial(net.rbf(dd[keep]), cosine_cutoff(dd[keep], 4.0).unsqueeze(-1))
        s_g, v_g = block(s, v.permute(1, 0, 2), src[keep], dst[keep], radial,
                         (vec[keep] / dd[keep].unsqueeze(-1)).T.unsqueeze(-1))
        v_g = v_g.permute(1, 0, 2)
    _close(s_g, s_ref, 1e-8)
    _close(v_g, v_ref, 1e-8)


def test_painn_block_norm_keeps_states_from_compounding(mp_records: list) -> None:
    """The failure block_norm exists for, on real crystals at the crystal default cutoff: with the
    block weights doubled (as a large learning-rate step can do), the plain blocks' scalars grow
    by many orders of magnitude from block to block (each update multiplies states by functions
    of themselves) and overflow float32; block-normalised blocks add bounded increments."""
    batch = collate(mp_records)

    def scalar_sizes(block_norm: bool) -> list[float]:
        torch.manual_seed(0)
        net = PaiNN(PaiNNConfig(cutoff=8.0, block_norm=block_norm)).eval()
        sizes: list[float] = []
        with torch.no_grad():
            for block in [*net.messages, *net.updates]:
                for name, p in block.named_parameters():
                    if not name.startswith("s_norm"):
                        p.mul_(2.0)
            for update in net.updates:
                update.register_forward_hook(lambda _m, _i, out: sizes.append(float(out[0].abs().max())))
            net(batch)
        return sizes

    plain, normed = scalar_sizes(False), scalar_sizes(True)
    assert len(plain) == len(normed) == 3
    assert not math.isfinite(plain[-1]) or plain[-1] > 1e12 * plain[0]
    assert all(math.isfinite(x) for x in normed) and max(normed) < 3 * normed[0]


def test_vector_rms_norm_against_a_loop() -> None:
    """Each atom's (3, F) block divided by sqrt(1 + mean over channels of |v_f|^2), checked atom by
    atom: long vectors end near unit RMS length, short ones (symmetry-cancelled noise) are not
    blown up, zero stays zero, and the result rotates with the input."""
    from pipeline.models.painn import vector_rms_norm

    v = torch.randn(3, 5, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    v[:, 1] *= 1e4
    v[:, 2] = 0.0
    v[:, 3] *= 1e-7
    out = vector_rms_norm(v)
    for n in range(5):
        mean_sq = sum(float(v[:, n, f] @ v[:, n, f]) for f in range(8)) / 8
        _close(out[:, n], v[:, n] / math.sqrt(1.0 + mean_sq), 1e-12)
    assert abs(float(out[:, 1].square().sum()) / 8 - 1.0) < 1e-6
    assert out[:, 2].abs().max() == 0
    _close(out[:, 3], v[:, 3], 1e-12)
    rot = torch.as_tensor(T.random_rotation(1), dtype=torch.float64)
    _close(vector_rms_norm(torch.einsum("ij,jnf->inf", rot, v)), torch.einsum("ij,jnf->inf", rot, out), 1e-12)


def test_painn_first_block_skips_only_a_zero_term(mp_records: list) -> None:
    """The first message block (zero vector states) skips the v_j term: the encoder's output and
    every parameter gradient equal those of the block with the term computed (here: forced on)."""
    batch = collate(mp_records[:6])

    def run(force_full: bool) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        torch.manual_seed(0)
        net = _painn(cutoff=8.0)
        if force_full:
            for m in net.messages:
                full = m.forward
                m.forward = lambda *a, _full=full, **k: _full(*a, **{**k, "v_zero": False})
        out, _ = net(batch)
        out.square().sum().backward()
        return out.detach(), {k: p.grad.clone() for k, p in net.named_parameters() if p.grad is not None}

    out_skip, grads_skip = run(False)
    out_full, grads_full = run(True)
    torch.testing.assert_close(out_skip, out_full, rtol=0, atol=0)
    assert grads_skip.keys() == grads_full.keys()
    for k in grads_full:
        torch.testing.assert_close(grads_skip[k], grads_full[k], rtol=1e-6, atol=1e-7)


def test_gaussian_features_are_exact_down_to_their_floor() -> None:
    """Against the Gaussians evaluated in float64 (the reference): exact where a feature is above
    exp(EXP_FLOOR), exactly the floor below it, so no feature (and no product of one in the
    backward pass) is within a few decades of float32's subnormal range."""
    from pipeline.models.schnet import EXP_FLOOR, GaussianRBF

    rbf = GaussianRBF(50, 8.0)
    d = torch.linspace(0.0, 8.0, 4001)
    got = rbf(d).double()
    width = float(rbf.centres[1] - rbf.centres[0])
    ref = torch.exp(-0.5 * ((d.double().unsqueeze(-1) - rbf.centres.double()) / width) ** 2)
    floor = math.exp(EXP_FLOOR)
    above = ref > floor
    assert above.any() and (~above).any()
    torch.testing.assert_close(got[above], ref[above], rtol=1e-5, atol=0.0)
    assert torch.allclose(got[~above], torch.full_like(got[~above], floor), rtol=1e-5)
    assert floor > 1e6 * torch.finfo(torch.float32).tiny  # tail x gradient products stay normal
