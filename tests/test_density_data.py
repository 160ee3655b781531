"""Density data layer (issue 12): readers on real files, density records, probe sampling, probe graphs.

Every input is a real density (Psi4 cube, VASP CHG of ASE's test data, the shared QM9 valence grids) or
a copy of one damaged on purpose (truncated, a wrong header, a NaN); nothing is invented.
"""
from __future__ import annotations

import gzip
import itertools
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from helpers import DATASETS, records_equal
from pipeline import MolmatError
from pipeline import records as R
from pipeline import testing as T
from pipeline.cube import BOHR_ANGSTROM, grid_points
from pipeline.density_data import (CONTENTS, DensityGrid, all_grid_points, density_record, electron_count,
                                   grid_indices, grid_positions, probe_graph, read_chgcar, read_density,
                                   read_density_cube, read_grid_dir, sample_probes)

DENSITY = DATASETS / "density"
NH3_CUBE = DENSITY / "nh3_psi4_density.cube.gz"
LI_CHG = DENSITY / "li_bcc_ase" / "CHG"
NH3_GRID = DENSITY / "qm9_pbe_grid_000002"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "density"
SHARED_GRIDS = [SHARED / "qm9_pbe_grid_000001", SHARED / "qm9_pbe_grid_000002"]
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared/data/density is absent (not shipped); "
                                  "the shipped copies in datasets/density cover the rest")


@pytest.fixture(scope="module")
def nh3_cube() -> DensityGrid:
    return read_density(NH3_CUBE)


@pytest.fixture(scope="module")
def li() -> DensityGrid:
    return read_density(LI_CHG)


@pytest.fixture(scope="module")
def nh3_grid() -> DensityGrid:
    return read_density(NH3_GRID)


# ------------------------------------------------------------------------------ electron counts
def test_psi4_cube_is_a_total_density_of_ten_electrons(nh3_cube):
    assert nh3_cube.z.tolist() == [7, 1, 1, 1] and nh3_cube.shape.tolist() == [54, 48, 112]
    assert not nh3_cube.pbc and nh3_cube.content == "total"
    # Measured 9.9735: the Riemann sum on this 0.2/0.2/0.1 bohr grid misses part of the N 1s cusp.
    # 0.05 electrons (0.5%) is 10x that miss, and 40x below a valence-only count (8).
    assert electron_count(nh3_cube) == pytest.approx(9.9735, abs=1e-4)
    assert abs(electron_count(nh3_cube) - 10) < 0.05


@needs_shared
@pytest.mark.parametrize("folder", SHARED_GRIDS, ids=lambda p: p.name)
def test_shared_qm9_grids_hold_eight_valence_electrons(folder):
    g = read_grid_dir(folder)
    assert g.content == "valence" and not g.pbc
    assert g.z.tolist() in ([6, 1, 1, 1, 1], [7, 1, 1, 1])
    assert electron_count(g) == pytest.approx(8.0, abs=1e-6)   # measured 8.0000000008 for both


@needs_shared
def test_box_rule_of_the_folders_without_box_npy_reproduces_ch4s_box():
    # CH4's folder has box.npy; the 2 x mean rule used for NH3 (no box.npy) must give that same box
    ch4 = read_grid_dir(SHARED_GRIDS[0])
    np.testing.assert_allclose(ch4.cell, np.diag(2 * ch4.positions.mean(axis=0)), rtol=0, atol=1e-12)
    shipped, shared = read_grid_dir(NH3_GRID), read_grid_dir(SHARED_GRIDS[1])   # gzip copy == original
    assert np.array_equal(shipped.values, shared.values) and np.array_equal(shipped.cell, shared.cell)


