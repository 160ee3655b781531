"""The record contract: key names, the schema of every array, and the binary codec.

A record is what one structure becomes: named numpy arrays plus string metadata under keys
starting with ``_``. Every module names keys through the constants below, and :data:`SCHEMA`
says for each key its dtype, its shape (in the symbols of :data:`SHAPE_SYMBOLS`), the record
kinds that carry it, and how it transforms when the same structure is described differently:

* ``points``: Cartesian coordinates in Angstrom (last axis x, y, z). A rotation ``R`` maps
  them to ``x @ R.T``, a translation adds ``t``; a supercell replicates them.
* ``lattice``: rows are the lattice vectors (Angstrom). Rotated like points, never translated;
  a supercell ``M`` (integer 3x3) makes it ``M @ cell``.
* ``atom_index``: the values are atom indices; relabelling atoms remaps the values.
* ``per_atom``: one row per atom; relabelling atoms reorders the rows; values never change.
* ``image``: integer lattice offsets of an edge's source atom, so that an edge vector is
  ``pos[src] + image @ cell - pos[dst]``; unchanged by rotation, translation and relabelling,
  re-derived for another cell.
* ``invariant``: unchanged by all of these.

Whatever the transform, the atom axis (symbol ``N``) follows a relabelling of the atoms and an
edge axis (``B`` bonds, ``E`` neighbour edges) follows a reordering of the edges.
:mod:`pipeline.testing` applies the transforms from this table; the README renders it with
:func:`schema_markdown`.

Record layout on disk (little-endian, readable with numpy alone, no pickle)::

    b"MMR1" | uint32 header_len | header (UTF-8 JSON) | zero pad to 8 |
    array bytes, each starting on an 8-byte boundary | uint32 crc32 of everything before

The header is ``{"meta": {...strings...}, "arrays": [[name, dtype, shape, offset, nbytes], ...]}``
with offsets counted from the first array byte and numpy dtype strings (``"<f8"``).
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import MolmatError

# ------------------------------------------------------------------------------------ key names
Z = "z"
POS = "pos"
CELL = "cell"
ATOM_FEAT = "atom_feat"
BOND_INDEX = "bond_index"
BOND_FEAT = "bond_feat"
NBR_INDEX = "nbr_index"
NBR_IMAGE = "nbr_image"
Y = "y"
CONFORMERS = "conformers"
# electron-density grids (pipeline.density_data): the grid of a density record, stored once
GRID_ORIGIN = "grid_origin"
GRID_AXES = "grid_axes"
GRID_SHAPE = "grid_shape"
GRID_VALUES = "grid_values"
# metadata: strings in the record header (``_index`` is added by ShardDataset when reading)
ID = "_id"
KIND = "_kind"
SOURCE = "_source"
SMILES = "_smiles"
SCAFFOLD = "_scaffold"
FORMULA = "_formula"
INDEX = "_index"
DENSITY = "_density"

# ---------------------------------------------------------------------------------------- kinds
MOLECULE = "molecule"
CRYSTAL = "crystal"
#: Every record kind, in a fixed order.
KINDS = (MOLECULE, CRYSTAL)

#: How an array transforms (see the module docstring).
TRANSFORMS = ("points", "lattice", "atom_index", "per_atom", "image", "invariant")
#: Shape symbols: what each letter of a shape counts.
SHAPE_SYMBOLS = {"N": "atoms", "B": "bonds", "E": "neighbour edges", "T": "targets", "K": "extra conformers",
                 "G": "density grid points"}


@dataclass(frozen=True)
class ArraySpec:
    """One key of a record.

    Attributes:
        name: the key (one of the constants of this module).
        dtype: numpy dtype name (``"float64"``), or ``"str"`` for header metadata.
        shape: e.g. ``"(N, 3)"``; letters are :data:`SHAPE_SYMBOLS`, numbers are fixed sizes,
            ``"()"`` a scalar.
        transform: one of :data:`TRANSFORMS`.
        kinds: record kinds that may carry it.
        required: every record of those kinds carries it.
        doc: what it holds, with units.
    """

    name: str
    dtype: str
    shape: str
    transform: str
    kinds: tuple[str, ...]
    required: bool
    doc: str

    @property
    def dims(self) -> tuple[str, ...]:
        """The shape as a tuple of symbols and sizes, ``"(N, 3)"`` -> ``("N", "3")``."""
        inner = self.shape.strip()[1:-1]
        return tuple(p.strip() for p in inner.split(",") if p.strip())

    @property
    def is_meta(self) -> bool:
        """True for string metadata stored in the record header."""
        return self.name.startswith("_")


_BOTH = (MOLECULE, CRYSTAL)

#: Every key a record may carry.
SCHEMA: tuple[ArraySpec, ...] = (
    ArraySpec(Z, "uint8", "(N,)", "per_atom", _BOTH, True, "atomic numbers, 1..94"),
    ArraySpec(POS, "float64", "(N, 3)", "points", _BOTH, False,
              "Cartesian coordinates (Angstrom); every crystal, molecules unless from SMILES without embedding"),
    ArraySpec(CELL, "float64", "(3, 3)", "lattice", (CRYSTAL,), True, "lattice vectors as rows (Angstrom)"),
    ArraySpec(ATOM_FEAT, "int8", "(N, 8)", "per_atom", _BOTH, True,
              "integer atom columns (`pipeline.featurize.ATOM_COLUMNS`); crystals fill only Z"),
    ArraySpec(BOND_INDEX, "int32", "(2, B)", "atom_index", (MOLECULE,), True,
              "chemical bonds (begin, end atom), each bond once"),
    ArraySpec(BOND_FEAT, "int8", "(B, 3)", "invariant", (MOLECULE,), True,
              "integer bond columns (`pipeline.featurize.BOND_COLUMNS`)"),
    ArraySpec(NBR_INDEX, "int32", "(2, E)", "atom_index", _BOTH, False,
              "3D neighbour edges (src, dst), both directions; every record with coordinates"),
    ArraySpec(NBR_IMAGE, "int8", "(E, 3)", "image", _BOTH, False,
              "lattice offset of each edge's src: vector `pos[src] + image @ cell - pos[dst]`; zeros for molecules"),
    ArraySpec(Y, "float64", "(T,)", "invariant", _BOTH, True,
              "labels in the manifest's target order and units, NaN where missing"),
    ArraySpec(CONFORMERS, "float32", "(K, N, 3)", "points", (MOLECULE,), False,
              "extra ETKDG conformers (Angstrom) when `preprocess.molecule.conformers` > 0"),
    ArraySpec(GRID_ORIGIN, "float64", "(3,)", "points", _BOTH, False,
              "density records: position of grid point (0, 0, 0) (Angstrom)"),
    ArraySpec(GRID_AXES, "float64", "(3, 3)", "lattice", _BOTH, False,
              "density records: voxel step vectors as rows (Angstrom), point (i, j, k) = origin + (i, j, k) @ axes; "
              "a periodic grid spans the cell, `grid_shape[:, None] * grid_axes == cell` (no supercells: "
              "`pipeline.testing.supercell` does not rebuild grids)"),
    ArraySpec(GRID_SHAPE, "int64", "(3,)", "invariant", _BOTH, False,
              "density records: grid points along each axis (n1, n2, n3)"),
    ArraySpec(GRID_VALUES, "float32", "(G,)", "invariant", _BOTH, False,
              "density records: electron density (e/bohr^3) at every grid point, C order of `grid_shape`; "
              "float32 (7 digits, more than the labels' accuracy)"),
    ArraySpec(ID, "str", "()", "invariant", _BOTH, True, "record id (QM9 index, mp-id, row number, ...)"),
    ArraySpec(KIND, "str", "()", "invariant", _BOTH, True, "`molecule` or `crystal`"),
    ArraySpec(SOURCE, "str", "()", "invariant", _BOTH, True, "input file (`archive::member` for archive members)"),
    ArraySpec(SMILES, "str", "()", "invariant", (MOLECULE,), True, "canonical SMILES without hydrogens"),
    ArraySpec(SCAFFOLD, "str", "()", "invariant", (MOLECULE,), True, "Bemis-Murcko scaffold SMILES ('' if none)"),
    ArraySpec(FORMULA, "str", "()", "invariant", (CRYSTAL,), True, "reduced formula"),
    ArraySpec(DENSITY, "str", "()", "invariant", _BOTH, False,
              "density records only: what the grid counts, `total`, `valence` or `unknown` electrons"),
    ArraySpec(INDEX, "int", "()", "invariant", _BOTH, False,
              "global record index, added by `ShardDataset` when reading; never stored"),
)

#: Key -> spec.
SPECS: dict[str, ArraySpec] = {s.name: s for s in SCHEMA}


def schema_markdown() -> str:
    """The record schema as a Markdown table (what the README shows under "Records")."""
    lines = ["| key | dtype | shape | transforms as | kinds | always | meaning |",
             "|---|---|---|---|---|---|---|"]
    for s in SCHEMA:
        kinds = "both" if set(s.kinds) == set(KINDS) else ", ".join(s.kinds)
        lines.append(f"| `{s.name}` | {s.dtype} | {s.shape} | {s.transform} | {kinds} | "
                     f"{'yes' if s.required else 'no'} | {s.doc} |")
    symbols = ", ".join(f"{k} {v}" for k, v in SHAPE_SYMBOLS.items())
    lines.append("")
    lines.append(f"Shapes: {symbols}. Transforms: `points` rotate as `x @ R.T` and translate; "
                 "`lattice` rows rotate, a supercell `M` gives `M @ cell`; `atom_index` values are "
                 "remapped when atoms are relabelled; `per_atom` rows are reordered; `image` offsets are "
                 "re-derived for another cell; `invariant` never changes.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------- codec
MAGIC = b"MMR1"


class CorruptRecordError(MolmatError):
    """A record whose bytes do not match its checksum or layout."""


def encode_record(arrays: dict[str, Any]) -> bytes:
    """Serialise a featurised record: numpy arrays plus ``_``-prefixed string metadata.

    Args:
        arrays: name -> numpy array; keys starting with ``_`` are strings stored in the header.
    Returns:
        The record bytes (header, aligned array data, crc32).
    """
    meta = {k[1:]: v for k, v in arrays.items() if k.startswith("_")}
    entries = []
    chunks = []
    offset = 0
    for name, value in arrays.items():
        if name.startswith("_"):
            continue
        arr = np.ascontiguousarray(value)
        if arr.dtype.hasobject:
            raise TypeError(f"array '{name}' has object dtype; only numeric arrays are stored")
        data = arr.tobytes()
        entries.append([name, arr.dtype.str, list(arr.shape), offset, len(data)])
        chunks.append(data)
        pad = (-len(data)) % 8
        if pad:
            chunks.append(b"\0" * pad)
        offset += len(data) + pad
    header = json.dumps({"meta": meta, "arrays": entries}, separators=(",", ":")).encode()
    head = MAGIC + struct.pack("<I", len(header)) + header
    head += b"\0" * ((-len(head)) % 8)
    body = head + b"".join(chunks)
    return body + struct.pack("<I", zlib.crc32(body))


def decode_record(buf: bytes | memoryview, where: str = "record") -> dict[str, Any]:
    """Inverse of :func:`encode_record`; verifies the checksum.

    Args:
        buf: record bytes.
        where: text naming the shard and key, used in error messages.
    Returns:
        name -> read-only numpy array viewing ``buf``, plus the ``_`` metadata strings.
    Raises:
        CorruptRecordError: checksum mismatch, bad magic or a layout that does not fit.
    """
    view = memoryview(buf)
    if len(view) < 12 or bytes(view[:4]) != MAGIC:
        raise CorruptRecordError(f"{where}: not a molmat record (bad magic); the shard is corrupt, re-run preprocess")
    (crc,) = struct.unpack_from("<I", view, len(view) - 4)
    if zlib.crc32(view[:-4]) != crc:
        raise CorruptRecordError(f"{where}: checksum mismatch; the shard is corrupt, re-run preprocess")
    (hlen,) = struct.unpack_from("<I", view, 4)
    try:
        header = json.loads(bytes(view[8:8 + hlen]))
    except ValueError:
        raise CorruptRecordError(f"{where}: unreadable header") from None
    start = 8 + hlen
    start += (-start) % 8
    out: dict[str, Any] = {f"_{k}": v for k, v in header["meta"].items()}
    for name, dtype, shape, off, nbytes in header["arrays"]:
        arr = np.frombuffer(view, dtype=np.dtype(dtype), count=math.prod(shape), offset=start + off)
        out[name] = arr.reshape(shape)
    return out
