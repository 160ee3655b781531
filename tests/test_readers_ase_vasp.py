"""POSCAR, extended-XYZ and ASE-database readers on real files (conversions of the shipped QM9 and MP
records, see datasets/vasp/CARD.md and datasets/ase/CARD.md): detection, labels and units, the same
records as the original files, and bad inputs as rejects with file, record and reason."""
from __future__ import annotations

import csv
import shutil
import sqlite3
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from helpers import DATASETS, qm9_files
from pipeline import MolmatError
from pipeline.config import PreprocessConfig, load_config
from pipeline.featurize import RecordError, featurize
from pipeline.readers import ANY_KIND, FORMATS, detect_format, open_source, poscar_id

CFG = PreprocessConfig()
POSCARS = DATASETS / "vasp" / "poscars.tar.gz"
QM9_EXTXYZ = DATASETS / "ase" / "qm9_40.extxyz"
MP_EXTXYZ = DATASETS / "ase" / "mp_40.extxyz"
ASE_DB = DATASETS / "ase" / "qm9_mp_20_20.db"


@pytest.fixture(scope="module")
def originals():
    """Featurised records of the original files, by id: QM9 xyz (by file stem) and MP CIFs (by mp-id)."""
    qm9 = {f"dsgdb9nsd_{r.rid}": r for r in open_source(DATASETS / "qm9" / "xyz").records()}
    cif = {r.rid: r for r in open_source(DATASETS / "mp" / "cifs.tar.gz").records()}
    return {**qm9, **cif}


def _environments(rec):
    """Per atom, the sorted neighbour distances (Angstrom): the neighbour graph without its edge order."""
    src, dst = rec["nbr_index"]
    vec = rec["pos"][src] + rec["nbr_image"] @ rec["cell"] - rec["pos"][dst]
    dist = np.linalg.norm(vec, axis=1)
    return [np.sort(dist[dst == i]) for i in range(len(rec["z"]))]


def _assert_same_molecule(a, b, atol):
    for key in ("z", "atom_feat", "bond_index", "bond_feat", "nbr_index", "_smiles", "_scaffold"):
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    np.testing.assert_allclose(a["pos"], b["pos"], rtol=0, atol=atol)


def _assert_same_crystal(a, b, atol):
    np.testing.assert_array_equal(a["z"], b["z"])
    np.testing.assert_allclose(a["cell"], b["cell"], rtol=0, atol=atol)
    np.testing.assert_allclose(a["pos"], b["pos"], rtol=0, atol=atol)
    assert a["_formula"] == b["_formula"]
    for mine, theirs in zip(_environments(a), _environments(b), strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=0, atol=10 * atol)


# ------------------------------------------------------------------------------------------ POSCAR
def test_poscar_archive_gives_the_cif_crystals_with_labels_from_labels_csv(originals):
    reader = open_source(POSCARS)
    assert reader.fmt == "poscar" and FORMATS["poscar"].kind == "crystal"
    assert reader.targets == [("formation_energy_per_atom_eV", "eV/atom"), ("band_gap_eV", "eV"),
                              ("K_VRH_GPa", "GPa"), ("G_VRH_GPa", "GPa")]
    names = [t for t, _ in reader.targets]
    labels = {r["mp_id"]: r for r in csv.DictReader(open(DATASETS / "mp" / "labels.csv"))}
    raws = list(reader.records())
    assert len(raws) == 40 and raws[0].source == f"{POSCARS}::mp-1/POSCAR" and raws[0].rid == "mp-1"
    with_moduli = 0
    for raw in raws:
        rec = featurize(raw, names, CFG)
        _assert_same_crystal(rec, featurize(originals[raw.rid], names, CFG), atol=1e-12)
        expected = [float(labels[raw.rid][n]) if labels[raw.rid][n] else np.nan for n in names]
        np.testing.assert_array_equal(rec["y"], expected)
        with_moduli += not np.isnan(rec["y"][2])
    assert with_moduli == 10


