"""Free-atom densities and the promolecule: the superposition of spherical neutral atoms.

A density model that learns ``rho = promolecule + correction`` only has to learn the deformation
density (bonds, lone pairs, charge transfer), which is smaller and smoother than the total density:
the nuclear cusps, 1e2 e/bohr^3 and most of the sum that NMAE divides by, belong to the atoms.

The free-atom densities are PySCF calculations, never typed-in numbers: for each element a
spherically averaged, spin-restricted Kohn-Sham atom (``pyscf.scf.atom_ks.AtomSphAverageRKS``:
fractional occupations averaged over each open shell, as in PySCF's
superposition-of-atomic-densities guess) at the level of theory of the labels, PBE/def2-SVP by
default, exact Coulomb (no density fitting), XC grid of 200 radial x 590 angular points,
``conv_tol`` 1e-11 Hartree. Its density and radial derivative (both analytic, from the basis
functions) are tabulated on the radii ``r_k = a (exp(b k) - 1)`` (:data:`GRID_A`, :data:`GRID_B`:
0.002 bohr apart at the nucleus, 0.16 bohr at 8 bohr) out to :data:`RADIUS_BOHR`, and interpolated
by cubic Hermite polynomials in ``log rho``: within 1e-6 relative of PySCF's value at every radius
for H-F (the free Gaussian-basis density needs no cusp handling, it is smooth at the nucleus).
Beyond 8 bohr every H-F density is below 1.2e-9 e/bohr^3 and holds under 1e-6 electrons, so the
table stops there (the promolecule is exactly zero further out).

The shipped table (:data:`TABLE`, H, C, N, O, F: every element of QM9) was made with::

    python -m pipeline.promolecule --elements H,C,N,O,F --out pipeline/data/free_atoms_pbe_def2svp.npz

(about a second on one core; ``tests/test_density_model.py`` recomputes H and C and compares). Other
elements or levels of theory: the same command with ``--elements``, ``--functional``, ``--basis``
and ``density.promolecule_table`` pointing at the new file.

Units: radii in bohr inside the table, positions in Angstrom at the interface (as everywhere in
molmat), densities in e/bohr^3.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline import MolmatError
from pipeline.cube import BOHR_ANGSTROM
from pipeline.elements import atomic_number, element_symbol

#: The shipped free-atom table (PBE/def2-SVP, H C N O F).
TABLE = Path(__file__).resolve().parent / "data" / "free_atoms_pbe_def2svp.npz"
#: Radial grid ``r_k = GRID_A * (exp(GRID_B * k) - 1)`` (bohr): dense where the core density
#: changes fast, sparse in the tails. 221 radii reach 8.05 bohr; cubic Hermite interpolation of
#: log(rho) on them is within 1e-6 relative of PySCF's value for H-F (a = 0.5 bohr: 4e-4).
GRID_A = 0.1
GRID_B = 0.02
#: Radius (bohr) the tables reach at least: every H-F density is below 1.2e-9 e/bohr^3 there.
RADIUS_BOHR = 8.0


@dataclass
class FreeAtomTable:
    """Spherical free-atom densities on the radial grid ``r_k = a (exp(b k) - 1)``.

    Attributes:
        z: (n,) int64 atomic numbers, ascending.
        a, b: the grid's scale (bohr) and log step; ``t = log1p(r / a) / b`` is the grid coordinate.
        rho: (n, K) float64 densities (e/bohr^3), all > 0, at ``r_0 = 0 .. r_{K-1}``.
        drho: (n, K) float64 radial derivatives d rho / dr (e/bohr^4), 0 at the nucleus.
        functional, basis: the level of theory (PySCF names).
        note: how it was made (PySCF version, settings), for the record.
    """

    z: np.ndarray
    a: float
    b: float
    rho: np.ndarray
    drho: np.ndarray
    functional: str
    basis: str
    note: str = ""

    def __post_init__(self) -> None:
        self.z = np.asarray(self.z, dtype=np.int64).reshape(-1)
        self.rho = np.asarray(self.rho, dtype=np.float64)
        self.drho = np.asarray(self.drho, dtype=np.float64)
        if self.rho.ndim != 2 or self.rho.shape[0] != len(self.z) or self.rho.shape[1] < 2:
            raise ValueError(f"rho must be (n elements, K >= 2) for {len(self.z)} elements, got {self.rho.shape}")
        if self.drho.shape != self.rho.shape:
            raise ValueError(f"drho has shape {self.drho.shape}, rho {self.rho.shape}")
        if not (np.isfinite(self.rho).all() and (self.rho > 0).all() and np.isfinite(self.drho).all()):
            raise ValueError("free-atom densities must be finite and positive (log interpolation)")
        if not np.all(np.diff(self.z) > 0):
            raise ValueError(f"atomic numbers must be ascending and unique, got {self.z.tolist()}")

    @property
    def radii_bohr(self) -> np.ndarray:
        """(K,) the grid radii r_k, bohr."""
        return self.a * np.expm1(self.b * np.arange(self.rho.shape[1]))

    @property
    def radius_bohr(self) -> float:
        """Last tabulated radius (bohr); the density is zero beyond it."""
        return float(self.radii_bohr[-1])

    @property
    def radius_angstrom(self) -> float:
        """Last tabulated radius in Angstrom."""
        return self.radius_bohr * BOHR_ANGSTROM

    def log_nodes(self) -> tuple[np.ndarray, np.ndarray]:
        """(n, K) log(rho) and its derivative in the grid coordinate, d log(rho) / dt = rho'/rho * b (r + a)."""
        return np.log(self.rho), self.drho / self.rho * self.b * (self.radii_bohr + self.a)

    def symbols(self) -> list[str]:
        """Element symbols of the rows."""
        return [element_symbol(int(z)) for z in self.z]

    def rows(self, z: np.ndarray) -> np.ndarray:
        """Row of each atomic number (any shape); -1 where the table has no such element."""
        lookup = np.full(max(int(self.z.max()), int(np.max(z, initial=0))) + 1, -1, dtype=np.int64)
        lookup[self.z] = np.arange(len(self.z))
        return lookup[np.asarray(z, dtype=np.int64)]

    def missing(self, z: np.ndarray) -> list[str]:
        """Symbols of the elements among ``z`` that the table lacks (sorted by Z)."""
        have = set(self.z.tolist())
        return [element_symbol(int(x)) for x in np.unique(np.asarray(z, dtype=np.int64)) if int(x) not in have]

    def density(self, z: np.ndarray, r_bohr: np.ndarray) -> np.ndarray:
        """Free-atom density of element ``z`` at radius ``r_bohr`` (broadcast; e/bohr^3).

        Cubic Hermite interpolation of log(rho) in the grid coordinate; zero beyond :attr:`radius_bohr`.

        Raises:
            MolmatError: an element the table lacks.
        """
        z, r = np.broadcast_arrays(np.asarray(z, dtype=np.int64), np.asarray(r_bohr, dtype=np.float64))
        rows = self.rows(z)
        if (rows < 0).any():
            raise MolmatError(f"no free-atom density for {', '.join(self.missing(z[rows < 0]))} in the promolecule "
                              f"table ({', '.join(self.symbols())}); make one with python -m pipeline.promolecule")
        log_rho, dlog = self.log_nodes()
        t = np.log1p(np.maximum(r, 0.0) / self.a) / self.b
        k = np.minimum(np.floor(t).astype(np.int64), self.rho.shape[1] - 2)
        w = t - k
        w2, w3 = w * w, w * w * w
        value = np.exp((2 * w3 - 3 * w2 + 1) * log_rho[rows, k] + (w3 - 2 * w2 + w) * dlog[rows, k]
                       + (3 * w2 - 2 * w3) * log_rho[rows, k + 1] + (w3 - w2) * dlog[rows, k + 1])
        return np.where(r <= self.radius_bohr, value, 0.0)

    def electrons(self) -> np.ndarray:
        """(n,) electrons of each tabulated atom: ``4 pi int r^2 rho dr`` (bohr), by Simpson's rule
        in the grid coordinate on the interpolated density, 8 points per grid interval."""
        t = np.linspace(0.0, self.rho.shape[1] - 1, 8 * (self.rho.shape[1] - 1) + 1)
        r = self.a * np.expm1(self.b * t)
        dr_dt = self.b * (r + self.a)
        f = np.stack([4 * np.pi * r ** 2 * self.density(np.full(len(r), z), r) * dr_dt for z in self.z])
        h = t[1] - t[0]
        return h / 3.0 * (f[:, 0] + f[:, -1] + 4.0 * f[:, 1:-1:2].sum(axis=1) + 2.0 * f[:, 2:-1:2].sum(axis=1))


