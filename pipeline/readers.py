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

import contextlib
import csv
import gzip
import io
import json
import logging
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

log = logging.getLogger("molmat.readers")


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


#: Key of :attr:`RawRecord.labels` holding why the record's labels could not be read (a labels
#: CSV row with the wrong number of fields, a damaged QM9 property line). The structure itself
#: may be fine: featurisation refuses the record only when labels are asked for (preprocessing),
#: so ``predict`` still predicts it. Not a valid target name (targets are identifiers).
LABEL_ERROR = "!label_error"


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


def carries_unit(name: str, unit: str) -> bool:
    """True when a label's name ends with a suffix naming its unit (``band_gap_eV``, ``K_VRH_GPa``)."""
    suffix = name.rsplit("_", 1)[-1] if "_" in name else ""
    return suffix in _UNIT_SUFFIXES and infer_unit(name) == unit


def unit_column(name: str, unit: str, suffix: str = "") -> str:
    """Column name for values of a label in ``unit``, so that every column says its unit.

    ``name + suffix`` when the name already ends with its unit (``gap_Ha``, ``gap_Ha_pred``),
    else ``name + suffix + " [unit]"`` (``E1-CC2 [Ha]``, ``E1-CC2_pred [Ha]``, ``energy [eV]``).
    """
    return f"{name}{suffix}" if carries_unit(name, unit) else f"{name}{suffix} [{unit}]"


def _open_text(path: Path, errors: str = "strict") -> io.TextIOBase:
    """Open a plain or gzip-compressed UTF-8 text file; a leading byte-order mark is dropped.

    ``errors="surrogateescape"`` keeps undecodable bytes as lone surrogates, so a reader can
    reject the one record that holds them (:func:`_not_utf8`) and read on.
    """
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8-sig", errors=errors, newline="")
    return open(path, encoding="utf-8-sig", errors=errors, newline="")


_SURROGATE = re.compile("[\udc80-\udcff]")


def _not_utf8(*texts: Any) -> bool:
    """True when text read with ``errors="surrogateescape"`` held bytes that are not UTF-8."""
    return any(isinstance(t, str) and _SURROGATE.search(t) is not None for t in texts)


class UnreadableSource(MolmatError):
    """An input whose content cannot be read at all (not UTF-8, not JSON, a bad header).

    :func:`open_input` turns it into one rejected record, so a run over many inputs goes on;
    :func:`open_source` raises it.
    """


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
    """Suffix (.xyz/.cif) of the first structure file in a tar archive, ``"poscar"`` for a VASP
    POSCAR/CONTCAR file (see :func:`is_poscar_name`), or None."""
    with tarfile.open(path, mode="r|*") as tar:
        for member in tar:
            for suffix in (".xyz", ".cif"):
                if member.isfile() and member.name.endswith(suffix):
                    return suffix
            if member.isfile() and is_poscar_name(member.name.rsplit("/", 1)[-1]):
                return "poscar"
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
def _csv_rows(fh: io.TextIOBase) -> Iterator[tuple[int, list[str] | None, str]]:
    """``(row number, fields, "")`` for each CSV row after the header, or ``(row, None, reason)``.

    A row the csv module cannot parse (a field over its size limit) and a row holding bytes that
    are not UTF-8 (``fh`` opened with ``errors="surrogateescape"``) give a reason; reading goes
    on with the next row. Blank lines are skipped and not counted (as ``csv.DictReader`` does);
    row numbers start at 2 (the header is row 1).
    """
    reader = csv.reader(fh)
    number = 1
    while True:
        try:
            fields = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            number += 1
            yield number, None, f"CSV row {number} could not be parsed ({exc})"
            continue
        if not fields:
            continue
        number += 1
        if _not_utf8(*fields):
            yield number, None, f"CSV row {number} is not UTF-8 text"
            continue
        yield number, fields, ""


def _field_count_error(path: Path, number: int, fields: list[str], header: list[str]) -> str:
    """Why a row with the wrong number of fields is refused, or '' when it has the header's."""
    if len(fields) == len(header):
        return ""
    return (f"{path.name} row {number} has {len(fields)} fields but the header has {len(header)} (an unquoted comma, "
            "e.g. a decimal comma, shifts every later column); quote the value or fix the row")