def test_poscar_file_and_directory_layouts(tmp_path):
    """A directory of VASP calculations (<id>/POSCAR, <id>/CONTCAR), files named <id>.vasp or POSCAR_<id>."""
    with tarfile.open(POSCARS) as tar:
        texts = {m.name.split("/")[0]: tar.extractfile(m).read().decode() for m in tar if m.isfile()}
    ids = sorted(texts)[:3]
    calcs = tmp_path / "calcs"
    for rid in ids:
        (calcs / rid).mkdir(parents=True)
        (calcs / rid / "CONTCAR").write_text(texts[rid])
    assert detect_format(calcs) == "poscar"
    assert [r.rid for r in open_source(calcs).records()] == ids
    named = tmp_path / "named"
    named.mkdir()
    (named / f"{ids[0]}.vasp").write_text(texts[ids[0]])
    (named / f"POSCAR_{ids[1]}").write_text(texts[ids[1]])
    for f in sorted(named.iterdir()):
        assert detect_format(f) == "poscar"
        (raw,) = open_source(f).records()
        assert raw.rid in ids[:2] and featurize(raw, [], CFG)["_formula"]
    assert poscar_id("run/mp-7/POSCAR") == "mp-7" and poscar_id("mp-7_CONTCAR") == "mp-7"


def test_bad_poscar_is_a_reject_with_its_reason(tmp_path):
    with tarfile.open(POSCARS) as tar:
        lines = tar.extractfile("mp-1018135/POSCAR").read().decode().splitlines()  # LiCdAs
    assert lines[5].split() == ["Li", "Cd", "As"]
    # VASP 4 layout: no element line, no symbols after the coordinates; pymatgen would call them H, He and Li
    vasp4 = tmp_path / "old.vasp"
    unnamed = [" ".join(x.split()[:3]) for x in lines[8:]]
    vasp4.write_text("\n".join(["LiCdAs"] + lines[1:5] + lines[6:8] + unnamed) + "\n")
    (raw,) = open_source(vasp4).records()
    with pytest.raises(RecordError, match="element names are missing"):
        featurize(raw, [], CFG)
    truncated = tmp_path / "cut.vasp"  # ends before the coordinates
    truncated.write_text("\n".join(lines[:8]) + "\n")
    (raw,) = open_source(truncated).records()
    with pytest.raises(RecordError, match="poscar: could not parse a structure"):
        featurize(raw, [], CFG)


