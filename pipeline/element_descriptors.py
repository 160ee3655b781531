"""Physical descriptors of the elements, for atom embeddings that start from chemistry.

A learned embedding per atomic number knows nothing of the periodic table until training has
shown it every element often enough; in a 20-minute crystal budget (about 14 epochs of MP) rare
elements stay close to their random start. CGCNN and ALIGNN start each atom from tabulated
element properties instead (group, period, electronegativity, radius, valence electrons,
ionisation energy, electron affinity, block, volume). This module owns that table for molmat: a
``(MAX_Z + 1, D)`` float32 array, row ``z`` the standardised descriptors of element ``z`` (row 0,
no element, is zero), read by :class:`pipeline.models.painn.PaiNN` when
``PaiNNConfig.element_descriptors`` is on.

The values are pymatgen's (``pymatgen.core.periodic_table.Element``, from its
``periodic_table.json``: CRC Handbook, WebElements and NIST data, MIT licence), frozen into
:data:`TABLE` so that a saved model does not change with the pymatgen release it is loaded under,
and so that model code never imports pymatgen. The shipped table was made with::

    python -m pipeline.element_descriptors --out pipeline/data/element_descriptors.csv

and ``tests/test_element_descriptors.py`` rebuilds it from the installed pymatgen and checks a few
entries against textbook values. Columns (:data:`COLUMNS`):

- ``period``, ``group`` (1-18; lanthanides and actinides 3);
- ``electronegativity`` (Pauling), ``ionization_energy_eV`` (first), ``electron_affinity_eV``;
- ``atomic_radius_A`` (empirical), ``log_molar_volume`` (log of cm^3/mol);
- ``mendeleev_number`` (Pettifor's chemical scale);
- ``valence_s``, ``valence_p``, ``valence_d``, ``valence_f``: electrons in the outermost s and p
  shells, the (n-1) d and (n-2) f shells of the ground-state configuration;
- ``block_s``, ``block_p``, ``block_d``, ``block_f``: one-hot block.

Continuous columns are standardised over Z = 1..MAX_Z (mean 0, standard deviation 1); a property
pymatgen does not have for an element (the noble gases' electronegativity, say) is the mean, 0,
and its ``*_missing`` indicator column is 1, so the model can tell "average" from "unknown".
"""
from __future__ import annotations

import argparse
import csv
import math
from pathlib import Path

import numpy as np

from pipeline import MolmatError
from pipeline.elements import element_symbol

#: The shipped descriptor table.
TABLE = Path(__file__).resolve().parent / "data" / "element_descriptors.csv"
#: Descriptors that are standardised and may be missing (each gets a ``*_missing`` column).
CONTINUOUS = ("period", "group", "electronegativity", "ionization_energy_eV", "electron_affinity_eV",
              "atomic_radius_A", "log_molar_volume", "mendeleev_number",
              "valence_s", "valence_p", "valence_d", "valence_f")
#: One-hot block columns (never missing).
BLOCKS = ("block_s", "block_p", "block_d", "block_f")
#: Every column of the table, in order.
COLUMNS = CONTINUOUS + BLOCKS + tuple(f"{c}_missing" for c in CONTINUOUS)


def _valence_counts(structure: list[tuple[int, str, int]]) -> tuple[int, int, int, int]:
    """Electrons in the outermost s and p shells, the (n-1) d and the (n-2) f shell.

    ``structure`` is pymatgen's ``full_electronic_structure``: ``(n, "s"|"p"|"d"|"f", electrons)``.
    """
    n_max = max(n for n, _, _ in structure)
    want = {"s": n_max, "p": n_max, "d": n_max - 1, "f": n_max - 2}
    counts = {l: 0 for l in want}
    for n, l, e in structure:
        if l in want and n == want[l]:
            counts[l] += int(e)
    return counts["s"], counts["p"], counts["d"], counts["f"]


