"""Raw records to plain numpy arrays (the content of one shard record).

Molecules get an RDKit bond graph with Gilmer-style atom and bond features, 3D coordinates in
the *same atom order* as the graph, a 3D neighbour graph within a cutoff, optional extra ETKDG
conformers, canonical SMILES and Bemis-Murcko scaffold. Crystals (parsed by pymatgen) get a
periodic neighbour list (cutoff, nearest ``max_neighbors``) with integer image offsets, so that
every distance can be recomputed exactly as ``|pos[src] + image @ cell - pos[dst]|``. Both
neighbour graphs come from :mod:`pipeline.neighbours`; the keys and dtypes of a record are
those of :data:`pipeline.records.SCHEMA`.

Features are stored as small integer columns (see :data:`ATOM_COLUMNS`, :data:`BOND_COLUMNS`);
:mod:`pipeline.graphs` expands them to one-hot vectors. Anything wrong with one record raises
:class:`RecordError`, which the preprocessing driver turns into a line of ``rejects.jsonl``.

:func:`featurization_spec` says what a model must agree with to read shards, and
:data:`KEY_RELEVANCE` with :func:`featurization_differences` which of it matters for a given
model (2D or 3D views, molecules or crystals); :func:`neighbour_cutoff` is the one rule for the
cutoff a 3D encoder may use on a dataset.
"""
from __future__ import annotations

import math
import re
import warnings
from typing import Any, Iterable, NamedTuple

import numpy as np

from pipeline import neighbours
from pipeline import records as R
from pipeline.config import PreprocessConfig
from pipeline.elements import element_symbol
from pipeline.readers import LABEL_ERROR, QM9_PROPERTIES, UNREADABLE, RawRecord

#: Version of the featurisation below; models refuse shards made with another one.
FEATURIZATION_VERSION = 2
#: Largest atomic number the element embedding covers (H..Pu, all of Materials Project).
MAX_Z = 94
#: Integer atom feature columns stored in ``atom_feat`` (N, 8), int8.
ATOM_COLUMNS = ("Z", "aromatic", "hybridization", "num_h", "donor", "acceptor", "formal_charge", "in_ring")
#: Hybridisation codes: 0 other/none, 1 sp, 2 sp2, 3 sp3, 4 sp3d, 5 sp3d2.
#: Integer bond feature columns stored in ``bond_feat`` (E, 3), int8; bond type 1/2/3, 4 aromatic.
BOND_COLUMNS = ("bond_type", "conjugated", "in_ring")


class RecordError(Exception):
    """A record that cannot be used; the message is the reason written to rejects.jsonl."""


_FORTRAN_EXP = re.compile(r"\*\^")


def _qm9_float(token: str) -> float:
    """Parse a QM9 number, accepting Fortran-style exponents such as ``1.2*^-6``."""
    return float(_FORTRAN_EXP.sub("e", token))


def parse_labels(raw: dict[str, Any], targets: list[str]) -> np.ndarray:
    """Convert raw label values to float64 in target order; missing values become NaN.

    Missing means absent, empty, or a NaN spelling (``nan``, ``NA``, ``null``, ...). Infinity is
    not a label value: stored, it would count as missing everywhere downstream and hide a
    broken source, so it is refused.

    Raises:
        RecordError: a value is present but not a finite number, or the reader could not read
            the record's labels (``raw[LABEL_ERROR]``, when any target is asked for).
    """
    if targets and LABEL_ERROR in raw:
        raise RecordError(str(raw[LABEL_ERROR]))
    y = np.full(len(targets), np.nan, dtype=np.float64)
    for i, name in enumerate(targets):
        value = raw.get(name)
        if value is None:
            continue
        if isinstance(value, (int, float)):
            try:
                y[i] = float(value)
            except OverflowError:  # a JSON integer beyond float range
                raise RecordError(f"label '{name}' is out of the float range: {value!r:.40}") from None
        else:
            text = str(value).strip()
            if text == "" or text.lower() in ("nan", "na", "n/a", "none", "null"):
                continue
            try:
                y[i] = _qm9_float(text)
            except ValueError:
                raise RecordError(f"label '{name}' is not a number: {text[:60]!r}") from None
        if np.isinf(y[i]):
            raise RecordError(f"label '{name}' is infinite ({value!r:.40}); write NaN or leave it empty for a "
                              "missing value")
    return y


# ------------------------------------------------------------------------------------ molecules
_RDKIT: dict[str, Any] = {}


