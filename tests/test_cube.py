"""Gaussian cube files: round trips, the Angstrom convention, a real Psi4 cube, and bad files named."""
from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from pipeline import MolmatError
from pipeline.cube import BOHR_ANGSTROM, grid_points, integrate, read_cube, voxel_volume_bohr3, write_cube

ROOT = Path(__file__).resolve().parent.parent
NH3_CUBE = ROOT / "datasets" / "density" / "nh3_psi4_density.cube.gz"


@pytest.fixture(scope="module")
def nh3_text() -> str:
    """The real Psi4 NH3 density cube (shipped copy, byte-identical to ../shared/data/density)."""
    return gzip.decompress(NH3_CUBE.read_bytes()).decode()


@pytest.fixture(scope="module")
def nh3():
    return read_cube(NH3_CUBE)


def test_real_psi4_cube_reads_with_its_header(nh3):
    assert nh3.shape.tolist() == [54, 48, 112]
    assert nh3.z.tolist() == [7, 1, 1, 1]
    assert nh3.comments[0] == "Psi4 Gaussian Cube File."
    # Header in bohr: 0.2, 0.2, 0.1 bohr steps; origin -4.677267 bohr in x.
    np.testing.assert_allclose(np.diag(nh3.axes), np.array([0.2, 0.2, 0.1]) * BOHR_ANGSTROM)
    assert nh3.origin[0] == pytest.approx(-4.677267 * BOHR_ANGSTROM)
    # N-H bond lengths of ammonia, about 1.01 A: a unit slip (bohr read as A) would give 1.9.
    bonds = np.linalg.norm(nh3.positions[1:] - nh3.positions[0], axis=1)
    np.testing.assert_allclose(bonds, 1.01, atol=0.03)


def test_real_psi4_cube_integrates_to_ten_electrons(nh3):
    """NH3 has 10 electrons. The Riemann sum on this 0.2 x 0.2 x 0.1 bohr grid gives 9.973: it misses part of
    the nitrogen 1s cusp (measured, -0.27%). The tolerance of 0.05 e allows that and nothing like a wrong voxel
    volume (reading the bohr steps as Angstrom would give 10 / 0.529^3 = 67 electrons)."""
    assert voxel_volume_bohr3(nh3) == pytest.approx(0.2 * 0.2 * 0.1)
    n = integrate(nh3)
    assert abs(n - 10.0) < 0.05
    assert n < 10.0  # a finite grid under-counts the cusps of this cube


def test_grid_points_follow_the_value_order(nh3):
    """The density maximum is at the nitrogen nucleus: checks axis order (z fastest) and the origin."""
    pts = grid_points(nh3)
    assert pts.shape == (54 * 48 * 112, 3)
    np.testing.assert_allclose(pts[0], nh3.origin)
    np.testing.assert_allclose(pts[1], nh3.origin + nh3.axes[2])
    np.testing.assert_allclose(pts[-1], nh3.origin + (nh3.shape - 1) @ nh3.axes)
    peak = pts[int(np.argmax(nh3.values))]
    voxel_diagonal = float(np.linalg.norm(nh3.axes.sum(axis=0)))
    assert np.linalg.norm(peak - nh3.positions[0]) <= voxel_diagonal


