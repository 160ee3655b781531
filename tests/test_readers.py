"""Every reader on a real sample; format detection; molecule atom order; periodic neighbours."""
from __future__ import annotations

import gzip
import itertools
import json
import shutil
import tarfile

import numpy as np
import pytest

from helpers import DATASETS, mp_cif_texts, qm9_files
from pipeline import MolmatError
from pipeline.config import PreprocessConfig
from pipeline.featurize import RecordError, featurize, _parse_xyz, _rdkit
from pipeline.readers import RawRecord, detect_format, open_source

CFG = PreprocessConfig()


def _first(reader, n=5):
    return list(itertools.islice(reader.records(), n))


def test_qm9_directory_and_labels():
    r = open_source(DATASETS / "qm9" / "xyz")
    assert r.fmt == "qm9_xyz"
    names = [t for t, _ in r.targets]
    assert names[:3] == ["A_GHz", "B_GHz", "C_GHz"] and "gap_Ha" in names and len(names) == 15
    recs = list(r.records())
    assert len(recs) == 300
    rec = featurize(recs[0], names, CFG)
    assert recs[0].rid == "000002"  # dsgdb9nsd_000002.xyz is NH3
    np.testing.assert_allclose(rec["y"][names.index("gap_Ha")], 0.3399)
    np.testing.assert_allclose(rec["y"][names.index("U0_Ha")], -56.525887)
    assert rec["z"].tolist() == [7, 1, 1, 1]


@pytest.mark.parametrize("mode", ["w:bz2", "w"])
def test_qm9_tar_archive_matches_directory(tmp_path, mode):
    files = qm9_files(20)
    ext = ".tar.bz2" if mode.endswith("bz2") else ".tar"
    arch = tmp_path / f"qm9{ext}"
    with tarfile.open(arch, mode) as tar:
        for f in files:
            tar.add(f, arcname=f"qm9/{f.name}")
    assert detect_format(arch) == "qm9_xyz"
    from_tar = [featurize(r, ["gap_Ha"], CFG) for r in open_source(arch).records()]
    d = tmp_path / "dir"
    d.mkdir()
    for f in files:
        shutil.copy(f, d)
    from_dir = [featurize(r, ["gap_Ha"], CFG) for r in open_source(d).records()]
    assert len(from_tar) == len(from_dir) == 20
    for a, b in zip(from_tar, from_dir):
        assert a["_id"] == b["_id"]
        np.testing.assert_array_equal(a["pos"], b["pos"])
        np.testing.assert_array_equal(a["y"], b["y"])


def test_qm9_fortran_exponent(tmp_path):
    # The original QM9 release writes some floats as 1.2*^-6; derive such a file from a real one.
    src = qm9_files(1)[0].read_text().splitlines()
    head = src[1].split("\t")
    head[5] = "9.46*^0"          # alpha
    atom = src[2].split("\t")
    atom[1] = "-4.04260543*^-2"  # x of the N atom
    src[1], src[2] = "\t".join(head), "\t".join(atom)
    f = tmp_path / "dsgdb9nsd_000002.xyz"
    f.write_text("\n".join(src) + "\n")
    rec = featurize(next(open_source(f).records()), ["alpha_bohr3"], CFG)
    assert rec["y"][0] == pytest.approx(9.46)
    assert rec["pos"][0, 0] == pytest.approx(-0.0404260543)


