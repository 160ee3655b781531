"""Readers for raw molecule and crystal files.

Each format has one function that takes an input path (and an optional labels CSV) and returns a
:class:`SourceReader`: the targets the source declares (name and unit) and a lazy iterator of
:class:`RawRecord`. Readers only split inputs into records (text or plain dicts); parsing into
atoms and bonds happens in :mod:`pipeline.featurize`, inside worker processes. Nothing here
collects a whole dataset in memory, except the plain JSON list format, which the JSON standard
library can only load whole (use JSON Lines for very large sets).

The table :data:`FORMATS` maps a format name to its reader and the kind of record it holds
(the one place that knows which formats hold molecules and which crystals);
:func:`detect_format` picks one from file names.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import re
import tarfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from pipeline import MolmatError
from pipeline.records import CRYSTAL, MOLECULE

#: QM9 line-2 properties in file order: (canonical target name, unit). Names carry the unit.
QM9_PROPERTIES: list[tuple[str, str]] = [
    ("A_GHz", "GHz"), ("B_GHz", "GHz"), ("C_GHz", "GHz"), ("mu_D", "D"), ("alpha_bohr3", "bohr^3"),
    ("homo_Ha", "Ha"), ("lumo_Ha", "Ha"), ("gap_Ha", "Ha"), ("r2_bohr2", "bohr^2"), ("zpve_Ha", "Ha"),
    ("U0_Ha", "Ha"), ("U_Ha", "Ha"), ("H_Ha", "Ha"), ("G_Ha", "Ha"), ("Cv_calmolK", "cal/(mol K)"),
]

#: Column names of the MoleculeNet/PyG ``gdb9.sdf.csv`` layout mapped to the QM9 xyz names,
#: so that a model trained on one QM9 layout evaluates on the other.
QM9_CSV_COLUMNS: dict[str, tuple[str, str]] = {
    "A": ("A_GHz", "GHz"), "B": ("B_GHz", "GHz"), "C": ("C_GHz", "GHz"), "mu": ("mu_D", "D"),
    "alpha": ("alpha_bohr3", "bohr^3"), "homo": ("homo_Ha", "Ha"), "lumo": ("lumo_Ha", "Ha"),
    "gap": ("gap_Ha", "Ha"), "r2": ("r2_bohr2", "bohr^2"), "zpve": ("zpve_Ha", "Ha"),
    "u0": ("U0_Ha", "Ha"), "u298": ("U_Ha", "Ha"), "h298": ("H_Ha", "Ha"), "g298": ("G_Ha", "Ha"),
    "cv": ("Cv_calmolK", "cal/(mol K)"), "u0_atom": ("U0_atom_kcalmol", "kcal/mol"),
    "u298_atom": ("U_atom_kcalmol", "kcal/mol"), "h298_atom": ("H_atom_kcalmol", "kcal/mol"),
    "g298_atom": ("G_atom_kcalmol", "kcal/mol"),
}

# Unit suffixes recognised in label column names (``band_gap_eV`` -> eV).
_UNIT_SUFFIXES = {
    "eV": "eV", "meV": "meV", "Ha": "Ha", "GPa": "GPa", "A3": "Angstrom^3", "muB": "mu_B",
    "D": "D", "K": "K", "kcalmol": "kcal/mol", "bohr3": "bohr^3", "bohr2": "bohr^2", "GHz": "GHz",
}
_QM8_COLUMN = re.compile(r"^(E|f)\d-(CC2|PBE0|PBE0-def2TZVP|CAM)$")
_ID_COLUMNS = ("mp_id", "material_id", "id", "mol_id", "name", "cif_id")


@dataclass
class RawRecord:
    """One unparsed structure, small enough to send to a worker process.

    Attributes:
        source: the file it came from (``archive::member`` for archive members).
        rid: record id (QM9 index, mp-id, row number, ...).
        kind: ``"molecule"`` or ``"crystal"``.
        fmt: payload type: ``xyz``, ``molblock``, ``smiles``, ``cif`` or ``pymatgen``.
        data: the payload (text, or a pymatgen structure dict).
        labels: raw label values by target name (strings or numbers, converted later).
    """

    source: str
    rid: str
    kind: str
    fmt: str
    data: Any
    labels: dict[str, Any] = field(default_factory=dict)


@dataclass
class SourceReader:
    """A source's declared targets and its lazy record stream.

    Attributes:
        path: the input path.
        fmt: format name (a key of :data:`FORMATS`).
        targets: (name, unit) for every label the source provides, in file order.
        records: callable returning a fresh iterator over :class:`RawRecord`.
        files: files whose bytes define the dataset (hashed into the manifest).
    """

    path: Path
    fmt: str
    targets: list[tuple[str, str]]
    records: Callable[[], Iterator[RawRecord]]
    files: list[Path]


def infer_unit(name: str) -> str:
    """Guess a label's unit from its column name; ``"unknown"`` when nothing matches."""
    if _QM8_COLUMN.match(name):
        return "Ha" if name.startswith("E") else "dimensionless"
    suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
    if suffix in _UNIT_SUFFIXES:
        per_atom = "per_atom" in name and suffix in ("eV", "meV", "Ha")
        return _UNIT_SUFFIXES[suffix] + ("/atom" if per_atom else "")
    if name in ("poisson_ratio",):
        return "dimensionless"
    return "unknown"


