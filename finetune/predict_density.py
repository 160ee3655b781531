"""``molmat predict`` for density models: the electron density of raw structures, on a grid or at points.

What ``molmat predict RUN ...`` does when RUN is a density model (a ``molmat-density-model``
directory, a run directory with one in ``best/``, or a shipped model's name such as
``qm9-density``)::

    molmat predict RUN mol.xyz --out rho.cube [--grid-spacing 0.2] [--margin 2.117]
    molmat predict RUN crystal.cif --out rho.cube [--grid-spacing 0.2]
    molmat predict RUN mol.xyz --grid-like REF.cube --out pred.cube
    molmat predict RUN --grid-like REF.cube --out pred.cube
    molmat predict RUN mol.xyz --points points.npy|points.csv --out rho.npy|rho.csv
    molmat predict RUN many.sdf --out cubes/

Grids (:func:`structure_grid`), spacing and margin in Angstrom:

* a molecule: the axis-aligned box of ``molmat density-labels``
  (:func:`pipeline.density_labels.uniform_grid`): the atoms' bounding box plus ``--margin``
  (default 4 bohr = 2.117 Angstrom) on every side, step ``--grid-spacing`` (default 0.2);
* a crystal: its cell, ``n_i = ceil(|a_i| / spacing)`` points along lattice vector ``a_i``, step
  vectors ``a_i / n_i``, origin 0, so the cube's (skewed) axes tile the cell exactly, as in a
  CHGCAR (``--margin`` does not apply);
* ``--grid-like REF.cube``: exactly REF's grid (origin, step vectors, shape). The atoms are those
  of the structure INPUT when one is given, else REF's own atoms (the usual case: compare a
  prediction with a DFT cube voxel by voxel).

Grid origins and step vectors are rounded to what the cube header holds (6 decimals of bohr)
before predicting, so the values are at exactly the points the file describes (a crystal's
``n_i * axes_i`` then differs from ``a_i`` by at most ``n_i * 5e-7`` bohr).

Outputs are written atomically (whole or absent):

* ``--out FILE.cube`` (or ``.cube.gz``): a standard bohr Gaussian cube (:func:`pipeline.cube.write_cube`;
  values in e/bohr^3, the atoms included) that VESTA, ASE and pymatgen read. Its second comment
  line carries ``electrons=`` (the grid's Riemann sum, :func:`pipeline.cube.integrate`) and
  ``sum_z=``. One structure per cube: an input holding several is refused, unless
* ``--out DIR/`` (an existing directory, or a path ending in ``/``): one cube per structure,
  ``DIR/<id>.cube`` (the id made file-safe by :func:`pipeline.density_labels.safe_name`, ``_2``,
  ``_3``, ... appended when ids repeat). A structure that cannot be read or predicted is reported
  and skipped; the others are written.
* ``--points FILE.npy|FILE.csv``: (P, 3) positions in Angstrom (a CSV with x, y, z columns,
  header optional); ``--out`` ``.npy`` gets the (P,) densities (float64, e/bohr^3), ``.csv`` gets
  ``x,y,z,rho_e_per_bohr3`` rows. One structure.

Structures come from any file the readers open (xyz, extxyz, sdf, cif, POSCAR, ...), featurised
with the model's own preprocessing settings (without extra conformers: the density belongs to
the one geometry); a density file (cube, CHGCAR, grid folder) as INPUT gives its atoms (and a
CHGCAR its cell).

Errors name the file and the reason (:class:`~pipeline.MolmatError`), including an element the
promolecule table lacks. Each structure's result says how many points were predicted and how fast
(probes per second over the model's wall time: encoding the atoms, the probe graph and the probe
network).
"""
from __future__ import annotations

import csv
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import torch

from finetune.density import densities_at, density_settings, predict_on_grid, without_grid
from pipeline import MolmatError, __version__
from pipeline import records as R
from pipeline.checkpoint import DENSITY_MODEL, load_model_dir
from pipeline.config import PreprocessConfig
from pipeline.cube import BOHR_ANGSTROM, CubeGrid, integrate, read_cube, write_cube
from pipeline.density_labels import safe_name, uniform_grid
from pipeline.files import atomic_file
from pipeline.inputs import ERROR, domain_check, featurized_inputs
from pipeline.models.density import DensityModel

