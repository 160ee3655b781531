"""Radius search from arrays: the same graphs as pymatgen and the old dense molecule search."""
from __future__ import annotations

import itertools
import warnings
from typing import Any

import numpy as np
import pytest

from helpers import mp_cif_texts
from pipeline import neighbours
from pipeline.neighbours import crystal_neighbours, molecule_neighbours, radius_search
from pipeline.shards import ShardDataset


@pytest.fixture(scope="module")
def mp_structures() -> dict[str, Any]:
    """All 300 shipped MP crystals as pymatgen Structures, by mp-id."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pymatgen's CIF parser warns about rounding
        return {rid: Structure.from_str(text, fmt="cif") for rid, text in mp_cif_texts().items()}


def _pymatgen_crystal_neighbours(structure: Any, cutoff: float, max_neighbors: int,
                                 tie_tolerance: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The crystal graph as molmat made it before the array search: pymatgen's neighbour list,
    ranked by (distance rounded to 1e-8 A, neighbour, image), nearest max_neighbors plus ties."""
    center, point, images, dist = structure.get_neighbor_list(r=cutoff, numerical_tol=1e-8, exclude_self=True)
    images = np.rint(images).astype(np.int64)
    order = np.lexsort((images[:, 2], images[:, 1], images[:, 0], point, np.round(dist, 8), center))
    center, point, images, dist = center[order], point[order], images[order], dist[order]
    starts = np.r_[0, np.flatnonzero(np.diff(center)) + 1]
    sizes = np.diff(np.r_[starts, center.size])
    rank = np.arange(center.size) - np.repeat(starts, sizes)
    keep = rank < max_neighbors
    if tie_tolerance > 0:
        keep |= dist <= np.repeat(dist[starts + np.minimum(sizes, max_neighbors) - 1], sizes) + tie_tolerance
    return point[keep], center[keep], images[keep]


def _arrays(structure: Any) -> tuple[np.ndarray, np.ndarray]:
    return np.array(structure.cart_coords, dtype=np.float64), np.array(structure.lattice.matrix, dtype=np.float64)


def test_periodic_search_gives_pymatgens_pairs_on_every_shipped_crystal(mp_structures):
    for rid, s in mp_structures.items():
        pos, cell = _arrays(s)
        c, p, im, d = s.get_neighbor_list(r=8.0, numerical_tol=1e-8, exclude_self=True)
        ref = set(zip(c.tolist(), p.tolist(), map(tuple, np.rint(im).astype(int).tolist())))
        a, b, image, dist = radius_search(pos, pos, 8.0, cell, exclude_self=True)
        ours = set(zip(a.tolist(), b.tolist(), map(tuple, image.tolist())))
        assert ours == ref, f"{rid}: {len(ref - ours)} pairs missing, {len(ours - ref)} extra"
        assert len(ours) == len(a)  # no pair twice
        np.testing.assert_allclose(dist, np.linalg.norm(pos[b] + image @ cell - pos[a], axis=1), rtol=0, atol=1e-12)


@pytest.mark.parametrize("max_neighbors, tie_tolerance", [(12, 1e-3), (12, 0.0), (10_000, 1e-3)])
def test_crystal_graphs_identical_to_the_pymatgen_based_ones(mp_structures, max_neighbors, tie_tolerance):
    """Same edges in the same order: preprocessing writes byte-identical records.

    The order among equidistant neighbours comes from distances rounded to 1e-8 A; CIF
    coordinates are decimal, so several shipped crystals have distances ending in 5 at the 9th
    decimal, where the last bit of the arithmetic decides (mp-22052, mp-570203, ...).
    """
    for rid, s in mp_structures.items():
        pos, cell = _arrays(s)
        ours = crystal_neighbours(pos, cell, 8.0, max_neighbors, tie_tolerance)
        ref = _pymatgen_crystal_neighbours(s, 8.0, max_neighbors, tie_tolerance)
        for x, y, name in zip(ours, ref, ("src", "dst", "image")):
            assert np.array_equal(x, y), f"{rid}: {name} differs"


def test_cutoff_tolerance_is_pymatgens(mp_structures):
    """A neighbour exactly at the cutoff is kept (dist**2 < cutoff**2 + 1e-8), as pymatgen does."""
    s = mp_structures["mp-1"]  # Cs, one atom: 8 nearest neighbours (equal to 1e-6 A), then 6
    pos, cell = _arrays(s)
    _, _, _, dist = radius_search(pos, pos, 8.0, cell, exclude_self=True)
    shell = np.sort(dist)[:9]
    assert shell[7] - shell[0] < 1e-6 and shell[8] - shell[7] > 0.5
    cutoff = float(shell[7])  # the farthest of the 8 lies exactly at the cutoff
    assert len(radius_search(pos, pos, cutoff, cell, exclude_self=True)[0]) == 8
    assert len(s.get_neighbor_list(r=cutoff, numerical_tol=1e-8, exclude_self=True)[0]) == 8
    assert len(radius_search(pos, pos, cutoff, cell, exclude_self=True, tol=0.0)[0]) < 8  # strict: dist < cutoff


