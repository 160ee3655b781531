"""Shard format: bit-exact round trip, corruption detection, DataLoader reading, splits."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from helpers import records_equal
from pipeline import MolmatError
from pipeline.config import PreprocessConfig
from pipeline.featurize import featurize
from pipeline.graphs import collate
from pipeline.readers import RawRecord, open_source
from pipeline.shards import (CorruptRecordError, ShardDataset, decode_record, encode_record, load_manifest,
                             record_key, verify)
from pipeline.splits import load_split, scaffold_split


def test_encode_decode_bit_exact(datasets_dir):
    r = open_source(datasets_dir / "qm9" / "xyz")
    raw = next(r.records())
    arrays = featurize(raw, [t for t, _ in r.targets], PreprocessConfig(molecule={"conformers": 2}))
    back = decode_record(encode_record(arrays))
    assert records_equal(back, arrays)
    assert back["conformers"].shape == (2, 4, 3)


def test_shards_hold_exactly_the_featurised_records(qm9_shards, datasets_dir):
    ds = ShardDataset(qm9_shards)
    manifest = load_manifest(qm9_shards)
    assert len(ds) == manifest["records"] == 300 and len(manifest["shards"]) == 3
    r = open_source(datasets_dir / "qm9" / "xyz")
    names = [t["name"] for t in manifest["targets"]]
    for i, raw in enumerate(r.records()):
        expected = encode_record(featurize(raw, names, PreprocessConfig()))
        assert ds.raw(i) == expected, f"record {i} differs from a fresh featurisation"


def test_manifest_records_kinds_and_coordinates(qm9_shards, mp_shards):
    from pipeline.shards import dataset_has_coordinates, dataset_kinds, read_shard_meta

    for root, kind in ((qm9_shards, "molecule"), (mp_shards, "crystal")):
        manifest = load_manifest(root)
        assert manifest["kinds"] == [kind] == dataset_kinds(manifest)
        assert manifest["coordinates"] == "all" == dataset_has_coordinates(manifest)
        metas = [read_shard_meta(root / e["path"]) for e in manifest["shards"]]
        assert [m["kinds"] for m in metas] == [{kind: e["count"]} for e in manifest["shards"]]
        assert [m["with_coordinates"] for m in metas] == [e["count"] for e in manifest["shards"]]
        old = {k: v for k, v in manifest.items() if k not in ("kinds", "coordinates")}  # before these facts
        assert dataset_kinds(old) == [kind] and dataset_has_coordinates(old) == "all"


def test_manifest_and_stats(qm9_shards):
    manifest = load_manifest(qm9_shards)
    assert manifest["inputs"] and all(len(x["sha256"]) == 64 for x in manifest["inputs"])
    assert {"name": "gap_Ha", "unit": "Ha"} in manifest["targets"]
    stats = json.loads((qm9_shards / "stats.json").read_text())
    gaps = np.array([ShardDataset(qm9_shards)[i]["y"][manifest["targets"].index({"name": "gap_Ha", "unit": "Ha"})]
                     for i in range(300)])
    assert stats["targets"]["gap_Ha"]["mean"] == pytest.approx(gaps.mean(), rel=1e-9)
    assert stats["targets"]["gap_Ha"]["std"] == pytest.approx(gaps.std(ddof=1), rel=1e-9)
    assert stats["elements"]["C"] > 0 and stats["per_graph"]["atoms"]["max"] <= 29


def _flip_byte_in_record(shard_file, record_bytes):
    data = bytearray(shard_file.read_bytes())
    at = data.find(record_bytes)
    assert at >= 0
    data[at + len(record_bytes) // 2] ^= 0xFF
    shard_file.write_bytes(bytes(data))


def test_corrupt_byte_is_detected_with_shard_and_key(qm9_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(qm9_shards, copy)
    ds = ShardDataset(copy)
    _flip_byte_in_record(ds.shards[1], ds.raw(150))
    fresh = ShardDataset(copy)
    with pytest.raises(CorruptRecordError, match=r"data\.0001\.lmdb: key 0000000022: checksum mismatch"):
        fresh[150]
    assert fresh[149]["z"].size > 0  # the rest still reads
    checked, problems = verify(copy)
    assert checked == 299 and len(problems) == 1 and "0000000022" in problems[0]
    cli = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", str(copy), "--verify"],
                         capture_output=True, text=True)
    assert cli.returncode != 0 and "checksum mismatch" in cli.stderr


def test_dataloader_two_workers_reads_each_record_once(mp_shards):
    ds = ShardDataset(mp_shards)
    assert ds[0]["z"].size  # the parent opens the shard before forking: workers must reopen, not reuse
    loader = torch.utils.data.DataLoader(ds, batch_size=32, shuffle=True, num_workers=2, collate_fn=collate,
                                         generator=torch.Generator().manual_seed(0))
    seen = []
    for batch in loader:
        seen.extend(batch.index)
        assert batch.g2d.batch_size == batch.y.shape[0] == len(batch.index)
    assert sorted(seen) == list(range(len(ds)))


def test_collate_shapes_and_mask(mp_shards):
    ds = ShardDataset(mp_shards)
    batch = collate([ds[i] for i in range(40)])
    assert batch.y.shape == (40, 4) and batch.mask.dtype == torch.bool
    assert batch.g3d.batch_num_nodes().tolist() == batch.n_atoms.tolist()
    moduli_known = batch.mask[:, 2]
    assert 0 < moduli_known.sum() < 40  # elastic moduli exist for only some crystals
    assert torch.all(batch.y[~batch.mask] == 0)


def test_a_3d_only_collate_skips_the_2d_view_and_keeps_everything_else(mp_shards, qm9_shards):
    from pipeline.config import MPNNConfig, PaiNNConfig
    from pipeline.models import build_encoder

    records = [ShardDataset(mp_shards)[i] for i in range(12)]
    full, only3d = collate(records), collate(records, views=("3d",))
    assert only3d.g2d is None and full.g2d is not None
    for key in ("z", "pos"):
        assert torch.equal(only3d.g3d.ndata[key], full.g3d.ndata[key])
    assert torch.equal(only3d.g3d.edata["image"], full.g3d.edata["image"])
    assert [t.tolist() for t in only3d.g3d.edges()] == [t.tolist() for t in full.g3d.edges()]
    for name in ("cell", "y", "mask", "n_atoms", "z"):
        assert torch.equal(getattr(only3d, name), getattr(full, name)), name
    assert only3d.ids == full.ids and only3d.kinds == full.kinds
    torch.manual_seed(0)
    painn = build_encoder(PaiNNConfig(hidden=16, cutoff=8.0, readout="softmax")).eval()
    torch.testing.assert_close(painn(only3d)[0], painn(full)[0], rtol=0, atol=0)
    with pytest.raises(MolmatError, match="collated without it"):
        build_encoder(MPNNConfig(hidden=8))(only3d)
    # molecules from SMILES without a conformer have no 3D graph: the 2D one is built anyway, so
    # that a 3D encoder can say what is missing instead of finding no graph at all
    flat = [{k: v for k, v in ShardDataset(qm9_shards)[i].items() if k not in ("pos", "nbr_index", "nbr_image")}
            for i in range(3)]
    batch = collate(flat, views=("3d",))
    assert batch.g3d is None and batch.g2d is not None and batch.z.tolist() == batch.g2d.ndata["z"].tolist()


def test_split_is_deterministic_disjoint_and_complete(qm9_shards):
    split = load_split(qm9_shards)
    parts = [set(split[k]) for k in ("train", "val", "test")]
    assert sum(map(len, parts)) == 300 and set().union(*parts) == set(range(300))
    assert len(split["test"]) == 30 and len(split["val"]) == 30


def test_scaffold_split_keeps_groups_together():
    scaffolds = ["c1ccccc1"] * 10 + ["C1CC1"] * 6 + [""] * 20 + [f"s{i}" for i in range(64)]
    a = scaffold_split(scaffolds, 0.1, 0.1, seed=1)
    b = scaffold_split(scaffolds, 0.1, 0.1, seed=1)
    assert a == b
    where = {i: k for k, idx in a.items() for i in idx}
    for group in ("c1ccccc1", "C1CC1", ""):
        members = [i for i, s in enumerate(scaffolds) if s == group]
        assert len({where[i] for i in members}) == 1, group
    assert scaffold_split(scaffolds, 0.1, 0.1, seed=2) != a


def test_split_that_does_not_fit_the_shards_is_refused(qm9_shards, tmp_path):
    copy = tmp_path / "shards"
    shutil.copytree(qm9_shards, copy)
    split = json.loads((copy / "split.json").read_text())
    (copy / "split.json").write_text(json.dumps(dict(split, records=299)))
    with pytest.raises(MolmatError, match=r"split\.json covers 299 records but the shards .* hold 300"):
        load_split(copy)
    (copy / "split.json").write_text(json.dumps(dict(split, test=split["test"] + [300])))
    with pytest.raises(MolmatError, match=r"the test split holds indices outside 0\.\.299"):
        load_split(copy)


def test_dataset_pickles_without_lmdb_handles(qm9_shards):
    import pickle

    ds = ShardDataset(qm9_shards, [5, 200])
    first = ds[1]
    clone = pickle.loads(pickle.dumps(ds))  # what a spawned DataLoader worker receives
    assert clone._envs == {} and records_equal(clone[1], first)


def test_collate_of_records_with_different_targets_names_them(qm9_shards, mp_shards):
    a, b = ShardDataset(qm9_shards)[0], ShardDataset(mp_shards)[0]
    assert a["y"].size != b["y"].size
    with pytest.raises(MolmatError, match=r"different numbers of targets .*" + a["_id"]):
        collate([a, b])


@pytest.mark.parametrize("mp_id, shells", [("mp-1", [8, 6]),        # bcc Cs: 8 nearest, then 6
                                           ("mp-1986", [4, 12])])   # zincblende ZnO: 4 O, then 12 Zn
def test_crystal_edges_carry_coordination_shells(mp_id, shells):
    from helpers import mp_cif_texts
    from pipeline.graphs import N_SHELLS, SHELL_COLUMN

    rec = featurize(RawRecord("t", mp_id, "crystal", "cif", mp_cif_texts()[mp_id]), [], PreprocessConfig())
    e = collate([rec]).g2d.edata["e"]
    dst = collate([rec]).g2d.edges()[1]
    flags = e[:, SHELL_COLUMN:SHELL_COLUMN + N_SHELLS]
    assert torch.all(flags.sum(1) == 1), "every neighbour edge is in exactly one shell"
    for atom in range(len(rec["z"])):
        counts = flags[dst == atom].sum(0).tolist()
        assert counts[:len(shells)] == shells and sum(counts) == sum(shells), (atom, counts)


def test_neighbour_shells_group_ties_and_follow_distance():
    from pipeline.graphs import neighbour_shells

    dst = np.array([1, 0, 0, 0, 1, 0, 1])
    dist = np.array([3.0, 2.0, 2.05, 2.5, 3.0, 2.0, 4.0])
    assert neighbour_shells(dst, dist, gap=0.1).tolist() == [0, 0, 0, 1, 0, 0, 1]
    assert neighbour_shells(np.zeros(0, int), np.zeros(0)).size == 0


def test_molmat_loader_workers_ignore_stop_signals_and_do_not_block_exit(mp_shards, tmp_path):
    """Workers of make_loader survive SIGTERM/SIGUSR1, and a process that leaves them running still exits."""
    script = tmp_path / "leak.py"
    script.write_text(f'''
import os, signal, sys
from pipeline.graphs import collate
from pipeline.shards import ShardDataset
from pipeline.training import make_loader
loader = make_loader(ShardDataset({str(mp_shards)!r}), 16, num_workers=2, shuffle_seed=0, collate_fn=collate)
it = iter(loader)  # kept alive to the end: its workers are still running at exit
next(it)
for w in it._workers:
    os.kill(w.pid, signal.SIGTERM)
    os.kill(w.pid, signal.SIGUSR1)
next(it)  # a killed worker would raise "DataLoader worker ... is killed by signal"
print("alive", all(w.is_alive() for w in it._workers))
''')
    r = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "alive True" in r.stdout
