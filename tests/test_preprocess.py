"""Preprocessing runs: rejects, resume after a kill, parts and merge, CLI forms and exit codes."""
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import numpy as np
import pytest

from helpers import DATASETS, mp_cif_texts, qm9_files, records_equal
from pipeline import MolmatError
from pipeline.config import load_config
from pipeline.preprocess import preprocess
from pipeline.shards import ShardDataset, dataset_has_coordinates, dataset_kinds, load_manifest

CLI = [sys.executable, "-m", "pipeline.cli"]


def _all_records(root):
    ds = ShardDataset(root)
    return [ds.raw(i) for i in range(len(ds))]


def test_bad_inputs_go_to_rejects_and_the_rest_is_written(tmp_path):
    # molecules: real QM9 files plus a truncated one, an out-of-table element, and a non-numeric label
    mol_dir = tmp_path / "mols"
    mol_dir.mkdir()
    files = qm9_files(12)
    for f in files:
        shutil.copy(f, mol_dir)
    lines = files[3].read_text().splitlines()
    (mol_dir / "dsgdb9nsd_900001.xyz").write_text("\n".join(lines[:4]) + "\n")          # truncated
    (mol_dir / "dsgdb9nsd_900002.xyz").write_text("\n".join([lines[0], lines[1], lines[2].replace("C", "Og", 1)]
                                                           + lines[3:]) + "\n")        # Z=118
    head = lines[1].split("\t")
    head[8] = "not-a-gap"
    (mol_dir / "dsgdb9nsd_900003.xyz").write_text("\n".join([lines[0], "\t".join(head)] + lines[2:]) + "\n")
    out = tmp_path / "mol_shards"
    summary = preprocess([str(mol_dir)], out, load_config(None, ["preprocess.shard_size=5"]), workers=2)
    assert summary.records == 12 and summary.rejected == 3
    rejects = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()]
    by_id = {r["id"]: r for r in rejects}
    assert "truncated" in by_id["900001"]["reason"] and by_id["900001"]["file"].endswith("dsgdb9nsd_900001.xyz")
    assert "Og" in by_id["900002"]["reason"] and "outside the supported table" in by_id["900002"]["reason"]
    assert "gap_Ha" in by_id["900003"]["reason"] and "not a number" in by_id["900003"]["reason"]

    # SMILES RDKit rejects (a real QM8 row with an unclosed ring) and a garbage CIF
    rows = (DATASETS / "qm8" / "qm8_sample.csv").read_text().splitlines()
    bad_row = rows[5].split(",")
    bad_row[0] = bad_row[0] + "1"
    csv_file = tmp_path / "qm8.csv"
    csv_file.write_text("\n".join(rows[:5] + [",".join(bad_row)] + rows[6:9]) + "\n")
    s = preprocess([str(csv_file)], tmp_path / "smi", load_config(), workers=0)
    assert s.records == 7 and s.rejected == 1
    assert "RDKit rejected the SMILES" in (tmp_path / "smi" / "rejects.jsonl").read_text()

    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    texts = mp_cif_texts(6)
    for k, v in texts.items():
        (cif_dir / f"{k}.cif").write_text(v)
    victim = sorted(texts)[2]
    (cif_dir / f"{victim}.cif").write_text(texts[victim][:200] + "\n_atom_site_fract_x 0.x\nloop_\n loop_\n")
    s = preprocess([str(cif_dir)], tmp_path / "cif_shards", load_config(), labels=str(DATASETS / "mp" / "labels.csv"))
    assert s.records == 5 and s.rejected == 1
    assert json.loads((tmp_path / "cif_shards" / "rejects.jsonl").read_text())["id"] == victim


