"""Gaussian cube files: read, write, grid points and integration.

A cube file is two comment lines, a header and the values of one scalar field (here: an electron
density in e/bohr^3) on a regular grid::

    comment line 1
    comment line 2
    NATOMS  X0 Y0 Z0 [NVAL]          origin
    N1  A1x A1y A1z                   voxel count and step vector of axis 1
    N2  A2x A2y A2z
    N3  A3x A3y A3z
    Z  CHARGE  X Y Z                  one line per atom
    [M ID1 ... IDM]                   only when NATOMS < 0 (the DSET_IDS line)
    values, z fastest (C order of (N1, N2, N3)), any number per line

Lengths are in bohr when the voxel counts are positive, in Angstrom when they are negative (the
Gaussian convention). :class:`CubeGrid` always holds Angstrom for geometry and e/bohr^3 for the
values; :func:`write_cube` always writes a standard bohr cube (6 values per line in ``%13.5E``,
each ``(i, j)`` row of ``N3`` values starting on a new line), the layout VESTA, ASE and pymatgen
read. Files ending in ``.gz`` are read and written gzip-compressed.
"""
from __future__ import annotations

import gzip
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from pipeline import MolmatError

#: 1 bohr in Angstrom (CODATA 2018); the one conversion constant every density module uses.
BOHR_ANGSTROM = 0.529177210903