def _read_label_table(path: Path, id_column: str | None = None) -> tuple[str, list[str], dict[str, dict[str, str]]]:
    """Read a labels CSV keyed by an id column. Returns (id column, label columns, rows by id).

    A row with the wrong number of fields, or with bytes that are not UTF-8, keeps its id (when
    readable) but its labels become :data:`LABEL_ERROR` with the reason, so the structure it
    labels is rejected instead of getting shifted values. Rows without an id are skipped.

    Raises:
        UnreadableSource: the header cannot be read.
    """
    with _open_text(path, errors="surrogateescape") as fh:
        try:
            header = next(csv.reader(fh), [])
        except csv.Error as exc:
            raise UnreadableSource(f"{path}: labels CSV header could not be parsed ({exc})") from None
        if _not_utf8(*header):
            raise UnreadableSource(f"{path}: labels CSV header is not UTF-8 text")
        key = id_column or next((c for c in header if c in _ID_COLUMNS), header[0] if header else None)
        if key is None:
            raise UnreadableSource(f"{path}: labels CSV has no header")
        at = header.index(key) if key in header else 0
        rows: dict[str, dict[str, str]] = {}
        for number, fields, reason in _csv_rows(fh):
            if fields is not None and not any(f.strip() for f in fields):
                continue  # a blank line
            rid = (fields[at] if fields is not None and at < len(fields) else "").strip()
            if not rid:
                log.warning("%s row %d: no id in column '%s'; skipped", path, number, key)
                continue
            reason = reason or _field_count_error(path, number, fields, header)
            rows[rid] = {LABEL_ERROR: f"labels: {reason}"} if reason else dict(zip(header, fields))
    return key, [c for c in header if c != key], rows


def _row_labels(row: dict[str, Any] | None, pairs: list[tuple[str, str]]) -> dict[str, Any]:
    """Labels of a structure from its labels-CSV row: ``{target: row[column]}`` for (column, target)
    pairs, or the row's :data:`LABEL_ERROR`."""
    if not row:
        return {}
    if LABEL_ERROR in row:
        return {LABEL_ERROR: row[LABEL_ERROR]}
    return {target: row.get(column, "") for column, target in pairs}


# ------------------------------------------------------------------------------------------- SDF
# The counts line of a V2000/V3000 molfile: atom and bond counts, ..., the version.
_COUNTS_LINE = re.compile(r"^[ \d]{6}.*V[23]000\s*$")


def read_sdf(path: Path, labels: Path | None = None) -> SourceReader:
    """SDF molecules with a label CSV in the ``gdb9.sdf`` + ``gdb9.sdf.csv`` layout.

    The CSV defaults to ``<file>.csv`` beside the SDF. Rows are matched by the molecule's title
    (``gdb_1``) when the id column holds titles, else by position.
    """
    label_path = labels or (path.with_name(path.name + ".csv") if path.with_name(path.name + ".csv").exists() else None)
    key, columns, rows = _read_label_table(label_path) if label_path else ("", [], {})
    targets = [QM9_CSV_COLUMNS.get(c, (c, infer_unit(c))) for c in columns]
    pairs = [(c, t[0]) for c, t in zip(columns, targets)]
    row_list = list(rows.values())

    def record(text: str, index: int) -> RawRecord:
        title = text.split("\n", 1)[0].strip()
        rid = title or f"mol{index + 1}"
        if _not_utf8(text):
            return _unreadable(str(path), _SURROGATE.sub("?", rid), MOLECULE,
                               f"SDF record {index + 1} is not UTF-8 text")
        row = rows.get(title) if title in rows else (row_list[index] if index < len(row_list) else None)
        return RawRecord(str(path), rid, MOLECULE, "molblock", text, _row_labels(row, pairs))

    def records() -> Iterator[RawRecord]:
        block: list[str] = []
        index = 0
        ended = False  # the block's "M  END" was seen
        with _open_text(path, errors="surrogateescape") as fh:
            for line in fh:
                if line.startswith("$$$$"):
                    yield record("".join(block), index)
                    block, ended = [], False
                    index += 1
                    continue
                if ended and _COUNTS_LINE.match(line) and len(block) >= 3:
                    # a counts line after "M  END": the next molecule began 3 lines (its header)
                    # ago, in a file written without "$$$$" terminators
                    yield record("".join(block[:-3]), index)
                    block = block[-3:]
                    ended = False
                    index += 1
                block.append(line)
                if line.startswith("M  END"):
                    ended = True
        if "".join(block).strip():
            yield record("".join(block), index)

    files = [path] + ([label_path] if label_path else [])
    return SourceReader(path, "sdf", targets, records, files)


