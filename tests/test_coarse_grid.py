"""Coarse-grid machinery of whole-grid predictions, each against an independent reference:
the separable spline against scipy's general interpolator, the points near nuclei against a
neighbour search over every grid point."""
from __future__ import annotations

import tarfile

import numpy as np
import pytest
from scipy.ndimage import map_coordinates, spline_filter

from helpers import DATASETS
from pipeline.coarse_grid import coarse_shape, points_near_atoms, upsample
from pipeline.density_data import probe_graph, read_density

DENSITY = DATASETS / "density"


@pytest.mark.parametrize("shape, stride", [((61, 57, 49), 3), ((10, 11, 12), 2), ((7, 5, 9), 4), ((9, 9, 9), 1),
                                           ((4, 13, 6), 5)])
def test_upsample_is_scipys_cubic_spline(shape, stride):
    rng = np.random.default_rng(sum(shape) + stride)
    coeffs = spline_filter(rng.normal(size=coarse_shape(shape, stride)), order=3, mode="nearest")
    fine = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1) / stride
    ref = map_coordinates(coeffs, fine.T, order=3, mode="nearest", prefilter=False)
    np.testing.assert_allclose(upsample(coeffs, stride, shape).reshape(-1), ref, rtol=0, atol=1e-12)


def test_upsample_refuses_a_grid_of_another_shape():
    with pytest.raises(ValueError, match="coarse grid"):
        upsample(np.zeros((3, 3, 3)), 2, (10, 10, 10))


def test_coarse_grid_covers_every_fine_point():
    for n in range(1, 30):
        for s in range(1, 6):
            c = coarse_shape((n, 1, 1), s)[0]
            assert (c - 1) * s >= n - 1           # the last fine point lies inside
            assert c == 1 or (c - 2) * s < n - 1  # and no coarse point more than needed


def _near_by_search(origin, axes, shape, pos, radius, cell):
    idx = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1).astype(np.float64)
    return np.unique(probe_graph(origin + idx @ axes, pos, radius, cell)[0])


@pytest.mark.parametrize("radius", [0.3, 1.0, 1.7])
def test_points_near_atoms_of_a_molecule_grid(radius):
    cube = read_density(DENSITY / "nh3_psi4_density.cube.gz").cube
    args = (cube.origin, cube.axes, tuple(cube.shape), cube.positions, radius, None)
    got = points_near_atoms(*args)
    np.testing.assert_array_equal(got, _near_by_search(*args))
    assert len(got) > 0


def test_points_near_atoms_of_a_periodic_grid():
    """Li bcc (VASP CHG): atoms on the cell's corners reach the grid through their images."""
    grid = read_density(DENSITY / "li_bcc_ase" / "CHG")
    c = grid.cube
    args = (c.origin, c.axes, tuple(c.shape), c.positions, 1.2, grid.cell)
    got = points_near_atoms(*args)
    np.testing.assert_array_equal(got, _near_by_search(*args))
    # without images only the balls around the atoms' own positions count: fewer points
    assert len(points_near_atoms(c.origin, c.axes, tuple(c.shape), c.positions, 1.2)) < len(got)


def test_points_near_atoms_of_a_skewed_cell_and_a_shifted_grid():
    """A rhombohedral MP cell with 35.6 degree angles, and a grid that starts outside the cell and
    spans more than one cell: images from several cells away count."""
    from pymatgen.core import Structure

    with tarfile.open(DATASETS / "mp" / "cifs.tar.gz") as tar:
        text = tar.extractfile(tar.getmember("mp-14115.cif")).read().decode()
    s = Structure.from_str(text, fmt="cif")
    cell = s.lattice.matrix
    axes = cell / np.array([[17], [15], [13]])
    origin = -0.4 * cell.sum(axis=0)
    args = (origin, axes, (23, 19, 20), s.cart_coords, 1.1, cell)
    got = points_near_atoms(*args)
    np.testing.assert_array_equal(got, _near_by_search(*args))
    assert len(got) > 100


def test_points_near_atoms_with_a_radius_per_atom():
    """Hydrogens with a smaller radius than N (and one atom with none): the same set as a search at the
    largest radius, each edge kept when it is shorter than its own atom's radius."""
    cube = read_density(DENSITY / "nh3_psi4_density.cube.gz").cube
    radii = np.array([1.0, 0.6, 0.6, 0.0])   # N, H, H, H
    shape = tuple(cube.shape)
    got = points_near_atoms(cube.origin, cube.axes, shape, cube.positions, radii)
    idx = np.stack(np.unravel_index(np.arange(int(np.prod(shape))), shape), axis=1).astype(np.float64)
    probe, atom, _ = probe_graph(cube.origin + idx @ cube.axes, cube.positions, 1.0)
    d = np.linalg.norm(cube.origin + idx[probe] @ cube.axes - cube.positions[atom], axis=1)
    np.testing.assert_array_equal(got, np.unique(probe[d < radii[atom]]))
    assert 0 < len(got) < len(points_near_atoms(cube.origin, cube.axes, shape, cube.positions, 1.0))