# ------------------------------------------------------------------------------------ making
def free_atom_density(symbol: str, r_bohr: np.ndarray, functional: str = "PBE", basis: str = "def2-SVP"
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Density of a spherically averaged, spin-restricted neutral atom at radii ``r_bohr`` (PySCF).

    Args:
        symbol: element symbol.
        r_bohr: (K,) radii, bohr.
        functional, basis: level of theory (PySCF names).
    Returns:
        (K,) float64 density (e/bohr^3) and (K,) its radial derivative (e/bohr^4), both analytic
        from the basis functions, evaluated along +x (the averaged atom is spherical to 1e-13).
    Raises:
        MolmatError: PySCF is missing or the atomic SCF does not converge.
    """
    try:
        from pyscf import gto
        from pyscf.dft import numint
        from pyscf.scf import atom_ks
    except ImportError:
        raise MolmatError("free-atom densities need PySCF: pip install molmat[density]") from None
    z = atomic_number(symbol)
    mol = gto.M(atom=[[symbol, (0.0, 0.0, 0.0)]], basis=basis, spin=z % 2, verbose=0)
    mf = atom_ks.AtomSphAverageRKS(mol)
    mf.xc = functional
    mf.grids.atom_grid = (200, 590)
    mf.conv_tol = 1e-11
    mf.verbose = 0
    mf.kernel()
    if not mf.converged:
        raise MolmatError(f"the spherical {symbol} atom ({functional}/{basis}) did not converge")
    points = np.zeros((len(r_bohr), 3))
    points[:, 0] = r_bohr
    rho = numint.eval_rho(mol, numint.eval_ao(mol, points, deriv=1), mf.make_rdm1(), xctype="GGA")
    return np.asarray(rho[0], dtype=np.float64), np.asarray(rho[1], dtype=np.float64)


def generate_table(elements: list[str], functional: str = "PBE", basis: str = "def2-SVP", a: float = GRID_A,
                   b: float = GRID_B, radius_bohr: float = RADIUS_BOHR) -> FreeAtomTable:
    """Compute a :class:`FreeAtomTable` with PySCF (:func:`free_atom_density` for each element).

    The grid has the fewest radii ``a (exp(b k) - 1)`` that reach ``radius_bohr``.
    """
    import pyscf

    zs = sorted({atomic_number(e) for e in elements})
    k = int(np.ceil(np.log1p(radius_bohr / a) / b - 1e-9)) + 1
    r = a * np.expm1(b * np.arange(k))
    t0 = time.time()
    rho, drho = zip(*(free_atom_density(element_symbol(z), r, functional, basis) for z in zs))
    note = (f"pyscf {pyscf.__version__} AtomSphAverageRKS (spherically averaged, spin-restricted, fractional "
            f"occupation), exact Coulomb, XC grid (200, 590), conv_tol 1e-11; {time.time() - t0:.1f} s")
    return FreeAtomTable(np.array(zs), a, b, np.stack(rho), np.stack(drho), functional, basis, note)


def save_table(table: FreeAtomTable, path: str | Path) -> Path:
    """Write a table as ``.npz`` (plain arrays and strings, no pickle)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, z=table.z, a=np.float64(table.a), b=np.float64(table.b), rho=table.rho,
                        drho=table.drho, functional=np.str_(table.functional), basis=np.str_(table.basis),
                        note=np.str_(table.note))
    return path