def test_shipped_nh3_grid_folder(nh3_grid):
    assert nh3_grid.shape.tolist() == [66, 66, 60] and nh3_grid.z.tolist() == [7, 1, 1, 1]
    assert electron_count(nh3_grid) == pytest.approx(8.0, abs=1e-6)
    # no box.npy: 2 x mean of the centred atoms; 0.083 A (0.157 bohr) steps
    np.testing.assert_allclose(np.diag(nh3_grid.axes) * nh3_grid.shape, 2 * nh3_grid.positions.mean(axis=0))
    frac = nh3_grid.positions @ np.linalg.inv(nh3_grid.cell)
    assert ((frac > 0.3) & (frac < 0.7)).all()   # the molecule sits in the middle of its box


def test_chg_reads_as_periodic_valence_density_in_bohr_units(li):
    from ase.calculators.vasp import VaspChargeDensity

    assert li.pbc and li.content == "valence" and li.z.tolist() == [3]
    np.testing.assert_allclose(li.cell, 1.745 * (1 - 2 * np.eye(3)))           # bcc Li, a = 3.49 A
    np.testing.assert_allclose(li.shape[:, None] * li.axes, li.cell)
    assert electron_count(li) == pytest.approx(1.0, abs=1e-5)                  # 1 valence electron; 5-digit values
    volume = abs(np.linalg.det(li.cell))
    # the first values of the file are rho * V at (i / 10, 0, 0): VASP runs x fastest
    text = LI_CHG.read_text().splitlines()
    first = [float(t) for t in text[text.index("   10   10   10") + 1].split()]
    np.testing.assert_allclose(li.values[:, 0, 0] * volume / BOHR_ANGSTROM ** 3, first, rtol=1e-12)
    # ASE's independent reader gives e/A^3 (already divided by V)
    ase_rho = VaspChargeDensity(str(LI_CHG)).chg[0]
    np.testing.assert_allclose(li.values / BOHR_ANGSTROM ** 3, ase_rho, rtol=1e-12)


def test_chgcar_written_by_pymatgen_round_trips(li, tmp_path):
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.vasp.inputs import Poscar
    from pymatgen.io.vasp.outputs import Chgcar

    structure = Structure(Lattice(li.cell), ["Li"], li.positions, coords_are_cartesian=True)
    volume = abs(np.linalg.det(li.cell))
    out = tmp_path / "CHGCAR"
    Chgcar(Poscar(structure), {"total": li.values * volume / BOHR_ANGSTROM ** 3}).write_file(str(out))
    for path in (out, shutil.copy(out, tmp_path / "li.vasp")):   # both names dispatch to the CHGCAR reader
        back = read_density(path)
        np.testing.assert_allclose(back.values, li.values, rtol=1e-10)
        np.testing.assert_allclose(back.axes, li.axes, atol=1e-12)
        assert electron_count(back) == pytest.approx(electron_count(li), rel=1e-10)


# --------------------------------------------------------------------------------------- records
def _check_schema(rec: dict) -> None:
    kind = rec[R.KIND]
    for key, value in rec.items():
        spec = R.SPECS[key]
        assert kind in spec.kinds, key
        if spec.is_meta:
            assert isinstance(value, str), key
        else:
            assert value.dtype == np.dtype(spec.dtype) and value.ndim == len(spec.dims), key
    required = {s.name for s in R.SCHEMA if s.required and kind in s.kinds and s.name != R.INDEX}
    assert required <= set(rec)


@pytest.mark.parametrize("name", ["nh3_cube", "li", "nh3_grid"])
def test_density_record_round_trips_through_the_codec(name, request):
    grid = request.getfixturevalue(name)
    rec = density_record(grid, name, grid.source)
    _check_schema(rec)
    assert rec[R.KIND] == (R.CRYSTAL if grid.pbc else R.MOLECULE) and (R.CELL in rec) == grid.pbc
    assert rec[R.DENSITY] == grid.content in CONTENTS
    assert rec[R.GRID_VALUES].shape == (int(np.prod(grid.shape)),)   # the grid once, no probe samples
    back = R.decode_record(R.encode_record(rec))
    assert records_equal(back, rec)
    # float32 storage moves the count by round-off only
    assert electron_count(back) == pytest.approx(electron_count(grid), rel=1e-6)
    if grid.pbc:   # featurised as preprocessing featurises a pymatgen structure
        assert rec[R.FORMULA] == "Li" and np.array_equal(rec[R.CELL], grid.cell)
        np.testing.assert_allclose(rec[R.POS], grid.positions, atol=1e-12)
    else:          # ... or an xyz molecule: bonds and SMILES from the geometry, positions exact
        assert rec[R.SMILES] == "N" and rec[R.BOND_INDEX].shape == (2, 3)
        assert np.array_equal(rec[R.POS], grid.positions)


