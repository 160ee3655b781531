"""The element descriptor table: shipped file against pymatgen and textbook values, and its reader's errors."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pipeline import MolmatError
from pipeline.element_descriptors import COLUMNS, _raw_properties, build_table, load_table
from pipeline.elements import atomic_number
from pipeline.featurize import MAX_Z


def test_shipped_table_is_what_the_installed_pymatgen_gives() -> None:
    shipped = load_table()
    assert shipped.shape == (MAX_Z + 1, len(COLUMNS)) and shipped.dtype == np.float32
    np.testing.assert_allclose(shipped, build_table(), rtol=1e-5, atol=1e-5)
    assert not shipped[0].any()


@pytest.mark.parametrize("symbol, expected", [
    # textbook values (CRC Handbook): period, group, Pauling electronegativity, first ionisation
    # energy (eV), ground-state valence configuration
    ("O", dict(period=2, group=16, electronegativity=3.44, ionization_energy_eV=13.618, valence_s=2, valence_p=4,
               valence_d=0, valence_f=0, block_p=1)),
    ("Na", dict(period=3, group=1, electronegativity=0.93, ionization_energy_eV=5.139, valence_s=1, valence_p=0,
                block_s=1)),
    ("Fe", dict(period=4, group=8, electronegativity=1.83, ionization_energy_eV=7.902, valence_s=2, valence_d=6,
                block_d=1)),
    ("Zn", dict(period=4, group=12, electronegativity=1.65, valence_s=2, valence_d=10)),
    ("Gd", dict(period=6, group=3, valence_s=2, valence_d=1, valence_f=7, block_f=1)),
    ("U", dict(period=7, group=3, valence_s=2, valence_d=1, valence_f=3, block_f=1)),
])
def test_raw_descriptors_match_textbook_values(symbol: str, expected: dict) -> None:
    got = _raw_properties(atomic_number(symbol))
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, abs=2e-3), (symbol, key)


def test_standardised_columns_and_missing_indicators() -> None:
    table = load_table()[1:]
    for name in ("electronegativity", "ionization_energy_eV", "mendeleev_number"):
        j, miss = COLUMNS.index(name), COLUMNS.index(f"{name}_missing")
        known = table[:, miss] == 0
        assert table[known, j].mean() == pytest.approx(0.0, abs=1e-4)
        assert table[known, j].std() == pytest.approx(1.0, abs=1e-4)
        assert (table[~known, j] == 0).all()
    # argon has no Pauling electronegativity: "unknown", not a value
    ar = load_table()[atomic_number("Ar")]
    assert ar[COLUMNS.index("electronegativity_missing")] == 1
    blocks = table[:, [COLUMNS.index(f"block_{b}") for b in "spdf"]]
    assert (blocks.sum(axis=1) == 1).all()


def test_a_damaged_table_is_refused_with_its_line(tmp_path: Path) -> None:
    lines = Path(__file__).resolve().parents[1].joinpath("pipeline/data/element_descriptors.csv").read_text().splitlines()
    swapped = tmp_path / "swapped.csv"
    swapped.write_text("\n".join([lines[0], lines[2], lines[1]] + lines[3:]) + "\n")
    with pytest.raises(MolmatError, match=r"swapped.csv: line 2 should describe H"):
        load_table(swapped)
    short = tmp_path / "short.csv"
    short.write_text("\n".join(lines[:50]) + "\n")
    with pytest.raises(MolmatError, match="fewer than"):
        load_table(short)
    nan = tmp_path / "nan.csv"
    nan.write_text("\n".join(lines[:5] + [lines[5].replace(",", ",nan,", 1).rsplit(",", 1)[0]] + lines[6:]) + "\n")
    with pytest.raises(MolmatError, match="not a finite number"):
        load_table(nan)