def load_table(path: str | Path | None = None) -> FreeAtomTable:
    """Read a table written by :func:`save_table` (default: the shipped :data:`TABLE`).

    Raises:
        MolmatError: a missing or unreadable file, naming it.
    """
    path = Path(path) if path else TABLE
    try:
        with np.load(path, allow_pickle=False) as f:
            return FreeAtomTable(f["z"], float(f["a"]), float(f["b"]), f["rho"], f["drho"], str(f["functional"]),
                                 str(f["basis"]), str(f["note"]))
    except FileNotFoundError:
        raise MolmatError(f"{path}: no such free-atom table (python -m pipeline.promolecule makes one)") from None
    except (KeyError, ValueError, OSError) as exc:
        raise MolmatError(f"{path}: not a free-atom table ({str(exc).splitlines()[0][:200]})") from None


# ----------------------------------------------------------------------------- promolecule
def promolecule_density(table: FreeAtomTable, z: np.ndarray, atom_pos: np.ndarray, points: np.ndarray,
                        cell: np.ndarray | None = None) -> np.ndarray:
    """The promolecule at points: the sum of the free-atom densities of every atom (and image).

    Args:
        table: free-atom densities.
        z: (N,) atomic numbers; atom_pos: (N, 3) Angstrom.
        points: (P, 3) Angstrom.
        cell: (3, 3) lattice rows (Angstrom) for a crystal (every periodic image counts), or None.
    Returns:
        (P,) float64 density, e/bohr^3.
    """
    from pipeline.neighbours import radius_search

    probe, atom, _, dist = radius_search(points, atom_pos, table.radius_angstrom, cell, tol=0.0)
    rho = table.density(np.asarray(z)[atom], dist / BOHR_ANGSTROM)
    return np.bincount(probe, weights=rho, minlength=len(points))


def main(argv: list[str] | None = None) -> int:
    """``python -m pipeline.promolecule --elements H,C,N,O,F --out FILE.npz``."""
    parser = argparse.ArgumentParser(prog="python -m pipeline.promolecule",
                                     description="Tabulate spherical free-atom densities with PySCF.")
    parser.add_argument("--elements", default="H,C,N,O,F", help="comma-separated element symbols")
    parser.add_argument("--functional", default="PBE")
    parser.add_argument("--basis", default="def2-SVP")
    parser.add_argument("--out", default=str(TABLE), help="output .npz (default: the shipped table)")
    args = parser.parse_args(argv)
    table = generate_table([e.strip() for e in args.elements.split(",") if e.strip()], args.functional, args.basis)
    save_table(table, args.out)
    counts = ", ".join(f"{s} {n:.6f}" for s, n in zip(table.symbols(), table.electrons()))
    print(f"wrote {args.out}: {table.functional}/{table.basis}, {table.rho.shape[1]} radii to {table.radius_bohr:.3f} bohr; "
          f"electrons {counts}; {table.note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