# ------------------------------------------------------------------------------------ SMILES CSV
def read_smiles_csv(path: Path, labels: Path | None = None) -> SourceReader:
    """A CSV with a SMILES column and label columns (the QM8/MoleculeNet layout)."""
    if labels is not None:
        raise MolmatError(f"{path}: a SMILES CSV carries its own label columns; --labels is not used")
    try:  # decoding errors later in the file belong to their rows, not to the header
        with _open_text(path, errors="surrogateescape") as fh:
            header = next(csv.reader(fh), [])
    except csv.Error as exc:
        raise UnreadableSource(f"{path}: the CSV header could not be read ({_reason(exc)})") from None
    if _not_utf8(*header):
        raise UnreadableSource(f"{path}: the CSV header is not UTF-8 text")
    smiles_col = next((c for c in header if c.lower() in ("smiles", "smi", "canonical_smiles")), None)
    if smiles_col is None:
        raise MolmatError(f"{path}: no SMILES column (expected a header named 'smiles'); header is {header}")
    id_col = next((c for c in header if c in _ID_COLUMNS), None)
    columns = [c for c in header if c not in (smiles_col, id_col)]
    targets = [(c, infer_unit(c)) for c in columns]
    at = {c: i for i, c in enumerate(header)}

    def records() -> Iterator[RawRecord]:
        # one record per row; a row that cannot be read is rejected with the reason, and the next
        # row is read (a row with the wrong field count would give shifted labels)
        with _open_text(path, errors="surrogateescape") as fh:
            next(csv.reader(fh), None)
            for line_no, fields, reason in _csv_rows(fh):
                source = f"{path}:{line_no}"
                rid = f"row{line_no}"
                if fields is not None and id_col is not None and at[id_col] < len(fields):
                    rid = fields[at[id_col]]
                reason = reason or _field_count_error(path, line_no, fields, header)
                if reason:
                    yield _unreadable(source, rid, MOLECULE, reason)
                    continue
                values = {c: fields[at[c]] for c in columns}
                yield RawRecord(source, str(rid), MOLECULE, "smiles", fields[at[smiles_col]] or "", values)

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
            values = {LABEL_ERROR: row[LABEL_ERROR]} if LABEL_ERROR in row else {c: row.get(c, "") for c in columns}
            yield RawRecord(source, stem, CRYSTAL, "cif", text, values)

    files = (_dir_files(path) if path.is_dir() else [path]) + ([labels] if labels else [])
    return SourceReader(path, "cif", targets, records, files)


# ------------------------------------------------------------------------------- pymatgen JSON
@dataclass
class _BadLine:
    """A JSON Lines line that could not be read, and why."""

    reason: str


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

    def items() -> Iterator[Any]:
        """Each structure item; for a JSON Lines line that cannot be read, a :class:`_BadLine`."""
        if is_lines:
            with _open_text(path, errors="surrogateescape") as fh:
                for number, line in enumerate(fh, start=1):
                    if not line.strip():
                        continue
                    if _not_utf8(line):
                        yield _BadLine(f"JSON Lines line {number} is not UTF-8 text")
                        continue
                    try:
                        yield json.loads(line)
                    except (ValueError, RecursionError) as exc:  # RecursionError: nesting too deep
                        yield _BadLine(f"JSON Lines line {number} is not valid JSON ({_reason(exc)})")
            return
        try:
            with _open_text(path) as fh:
                data = json.load(fh)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
            raise UnreadableSource(f"{path}: not valid JSON ({_reason(exc)})") from None
        if not isinstance(data, list):
            raise UnreadableSource(f"{path}: expected a JSON list of structure dicts")
        yield from data

    first = next((item for item in items() if not isinstance(item, _BadLine)), None)
    if first is None:
        raise UnreadableSource(f"{path}: no structures found")
    label_keys = _structure_label_keys(first) if isinstance(first, dict) else []
    targets = [(k, infer_unit(k)) for k in label_keys if k not in ("formula", "formula_pretty")]
    if labels is not None:
        raise MolmatError(f"{path}: pymatgen JSON carries its labels in each dict; --labels is not used")

    def records() -> Iterator[RawRecord]:
        for i, item in enumerate(items()):
            if isinstance(item, _BadLine):
                yield _unreadable(f"{path}[{i}]", str(i), CRYSTAL, item.reason)
                continue
            if not isinstance(item, dict):
                yield RawRecord(f"{path}[{i}]", str(i), CRYSTAL, "pymatgen", None, {})
                continue
            rid = next((str(item[k]) for k in _ID_COLUMNS if k in item), str(i))
            structure = item.get("structure", item)
            values = {t: item.get(t) for t, _ in targets}
            yield RawRecord(f"{path}[{i}]", rid, CRYSTAL, "pymatgen", structure, values)

    return SourceReader(path, "pymatgen_json", targets, records, [path])


# -------------------------------------------------------------------------- records that failed
#: Payload type of a record a reader could not read (``data`` is the reason). Featurisation
#: rejects it with that reason, so it reaches ``rejects.jsonl`` (or predict's ``error`` column)
#: like any other bad record, with its file and record id, and the run goes on.
UNREADABLE = "unreadable"


def _unreadable(source: str, rid: str, kind: str, reason: str) -> RawRecord:
    """A record that stands for a structure (or a file) that could not be read, and why."""
    return RawRecord(source, rid, kind, UNREADABLE, reason)


def _reason(exc: BaseException) -> str:
    """First line of an exception's message, with its type when the message is empty."""
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:300]


# ----------------------------------------------------------------------------- VASP POSCAR
# POSCAR, CONTCAR, POSCAR_<id>, CONTCAR.<id>, <id>_POSCAR, <id>.vasp, <id>.poscar (any case).
_POSCAR_NAME = re.compile(r"^(?:(?:poscar|contcar)(?:[._-].+)?|.+[._-](?:poscar|contcar)|.+\.vasp)$", re.IGNORECASE)
# names that hold something else even when they match the above (archives, other formats, VASP outputs)
_NOT_POSCAR = re.compile(r"\.(?:tar|tgz|tbz2|gz|bz2|xz|zip|csv|json|jsonl|cif|xyz|extxyz|db|xml|h5|png|txt|md)$",
                         re.IGNORECASE)


