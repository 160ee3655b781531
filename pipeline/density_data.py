"""Electron densities on grids as training data: readers, density records, probe sampling, probe graphs.

DeepDFT-style density models (Jørgensen & Bhowmik 2022) predict the density at query points
("probes") that receive messages from the atoms within a cutoff. This module is their data layer:

* Readers turn a density file into a :class:`DensityGrid` (atoms in Angstrom, the density in
  e/bohr^3 on a regular grid): Gaussian cube files (:func:`read_density_cube`, what
  ``molmat density-labels`` writes), VASP ``CHGCAR``/``CHG`` files (:func:`read_chgcar`), and the
  uniform-grid folders of the shared QM9 set (:func:`read_grid_dir`); :func:`read_density`
  picks one by the file name. Anything unreadable (truncated file, header and values of different
  sizes, NaN or clearly negative densities) is a :class:`~pipeline.MolmatError` naming the file.
* :func:`density_record` makes a shard record of it: the atoms featurised as preprocessing
  featurises any molecule or crystal, and the grid stored once (``grid_origin``, ``grid_axes``, ``grid_shape``, ``grid_values``; see
  :data:`pipeline.records.SCHEMA`). Density records keep the kind ``molecule`` (open grid) or
  ``crystal`` (periodic grid spanning the cell) and are marked by the grid keys and the ``_density``
  metadata (what the grid counts: ``total``, ``valence`` or ``unknown``); see :func:`density_record`.
* Probes are drawn at training time, never frozen at preprocessing: :func:`sample_probes` draws
  grid points, uniformly and near atoms, from the generator seeded with ``(seed, epoch, index)``,
  so every epoch sees new points and a resumed run sees the same ones. Probes are grid points, so
  their labels are the stored values, with no interpolation. :func:`all_grid_points` walks the
  whole grid in chunks for evaluation.
* :func:`probe_graph` lists the (probe, atom, image) pairs within a cutoff, the edges along which
  atoms send messages to probes, with :func:`pipeline.neighbours.radius_search`.

Units: Angstrom for every position, cell and step vector; e/bohr^3 for densities (the cube
convention); electrons for :func:`electron_count`. A CHGCAR stores ``rho * V`` with ``V`` the cell
volume in Angstrom^3, so its density is ``data / V`` e/Angstrom^3, times ``BOHR_ANGSTROM**3`` for
e/bohr^3; the electron count ``sum(data) / n_points`` is unchanged by the conversion.
"""
from __future__ import annotations

import gzip
import io
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np

from pipeline import MolmatError
from pipeline import records as R
from pipeline.config import PreprocessConfig
from pipeline.cube import BOHR_ANGSTROM, CubeGrid, read_cube
from pipeline.elements import atomic_number, element_symbol
from pipeline.neighbours import radius_search

#: What a density grid counts, the values of a record's ``_density``: every electron (all-electron
#: codes: PySCF, Psi4, Gaussian), valence electrons only (pseudopotential and PAW codes: VASP, the
#: shared QM9 grids), or not known.
CONTENTS = ("total", "valence", "unknown")

#: A density may dip below zero by round-off (cube files keep 5-6 digits; plane-wave densities ring
#: after the Fourier transform) but only by a tiny fraction of its peak. Values below
#: ``-NEGATIVE_TOLERANCE * max(values)`` mean the file is not an electron density (a spin or
#: difference density, a sign error) or is corrupt, and are refused.
NEGATIVE_TOLERANCE = 1e-4

#: Relative distance of a cube's Riemann sum from sum(Z) within which :func:`read_density_cube`
#: calls a density ``total``. Total densities on 0.25 bohr grids count -2.5% to +4.7% off on 132
#: QM9 molecules (bench/results/density_uniform_counts.md); a valence density lacks at least the
#: two 1s electrons of every heavy atom, 20% or more of sum(Z) for neutral first-row molecules.
TOTAL_COUNT_TOLERANCE = 0.15

#: Tolerance (Angstrom) on ``shape[a] * axes[a] == cell[a]`` for a periodic grid.
_CELL_TOL = 1e-6