def _rdkit() -> dict[str, Any]:
    """Import RDKit lazily once per process and compile the donor/acceptor SMARTS."""
    if not _RDKIT:
        from rdkit import Chem, RDLogger
        from rdkit.Chem import AllChem, rdDetermineBonds
        from rdkit.Chem.Scaffolds import MurckoScaffold

        RDLogger.DisableLog("rdApp.*")
        _RDKIT.update(
            Chem=Chem, AllChem=AllChem, rdDetermineBonds=rdDetermineBonds, Murcko=MurckoScaffold,
            # Donor/acceptor definitions follow RDKit's BaseFeatures.fdef (as used by Gilmer et al.).
            donor=Chem.MolFromSmarts("[$([N;!H0;v3]),$([N;!H0;+1;v4]),$([O,S;H1;+0]),$([n;H1;+0])]"),
            acceptor=Chem.MolFromSmarts(
                "[$([O,S;H1;v2]-[!$(*=[O,N,P,S])]),$([O,S;H0;v2]),$([O,S;-]),$([O,S;H0;v1]),"
                "$([o,s;+0;!$([o,s]:n);!$([o,s]:c:n)]),$([n;H0;+0]),$([N;H0;+0;$(N#[C,N])]),"
                "$([N;H0;v3;+0;!$(N-[C,S,P]=[O,N,S])]),$([F;+0])]"),
            hyb={"SP": 1, "SP2": 2, "SP3": 3, "SP3D": 4, "SP3D2": 5},
            ptable=Chem.GetPeriodicTable(),
        )
    return _RDKIT


def symbol_of(z: int) -> str:
    """Element symbol of an atomic number 1..118 (see :func:`pipeline.elements.element_symbol`)."""
    return element_symbol(z)


def _check_elements(z: np.ndarray, symbols: list[str] | None = None) -> None:
    bad = np.flatnonzero((z < 1) | (z > MAX_Z))
    if bad.size:
        i = int(bad[0])
        sym = symbols[i] if symbols else str(int(z[i]))
        raise RecordError(f"element {sym} (Z={int(z[i])}) at atom {i} is outside the supported table (Z 1-{MAX_Z})")


def _parse_xyz(text: str) -> tuple[list[str], np.ndarray, list[str], str | None]:
    """Split an (extended, QM9) xyz text into symbols, positions, comment tokens and SMILES."""
    lines = text.splitlines()
    try:
        n = int(lines[0].split()[0])
    except (IndexError, ValueError):
        raise RecordError("xyz: first line is not an atom count") from None
    if n <= 0 or len(lines) < n + 2:
        raise RecordError(f"xyz: truncated file: {n} atoms declared, {max(len(lines) - 2, 0)} atom lines present")
    symbols: list[str] = []
    pos = np.empty((n, 3), dtype=np.float64)
    for i in range(n):
        parts = lines[2 + i].split()
        if len(parts) < 4:
            raise RecordError(f"xyz: atom line {i + 1} has {len(parts)} fields, expected element x y z")
        symbols.append(parts[0])
        try:
            pos[i] = [_qm9_float(t) for t in parts[1:4]]
        except ValueError:
            raise RecordError(f"xyz: atom line {i + 1}: coordinates are not numbers: {parts[1:4]}") from None
    if len(lines) > n + 2 and _is_atom_line(lines[n + 2]):
        # a count that is too small would silently drop the atoms after it
        raise RecordError(f"xyz: {n} atoms declared, but line {n + 3} is another atom line "
                          f"({lines[n + 2].strip()[:40]!r}); the atom count on line 1 is wrong")
    smiles = None
    if len(lines) > n + 3:
        cols = lines[n + 3].split()
        smiles = cols[-1] if cols else None  # QM9: GDB SMILES, then relaxed-geometry SMILES
    return symbols, pos, lines[1].split(), smiles


def _is_atom_line(line: str) -> bool:
    """True for ``element x y z ...`` (an element symbol, then three numbers)."""
    parts = line.split()
    if len(parts) < 4 or not parts[0].isalpha():
        return False
    try:
        [_qm9_float(t) for t in parts[1:4]]
    except ValueError:
        return False
    return True


def _is_number_token(token: str) -> bool:
    try:
        _qm9_float(token)
    except ValueError:
        return False
    return True


def _qm9_labels(comment: list[str], source: str = "") -> dict[str, Any]:
    """QM9 line 2: ``gdb <index>`` then the 15 properties.

    A plain xyz comment gives no labels. A damaged QM9 property line (a file named like QM9's
    ``dsgdb9nsd_*``, or a line that ends in 15 numbers, without the exact ``gdb <index>`` layout)
    gives :data:`LABEL_ERROR` instead of silently no labels.
    """
    if len(comment) == 17 and comment[0] == "gdb":
        return {name: comment[2 + i] for i, (name, _) in enumerate(QM9_PROPERTIES)}
    name = source.replace("::", "/").rsplit("/", 1)[-1]
    looks_qm9 = len(comment) >= 16 and all(_is_number_token(t) for t in comment[-15:])
    if name.startswith("dsgdb9nsd_") or looks_qm9:
        shown = " ".join(comment)[:60]
        return {LABEL_ERROR: f"xyz: damaged QM9 property line (expected 'gdb <index>' and 15 numbers, got "
                             f"{len(comment)} fields: {shown!r}); its labels cannot be read"}
    return {}