@pytest.mark.parametrize("name", ["copy.cube", "copy.cube.gz"])
def test_write_read_round_trip(nh3, tmp_path, name):
    path = write_cube(tmp_path / name, nh3)
    again = read_cube(path)
    assert again.shape.tolist() == nh3.shape.tolist()
    assert again.z.tolist() == nh3.z.tolist()
    assert again.comments == nh3.comments
    # Header numbers are printed with 6 decimals in bohr; values in %13.5E (6 significant digits).
    np.testing.assert_allclose(again.positions, nh3.positions, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_allclose(again.origin, nh3.origin, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_allclose(again.axes, nh3.axes, atol=1e-6 * BOHR_ANGSTROM)
    np.testing.assert_allclose(again.values, nh3.values, rtol=5e-6, atol=0)
    assert not list(tmp_path.glob(".*tmp*")), "the temporary file must be renamed away"
    if name.endswith(".cube"):
        lines = path.read_text().splitlines()
        assert lines[2].split()[0] == "4" and int(lines[3].split()[0]) > 0  # bohr header
        assert len(lines[6 + 4].split()) == 6  # 6 values per line


def _to_angstrom_header(text: str) -> str:
    """The same cube with an Angstrom header: negative voxel counts, origin/steps/atoms in Angstrom."""
    lines = text.splitlines()
    natoms, *origin = lines[2].split()
    out = lines[:2] + [f"{int(natoms):5d}" + "".join(f"{float(v) * BOHR_ANGSTROM:16.10f}" for v in origin)]
    for line in lines[3:6]:
        n, *vec = line.split()
        out.append(f"{-int(n):5d}" + "".join(f"{float(v) * BOHR_ANGSTROM:16.10f}" for v in vec))
    for line in lines[6:6 + int(natoms)]:
        zi, q, *xyz = line.split()
        out.append(f"{zi:>5s}{float(q):12.6f}" + "".join(f"{float(v) * BOHR_ANGSTROM:16.10f}" for v in xyz))
    return "\n".join(out + lines[6 + int(natoms):]) + "\n"


def test_angstrom_header_reads_to_the_same_grid(nh3, nh3_text, tmp_path):
    path = tmp_path / "nh3_angstrom.cube"
    path.write_text(_to_angstrom_header(nh3_text))
    ang = read_cube(path)
    np.testing.assert_allclose(ang.origin, nh3.origin, atol=1e-9)
    np.testing.assert_allclose(ang.axes, nh3.axes, atol=1e-9)
    np.testing.assert_allclose(ang.positions, nh3.positions, atol=1e-9)
    assert ang.shape.tolist() == nh3.shape.tolist()
    assert np.array_equal(ang.values, nh3.values)
    assert integrate(ang) == pytest.approx(integrate(nh3), rel=1e-9)


def _with_dset_ids(text: str, ids_line: str) -> str:
    """The cube with a negative atom count and a DSET_IDS line after the atoms."""
    lines = text.splitlines()
    natoms, *rest = lines[2].split()
    lines[2] = f"{-int(natoms):5d} " + " ".join(rest)
    lines.insert(6 + int(natoms), ids_line)
    return "\n".join(lines) + "\n"


def test_dset_ids_line_with_one_data_set_is_read(nh3, nh3_text, tmp_path):
    path = tmp_path / "dset1.cube"
    path.write_text(_with_dset_ids(nh3_text, "    1    1"))
    again = read_cube(path)
    assert again.z.tolist() == [7, 1, 1, 1]
    assert np.array_equal(again.values, nh3.values)


def test_bad_cubes_are_named(nh3_text, tmp_path):
    lines = nh3_text.splitlines()
    truncated = tmp_path / "truncated.cube"
    truncated.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    with pytest.raises(MolmatError, match=r"truncated\.cube: truncated cube file: \d+ values for a 54x48x112 grid"):
        read_cube(truncated)

    bad_header = tmp_path / "bad_header.cube"
    bad_header.write_text("\n".join(lines[:4] + ["   48   0.000000   zero   0.000000"] + lines[5:]) + "\n")
    with pytest.raises(MolmatError, match=r"bad_header\.cube, line 5: .*axis 2.*not numbers"):
        read_cube(bad_header)

    bad_value = tmp_path / "bad_value.cube"
    bad_value.write_text("\n".join(lines[:20] + [lines[20].replace("E", "X", 1)] + lines[21:]) + "\n")
    with pytest.raises(MolmatError, match=r"bad_value\.cube, line 21: value .* is not a number"):
        read_cube(bad_value)

    multi = tmp_path / "multi.cube"
    multi.write_text(_with_dset_ids(nh3_text, "    2    1    2"))
    with pytest.raises(MolmatError, match=r"multi\.cube, line 11: 2 data sets"):
        read_cube(multi)

    with pytest.raises(MolmatError, match="no such cube file"):
        read_cube(tmp_path / "missing.cube")