#: Default grid step, Angstrom.
DEFAULT_SPACING = 0.2
#: Default box margin around a molecule's atoms, Angstrom: the 4 bohr of ``molmat density-labels``.
DEFAULT_MARGIN = 4.0 * BOHR_ANGSTROM
#: Largest grid predicted in one call: 10^8 points hold 800 MB of float64 values and a cube file of
#: about 1.4 GB; more is almost always a spacing typed in the wrong unit.
MAX_GRID_POINTS = 100_000_000
CUBE_SUFFIXES = (".cube", ".cube.gz")
POINT_SUFFIXES = (".npy", ".csv")
#: Column of the density in a ``--points`` CSV output.
DENSITY_COLUMN = "rho_e_per_bohr3"


@dataclass
class DensityResult:
    """What :func:`predict_density` did for one structure.

    Attributes:
        id: the structure's id; source: its file (``archive::member``, ``file[frame]``).
        out: the file written, or None when the structure failed.
        points: number of points predicted.
        seconds: wall time of the model evaluation (encoding, probe graph, probe network), s.
        electrons: the grid's Riemann sum (cube outputs), electrons; None for points.
        sum_z: total nuclear charge of the structure (the neutral electron count).
        warning: a prediction outside the training domain (elements it never saw), or "".
        error: why nothing was written for this structure (naming its file), or "".
    """

    id: str
    source: str
    out: Path | None = None
    points: int = 0
    seconds: float = 0.0
    electrons: float | None = None
    sum_z: int = 0
    warning: str = ""
    error: str = ""

    @property
    def probes_per_second(self) -> float:
        """Points predicted per second of model evaluation."""
        return self.points / self.seconds if self.seconds > 0 else math.inf

    def summary(self) -> str:
        """One line for the command line: what was written, the points, the electrons, the speed."""
        if self.error:
            return self.error   # it names the file already
        electrons = (f", {self.electrons:.4f} electrons on the grid (sum Z = {self.sum_z})"
                     if self.electrons is not None else "")
        return (f"wrote {self.out}: density of {self.id} at {self.points:,} points{electrons}; model evaluation "
                f"{self.seconds:.2f} s, {self.probes_per_second:,.0f} probes/s")