def _generic(mol: Any) -> Any:
    """Copy of ``mol`` with only elements and connectivity: single bonds, no charges/aromaticity."""
    Chem = _rdkit()["Chem"]
    rw = Chem.RWMol(mol)
    for b in rw.GetBonds():
        b.SetBondType(Chem.BondType.SINGLE)
        b.SetIsAromatic(False)
    for a in rw.GetAtoms():
        a.SetFormalCharge(0)
        a.SetIsAromatic(False)
    return rw.GetMol()


def _mol_from_xyz(symbols: list[str], pos: np.ndarray, smiles: str | None) -> Any:
    """RDKit molecule in xyz atom order with bonds, orders and charges from the SMILES.

    The SMILES order differs from the xyz order. The SMILES graph (with H) is matched onto the
    distance-based connectivity of the xyz atoms, then renumbered into xyz order, so the graph
    is exactly the SMILES graph and atom i is xyz atom i. Strained rings whose non-bonded
    contacts look like bonds (bicyclo[1.1.1]pentanes) still match, because the SMILES graph only
    needs to be a subgraph of the geometric one. Without a usable SMILES, bond orders are
    inferred from the geometry.
    """
    rd = _rdkit()
    Chem = rd["Chem"]
    block = f"{len(symbols)}\n\n" + "\n".join(
        f"{s} {x:.10f} {y:.10f} {z:.10f}" for s, (x, y, z) in zip(symbols, pos))
    template = Chem.MolFromSmiles(smiles) if smiles else None
    if template is not None:
        template = Chem.AddHs(template)
    if template is not None and template.GetNumAtoms() == len(symbols):
        query = _generic(template)
        for cov_factor in (1.3, 1.45):  # a longer bond than usual needs a looser cutoff
            geom = Chem.MolFromXYZBlock(block)
            if geom is None:
                break
            rd["rdDetermineBonds"].DetermineConnectivity(geom, covFactor=cov_factor)
            match = geom.GetSubstructMatch(query)
            if match:
                order = [0] * len(match)
                for k, i in enumerate(match):
                    order[i] = k
                return Chem.RenumberAtoms(template, order)
    mol = Chem.MolFromXYZBlock(block)
    if mol is None:
        raise RecordError("xyz: RDKit could not read the atoms (unknown element symbol?)")
    try:
        rd["rdDetermineBonds"].DetermineBonds(mol, charge=0)
        return mol
    except Exception as exc:  # RDKit raises plain RuntimeError/ValueError here
        first = exc
    # The default (xyz2mol's valence enumeration) fails on strained bicyclic cages (19 of 872 QM9
    # molecules whose density cubes carry no SMILES); the extended-Hueckel connectivity gets them.
    mol = Chem.MolFromXYZBlock(block)
    try:
        rd["rdDetermineBonds"].DetermineBonds(mol, charge=0, useHueckel=True)
        return mol
    except Exception:  # noqa: BLE001
        why = "SMILES does not match the geometry" if template is not None else "no SMILES in the file"
        raise RecordError(f"xyz: {why}, and bond orders from geometry failed ({str(first).splitlines()[0]})") from None