def test_xyz_graph_follows_xyz_order_not_smiles_order():
    """Graph atom i is xyz atom i and bonded atoms are close in 3D, on all 300 real molecules.

    The SMILES in each file is also replaced by a randomised (but equivalent) SMILES, whose atom
    order differs from the xyz order, as a user's or canonical SMILES would: the graph must
    still follow the xyz order and be the same molecule.
    """
    Chem = _rdkit()["Chem"]
    table = Chem.GetPeriodicTable()
    order_differs = 0
    for n, path in enumerate(qm9_files()):
        text = path.read_text()
        symbols, pos, _, smiles = _parse_xyz(text)
        lines = text.splitlines()
        shuffled = Chem.MolToSmiles(Chem.MolFromSmiles(smiles), doRandom=True, canonical=False)
        lines[len(symbols) + 3] = f"{shuffled}\t{shuffled}"
        for variant in (text, "\n".join(lines)):
            rec = featurize(RawRecord(str(path), path.stem, "molecule", "xyz", variant), [], CFG)
            assert rec["z"].tolist() == [table.GetAtomicNumber(s) for s in symbols], path.name
            np.testing.assert_array_equal(rec["pos"], pos)
            i, j = rec["bond_index"]
            lengths = np.linalg.norm(rec["pos"][i] - rec["pos"][j], axis=1)
            assert lengths.max() < 1.75, f"{path.name}: a bonded pair is {lengths.max():.2f} A apart"
            deg = np.bincount(np.concatenate([i, j]), minlength=len(symbols))
            assert np.all(deg[rec["z"] == 1] == 1), path.name
            assert rec["_smiles"] == Chem.MolToSmiles(Chem.MolFromSmiles(smiles)), path.name
        # a naive reader would pair SMILES atom k with xyz row k; count where that breaks bonds
        naive = Chem.AddHs(Chem.MolFromSmiles(shuffled))
        pairs = np.array([(b.GetBeginAtomIdx(), b.GetEndAtomIdx()) for b in naive.GetBonds()])
        if len(pairs):
            order_differs += np.linalg.norm(pos[pairs[:, 0]] - pos[pairs[:, 1]], axis=1).max() > 1.75
    assert order_differs > 100, f"only {order_differs} molecules have SMILES order != xyz order"


def test_sdf_with_label_csv():
    r = open_source(DATASETS / "qm9" / "qm9_mini.sdf")
    assert r.fmt == "sdf"
    names = [t for t, _ in r.targets]
    assert "gap_Ha" in names and "U0_atom_kcalmol" in names
    recs = [featurize(x, names, CFG) for x in r.records()]
    assert len(recs) == 21
    assert recs[0]["_id"] == "gdb_1" and recs[0]["z"].tolist() == [6, 1, 1, 1, 1]
    assert recs[1]["y"][names.index("gap_Ha")] == pytest.approx(0.3399)


def test_smiles_csv_with_etkdg_coordinates():
    r = open_source(DATASETS / "qm8" / "qm8_sample.csv")
    assert r.fmt == "smiles_csv"
    assert dict(r.targets)["E1-CC2"] == "Ha" and dict(r.targets)["f1-CC2"] == "dimensionless"
    raw = _first(r, 3)
    rec = featurize(raw[1], ["E1-CC2"], CFG)
    assert rec["pos"].shape == (len(rec["z"]), 3) and np.isfinite(rec["pos"]).all()
    no3d = featurize(raw[1], ["E1-CC2"], PreprocessConfig(molecule={"embed_smiles": False}))
    assert "pos" not in no3d and no3d["bond_index"].shape[1] > 0


def test_cif_archive_with_labels_beside():
    r = open_source(DATASETS / "mp" / "cifs.tar.gz")
    assert r.fmt == "cif"
    assert dict(r.targets) == {"formation_energy_per_atom_eV": "eV/atom", "band_gap_eV": "eV",
                               "K_VRH_GPa": "GPa", "G_VRH_GPa": "GPa"}
    recs = [featurize(x, [t for t, _ in r.targets], CFG) for x in _first(r, 50)]
    assert any(np.isnan(x["y"][2]) for x in recs) and any(np.isfinite(x["y"][2]) for x in recs)


def test_cif_directory_with_explicit_labels(tmp_path):
    texts = mp_cif_texts(5)
    for k, v in texts.items():
        (tmp_path / f"{k}.cif").write_text(v)
    r = open_source(tmp_path, labels=DATASETS / "mp" / "labels.csv")
    recs = list(r.records())
    assert [x.rid for x in recs] == sorted(texts)
    assert all(x.labels["band_gap_eV"] != "" for x in recs)