def is_poscar_name(name: str) -> bool:
    """True for a VASP structure file name: ``POSCAR``, ``CONTCAR``, ``POSCAR_<id>``,
    ``<id>.POSCAR``, ``<id>.vasp`` and the like (any case); archives and other formats excluded."""
    return bool(_POSCAR_NAME.match(name)) and not _NOT_POSCAR.search(name)


def poscar_id(path: str) -> str:
    """Record id of a POSCAR file from its path: the name without ``POSCAR``/``CONTCAR`` and
    ``.vasp``/``.poscar`` (``mp-1.vasp``, ``POSCAR_mp-1`` -> ``mp-1``), or, for a file named just
    ``POSCAR``/``CONTCAR``, its directory's name (the VASP layout ``mp-1/POSCAR`` -> ``mp-1``)."""
    parts = [p for p in path.replace("\\", "/").split("/") if p not in ("", ".")]
    stem = re.sub(r"\.(?:vasp|poscar)$", "", parts[-1], flags=re.IGNORECASE)
    rest = re.sub(r"^(?:poscar|contcar)(?:[._-]|$)|[._-](?:poscar|contcar)$", "", stem, flags=re.IGNORECASE)
    if rest:
        return rest
    return parts[-2] if len(parts) > 1 else stem


def _iter_poscars(path: Path) -> Iterator[tuple[str, str, str | None, str]]:
    """Yield ``(source, id, text, reason)`` for every POSCAR-like file of a file, directory or archive.

    ``text`` is None when the file could not be read, and ``reason`` says why. A damaged archive
    ends with one such item for the archive itself (a tar stream cannot be read past an error).
    """
    if path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and is_poscar_name(p.name)):
            try:
                text = f.read_text(encoding="utf-8", errors="replace")
                yield str(f), poscar_id(str(f.relative_to(path.parent))), text, ""
            except OSError as exc:
                yield str(f), poscar_id(str(f)), None, f"could not read the file ({_reason(exc)})"
        return
    if _is_archive(path):
        try:
            with tarfile.open(path, mode="r|*") as tar:
                for member in tar:
                    base = member.name.rsplit("/", 1)[-1]
                    if not member.isfile() or not is_poscar_name(base):
                        continue
                    fh = tar.extractfile(member)
                    if fh is not None:
                        yield f"{path}::{member.name}", poscar_id(member.name), fh.read().decode("utf-8", "replace"), ""
        except (tarfile.TarError, OSError, EOFError) as exc:  # zlib/bz2 errors are OSError or EOFError
            yield str(path), path.name, None, f"damaged archive, not read past this point ({_reason(exc)})"
        return
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        yield str(path), poscar_id(str(path.resolve())), None, f"could not read the file ({_reason(exc)})"
        return
    yield str(path), poscar_id(str(path.resolve())), text, ""


def read_poscar(path: Path, labels: Path | None = None) -> SourceReader:
    """VASP POSCAR/CONTCAR crystals: one file, a directory tree or a tar archive of them.

    Files are recognised by name (:func:`is_poscar_name`) and parsed by pymatgen in the
    featuriser (VASP 5 layout, with the element line). Ids come from the file names
    (:func:`poscar_id`); labels from a CSV keyed by id, ``labels.csv`` beside a file or archive
    (or inside a directory) when ``labels`` is None, as for CIFs. Files without a label row are
    kept with missing labels.
    """
    if labels is None:
        for beside in ((path if path.is_dir() else path.parent) / "labels.csv", path.parent / "labels.csv"):
            if beside.exists():
                labels = beside
                break
    key, columns, rows = _read_label_table(labels) if labels else ("", [], {})
    targets = [(c, infer_unit(c)) for c in columns]

    def records() -> Iterator[RawRecord]:
        for source, rid, text, reason in _iter_poscars(path):
            if text is None:
                yield _unreadable(source, rid, CRYSTAL, reason)
                continue
            row = rows.get(rid, {})
            values = {LABEL_ERROR: row[LABEL_ERROR]} if LABEL_ERROR in row else {c: row.get(c, "") for c in columns}
            yield RawRecord(source, rid, CRYSTAL, "poscar", text, values)

    files = (_dir_files(path) if path.is_dir() else [path]) + ([labels] if labels else [])
    return SourceReader(path, "poscar", targets, records, files)


# ---------------------------------------------------------------------- ASE extxyz and database
#: Units of the scalar results ASE calculators store (ASE's unit convention: eV, Angstrom).
_ASE_RESULT_UNITS = {"energy": "eV", "free_energy": "eV", "magmom": "mu_B"}
#: Extended-XYZ comment keys that describe the frame rather than label it.
_EXTXYZ_SPECIAL = {"Lattice", "Properties", "pbc"}


def _label_unit(name: str) -> str:
    """Unit of a label named in a file's own key-value fields: the QM9 table, ASE's calculator
    results (eV), else the name's unit suffix (:func:`infer_unit`)."""
    qm9 = dict(QM9_PROPERTIES)
    if name in qm9:
        return qm9[name]
    return _ASE_RESULT_UNITS.get(name) or infer_unit(name)