@dataclass
class DensityGrid:
    """An electron density on a regular grid, with its atoms and periodicity.

    Attributes:
        cube: the grid (:class:`pipeline.cube.CubeGrid`: atoms ``z`` (N,) and ``positions`` (N, 3)
            Angstrom, ``origin`` (3,) Angstrom, ``axes`` (3, 3) voxel step vectors as rows in
            Angstrom, ``shape`` (3,), ``values`` (n1, n2, n3) float64 e/bohr^3).
        cell: (3, 3) float64 lattice vectors as rows (Angstrom) for a periodic grid; for an open
            grid the box it spans, when known (informational), else None.
        pbc: True when the density is periodic in all three directions; the grid then spans the
            cell exactly (``shape[a] * axes[a] == cell[a]``) and grid index ``i`` wraps as
            ``i mod shape[a]``.
        content: one of :data:`CONTENTS`.
        source: the file it was read from.
    """

    cube: CubeGrid
    cell: np.ndarray | None = None
    pbc: bool = False
    content: str = "unknown"
    source: str = ""

    def __post_init__(self) -> None:
        if self.content not in CONTENTS:
            raise ValueError(f"content must be one of {CONTENTS}, got {self.content!r}")
        if self.cell is not None:
            self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        if self.pbc:
            if self.cell is None:
                raise ValueError("a periodic density grid needs its cell")
            spanned = self.cube.shape[:, None] * self.cube.axes
            if not np.allclose(spanned, self.cell, rtol=0.0, atol=_CELL_TOL):
                # index wrapping (i mod n) is only the periodic image when the grid tiles the cell
                raise ValueError(f"a periodic grid must span its cell: shape * axes = {spanned.tolist()}, "
                                 f"cell = {self.cell.tolist()}")

    @property
    def z(self) -> np.ndarray:
        """(N,) int64 atomic numbers."""
        return self.cube.z

    @property
    def positions(self) -> np.ndarray:
        """(N, 3) float64 atom positions, Angstrom."""
        return self.cube.positions

    @property
    def origin(self) -> np.ndarray:
        """(3,) float64 position of grid point (0, 0, 0), Angstrom."""
        return self.cube.origin

    @property
    def axes(self) -> np.ndarray:
        """(3, 3) float64 voxel step vectors as rows, Angstrom."""
        return self.cube.axes

    @property
    def shape(self) -> np.ndarray:
        """(3,) int64 grid points along each axis."""
        return self.cube.shape

    @property
    def values(self) -> np.ndarray:
        """(n1, n2, n3) float64 density, e/bohr^3."""
        return self.cube.values


# ------------------------------------------------------------------------------------- checks
def check_density_values(values: np.ndarray, path: str | Path) -> None:
    """Refuse values that are not an electron density.

    Args:
        values: the density (any shape), e/bohr^3.
        path: the file they came from, for the message.
    Raises:
        MolmatError: no values, NaN or infinity, or values below ``-NEGATIVE_TOLERANCE * max``.
    """
    v = np.asarray(values)
    if v.size == 0:
        raise MolmatError(f"{path}: the density grid has no points")
    bad = ~np.isfinite(v)
    if bad.any():
        first = np.unravel_index(int(np.flatnonzero(bad.reshape(-1))[0]), v.shape)
        raise MolmatError(f"{path}: {int(bad.sum())} density values are NaN or infinite (first at grid index "
                          f"{tuple(int(i) for i in first)})")
    peak = float(v.max())
    low = float(v.min())
    if peak <= 0 or low < -NEGATIVE_TOLERANCE * peak:
        n_neg = int((v < -NEGATIVE_TOLERANCE * max(peak, 0.0)).sum())
        raise MolmatError(f"{path}: not an electron density: {n_neg} values below -{NEGATIVE_TOLERANCE:g} x the "
                          f"maximum (min {low:.4g}, max {peak:.4g} e/bohr^3); a spin or difference density, "
                          "or a corrupt file")