def test_pymatgen_json_matches_cif():
    r = open_source(DATASETS / "mp" / "structures.json.gz")
    assert r.fmt == "pymatgen_json"
    first = next(r.records())
    rec_json = featurize(first, ["band_gap_eV"], CFG)
    cif = mp_cif_texts(1)
    rid, text = next(iter(cif.items()))
    assert first.rid == rid
    rec_cif = featurize(RawRecord("t", rid, "crystal", "cif", text), [], CFG)
    np.testing.assert_allclose(rec_json["cell"], rec_cif["cell"], atol=1e-5)
    assert rec_json["z"].tolist() == rec_cif["z"].tolist()


def test_format_detection_and_errors(tmp_path):
    assert detect_format(DATASETS / "qm8" / "qm8_sample.csv") == "smiles_csv"
    assert detect_format(DATASETS / "mp" / "structures.json.gz") == "pymatgen_json"
    with pytest.raises(MolmatError, match="cannot tell the format"):
        (tmp_path / "x.dat").write_text("1")
        detect_format(tmp_path / "x.dat")
    with pytest.raises(MolmatError, match="no such file"):
        open_source(tmp_path / "missing.cif")


def _brute_force_neighbours(cart, cell, cutoff):
    """All (src, dst, image) with |cart[src] + image@cell - cart[dst]| < cutoff over a big image box."""
    inv_heights = np.linalg.norm(np.linalg.inv(cell), axis=0)
    reach = np.ceil(cutoff * inv_heights).astype(int) + 1
    out = {}
    for img in itertools.product(*(range(-r, r + 1) for r in reach)):
        shift = np.array(img) @ cell
        d = np.linalg.norm(cart[:, None, :] + shift - cart[None, :, :], axis=-1)
        for s, t in zip(*np.nonzero(d < cutoff)):
            if img == (0, 0, 0) and s == t:
                continue
            out.setdefault(int(t), []).append(d[s, t])
    return {k: np.sort(v) for k, v in out.items()}


def test_periodic_neighbours_match_brute_force_supercell():
    cfg = PreprocessConfig(crystal={"cutoff": 6.0, "max_neighbors": 10_000})
    for rid, text in list(mp_cif_texts(12).items()):
        rec = featurize(RawRecord("t", rid, "crystal", "cif", text), [], cfg)
        src, dst = rec["nbr_index"].astype(int)
        vec = rec["pos"][src] + rec["nbr_image"] @ rec["cell"] - rec["pos"][dst]
        dist = np.linalg.norm(vec, axis=1)
        ref = _brute_force_neighbours(rec["pos"], rec["cell"], 6.0)
        for atom in range(len(rec["z"])):
            ours = np.sort(dist[dst == atom])
            np.testing.assert_allclose(ours, ref.get(atom, []), atol=1e-6, err_msg=f"{rid} atom {atom}")


def test_max_neighbors_keeps_the_nearest():
    rid, text = next(iter(mp_cif_texts(3).items()))
    full = featurize(RawRecord("t", rid, "crystal", "cif", text), [], PreprocessConfig(crystal={"max_neighbors": 10_000}))
    cut = featurize(RawRecord("t", rid, "crystal", "cif", text), [], CFG)
    for rec in (full, cut):
        s, t = rec["nbr_index"].astype(int)
        rec["d"] = np.linalg.norm(rec["pos"][s] + rec["nbr_image"] @ rec["cell"] - rec["pos"][t], axis=1)
    for atom in range(len(cut["z"])):
        kept = np.sort(cut["d"][cut["nbr_index"][1] == atom])
        everything = np.sort(full["d"][full["nbr_index"][1] == atom])
        assert len(kept) >= min(12, len(everything))
        np.testing.assert_allclose(kept, everything[:len(kept)], atol=1e-8)
        if len(kept) > 12:  # only neighbours tied with the 12th are added
            assert kept[-1] - kept[11] <= CFG.crystal.tie_tolerance + 1e-9