def test_density_records_batch_with_the_existing_collate(nh3_cube, li):
    from pipeline.graphs import collate

    batch = collate([density_record(nh3_cube, "nh3", "a"), density_record(li, "li", "b")])
    assert batch.kinds == [R.MOLECULE, R.CRYSTAL] and batch.g3d is not None
    assert batch.n_atoms.tolist() == [4, 1] and tuple(batch.y.shape) == (2, 0)


def test_schema_transforms_move_grid_points_with_the_atoms(nh3_grid):
    rec = density_record(nh3_grid, "nh3", "x")
    rot, shift = T.random_rotation(3), np.array([1.0, -2.0, 0.5])
    moved = T.translate(T.rotate(rec, rot), shift)
    flat = np.array([0, 1234, 99999, len(rec[R.GRID_VALUES]) - 1])
    np.testing.assert_allclose(grid_positions(moved, flat), grid_positions(rec, flat) @ rot.T + shift, atol=1e-12)
    np.testing.assert_allclose(moved[R.POS], rec[R.POS] @ rot.T + shift, atol=1e-12)


# ---------------------------------------------------------------------------------------- probes
def _exact_labels(grid: DensityGrid, rec: dict, points: np.ndarray, values: np.ndarray) -> None:
    """Probes are grid points and carry the stored value there (no interpolation)."""
    frac = (points - grid.origin) @ np.linalg.inv(grid.axes)
    ijk = np.rint(frac).astype(np.int64)
    np.testing.assert_allclose(frac, ijk, atol=1e-9)
    assert ((ijk >= 0) & (ijk < grid.shape)).all()     # inside the box (the cell for a crystal)
    assert np.array_equal(values, grid.values[tuple(ijk.T)].astype(np.float32))
    assert np.array_equal(values, rec[R.GRID_VALUES][grid_indices(rec, points)])


@pytest.mark.parametrize("name", ["nh3_cube", "li"])
def test_probes_are_reproducible_per_seed_epoch_index_and_exact(name, request):
    grid = request.getfixturevalue(name)
    rec = R.decode_record(R.encode_record(density_record(grid, name, grid.source)))
    args = dict(n_uniform=300, n_near_atoms=200, near_sigma=0.4)
    p0, v0 = sample_probes(rec, **args, seed=7, epoch=0, index=5)
    assert p0.shape == (500, 3) and v0.shape == (500,)
    p0b, v0b = sample_probes(rec, **args, seed=7, epoch=0, index=5)   # a resumed run redraws the same
    assert np.array_equal(p0, p0b) and np.array_equal(v0, v0b)
    for other in (dict(seed=7, epoch=1, index=5), dict(seed=7, epoch=0, index=6), dict(seed=8, epoch=0, index=5)):
        assert not np.array_equal(sample_probes(rec, **args, **other)[0], p0), other
    _exact_labels(grid, rec, p0, v0)


