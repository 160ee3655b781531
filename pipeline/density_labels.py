"""DFT electron-density labels with PySCF: one cube file per molecule (``molmat density-labels``).

For every molecule of any source the readers open (QM9 xyz archives, SDF, SMILES with ETKDG
coordinates, plain xyz), a Kohn-Sham SCF (default PBE/def2-SVP with density fitting) gives the
AO density matrix; the total density is evaluated on an axis-aligned uniform grid (the atoms'
bounding box plus a margin, step ``spacing`` bohr) in chunks, and written to ``OUT/<id>.cube``.

Output directory::

    <id>.cube          density in e/bohr^3; comment lines carry key=value metadata (level of
                       theory, electrons on PySCF's DFT grid and on the uniform grid, energy)
    <id>.dm.npz        AO density matrix (optional), layout of ../shared/data/density/qm9_pbe_def2svp_dm
    labels.jsonl       one line per finished molecule (id, file, electron counts, energy, timings)
    failures.jsonl     {"file", "id", "reason"} per molecule that could not be labelled
    settings.json      the level of theory and grid; a rerun with other settings is refused
    config.resolved.yaml

Resumable: a cube is written under a temporary name and renamed when complete, so a molecule
whose cube exists is finished and skipped on a rerun; recorded failures are not retried unless
asked. Molecules run in separate processes (one per core by default), each with one thread,
because one SCF of a small molecule does not scale across threads as well as molecules do; with
fewer workers than cores (``density_labels.workers``, or a ``limit`` below the core count) the
workers share the cores out as threads (``density_labels.threads``).

PySCF is an optional dependency (``pip install molmat[density]``) and is imported only here, in
functions.
"""
from __future__ import annotations

import itertools
import json
import logging
import multiprocessing as mp
import os
import queue
import re
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline import MolmatError, __version__
from pipeline.config import Config, DensityLabelsConfig
from pipeline.cube import BOHR_ANGSTROM, CubeGrid, write_cube
from pipeline.periodic_labels import CHGCAR_SUFFIX

log = logging.getLogger("molmat.density_labels")

LABELS = "labels.jsonl"
FAILURES = "failures.jsonl"
SETTINGS = "settings.json"
CUBE_SUFFIX = ".cube"
DM_SUFFIX = ".dm.npz"
#: Settings that change the numbers in a cube; a rerun into a directory must agree on all of them.
PHYSICS_KEYS = ("functional", "basis", "density_fit", "auxbasis", "grid_level", "conv_tol", "max_cycle", "charge",
                "spin", "spacing", "margin", "crystal_basis", "pseudo", "kmesh", "smearing")
#: Thread-count variables read by OpenMP, OpenBLAS and MKL when a worker imports numpy and PySCF.
_THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS")
_LOG_EVERY_S = 30.0


class LabelFailure(Exception):
    """A molecule that cannot be labelled; the message is the reason written to failures.jsonl."""


def _pyscf() -> Any:
    """Import PySCF (an optional extra) or say how to install it."""
    try:
        import pyscf
        from pyscf import dft, gto, lib  # noqa: F401  (submodules become attributes of pyscf)
    except ImportError:
        raise MolmatError("density labels need PySCF: pip install molmat[density]  (or pip install pyscf)") from None
    return pyscf


# --------------------------------------------------------------------------------- grid, density
def uniform_grid(pos_angstrom: np.ndarray, spacing_bohr: float, margin_bohr: float) -> tuple[np.ndarray, np.ndarray,
                                                                                                   np.ndarray]:
    """The axis-aligned grid around a molecule: its bounding box plus ``margin_bohr`` on every side.

    Args:
        pos_angstrom: (N, 3) atom positions, Angstrom.
        spacing_bohr: grid step, bohr.
        margin_bohr: box margin beyond the outermost atoms, bohr.
    Returns:
        origin (3,) Angstrom (at min - margin), axes (3, 3) Angstrom (diagonal, the step), shape (3,)
        int64: enough points that the last one reaches at least max + margin.
    """
    pos_b = np.asarray(pos_angstrom, dtype=np.float64).reshape(-1, 3) / BOHR_ANGSTROM
    lo = pos_b.min(axis=0) - margin_bohr
    hi = pos_b.max(axis=0) + margin_bohr
    shape = np.ceil((hi - lo) / spacing_bohr - 1e-9).astype(np.int64) + 1
    return lo * BOHR_ANGSTROM, np.eye(3) * spacing_bohr * BOHR_ANGSTROM, shape


