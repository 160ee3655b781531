"""The shipped invariance helpers really transform records, and assert_invariant can fail."""
from __future__ import annotations

import numpy as np
import pytest

from helpers import DATASETS, mp_cif_texts
from pipeline import records as R
from pipeline import testing as T
from pipeline.config import PreprocessConfig
from pipeline.featurize import featurize
from pipeline.readers import RawRecord, open_source
from pipeline.shards import ShardDataset

CFG = PreprocessConfig()


def _crystal(mp_id: str, cfg: PreprocessConfig = CFG) -> dict:
    return featurize(RawRecord("t", mp_id, R.CRYSTAL, "cif", mp_cif_texts()[mp_id]), [], cfg)


def _edge_vectors(rec: dict) -> np.ndarray:
    src, dst = np.asarray(rec[R.NBR_INDEX]).astype(np.int64)
    vec = rec[R.POS][src] - rec[R.POS][dst]
    if R.CELL in rec:
        vec = vec + rec[R.NBR_IMAGE] @ rec[R.CELL]
    return vec


def _environments(rec: dict) -> list[tuple]:
    """Per atom, the sorted (neighbour Z, distance to 1e-6 A) of its neighbour edges, sorted."""
    src, dst = np.asarray(rec[R.NBR_INDEX]).astype(np.int64)
    d = np.linalg.norm(_edge_vectors(rec), axis=1)
    z = rec[R.Z]
    return sorted(tuple(sorted((int(z[s]), round(float(x), 6)) for s, t, x in zip(src, dst, d) if t == i))
                  for i in range(len(z)))


@pytest.fixture(scope="module")
def molecule() -> dict:
    """A real QM9 molecule with two stored conformers."""
    reader = open_source(DATASETS / "qm9" / "xyz")
    raws = [r for _, r in zip(range(40), reader.records())]
    raw = max(raws, key=lambda r: int(r.data.split()[0]))  # the largest of the first 40
    return featurize(raw, [t for t, _ in reader.targets], PreprocessConfig(molecule={"conformers": 2}))


def test_rotation_keeps_distances_and_moves_points(molecule):
    rot = T.random_rotation(4)
    assert np.allclose(rot @ rot.T, np.eye(3)) and np.isclose(np.linalg.det(rot), 1.0)
    turned = T.rotate(molecule, rot)
    assert not np.allclose(turned[R.POS], molecule[R.POS], atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(_edge_vectors(turned), axis=1),
                               np.linalg.norm(_edge_vectors(molecule), axis=1), atol=1e-12)
    assert turned[R.CONFORMERS].dtype == np.float32 and not np.allclose(turned[R.CONFORMERS], molecule[R.CONFORMERS])
    np.testing.assert_allclose(turned[R.CONFORMERS][1], molecule[R.CONFORMERS][1] @ rot.T, atol=1e-5)
    assert turned[R.Z] is molecule[R.Z] and turned[R.BOND_INDEX] is molecule[R.BOND_INDEX]
    crystal = _crystal("mp-11114")
    moved = T.rotate(crystal, rot)
    np.testing.assert_allclose(moved[R.CELL], crystal[R.CELL] @ rot.T)
    np.testing.assert_allclose(np.linalg.norm(_edge_vectors(moved), axis=1),
                               np.linalg.norm(_edge_vectors(crystal), axis=1), atol=1e-10)


def test_translation_moves_points_not_edges(molecule):
    moved = T.translate(molecule, [3.0, -1.0, 0.5])
    np.testing.assert_allclose(moved[R.POS] - molecule[R.POS], np.broadcast_to([3.0, -1.0, 0.5], molecule[R.POS].shape))
    np.testing.assert_allclose(_edge_vectors(moved), _edge_vectors(molecule), atol=1e-12)


@pytest.mark.parametrize("which", ["molecule", "crystal"])
def test_permuted_record_is_the_same_graph_relabelled(which, molecule):
    rec = molecule if which == "molecule" else _crystal("mp-11114")
    perm = T.random_permutation(rec, seed=3)
    out = T.permute(rec, perm)
    assert not np.array_equal(perm, np.arange(len(perm)))
    assert np.array_equal(out[R.Z], rec[R.Z][perm]) and np.array_equal(out[R.POS], rec[R.POS][perm])
    assert np.array_equal(out[R.ATOM_FEAT], rec[R.ATOM_FEAT][perm])
    # isomorphic: every edge maps back to an original edge, with its image and features
    for index, aligned in ((R.NBR_INDEX, R.NBR_IMAGE), (R.BOND_INDEX, R.BOND_FEAT)):
        if index not in rec:
            continue
        back = perm[np.asarray(out[index]).astype(np.int64)]
        ours = sorted(zip(back[0].tolist(), back[1].tolist(), map(tuple, out[aligned].tolist())))
        theirs = sorted(zip(*np.asarray(rec[index]).tolist(), map(tuple, rec[aligned].tolist())))
        assert ours == theirs and out[index].dtype == rec[index].dtype
    np.testing.assert_allclose(np.sort(np.linalg.norm(_edge_vectors(out), axis=1)),
                               np.sort(np.linalg.norm(_edge_vectors(rec), axis=1)), atol=1e-12)
    if which == "molecule":
        assert np.array_equal(out[R.CONFORMERS], rec[R.CONFORMERS][:, perm])
    with pytest.raises(ValueError, match="not a permutation"):
        T.permute(rec, np.zeros(len(rec[R.Z]), dtype=int))