def _molecule_arrays(mol: Any, pos: np.ndarray | None, cfg: PreprocessConfig) -> dict[str, Any]:
    """Atom/bond features, neighbour graph, conformers, SMILES and scaffold of an RDKit molecule."""
    rd = _rdkit()
    Chem = rd["Chem"]
    n = mol.GetNumAtoms()
    z = np.fromiter((a.GetAtomicNum() for a in mol.GetAtoms()), dtype=np.int64, count=n)
    _check_elements(z, [a.GetSymbol() for a in mol.GetAtoms()])
    donors = {m[0] for m in mol.GetSubstructMatches(rd["donor"])}
    acceptors = {m[0] for m in mol.GetSubstructMatches(rd["acceptor"])}
    feat = np.zeros((n, len(ATOM_COLUMNS)), dtype=np.int8)
    hyb = rd["hyb"]
    for a in mol.GetAtoms():
        i = a.GetIdx()
        feat[i] = (z[i], a.GetIsAromatic(), hyb.get(str(a.GetHybridization()), 0), a.GetTotalNumHs(includeNeighbors=True),
                   i in donors, i in acceptors, a.GetFormalCharge(), a.IsInRing())
    nb = mol.GetNumBonds()
    bond_index = np.zeros((2, nb), dtype=np.int32)
    bond_feat = np.zeros((nb, len(BOND_COLUMNS)), dtype=np.int8)
    for b in mol.GetBonds():
        k = b.GetIdx()
        bond_index[:, k] = (b.GetBeginAtomIdx(), b.GetEndAtomIdx())
        order = 4 if b.GetIsAromatic() else int(round(b.GetBondTypeAsDouble()))
        bond_feat[k] = (order, b.GetIsConjugated(), b.IsInRing())
    try:
        heavy = Chem.RemoveHs(mol)
        smiles = Chem.MolToSmiles(heavy)
        scaffold = rd["Murcko"].MurckoScaffoldSmiles(mol=heavy)
    except Exception:  # scaffolds of odd valence states; the molecule itself is fine
        smiles, scaffold = Chem.MolToSmiles(mol), ""
    # key order is the on-disk order: keep it, records are compared byte for byte
    out: dict[str, Any] = {R.Z: z.astype(np.uint8), R.ATOM_FEAT: feat, R.BOND_INDEX: bond_index,
                           R.BOND_FEAT: bond_feat, R.SMILES: smiles, R.SCAFFOLD: scaffold}
    if pos is not None:
        if not np.all(np.isfinite(pos)):
            raise RecordError("coordinates contain NaN or infinity")
        check_geometry(pos, z, None, cfg)
        out[R.POS] = pos.astype(np.float64)
        src, dst = molecule_neighbours(pos, cfg.molecule.cutoff)
        out[R.NBR_INDEX] = np.stack([src, dst]).astype(np.int32)
        out[R.NBR_IMAGE] = np.zeros((src.size, 3), dtype=np.int8)
    if cfg.molecule.conformers > 0:
        out[R.CONFORMERS] = _extra_conformers(mol, cfg.molecule.conformers, cfg.molecule.seed,
                                              cfg.molecule.cutoff + 1.0)
    return out


#: Largest coordinate or lattice vector component accepted (Angstrom): far beyond any real
#: structure, and small enough that distances and periodic image ranges stay finite.
MAX_COORDINATE = 1e5
#: Largest number of neighbour pairs a crystal's search may be expected to find, estimated from
#: the density before searching (about 1 GB of pairs at the search's peak).
MAX_NEIGHBOUR_PAIRS = 2e7


def check_geometry(pos: np.ndarray, z: np.ndarray, cell: np.ndarray | None, cfg: PreprocessConfig) -> None:
    """Refuse geometry no real structure has, before the neighbour search spends memory on it.

    :func:`check_extent`, then :func:`check_min_distance`.

    Args:
        pos: (N, 3) Cartesian coordinates, Angstrom, finite.
        z: (N,) atomic numbers (for messages).
        cell: (3, 3) lattice vectors as rows (Angstrom), or None for a molecule.
        cfg: the preprocessing config.
    Raises:
        RecordError: naming the check, the atoms and the setting to change.
    """
    check_extent(pos, cell, cfg)
    check_min_distance(pos, z, cell, cfg)


def check_extent(pos: np.ndarray, cell: np.ndarray | None, cfg: PreprocessConfig) -> None:
    """Coordinates (and lattice vectors) within +-:data:`MAX_COORDINATE` Angstrom; for crystals,
    at least ``preprocess.crystal.min_volume_per_atom`` of cell volume per atom and an expected
    pair count (density x cutoff sphere x atoms) below :data:`MAX_NEIGHBOUR_PAIRS`.

    Args and errors as :func:`check_geometry`.
    """
    values = np.abs(pos) if cell is None else np.concatenate([np.abs(pos).ravel(), np.abs(cell).ravel()])
    if values.size and values.max() > MAX_COORDINATE:
        raise RecordError(f"a coordinate is {float(values.max()):.3g} A from the origin (more than "
                          f"{MAX_COORDINATE:.0e} A): not a physical structure")
    n = len(pos)
    if cell is not None:
        per_atom = abs(float(np.linalg.det(cell))) / n
        if per_atom < cfg.crystal.min_volume_per_atom:
            raise RecordError(f"cell volume per atom is {per_atom:.3g} A^3, below "
                              f"preprocess.crystal.min_volume_per_atom ({cfg.crystal.min_volume_per_atom} A^3): "
                              "a degenerate or mis-scaled cell")
        rc = cfg.crystal.cutoff
        pairs = n * (4.0 / 3.0 * math.pi * rc ** 3) / per_atom
        if pairs > MAX_NEIGHBOUR_PAIRS:
            raise RecordError(f"the neighbour search would find about {pairs:.2g} pairs ({n} atoms, {per_atom:.3g} "
                              f"A^3 per atom, cutoff {rc} A; at most {MAX_NEIGHBOUR_PAIRS:.0e}); lower "
                              "preprocess.crystal.cutoff")