def _environments(text: str, cfg: PreprocessConfig) -> list[tuple]:
    """Per atom, the sorted (neighbour Z, distance to 1e-3 A) pairs of the crystal graph."""
    rec = featurize(RawRecord("t", "x", "crystal", "cif", text), [], cfg)
    src, dst = rec["nbr_index"].astype(int)
    d = np.linalg.norm(rec["pos"][src] + rec["nbr_image"] @ rec["cell"] - rec["pos"][dst], axis=1)
    return sorted(tuple(sorted((int(rec["z"][a]), round(float(x), 3)) for a, b, x in zip(src, dst, d) if b == i))
                  for i in range(len(rec["z"])))


def test_neighbour_shells_are_not_cut_so_the_graph_ignores_the_cell_choice():
    """mp-762507 (Li2CrNiO4): 12 neighbours cut a shell; which half is kept depends on the cell."""
    from pymatgen.core import Structure

    text = mp_cif_texts()["mp-762507"]
    supercell = Structure.from_str(text, fmt="cif").make_supercell([2, 1, 1], in_place=False).to(fmt="cif")
    strict = PreprocessConfig(crystal={"tie_tolerance": 0.0})
    assert sorted(_environments(text, strict) * 2) != _environments(supercell, strict)
    assert sorted(_environments(text, CFG) * 2) == _environments(supercell, CFG)


@pytest.mark.parametrize("source", ["qm9/xyz", "qm9/qm9_mini.sdf", "qm8/qm8_sample.csv", "mp/cifs.tar.gz",
                                    "mp/structures.json.gz", "vasp/poscars.tar.gz", "ase/qm9_40.extxyz",
                                    "ase/mp_40.extxyz", "ase/qm9_mp_20_20.db"])
def test_every_format_knows_the_kind_of_its_records(source):
    from pipeline.readers import ANY_KIND, FORMATS, format_kind

    reader = open_source(DATASETS / source)
    kinds = {raw.kind for raw in reader.records()}
    if format_kind(reader.fmt) == ANY_KIND:  # ASE files: each record says its kind
        assert FORMATS[reader.fmt].kind == ANY_KIND and kinds and kinds <= {"molecule", "crystal"}
    else:
        assert kinds == {FORMATS[reader.fmt].kind} == {format_kind(reader.fmt)}
    assert {f.kind for f in FORMATS.values()} == {"molecule", "crystal", ANY_KIND}
    with pytest.raises(MolmatError, match="unknown format 'pdb'"):
        format_kind("pdb")


def test_bad_records_raise_record_error():
    text = qm9_files(1)[0].read_text()
    truncated = "\n".join(text.splitlines()[:3])
    with pytest.raises(RecordError, match="truncated"):
        featurize(RawRecord("t", "1", "molecule", "xyz", truncated), [], CFG)
    rid, cif = next(iter(mp_cif_texts(1).items()))
    with pytest.raises(RecordError, match="could not parse"):
        featurize(RawRecord("t", rid, "crystal", "cif", cif[: len(cif) // 3] + "\n_atom_site_fract_x garbage\n"), [], CFG)
    with pytest.raises(RecordError, match="not a number"):
        featurize(RawRecord("t", rid, "crystal", "cif", cif, {"band_gap_eV": "abc"}), ["band_gap_eV"], CFG)
    # a structure dict with a NaN coordinate: refused before the neighbour search sizes its images
    entry = json.loads(gzip.open(DATASETS / "mp" / "structures.json.gz").read())[0]
    structure = json.loads(json.dumps(entry.get("structure", entry)))
    structure["sites"][0]["abc"] = [float("nan"), 0.1, 0.2]
    structure["sites"][0].pop("xyz", None)
    with pytest.raises(RecordError, match="NaN or infinity"):
        featurize(RawRecord("t", "nan", "crystal", "pymatgen", structure), [], CFG)