def test_near_atom_probes_are_closer_to_atoms(nh3_cube):
    rec = density_record(nh3_cube, "nh3", "x")
    pts, vals = sample_probes(rec, n_uniform=2000, n_near_atoms=2000, near_sigma=0.3, seed=0, epoch=0, index=0)
    dist = np.linalg.norm(pts[:, None, :] - nh3_cube.positions[None], axis=2).min(axis=1)
    uniform, near = dist[:2000], dist[2000:]
    assert near.mean() < 0.5 * uniform.mean()
    # sigma 0.3 A in 3D: mean distance 0.3 * sqrt(8/pi) = 0.48 A, plus snapping to a 0.05-0.1 A grid
    assert near.mean() == pytest.approx(0.3 * np.sqrt(8 / np.pi), abs=0.06)
    assert vals[2000:].mean() > 10 * vals[:2000].mean()


def test_all_grid_points_walks_the_grid_in_c_order(li, nh3_grid):
    for grid in (li, nh3_grid):
        rec = density_record(grid, "g", grid.source)
        chunks = list(all_grid_points(rec, chunk=7001))
        assert all(len(v) <= 7001 for _, v in chunks)
        points = np.concatenate([p for p, _ in chunks])
        values = np.concatenate([v for _, v in chunks])
        assert np.array_equal(values, rec[R.GRID_VALUES])
        np.testing.assert_allclose(points, grid_points(grid.cube), atol=1e-12)   # pipeline.cube's own walk


# ----------------------------------------------------------------------------------- probe graph
def _brute_force(probes: np.ndarray, atoms: np.ndarray, cutoff: float, cell: np.ndarray | None) -> set:
    if cell is None:
        images = np.zeros((1, 3), np.int64)
    else:
        heights = abs(np.linalg.det(cell)) / np.linalg.norm(np.cross(cell[[1, 2, 0]], cell[[2, 0, 1]]), axis=1)
        n = np.ceil(cutoff / heights).astype(int) + 1   # probes and atoms lie within one cell of the origin
        images = np.array(list(itertools.product(*[range(-k, k + 1) for k in n])), np.int64)
    shift = images @ cell if cell is not None else np.zeros((1, 3))
    shifted = atoms[:, None, :] + shift[None]                                          # (N, I, 3)
    d = np.linalg.norm(shifted[None] - probes[:, None, None, :], axis=3)             # (P, N, I)
    return {(p, a, tuple(images[i])) for p, a, i in zip(*np.nonzero(d < cutoff))}


def _edges(probe, atom, image) -> set:
    return {(int(p), int(a), tuple(int(x) for x in im)) for p, a, im in zip(probe, atom, image)}


def test_probe_graph_matches_brute_force_with_periodic_images(li, nh3_cube):
    rec = density_record(li, "li", li.source)
    probes, _ = sample_probes(rec, n_uniform=150, n_near_atoms=50, near_sigma=0.5, seed=1, epoch=0, index=0)
    edges = probe_graph(probes, li.positions, 4.0, li.cell)
    found = _edges(*edges)
    assert len(found) == len(edges[0]) > 200 * 8                  # bcc: >= 8 atoms within 4 A of any point
    assert found == _brute_force(probes, li.positions, 4.0, li.cell)
    probe, atom, image = edges
    assert (np.diff(probe) >= 0).all()
    vec = li.positions[atom] + image @ li.cell - probes[probe]
    assert (np.linalg.norm(vec, axis=1) < 4.0).all()

    mol = density_record(nh3_cube, "nh3", "x")
    probes, _ = sample_probes(mol, n_uniform=300, n_near_atoms=100, near_sigma=0.5, seed=1, epoch=0, index=0)
    edges = probe_graph(probes, nh3_cube.positions, 1.5)
    assert not edges[2].any()
    assert _edges(*edges) == _brute_force(probes, nh3_cube.positions, 1.5, None)