def _infer_content(cube: CubeGrid) -> str:
    """``total`` when the Riemann sum is near sum(Z) (see :data:`TOTAL_COUNT_TOLERANCE`), else ``unknown``."""
    total_z = int(cube.z.sum())
    if total_z <= 0:
        return "unknown"
    n = electron_count(cube)
    return "total" if abs(n / total_z - 1.0) <= TOTAL_COUNT_TOLERANCE else "unknown"


# ------------------------------------------------------------------------------------ readers
def read_density_cube(path: str | Path, content: str | None = None, periodic: bool = False) -> DensityGrid:
    """Read a Gaussian cube density (plain or ``.gz``; bohr or Angstrom header).

    Args:
        path: the cube file; values in e/bohr^3.
        content: what the density counts (:data:`CONTENTS`); None infers it: ``total`` when the
            grid's electron count lies within :data:`TOTAL_COUNT_TOLERANCE` of sum(Z), otherwise
            ``unknown`` (a cube does not say whether it holds valence electrons only).
        periodic: the cube covers one unit cell of a crystal (the cell is then ``shape * axes``,
            rows); cube files of molecules are open boxes (the default).
    Returns:
        The :class:`DensityGrid`; its ``cell`` is the box ``shape[:, None] * axes`` either way.
    Raises:
        MolmatError: unreadable or truncated file, header and value counts that differ, or values
            that are not a density (:func:`check_density_values`); the message names the file.
    """
    path = Path(path)
    cube = read_cube(path)
    check_density_values(cube.values, path)
    content = _infer_content(cube) if content is None else content
    box = cube.shape[:, None] * cube.axes
    return DensityGrid(cube=cube, cell=box, pbc=periodic, content=content, source=str(path))


def read_chgcar(path: str | Path) -> DensityGrid:
    """Read a VASP ``CHGCAR`` (also ``CHG``, ``AECCAR*``, ``PARCHG``; ``.gz`` too) with pymatgen.

    The file holds ``rho * V`` (``V`` the cell volume, Angstrom^3) at the fractional points
    ``(i / n1, j / n2, k / n3)``; the grid therefore has origin 0 and step vectors
    ``lattice[a] / n_a``, and is periodic. Values become ``data["total"] / V * BOHR_ANGSTROM**3``
    e/bohr^3. For a spin-polarised file only the total density is read (not the magnetisation).
    ``content`` is ``valence``: VASP's CHGCAR is the pseudo valence density (an ``AECCAR`` sum is
    all-electron; pass it through :class:`DensityGrid` with ``content="total"`` if that is what it is).

    Raises:
        MolmatError: pymatgen cannot parse the file (truncated, not a charge density), the grid
            is empty, or the values are not a density; the message names the file.
    """
    path = Path(path)
    if not path.exists():
        raise MolmatError(f"{path}: no such CHGCAR file")
    from pymatgen.core.periodic_table import DummySpecies
    from pymatgen.io.vasp.outputs import Chgcar

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            chg = Chgcar.from_file(str(path))
        data = np.asarray(chg.data["total"], dtype=np.float64)
        structure = chg.structure
    except MolmatError:
        raise
    except Exception as exc:  # pymatgen raises ValueError, IndexError, KeyError, ... on bad files
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        # pymatgen checks the value count against the header ("Expected 1000 values, got 476")
        raise MolmatError(f"{path}: not a readable CHGCAR ({first[:200]})") from None
    if data.ndim != 3:
        raise MolmatError(f"{path}: not a readable CHGCAR (density of shape {data.shape}, expected a 3D grid)")
    for i, site in enumerate(structure):
        if isinstance(site.specie, DummySpecies):
            raise MolmatError(f"{path}: unknown element {site.specie.symbol!r} at atom {i}")
    lattice = np.array(structure.lattice.matrix, dtype=np.float64)
    volume = abs(float(np.linalg.det(lattice)))
    if volume < 1e-6:
        raise MolmatError(f"{path}: the cell has zero volume")
    shape = np.array(data.shape, dtype=np.int64)
    values = data / volume * BOHR_ANGSTROM ** 3
    check_density_values(values, path)
    cube = CubeGrid(z=[site.specie.Z for site in structure], positions=np.array(structure.cart_coords),
                    origin=np.zeros(3), axes=lattice / shape[:, None], shape=shape, values=values,
                    comments=[f"from {path.name}", "rho = CHGCAR total / cell volume, e/bohr^3"])
    return DensityGrid(cube=cube, cell=lattice, pbc=True, content="valence", source=str(path))