def check_min_distance(pos: np.ndarray, z: np.ndarray, cell: np.ndarray | None, cfg: PreprocessConfig,
                       edges: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None) -> None:
    """No two atoms (periodic images included) closer than ``preprocess.min_distance``.

    Args:
        pos, z, cell, cfg: as :func:`check_geometry`.
        edges: a crystal's neighbour list ``(src, dst, image)`` reaching at least
            ``min_distance`` (it holds each atom's nearest neighbours, so the closest pair), which
            spares a second search; None to search here.
    Raises:
        RecordError: naming the two atoms, their distance and the setting.
    """
    n = len(pos)
    if edges is not None:
        a, b, image = edges
        dist = np.linalg.norm(pos[a] + image @ cell - pos[b], axis=1) if len(a) else np.zeros(0)
    elif cell is None and n <= 512:  # all pairs at once: cheaper than a search for a molecule
        d2 = ((pos[:, None, :] - pos[None, :, :]) ** 2).sum(-1)
        a, b = np.triu_indices(n, 1)
        dist = np.sqrt(d2[a, b])
        image = np.zeros((len(a), 3), np.int64)
    else:
        a, b, image, dist = neighbours.radius_search(pos, pos, cfg.min_distance, cell, exclude_self=True, tol=0.0)
    if not len(dist) or dist.min() >= cfg.min_distance:
        return
    k = int(np.argmin(dist))
    i, j = int(a[k]), int(b[k])
    where = "its own periodic image" if i == j else (f"atom {j} ({symbol_of(int(z[j]))})"
                                                     + (" in a neighbouring cell" if image[k].any() else ""))
    raise RecordError(f"atom {i} ({symbol_of(int(z[i]))}) is {float(dist[k]):.3g} A from {where}, closer than "
                      f"preprocess.min_distance ({cfg.min_distance} A): overlapping or duplicated atoms")


def molecule_neighbours(pos: np.ndarray, cutoff: float) -> tuple[np.ndarray, np.ndarray]:
    """Directed pairs (src, dst), src != dst, closer than ``cutoff``; sorted by (dst, src).

    Kept for importers; the search is :func:`pipeline.neighbours.molecule_neighbours`.
    """
    return neighbours.molecule_neighbours(pos, cutoff)


def _extra_conformers(mol: Any, count: int, seed: int, gap: float = 6.0) -> np.ndarray:
    """``count`` ETKDG conformers (K, N, 3) float32 in the molecule's atom order.

    Fragments of a multi-fragment molecule are moved ``gap`` apart (:func:`separate_fragments`).
    """
    rd = _rdkit()
    copy = rd["Chem"].Mol(mol)
    copy.RemoveAllConformers()
    params = rd["AllChem"].ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    ids = list(rd["AllChem"].EmbedMultipleConfs(copy, numConfs=count, params=params))
    confs = [separate_fragments(mol, copy.GetConformer(i).GetPositions(), gap) for i in ids]
    return np.asarray(confs, dtype=np.float32).reshape(len(confs), mol.GetNumAtoms(), 3)


def separate_fragments(mol: Any, pos: np.ndarray, gap: float) -> np.ndarray:
    """Coordinates with the fragments of a multi-fragment molecule (a salt, a mixture) set apart.

    ETKDG embeds each fragment of ``Na+.Cl-`` or ``CC(=O)[O-].[NH4+]`` around the same origin, so
    fragments overlap. Their relative placement is undefined by a SMILES; here each fragment
    after the first keeps its own conformer and is moved along x until its atoms are ``gap``
    beyond the previous fragments, at the first fragment's y, z centre. With ``gap`` above the
    3D neighbour cutoff no 3D edge joins two fragments, so the graph does not depend on the
    placement.

    Args:
        mol: the RDKit molecule (with hydrogens).
        pos: (N, 3) coordinates, Angstrom, in the molecule's atom order.
        gap: distance (Angstrom) between the fragments' extents along x.
    Returns:
        (N, 3) coordinates; ``pos`` itself for a single fragment.
    """
    frags = _rdkit()["Chem"].GetMolFrags(mol)
    if len(frags) < 2:
        return pos
    out = np.array(pos, dtype=np.float64)
    first = list(frags[0])
    centre_yz = out[first, 1:].mean(0)
    right = out[first, 0].max()
    for atoms in frags[1:]:
        idx = list(atoms)
        block = out[idx]
        block[:, 0] += right + gap - block[:, 0].min()
        block[:, 1:] += centre_yz - block[:, 1:].mean(0)
        out[idx] = block
        right = block[:, 0].max()
    return out