def _is_number(value: Any) -> bool:
    """A real number (int or float, numpy scalars included), not a bool."""
    import numpy as np

    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _ase_labels(fields: dict[str, Any], calc_results: dict[str, Any] | None = None) -> dict[str, float]:
    """Numeric scalar labels of a frame: its key-value fields (ids excluded) and calculator results.

    Per-atom arrays (forces, charges) and vectors (stress) are not structure labels and are left out.
    """
    import numpy as np

    out = {k: float(v) for k, v in fields.items()
           if k not in _ID_COLUMNS and k not in _EXTXYZ_SPECIAL and _is_number(v)}
    for k, v in (calc_results or {}).items():
        if np.ndim(v) == 0 and _is_number(np.asarray(v).item()):
            out[k] = float(v)
    return out


def _ase_id(fields: dict[str, Any], default: str) -> str:
    """Record id from the first id field present (``mp_id``, ``material_id``, ``mol_id``, ``name``, ...)."""
    return next((str(fields[k]) for k in _ID_COLUMNS if fields.get(k) not in (None, "")), default)


def ase_atoms_record(atoms: Any, source: str, rid: str, labels: dict[str, Any]) -> RawRecord:
    """An ASE ``Atoms`` as a raw record: a molecule (no periodic direction) or a 3D crystal.

    Molecules become xyz text (the cell, if any, is ignored); a ``smiles`` (or ``SMILES``) info
    field is passed on as the QM9 layout's SMILES line, which gives the featuriser bond orders
    and charges; without it they come from the geometry. Crystals (pbc in all three directions
    and a cell of non-zero volume) become a pymatgen structure dict. Anything else (a slab or
    wire with mixed pbc, pbc without a cell, no atoms) becomes an :data:`UNREADABLE` record
    with the reason.
    """
    import numpy as np

    pbc = np.asarray(atoms.pbc, dtype=bool).reshape(-1)
    kind = CRYSTAL if pbc.any() else MOLECULE
    if len(atoms) == 0:
        return _unreadable(source, rid, kind, "frame has no atoms")
    symbols = atoms.get_chemical_symbols()
    pos = np.asarray(atoms.get_positions(), dtype=np.float64)
    if not pbc.any():
        lines = [str(len(symbols)), ""] + [f"{s} {float(x)!r} {float(y)!r} {float(z)!r}"
                                           for s, (x, y, z) in zip(symbols, pos)]
        smiles = atoms.info.get("smiles", atoms.info.get("SMILES"))
        if isinstance(smiles, str) and smiles.strip():
            lines += ["", smiles.strip()]  # where QM9 files keep it: after the frequencies line
        return RawRecord(source, rid, MOLECULE, "xyz", "\n".join(lines) + "\n", labels)
    flags = " ".join("T" if p else "F" for p in pbc)
    if not pbc.all():
        return _unreadable(source, rid, CRYSTAL, f"mixed periodicity (pbc={flags}): slabs and wires are not "
                           "supported; use pbc F F F for a molecule or T T T with a cell for a crystal")
    cell = np.asarray(atoms.cell.array, dtype=np.float64)
    volume = abs(float(np.linalg.det(cell))) if np.isfinite(cell).all() else 0.0
    if volume < 1e-6:
        return _unreadable(source, rid, CRYSTAL, f"periodic (pbc={flags}) but without a cell (lattice volume "
                           f"{volume:.3g} A^3); a crystal needs its Lattice")
    frac = np.linalg.solve(cell.T, pos.T).T
    structure = {"@module": "pymatgen.core.structure", "@class": "Structure", "charge": 0, "properties": {},
                 "lattice": {"matrix": cell.tolist()},
                 "sites": [{"species": [{"element": s, "occu": 1}], "abc": f.tolist(), "properties": {}, "label": s}
                           for s, f in zip(symbols, frac)]}
    return RawRecord(source, rid, CRYSTAL, "pymatgen", structure, labels)


def _extxyz_fields(path: Path) -> Iterator[dict[str, Any]]:
    """Key-value fields of each frame's comment line, read without parsing the atoms.

    Stops quietly at the first malformed frame: reading the records reports it.
    """
    from ase.io.extxyz import key_val_str_to_dict

    with _open_text(path) as fh:
        while True:
            first = fh.readline()
            if not first.strip():
                return
            try:
                n = int(first.split()[0])
                fields = key_val_str_to_dict(fh.readline())
            except (ValueError, IndexError, SyntaxError):
                return
            yield fields
            for _ in range(n):
                if not fh.readline():
                    return


def _ordered_label_units(keys: Iterator[str]) -> list[tuple[str, str]]:
    """(name, unit) of every distinct key, in first-seen order."""
    seen: dict[str, str] = {}
    for k in keys:
        if k not in seen:
            seen[k] = _label_unit(k)
    return list(seen.items())