def test_damaged_poscar_archive_keeps_what_was_read_and_rejects_the_rest(tmp_path):
    data = POSCARS.read_bytes()
    cut = tmp_path / "poscars.tar.gz"
    cut.write_bytes(data[: len(data) // 2])
    raws = list(open_source(cut).records())
    assert 0 < len(raws) < 40
    *good, last = raws
    assert all(r.fmt == "poscar" for r in good)
    with pytest.raises(RecordError, match="damaged archive"):
        featurize(last, [], CFG)
    assert last.source == str(cut)


# ----------------------------------------------------------------------------------------- extxyz
def test_extxyz_molecules_are_the_qm9_molecules_with_their_labels(originals):
    reader = open_source(QM9_EXTXYZ)
    assert reader.fmt == "extxyz" and FORMATS["extxyz"].kind == ANY_KIND
    names = [t for t, _ in reader.targets]
    units = dict(reader.targets)
    assert len(names) == 15 and units["gap_Ha"] == "Ha" and units["Cv_calmolK"] == "cal/(mol K)"
    assert "mol_id" not in units and "smiles" not in units  # ids and text are not labels
    raws = list(reader.records())
    assert len(raws) == 40 and {r.kind for r in raws} == {"molecule"}
    assert raws[0].rid == "dsgdb9nsd_000002" and raws[0].source == f"{QM9_EXTXYZ}[0]"
    for raw in raws:
        rec = featurize(raw, names, CFG)
        ref = featurize(originals[raw.rid], names, CFG)
        _assert_same_molecule(rec, ref, atol=1e-8)  # ASE writes 8 decimals
        np.testing.assert_array_equal(rec["y"], ref["y"])


def test_extxyz_crystals_are_the_mp_crystals(originals):
    reader = open_source(MP_EXTXYZ)
    names = [t for t, _ in reader.targets]
    assert names == ["formation_energy_per_atom_eV", "band_gap_eV", "K_VRH_GPa", "G_VRH_GPa"]
    raws = list(reader.records())
    assert {r.kind for r in raws} == {"crystal"} and raws[0].rid == "mp-1"
    for raw in raws:
        _assert_same_crystal(featurize(raw, names, CFG), featurize(originals[raw.rid], names, CFG), atol=1e-8)


def test_plain_xyz_detection_keeps_qm9_files_and_finds_extended_or_multi_frame_files(tmp_path):
    assert detect_format(qm9_files(1)[0]) == "qm9_xyz"
    ext = tmp_path / "frames.xyz"
    shutil.copy(MP_EXTXYZ, ext)
    assert detect_format(ext) == "extxyz"
    # a plain multi-frame xyz (empty comment lines): ASE reads every frame, as molecules
    import ase.io

    frames = list(ase.io.iread(QM9_EXTXYZ, index=":3"))
    plain = tmp_path / "plain.xyz"
    ase.io.write(plain, frames, format="xyz")
    assert detect_format(plain) == "extxyz"
    raws = list(open_source(plain).records())
    assert [r.rid for r in raws] == ["plain:0", "plain:1", "plain:2"]
    assert [featurize(r, [], CFG)["z"].tolist() for r in raws] == [f.numbers.tolist() for f in frames]


def test_extxyz_calculator_energy_is_a_label_in_ev(tmp_path):
    """ASE moves energy= from the comment line into a calculator; it is a label, in ASE's eV."""
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.units import Hartree

    atoms = ase.io.read(QM9_EXTXYZ, index=0)
    atoms.calc = SinglePointCalculator(atoms, energy=atoms.info["U0_Ha"] * Hartree)
    path = tmp_path / "e.extxyz"
    ase.io.write(path, [atoms], format="extxyz")
    reader = open_source(path)
    assert dict(reader.targets)["energy"] == "eV"
    rec = featurize(next(reader.records()), ["energy", "U0_Ha"], CFG)
    assert rec["y"][0] == pytest.approx(rec["y"][1] * Hartree, rel=1e-12)


def test_extxyz_slab_cell_less_and_malformed_frames_are_rejects(tmp_path):
    import ase.io

    frames = list(ase.io.iread(MP_EXTXYZ, index=":4"))
    frames[1].pbc = [True, True, False]   # a slab
    frames[2].cell = np.zeros((3, 3))     # periodic without a lattice
    path = tmp_path / "mixed.extxyz"
    ase.io.write(path, frames, format="extxyz")
    lines = path.read_text().splitlines()
    n_last = int(lines[-(len(frames[3]) + 2)])
    lines[-1] = lines[-1].split()[0] + " 0.0 zero"  # the last frame's last coordinate is not a number
    assert n_last == len(frames[3])
    path.write_text("\n".join(lines) + "\n")
    raws = list(open_source(path).records())
    assert [r.rid for r in raws] == ["mp-1", frames[1].info["mp_id"], frames[2].info["mp_id"], "mixed:3"]
    featurize(raws[0], [], CFG)
    reasons = ("mixed periodicity \\(pbc=T T F\\)", "periodic \\(pbc=T T T\\) but without a cell",
               "frame 3 could not be parsed")
    for raw, reason in zip(raws[1:], reasons):
        with pytest.raises(RecordError, match=reason):
            featurize(raw, [], CFG)


# ------------------------------------------------------------------------------------ ASE database
def test_ase_db_holds_molecules_and_crystals_with_key_value_labels(originals):
    assert detect_format(ASE_DB) == "ase_db"
    reader = open_source(ASE_DB)
    units = dict(reader.targets)
    assert len(units) == 19 and units["U0_Ha"] == "Ha" and units["band_gap_eV"] == "eV" and "mp_id" not in units
    names = list(units)
    raws = list(reader.records())
    assert [r.kind for r in raws] == ["molecule"] * 20 + ["crystal"] * 20
    assert raws[0].source == f"{ASE_DB}[id=1]"
    for raw in raws:
        rec = featurize(raw, names, CFG)
        ref = featurize(originals[raw.rid], names, CFG)
        if raw.kind == "molecule":
            _assert_same_molecule(rec, ref, atol=1e-12)
        else:
            _assert_same_crystal(rec, ref, atol=1e-12)
            np.testing.assert_array_equal(rec["nbr_index"], ref["nbr_index"])  # float64 on disk: the same graph
        ours, theirs = rec["y"], ref["y"]
        np.testing.assert_array_equal(ours[~np.isnan(ours)], theirs[~np.isnan(ours)])


def test_ase_db_that_is_not_a_database_is_refused_unchanged(tmp_path):
    fake = tmp_path / "notes.db"
    fake.write_text("not a database\n")
    with pytest.raises(MolmatError, match="notes.db: not an SQLite database"):
        open_source(fake)
    other = tmp_path / "other.db"
    with sqlite3.connect(other) as con:
        con.execute("CREATE TABLE t (x)")
    before = other.read_bytes()
    with pytest.raises(MolmatError, match="without ASE's 'systems' table"):
        open_source(other)
    assert other.read_bytes() == before  # ASE would have added its tables to the user's file


def test_preprocess_mixed_ase_database_then_predict_and_embed_poscar_extxyz_and_db(tmp_path):
    """Preprocess reads a database of molecules and crystals; predict and embed take POSCAR, extxyz and databases."""
    from finetune.train import finetune
    from pipeline.preprocess import preprocess
    from pipeline.shards import ShardDataset, load_manifest

    cfg = load_config(None, ["preprocess.workers=0"])
    summary = preprocess([str(ASE_DB)], tmp_path / "db", cfg)
    assert summary.records == 40 and summary.rejected == 0
    assert load_manifest(tmp_path / "db")["kinds"] == ["crystal", "molecule"]
    assert {r["_kind"] for r in ShardDataset(tmp_path / "db")} == {"crystal", "molecule"}

    mp = tmp_path / "mp"
    preprocess([str(MP_EXTXYZ)], mp, cfg)
    small = ["model.encoder2d.hidden=8", "model.encoder2d.steps=1", "model.heads.hidden=8", "train.epochs=1",
             "train.batch_size=16", "finetune.targets=[band_gap_eV]"]
    finetune(mp, tmp_path / "run", load_config(None, small))
    out = tmp_path / "p.csv"
    r = subprocess.run([sys.executable, "-m", "pipeline.cli", "predict", str(tmp_path / "run"), str(POSCARS),
                        str(MP_EXTXYZ), str(QM9_EXTXYZ), "--out", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rows = list(csv.DictReader(open(out)))
    assert list(rows[0]) == ["id", "source", "band_gap_eV", "error", "warning"]
    assert len(rows) == 120
    by_source = {}
    for row in rows:
        by_source.setdefault(row["source"].split("::")[0].split("[")[0], []).append(row)
    poscar_rows, mp_rows, qm9_rows = by_source[str(POSCARS)], by_source[str(MP_EXTXYZ)], by_source[str(QM9_EXTXYZ)]
    assert [r["id"] for r in poscar_rows] == [r["id"] for r in mp_rows]  # the same 40 crystals, by mp-id
    np.testing.assert_allclose([float(r["band_gap_eV"]) for r in poscar_rows],
                               [float(r["band_gap_eV"]) for r in mp_rows], rtol=1e-5, atol=1e-6)
    assert all(r["error"] == "model was trained on crystals, this input is a molecule" for r in qm9_rows)

    # embed reads them too: the same crystals from POSCAR, extxyz and the database embed alike
    from pretrain.embed import embed

    assert embed(tmp_path / "run", [str(POSCARS), str(MP_EXTXYZ), str(ASE_DB)], tmp_path / "e.npz") == 120
    e = np.load(tmp_path / "e.npz", allow_pickle=False)
    ids, emb = e["ids"], e["embeddings"]
    assert list(ids[:40]) == list(ids[40:80]) == [r["id"] for r in poscar_rows] and list(ids[100:]) == list(ids[:20])
    np.testing.assert_allclose(emb[:40], emb[40:80], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(emb[:20], emb[100:], rtol=1e-4, atol=1e-5)