@dataclass
class CubeGrid:
    """A scalar field on a regular (possibly skewed) grid, with the atoms it belongs to.

    Attributes:
        z: (N,) int64 atomic numbers.
        positions: (N, 3) float64 atom positions, Angstrom.
        origin: (3,) float64 position of grid point (0, 0, 0), Angstrom.
        axes: (3, 3) float64 voxel step vectors as rows, Angstrom: point (i, j, k) is
            ``origin + i * axes[0] + j * axes[1] + k * axes[2]``.
        shape: (3,) int64 number of points along each axis.
        values: (n1, n2, n3) float64 field values, e/bohr^3 for densities.
        comments: the two comment lines (without newlines).
        charges: (N,) float64 the cube's per-atom charge column (often Z or 0); None writes Z.
    """

    z: np.ndarray
    positions: np.ndarray
    origin: np.ndarray
    axes: np.ndarray
    shape: np.ndarray
    values: np.ndarray
    comments: list[str] = field(default_factory=lambda: ["", ""])
    charges: np.ndarray | None = None

    def __post_init__(self) -> None:
        self.z = np.asarray(self.z, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.origin = np.asarray(self.origin, dtype=np.float64).reshape(3)
        self.axes = np.asarray(self.axes, dtype=np.float64).reshape(3, 3)
        self.shape = np.asarray(self.shape, dtype=np.int64).reshape(3)
        self.values = np.asarray(self.values, dtype=np.float64)
        if self.values.shape != tuple(int(n) for n in self.shape):
            raise ValueError(f"values have shape {self.values.shape}, expected {tuple(self.shape)}")
        if len(self.z) != len(self.positions):
            raise ValueError(f"{len(self.z)} atomic numbers but {len(self.positions)} positions")
        comments = [c.replace("\n", " ").replace("\r", " ") for c in (list(self.comments) + ["", ""])[:2]]
        self.comments = comments
        if self.charges is not None:
            self.charges = np.asarray(self.charges, dtype=np.float64).reshape(-1)


def _open_read(path: Path) -> io.TextIOBase:
    if path.name.endswith(".gz"):
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", errors="replace")
    return open(path, encoding="utf-8", errors="replace")


def _numbers(path: Path, line_no: int, line: str, count: int, what: str) -> list[float]:
    """The first ``count`` numbers of a header line, or a MolmatError naming the line."""
    parts = line.split()
    if len(parts) < count:
        raise MolmatError(f"{path}, line {line_no}: {what}: expected {count} numbers, found {len(parts)} "
                          f"({line.strip()[:80]!r})")
    try:
        return [float(p.replace("D", "E").replace("d", "e")) for p in parts[:count]]
    except ValueError:
        raise MolmatError(f"{path}, line {line_no}: {what}: not numbers ({line.strip()[:80]!r})") from None


def read_cube(path: str | Path) -> CubeGrid:
    """Read a Gaussian cube file (plain or ``.gz``) into a :class:`CubeGrid` (Angstrom, e/bohr^3).

    Handles bohr (positive voxel counts) and Angstrom (negative counts) headers, any number of
    values per line, and the DSET_IDS line of a negative atom count when it names one data set.

    Raises:
        MolmatError: truncated or malformed file, mixed length units, or several values per voxel
            (multi-data-set cubes such as orbital sets, which this reader does not support); the
            message names the file and the line.
    """
    path = Path(path)
    if not path.exists():
        raise MolmatError(f"{path}: no such cube file")
    try:
        with _open_read(path) as fh:
            text = fh.read()
    except (OSError, EOFError) as exc:
        raise MolmatError(f"{path}: cannot read the cube file ({exc})") from None
    lines = text.splitlines()
    if len(lines) < 6:
        raise MolmatError(f"{path}: truncated cube file: {len(lines)} lines, a header needs at least 6")
    comments = [lines[0], lines[1]]
    head = lines[2].split()
    natoms_f, *origin = _numbers(path, 3, lines[2], 4, "atom count and origin")
    if natoms_f != int(natoms_f):
        raise MolmatError(f"{path}, line 3: atom count {head[0]!r} is not an integer")
    natoms = int(natoms_f)
    if len(head) >= 5:
        nval = _numbers(path, 3, lines[2], 5, "atom count, origin and values per voxel")[4]
        if int(nval) != 1:
            raise MolmatError(f"{path}, line 3: {int(nval)} values per voxel; only single-field cubes are supported")
    counts, axes = [], []
    for k in range(3):
        n, *vec = _numbers(path, 4 + k, lines[3 + k], 4, f"voxel count and step of axis {k + 1}")
        if n != int(n) or n == 0:
            raise MolmatError(f"{path}, line {4 + k}: voxel count {lines[3 + k].split()[0]!r} is not a non-zero integer")
        counts.append(int(n))
        axes.append(vec)
    signs = {c > 0 for c in counts}
    if len(signs) > 1:
        raise MolmatError(f"{path}, lines 4-6: voxel counts {counts} mix bohr (positive) and Angstrom (negative) axes")
    to_angstrom = BOHR_ANGSTROM if counts[0] > 0 else 1.0
    shape = np.abs(np.array(counts, dtype=np.int64))
    n_atoms = abs(natoms)
    if len(lines) < 6 + n_atoms:
        raise MolmatError(f"{path}: truncated cube file: {n_atoms} atoms declared, {len(lines) - 6} lines after the header")
    z = np.empty(n_atoms, dtype=np.int64)
    charges = np.empty(n_atoms, dtype=np.float64)
    positions = np.empty((n_atoms, 3), dtype=np.float64)
    for i in range(n_atoms):
        line_no = 7 + i
        zi, qi, *xyz = _numbers(path, line_no, lines[6 + i], 5, f"atom {i + 1} (Z charge x y z)")
        if zi != int(zi) or zi < 0:
            raise MolmatError(f"{path}, line {line_no}: atomic number {lines[6 + i].split()[0]!r} is not valid")
        z[i], charges[i], positions[i] = int(zi), qi, xyz
    first_value_line = 6 + n_atoms
    if natoms < 0:
        # DSET_IDS: M then M ids (which may wrap onto further lines); M > 1 means M values per voxel.
        ids_line = lines[first_value_line] if len(lines) > first_value_line else ""
        m = _numbers(path, first_value_line + 1, ids_line, 1, "DSET_IDS count (negative atom count)")[0]
        if int(m) != 1:
            raise MolmatError(f"{path}, line {first_value_line + 1}: {int(m)} data sets (DSET_IDS); only single-field "
                              "cubes are supported")
        first_value_line += 1
    body = "\n".join(lines[first_value_line:])
    try:
        values = np.array(body.replace("D", "E").replace("d", "e").split(), dtype=np.float64)
    except ValueError:
        for j, line in enumerate(lines[first_value_line:], start=first_value_line + 1):
            for tok in line.split():
                try:
                    float(tok.replace("D", "E").replace("d", "e"))
                except ValueError:
                    raise MolmatError(f"{path}, line {j}: value {tok!r} is not a number") from None
        raise
    expected = int(np.prod(shape))
    if values.size != expected:
        how = "truncated cube file" if values.size < expected else "too many values"
        raise MolmatError(f"{path}: {how}: {values.size} values for a {shape[0]}x{shape[1]}x{shape[2]} grid "
                          f"({expected} expected)")
    return CubeGrid(z=z, positions=positions * to_angstrom, origin=np.array(origin) * to_angstrom,
                    axes=np.array(axes) * to_angstrom, shape=shape, values=values.reshape(tuple(shape)),
                    comments=comments, charges=charges)


def _format_values(values: np.ndarray) -> str:
    """Values as cube text: each (i, j) row of n3 values on lines of 6, in ``%13.5E``."""
    n1, n2, n3 = values.shape
    full, rest = divmod(n3, 6)
    row_fmt = ("%13.5E" * 6 + "\n") * full + ("%13.5E" * rest + "\n" if rest else "")
    rows = values.reshape(n1 * n2, n3)
    # One %-format per row keeps this at about 1 s per 10^6 values without a text buffer per value.
    return "".join(row_fmt % tuple(r) for r in rows.tolist())


def write_cube(path: str | Path, grid: CubeGrid) -> Path:
    """Write ``grid`` as a standard bohr cube file, atomically (``.gz`` names are gzip-compressed).

    The file is written under a temporary name in the same directory and renamed when complete,
    so an interrupted write never leaves a partial file under ``path``.
    Returns the path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    origin_b = grid.origin / BOHR_ANGSTROM
    axes_b = grid.axes / BOHR_ANGSTROM
    pos_b = grid.positions / BOHR_ANGSTROM
    charges = grid.charges if grid.charges is not None else grid.z.astype(np.float64)
    head = [grid.comments[0], grid.comments[1],
            f"{len(grid.z):5d}{origin_b[0]:12.6f}{origin_b[1]:12.6f}{origin_b[2]:12.6f}"]
    for n, a in zip(grid.shape, axes_b):
        head.append(f"{int(n):5d}{a[0]:12.6f}{a[1]:12.6f}{a[2]:12.6f}")
    for zi, qi, p in zip(grid.z, charges, pos_b):
        head.append(f"{int(zi):5d}{qi:12.6f}{p[0]:12.6f}{p[1]:12.6f}{p[2]:12.6f}")
    text = "\n".join(head) + "\n" + _format_values(grid.values)
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        if path.name.endswith(".gz"):
            with gzip.open(tmp, "wt", encoding="utf-8", compresslevel=6) as fh:
                fh.write(text)
        else:
            with open(tmp, "w", encoding="utf-8") as fh:
                fh.write(text)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def grid_points(grid: CubeGrid) -> np.ndarray:
    """(n1*n2*n3, 3) float64 Cartesian grid points in Angstrom, in the C order of ``grid.values``."""
    n1, n2, n3 = (int(n) for n in grid.shape)
    i, j, k = np.meshgrid(np.arange(n1), np.arange(n2), np.arange(n3), indexing="ij")
    idx = np.stack([i.reshape(-1), j.reshape(-1), k.reshape(-1)], axis=1).astype(np.float64)
    return grid.origin + idx @ grid.axes


def voxel_volume_bohr3(grid: CubeGrid) -> float:
    """Volume of one voxel (the parallelepiped of the three step vectors), bohr^3."""
    return float(abs(np.linalg.det(grid.axes))) / BOHR_ANGSTROM ** 3


def integrate(grid: CubeGrid) -> float:
    """Integral of the field over the box (sum of values times voxel volume); electrons for a density.

    A plain Riemann sum: on a 0.2-0.25 bohr grid it misses part of the sharp core cusps and
    under-counts a total density by a few per cent.
    """
    return float(grid.values.sum(dtype=np.float64) * voxel_volume_bohr3(grid))