@pytest.mark.filterwarnings("ignore:Issues encountered while parsing CIF")
def test_probe_graph_on_a_real_skewed_crystal():
    # a real MP crystal (several atoms, non-orthogonal cell); the query points are the points of a
    # 6x6x6 fractional grid over its cell: positions only, no density values are made up
    from pymatgen.core import Structure

    with tarfile.open(DATASETS / "mp" / "cifs.tar.gz") as tar:
        for member in tar:
            if not member.name.endswith(".cif"):
                continue
            s = Structure.from_str(tar.extractfile(member).read().decode(), fmt="cif")
            angles = np.array(s.lattice.angles)
            if 3 <= len(s) <= 12 and np.abs(angles - 90).max() > 10:
                break
    cell, atoms = np.array(s.lattice.matrix), np.array(s.cart_coords)
    frac = np.stack(np.meshgrid(*[np.arange(6) / 6] * 3, indexing="ij"), -1).reshape(-1, 3)
    probes = frac @ cell
    edges = probe_graph(probes, atoms, 3.5, cell)
    assert len(edges[0]) > 0
    assert _edges(*edges) == _brute_force(probes, atoms, 3.5, cell)


# ---------------------------------------------------------------------------------------- errors
def test_truncated_cube_is_refused_naming_the_file(tmp_path):
    text = gzip.decompress(NH3_CUBE.read_bytes())
    bad = tmp_path / "nh3_truncated.cube"
    bad.write_bytes(text[: len(text) * 2 // 3])
    with pytest.raises(MolmatError, match=r"nh3_truncated\.cube.*truncated"):
        read_density(bad)


def test_truncated_chg_is_refused_naming_the_file(tmp_path):
    bad = tmp_path / "CHGCAR"
    bad.write_bytes(LI_CHG.read_bytes()[:6000])
    with pytest.raises(MolmatError, match=r"CHGCAR: not a readable CHGCAR.*values"):
        read_chgcar(bad)


def _grid_copy(tmp_path: Path) -> Path:
    out = tmp_path / "grid"
    shutil.copytree(NH3_GRID, out)
    return out


def test_grid_folder_with_a_wrong_grid_size_is_refused(tmp_path):
    folder = _grid_copy(tmp_path)
    (folder / "grid_sizes_22.dat").write_text("66\n66\n61\n")   # one z plane too many for the real values
    with pytest.raises(MolmatError, match=r"rho_22\.npy\.gz: 261360 density values, but grid_sizes_22\.dat "
                                          r"gives a 66x66x61 grid"):
        read_density(folder)
    (folder / "grid_sizes_22.dat").write_text("66 66\n")
    with pytest.raises(MolmatError, match=r"grid_sizes_22\.dat: grid sizes must be three positive integers"):
        read_density(folder)


def test_nan_or_negative_densities_are_refused(tmp_path):
    folder = _grid_copy(tmp_path)
    rho = read_grid_dir(NH3_GRID).values.reshape(-1)
    (folder / "rho_22.npy.gz").unlink()
    damaged = rho.copy()
    damaged[1000] = np.nan
    np.save(folder / "rho_22.npy", damaged)
    with pytest.raises(MolmatError, match=r"rho_22\.npy: 1 density values are NaN"):
        read_density(folder)
    np.save(folder / "rho_22.npy", rho - 0.01 * rho.max())   # a shifted (difference-like) density
    with pytest.raises(MolmatError, match=r"rho_22\.npy: not an electron density"):
        read_density(folder)
    (folder / "centered.xyz").unlink()
    np.save(folder / "rho_22.npy", rho)
    with pytest.raises(MolmatError, match=r"centered\.xyz: missing"):
        read_density(folder)


def test_unknown_names_are_refused(tmp_path):
    other = tmp_path / "density.dat"
    other.write_bytes(LI_CHG.read_bytes())
    with pytest.raises(MolmatError, match=r"density\.dat: unknown density format"):
        read_density(other)
    with pytest.raises(MolmatError, match=r"not a density grid folder"):
        read_density(tmp_path)
    with pytest.raises(MolmatError, match="no such"):
        read_density(tmp_path / "missing.cube")


def test_cube_content_can_be_given():
    assert read_density_cube(NH3_CUBE, content="valence").content == "valence"