def test_batch_node_order():
    order = T.batch_node_order([np.array([1, 0, 2]), np.array([1, 0])])
    assert order.tolist() == [1, 0, 2, 4, 3]


def test_supercell_gives_every_atom_its_environment():
    """mp-762507 (Li2CrNiO4): its 12-neighbour cut falls inside a shell; ties keep it whole."""
    rec = _crystal("mp-762507")
    double = T.supercell(rec, (2, 1, 1), CFG)
    assert len(double[R.Z]) == 2 * len(rec[R.Z]) and np.array_equal(double[R.Z][: len(rec[R.Z])], rec[R.Z])
    np.testing.assert_allclose(double[R.CELL], np.diag([2, 1, 1]) @ rec[R.CELL])
    assert _environments(double) == sorted(_environments(rec) * 2)
    # the same as featurising pymatgen's own supercell of the CIF
    from pymatgen.core import Structure

    cif = Structure.from_str(mp_cif_texts()["mp-762507"], fmt="cif").make_supercell([2, 1, 1], in_place=False)
    theirs = featurize(RawRecord("t", "s", R.CRYSTAL, "pymatgen", cif.as_dict()), [], CFG)
    assert _environments(theirs) == _environments(double)
    # another basis of the same lattice: same atoms, same environments
    sheared = T.supercell(rec, [[1, 1, 0], [0, 1, 0], [0, 0, 1]], CFG)
    assert len(sheared[R.Z]) == len(rec[R.Z]) and _environments(sheared) == _environments(rec)
    # strict cutting (no tie tolerance) is what makes the cell choice visible: the helper sees it
    strict = PreprocessConfig(crystal={"tie_tolerance": 0.0})
    assert _environments(T.supercell(_crystal("mp-762507", strict), (2, 1, 1), strict)) != sorted(
        _environments(_crystal("mp-762507", strict)) * 2)
    with pytest.raises(ValueError, match="no cell"):
        T.supercell(featurize(RawRecord("t", "m", R.MOLECULE, "smiles", "CCO"), [], CFG), (2, 1, 1), CFG)


def test_wrap_moves_atoms_into_the_cell_and_keeps_edges():
    rec = T.translate(_crystal("mp-11114"), [7.0, -3.0, 2.0])
    wrapped = T.wrap(rec)
    frac = wrapped[R.POS] @ np.linalg.inv(wrapped[R.CELL])
    assert np.all((frac >= -1e-9) & (frac < 1 + 1e-9))
    assert not np.allclose(wrapped[R.POS], rec[R.POS])
    np.testing.assert_allclose(_edge_vectors(wrapped), _edge_vectors(rec), atol=1e-9)


def _sorted_distances(records: list[dict]) -> np.ndarray:
    """A function of records that is invariant: per record, its 20 shortest edge lengths."""
    return np.stack([np.sort(np.linalg.norm(_edge_vectors(r), axis=1))[:20] for r in records])


def test_assert_invariant_passes_fails_and_refuses_identity(qm9_shards):
    ds = ShardDataset(qm9_shards)
    records = [ds[i] for i in range(60, 64)]
    moves = {"rotation": lambda r: T.rotate(r, T.random_rotation(1)),
             "translation": lambda r: T.translate(r, [1.0, 2.0, 3.0]),
             "permutation": lambda r: T.permute(r, T.random_permutation(r, seed=0))}
    T.assert_invariant(_sorted_distances, records, moves, atol=1e-10)
    with pytest.raises(AssertionError, match="not invariant under rotation"):
        T.assert_invariant(lambda rs: np.stack([r[R.POS].sum(0) for r in rs]), records, {"rotation": moves["rotation"]})
    with pytest.raises(AssertionError, match="could not fail"):
        T.assert_invariant(_sorted_distances, records, [lambda r: dict(r)])
    with pytest.raises(ValueError, match="does not describe"):
        T.rotate(dict(records[0], density=np.zeros(3)), np.eye(3))