def read_extxyz(path: Path, labels: Path | None = None) -> SourceReader:
    """An extended-XYZ file (ASE's format; a trajectory of many frames), read by ASE.

    Every frame is a molecule (pbc ``F F F``, or plain xyz without a ``pbc`` key) or a crystal
    (pbc ``T T T`` with a ``Lattice``); see :func:`ase_atoms_record`. Labels are the numeric
    fields of each frame's comment line (the ``info`` dict) and the scalar calculator results
    ASE reads from it (``energy``, ``free_energy`` in eV); targets are every such name found in
    the file, with units as for the other formats (QM9 names, a unit suffix such as
    ``band_gap_eV``, or ``--set preprocess.units.NAME=UNIT``). Per-atom arrays (forces) are not
    structure labels and are left out. Ids come from an id field (``mp_id``, ``mol_id``, ...),
    else ``<file stem>:<frame index>``. A frame ASE cannot parse becomes a reject, and so does
    the rest of the file (a text stream cannot be resynchronised after a malformed frame).
    """
    if labels is not None:
        raise MolmatError(f"{path}: extended XYZ carries its labels in each frame's comment line; --labels is not used")
    try:
        targets = _ordered_label_units(k for fields in _extxyz_fields(path) for k in _ase_labels(fields))
    except (OSError, UnicodeDecodeError) as exc:
        raise UnreadableSource(f"{path}: could not read the file ({_reason(exc)})") from None
    stem = path.name.split(".")[0]

    def records() -> Iterator[RawRecord]:
        import ase.io

        frames = ase.io.iread(str(path), index=":", format="extxyz")
        i = 0
        while True:
            try:
                atoms = next(frames)
            except StopIteration:
                return
            except Exception as exc:  # ASE raises many types (ValueError, IndexError, KeyError, ...)
                yield _unreadable(f"{path}[{i}]", f"{stem}:{i}", MOLECULE,
                                  f"extxyz: frame {i} could not be parsed, nor anything after it ({_reason(exc)})")
                return
            results = dict(atoms.calc.results) if atoms.calc is not None else {}
            rid = _ase_id(atoms.info, f"{stem}:{i}")
            yield ase_atoms_record(atoms, f"{path}[{i}]", rid, _ase_labels(atoms.info, results))
            i += 1

    return SourceReader(path, "extxyz", targets, records, [path])


def _check_ase_db(path: Path) -> None:
    """Refuse a file that is not an ASE SQLite database, opening it read-only (ASE would create
    its tables in any SQLite file it is given, changing the user's file)."""
    import sqlite3

    try:
        with contextlib.closing(sqlite3.connect(f"file:{path.resolve()}?mode=ro", uri=True)) as con:
            found = con.execute("SELECT name FROM sqlite_master WHERE type='table' AND name='systems'").fetchone()
    except sqlite3.Error as exc:
        raise UnreadableSource(f"{path}: not an SQLite database ({_reason(exc)}); only ASE's SQLite .db files "
                               "are read") from None
    if found is None:
        raise UnreadableSource(f"{path}: an SQLite file without ASE's 'systems' table; not an ASE database")


def read_ase_db(path: Path, labels: Path | None = None) -> SourceReader:
    """An ASE database (SQLite ``.db``), read by ASE: one structure per row.

    Rows become molecules or crystals by their pbc, as extended-XYZ frames do
    (:func:`ase_atoms_record`). Labels are the rows' numeric key-value pairs and their scalar
    calculator results (``energy``, ``free_energy`` in eV, ``magmom`` in mu_B); targets are every
    such name in the database. Ids come from an id key-value pair (``mp_id``, ``mol_id``,
    ``name``, ...), else ``<file stem>:<row id>``. A row that cannot be read becomes a reject.
    """
    if labels is not None:
        raise MolmatError(f"{path}: an ASE database carries its labels as key-value pairs; --labels is not used")
    import ase.db

    _check_ase_db(path)
    stem = path.name.split(".")[0]

    def rows() -> Iterator[Any]:
        with ase.db.connect(str(path), type="db", create_indices=False) as db:
            yield from db.select()

    def row_labels(row: Any) -> dict[str, float]:
        results = {k: row.get(k) for k in _ASE_RESULT_UNITS if row.get(k) is not None}
        return _ase_labels(row.key_value_pairs, results)

    try:
        targets = _ordered_label_units(k for row in rows() for k in row_labels(row))
    except Exception as exc:  # sqlite3 and ASE errors: a damaged database
        raise UnreadableSource(f"{path}: could not read the ASE database ({_reason(exc)})") from None

    def records() -> Iterator[RawRecord]:
        for row in rows():
            source, rid = f"{path}[id={row.id}]", _ase_id(row.key_value_pairs, f"{stem}:{row.id}")
            try:
                atoms = row.toatoms()
                atoms.info.update(row.key_value_pairs)
                record = ase_atoms_record(atoms, source, rid, row_labels(row))
            except Exception as exc:  # a row with damaged arrays must not end the run
                record = _unreadable(source, rid, MOLECULE, f"ASE database row could not be read ({_reason(exc)})")
            yield record

    return SourceReader(path, "ase_db", targets, records, [path])