def _open_text(path: Path) -> io.TextIOBase:
    """Open a plain or gzip-compressed text file."""
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return open(path, encoding="utf-8", newline="")


def _is_archive(path: Path) -> bool:
    name = path.name.lower()
    return path.is_file() and (name.endswith((".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz")))


def _iter_members(path: Path, suffix: str) -> Iterator[tuple[str, str, str]]:
    """Yield ``(source, stem, text)`` for files ending in ``suffix`` in a directory or tar archive.

    Directories are walked in sorted order; archives are streamed in their stored order, so
    neither is held in memory and the order is deterministic for given input bytes.
    """
    if path.is_dir():
        for f in sorted(path.rglob(f"*{suffix}")):
            yield str(f), f.name[: -len(suffix)], f.read_text(encoding="utf-8", errors="replace")
        return
    if _is_archive(path):
        with tarfile.open(path, mode="r|*") as tar:
            for member in tar:
                if not member.isfile() or not member.name.endswith(suffix):
                    continue
                fh = tar.extractfile(member)
                if fh is None:
                    continue
                text = fh.read().decode("utf-8", errors="replace")
                base = member.name.rsplit("/", 1)[-1]
                yield f"{path}::{member.name}", base[: -len(suffix)], text
        return
    if path.is_file():
        yield str(path), path.name[: -len(suffix)] if path.name.endswith(suffix) else path.stem, path.read_text(
            encoding="utf-8", errors="replace")
        return
    raise MolmatError(f"{path}: no such file or directory")


