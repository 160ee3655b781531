"""The record contract (schema, README table, codec, element table) and the featurisation facts
(which keys a model must agree with, and the one cutoff rule)."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from helpers import DATASETS, ROOT
from pipeline import records as R
from pipeline.config import PreprocessConfig
from pipeline.elements import SYMBOLS, atomic_number, element_symbol
from pipeline.featurize import (ATOM_COLUMNS, BOND_COLUMNS, KEY_RELEVANCE, featurization_differences,
                                featurization_spec, featurize, neighbour_cutoff)
from pipeline.readers import open_source
from pipeline.shards import ShardDataset


def test_readme_shows_exactly_the_schema_table():
    readme = (ROOT / "README.md").read_text()
    assert R.schema_markdown() in readme
    for spec in R.SCHEMA:  # the rendered table names every key
        assert f"| `{spec.name}` |" in R.schema_markdown()


def _featurised(cfg: PreprocessConfig) -> list[dict]:
    """Records of every input format, featurised with ``cfg``."""
    out = []
    for src in (DATASETS / "qm9" / "xyz", DATASETS / "qm9" / "qm9_mini.sdf", DATASETS / "qm8" / "qm8_sample.csv",
                DATASETS / "mp" / "cifs.tar.gz", DATASETS / "mp" / "structures.json.gz"):
        reader = open_source(src)
        targets = [t for t, _ in reader.targets]
        out += [featurize(raw, targets, cfg) for raw in itertools.islice(reader.records(), 3)]
    return out


@pytest.mark.parametrize("cfg", [PreprocessConfig(molecule={"conformers": 2}),
                                 PreprocessConfig(molecule={"embed_smiles": False})], ids=["conformers", "no_embed"])
def test_every_featurised_record_fits_the_schema(cfg):
    records = _featurised(cfg)
    assert {r[R.KIND] for r in records} == {R.MOLECULE, R.CRYSTAL}
    for rec in records:
        kind = rec[R.KIND]
        sizes: dict[str, int] = {}
        for key, value in rec.items():
            spec = R.SPECS.get(key)
            assert spec is not None, f"{key} is not in the schema"
            assert kind in spec.kinds, f"{key} in a {kind} record"
            if spec.is_meta:
                assert isinstance(value, str), key
                continue
            assert value.dtype == np.dtype(spec.dtype), (key, value.dtype)
            assert len(spec.dims) == value.ndim, (key, value.shape)
            for dim, n in zip(spec.dims, value.shape):
                if dim.isdigit():
                    assert n == int(dim), (key, value.shape)
                else:
                    assert sizes.setdefault(dim, n) == n, f"{key}: {dim} is {n}, elsewhere {sizes[dim]}"
        required = {s.name for s in R.SCHEMA if s.required and kind in s.kinds and s.name != R.INDEX}
        assert required <= set(rec), f"{rec[R.ID]} lacks {required - set(rec)}"
        if R.POS in rec:  # a record with coordinates has its neighbour graph
            assert {R.NBR_INDEX, R.NBR_IMAGE} <= set(rec)
    assert any(R.CONFORMERS in r for r in records) == (cfg.molecule.conformers > 0)
    no_xyz = [r for r in records if R.POS not in r]
    assert bool(no_xyz) == (not cfg.molecule.embed_smiles) and all(r[R.KIND] == R.MOLECULE for r in no_xyz)


def test_schema_shapes_follow_the_feature_columns_and_transforms_are_known():
    assert R.SPECS[R.ATOM_FEAT].dims == ("N", str(len(ATOM_COLUMNS)))
    assert R.SPECS[R.BOND_FEAT].dims == ("B", str(len(BOND_COLUMNS)))
    for spec in R.SCHEMA:
        assert spec.transform in R.TRANSFORMS and set(spec.kinds) <= set(R.KINDS)
        assert all(d.isdigit() or d in R.SHAPE_SYMBOLS for d in spec.dims), spec.name
    assert len({s.name for s in R.SCHEMA}) == len(R.SCHEMA)


def test_codec_lives_in_records_and_shards_reexports_it(qm9_shards):
    import pipeline.shards as shards

    assert shards.encode_record is R.encode_record and shards.decode_record is R.decode_record
    assert shards.CorruptRecordError is R.CorruptRecordError and shards.MAGIC == R.MAGIC == b"MMR1"
    ds = ShardDataset(qm9_shards)
    raw = ds.raw(7)
    assert R.encode_record(R.decode_record(raw)) == raw
    with pytest.raises(R.CorruptRecordError, match="here: checksum mismatch"):
        R.decode_record(raw[:40] + bytes([raw[40] ^ 1]) + raw[41:], where="here")


def test_element_table_matches_rdkit_and_shards_need_no_rdkit():
    from rdkit import Chem

    table = Chem.GetPeriodicTable()
    assert len(SYMBOLS) == 118
    for z in range(1, 119):
        assert element_symbol(z) == table.GetElementSymbol(z)
        assert atomic_number(element_symbol(z)) == z
    for bad in (0, 119):
        with pytest.raises(ValueError, match="atomic number"):
            element_symbol(bad)
    shards_source = (ROOT / "pipeline" / "shards.py").read_text()
    assert "featurize" not in shards_source and "rdkit" not in shards_source.lower()


# --------------------------------------------------------------------------- featurisation facts
#: Every featurisation key, classified by hand: which model views must agree on it, and for
#: which record kinds. A new key in featurization_spec fails the test until it is classified.
EXPECTED_RELEVANCE = {
    "featurization_version": ({"2d", "3d"}, {"molecule", "crystal"}),
    "atom_columns": ({"2d", "3d"}, {"molecule", "crystal"}),
    "bond_columns": ({"2d", "3d"}, {"molecule", "crystal"}),
    "max_z": ({"2d", "3d"}, {"molecule", "crystal"}),
    "molecule_cutoff": ({"3d"}, {"molecule"}),
    "crystal_cutoff": ({"2d", "3d"}, {"crystal"}),          # the crystal 2D graph is the neighbour topology
    "crystal_max_neighbors": ({"2d", "3d"}, {"crystal"}),
    "crystal_tie_tolerance": ({"2d", "3d"}, {"crystal"}),
    "conformers": (set(), set()),                            # extra views only; no graph changes
}


def test_every_featurisation_key_is_classified():
    spec = featurization_spec(PreprocessConfig())
    assert set(KEY_RELEVANCE) == set(spec) == set(EXPECTED_RELEVANCE)
    for key, (views, kinds) in EXPECTED_RELEVANCE.items():
        assert (set(KEY_RELEVANCE[key].views), set(KEY_RELEVANCE[key].kinds)) == (views, kinds), key
    # and the check follows the table: change one key, and only the models it matters to object
    for key, (views, kinds) in EXPECTED_RELEVANCE.items():
        other = dict(spec, **{key: "changed"})
        for model_views in ({"2d"}, {"3d"}, {"2d", "3d"}):
            for data_kinds in ({"molecule"}, {"crystal"}, {"molecule", "crystal"}):
                diff = featurization_differences(spec, other, model_views, data_kinds)
                relevant = bool(views & model_views and kinds & data_kinds)
                assert diff == ([f"{key}: model {spec[key]!r} vs shards 'changed'"] if relevant else []), \
                    (key, model_views, data_kinds)


def test_tie_tolerance_is_checked_for_crystal_models():
    model = featurization_spec(PreprocessConfig())
    shards = featurization_spec(PreprocessConfig(crystal={"tie_tolerance": 0.0}))
    for views in (["2d"], ["3d"], ["2d", "3d"]):
        assert featurization_differences(model, shards, views, ["crystal"]) == [
            "crystal_tie_tolerance: model 0.001 vs shards 0.0"]
    assert featurization_differences(model, shards, ["2d", "3d"], ["molecule"]) == []
    # a model trained before the key existed: missing compares as None
    old = {k: v for k, v in model.items() if k != "crystal_tie_tolerance"}
    assert featurization_differences(old, model, ["2d"], ["crystal"]) == ["crystal_tie_tolerance: model None vs shards 0.001"]


def test_molecule_cutoff_matters_only_to_3d_molecule_models():
    model = featurization_spec(PreprocessConfig())
    shards = featurization_spec(PreprocessConfig(molecule={"cutoff": 4.0}))
    assert featurization_differences(model, shards, ["2d"], ["molecule"]) == []
    assert featurization_differences(model, shards, ["3d"], ["molecule"]) == ["molecule_cutoff: model 5.0 vs shards 4.0"]
    assert featurization_differences(model, shards, ["2d", "3d"], ["crystal"]) == []
    with pytest.raises(ValueError, match="unknown views"):
        featurization_differences(model, shards, ["4d"], ["molecule"])
    with pytest.raises(ValueError, match="unknown kinds"):
        featurization_differences(model, shards, ["2d"], ["polymer"])


def test_one_cutoff_rule():
    spec = featurization_spec(PreprocessConfig(molecule={"cutoff": 5.0}, crystal={"cutoff": 8.0}))
    assert neighbour_cutoff(spec, ["crystal"]) == 8.0
    assert neighbour_cutoff(spec, ["molecule"]) == 5.0
    assert neighbour_cutoff(spec, {"molecule", "crystal"}) == 5.0
    small = featurization_spec(PreprocessConfig(molecule={"cutoff": 6.0}, crystal={"cutoff": 4.0}))
    assert neighbour_cutoff(small, ["molecule", "crystal"]) == 4.0
    with pytest.raises(ValueError, match="at least one"):
        neighbour_cutoff(spec, [])