# --------------------------------------------------------------------------------- densities
#: :attr:`RawRecord.fmt` of a density file; its ``data`` is the path, read in the worker
#: (:func:`pipeline.density_data.read_density`) into a density record.
DENSITY_PAYLOAD = "density_file"
_DENSITY_PREFIXES = ("CHGCAR", "CHG", "AECCAR", "PARCHG")


def is_density_name(name: str) -> bool:
    """True for a density file name: ``*.cube``, ``*.chgcar`` and VASP's ``CHGCAR*``, ``CHG*``,
    ``AECCAR*``, ``PARCHG*`` (each also ``.gz``). ``*.vasp`` stays a POSCAR name here; pass
    ``--format density`` for charge densities named so."""
    base = name[:-3] if name.lower().endswith(".gz") else name
    return base.lower().endswith((".cube", ".chgcar")) or base.upper().startswith(_DENSITY_PREFIXES)


def _is_grid_dir(path: Path) -> bool:
    """A uniform-grid density folder: it holds ``rho_<tag>.npy`` or ``rho_<tag>.npy.gz``."""
    return path.is_dir() and any(re.fullmatch(r"rho_.+\.npy(?:\.gz)?", p.name) for p in path.iterdir())


def read_density_files(path: Path, labels: Path | None = None) -> SourceReader:
    """Electron densities on grids: cube files, VASP charge densities and uniform-grid folders.

    ``path`` is one such file or folder, or a directory searched recursively (sorted) for them;
    other files there (``*.dm.npz``, ``labels.jsonl``, ...) are ignored. Each becomes one record
    (``fmt`` :data:`DENSITY_PAYLOAD`), read in the featurisation worker; a file that cannot be
    read is rejected with its name and why. Record ids: the file name without ``.cube[.gz]``,
    the folder name for a grid folder or a file named just ``CHGCAR``/``CHG``. The labels are
    the grids: no targets.
    """
    if labels is not None:
        raise MolmatError(f"{path}: density files carry their labels (the grid); --labels is not used")
    if path.is_file() or _is_grid_dir(path):
        items = [path]
    elif path.is_dir():
        items = []
        for p in sorted(path.rglob("*")):
            if p.is_dir() and _is_grid_dir(p):
                items.append(p)
            elif p.is_file() and is_density_name(p.name):
                items.append(p)
    else:
        raise MolmatError(f"{path}: no such file or directory")

    def rid(p: Path) -> str:
        name = p.name[:-3] if p.name.lower().endswith(".gz") else p.name
        if name.lower().endswith(".cube"):
            return name[:-5]
        if p.is_file() and name.upper() in _DENSITY_PREFIXES:   # VASP layout mp-1/CHGCAR -> mp-1
            return p.parent.name or name
        return name

    def records() -> Iterator[RawRecord]:
        for p in items:
            kind = CRYSTAL if p.is_file() and not p.name.lower().endswith((".cube", ".cube.gz")) else MOLECULE
            yield RawRecord(source=str(p), rid=rid(p), kind=kind, fmt=DENSITY_PAYLOAD, data=str(p))

    files = [f for p in items for f in (sorted(q for q in p.iterdir() if q.is_file()) if p.is_dir() else [p])]
    return SourceReader(path, "density", [], records, files)


#: :attr:`Format.kind` of a format that holds both kinds; each :class:`RawRecord` says which it is.
ANY_KIND = "any"