@pytest.mark.slow
def test_killed_run_resumes_to_identical_shards(tmp_path):
    src = str(DATASETS / "mp" / "cifs.tar.gz")
    ref = tmp_path / "ref"
    preprocess([src], ref, load_config(None, ["preprocess.shard_size=25"]), workers=2)

    out = tmp_path / "killed"
    cmd = CLI + ["preprocess", src, "--out", str(out), "--workers", "1", "--set", "preprocess.shard_size=25"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("data.*.lmdb"))) < 3:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    finished = sorted(p.name for p in out.glob("data.*.lmdb"))
    assert 3 <= len(finished) < 12, "the run must be killed mid-way"
    assert not (out / "manifest.json").exists()
    with pytest.raises(MolmatError, match="did not finish"):
        ShardDataset(out)
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("data.*.lmdb")}
    rerun = subprocess.run(cmd, capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    for name, t in mtimes.items():
        assert (out / name).stat().st_mtime_ns == t, f"{name} was rewritten instead of skipped"
    assert _all_records(out) == _all_records(ref)
    assert (out / "split.json").read_text() == (ref / "split.json").read_text()
    assert json.loads((out / "stats.json").read_text()) == json.loads((ref / "stats.json").read_text())


def test_rerun_with_different_config_is_refused(tmp_path):
    out = tmp_path / "s"
    preprocess([str(DATASETS / "qm9" / "qm9_mini.sdf")], out, load_config(), workers=0)
    with pytest.raises(MolmatError, match="differs in: preprocess"):
        preprocess([str(DATASETS / "qm9" / "qm9_mini.sdf")], out, load_config(None, ["preprocess.molecule.cutoff=4"]))


def test_parts_merged_equal_one_run(tmp_path):
    src = [str(DATASETS / "qm9" / "xyz")]
    cfg = load_config(None, ["preprocess.shard_size=40"])
    whole = tmp_path / "whole"
    preprocess(src, whole, cfg, workers=0)
    parts = []
    for i in range(3):
        d = tmp_path / f"part{i}"
        preprocess(src, d, cfg, workers=0, part=i, parts=3)
        parts.append(d)
    from pipeline.preprocess import merge

    merged = tmp_path / "merged"
    merge(parts, merged, cfg)
    assert _all_records(merged) == _all_records(whole)
    for key in ("kinds", "coordinates", "records"):
        assert load_manifest(merged)[key] == load_manifest(whole)[key]
    assert (merged / "split.json").read_text() == (whole / "split.json").read_text()
    assert json.loads((merged / "stats.json").read_text()) == json.loads((whole / "stats.json").read_text())
    sizes_before = {p: p.stat().st_size for d in parts for p in d.glob("data.*.lmdb")}
    assert not list(merged.glob("data.*.lmdb")), "merge must not copy records"
    other = tmp_path / "other"
    preprocess(src, other, load_config(None, ["preprocess.shard_size=40", "preprocess.molecule.cutoff=4"]),
               workers=0, part=0, parts=3)
    with pytest.raises(MolmatError, match="differ in 'preprocess'"):
        merge([other, parts[1], parts[2]], tmp_path / "bad", cfg)
    assert all(p.stat().st_size == s for p, s in sizes_before.items())


def test_cli_preprocess_and_inspect(tmp_path):
    out = tmp_path / "mp"
    r = subprocess.run(CLI + ["preprocess", str(DATASETS / "mp" / "cifs.tar.gz"), "--out", str(out),
                              "--targets", "band_gap_eV,K_VRH_GPa", "--workers", "2"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "wrote 300 records" in r.stdout
    assert [t["name"] for t in load_manifest(out)["targets"]] == ["band_gap_eV", "K_VRH_GPa"]
    assert (out / "config.resolved.yaml").exists()
    r = subprocess.run(CLI + ["inspect", str(out), "--verify"], capture_output=True, text=True)
    assert r.returncode == 0 and "K_VRH_GPa" in r.stdout and "all 300 records" in r.stdout
    r = subprocess.run(CLI + ["preprocess", str(DATASETS / "mp" / "cifs.tar.gz"), "--out", str(tmp_path / "x"),
                              "--targets", "nope"], capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("molmat: error:") and "nope" in r.stderr
    assert "Traceback" not in r.stderr
    r = subprocess.run(CLI + ["inspect", str(tmp_path / "missing")], capture_output=True, text=True)
    assert r.returncode == 2 and "manifest.json is missing" in r.stderr


def test_mixed_molecules_and_crystals_in_one_directory(tmp_path):
    out = tmp_path / "mixed"
    s = preprocess([str(DATASETS / "qm9" / "qm9_mini.sdf"), str(DATASETS / "mp" / "structures.json.gz")], out,
                   load_config(None, ["preprocess.units.band_gap_eV=eV"]), workers=0)
    ds = ShardDataset(out)
    kinds = {ds[i]["_kind"] for i in range(len(ds))}
    assert kinds == {"molecule", "crystal"} and s.records == 61
    manifest = load_manifest(out)
    assert manifest["kinds"] == ["crystal", "molecule"] and manifest["coordinates"] == "all"
    assert dataset_kinds(manifest) == ["crystal", "molecule"]
    from pipeline.graphs import collate

    batch = collate([ds[0], ds[len(ds) - 1]])
    assert batch.kinds == ["molecule", "crystal"] and batch.g3d is not None
    assert np.isnan(ds[0]["y"][[t["name"] for t in s.targets].index("band_gap_eV")])


@pytest.mark.slow
def test_preprocess_array_template_parts_merge_to_one_run(tmp_path):
    """hpc/preprocess_array.sbatch run as two array tasks (srun stood in), merged == one unsplit run."""
    bindir = Path(sys.executable).parent
    if not (bindir / "molmat").exists():
        pytest.skip("needs the molmat script of an installed environment")
    fake = tmp_path / "fakebin"
    fake.mkdir()
    (fake / "srun").write_text('#!/bin/sh\nexec "$@"\n')
    (fake / "srun").chmod(0o755)
    script = Path(__file__).resolve().parent.parent / "hpc" / "preprocess_array.sbatch"
    src = str(DATASETS / "qm9" / "xyz")
    env = dict(os.environ, PATH=f"{fake}:{os.environ.get('PATH', '')}", PARTS="2", SOURCE=src,
               OUT=str(tmp_path / "out"), MOLMAT=str(bindir / "molmat"), SLURM_CPUS_PER_TASK="1",
               MOLMAT_ARGS="--set preprocess.shard_size=40")
    for task in ("0", "1"):
        r = subprocess.run(["bash", str(script)], env=dict(env, SLURM_ARRAY_TASK_ID=task), cwd=tmp_path,
                           capture_output=True, text=True)
        assert r.returncode == 0, r.stdout + r.stderr
    parts = [str(tmp_path / "out" / f"part_{i}") for i in (0, 1)]
    r = subprocess.run(CLI + ["preprocess", "--merge", *parts, "--out", str(tmp_path / "all"),
                              "--set", "preprocess.shard_size=40"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    whole = tmp_path / "whole"
    preprocess([src], whole, load_config(None, ["preprocess.shard_size=40"]), workers=0)
    assert _all_records(tmp_path / "all") == _all_records(whole)


def test_manifest_says_which_records_have_coordinates(tmp_path):
    """SMILES without embedding have no coordinates: 'none' alone, 'some' beside an SDF."""
    rows = (DATASETS / "qm8" / "qm8_sample.csv").read_text().splitlines()
    csv_file = tmp_path / "qm8.csv"
    csv_file.write_text("\n".join(rows[:9]) + "\n")
    no_embed = ["preprocess.molecule.embed_smiles=false"]
    flat = tmp_path / "flat"
    preprocess([str(csv_file)], flat, load_config(None, no_embed), workers=0)
    assert load_manifest(flat)["coordinates"] == "none" == dataset_has_coordinates(load_manifest(flat))
    both = tmp_path / "both"
    preprocess([str(csv_file), str(DATASETS / "qm9" / "qm9_mini.sdf")], both, load_config(None, no_embed), workers=0)
    manifest = load_manifest(both)
    assert manifest["kinds"] == ["molecule"] and manifest["coordinates"] == "some"
    # manifests written before these facts were kept: the same answers from the input formats
    old = {k: v for k, v in manifest.items() if k not in ("kinds", "coordinates")}
    assert dataset_kinds(old) == ["molecule"] and dataset_has_coordinates(old) == "some"


def test_unexpected_error_fails_the_run_after_writing_everything(tmp_path, monkeypatch):
    """A bug (not bad data) that rejects records must not end in exit 0 with a quiet rejects.jsonl."""
    import pipeline.preprocess as pre

    real = pre.featurize

    def buggy(raw, targets, cfg):
        if raw.rid == "000464":
            return {}["no such key"]  # what a code bug looks like: KeyError, not RecordError
        return real(raw, targets, cfg)

    monkeypatch.setattr(pre, "featurize", buggy)
    out = tmp_path / "s"
    with pytest.raises(MolmatError, match=r"1 record\(s\) were rejected by an unexpected error") as info:
        preprocess([str(DATASETS / "qm9" / "xyz")], out, load_config(None, ["preprocess.shard_size=100"]), workers=0)
    assert "dsgdb9nsd_000464.xyz [000464]" in str(info.value) and "KeyError" in str(info.value)
    manifest = load_manifest(out)  # written before the error: nothing is lost
    assert manifest["records"] == 299 and manifest["rejected"] == 1 and len(manifest["shards"]) == 3
    reject = json.loads((out / "rejects.jsonl").read_text())
    assert reject["id"] == "000464" and reject["unexpected"] is True
    # a rerun of the same command reuses the shards and fails the same way
    with pytest.raises(MolmatError, match="unexpected error"):
        preprocess([str(DATASETS / "qm9" / "xyz")], out, load_config(None, ["preprocess.shard_size=100"]), workers=0)


def test_all_records_rejected_is_an_error_with_exit_code(tmp_path):
    cif_dir = tmp_path / "cifs"
    cif_dir.mkdir()
    for rid, text in mp_cif_texts(5).items():
        (cif_dir / f"{rid}.cif").write_text(text)
    out = tmp_path / "none"
    with pytest.raises(MolmatError, match=r"every record \(5\) was rejected, none was written \(first: .*\.cif "
                                          r"\[mp-.*\]: atom 0 .* has no neighbour within 0.5 A"):
        preprocess([str(cif_dir)], out, load_config(None, ["preprocess.crystal.cutoff=0.5"]), workers=0)
    assert load_manifest(out)["records"] == 0 and len((out / "rejects.jsonl").read_text().splitlines()) == 5
    r = subprocess.run(CLI + ["preprocess", str(cif_dir), "--out", str(tmp_path / "cli"), "--workers", "0",
                              "--set", "preprocess.crystal.cutoff=0.5"], capture_output=True, text=True)
    assert r.returncode == 2 and "every record (5) was rejected" in r.stderr and "Traceback" not in r.stderr