def _archive_peek(path: Path) -> str | None:
    """Suffix (.xyz/.cif) of the first structure file in a tar archive, or None."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            for suffix in (".xyz", ".cif"):
                if member.isfile() and member.name.endswith(suffix):
                    return suffix
    return None


def _dir_files(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file())


# --------------------------------------------------------------------------------------- QM9 xyz
def read_qm9_xyz(path: Path, labels: Path | None = None) -> SourceReader:
    """QM9 in its original layout: ``dsgdb9nsd_*.xyz`` files in a directory or tar(.bz2/.gz).

    A plain ``.xyz`` file works too (for prediction); its comment line need not carry QM9
    properties, in which case the record has no labels. Fortran exponents (``1.2*^-6``) are
    handled by the featuriser.
    """
    if labels is not None:
        raise MolmatError(f"{path}: QM9 xyz files carry their own labels; --labels is not used with this format")

    def records() -> Iterator[RawRecord]:
        for source, stem, text in _iter_members(path, ".xyz"):
            rid = stem.rsplit("_", 1)[-1] if stem.startswith("dsgdb9nsd_") else stem
            yield RawRecord(source=source, rid=rid, kind=MOLECULE, fmt="xyz", data=text)

    files = _dir_files(path) if path.is_dir() else [path]
    return SourceReader(path, "qm9_xyz", list(QM9_PROPERTIES), records, files)


# ------------------------------------------------------------------------------------ labels CSV
def _read_label_table(path: Path, id_column: str | None = None) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """Read a labels CSV keyed by an id column. Returns (id column, label columns, rows by id)."""
    try:
        with _open_text(path) as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            key = id_column or next((c for c in header if c in _ID_COLUMNS), header[0] if header else None)
            if key is None:
                raise MolmatError(f"{path}: labels CSV has no header")
            rows: dict[str, dict[str, str]] = {}
            for line_no, row in enumerate(reader, start=2):
                rid = (row.get(key) or "").strip()
                if not rid:
                    raise MolmatError(f"{path}, line {line_no}: empty id in column '{key}'")
                rows[rid] = row
    except UnicodeDecodeError as exc:
        raise MolmatError(f"{path}: labels CSV is not UTF-8 text ({exc})") from None
    return key, [c for c in header if c != key], rows


# ------------------------------------------------------------------------------------------- SDF
def read_sdf(path: Path, labels: Path | None = None) -> SourceReader:
    """SDF molecules with a label CSV in the ``gdb9.sdf`` + ``gdb9.sdf.csv`` layout.

    The CSV defaults to ``<file>.csv`` beside the SDF. Rows are matched by the molecule's title
    (``gdb_1``) when the id column holds titles, else by position.
    """
    label_path = labels or (path.with_name(path.name + ".csv") if path.with_name(path.name + ".csv").exists() else None)
    key, columns, rows = _read_label_table(label_path) if label_path else ("", [], {})
    targets = [QM9_CSV_COLUMNS.get(c, (c, infer_unit(c))) for c in columns]
    row_list = list(rows.values())

    def records() -> Iterator[RawRecord]:
        block: list[str] = []
        index = 0
        with _open_text(path) as fh:
            for line in fh:
                if line.startswith("$$$$"):
                    text = "".join(block)
                    block = []
                    title = text.split("\n", 1)[0].strip()
                    row = rows.get(title) if title in rows else (row_list[index] if index < len(row_list) else None)
                    values = {t[0]: row.get(c, "") for c, t in zip(columns, targets)} if row else {}
                    yield RawRecord(str(path), title or f"mol{index + 1}", MOLECULE, "molblock", text, values)
                    index += 1
                else:
                    block.append(line)
        if "".join(block).strip():
            yield RawRecord(str(path), f"mol{index + 1}", MOLECULE, "molblock", "".join(block), {})

    files = [path] + ([label_path] if label_path else [])
    return SourceReader(path, "sdf", targets, records, files)


# ------------------------------------------------------------------------------------ SMILES CSV
def read_smiles_csv(path: Path, labels: Path | None = None) -> SourceReader:
    """A CSV with a SMILES column and label columns (the QM8/MoleculeNet layout)."""
    if labels is not None:
        raise MolmatError(f"{path}: a SMILES CSV carries its own label columns; --labels is not used")
    with _open_text(path) as fh:
        header = next(csv.reader(fh), [])
    smiles_col = next((c for c in header if c.lower() in ("smiles", "smi", "canonical_smiles")), None)
    if smiles_col is None:
        raise MolmatError(f"{path}: no SMILES column (expected a header named 'smiles'); header is {header}")
    id_col = next((c for c in header if c in _ID_COLUMNS), None)
    columns = [c for c in header if c not in (smiles_col, id_col)]
    targets = [(c, infer_unit(c)) for c in columns]

    def records() -> Iterator[RawRecord]:
        with _open_text(path) as fh:
            for line_no, row in enumerate(csv.DictReader(fh), start=2):
                rid = row.get(id_col) if id_col else f"row{line_no}"
                values = {c: row.get(c, "") for c in columns}
                yield RawRecord(f"{path}:{line_no}", str(rid), MOLECULE, "smiles", row.get(smiles_col) or "", values)

    return SourceReader(path, "smiles_csv", targets, records, [path])


# ------------------------------------------------------------------------------------------ CIFs
def read_cifs(path: Path, labels: Path | None = None) -> SourceReader:
    """CIF files in a directory or ``.tar.gz`` with a labels CSV keyed by file stem (MP layout).

    ``labels.csv`` beside an archive, or inside a directory, is used when ``labels`` is None.
    CIFs without a label row are kept with missing labels.
    """
    if labels is None:
        beside = (path if path.is_dir() else path.parent) / "labels.csv"
        labels = beside if beside.exists() else None
    key, columns, rows = _read_label_table(labels) if labels else ("", [], {})
    targets = [(c, infer_unit(c)) for c in columns]

    def records() -> Iterator[RawRecord]:
        for source, stem, text in _iter_members(path, ".cif"):
            row = rows.get(stem, {})
            yield RawRecord(source, stem, CRYSTAL, "cif", text, {c: row.get(c, "") for c in columns})

    files = (_dir_files(path) if path.is_dir() else [path]) + ([labels] if labels else [])
    return SourceReader(path, "cif", targets, records, files)


# ------------------------------------------------------------------------------- pymatgen JSON
_STRUCTURE_KEYS = {"@module", "@class", "charge", "lattice", "sites", "properties", "structure"}


def _structure_label_keys(item: dict[str, Any]) -> list[str]:
    return [k for k, v in item.items() if k not in _STRUCTURE_KEYS and k not in _ID_COLUMNS
            and (v is None or isinstance(v, (int, float, str))) and not k.startswith("@")]


def read_pymatgen_json(path: Path, labels: Path | None = None) -> SourceReader:
    """A JSON (or .json.gz) list, or JSON Lines file, of pymatgen ``Structure.as_dict()`` dicts.

    Label fields sit beside the structure keys (``{"lattice":..., "sites":..., "band_gap_eV": 1.2}``)
    or the structure is nested under ``"structure"``. The id comes from ``material_id``/``mp_id``/``id``.
    """
    is_lines = ".jsonl" in path.name

    def items() -> Iterator[dict[str, Any]]:
        with _open_text(path) as fh:
            if is_lines:
                for line in fh:
                    if line.strip():
                        yield json.loads(line)
                return
            try:
                data = json.load(fh)
            except json.JSONDecodeError as exc:
                raise MolmatError(f"{path}: not valid JSON ({exc})") from None
            if not isinstance(data, list):
                raise MolmatError(f"{path}: expected a JSON list of structure dicts")
            yield from data

    first = next(items(), None)
    if first is None:
        raise MolmatError(f"{path}: no structures found")
    label_keys = _structure_label_keys(first) if isinstance(first, dict) else []
    targets = [(k, infer_unit(k)) for k in label_keys if k not in ("formula", "formula_pretty")]
    if labels is not None:
        raise MolmatError(f"{path}: pymatgen JSON carries its labels in each dict; --labels is not used")

    def records() -> Iterator[RawRecord]:
        for i, item in enumerate(items()):
            if not isinstance(item, dict):
                yield RawRecord(f"{path}[{i}]", str(i), CRYSTAL, "pymatgen", None, {})
                continue
            rid = next((str(item[k]) for k in _ID_COLUMNS if k in item), str(i))
            structure = item.get("structure", item)
            values = {t: item.get(t) for t, _ in targets}
            yield RawRecord(f"{path}[{i}]", rid, CRYSTAL, "pymatgen", structure, values)

    return SourceReader(path, "pymatgen_json", targets, records, [path])


@dataclass(frozen=True)
class Format:
    """An input format: its reader and the kind of every record it yields.

    Attributes:
        reader: ``reader(path, labels_csv_or_None) -> SourceReader``.
        kind: ``records.MOLECULE`` or ``records.CRYSTAL``.
    """

    reader: Callable[[Path, Path | None], SourceReader]
    kind: str


#: Format name -> reader and record kind. The one place that knows every format.
FORMATS: dict[str, Format] = {
    "qm9_xyz": Format(read_qm9_xyz, MOLECULE),
    "sdf": Format(read_sdf, MOLECULE),
    "smiles_csv": Format(read_smiles_csv, MOLECULE),
    "cif": Format(read_cifs, CRYSTAL),
    "pymatgen_json": Format(read_pymatgen_json, CRYSTAL),
}


def format_kind(name: str) -> str:
    """Record kind (``"molecule"`` or ``"crystal"``) of a format name of :data:`FORMATS`.

    Raises:
        MolmatError: an unknown format name.
    """
    if name not in FORMATS:
        raise MolmatError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}")
    return FORMATS[name].kind


def detect_format(path: Path) -> str:
    """Pick a format name from a path's name (and, for directories/archives, their contents)."""
    name = path.name.lower()
    if path.is_dir():
        if next(path.rglob("*.xyz"), None) is not None:
            return "qm9_xyz"
        if next(path.rglob("*.cif"), None) is not None:
            return "cif"
        raise MolmatError(f"{path}: directory holds no .xyz or .cif files; pass --format")
    if not path.exists():
        raise MolmatError(f"{path}: no such file or directory")
    if _is_archive(path):
        suffix = _archive_peek(path)
        if suffix == ".xyz":
            return "qm9_xyz"
        if suffix == ".cif":
            return "cif"
        raise MolmatError(f"{path}: archive holds no .xyz or .cif files; pass --format")
    for ending, fmt in ((".xyz", "qm9_xyz"), (".sdf", "sdf"), (".sdf.gz", "sdf"), (".cif", "cif"),
                        (".csv", "smiles_csv"), (".csv.gz", "smiles_csv"), (".json", "pymatgen_json"),
                        (".json.gz", "pymatgen_json"), (".jsonl", "pymatgen_json"), (".jsonl.gz", "pymatgen_json")):
        if name.endswith(ending):
            return fmt
    raise MolmatError(f"{path}: cannot tell the format from the file name; pass --format ({', '.join(FORMATS)})")


def open_source(path: str | Path, fmt: str = "auto", labels: str | Path | None = None) -> SourceReader:
    """Open one input with the named (or detected) format. Raises MolmatError on unknown formats."""
    p = Path(path)
    if not p.exists():
        raise MolmatError(f"{p}: no such file or directory")
    name = detect_format(p) if fmt in ("auto", "", None) else fmt
    if name not in FORMATS:
        raise MolmatError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}")
    label_path = Path(labels) if labels else None
    if label_path is not None and not label_path.exists():
        raise MolmatError(f"labels file {label_path} does not exist")
    return FORMATS[name].reader(p, label_path)