def _embed(mol: Any, seed: int) -> np.ndarray:
    """One ETKDG conformer for a molecule from SMILES (with explicit Hs)."""
    rd = _rdkit()
    params = rd["AllChem"].ETKDGv3()
    params.randomSeed = seed
    params.numThreads = 1
    if rd["AllChem"].EmbedMolecule(mol, params) != 0:
        params.useRandomCoords = True
        if rd["AllChem"].EmbedMolecule(mol, params) != 0:
            raise RecordError("RDKit ETKDG could not generate 3D coordinates")
    return mol.GetConformer().GetPositions()


def featurize_molecule(raw: RawRecord, cfg: PreprocessConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Molecule record to arrays; returns (arrays, raw labels)."""
    rd = _rdkit()
    Chem = rd["Chem"]
    labels = raw.labels
    if raw.fmt == "xyz":
        symbols, pos, comment, smiles = _parse_xyz(raw.data)
        ptable = rd["ptable"]
        numbers: list[int] = []
        for i, s in enumerate(symbols):
            try:
                zi = ptable.GetAtomicNumber(s)
            except Exception:
                raise RecordError(f"xyz: unknown element symbol {s!r} at atom {i}") from None
            if zi > MAX_Z:
                raise RecordError(f"element {s} (Z={zi}) at atom {i} is outside the supported table (Z 1-{MAX_Z})")
            numbers.append(zi)
        if not np.all(np.isfinite(pos)):
            raise RecordError("coordinates contain NaN or infinity")
        # before RDKit perceives bonds: overlapping atoms would fail there with a less clear reason
        check_geometry(pos, np.asarray(numbers), None, cfg)
        mol = _mol_from_xyz(symbols, pos, smiles)
        try:
            Chem.SanitizeMol(mol)
        except Exception as exc:
            raise RecordError(f"xyz: RDKit could not sanitize the molecule ({str(exc).splitlines()[0]})") from None
        labels = labels or _qm9_labels(comment, raw.source)
    elif raw.fmt == "molblock":
        mol = Chem.MolFromMolBlock(raw.data, removeHs=False, sanitize=True)
        if mol is None:
            raise RecordError("SDF: RDKit could not parse or sanitize the molblock")
        pos = mol.GetConformer().GetPositions() if mol.GetNumConformers() else None
    elif raw.fmt == "smiles":
        smi = (raw.data or "").strip()
        base = Chem.MolFromSmiles(smi) if smi else None
        if base is None:
            raise RecordError(f"RDKit rejected the SMILES {smi!r}")
        mol = Chem.AddHs(base)
        pos = _embed(mol, cfg.molecule.seed) if cfg.molecule.embed_smiles else None
        if pos is not None:  # a salt's ions are embedded on top of each other: set them apart
            pos = separate_fragments(mol, pos, cfg.molecule.cutoff + 1.0)
    else:
        raise RecordError(f"unsupported molecule payload '{raw.fmt}'")
    if mol.GetNumAtoms() == 0:
        raise RecordError("molecule has no atoms")
    return _molecule_arrays(mol, pos, cfg), labels


# ------------------------------------------------------------------------------------- crystals
def _structure(raw: RawRecord) -> Any:
    """pymatgen Structure from a CIF or POSCAR text, or a structure dict."""
    from pymatgen.core import Structure

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            if raw.fmt == "cif":
                return Structure.from_str(raw.data, fmt="cif")
            if raw.fmt == "poscar":
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    structure = Structure.from_str(raw.data, fmt="poscar")
                # VASP 4 files without element names: pymatgen names the species H, He, ... and warns
                if any("cannot be determined" in str(w.message) for w in caught):
                    raise RecordError("poscar: the element names are missing (VASP 4 layout: no element line and no "
                                      "symbols after the coordinates); add the VASP 5 element line")
                return structure
            if raw.fmt == "pymatgen":
                if not isinstance(raw.data, dict):
                    raise RecordError("pymatgen JSON: entry is not a structure dict")
                return Structure.from_dict(raw.data)
        except RecordError:
            raise
        except Exception as exc:  # pymatgen raises many types (ValueError, KeyError, ...)
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise RecordError(f"{raw.fmt}: could not parse a structure ({first[:200]})") from None
    raise RecordError(f"unsupported crystal payload '{raw.fmt}'")


def periodic_neighbours(cart: np.ndarray, cell: np.ndarray, cutoff: float, max_neighbors: int,
                        tie_tolerance: float = 0.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Nearest ``max_neighbors`` periodic neighbours within ``cutoff`` for every atom, from arrays.

    Kept for importers; see :func:`pipeline.neighbours.crystal_neighbours` for the arguments.

    Returns:
        src (E,), dst (E,) atom indices and image (E, 3) integer offsets such that the edge
        vector is ``cart[src] + image @ cell - cart[dst]``.
    """
    return neighbours.crystal_neighbours(cart, cell, cutoff, max_neighbors, tie_tolerance)


def featurize_crystal(raw: RawRecord, cfg: PreprocessConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """Crystal record to arrays; returns (arrays, raw labels)."""
    from pymatgen.core.periodic_table import DummySpecies

    s = _structure(raw)
    if len(s) == 0:
        raise RecordError("structure has no atoms")
    if not s.is_ordered:
        raise RecordError("disordered structure (partial occupancies) is not supported")
    for i, site in enumerate(s):
        if isinstance(site.specie, DummySpecies):  # pymatgen's Z of an unknown symbol is a hash
            raise RecordError(f"unknown element {site.specie.symbol!r} at atom {i}")
    z = np.array([site.specie.Z for site in s], dtype=np.int64)
    _check_elements(z, [site.specie.symbol for site in s])
    cell = np.array(s.lattice.matrix, dtype=np.float64)
    cart = np.array(s.cart_coords, dtype=np.float64)
    if not (np.isfinite(cart).all() and np.isfinite(cell).all()):
        raise RecordError("coordinates contain NaN or infinity")
    if abs(np.linalg.det(cell)) < 1e-6:
        raise RecordError("lattice has zero volume")
    check_extent(cart, cell, cfg)  # before the search, whose cost these bound
    src, dst, image = neighbours.crystal_neighbours(cart, cell, cfg.crystal.cutoff, cfg.crystal.max_neighbors,
                                                    cfg.crystal.tie_tolerance)
    # the neighbour list holds every atom's nearest neighbours: the closest pair is among its edges
    check_min_distance(cart, z, cell, cfg, (src, dst, image) if cfg.crystal.cutoff >= cfg.min_distance else None)
    if image.size and np.abs(image).max() > 127:  # stored as int8
        raise RecordError(f"a neighbour lies {int(np.abs(image).max())} cells away (more than 127): the cell is far "
                          f"thinner than preprocess.crystal.cutoff ({cfg.crystal.cutoff} A)")
    lonely = np.setdiff1d(np.arange(len(z)), dst)
    if lonely.size:
        raise RecordError(f"atom {int(lonely[0])} ({s[int(lonely[0])].specie.symbol}) has no neighbour within "
                          f"{cfg.crystal.cutoff} A (increase preprocess.crystal.cutoff)")
    feat = np.zeros((len(z), len(ATOM_COLUMNS)), dtype=np.int8)
    feat[:, 0] = z
    arrays = {R.Z: z.astype(np.uint8), R.ATOM_FEAT: feat, R.POS: cart, R.CELL: cell,
              R.NBR_INDEX: np.stack([src, dst]).astype(np.int32), R.NBR_IMAGE: image.astype(np.int8),
              R.FORMULA: s.composition.reduced_formula}
    return arrays, raw.labels


def featurize(raw: RawRecord, targets: list[str], cfg: PreprocessConfig) -> dict[str, Any]:
    """One raw record to the arrays and metadata of a shard record.

    Returns a dict of numpy arrays plus string metadata under keys starting with ``_``
    (``_id``, ``_kind``, ``_source``, ``_smiles``, ``_scaffold``, ``_formula``) and ``y`` (T,)
    float64 labels in ``targets`` order (NaN = missing).

    Raises:
        RecordError: the record cannot be used; the message says why.
    """
    if raw.fmt == UNREADABLE:  # the reader could not read it; its payload is the reason
        raise RecordError(str(raw.data))
    if raw.kind == R.MOLECULE:
        arrays, labels = featurize_molecule(raw, cfg)
    elif raw.kind == R.CRYSTAL:
        arrays, labels = featurize_crystal(raw, cfg)
    else:
        raise RecordError(f"unknown record kind '{raw.kind}'")
    arrays[R.Y] = parse_labels(labels, targets)
    if R.POS in arrays and not np.all(np.isfinite(arrays[R.POS])):
        raise RecordError("coordinates contain NaN or infinity")
    arrays[R.ID] = raw.rid
    arrays[R.KIND] = raw.kind
    arrays[R.SOURCE] = raw.source
    return arrays


def featurization_spec(cfg: PreprocessConfig) -> dict[str, Any]:
    """What a model must agree with to read shards: versions, columns, cutoffs, element table."""
    return {
        "featurization_version": FEATURIZATION_VERSION,
        "atom_columns": list(ATOM_COLUMNS),
        "bond_columns": list(BOND_COLUMNS),
        "max_z": MAX_Z,
        "molecule_cutoff": cfg.molecule.cutoff,
        "crystal_cutoff": cfg.crystal.cutoff,
        "crystal_max_neighbors": cfg.crystal.max_neighbors,
        "crystal_tie_tolerance": cfg.crystal.tie_tolerance,
        "conformers": cfg.molecule.conformers,
    }


#: The graph views a model reads: the 2D graph (bonds, or a crystal's neighbour topology) and
#: the 3D neighbour graph.
VIEWS = ("2d", "3d")


class KeyRelevance(NamedTuple):
    """When a featurisation key must agree between a model and the shards it reads.

    Attributes:
        views: graph views that depend on the key (subset of :data:`VIEWS`).
        kinds: record kinds whose arrays depend on it (subset of ``records.KINDS``).
    A key matters for a model when both sets meet the model's views and the data's kinds.
    """

    views: frozenset[str]
    kinds: frozenset[str]


_ALL = KeyRelevance(frozenset(VIEWS), frozenset(R.KINDS))
#: For every key of :func:`featurization_spec`, when it must agree. The crystal 2D graph *is*
#: the neighbour topology, so the crystal neighbour settings matter for 2D models too; the
#: molecule cutoff shapes only the 3D graph of molecules; stored conformers change no graph.
KEY_RELEVANCE: dict[str, KeyRelevance] = {
    "featurization_version": _ALL,
    "atom_columns": _ALL,
    "bond_columns": _ALL,
    "max_z": _ALL,
    "molecule_cutoff": KeyRelevance(frozenset({"3d"}), frozenset({R.MOLECULE})),
    "crystal_cutoff": KeyRelevance(frozenset(VIEWS), frozenset({R.CRYSTAL})),
    "crystal_max_neighbors": KeyRelevance(frozenset(VIEWS), frozenset({R.CRYSTAL})),
    "crystal_tie_tolerance": KeyRelevance(frozenset(VIEWS), frozenset({R.CRYSTAL})),
    "conformers": KeyRelevance(frozenset(), frozenset()),
}

#: Featurisation key of the neighbour cutoff of each record kind.
CUTOFF_KEYS = {R.MOLECULE: "molecule_cutoff", R.CRYSTAL: "crystal_cutoff"}


def _checked(values: Iterable[str], allowed: tuple[str, ...], what: str) -> frozenset[str]:
    out = frozenset(values)
    unknown = sorted(out - set(allowed))
    if unknown:
        raise ValueError(f"unknown {what} {unknown}; expected some of {list(allowed)}")
    return out


def featurization_differences(model_spec: dict[str, Any], shard_spec: dict[str, Any], views: Iterable[str],
                              kinds: Iterable[str]) -> list[str]:
    """What differs, among the keys that matter, between a model's featurisation and the shards'.

    Args:
        model_spec: the featurisation the model was trained on (a :func:`featurization_spec`).
        shard_spec: the featurisation of the shards (their manifest's ``featurization``).
        views: graph views the model reads, some of ``"2d"``, ``"3d"``.
        kinds: record kinds present in the data, some of ``"molecule"``, ``"crystal"``.
    Returns:
        One line ``"key: model X vs shards Y"`` per relevant key whose values differ, in
        :data:`KEY_RELEVANCE` order; empty when the model may read the shards. A key missing from
        an older spec compares as None; a key this version does not know is always relevant.
    Raises:
        ValueError: an unknown view or kind.
    """
    views, kinds = _checked(views, VIEWS, "views"), _checked(kinds, R.KINDS, "kinds")
    keys = list(KEY_RELEVANCE) + sorted((set(model_spec) | set(shard_spec)) - set(KEY_RELEVANCE))
    out = []
    for key in keys:
        rel = KEY_RELEVANCE.get(key, _ALL)
        if not (rel.views & views and rel.kinds & kinds):
            continue
        ours, theirs = model_spec.get(key), shard_spec.get(key)
        if ours != theirs:
            out.append(f"{key}: model {ours!r} vs shards {theirs!r}")
    return out


def neighbour_cutoff(spec: dict[str, Any], kinds: Iterable[str]) -> float:
    """The neighbour cutoff (Angstrom) that every 3D graph of a dataset is complete to.

    The smallest stored cutoff among the record kinds present: a 3D encoder's own cutoff must
    not exceed it, or edges it expects are missing from some graphs.

    Args:
        spec: a :func:`featurization_spec` (a manifest's ``featurization``).
        kinds: record kinds present in the data.
    Raises:
        ValueError: no kinds, or an unknown kind.
    """
    kinds = _checked(kinds, R.KINDS, "kinds")
    if not kinds:
        raise ValueError("neighbour_cutoff needs at least one record kind")
    return min(float(spec[CUTOFF_KEYS[k]]) for k in sorted(kinds))


def is_finite_number(x: Any) -> bool:
    """True for a real, finite number."""
    return isinstance(x, (int, float)) and math.isfinite(x)