def _raw_properties(z: int) -> dict[str, float]:
    """Unstandardised descriptors of element ``z`` from the installed pymatgen (NaN where unknown)."""
    import warnings

    from pymatgen.core.periodic_table import Element

    el = Element(element_symbol(z))

    def get(f) -> float:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pymatgen warns for every property it lacks
            try:
                x = f()
            except (ValueError, TypeError, AttributeError, KeyError):
                return math.nan
        return math.nan if x is None else float(x)

    group = 3 if el.is_lanthanoid or el.is_actinoid else el.group
    s, p, d, f = _valence_counts(el.full_electronic_structure)
    block = el.block
    volume = get(lambda: el.molar_volume)
    return {
        "period": float(el.row), "group": float(group),
        "electronegativity": get(lambda: el.X),
        "ionization_energy_eV": get(lambda: el.ionization_energy),
        "electron_affinity_eV": get(lambda: el.electron_affinity),
        "atomic_radius_A": get(lambda: el.atomic_radius),
        "log_molar_volume": math.log(volume) if volume > 0 else math.nan,
        "mendeleev_number": get(lambda: el.mendeleev_no),
        "valence_s": float(s), "valence_p": float(p), "valence_d": float(d), "valence_f": float(f),
        **{f"block_{b}": float(block == b) for b in "spdf"},
    }


def build_table(max_z: int | None = None) -> np.ndarray:
    """Descriptor table from the installed pymatgen.

    Args:
        max_z: last element (default ``pipeline.featurize.MAX_Z``).
    Returns:
        (max_z + 1, len(COLUMNS)) float64; row 0 zeros, row z element z, columns :data:`COLUMNS`.
    """
    if max_z is None:
        from pipeline.featurize import MAX_Z as max_z
    raw = [_raw_properties(z) for z in range(1, max_z + 1)]
    table = np.zeros((max_z + 1, len(COLUMNS)))
    for j, name in enumerate(CONTINUOUS):
        col = np.array([r[name] for r in raw])
        known = ~np.isnan(col)
        mean, std = col[known].mean(), col[known].std()
        table[1:, j] = np.where(known, (col - mean) / (std if std > 0 else 1.0), 0.0)
        table[1:, COLUMNS.index(f"{name}_missing")] = (~known).astype(float)
    for name in BLOCKS:
        table[1:, COLUMNS.index(name)] = [r[name] for r in raw]
    return table


def write_table(table: np.ndarray, path: Path) -> None:
    """Write a table of :func:`build_table` as CSV: a ``symbol`` column, then :data:`COLUMNS`
    (row 0 is not written; it is all zeros)."""
    with open(path, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(("symbol",) + COLUMNS)
        for z in range(1, table.shape[0]):
            w.writerow([element_symbol(z)] + [f"{x:.6g}" for x in table[z]])


def load_table(path: Path = TABLE) -> np.ndarray:
    """The descriptor table of a CSV written by :func:`write_table`.

    Returns:
        (MAX_Z + 1, len(COLUMNS)) float32; row 0 zeros, row z element z.
    Raises:
        MolmatError: the file's columns or element order are not the ones this code expects,
            or it does not cover every element up to ``MAX_Z``.
    """
    from pipeline.featurize import MAX_Z

    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    if not rows or tuple(rows[0]) != ("symbol",) + COLUMNS:
        raise MolmatError(f"{path}: header is not 'symbol' followed by {', '.join(COLUMNS)}")
    if len(rows) - 1 < MAX_Z:
        raise MolmatError(f"{path}: {len(rows) - 1} elements, fewer than the {MAX_Z} molmat supports")
    table = np.zeros((MAX_Z + 1, len(COLUMNS)), dtype=np.float32)
    for z in range(1, MAX_Z + 1):
        row = rows[z]
        if row[0] != element_symbol(z) or len(row) != len(COLUMNS) + 1:
            raise MolmatError(f"{path}: line {z + 1} should describe {element_symbol(z)} with "
                              f"{len(COLUMNS)} values, found {row[0]!r} with {len(row) - 1}")
        table[z] = [float(x) for x in row[1:]]
    if not np.isfinite(table).all():
        raise MolmatError(f"{path}: a descriptor is not a finite number")
    return table


def main(argv: list[str] | None = None) -> None:
    """``python -m pipeline.element_descriptors --out FILE``: rebuild the table from pymatgen."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=TABLE)
    args = ap.parse_args(argv)
    write_table(build_table(), args.out)
    print(f"wrote {args.out} ({len(COLUMNS)} descriptors)")


if __name__ == "__main__":
    main()