def _grid_tag(path: Path) -> str:
    """The ``<tag>`` of the one ``rho_<tag>.npy`` (or ``.npy.gz``) of a grid folder."""
    tags = sorted({m.group(1) for p in path.iterdir()
                   if (m := re.fullmatch(r"rho_(.+)\.npy(?:\.gz)?", p.name))})
    if not tags:
        raise MolmatError(f"{path}: not a density grid folder (no rho_<tag>.npy)")
    if len(tags) > 1:
        raise MolmatError(f"{path}: several density grids ({', '.join('rho_' + t for t in tags)}); "
                          "give a folder with one")
    return tags[0]


def _load_npy(path: Path) -> np.ndarray:
    """An ``.npy`` or gzip-compressed ``.npy.gz`` array (never pickled objects)."""
    try:
        raw = gzip.decompress(path.read_bytes()) if path.name.endswith(".gz") else path.read_bytes()
        return np.load(io.BytesIO(raw), allow_pickle=False)
    except (OSError, EOFError, ValueError) as exc:
        raise MolmatError(f"{path}: cannot read the array ({str(exc).splitlines()[0][:200]})") from None


def _read_xyz_atoms(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Atomic numbers (N,) and positions (N, 3) Angstrom of a plain XYZ file."""
    if not path.exists():
        raise MolmatError(f"{path}: missing (the atoms of the density grid)")
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise MolmatError(f"{path}, line 1: expected the number of atoms") from None
    if n <= 0 or len(lines) < 2 + n:
        raise MolmatError(f"{path}: {n} atoms declared, {max(len(lines) - 2, 0)} atom lines")
    z = np.empty(n, dtype=np.int64)
    pos = np.empty((n, 3), dtype=np.float64)
    for i in range(n):
        parts = lines[2 + i].split()
        try:
            z[i] = atomic_number(parts[0])
            pos[i] = [float(t) for t in parts[1:4]]
            if len(parts) < 4:
                raise ValueError
        except (IndexError, ValueError):
            raise MolmatError(f"{path}, line {3 + i}: expected 'element x y z' "
                              f"({lines[2 + i].strip()[:80]!r})") from None
    return z, pos


def read_grid_dir(path: str | Path) -> DensityGrid:
    """Read a uniform-grid density folder (the ``qm9_pbe_grid_*`` layout of the shared QM9 set).

    Files: ``rho_<tag>.npy`` (or ``rho_<tag>.npy.gz``): the density, flat float64 e/bohr^3 in the
    C order of ``(nx, ny, nz)``; ``grid_sizes_<tag>.dat``: ``nx ny nz``; ``centered.xyz``: the
    atoms (Angstrom) inside the box; ``box.npy`` (optional): the box (3, 3) (or its diagonal (3,))
    in Angstrom. Grid point ``(i, j, k)`` is ``(i / nx, j / ny, k / nz) @ box``, so origin 0 and
    step vectors ``box[a] / n_a``. Without ``box.npy`` the box is ``diag(2 * mean(positions))``:
    the set's molecules were centred in their boxes, and this is the rule its README gives for
    the folders that lack the file (QM9 molecule 2, NH3).

    The box is kept as ``cell`` for reference but the grid is not periodic (``pbc`` False): the
    density is that of an isolated molecule, which decays to ~1e-8 e/bohr^3 at the box faces.
    ``content`` is ``valence`` (these grids integrate to the valence electrons, 8 for CH4 and NH3).

    Raises:
        MolmatError: a missing or unreadable file, grid sizes that are not three positive
            integers, a density whose size differs from ``nx * ny * nz``, atoms outside the box,
            or values that are not a density; the message names the file.
    """
    path = Path(path)
    if not path.is_dir():
        raise MolmatError(f"{path}: not a directory")
    tag = _grid_tag(path)
    rho_path = next(p for p in (path / f"rho_{tag}.npy", path / f"rho_{tag}.npy.gz") if p.exists())
    sizes_path = path / f"grid_sizes_{tag}.dat"
    if not sizes_path.exists():
        raise MolmatError(f"{sizes_path}: missing (the grid size nx ny nz of {rho_path.name})")
    tokens = sizes_path.read_text(encoding="utf-8", errors="replace").split()
    try:
        sizes = [int(t) for t in tokens]
    except ValueError:
        raise MolmatError(f"{sizes_path}: grid sizes must be three integers, found {tokens[:6]}") from None
    if len(sizes) != 3 or min(sizes) <= 0:
        raise MolmatError(f"{sizes_path}: grid sizes must be three positive integers, found {tokens[:6]}")
    rho = _load_npy(rho_path)
    if rho.size != int(np.prod(sizes)):
        raise MolmatError(f"{rho_path}: {rho.size} density values, but {sizes_path.name} gives a "
                          f"{sizes[0]}x{sizes[1]}x{sizes[2]} grid ({int(np.prod(sizes))} points)")
    if not np.issubdtype(rho.dtype, np.floating):
        raise MolmatError(f"{rho_path}: density of dtype {rho.dtype}, expected floating point")
    values = rho.astype(np.float64, copy=False).reshape(sizes)
    check_density_values(values, rho_path)
    z, pos = _read_xyz_atoms(path / "centered.xyz")
    box_path = path / "box.npy"
    if box_path.exists():
        box = _load_npy(box_path).astype(np.float64)
        if box.shape == (3,):
            box = np.diag(box)
        if box.shape != (3, 3):
            raise MolmatError(f"{box_path}: box of shape {box.shape}, expected (3, 3) or (3,)")
    else:
        box = np.diag(2.0 * pos.mean(axis=0))
    if abs(np.linalg.det(box)) < 1e-6:
        raise MolmatError(f"{box_path if box_path.exists() else path}: the box has zero volume")
    frac = pos @ np.linalg.inv(box)
    if (frac < 0).any() or (frac > 1).any():
        where = box_path if box_path.exists() else f"{path} (box = 2 x the mean position, no box.npy)"
        raise MolmatError(f"{where}: atoms lie outside the box; the box does not belong to these atoms")
    shape = np.array(sizes, dtype=np.int64)
    cube = CubeGrid(z=z, positions=pos, origin=np.zeros(3), axes=box / shape[:, None], shape=shape,
                    values=values, comments=[f"from {path.name}", "valence density, e/bohr^3"])
    return DensityGrid(cube=cube, cell=box, pbc=False, content="valence", source=str(path))


def _is_chgcar_name(name: str) -> bool:
    base = name[:-3] if name.endswith(".gz") else name
    return base.upper().startswith(("CHGCAR", "CHG", "AECCAR", "PARCHG")) or base.lower().endswith((".vasp", ".chgcar"))


def read_density(path: str | Path) -> DensityGrid:
    """Read any supported density file, chosen by its name.

    ``*.cube`` / ``*.cube.gz`` -> :func:`read_density_cube`; ``CHGCAR*``, ``CHG*``, ``AECCAR*``,
    ``PARCHG*``, ``*.vasp``, ``*.chgcar`` (each also ``.gz``) -> :func:`read_chgcar`; a directory
    holding ``rho_<tag>.npy`` -> :func:`read_grid_dir`.

    Raises:
        MolmatError: a missing path, a name of no known format, or whatever the reader refuses.
    """
    path = Path(path)
    if not path.exists():
        raise MolmatError(f"{path}: no such density file or folder")
    if path.is_dir():
        return read_grid_dir(path)
    name = path.name
    if name.lower().endswith((".cube", ".cube.gz")):
        return read_density_cube(path)
    if _is_chgcar_name(name):
        return read_chgcar(path)
    raise MolmatError(f"{path}: unknown density format (expected *.cube[.gz], CHGCAR*/CHG*/*.vasp, or a folder "
                      "with rho_<tag>.npy)")


# -------------------------------------------------------------------------------- electrons
def electron_count(grid: DensityGrid | CubeGrid | Mapping[str, Any]) -> float:
    """Electrons on the grid: ``sum(values) * |det(axes)|`` (voxel volume in bohr^3).

    Args:
        grid: a :class:`DensityGrid`, a :class:`CubeGrid`, or a density record.
    Returns:
        The Riemann sum in electrons (float64 accumulation). On a 0.25 bohr grid of an
        all-electron density it misses or over-weights the nuclear cusps by a few per cent.
    """
    if isinstance(grid, DensityGrid):
        grid = grid.cube
    if isinstance(grid, CubeGrid):
        values, axes = grid.values, grid.axes
    else:
        values, axes = np.asarray(grid[R.GRID_VALUES]), np.asarray(grid[R.GRID_AXES], dtype=np.float64)
    voxel_bohr3 = abs(float(np.linalg.det(axes))) / BOHR_ANGSTROM ** 3
    return float(np.sum(values, dtype=np.float64) * voxel_bohr3)


# ---------------------------------------------------------------------------------- records
def _atoms_payload(grid: DensityGrid, rid: str, source: str) -> Any:
    """The atoms of ``grid`` as the raw record preprocessing would featurise (xyz text or structure dict)."""
    from pipeline.readers import RawRecord

    symbols = [element_symbol(int(z)) for z in grid.z]
    if grid.pbc:
        from pymatgen.core import Lattice, Structure

        structure = Structure(Lattice(grid.cell), symbols, grid.positions, coords_are_cartesian=True)
        return RawRecord(source, rid, R.CRYSTAL, "pymatgen", structure.as_dict())
    # repr() round-trips float64 exactly, so the record's positions are the file's positions
    lines = [str(len(symbols)), f"density grid atoms of {rid}"]
    lines += [f"{s} {x!r} {y!r} {z!r}" for s, (x, y, z) in zip(symbols, grid.positions.tolist())]
    return RawRecord(source, rid, R.MOLECULE, "xyz", "\n".join(lines) + "\n")


def density_record(grid: DensityGrid, rid: str, source: str, cfg: PreprocessConfig | None = None) -> dict[str, Any]:
    """The shard record of a density: its atoms featurised as preprocessing does, and the grid, stored once.

    The atoms go through :func:`pipeline.featurize.featurize` like any xyz molecule (bonds, SMILES
    and atom features from the geometry by RDKit) or pymatgen crystal (periodic neighbour list,
    formula), with the settings of ``cfg``; so the record has the kind ``molecule`` (open grid) or
    ``crystal`` (periodic grid; with ``cell``), and every path that reads records (collation,
    invariance helpers, featurisation checks) handles it unchanged. It is a density record by its
    grid keys and ``_density`` (:data:`CONTENTS`):

    * ``grid_origin`` (3,) and ``grid_axes`` (3, 3) float64 Angstrom, ``grid_shape`` (3,) int64;
    * ``grid_values`` (G,) float32 e/bohr^3, C order of ``grid_shape``: float32 keeps 7
      significant digits, more than the labels have (cube files keep 5-6; the PySCF labels are
      within 0.005% NMAE of the reference), at half the bytes of float64;
    * ``y`` (0,): the labels are the grid. Probes are not stored: :func:`sample_probes` draws
      them from the grid at training time.

    Extra ETKDG conformers are never added (``cfg.molecule.conformers`` is ignored): the density
    belongs to the one geometry of the file.

    Args:
        grid: the density.
        rid: record id.
        source: input file, for ``_source``.
        cfg: preprocessing settings (default :class:`PreprocessConfig`).
    Raises:
        pipeline.featurize.RecordError: atoms that preprocessing would refuse (bond orders RDKit
            cannot assign, overlapping atoms, elements beyond Z = 94, ...); the message says why.
    """
    from pipeline.featurize import RecordError, featurize

    if grid.z.size == 0 or grid.z.min() < 1 or grid.z.max() > 118:
        # cube files may carry ghost atoms (Z = 0), which no record can hold
        raise RecordError(f"atomic numbers must lie in 1..94, found {sorted(set(grid.z.tolist()))}")
    cfg = cfg or PreprocessConfig()
    if cfg.molecule.conformers:
        cfg = cfg.model_copy(update={"molecule": cfg.molecule.model_copy(update={"conformers": 0})})
    rec = featurize(_atoms_payload(grid, str(rid), str(source)), [], cfg)
    rec[R.GRID_ORIGIN] = np.array(grid.origin, dtype=np.float64)
    rec[R.GRID_AXES] = np.array(grid.axes, dtype=np.float64)
    rec[R.GRID_SHAPE] = np.array(grid.shape, dtype=np.int64)
    rec[R.GRID_VALUES] = np.ascontiguousarray(grid.values, dtype=np.float32).reshape(-1)
    rec[R.DENSITY] = grid.content
    return rec


def is_density_record(record: Mapping[str, Any]) -> bool:
    """True for a record made by :func:`density_record` (it carries a grid)."""
    return R.GRID_VALUES in record


# ------------------------------------------------------------------------------------ probes
def _grid_arrays(record: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, bool]:
    if not is_density_record(record):
        raise ValueError(f"record {record.get(R.ID)!r} is not a density record (no {R.GRID_VALUES})")
    origin = np.asarray(record[R.GRID_ORIGIN], dtype=np.float64).reshape(3)
    axes = np.asarray(record[R.GRID_AXES], dtype=np.float64).reshape(3, 3)
    shape = np.asarray(record[R.GRID_SHAPE], dtype=np.int64).reshape(3)
    values = np.asarray(record[R.GRID_VALUES]).reshape(-1)
    return origin, axes, shape, values, R.CELL in record


def grid_indices(record: Mapping[str, Any], points: np.ndarray) -> np.ndarray:
    """Flat grid index (C order) of the grid point at each of ``points``, wrapped or clipped.

    Args:
        record: a density record.
        points: (P, 3) positions, Angstrom.
    Returns:
        (P,) int64 indices into ``grid_values``: the rounded grid coordinates
        ``rint((p - origin) @ inv(axes))`` (for a skewed grid the corner of the voxel cell around
        ``p`` nearest in grid coordinates, not always the nearest in Cartesian distance), taken
        modulo ``grid_shape`` for a periodic record and clipped to the grid otherwise.
    """
    origin, axes, shape, _, periodic = _grid_arrays(record)
    pts = np.asarray(points, dtype=np.float64).reshape(-1, 3)
    ijk = np.rint((pts - origin) @ np.linalg.inv(axes)).astype(np.int64)
    ijk = np.mod(ijk, shape) if periodic else np.clip(ijk, 0, shape - 1)
    return np.ravel_multi_index((ijk[:, 0], ijk[:, 1], ijk[:, 2]), tuple(shape))


def grid_positions(record: Mapping[str, Any], flat: np.ndarray) -> np.ndarray:
    """(P, 3) float64 positions (Angstrom) of the grid points with flat C-order indices ``flat`` (P,)."""
    origin, axes, shape, _, _ = _grid_arrays(record)
    ijk = np.stack(np.unravel_index(np.asarray(flat, dtype=np.int64), tuple(shape)), axis=1).astype(np.float64)
    return origin + ijk @ axes


def sample_probes(record: Mapping[str, Any], n_uniform: int, n_near_atoms: int, near_sigma: float, seed: int,
                  epoch: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Probe points of one density record for one epoch, with their exact labels.

    The first ``n_uniform`` probes are grid points drawn uniformly (with replacement); the next
    ``n_near_atoms`` are near atoms: an atom drawn uniformly, moved by an isotropic Gaussian offset
    of standard deviation ``near_sigma`` (Angstrom), snapped to a grid point
    (:func:`grid_indices`: wrapped into the cell for a crystal, clipped to the box for a molecule).
    Near-atom probes put more of the loss where the density is large and changes fast.

    The generator is ``numpy.random.default_rng([seed, epoch, index])``: the same triple always
    gives the same probes (a resumed run draws what the interrupted one would have), another epoch
    or record gives others, and no state is carried between calls (safe in loader workers).

    Args:
        record: a density record (:func:`density_record`, decoded or not).
        n_uniform: uniform probes, >= 0.
        n_near_atoms: near-atom probes, >= 0.
        near_sigma: offset standard deviation, Angstrom, >= 0.
        seed, epoch, index: non-negative integers; ``index`` is the record's dataset index.
    Returns:
        points (P, 3) float64 Angstrom (grid points; inside the cell for crystals) and values (P,)
        in the record's dtype (float32) e/bohr^3, the stored density at those points;
        P = n_uniform + n_near_atoms.
    Raises:
        ValueError: negative counts or sigma, or near-atom probes for a record without atoms.
    """
    if n_uniform < 0 or n_near_atoms < 0 or near_sigma < 0:
        raise ValueError(f"probe counts and sigma must be >= 0 (n_uniform={n_uniform}, n_near_atoms={n_near_atoms}, "
                         f"near_sigma={near_sigma})")
    _, _, shape, values, _ = _grid_arrays(record)
    rng = np.random.default_rng([int(seed), int(epoch), int(index)])
    uniform = rng.integers(0, int(np.prod(shape)), size=int(n_uniform), dtype=np.int64)
    pos = np.asarray(record[R.POS], dtype=np.float64).reshape(-1, 3)
    if n_near_atoms and len(pos) == 0:
        raise ValueError(f"record {record.get(R.ID)!r} has no atoms to sample near")
    atoms = rng.integers(0, max(len(pos), 1), size=int(n_near_atoms), dtype=np.int64)
    offsets = rng.normal(0.0, float(near_sigma), size=(int(n_near_atoms), 3))
    near = grid_indices(record, pos[atoms] + offsets) if n_near_atoms else np.zeros(0, np.int64)
    flat = np.concatenate([uniform, near])
    return grid_positions(record, flat), values[flat]


def all_grid_points(record: Mapping[str, Any], chunk: int = 65536) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Every grid point of a density record, in C order, ``chunk`` points at a time.

    For evaluation over the whole grid without holding all positions at once.

    Yields:
        points (c, 3) float64 Angstrom and values (c,) e/bohr^3 (record dtype), c <= chunk.
    """
    if chunk <= 0:
        raise ValueError(f"chunk must be positive, got {chunk}")
    _, _, shape, values, _ = _grid_arrays(record)
    total = int(np.prod(shape))
    for start in range(0, total, chunk):
        flat = np.arange(start, min(start + chunk, total), dtype=np.int64)
        yield grid_positions(record, flat), values[flat]


def probe_graph(probe_points: np.ndarray, atom_pos: np.ndarray, cutoff: float, cell: np.ndarray | None = None
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Atom -> probe edges: every (probe, atom, image) with ``|atom + image @ cell - probe| < cutoff``.

    Args:
        probe_points: (P, 3) probe positions, Angstrom.
        atom_pos: (N, 3) atom positions, Angstrom.
        cutoff: radius, Angstrom (> 0); the rule is exactly ``dist < cutoff`` (no tolerance).
        cell: (3, 3) lattice rows (Angstrom) for a crystal: all periodic images of the atoms
            count; None for a molecule.
    Returns:
        probe (E,) int64, atom (E,) int64 and image (E, 3) int64 (zeros without a cell), sorted by
        (probe, atom, image); the message from atom to probe travels along
        ``atom_pos[atom] + image @ cell - probe_points[probe]``.
    """
    probe, atom, image, _ = radius_search(probe_points, atom_pos, cutoff, cell, tol=0.0)
    return probe, atom, image
