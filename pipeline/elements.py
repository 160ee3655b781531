"""Element symbols by atomic number, without RDKit or pymatgen.

Shards, statistics and prediction warnings name elements; importing RDKit (or pymatgen) only
for that costs every reader of a shard directory a second and a hundred MiB. The table is the
IUPAC one (the same symbols as RDKit's periodic table, which a test checks).
"""
from __future__ import annotations

#: Symbols of Z = 1..118; ``SYMBOLS[z - 1]`` is element ``z``.
SYMBOLS: tuple[str, ...] = (
    "H", "He", "Li", "Be", "B", "C", "N", "O", "F", "Ne", "Na", "Mg", "Al", "Si", "P", "S", "Cl", "Ar",
    "K", "Ca", "Sc", "Ti", "V", "Cr", "Mn", "Fe", "Co", "Ni", "Cu", "Zn", "Ga", "Ge", "As", "Se", "Br",
    "Kr", "Rb", "Sr", "Y", "Zr", "Nb", "Mo", "Tc", "Ru", "Rh", "Pd", "Ag", "Cd", "In", "Sn", "Sb", "Te",
    "I", "Xe", "Cs", "Ba", "La", "Ce", "Pr", "Nd", "Pm", "Sm", "Eu", "Gd", "Tb", "Dy", "Ho", "Er", "Tm",
    "Yb", "Lu", "Hf", "Ta", "W", "Re", "Os", "Ir", "Pt", "Au", "Hg", "Tl", "Pb", "Bi", "Po", "At", "Rn",
    "Fr", "Ra", "Ac", "Th", "Pa", "U", "Np", "Pu", "Am", "Cm", "Bk", "Cf", "Es", "Fm", "Md", "No", "Lr",
    "Rf", "Db", "Sg", "Bh", "Hs", "Mt", "Ds", "Rg", "Cn", "Nh", "Fl", "Mc", "Lv", "Ts", "Og",
)

_NUMBERS = {s: z for z, s in enumerate(SYMBOLS, start=1)}


def element_symbol(z: int) -> str:
    """Symbol of atomic number ``z`` (1..118), e.g. ``element_symbol(26) == "Fe"``.

    Raises:
        ValueError: ``z`` is not an atomic number of the table.
    """
    z = int(z)
    if not 1 <= z <= len(SYMBOLS):
        raise ValueError(f"no element with atomic number {z} (expected 1..{len(SYMBOLS)})")
    return SYMBOLS[z - 1]


def atomic_number(symbol: str) -> int:
    """Atomic number of an element symbol (case-sensitive, ``"Fe"`` -> 26).

    Raises:
        ValueError: not a symbol of the table.
    """
    try:
        return _NUMBERS[symbol]
    except KeyError:
        raise ValueError(f"unknown element symbol {symbol!r}") from None