def _dense_molecule_neighbours(pos: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """The molecule search featurisation used before the array search (all pairs at once)."""
    d = np.linalg.norm(pos[:, None, :] - pos[None, :, :], axis=-1)
    np.fill_diagonal(d, np.inf)
    dst, src = np.nonzero(d < cutoff)
    return src, dst


def test_molecule_neighbours_identical_to_the_dense_search(qm9_shards):
    ds = ShardDataset(qm9_shards)
    for i in range(len(ds)):
        pos = np.asarray(ds[i]["pos"])
        for cutoff in (5.0, 2.0):
            src, dst = molecule_neighbours(pos, cutoff)
            ref_src, ref_dst = _dense_molecule_neighbours(pos, cutoff)
            assert np.array_equal(src, ref_src) and np.array_equal(dst, ref_dst), (ds[i]["_id"], cutoff)
        assert np.array_equal(ds[i]["nbr_index"], np.stack(molecule_neighbours(pos, 5.0)))


def _brute_force(a: np.ndarray, b: np.ndarray, cell: np.ndarray, cutoff: float, reach: int) -> set[tuple]:
    out = set()
    for img in itertools.product(range(-reach, reach + 1), repeat=3):
        d = np.linalg.norm(b[None, :, :] + np.array(img) @ cell - a[:, None, :], axis=-1)
        for i, j in zip(*np.nonzero(d ** 2 < cutoff ** 2 + 1e-8)):
            out.add((int(i), int(j), img))
    return out


@pytest.mark.parametrize("kdtree", [False, True], ids=["dense", "kdtree"])
def test_probe_points_to_atoms_match_brute_force(mp_structures, kdtree, monkeypatch):
    """Points A (probes) to atoms B of a triclinic crystal, A partly outside the cell, B unwrapped."""
    if kdtree:
        monkeypatch.setattr(neighbours, "KDTREE_MIN_PAIRS", 0)
    s = mp_structures["mp-11114"]  # KCuPdSe5, 16 atoms, triclinic
    pos, cell = _arrays(s)
    rng = np.random.default_rng(0)
    probes = (rng.random((200, 3)) * 1.6 - 0.3) @ cell
    atoms = pos + np.array([[1, 0, -1]]) @ cell * (np.arange(len(pos)) % 2)[:, None]  # some atoms a cell away
    a, b, image, dist = radius_search(probes, atoms, 3.5, cell)
    ours = set(zip(a.tolist(), b.tolist(), map(tuple, image.tolist())))
    assert ours == _brute_force(probes, atoms, cell, 3.5, reach=3)
    assert len(ours) == len(a) > 200
    assert np.all(np.diff(a) >= 0)  # sorted by probe
    np.testing.assert_allclose(dist, np.linalg.norm(atoms[b] + image @ cell - probes[a], axis=1), atol=1e-12)
    assert np.all(dist < 3.5 + 1e-8)


def test_both_search_paths_agree_exactly(mp_structures, monkeypatch):
    s = mp_structures["mp-570203"]  # 24 atoms, with distances on the rounding boundary
    pos, cell = _arrays(s)
    dense = radius_search(pos, pos, 8.0, cell, exclude_self=True)
    monkeypatch.setattr(neighbours, "KDTREE_MIN_PAIRS", 0)
    tree = radius_search(pos, pos, 8.0, cell, exclude_self=True)
    for x, y in zip(dense, tree):
        assert np.array_equal(x, y)
    mol = pos[:12]
    assert np.array_equal(np.stack(molecule_neighbours(mol, 4.0)), np.stack(_dense_molecule_neighbours(mol, 4.0)))


def test_open_search_between_two_point_sets_and_bad_arguments(mp_structures):
    pos, cell = _arrays(mp_structures["mp-11114"])
    a, b, image, dist = radius_search(pos[:5], pos, 3.0)
    assert not image.any() and np.all(dist < 3.0)
    ref = np.linalg.norm(pos[None, :, :] - pos[:5, None, :], axis=-1) ** 2 < 9.0 + 1e-8
    assert set(zip(a.tolist(), b.tolist())) == set(zip(*map(list, np.nonzero(ref))))
    assert (0, 0) in set(zip(a.tolist(), b.tolist()))  # without exclude_self a point finds itself
    empty = radius_search(np.zeros((0, 3)), pos, 3.0, cell)
    assert [x.shape for x in empty] == [(0,), (0,), (0, 3), (0,)]
    with pytest.raises(ValueError, match="same points"):
        radius_search(pos[:5], pos, 3.0, exclude_self=True)
    with pytest.raises(ValueError, match="singular"):
        radius_search(pos, pos, 3.0, np.array([[1.0, 0, 0], [2.0, 0, 0], [0, 0, 1.0]]))
    with pytest.raises(ValueError, match=r"shape \(n, 3\)"):
        radius_search(pos[:, :2], pos, 3.0)
    with pytest.raises(ValueError, match="positive"):
        radius_search(pos, pos, 0.0)
    with pytest.raises(ValueError, match="NaN or infinity"):
        radius_search(np.array([[np.nan, 0.0, 0.0]]), pos, 3.0, cell)