@dataclass(frozen=True)
class Format:
    """An input format: its reader and the kind of every record it yields.

    Attributes:
        reader: ``reader(path, labels_csv_or_None) -> SourceReader``.
        kind: ``records.MOLECULE``, ``records.CRYSTAL``, or :data:`ANY_KIND` for formats whose
            records say their own kind (ASE files hold molecules and crystals, told apart by pbc).
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
    "poscar": Format(read_poscar, CRYSTAL),
    "extxyz": Format(read_extxyz, ANY_KIND),
    "ase_db": Format(read_ase_db, ANY_KIND),
    "density": Format(read_density_files, ANY_KIND),
}


def format_kind(name: str) -> str:
    """Record kind (``"molecule"``, ``"crystal"`` or :data:`ANY_KIND`) of a format name of :data:`FORMATS`.

    Raises:
        MolmatError: an unknown format name.
    """
    if name not in FORMATS:
        raise MolmatError(f"unknown format '{name}'; choose one of {', '.join(FORMATS)}")
    return FORMATS[name].kind


def _xyz_flavour(path: Path) -> str:
    """``"extxyz"`` for an ``.xyz`` file in ASE's extended layout (``key=value`` pairs on the
    comment line) or with more than one frame; ``"qm9_xyz"`` for QM9 files (``gdb N`` comment)
    and single plain molecules. A file that cannot be sniffed goes to ``qm9_xyz``, whose
    featuriser reports what is wrong with it."""
    try:
        with _open_text(path) as fh:
            n = int(fh.readline().split()[0])
            comment = fh.readline()
            if comment.startswith("gdb"):
                return "qm9_xyz"
            if "=" in comment:
                return "extxyz"
            for _ in range(n):
                fh.readline()
            following = fh.readline().split()
            if len(following) == 1 and following[0].isdigit():  # the atom count of a second frame
                return "extxyz"
    except (OSError, UnicodeDecodeError, ValueError, IndexError):
        pass
    return "qm9_xyz"


def detect_format(path: Path) -> str:
    """Pick a format name from a path's name (and, for directories/archives, their contents)."""
    name = path.name.lower()
    if path.is_dir():
        # before .xyz: a uniform-grid density folder holds its atoms as centered.xyz
        if next(path.rglob("rho_*.npy*"), None) is not None:
            return "density"
        if next(path.rglob("*.xyz"), None) is not None:
            return "qm9_xyz"
        if next(path.rglob("*.cif"), None) is not None:
            return "cif"
        if any(p.is_file() and is_poscar_name(p.name) for p in path.rglob("*")):
            return "poscar"
        if any(p.is_file() and is_density_name(p.name) for p in path.rglob("*")):
            return "density"
        raise MolmatError(f"{path}: directory holds no .xyz, .cif, POSCAR or density (.cube, CHGCAR) files; pass "
                          "--format")
    if not path.exists():
        raise MolmatError(f"{path}: no such file or directory")
    if _is_archive(path):
        suffix = _archive_peek(path)
        if suffix == ".xyz":
            return "qm9_xyz"
        if suffix == ".cif":
            return "cif"
        if suffix == "poscar":
            return "poscar"
        raise MolmatError(f"{path}: archive holds no .xyz, .cif or POSCAR files; pass --format")
    if name.endswith(".xyz"):
        return _xyz_flavour(path)
    for ending, fmt in ((".extxyz", "extxyz"), (".extxyz.gz", "extxyz"), (".db", "ase_db"), (".sdf", "sdf"), (".sdf.gz", "sdf"), (".cif", "cif"),
                        (".csv", "smiles_csv"), (".csv.gz", "smiles_csv"), (".json", "pymatgen_json"),
                        (".json.gz", "pymatgen_json"), (".jsonl", "pymatgen_json"), (".jsonl.gz", "pymatgen_json")):
        if name.endswith(ending):
            return fmt
    if is_density_name(path.name):
        return "density"
    if is_poscar_name(path.name):
        return "poscar"
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


def _read_guarded(reader: SourceReader, kind: str) -> Iterator[RawRecord]:
    """The records of ``reader``; an error while reading the file ends it with one rejected record.

    The records read before the error are kept; the rest of the file cannot be read (a stream
    cannot be resynchronised), and the rejected record says so and why.
    """
    count = 0
    try:
        for raw in reader.records():
            count += 1
            yield raw
    except Exception as exc:  # not UTF-8, damaged archive, csv/JSON errors, ...: any content
        where = f"after record {count}" if count else "at its start"
        yield _unreadable(str(reader.path), f"{reader.path.name}[{count}:]", kind,
                          f"could not read the file {where}, nor anything after ({type(exc).__name__}: "
                          f"{_reason(exc)}); the {count} record(s) before were kept")


def open_input(path: str | Path, fmt: str = "auto", labels: str | Path | None = None) -> SourceReader:
    """:func:`open_source` for a run over many inputs: unreadable content becomes rejected records.

    A file whose content cannot be read (not UTF-8, not valid JSON, an unreadable header, a
    damaged archive) becomes one :data:`UNREADABLE` record naming the file and why, and an error
    in the middle of a file ends that file with one such record after the records read before
    it; the other inputs are read as usual. Mistakes in the command line (no such file, an
    unknown format, ``--labels`` where it is not used) still raise.

    Raises:
        MolmatError: the path does not exist, or its format is unknown or cannot be told.
    """
    p = Path(path)
    if not p.exists():
        raise MolmatError(f"{p}: no such file or directory")
    try:
        name = detect_format(p) if fmt in ("auto", "", None) else fmt
    except (OSError, EOFError, tarfile.TarError, ValueError) as exc:  # a damaged archive or unreadable file
        raise MolmatError(f"{p}: could not read it to tell its format ({_reason(exc)}); pass --format or fix "
                          "the file") from None
    kind = format_kind(name)
    kind = MOLECULE if kind == ANY_KIND else kind
    try:
        reader = open_source(p, name, labels)
    except UnreadableSource as exc:
        reason = str(exc)
    except MolmatError:
        raise
    except Exception as exc:  # content errors while reading a header or a first item
        reason = f"{p}: could not be read ({type(exc).__name__}: {_reason(exc)})"
    else:
        return SourceReader(reader.path, reader.fmt, reader.targets, lambda: _read_guarded(reader, kind), reader.files)
    log.warning("%s; the file is rejected, the other inputs are read", reason)
    files = _dir_files(p) if p.is_dir() else [p]
    return SourceReader(p, name, [], lambda: iter([_unreadable(str(p), p.name, kind, reason)]), files)
