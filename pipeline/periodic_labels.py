"""Valence-density labels of small crystals with PySCF's periodic DFT (``density_labels.crystals``).

A Kohn-Sham calculation of the cell with GTH pseudopotentials and a Gaussian basis
(``pyscf.pbc``, default PBE with GTH-PBE pseudopotentials and the GTH-DZVP basis, a 2x2x2
Gamma-centred Monkhorst-Pack k-mesh) gives k-point density matrices; their density is evaluated on a
uniform grid that spans the cell exactly (``n_a = ceil(|a_a| / spacing)`` points along lattice vector
``a_a``, origin at the cell's corner, the layout of a VASP CHGCAR) and written as ``<id>.CHGCAR``
(``rho * V`` in electrons, what VASP, pymatgen, ASE and VESTA read). The density is the pseudo
valence density: the core electrons the pseudopotential replaces are absent, as in a VASP CHGCAR,
so ``molmat preprocess`` reads these files as ``valence`` densities and a density model trains on
them with ``density.baseline=none``. Because a pseudo density has no nuclear cusp, a 0.25 bohr grid
integrates to the valence count within ~1e-6 (the comment line records both that sum and the sum
on PySCF's own FFT mesh).

Metals: set ``density_labels.smearing`` (Fermi-Dirac width, Hartree); an odd valence electron count
without smearing is refused (a closed-shell periodic calculation cannot hold it).

Measured on one core of the development machine: Si (mp-149, 2 atoms, 8 valence electrons) took
15 s with GTH-SZV at the Gamma point and 48 s with GTH-DZVP on a 2x2x2 k-mesh; bcc Li with its
3-electron GTH pseudopotential needs a 67^3 FFT mesh (its 1s semicore) and took 285 s with GTH-SZV
on 2x2x2. Hence "small cells": ``density_labels.max_cell_atoms`` (default 8) refuses larger ones
with a reason instead of starting a calculation of hours.
"""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import __version__
from pipeline.cube import BOHR_ANGSTROM

#: File suffix of a crystal's label (``molmat preprocess`` and :func:`pipeline.density_data.read_density`
#: recognise ``*.CHGCAR``).
CHGCAR_SUFFIX = ".CHGCAR"


def level_of_theory(settings: dict[str, Any]) -> str:
    """``PBE/gth-dzvp/gth-pbe k2x2x2`` (plus the smearing when used), for comment lines and logs."""
    kmesh = "x".join(str(int(k)) for k in settings["kmesh"])
    smear = f" fermi-smearing={settings['smearing']:g}Ha" if settings["smearing"] else ""
    return f"{settings['functional']}/{settings['crystal_basis']}/{settings['pseudo']} k{kmesh}{smear}"


def cell_grid_shape(lattice_angstrom: np.ndarray, spacing_bohr: float) -> np.ndarray:
    """(3,) int64 points along each lattice vector: ``ceil(|a| / spacing)`` (at least 1), so the step
    along every vector is at most ``spacing`` bohr."""
    lengths = np.linalg.norm(np.asarray(lattice_angstrom, dtype=np.float64).reshape(3, 3), axis=1) / BOHR_ANGSTROM
    return np.maximum(np.ceil(lengths / spacing_bohr - 1e-9), 1).astype(np.int64)