def evaluate_density(mol: Any, dm: np.ndarray, coords_bohr: np.ndarray, chunk: int = 20000) -> np.ndarray:
    """Electron density of an AO density matrix at points, in chunks so memory stays bounded.

    Args:
        mol: the ``pyscf.gto.Mole`` the density matrix belongs to.
        dm: (n_ao, n_ao) total (alpha + beta) AO density matrix.
        coords_bohr: (P, 3) points, bohr.
        chunk: points per evaluation; memory is about ``chunk * n_ao * 8`` bytes.
    Returns:
        (P,) float64 density, e/bohr^3.
    """
    from pyscf.dft import numint

    coords = np.ascontiguousarray(coords_bohr, dtype=np.float64).reshape(-1, 3)
    out = np.empty(len(coords), dtype=np.float64)
    for s in range(0, len(coords), chunk):
        ao = numint.eval_ao(mol, coords[s:s + chunk])
        out[s:s + chunk] = numint.eval_rho(mol, ao, dm)
    return out


def density_errors(values: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    """How far a density is from a reference on the same points.

    Returns ``nmae`` = sum|a - b| / sum|b| (the metric of DeepDFT-style density models; on a uniform
    grid it is the integrated absolute error per electron), ``max_abs`` (e/bohr^3) and ``rmse``.
    """
    a = np.asarray(values, dtype=np.float64).reshape(-1)
    b = np.asarray(reference, dtype=np.float64).reshape(-1)
    diff = np.abs(a - b)
    return {"nmae": float(diff.sum() / np.abs(b).sum()), "max_abs": float(diff.max()),
            "rmse": float(np.sqrt(np.mean(diff ** 2)))}


@dataclass
class DensityMatrix:
    """An AO density matrix with its molecule: the density exactly, anywhere (no grid).

    Attributes:
        z: (N,) int64 atomic numbers.
        pos_angstrom: (N, 3) float64 positions, Angstrom.
        basis: AO basis name (PySCF, spherical functions).
        dm: (n_ao, n_ao) float64 total AO density matrix.
        charge: total charge; spin: 2S (for building the molecule).
        meta: every other field of the file (energy_hartree, n_electrons, xc, ...).
    """

    z: np.ndarray
    pos_angstrom: np.ndarray
    basis: str
    dm: np.ndarray
    charge: int = 0
    spin: int = 0
    meta: dict[str, Any] = field(default_factory=dict)

    def mol(self) -> Any:
        """The ``pyscf.gto.Mole`` (Angstrom input, this basis) the matrix belongs to."""
        pyscf = _pyscf()
        return pyscf.gto.M(atom=[[int(z), tuple(float(c) for c in p)] for z, p in zip(self.z, self.pos_angstrom)],
                           unit="Angstrom", basis=self.basis, charge=self.charge, spin=self.spin, verbose=0)

    def density(self, points_angstrom: np.ndarray, chunk: int = 20000) -> np.ndarray:
        """(P,) density in e/bohr^3 at (P, 3) points given in Angstrom."""
        return evaluate_density(self.mol(), self.dm, np.asarray(points_angstrom) / BOHR_ANGSTROM, chunk)


def load_density_matrix(path: str | Path) -> DensityMatrix:
    """Load a density-matrix ``.npz`` (the shared ``qm9_pbe_def2svp_dm`` layout, or ``OUT/<id>.dm.npz``).

    Required fields: ``z``, ``pos_angstrom``, ``basis``, ``n_ao``, ``dm_upper`` (upper triangle,
    row-major, of the symmetric n_ao x n_ao matrix). Read without pickle.

    Raises:
        MolmatError: missing file or field, or a triangle of the wrong length; names the file.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
    except FileNotFoundError:
        raise MolmatError(f"{path}: no such density-matrix file") from None
    except (ValueError, OSError) as exc:
        raise MolmatError(f"{path}: not a readable .npz density-matrix file ({exc})") from None
    missing = [k for k in ("z", "pos_angstrom", "basis", "n_ao", "dm_upper") if k not in data]
    if missing:
        raise MolmatError(f"{path}: density-matrix file lacks {', '.join(missing)}")
    n = int(data["n_ao"])
    upper = np.asarray(data["dm_upper"], dtype=np.float64)
    if upper.size != n * (n + 1) // 2:
        raise MolmatError(f"{path}: dm_upper has {upper.size} values; n_ao={n} needs {n * (n + 1) // 2}")
    dm = np.zeros((n, n))
    dm[np.triu_indices(n)] = upper
    dm = dm + dm.T - np.diag(np.diag(dm))
    meta = {k: (v.item() if v.ndim == 0 else v) for k, v in data.items()
            if k not in ("z", "pos_angstrom", "basis", "dm_upper")}
    z = np.asarray(data["z"], dtype=np.int64)
    charge = int(meta.get("charge", 0))
    nelec = int(z.sum()) - charge
    spin = int(meta.get("spin", nelec % 2))
    return DensityMatrix(z=z, pos_angstrom=np.asarray(data["pos_angstrom"], dtype=np.float64),
                         basis=str(data["basis"]), dm=dm, charge=charge, spin=spin, meta=meta)


# ------------------------------------------------------------------------------ cube metadata
def level_of_theory(settings: dict[str, Any]) -> str:
    """``PBE/def2-SVP`` plus ``density-fitting`` when used, for comment lines and logs."""
    df = " density-fitting" if settings["density_fit"] else ""
    return f"{settings['functional']}/{settings['basis']}{df}"


def parse_cube_comments(comments: list[str]) -> dict[str, str]:
    """The ``key=value`` tokens of a density-labels cube's two comment lines, as strings."""
    out: dict[str, str] = {}
    for line in comments:
        for tok in line.split():
            if "=" in tok:
                k, v = tok.split("=", 1)
                out[k] = v
    return out


def label_comments(path: Path) -> dict[str, str]:
    """Metadata of a finished label from its first two lines only (not its values): a cube's two
    comment lines, or a crystal CHGCAR's title line (its second line, the scale, has no ``=``)."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        return parse_cube_comments([fh.readline(), fh.readline()])


def safe_name(rid: str) -> str:
    """A record id as a file name: characters other than letters, digits, ``._+-`` become ``_``."""
    name = re.sub(r"[^A-Za-z0-9._+-]", "_", rid.strip()) or "_"
    return "_" + name if name.startswith(".") else name


# ---------------------------------------------------------------------------- one molecule
@dataclass
class ScfResult:
    """A converged Kohn-Sham calculation.

    Attributes:
        mol: the ``pyscf.gto.Mole``; mf: the converged SCF object (its ``grids`` is the XC grid).
        dm: (n_ao, n_ao) total AO density matrix; energy: total energy (Hartree).
        n_electrons, spin (2S), seconds (SCF wall time), cycles (SCF iterations), auxbasis (or None).
    """

    mol: Any
    mf: Any
    dm: np.ndarray
    energy: float
    n_electrons: int
    spin: int
    seconds: float
    cycles: int | None
    auxbasis: str | None


def run_scf(z: np.ndarray, pos_angstrom: np.ndarray, settings: dict[str, Any]) -> ScfResult:
    """Kohn-Sham SCF of one molecule with the level of theory of ``settings``.

    Args:
        z: (N,) atomic numbers; pos_angstrom: (N, 3) positions, Angstrom.
        settings: a :class:`DensityLabelsConfig` as a dict (functional, basis, density_fit,
            auxbasis, grid_level, conv_tol, max_cycle, charge, spin).
    Raises:
        LabelFailure: impossible charge/spin, PySCF rejects the molecule, or no convergence.
    """
    _pyscf()
    from pyscf import dft, gto

    z = np.asarray(z, dtype=np.int64)
    pos = np.asarray(pos_angstrom, dtype=np.float64).reshape(-1, 3)
    nelec = int(z.sum()) - int(settings["charge"])
    spin = settings["spin"] if settings["spin"] is not None else nelec % 2
    if nelec <= 0:
        raise LabelFailure(f"{nelec} electrons with charge {settings['charge']}")
    if (nelec - spin) % 2:
        raise LabelFailure(f"{nelec} electrons cannot have spin 2S={spin}; set density_labels.spin")
    try:
        mol = gto.M(atom=[[int(a), tuple(float(c) for c in p)] for a, p in zip(z, pos)], unit="Angstrom",
                    basis=settings["basis"], charge=int(settings["charge"]), spin=int(spin), verbose=0)
    except Exception as exc:  # PySCF raises RuntimeError/KeyError/ValueError for bad basis or elements
        raise LabelFailure(f"PySCF could not build the molecule ({type(exc).__name__}: {str(exc)[:200]})") from None
    mf = dft.RKS(mol) if spin == 0 else dft.UKS(mol)
    mf.xc = settings["functional"]
    if settings["density_fit"]:
        mf = mf.density_fit(auxbasis=settings["auxbasis"])
    mf.grids.level = int(settings["grid_level"])
    energy, seconds = converge(mf, settings)
    dm = np.asarray(mf.make_rdm1())
    if dm.ndim == 3:  # UKS: alpha and beta
        dm = dm[0] + dm[1]
    aux = getattr(getattr(mf, "with_df", None), "auxbasis", None) if settings["density_fit"] else None
    return ScfResult(mol=mol, mf=mf, dm=dm, energy=energy, n_electrons=nelec, spin=int(spin), seconds=seconds,
                     cycles=getattr(mf, "cycles", None), auxbasis=str(aux) if aux else None)


def converge(mf: Any, settings: dict[str, Any], what: str = "SCF") -> tuple[float, float]:
    """Run a PySCF SCF object (molecular or periodic) to convergence with the settings' threshold and cycles.

    Returns:
        (energy in Hartree, wall seconds).
    Raises:
        LabelFailure: PySCF raised, or the SCF did not converge (the reason names the last energy).
    """
    mf.conv_tol = float(settings["conv_tol"])
    mf.max_cycle = int(settings["max_cycle"])
    mf.verbose = 0
    t0 = time.perf_counter()
    try:
        energy = float(mf.kernel())
    except Exception as exc:
        raise LabelFailure(f"{what} failed ({type(exc).__name__}: {str(exc)[:200]})") from None
    seconds = time.perf_counter() - t0
    if not mf.converged:
        raise LabelFailure(f"{what} not converged in {settings['max_cycle']} cycles (conv_tol {settings['conv_tol']:g}, "
                           f"last energy {energy:.8f} Ha)")
    return energy, seconds


def electrons_on_dft_grid(scf: ScfResult, chunk: int = 20000) -> float:
    """The density integrated on the SCF's own (Becke-partitioned, atom-centred) XC grid."""
    rho = evaluate_density(scf.mol, scf.dm, scf.mf.grids.coords, chunk)
    return float(rho @ scf.mf.grids.weights)


def label_molecule(job: dict[str, Any], settings: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Run the SCF for one molecule and write its cube (and density matrix) atomically.

    Args:
        job: ``id``, ``name`` (file stem), ``file``, ``z`` (N,) list, ``pos`` (N, 3) list in Angstrom.
        settings: a :class:`DensityLabelsConfig` as a dict.
        out_dir: output directory.
    Returns:
        The labels.jsonl entry: electron counts, energy (Hartree), timings, grid shape.
    Raises:
        LabelFailure: the molecule cannot be labelled (bad charge/spin, SCF not converged, ...).
    """
    pyscf = _pyscf()
    from pipeline.cube import grid_points, voxel_volume_bohr3

    out_dir = Path(out_dir)
    z = np.asarray(job["z"], dtype=np.int64)
    pos = np.asarray(job["pos"], dtype=np.float64).reshape(-1, 3)
    scf = run_scf(z, pos, settings)
    t1 = time.perf_counter()
    chunk = int(settings["chunk_points"])
    electrons_dft = electrons_on_dft_grid(scf, chunk)
    origin, axes, shape = uniform_grid(pos, settings["spacing"], settings["margin"])
    grid = CubeGrid(z=z, positions=pos, origin=origin, axes=axes, shape=shape,
                    values=np.zeros(tuple(int(n) for n in shape)))
    rho = evaluate_density(scf.mol, scf.dm, grid_points(grid) / BOHR_ANGSTROM, chunk)
    grid.values = rho.reshape(grid.values.shape)
    electrons_uniform = float(rho.sum() * voxel_volume_bohr3(grid))
    grid_seconds = time.perf_counter() - t1
    entry = {
        "id": job["id"], "file": job["file"], "cube": job["name"] + CUBE_SUFFIX, "n_atoms": int(len(z)),
        "n_electrons": scf.n_electrons, "spin": scf.spin, "electrons_dft_grid": round(electrons_dft, 6),
        "electrons_uniform_grid": round(electrons_uniform, 6), "energy_Ha": scf.energy,
        "scf_seconds": round(scf.seconds, 2), "scf_cycles": scf.cycles, "grid_seconds": round(grid_seconds, 2),
        "shape": [int(n) for n in shape], "level": level_of_theory(settings), "auxbasis": scf.auxbasis,
        "pyscf": pyscf.__version__, "molmat": __version__,
    }
    grid.comments = [
        f"molmat-density-labels id={job['id']} level={settings['functional']}/{settings['basis']} "
        f"density_fitting={scf.auxbasis or 'none'} xc_grid_level={settings['grid_level']} "
        f"conv_tol={settings['conv_tol']:g} method={'RKS' if scf.spin == 0 else 'UKS'} molmat={__version__} "
        f"pyscf={pyscf.__version__}",
        f"units=e/bohr^3 electrons={scf.n_electrons} electrons_dft_grid={electrons_dft:.6f} "
        f"electrons_uniform_grid={electrons_uniform:.6f} energy_Ha={scf.energy:.10f} scf_seconds={scf.seconds:.2f} "
        f"spacing_bohr={settings['spacing']:g} margin_bohr={settings['margin']:g}",
    ]
    if settings["save_density_matrix"]:
        _write_dm(out_dir / (job["name"] + DM_SUFFIX), job, z, pos, scf.dm, entry, settings)
    # The cube goes last: its existence marks the molecule finished.
    write_cube(out_dir / (job["name"] + CUBE_SUFFIX), grid)
    return entry


def _write_dm(path: Path, job: dict[str, Any], z: np.ndarray, pos: np.ndarray, dm: np.ndarray,
              entry: dict[str, Any], settings: dict[str, Any]) -> None:
    """The density matrix in the shared reference layout (upper triangle), written atomically."""
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            np.savez_compressed(
                fh, id=np.array(str(job["id"])), z=z.astype(np.int64), pos_angstrom=pos,
                basis=np.array(str(settings["basis"]).lower()), xc=np.array(str(settings["functional"]).lower()),
                n_ao=np.array(dm.shape[0]), dm_upper=dm[np.triu_indices(dm.shape[0])],
                energy_hartree=np.array(entry["energy_Ha"]), n_electrons=np.array(entry["n_electrons"]),
                charge=np.array(int(settings["charge"])), spin=np.array(entry["spin"]),
                electrons_on_dft_grid=np.array(entry["electrons_dft_grid"]),
                scf_seconds=np.array(entry["scf_seconds"]), pyscf_version=np.array(entry["pyscf"]))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _worker_loop(jobs: Any, results: Any, settings: dict[str, Any], out_dir: str, threads: int = 1) -> None:
    """Worker process: label molecules from ``jobs`` until ``None``; every outcome goes to ``results``."""
    # Ctrl-C reaches the whole process group; the parent decides and terminates workers itself.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        pyscf = _pyscf()
        pyscf.lib.num_threads(threads)
    except MolmatError as exc:
        results.put({"key": None, "fatal": str(exc)})
        return
    while True:
        job = jobs.get()
        if job is None:
            return
        try:
            if job.get("cell") is not None:
                from pipeline.periodic_labels import label_crystal

                res = {"ok": True, "entry": label_crystal(job, settings, out_dir)}
            else:
                res = {"ok": True, "entry": label_molecule(job, settings, out_dir)}
        except LabelFailure as exc:
            res = {"ok": False, "reason": str(exc)}
        except MemoryError:
            res = {"ok": False, "reason": "out of memory (lower density_labels.chunk_points or use fewer workers)"}
        except Exception as exc:  # keep a long run going; the reason is recorded for this molecule
            res = {"ok": False, "reason": f"unexpected {type(exc).__name__}: {str(exc)[:300]}"}
        res["key"] = job["key"]
        results.put(res)


# ------------------------------------------------------------------------------- worker pool
class _Pool:
    """Spawned worker processes, one molecule each at a time; a worker that dies is replaced.

    Workers are spawned (never forked) with the thread variables set to ``threads``, so numpy's
    BLAS and PySCF's OpenMP in each of them use that many threads.
    """

    def __init__(self, size: int, settings: dict[str, Any], out_dir: Path, threads: int = 1) -> None:
        self.size = size
        self.threads = int(threads)
        self.settings = settings
        self.out_dir = str(out_dir)
        self.ctx = mp.get_context("spawn")
        self.results = self.ctx.Queue()
        self.slots: list[dict[str, Any]] = []

    def _spawn(self) -> dict[str, Any]:
        jobs = self.ctx.Queue()
        saved = {k: os.environ.get(k) for k in _THREAD_VARS}
        os.environ.update({k: str(self.threads) for k in _THREAD_VARS})
        try:
            proc = self.ctx.Process(target=_worker_loop, args=(jobs, self.results, self.settings, self.out_dir,
                                                               self.threads), daemon=True)
            proc.start()
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        return {"proc": proc, "jobs": jobs, "job": None}

    def has_room(self) -> bool:
        """True when a job can be submitted now (an idle worker, or room to start one)."""
        return any(s["job"] is None for s in self.slots) or len(self.slots) < self.size

    def busy(self) -> int:
        """Number of jobs being computed."""
        return sum(s["job"] is not None for s in self.slots)

    def submit(self, job: dict[str, Any]) -> None:
        """Give ``job`` to an idle worker (starting one if needed)."""
        slot = next((s for s in self.slots if s["job"] is None), None)
        if slot is not None and not slot["proc"].is_alive():  # an idle worker that died: replace it
            self.slots.remove(slot)
            slot = None
        if slot is None:
            slot = self._spawn()
            self.slots.append(slot)
        slot["job"] = job
        slot["jobs"].put(job)

    def poll(self, timeout: float) -> list[tuple[dict[str, Any], dict[str, Any]]]:
        """(job, result) pairs finished within ``timeout`` seconds; dead workers become failures."""
        out = []
        try:
            res = self.results.get(timeout=timeout)
            while True:
                if res.get("fatal"):
                    raise MolmatError(res["fatal"])
                slot = next(s for s in self.slots if s["job"] is not None and s["job"]["key"] == res["key"])
                out.append((slot["job"], res))
                slot["job"] = None
                res = self.results.get_nowait()
        except queue.Empty:
            pass
        for i, slot in enumerate(self.slots):
            if slot["job"] is not None and not slot["proc"].is_alive():
                code = slot["proc"].exitcode
                why = "killed, out of memory?" if code is not None and code < 0 else f"exit code {code}"
                out.append((slot["job"], {"ok": False, "reason": f"worker process died ({why})"}))
                self.slots[i] = self._spawn()
        return out

    def close(self) -> None:
        """Let idle workers exit and wait for them."""
        for slot in self.slots:
            slot["jobs"].put(None)
        for slot in self.slots:
            slot["proc"].join(timeout=30)
            if slot["proc"].is_alive():
                slot["proc"].terminate()
                slot["proc"].join()
        self.slots = []

    def terminate(self) -> None:
        """Stop every worker now (Ctrl-C, SIGTERM); their cubes in progress never get a final name."""
        for slot in self.slots:
            if slot["proc"].is_alive():
                slot["proc"].terminate()
        for slot in self.slots:
            slot["proc"].join(timeout=10)
        self.slots = []


# ------------------------------------------------------------------------------------ progress
class _Progress:
    """A tqdm bar on an interactive terminal, else a log line every 30 s (done, failed, rate, ETA)."""

    def __init__(self, total: int | None) -> None:
        self.total = total
        self.start = time.monotonic()
        self.last_log = self.start
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="mol", desc="density-labels", dynamic_ncols=True)

    def update(self, counts: dict[str, int], advanced: int, force: bool = False) -> None:
        """Report ``counts`` (computed, failed, skipped); ``advanced`` records were handled since last call."""
        computed = counts["computed"]
        if self.bar is not None:
            self.bar.update(advanced)
            self.bar.set_postfix(done=computed, failed=counts["failed"], skipped=counts["skipped"], refresh=False)
            return
        now = time.monotonic()
        if not force and now - self.last_log < _LOG_EVERY_S:
            return
        self.last_log = now
        elapsed = now - self.start
        of = f" of {self.total}" if self.total else ""
        line = f"density-labels: {computed} computed, {counts['failed']} failed, {counts['skipped']} skipped{of}"
        if computed:
            rate = computed / elapsed
            line += f"; {elapsed / computed:.1f} s/molecule ({rate * 3600:.0f}/h)"
            left = self.total - computed - counts["failed"] - counts["skipped"] if self.total else 0
            if left > 0:
                line += f", ETA {_hms(left / rate)}"
        else:
            line += f"; first molecule running ({_hms(elapsed)})"
        log.info(line)

    def close(self) -> None:
        """Close the bar."""
        if self.bar is not None:
            self.bar.close()


def _hms(seconds: float) -> str:
    """``1h05m`` or ``4m10s``."""
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


# ------------------------------------------------------------------------------------- driver
@dataclass
class LabelSummary:
    """What one ``density-labels`` run did.

    Attributes:
        out: output directory.
        computed: molecules labelled in this run; failed: failures recorded in this run;
        skipped: records already finished (cube present) or recorded as failed before.
        seconds: wall time of the run; scf_seconds: SCF time summed over the molecules computed.
    """

    out: Path
    computed: int = 0
    failed: int = 0
    skipped: int = 0
    seconds: float = 0.0
    scf_seconds: float = 0.0
    reasons: dict[str, int] = field(default_factory=dict)


def _settings(cfg: DensityLabelsConfig) -> dict[str, Any]:
    """The section as plain data, as workers receive it."""
    return cfg.model_dump(mode="json")


def _check_settings(out: Path, settings: dict[str, Any]) -> None:
    """Write settings.json, or refuse a directory made with other physics settings."""
    path = out / SETTINGS
    mine = {k: settings[k] for k in PHYSICS_KEYS}
    if path.exists():
        try:
            theirs = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise MolmatError(f"{path}: not valid JSON ({exc}); remove it only if the cubes beside it match "
                              "your settings") from None
        # a directory made before a key existed was made with its default
        defaults = DensityLabelsConfig().model_dump(mode="json")
        theirs = {k: theirs.get(k, defaults[k]) for k in PHYSICS_KEYS}
        diff = [f"{k}: {theirs[k]!r} there, {mine[k]!r} now" for k in PHYSICS_KEYS if theirs[k] != mine[k]]
        if diff:
            raise MolmatError(f"{out} holds density labels made with other settings ({'; '.join(diff)}); use another "
                              "--out or the same settings")
        return
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({**mine, "molmat": __version__}, indent=1) + "\n")
    tmp.replace(path)


def _read_jsonl_ids(path: Path) -> set[str]:
    """The ``id`` of every complete line of a JSON Lines file (none if it does not exist)."""
    ids: set[str] = set()
    if path.exists():
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                ids.add(str(json.loads(line)["id"]))
            except (json.JSONDecodeError, KeyError, TypeError):
                continue  # a line cut by a kill; the molecule's cube decides whether it is done
    return ids


def _append(path: Path, obj: dict[str, Any]) -> None:
    """Append one JSON line; one writer (the main process), so lines never interleave."""
    with open(path, "a", encoding="utf-8") as fh:
        fh.write(json.dumps(obj) + "\n")
        fh.flush()


def _end_line(path: Path) -> None:
    """Terminate a last line cut by a kill, so that the next appended line stays valid JSON."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb+") as fh:
            fh.seek(-1, os.SEEK_END)
            if fh.read(1) != b"\n":
                fh.write(b"\n")


def _available_cores() -> int:
    """Cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))  # respects taskset and Slurm's cpu binding
    except AttributeError:
        return os.cpu_count() or 1


def worker_layout(workers: int, threads: int, limit: int | None, cores: int) -> tuple[int, int]:
    """Worker processes and threads per worker for a labelling run.

    Args:
        workers: asked for (0: one per core, but no more than ``limit``).
        threads: asked for (0: ``cores // workers``, at least 1).
        limit: molecules to label at most (None: unknown).
        cores: cores available to this process.
    Returns:
        (workers, threads per worker).
    """
    if not workers:
        workers = min(cores, limit) if limit else cores
    workers = max(1, workers)
    return workers, threads or max(1, cores // workers)


def generate(inputs: list[str | Path], out: str | Path, cfg: Config, fmt: str = "auto",
             retry_failed: bool = False) -> LabelSummary:
    """Label every molecule of ``inputs`` with a DFT density cube in ``out`` (resumable).

    Args:
        inputs: files, directories or archives any molmat reader opens.
        out: output directory (created).
        cfg: the configuration; ``cfg.density_labels`` holds the level of theory, grid, workers,
            start and limit; ``cfg.preprocess`` how records are parsed (SMILES embedding).
        fmt: input format name or ``auto``.
        retry_failed: also redo molecules recorded in failures.jsonl.
    Returns:
        Counts of computed, failed and skipped molecules.
    Raises:
        MolmatError: PySCF missing, unreadable input, or ``out`` made with other settings.
    """
    from pipeline.config import write_resolved
    from pipeline.featurize import RecordError, featurize
    from pipeline.readers import open_source

    _pyscf()  # fail now, not in a worker, when the extra is not installed
    dl = cfg.density_labels
    settings = _settings(dl)
    readers = [open_source(p, fmt) for p in inputs]  # a bad path fails before anything is written
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    _check_settings(out, settings)
    write_resolved(cfg, out)
    for stale in out.glob(".*.tmp.*"):  # left by a killed worker; never under a final name
        stale.unlink(missing_ok=True)
    pre = cfg.preprocess.model_copy(deep=True)
    pre.molecule.conformers = 0  # extra conformers are not used here
    labels_path, failures_path = out / LABELS, out / FAILURES
    for path in (labels_path, failures_path):
        _end_line(path)
    labelled = _read_jsonl_ids(labels_path)
    failed_before = set() if retry_failed else _read_jsonl_ids(failures_path)
    summary = LabelSummary(out=out)
    counts = {"computed": 0, "failed": 0, "skipped": 0}
    seen: dict[str, str] = {}
    t_start = time.monotonic()

    def fail(file: str, rid: str, reason: str) -> None:
        _append(failures_path, {"file": file, "id": rid, "reason": reason})
        counts["failed"] += 1
        key = reason.split("(")[0].strip()[:80]
        summary.reasons[key] = summary.reasons.get(key, 0) + 1

    def jobs() -> Iterator[dict[str, Any] | None]:
        """Jobs to compute; ``None`` for a record handled here (skipped or failed), for progress."""
        stream = itertools.chain.from_iterable(r.records() for r in readers)
        stop = dl.start + dl.limit if dl.limit is not None else None
        for key, raw in enumerate(itertools.islice(stream, dl.start, stop)):
            rid = str(raw.rid)
            name = safe_name(rid)
            if name in seen:
                fail(raw.source, rid, f"duplicate record id (file name {name}{CUBE_SUFFIX} already used by {seen[name]})")
                yield None
                continue
            seen[name] = raw.source
            cube = out / (name + CUBE_SUFFIX)
            chgcar = out / (name + CHGCAR_SUFFIX)
            done = next((p for p in (cube, chgcar) if p.exists()), None)
            if done is not None:
                counts["skipped"] += 1
                if rid not in labelled:  # killed between the label's rename and the index line
                    meta = label_comments(done)
                    _append(labels_path, {"id": rid, "file": raw.source, done.suffix[1:].lower(): done.name,
                                          "recovered_from_cube": True,
                                          **{k: meta.get(k) for k in ("electrons", "electrons_dft_grid",
                                                                      "electrons_fft_mesh", "electrons_uniform_grid",
                                                                      "energy_Ha", "scf_seconds", "level")
                                             if k in meta}})
                    labelled.add(rid)
                yield None
                continue
            if rid in failed_before:
                counts["skipped"] += 1
                yield None
                continue
            if raw.kind == "crystal" and not dl.crystals:
                fail(raw.source, rid, "a crystal: periodic DFT is off (set density_labels.crystals=true for "
                     "PySCF's periodic DFT of small cells, valence density)")
                yield None
                continue
            if raw.kind not in ("molecule", "crystal"):
                fail(raw.source, rid, f"{raw.kind}s are not supported (molecules, and crystals with "
                     "density_labels.crystals=true)")
                yield None
                continue
            try:
                arrays = featurize(raw, [], pre)
            except RecordError as exc:
                fail(raw.source, rid, str(exc))
                yield None
                continue
            except Exception as exc:  # a reader/RDKit surprise must not end a long run
                fail(raw.source, rid, f"could not read the record ({type(exc).__name__}: {str(exc)[:200]})")
                yield None
                continue
            if "pos" not in arrays:
                fail(raw.source, rid, "no 3D coordinates (SMILES input needs preprocess.molecule.embed_smiles=true)")
                yield None
                continue
            yield {"key": key, "id": rid, "name": name, "file": raw.source,
                   "z": np.asarray(arrays["z"], dtype=np.int64).tolist(), "pos": np.asarray(arrays["pos"]).tolist(),
                   "cell": np.asarray(arrays["cell"]).tolist() if raw.kind == "crystal" else None}

    workers, threads = worker_layout(dl.workers, dl.threads, dl.limit, _available_cores())
    log.info("density-labels: %s, XC grid level %d, conv_tol %g; uniform grid %g bohr, margin %g bohr; %d worker "
             "process(es) x %d thread(s); %d finished and %d failed molecule(s) already in %s",
             level_of_theory(settings), dl.grid_level, dl.conv_tol, dl.spacing, dl.margin, workers, threads,
             len(list(out.glob("*" + CUBE_SUFFIX))) + len(list(out.glob("*" + CHGCAR_SUFFIX))), len(failed_before), out)
    if dl.crystals:
        from pipeline.periodic_labels import level_of_theory as crystal_level

        log.info("density-labels: crystals by periodic DFT, %s (valence density, OUT/<id>%s), cells of at most %d "
                 "atoms", crystal_level(settings), CHGCAR_SUFFIX, dl.max_cell_atoms)
    pool = _Pool(workers, settings, out, threads)
    progress = _Progress(dl.limit)
    previous_handler = None
    if hasattr(signal, "SIGTERM") and _is_main_thread():
        def _on_term(signum: int, frame: Any) -> None:
            raise KeyboardInterrupt
        previous_handler = signal.signal(signal.SIGTERM, _on_term)
    it = jobs()
    exhausted = False
    clean = False
    try:
        while True:
            advanced = 0
            while not exhausted and pool.has_room():
                job = next(it, StopIteration)
                if job is StopIteration:
                    exhausted = True
                elif job is None:
                    advanced += 1
                else:
                    pool.submit(job)
                if advanced >= 256:  # let the bar move while thousands of finished records are skipped
                    break
            if exhausted and pool.busy() == 0:
                progress.update(counts, advanced, force=True)
                break
            for job, res in (pool.poll(timeout=0.5) if pool.busy() else []):
                advanced += 1
                if res["ok"]:
                    _append(labels_path, res["entry"])
                    counts["computed"] += 1
                    summary.scf_seconds += res["entry"]["scf_seconds"]
                    e = res["entry"]
                    log.debug("%s: %d electrons, %.6f on the DFT grid, %.4f on the uniform grid; SCF %.1f s, grid %.1f s",
                              e["id"], e["n_electrons"], e.get("electrons_dft_grid", e.get("electrons_fft_mesh")),
                              e["electrons_uniform_grid"], e["scf_seconds"], e["grid_seconds"])
                else:
                    fail(job["file"], job["id"], res["reason"])
            progress.update(counts, advanced)
        clean = True
    finally:
        if clean:
            pool.close()
        else:
            pool.terminate()
            for stale in out.glob(".*.tmp.*"):
                stale.unlink(missing_ok=True)
        progress.close()
        if previous_handler is not None:
            signal.signal(signal.SIGTERM, previous_handler)
    summary.computed, summary.failed, summary.skipped = counts["computed"], counts["failed"], counts["skipped"]
    summary.seconds = time.monotonic() - t_start
    return summary


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