# ------------------------------------------------------------------------------------ grids
def molecule_grid(pos: np.ndarray, spacing: float = DEFAULT_SPACING, margin: float = DEFAULT_MARGIN
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The axis-aligned grid around a molecule, as ``molmat density-labels`` makes it.

    Args:
        pos: (N, 3) atom positions, Angstrom.
        spacing: grid step, Angstrom.
        margin: box margin beyond the outermost atoms, Angstrom.
    Returns:
        origin (3,) Angstrom, axes (3, 3) Angstrom (diagonal, the step), shape (3,) int64.
    """
    return uniform_grid(pos, spacing / BOHR_ANGSTROM, margin / BOHR_ANGSTROM)


def cell_grid(cell: np.ndarray, spacing: float = DEFAULT_SPACING) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The periodic grid of a crystal's cell: ``n_i = ceil(|a_i| / spacing)`` points along lattice vector ``a_i``.

    Args:
        cell: (3, 3) lattice vectors as rows, Angstrom.
        spacing: largest step along a lattice vector, Angstrom.
    Returns:
        origin (3,) zeros, axes (3, 3) Angstrom (row ``i`` is ``a_i / n_i``), shape (3,) int64
        (``shape[i] * axes[i] == cell[i]``: the grid tiles the cell, the CHGCAR convention).
    """
    cell = np.asarray(cell, dtype=np.float64).reshape(3, 3)
    # the 1e-9 keeps a length that is a whole number of steps (4.0 / 0.2 = 20.000000000000004) at 20
    n = np.maximum(np.ceil(np.linalg.norm(cell, axis=1) / spacing - 1e-9), 1).astype(np.int64)
    return np.zeros(3), cell / n[:, None], n


def structure_grid(record: dict[str, Any], spacing: float = DEFAULT_SPACING, margin: float = DEFAULT_MARGIN
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`cell_grid` of a crystal record (one with ``cell``), else :func:`molecule_grid` of its atoms.

    Returns:
        origin (3,) Angstrom, axes (3, 3) Angstrom, shape (3,) int64.
    """
    cell = record.get(R.CELL)
    if cell is not None:
        return cell_grid(cell, spacing)
    return molecule_grid(np.asarray(record[R.POS], dtype=np.float64), spacing, margin)


# ----------------------------------------------------------------------------------- points
def read_points(path: str | Path) -> np.ndarray:
    """Query points from a ``.npy`` file ((P, 3) array) or a ``.csv`` file (x, y, z columns).

    A CSV may have a header: with one, the columns named ``x``, ``y``, ``z`` (any case) are read,
    or the only three columns when there are three; without one, every row must hold exactly three
    numbers.

    Returns:
        (P, 3) float64 positions, Angstrom (P >= 1, all finite).
    Raises:
        MolmatError: a missing or unreadable file, another suffix, another shape, no points,
            non-numbers or non-finite values; the message names the file (and the line).
    """
    path = Path(path)
    if not path.is_file():
        raise MolmatError(f"{path}: no such points file")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        try:
            arr = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError) as exc:
            raise MolmatError(f"{path}: not a readable .npy array ({str(exc).splitlines()[0][:200]})") from None
        if arr.ndim != 2 or arr.shape[1] != 3 or not np.issubdtype(arr.dtype, np.number):
            raise MolmatError(f"{path}: points must be a (P, 3) array of positions in Angstrom, found shape "
                              f"{arr.shape} of {arr.dtype}")
        points = arr.astype(np.float64)
    elif suffix == ".csv":
        points = _read_points_csv(path)
    else:
        raise MolmatError(f"{path}: points must be a .npy or .csv file (x, y, z in Angstrom)")
    if len(points) == 0:
        raise MolmatError(f"{path}: holds no points")
    if not np.isfinite(points).all():
        row = int(np.nonzero(~np.isfinite(points).all(axis=1))[0][0])
        raise MolmatError(f"{path}: point {row} is not finite ({points[row].tolist()})")
    return points


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _read_points_csv(path: Path) -> np.ndarray:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            rows = [(i, r) for i, r in enumerate(csv.reader(fh), start=1) if any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MolmatError(f"{path}: not a readable CSV file ({exc})") from None
    if not rows:
        raise MolmatError(f"{path}: holds no points")
    cols = [0, 1, 2]
    width = 3
    first = rows[0][1]
    if any(_number(c) is None for c in first):   # a header
        names = [c.strip().lower() for c in first]
        if all(k in names for k in "xyz"):
            cols = [names.index(k) for k in "xyz"]
        elif len(names) != 3:
            raise MolmatError(f"{path}, line 1: header {first} has no x, y, z columns")
        width = len(names)
        rows = rows[1:]
    out = np.empty((len(rows), 3), dtype=np.float64)
    for k, (line, row) in enumerate(rows):
        if len(row) != width:
            raise MolmatError(f"{path}, line {line}: {len(row)} fields, expected {width} (x, y, z in Angstrom)")
        for j, c in enumerate(cols):
            value = _number(row[c])
            if value is None:
                raise MolmatError(f"{path}, line {line}: {row[c]!r} is not a number")
            out[k, j] = value
    return out


def write_points(path: str | Path, points: np.ndarray, values: np.ndarray) -> Path:
    """Write densities at points, atomically: ``.npy`` (P,) float64, or ``.csv`` with
    ``x,y,z,rho_e_per_bohr3`` rows (Angstrom, e/bohr^3, shortest exact decimals).

    Args:
        path: the output file (``.npy`` or ``.csv``).
        points: (P, 3) positions, Angstrom.
        values: (P,) densities, e/bohr^3.
    Returns:
        The path written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    values = np.asarray(values, dtype=np.float64).reshape(-1)
    if path.suffix.lower() == ".npy":
        with atomic_file(path, "wb") as fh:
            np.save(fh, values)
        return path
    with atomic_file(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["x", "y", "z", DENSITY_COLUMN])
        w.writerows([*map(repr, p), repr(v)] for p, v in zip(np.asarray(points, dtype=np.float64).tolist(),
                                                             values.tolist()))
    return path


# ------------------------------------------------------------------------------- structures
def _no_conformers(preprocess: dict[str, Any]) -> dict[str, Any]:
    """The model's preprocessing settings without extra conformers (the density is of one geometry)."""
    pre = json.loads(json.dumps(preprocess or {}))
    pre.setdefault("molecule", {})["conformers"] = 0
    return pre


def _is_density_input(path: str, fmt: str) -> bool:
    if fmt == "density":
        return True
    if fmt not in ("auto", "", None):
        return False
    from pipeline.readers import detect_format

    try:
        return detect_format(Path(path)) == "density"
    except (MolmatError, OSError, ValueError):
        return False   # featurized_inputs says what is wrong with it


def _grid_atoms_record(grid: Any, rid: str, source: str, cfg: PreprocessConfig) -> dict[str, Any]:
    """The featurised atoms of a :class:`pipeline.density_data.DensityGrid` (its grid dropped), or an error item."""
    from pipeline.density_data import density_record
    from pipeline.featurize import RecordError

    try:
        rec = density_record(grid, rid, source, cfg)
    except RecordError as exc:
        return {"_id": rid, "_source": source, ERROR: str(exc)}
    except Exception as exc:  # noqa: BLE001 (as featurized_inputs: RDKit and pymatgen raise many types)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else ""
        return {"_id": rid, "_source": source, ERROR: f"could not be featurised ({type(exc).__name__}: {first})"}
    return without_grid(rec)


def _density_file_records(path: str, cfg: PreprocessConfig) -> Iterator[dict[str, Any]]:
    """The atoms of each density file under ``path`` (cube: atoms only; CHGCAR: atoms and cell)."""
    from pipeline.density_data import DensityGrid, read_density
    from pipeline.readers import open_input

    try:
        reader = open_input(path, "density")
    except MolmatError as exc:
        yield {"_id": Path(path).stem, "_source": str(path), ERROR: str(exc)}
        return
    for raw in reader.records():
        p = Path(raw.data)
        try:
            # a cube's values are not needed (nor checked) to read its atoms; a CHGCAR's cell is
            grid = (DensityGrid(read_cube(p), source=str(p)) if p.name.lower().endswith(CUBE_SUFFIXES)
                    else read_density(p))
        except MolmatError as exc:
            yield {"_id": raw.rid, "_source": raw.source, ERROR: str(exc)}
            continue
        yield _grid_atoms_record(grid, raw.rid, raw.source, cfg)


def structure_records(inputs: Sequence[str], preprocess: dict[str, Any], fmt: str = "auto") -> Iterator[dict[str, Any]]:
    """Featurised structures of raw inputs, for a density model (see :func:`pipeline.inputs.featurized_inputs`).

    Args:
        inputs: structure files, directories or archives; density files (cube, CHGCAR, grid
            folders) give their atoms.
        preprocess: the model's ``preprocess`` settings (``config.json``); extra conformers are
            never made.
        fmt: input format, or ``auto``.
    Yields:
        Records (``z`` (N,), ``pos`` (N, 3) Angstrom, ``cell`` (3, 3) Angstrom for crystals, the
        graphs) or ``{"_id", "_source", "_error"}`` items, in input order; never raises for bad
        input.
    """
    pre = _no_conformers(preprocess)
    cfg = PreprocessConfig.model_validate({k: v for k, v in pre.items() if k in PreprocessConfig.model_fields})
    for path in inputs:
        if _is_density_input(str(path), fmt):
            yield from _density_file_records(str(path), cfg)
        else:
            yield from featurized_inputs([str(path)], pre, fmt)


def count_structures(inputs: Sequence[str], fmt: str = "auto") -> int:
    """How many structures the inputs hold, read without featurising (unreadable inputs count once)."""
    from pipeline.readers import open_input

    n = 0
    for path in inputs:
        try:
            n += sum(1 for _ in open_input(path, fmt).records())
        except Exception:  # noqa: BLE001 (only a count for a message; the reading error is reported elsewhere)
            n += 1
    return n


# ------------------------------------------------------------------------------- prediction
@torch.no_grad()
def predict_points(model: DensityModel, record: dict[str, Any], points: np.ndarray,
                   device: torch.device | str = "cpu") -> tuple[np.ndarray, float]:
    """The model's density of one structure at points.

    Args:
        model: a density model in eval mode on ``device``.
        record: a featurised structure (``pos``, and ``cell`` for a crystal).
        points: (P, 3) positions, Angstrom.
    Returns:
        (P,) float64 density in e/bohr^3, and the wall time of the evaluation in seconds.
    Raises:
        MolmatError: an element the model's promolecule table lacks.
    """
    device = torch.device(device)
    t0 = time.perf_counter()
    pred, _ = densities_at(model, record, np.asarray(points, dtype=np.float64).reshape(-1, 3), device)
    return pred, time.perf_counter() - t0


def predict_grid(model: DensityModel, record: dict[str, Any], origin: np.ndarray, axes: np.ndarray, shape: np.ndarray,
                 device: torch.device | str = "cpu", stride: int = 1, direct_radius: float = 1.0,
                 direct_radius_hydrogen: float | None = None, max_coarse_step: float | None = None
                 ) -> tuple[np.ndarray, float]:
    """The model's density of one structure on a regular grid (:func:`finetune.density.predict_on_grid`).

    Args:
        model: a density model in eval mode on ``device``.
        record: a featurised structure.
        origin: (3,) Angstrom; axes: (3, 3) step vectors as rows, Angstrom; shape: (3,) points
            per axis (point ``(i, j, k)`` is ``origin + i axes[0] + j axes[1] + k axes[2]``).
        stride, direct_radius: network on every ``stride``-th point, splines between, every point
            within ``direct_radius`` (Angstrom) of an atom evaluated directly; 1 = every point.
    Returns:
        (n1, n2, n3) float64 density in e/bohr^3, and the wall time of the evaluation in seconds.
    Raises:
        MolmatError: an element the model's promolecule table lacks.
    """
    shape = tuple(int(n) for n in np.asarray(shape).reshape(3))
    t0 = time.perf_counter()
    values, _ = predict_on_grid(model, record, origin, axes, shape, stride, direct_radius, torch.device(device),
                                direct_radius_hydrogen, max_coarse_step)
    return values.reshape(shape), time.perf_counter() - t0


def _with_source(rec: dict[str, Any], message: str) -> str:
    source = str(rec.get(R.SOURCE, ""))
    return message if not source or message.startswith(source) else f"{source}: {message}"


def _as_written(lengths: np.ndarray) -> np.ndarray:
    """Angstrom lengths rounded as :func:`pipeline.cube.write_cube` writes them (``%12.6f`` bohr)."""
    return np.round(np.asarray(lengths, dtype=np.float64) / BOHR_ANGSTROM, 6) * BOHR_ANGSTROM


def _is_dir_out(out: str | Path) -> bool:
    return Path(out).is_dir() or str(out).endswith(("/", os.sep))


def _has_suffix(path: Path, suffixes: Iterable[str]) -> bool:
    return path.name.lower().endswith(tuple(suffixes))


def _check_request(inputs: Sequence[str], out: Path, to_dir: bool, grid_spacing: float | None, margin: float | None,
                   grid_like: str | Path | None, points: str | Path | None) -> None:
    """Refuse contradictory options and outputs before anything is read or predicted."""
    if points is not None:
        given = [f for f, v in (("--grid-spacing", grid_spacing), ("--margin", margin), ("--grid-like", grid_like))
                 if v is not None]
        if given:
            raise MolmatError(f"--points {points} gives the density at its points; {', '.join(given)} make(s) a "
                              "grid: use one or the other")
        if out.is_dir() or not _has_suffix(out, POINT_SUFFIXES):
            raise MolmatError(f"{out}: with --points, --out names a .npy (densities) or .csv (x,y,z,"
                              f"{DENSITY_COLUMN}) file")
        if not inputs:
            raise MolmatError(f"--points {points}: give the structure the points belong to (an INPUT file)")
        return
    if grid_like is not None and grid_spacing is not None:
        raise MolmatError(f"--grid-like {grid_like} takes that cube's grid; --grid-spacing makes a new one: use one "
                          "or the other")
    if grid_like is not None and margin is not None:
        raise MolmatError(f"--grid-like {grid_like} takes that cube's grid; --margin shapes a new one: use one or the "
                          "other")
    if not to_dir and not _has_suffix(out, CUBE_SUFFIXES):
        raise MolmatError(f"{out}: a density model writes its grid as a cube file (.cube or .cube.gz), one cube per "
                          "structure into a directory (--out DIR/), or densities at the points of --points FILE to "
                          ".npy or .csv")
    if to_dir and out.exists() and not out.is_dir():
        raise MolmatError(f"{out}: not a directory")
    if not inputs and grid_like is None:
        raise MolmatError("give a structure file, or --grid-like REF.cube to predict on REF's grid for REF's atoms")
    if grid_spacing is not None and not (math.isfinite(grid_spacing) and grid_spacing > 0):
        raise MolmatError(f"--grid-spacing {grid_spacing}: must be a positive length in Angstrom")
    if margin is not None and not (math.isfinite(margin) and margin >= 0):
        raise MolmatError(f"--margin {margin}: must be a length >= 0 in Angstrom")


def _cube_rid(path: Path) -> str:
    name = path.name[:-3] if path.name.lower().endswith(".gz") else path.name
    return name[:-5] if name.lower().endswith(".cube") else name


def predict_density(run: str | Path, inputs: Sequence[str | Path], out: str | Path, grid_spacing: float | None = None,
                    margin: float | None = None, grid_like: str | Path | None = None, points: str | Path | None = None,
                    fmt: str = "auto", device: torch.device | str = "cpu", stride: int | None = None
                    ) -> list[DensityResult]:
    """Predict the electron density of structures and write cubes or point values (see the module docstring).

    Args:
        run: density model directory, run directory, or shipped model name.
        inputs: structure files (may be empty with ``grid_like``: REF's atoms are used).
        out: ``.cube``/``.cube.gz`` file, a directory (one cube per structure), or with
            ``points`` a ``.npy``/``.csv`` file.
        grid_spacing: grid step, Angstrom (default :data:`DEFAULT_SPACING`).
        margin: box margin around a molecule, Angstrom (default :data:`DEFAULT_MARGIN`).
        grid_like: a cube file whose grid (origin, axes, shape) is used.
        points: a ``.npy``/``.csv`` file of (P, 3) positions, Angstrom.
        fmt: input format, or ``auto``.
        device: where the model runs.
        stride: grids: the network on every ``stride``-th point per axis, log density splined
            between, points near atoms direct (:func:`finetune.density.predict_on_grid`); default
            ``density.grid_stride`` of the model's config; 1 = every point.
    Returns:
        One :class:`DensityResult` per structure (with ``error`` set for those skipped in
        directory mode).
    Raises:
        MolmatError: contradictory options, an output of the wrong kind, unreadable points, a
            reference cube or structure that cannot be read, an input with several structures
            for a single output, a structure the model cannot predict (single output), a grid
            beyond :data:`MAX_GRID_POINTS`, or a model directory that is not a density model.
    """
    inputs = [str(p) for p in inputs]
    to_dir = points is None and _is_dir_out(out)   # before Path() drops a trailing "/"
    out = Path(out)
    _check_request(inputs, out, to_dir, grid_spacing, margin, grid_like, points)
    query = read_points(points) if points is not None else None
    ref = read_cube(grid_like) if grid_like is not None else None
    device = torch.device(device)
    model = load_model_dir(run, [DENSITY_MODEL], device)
    meta = getattr(model, "meta", {}) or {}
    settings = density_settings(model)
    stride = settings.grid_stride if stride is None else int(stride)
    spacing = DEFAULT_SPACING if grid_spacing is None else float(grid_spacing)
    margin = DEFAULT_MARGIN if margin is None else float(margin)
    if inputs:
        records: Iterator[dict[str, Any]] = structure_records(inputs, meta.get("preprocess", {}), fmt)
    else:
        from pipeline.density_data import DensityGrid

        pre = _no_conformers(meta.get("preprocess", {}))
        cfg = PreprocessConfig.model_validate({k: v for k, v in pre.items() if k in PreprocessConfig.model_fields})
        records = iter([_grid_atoms_record(DensityGrid(ref, source=str(grid_like)), _cube_rid(Path(grid_like)),
                                           str(grid_like), cfg)])
    if not to_dir:
        first = next(records, None)
        if first is None:
            raise MolmatError(f"{', '.join(inputs)}: holds no structure")
        if next(records, None) is not None:
            n = count_structures(inputs, fmt)
            what = ("--points belongs to one structure" if query is not None else
                    f"a cube holds one; pass a directory as --out (e.g. --out {out.parent / 'cubes'}/) for one cube "
                    "per structure")
            raise MolmatError(f"{', '.join(inputs)}: holds {n} structures; {what}")
        records = iter([first])
    else:
        out.mkdir(parents=True, exist_ok=True)
    label = str(run)
    results: list[DensityResult] = []
    used: dict[str, int] = {}
    for rec in records:
        rid, source = str(rec.get(R.ID, "")), str(rec.get(R.SOURCE, ""))
        error, warning = (rec[ERROR], "") if ERROR in rec else domain_check(rec, meta)
        if error:
            message = _with_source(rec, error)
            if not to_dir:
                raise MolmatError(message)
            results.append(DensityResult(rid, source, error=message))
            continue
        sum_z = int(np.asarray(rec[R.Z]).sum())
        try:
            if query is not None:
                values, seconds = predict_points(model, rec, query, device)
                results.append(DensityResult(rid, source, write_points(out, query, values), len(query), seconds,
                                             None, sum_z, warning))
                continue
            if ref is not None:
                origin, axes, shape, grid_desc = ref.origin, ref.axes, ref.shape, f"grid_like={Path(grid_like).name}"
            else:
                origin, axes, shape = structure_grid(rec, spacing, margin)
                grid_desc = (f"spacing_angstrom={spacing:g}" if rec.get(R.CELL) is not None
                             else f"spacing_angstrom={spacing:g} margin_angstrom={margin:g}")
            # the cube header keeps 6 decimals of bohr: predict at exactly the points the file will
            # describe (near a nucleus 5e-7 bohr moves the density by 1e-5 of its value)
            origin, axes = _as_written(origin), _as_written(axes)
            n_points = int(np.prod(shape))
            if n_points > MAX_GRID_POINTS:
                raise MolmatError(f"the grid would have {n_points:,} points (shape {'x'.join(map(str, shape))}), "
                                  f"more than {MAX_GRID_POINTS:,}; use a larger --grid-spacing (Angstrom)")
            values, seconds = predict_grid(model, rec, origin, axes, shape, device, stride, settings.direct_radius,
                                           settings.direct_radius_hydrogen, settings.max_coarse_step)
        except MolmatError as exc:
            message = _with_source(rec, str(exc))
            if not to_dir:
                raise MolmatError(message) from None
            results.append(DensityResult(rid, source, error=message))
            continue
        # with atoms from the reference cube itself, keep its charge column too: the same atoms block
        charges = ref.charges if ref is not None and not inputs else None
        grid = CubeGrid(z=rec[R.Z], positions=rec[R.POS], origin=origin, axes=axes, shape=shape, values=values,
                        charges=charges)
        electrons = integrate(grid)
        grid.comments = [f"molmat predict density id={safe_name(rid)} model={label} baseline={model.baseline} "
                         f"molmat={__version__}",
                         f"units=e/bohr^3 electrons={electrons:.6f} sum_z={sum_z} points={n_points} {grid_desc}"]
        if to_dir:
            name = safe_name(rid)
            used[name] = used.get(name, 0) + 1
            target = out / (f"{name}.cube" if used[name] == 1 else f"{name}_{used[name]}.cube")
        else:
            target = out
        results.append(DensityResult(rid, source, write_cube(target, grid), n_points, seconds, electrons, sum_z,
                                     warning))
    if to_dir and not any(r.out for r in results):
        failed = [r.error for r in results]
        raise MolmatError(f"no density written to {out}: " + ("; ".join(failed[:3]) if failed else "no structures"))
    return results