def label_crystal(job: dict[str, Any], settings: dict[str, Any], out_dir: str | Path) -> dict[str, Any]:
    """Periodic SCF of one crystal and its valence density as ``OUT/<name>.CHGCAR`` (atomically).

    Args:
        job: ``id``, ``name`` (file stem), ``file``, ``z`` (N,) list, ``pos`` (N, 3) list and ``cell``
            (3, 3) list of lattice rows, Angstrom.
        settings: a :class:`pipeline.config.DensityLabelsConfig` as a dict.
        out_dir: output directory.
    Returns:
        The labels.jsonl entry: electron counts, energy (Hartree per cell), timings, grid shape.
    Raises:
        pipeline.density_labels.LabelFailure: too many atoms, PySCF rejects the cell (unknown
            pseudopotential or basis for an element), an odd electron count without smearing, or no
            convergence.
    """
    import pyscf
    from pyscf.pbc import dft as pbc_dft
    from pyscf.pbc import gto as pbc_gto

    from pipeline.density_labels import LabelFailure, converge  # not at the top: density_labels imports this module

    out_dir = Path(out_dir)
    z = np.asarray(job["z"], dtype=np.int64)
    pos = np.asarray(job["pos"], dtype=np.float64).reshape(-1, 3)
    lattice = np.asarray(job["cell"], dtype=np.float64).reshape(3, 3)
    if len(z) > int(settings["max_cell_atoms"]):
        raise LabelFailure(f"{len(z)} atoms in the cell, more than density_labels.max_cell_atoms="
                           f"{settings['max_cell_atoms']} (periodic DFT of large cells takes hours)")
    try:
        cell = pbc_gto.Cell(atom=[[int(a), tuple(float(c) for c in p)] for a, p in zip(z, pos)], a=lattice,
                            unit="Angstrom", basis=settings["crystal_basis"], pseudo=settings["pseudo"], verbose=0)
        cell.build()
    except Exception as exc:  # PySCF raises KeyError/RuntimeError for an element without the basis or pseudo
        raise LabelFailure(f"PySCF could not build the cell ({type(exc).__name__}: {str(exc)[:200]})") from None
    if cell.nelectron % 2 and not settings["smearing"]:
        raise LabelFailure(f"{cell.nelectron} valence electrons (odd) need fractional occupations: set "
                           "density_labels.smearing (e.g. 0.01 Hartree)")
    kpts = cell.make_kpts([int(k) for k in settings["kmesh"]])
    mf = pbc_dft.KRKS(cell, kpts)
    mf.xc = settings["functional"]
    if settings["smearing"]:
        from pyscf.pbc.scf.addons import smearing_

        mf = smearing_(mf, sigma=float(settings["smearing"]), method="fermi")
    energy, scf_seconds = converge(mf, settings, "periodic SCF")
    t1 = time.perf_counter()
    dm = mf.make_rdm1()
    volume_bohr3 = float(cell.vol)
    electrons_fft = float(np.mean(mf.get_rho(dm)) * volume_bohr3)
    shape = cell_grid_shape(lattice, float(settings["spacing"]))
    values = cell_density(mf, dm, kpts, lattice, shape, int(settings["chunk_points"]))
    electrons_uniform = float(values.mean() * volume_bohr3)
    grid_seconds = time.perf_counter() - t1
    level = level_of_theory(settings)
    entry = {
        "id": job["id"], "file": job["file"], "chgcar": job["name"] + CHGCAR_SUFFIX, "n_atoms": int(len(z)),
        "n_electrons": int(cell.nelectron), "valence": True, "electrons_fft_mesh": round(electrons_fft, 6),
        "electrons_uniform_grid": round(electrons_uniform, 6), "energy_Ha": energy,
        "scf_seconds": round(scf_seconds, 2), "scf_cycles": getattr(mf, "cycles", None),
        "grid_seconds": round(grid_seconds, 2), "shape": [int(n) for n in shape], "level": level,
        "kpoints": int(len(kpts)), "pyscf": pyscf.__version__, "molmat": __version__,
    }
    comment = (f"molmat-density-labels id={job['id']} level={level.replace(' ', '_')} valence=1 "
               f"electrons={cell.nelectron} electrons_fft_mesh={electrons_fft:.6f} "
               f"electrons_uniform_grid={electrons_uniform:.6f} energy_Ha={energy:.10f} "
               f"scf_seconds={scf_seconds:.2f} spacing_bohr={settings['spacing']:g} molmat={__version__}")
    write_chgcar(out_dir / (job["name"] + CHGCAR_SUFFIX), z, pos, lattice, values, comment)
    return entry


def cell_density(mf: Any, dm: Any, kpts: np.ndarray, lattice_angstrom: np.ndarray, shape: np.ndarray,
                 chunk: int = 20000) -> np.ndarray:
    """Density of k-point density matrices at the fractional points ``(i/n1, j/n2, k/n3)`` of the cell.

    Args:
        mf: the converged ``pyscf.pbc`` KS object (its ``_numint`` evaluates Bloch orbitals).
        dm: (nk, n_ao, n_ao) density matrices. kpts: (nk, 3) k-points (1/bohr).
        lattice_angstrom: (3, 3) lattice rows. shape: (3,) points per lattice vector.
        chunk: points per evaluation (memory ~ ``chunk * n_ao * nk * 16`` bytes).
    Returns:
        (n1, n2, n3) float64 density, e/bohr^3 (averaged over the k-points, as PySCF does).
    """
    shape = tuple(int(n) for n in shape)
    frac = np.stack(np.meshgrid(*[np.arange(n) / n for n in shape], indexing="ij"), axis=-1).reshape(-1, 3)
    coords = frac @ (np.asarray(lattice_angstrom, dtype=np.float64) / BOHR_ANGSTROM)
    out = np.empty(len(coords), dtype=np.float64)
    ni = mf._numint
    for s in range(0, len(coords), chunk):
        ao = ni.eval_ao(mf.cell, coords[s:s + chunk], kpts)
        out[s:s + chunk] = ni.eval_rho(mf.cell, ao, dm, xctype="LDA", hermi=1)
    return out.reshape(shape)


def write_chgcar(path: Path, z: np.ndarray, pos: np.ndarray, lattice: np.ndarray, values: np.ndarray,
                 comment: str) -> None:
    """Write a density (e/bohr^3 on the cell's fractional grid) as a VASP CHGCAR, atomically.

    VASP's convention is ``rho * V`` with rho in e/Angstrom^3 and V the cell volume in Angstrom^3;
    :func:`pipeline.density_data.read_chgcar` undoes exactly that. The file appears under its final
    name only when complete (written to a hidden temporary name in the same directory, then renamed).
    Its first line carries ``comment``; :func:`pipeline.density_labels.label_comments` reads it back.

    Args:
        z: (N,) atomic numbers. pos: (N, 3) Cartesian positions, Angstrom. lattice: (3, 3) rows, Angstrom.
        values: (n1, n2, n3) e/bohr^3. comment: the first line (POSCAR title) of the file.
    """
    from pymatgen.core import Lattice, Structure
    from pymatgen.io.vasp.inputs import Poscar
    from pymatgen.io.vasp.outputs import Chgcar

    structure = Structure(Lattice(lattice), [int(a) for a in z], pos, coords_are_cartesian=True)
    volume = abs(float(np.linalg.det(lattice)))
    chg = Chgcar(Poscar(structure, comment=comment), {"total": np.asarray(values) / BOHR_ANGSTROM ** 3 * volume})
    chg.name = comment  # pymatgen's writer takes the first line from here, not from the Poscar
    tmp = path.with_name(f".{path.name}.tmp.{os.getpid()}")
    try:
        chg.write_file(str(tmp))
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()

