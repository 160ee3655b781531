"""Issue 14: nothing hangs, nothing crashes, nothing is read silently wrong.

Every bad input here is derived from the shipped real files (a byte changed, a line removed, a
file truncated, two files swapped); every test failed on the code before the fix (see the
module's cases). Hangs are bounded by a deadline, and cases that crashed the process (SIGBUS)
run in a subprocess, so that the old behaviour fails a test instead of the test run.
"""
from __future__ import annotations

import contextlib
import csv
import gzip
import io
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import lmdb
import numpy as np
import pytest

from helpers import DATASETS, mp_cif_texts, qm9_files, stop_mid_epoch
from pipeline import MolmatError
from pipeline.config import load_config
from pipeline.preprocess import preprocess
from pipeline.readers import RawRecord
from pipeline.shards import ShardDataset, close_shards, load_manifest, verify

CLI = [sys.executable, "-m", "pipeline.cli"]
LEGACY = Path(__file__).resolve().parent / "data" / "legacy_v0_1"
# a model small enough that a refusal or a 1-epoch run costs seconds
TINY = ["model.encoder2d.hidden=8", "model.encoder2d.steps=1", "model.encoder2d.set2set_iters=1",
        "model.heads.hidden=8", "train.batch_size=64", "train.warmup_steps=0", "train.log_every=1000",
        "train.threads=1", "train.device=cpu"]


# ------------------------------------------------------------------------------------- helpers
@contextlib.contextmanager
def deadline(seconds: int, what: str):
    """Fail (instead of hanging the test run) when the block takes longer than ``seconds``."""
    def fire(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s: it hangs")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def run_cli(*args, timeout=300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(CLI + [str(a) for a in args], capture_output=True, text=True, timeout=timeout, **kwargs)


def assert_refused(r: subprocess.CompletedProcess, *needles: str, code: int = 2) -> str:
    """Exit ``code`` with exactly one ``molmat: error:`` line naming every needle, and no traceback."""
    errors = [line for line in r.stderr.splitlines() if line.startswith("molmat: error:")]
    assert r.returncode == code, (r.returncode, r.stderr[-3000:])
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    assert len(errors) == 1, r.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def copy_shards(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _sha256(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def refresh_manifest_entry(root: Path, number: int) -> None:
    """Make the manifest's size/sha256 of shard ``number`` match its file again (so that only
    what is inside the file can tell it apart)."""
    manifest = json.loads((root / "manifest.json").read_text())
    entry = manifest["shards"][number]
    path = root / entry["path"]
    entry["bytes"] = path.stat().st_size
    if "sha256" in entry:
        entry["sha256"] = _sha256(path)
    (root / "manifest.json").write_text(json.dumps(manifest))


def records_by_id(root: Path) -> dict[str, bytes]:
    ds = ShardDataset(root)
    return {ds.get(i)["_id"]: ds.raw(i) for i in range(len(ds))}


def rejects(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "rejects.jsonl").read_text().splitlines()]


def featurize_one(raw: RawRecord, targets=(), overrides=()):
    from pipeline.config import PreprocessConfig
    from pipeline.featurize import featurize

    cfg = load_config(None, list(overrides)).preprocess if overrides else PreprocessConfig()
    return featurize(raw, list(targets), cfg)


def xyz_raw(text: str, name: str = "dsgdb9nsd_000001.xyz") -> RawRecord:
    return RawRecord(name, "1", "molecule", "xyz", text)


def min_distance(pos: np.ndarray) -> float:
    d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
    d[np.diag_indices(len(pos))] = np.inf
    return float(d.min())


# ------------------------------------------------------------ 1. dead workers, degenerate cells
@pytest.mark.parametrize("slow_submit", [False, True])
def test_a_dead_worker_is_noticed_and_only_its_record_is_rejected(tmp_path, monkeypatch, slow_submit):
    """A worker killed by SIGKILL (what the OOM killer sends) hung the run forever. With
    ``slow_submit`` the pool has time to notice the death before the next chunk is queued (what a
    loaded machine does): queueing then raised BrokenProcessPool out of the run."""
    import pipeline.preprocess as pre

    if slow_submit:
        submit = pre._Workers.submit

        def late(self, chunk):
            time.sleep(0.3)
            return submit(self, chunk)

        monkeypatch.setattr(pre._Workers, "submit", late)

    src = tmp_path / "xyz"
    src.mkdir()
    files = qm9_files(30)
    for f in files:
        shutil.copy(f, src)
    cfg = load_config(None, ["preprocess.shard_size=10", "preprocess.chunk_size=4"])
    preprocess([str(src)], tmp_path / "ref", cfg, workers=0)
    victim = files[7].stem.rsplit("_", 1)[-1]
    parent = os.getpid()
    real = pre.featurize

    def dies_on_the_victim(raw, targets, c):
        if raw.rid == victim and os.getpid() != parent:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(raw, targets, c)

    monkeypatch.setattr(pre, "featurize", dies_on_the_victim)  # forked workers inherit it
    with deadline(240, "preprocess with a worker that dies"):
        summary = preprocess([str(src)], tmp_path / "out", cfg, workers=2)
    assert summary.records == 29 and summary.rejected == 1
    (reject,) = rejects(tmp_path / "out")
    assert reject["id"] == victim and "worker process died" in reject["reason"] and not reject.get("unexpected")
    got, ref = records_by_id(tmp_path / "out"), records_by_id(tmp_path / "ref")
    assert set(got) == set(ref) - {victim}
    assert all(got[k] == ref[k] for k in got), "records featurised again after the death must be identical"


@pytest.mark.slow
def test_a_worker_killed_from_outside_is_replaced_and_the_run_is_whole(tmp_path):
    import psutil

    src = str(DATASETS / "mp" / "cifs.tar.gz")
    sets = ["--set", "preprocess.shard_size=25", "--set", "preprocess.chunk_size=8"]
    preprocess([src], tmp_path / "ref", load_config(None, ["preprocess.shard_size=25"]), workers=0)
    out = tmp_path / "out"
    proc = subprocess.Popen(CLI + ["preprocess", src, "--out", str(out), "--workers", "1", *sets],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        t0 = time.time()
        while not (out / "data.0000.lmdb").exists() and time.time() - t0 < 120:
            time.sleep(0.01)
        me = psutil.Process(proc.pid)
        workers = [c for c in me.children(recursive=True) if c.cmdline() == me.cmdline()]
        assert workers, "the run must still be working when its worker is killed"
        for w in workers:
            w.kill()
        _, err = proc.communicate(timeout=300)  # before the fix: waits forever
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 0, err[-2000:]
    assert load_manifest(out)["rejected"] == 0
    ref = ShardDataset(tmp_path / "ref")
    got = ShardDataset(out)
    assert [got.raw(i) for i in range(len(got))] == [ref.raw(i) for i in range(len(ref))]


def _tiny_cell(text: str, length: float) -> str:
    import re

    return re.sub(r"(_cell_length_[abc]\s+)[\d.]+", lambda m: f"{m.group(1)}{length}", text)


def test_degenerate_cells_are_rejected_before_the_neighbour_search(tmp_path):
    """A CIF with a 0.05 A cell was accepted and took 4.8 GB in the neighbour search."""
    texts = mp_cif_texts(4)
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for rid, text in texts.items():
        (cifs / f"{rid}.cif").write_text(text)
    victim = sorted(texts)[1]
    (cifs / f"{victim}.cif").write_text(_tiny_cell(texts[victim], 0.05))

    def limit():  # the old code ran out of this much memory instead of answering
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    r = run_cli("preprocess", cifs, "--out", tmp_path / "out", "--workers", "0", timeout=240, preexec_fn=limit)
    assert r.returncode == 0, r.stderr[-2000:]
    (reject,) = rejects(tmp_path / "out")
    assert reject["id"] == victim and "volume per atom" in reject["reason"]
    assert "min_volume_per_atom" in reject["reason"]
    assert load_manifest(tmp_path / "out")["records"] == 3
    # a cutoff whose sphere holds more pairs than memory allows is refused before searching
    from pipeline.featurize import RecordError, check_geometry

    rec = featurize_one(RawRecord("x.cif", victim, "crystal", "cif", texts[victim]))
    cfg = load_config(None, ["preprocess.crystal.cutoff=400"]).preprocess
    with pytest.raises(RecordError, match=r"neighbour search would find about .* pairs .* lower preprocess\.crystal"):
        check_geometry(rec["pos"], rec["z"], rec["cell"], cfg)


# -------------------------------------------------------------- 2. truncated shards -> SIGBUS
def test_a_truncated_shard_is_refused_with_one_line_not_a_sigbus(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    shard = copy / "data.0001.lmdb"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = run_cli("inspect", copy, "--verify")
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])  # not -7: a SIGBUS
    assert "data.0001.lmdb" in r.stderr and "truncated" in r.stderr, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    r = run_cli("finetune", "--data", copy, "--out", tmp_path / "run", *[a for s in TINY for a in ("--set", s)])
    assert_refused(r, "data.0001.lmdb", "truncated")
    code = f"from pipeline.shards import ShardDataset\nds = ShardDataset({str(copy)!r})\nds[200]"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "MolmatError" in r.stderr and "data.0001.lmdb" in r.stderr, (r.returncode, r.stderr)
    # an unfinished directory (no manifest yet) whose finished shard was truncated: a re-run makes it again
    out = tmp_path / "unfinished"
    preprocess([str(DATASETS / "qm9" / "xyz")], out, load_config(None, ["preprocess.shard_size=128"]), workers=0)
    (out / "manifest.json").unlink()
    shard = out / "data.0001.lmdb"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    r = run_cli("preprocess", DATASETS / "qm9" / "xyz", "--out", out, "--workers", "0",
                "--set", "preprocess.shard_size=128")
    assert r.returncode == 0, (r.returncode, r.stderr[-2000:])
    ref, got = ShardDataset(qm9_shards), ShardDataset(out)
    assert [got.raw(i) for i in range(300)] == [ref.raw(i) for i in range(300)]


# ------------------------------------------------------ 3. swapped, foreign and edited shards
def test_swapped_shards_are_refused(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    a, b = copy / "data.0000.lmdb", copy / "data.0001.lmdb"
    tmp = copy / "swap"
    a.rename(tmp)
    b.rename(a)
    tmp.rename(b)
    checked, problems = verify(copy)
    assert len(problems) == 2 and "data.0000.lmdb" in problems[0] and "data.0001.lmdb" in problems[1]
    with pytest.raises(MolmatError, match=r"data\.0000\.lmdb"):
        ShardDataset(copy)
    # with the manifest's sizes (and checksums) swapped too, the shard numbers inside still tell
    refresh_manifest_entry(copy, 0)
    refresh_manifest_entry(copy, 1)
    with pytest.raises(MolmatError, match=r"data\.0000\.lmdb: is shard 1 but .*manifest\.json says 0"):
        ShardDataset(copy)
    checked, problems = verify(copy)
    assert len(problems) == 2 and all("swapped" in p for p in problems)


def test_a_shard_of_another_featurisation_is_refused(qm9_shards, tmp_path):
    other = tmp_path / "other"
    preprocess([str(DATASETS / "qm9" / "xyz")], other, load_config(None, ["preprocess.shard_size=128",
                                                                          "preprocess.molecule.cutoff=4"]), workers=0)
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    shutil.copy(other / "data.0000.lmdb", copy / "data.0000.lmdb")
    refresh_manifest_entry(copy, 0)  # even a manifest edited to the foreign file's size and checksum
    with pytest.raises(MolmatError, match=r"data\.0000\.lmdb: belongs to another dataset"):
        ShardDataset(copy)
    checked, problems = verify(copy)
    assert len(problems) == 1 and "another dataset" in problems[0]


def test_renamed_keys_edited_meta_and_totals_are_detected(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    path = copy / "data.0000.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:  # rename key 5 to a key outside the shard's range
        value = txn.get(b"0000000005")
        txn.delete(b"0000000005")
        txn.put(b"0000000500", value)
    env.close()
    refresh_manifest_entry(copy, 0)
    checked, problems = verify(copy)
    assert any("unexpected key '0000000500'" in p for p in problems)
    assert any("missing (first 0000000005)" in p for p in problems)

    copy = copy_shards(qm9_shards, tmp_path / "meta")
    path = copy / "data.0001.lmdb"
    env = lmdb.open(str(path), subdir=False, lock=False)
    with env.begin(write=True) as txn:  # an edited __meta__: one record fewer
        meta = json.loads(txn.get(b"__meta__"))
        txn.put(b"__meta__", json.dumps(dict(meta, count=meta["count"] - 1)).encode())
    env.close()
    refresh_manifest_entry(copy, 1)
    with pytest.raises(MolmatError, match=r"data\.0001\.lmdb: holds 127 but .* says 128"):
        ShardDataset(copy)

    copy = copy_shards(qm9_shards, tmp_path / "total")
    manifest = json.loads((copy / "manifest.json").read_text())
    (copy / "manifest.json").write_text(json.dumps(dict(manifest, records=301)))
    with pytest.raises(MolmatError, match=r"manifest\.json: says 301 records but its shards hold 300"):
        ShardDataset(copy)
    with pytest.raises(MolmatError, match="says 301 records"):
        verify(copy)


def test_directories_written_before_the_integrity_fields_still_read(qm9_shards, tmp_path):
    """No dataset identity or sha256 recorded (molmat before this change): what is recorded is checked."""
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest.pop("dataset_id")
    for entry in manifest["shards"]:
        entry.pop("sha256")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    assert len(ShardDataset(copy)) == 300
    assert verify(copy) == (300, [])
    shard = copy / "data.0002.lmdb"  # sizes were recorded before too: still checked
    shard.write_bytes(shard.read_bytes()[:-4096])
    with pytest.raises(MolmatError, match=r"data\.0002\.lmdb: 299008 bytes but .* records 303104 \(truncated"):
        ShardDataset(copy)


# -------------------------------------------------------- 4. corrupt shards before training
def _finetune(data, out, *extra):
    from finetune.train import finetune

    return finetune(data, out, load_config(None, TINY + ["train.epochs=1", "finetune.targets=[gap_Ha]", *extra]))


def test_a_damaged_lmdb_page_is_a_one_line_refusal(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    path = copy / "data.0000.lmdb"
    data = bytearray(path.read_bytes())
    data[2 * 4096 + 10] ^= 0xFF  # the page-type flags of the B-tree's first leaf page
    path.write_bytes(bytes(data))
    ds = ShardDataset(copy)
    with pytest.raises(MolmatError, match=r"data\.0000\.lmdb: key 0000000000: LMDB error \(.*MDB_CORRUPTED"):
        ds[0]
    checked, problems = verify(copy)
    assert problems and all("data.0000.lmdb" in p for p in problems)
    r = run_cli("finetune", "--data", copy, "--out", tmp_path / "run", *[a for s in TINY for a in ("--set", s)],
                "--set", "train.epochs=1", "--set", "finetune.targets=[gap_Ha]")
    assert_refused(r, "data.0000.lmdb", "corrupt")


def test_a_corrupt_record_read_by_a_loader_worker_is_one_line(qm9_shards, tmp_path):
    """The error crossed the DataLoader worker boundary with the worker's traceback in its message."""
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    ds = ShardDataset(copy)
    index = next(i for i in json.loads((copy / "split.json").read_text())["train"] if i >= 128)
    raw = ds.raw(index)
    path = ds.shards[1]
    data = bytearray(path.read_bytes())
    data[data.find(raw) + len(raw) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    close_shards()
    r = run_cli("finetune", "--data", copy, "--out", tmp_path / "run", *[a for s in TINY for a in ("--set", s)],
                "--set", "train.epochs=1", "--set", "finetune.targets=[gap_Ha]", "--set", "train.num_workers=1")
    line = assert_refused(r, f"data.0001.lmdb: key {index - 128:010d}: checksum mismatch")
    assert "DataLoader" not in line


def test_a_manifest_count_one_short_is_refused_before_training(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["shards"][2]["count"] -= 1
    manifest["records"] -= 1
    (copy / "manifest.json").write_text(json.dumps(manifest))
    split = json.loads((copy / "split.json").read_text())
    split = dict(split, records=299, **{k: [i for i in split[k] if i < 299] for k in ("train", "val", "test")})
    (copy / "split.json").write_text(json.dumps(split))
    with pytest.raises(MolmatError, match=r"data\.0002\.lmdb: holds 44 but .* says 43"):
        _finetune(copy, tmp_path / "run")
    assert not (tmp_path / "run" / "last.pt").exists()


def test_damaged_manifest_and_missing_stats_are_refused_naming_the_file(qm9_shards, tmp_path):
    copy = copy_shards(qm9_shards, tmp_path / "shards")
    text = (copy / "manifest.json").read_text()
    (copy / "manifest.json").write_text(text[: len(text) // 2])
    with pytest.raises(MolmatError, match=r"manifest\.json: not valid JSON"):
        _finetune(copy, tmp_path / "run")
    (copy / "manifest.json").write_text(text)
    (copy / "stats.json").unlink()
    with pytest.raises(MolmatError, match=r"stats\.json is missing; re-run the preprocess command"):
        _finetune(copy, tmp_path / "run")
    r = run_cli("inspect", copy)
    assert_refused(r, "stats.json")


# --------------------------------------------------------- 5. two runs into one directory
def test_a_second_run_into_a_locked_directory_is_refused(tmp_path):
    from pipeline.preprocess import LOCK, DirectoryLock

    out = tmp_path / "out"
    out.mkdir()
    src = [str(DATASETS / "qm9" / "qm9_mini.sdf")]
    with DirectoryLock(out, "preprocess"):
        holder = json.loads((out / LOCK).read_text())
        assert holder["pid"] == os.getpid() and holder["host"]
        with pytest.raises(MolmatError, match=rf"another molmat run is writing into this .*\(pid {os.getpid()}"):
            preprocess(src, out, load_config(), workers=0)
    assert not list(out.glob("data.*"))  # the refused run wrote nothing
    assert preprocess(src, out, load_config(), workers=0).records == 21
    assert not (out / LOCK).exists()


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    from pipeline.preprocess import LOCK

    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (out / LOCK).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname(), "since": "then"}))
    assert preprocess([str(DATASETS / "qm9" / "qm9_mini.sdf")], out, load_config(), workers=0).records == 21
    assert not (out / LOCK).exists()


def test_a_shard_published_without_meta_is_made_again_on_rerun(tmp_path):
    """2 in 21 concurrent trials left such a shard, and every re-run then failed."""
    src = [str(DATASETS / "qm9" / "xyz")]
    cfg = load_config(None, ["preprocess.shard_size=128"])
    out = tmp_path / "out"
    preprocess(src, out, cfg, workers=0)
    before = [ShardDataset(out).raw(i) for i in range(300)]
    (out / "manifest.json").unlink()  # as a killed run leaves it
    close_shards()
    env = lmdb.open(str(out / "data.0001.lmdb"), subdir=False, lock=False)
    with env.begin(write=True) as txn:
        txn.delete(b"__meta__")
    env.close()
    summary = preprocess(src, out, cfg, workers=0)
    assert summary.records == 300
    assert [ShardDataset(out).raw(i) for i in range(300)] == before


@pytest.mark.slow
def test_two_concurrent_preprocess_runs_one_refused_one_whole(tmp_path):
    src = str(DATASETS / "mp" / "cifs.tar.gz")
    out = tmp_path / "out"
    sets = ["--set", "preprocess.shard_size=25"]
    first = subprocess.Popen(CLI + ["preprocess", src, "--out", str(out), "--workers", "1", *sets],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not (out / "progress.json").exists() and first.poll() is None and time.time() - t0 < 120:
        time.sleep(0.005)  # progress.json: the first run has begun writing (and holds the lock)
    assert first.poll() is None, "the first run must still be running"
    second = run_cli("preprocess", src, "--out", out, "--workers", "1", *sets)
    _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err[-2000:]
    assert_refused(second, str(out), "another molmat run is writing into this directory", "pid")
    preprocess([src], tmp_path / "ref", load_config(None, ["preprocess.shard_size=25"]), workers=0)
    got, ref = ShardDataset(out), ShardDataset(tmp_path / "ref")
    assert [got.raw(i) for i in range(len(got))] == [ref.raw(i) for i in range(len(ref))]
    assert verify(out)[1] == []
    assert run_cli("preprocess", src, "--out", out, "--workers", "0", *sets).returncode == 0  # a re-run works


# ---------------------------------------------------------------------- 6. crafted weights
def _rezip(src: Path, dst: Path, edit) -> None:
    """Copy a torch zip file, passing each record through ``edit(name, data) -> data``."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression=zipfile.ZIP_STORED) as zout:
        for info in zin.infolist():
            zout.writestr(info, edit(info.filename, zin.read(info.filename)))


def test_a_legacy_weight_file_with_a_short_storage_is_refused(tmp_path):
    """torch 2.2 read past the record (weights_only=True too): heap bytes came back as weights."""
    from pipeline.checkpoint import load_model_dir

    d = tmp_path / "run"
    shutil.copytree(LEGACY / "run_qm9_mpnn", d)
    _rezip(LEGACY / "run_qm9_mpnn" / "model.pt", d / "model.pt",
           lambda name, data: data[:16] if name.endswith("/data/10") else data)
    with pytest.raises(MolmatError, match=r"model\.pt: not a sound molmat 0\.1 weights file \(storage 10 .* declares "
                                          r"2048 bytes, the file holds 16 bytes\)"):
        load_model_dir(d)
    # a pickle that would run a command is refused before torch sees it, and runs nothing
    marker = tmp_path / "pwned"
    payload = b"cposix\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR."
    _rezip(LEGACY / "run_qm9_mpnn" / "model.pt", d / "model.pt",
           lambda name, data: payload if name.endswith("data.pkl") else data)
    with pytest.raises(MolmatError, match="model.pt"):
        load_model_dir(d)
    assert not marker.exists()


@pytest.fixture(scope="module")
def run_and_encoder(qm9_shards, tmp_path_factory):
    """A 1-epoch fine-tuning run and a 1-epoch encoder directory, each with its last.pt."""
    from finetune.train import finetune
    from pretrain.train import pretrain

    root = tmp_path_factory.mktemp("models")
    finetune(qm9_shards, root / "run", load_config(None, TINY + ["train.epochs=1", "finetune.targets=[gap_Ha]"]))
    pretrain([qm9_shards], root / "enc", load_config(None, TINY + ["train.epochs=1", "pretrain.encoder3d.hidden=8",
                                                                  "pretrain.encoder3d.n_rbf=8",
                                                                  "pretrain.encoder3d.interactions=1"]))
    for d in (root / "run", root / "enc"):
        assert (d / "last.pt").exists()
    return root / "run", root / "enc"


def test_last_pt_is_never_read_by_loaders_evaluate_predict_or_init(run_and_encoder, qm9_shards, tmp_path, monkeypatch):
    """last.pt stays torch-native; only the trainer of its own run directory may read it."""
    import torch

    from finetune import load_model
    from finetune.evaluate import evaluate
    from finetune.predict import predict
    from finetune.train import finetune
    from pretrain import load_encoder

    run, enc = run_and_encoder
    read = []
    real = torch.load

    def spy(f, *args, **kwargs):
        read.append(str(f))
        return real(f, *args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    load_model(run)
    load_model(run / "best")
    load_encoder(enc)
    load_encoder(enc, which="3d")
    evaluate(run, qm9_shards, "test", tmp_path / "eval")
    predict(run, [str(f) for f in qm9_files(3)], tmp_path / "p.csv")
    new = tmp_path / "ft"
    finetune(qm9_shards, new, load_config(None, TINY + ["train.epochs=1", "finetune.targets=[gap_Ha]"]), init=str(enc))
    assert read == [], read  # a fresh run reads no last.pt at all, not the encoder's
    finetune(qm9_shards, new, load_config(None, TINY + ["train.epochs=2", "finetune.targets=[gap_Ha]"]), init=str(enc))
    assert read == [str(new / "last.pt")]  # resuming reads its own


# ----------------------------------------------------------------- 7. invalid structures
def _qm9_text(i: int = 3) -> str:
    return qm9_files(i + 1)[i].read_text()


def _with_atom(text: str, atom: int, xyz: str) -> str:
    lines = text.splitlines()
    parts = lines[2 + atom].split()
    lines[2 + atom] = "\t".join([parts[0], *xyz.split(), *parts[4:]])
    return "\n".join(lines) + "\n"


def test_two_atoms_at_the_same_position_are_rejected_in_every_format():
    from pipeline.featurize import RecordError

    text = _qm9_text()
    first = text.splitlines()[2].split()
    with pytest.raises(RecordError, match=r"atom 0 \(.\) is 0 A from atom 1 .* closer than preprocess.min_distance"):
        featurize_one(xyz_raw(_with_atom(text, 1, " ".join(first[1:4]))))
    sdf = (DATASETS / "qm9" / "qm9_mini.sdf").read_text().split("$$$$\n")[5]
    lines = sdf.splitlines()
    lines[5] = lines[4][:30] + lines[5][30:]  # atom 2 given atom 1's coordinates (columns 1-30)
    with pytest.raises(RecordError, match="closer than preprocess.min_distance"):
        featurize_one(RawRecord("t.sdf", "gdb", "molecule", "molblock", "\n".join(lines) + "\n"))
    with gzip.open(DATASETS / "mp" / "structures.json.gz", "rt") as fh:
        item = json.load(fh)[0]
    structure = item.get("structure", item)
    structure["sites"].append(json.loads(json.dumps(structure["sites"][0])))
    with pytest.raises(RecordError, match="closer than preprocess.min_distance"):
        featurize_one(RawRecord("s.json", "x", "crystal", "pymatgen", structure))


def test_min_distance_is_configurable():
    from pipeline.featurize import RecordError

    with gzip.open(DATASETS / "mp" / "structures.json.gz", "rt") as fh:
        item = json.load(fh)[0]
    structure = item.get("structure", item)
    site = json.loads(json.dumps(structure["sites"][0]))
    matrix = np.array(structure["lattice"]["matrix"])
    site["abc"] = (np.array(site["abc"]) + np.linalg.solve(matrix.T, [0.4, 0, 0])).tolist()  # 0.4 A from site 0
    site.pop("xyz", None)
    structure["sites"].append(site)
    with pytest.raises(RecordError, match=r"is 0\.4 A from atom .* closer than preprocess.min_distance \(0\.5 A\)"):
        featurize_one(RawRecord("s.json", "x", "crystal", "pymatgen", structure))
    rec = featurize_one(RawRecord("s.json", "x", "crystal", "pymatgen", structure),
                        overrides=["preprocess.min_distance=0.3"])
    assert len(rec["z"]) == len(structure["sites"])


def test_multi_fragment_smiles_are_embedded_apart():
    """ETKDG placed the ions of a salt on top of each other."""
    rows = list(csv.reader(io.StringIO((DATASETS / "qm8" / "qm8_sample.csv").read_text())))
    a, b = rows[1][0], rows[2][0]
    cutoff = load_config().preprocess.molecule.cutoff
    for smiles in (f"{a}.{b}", "[Na+].[Cl-]", f"{a}.O.O"):
        rec = featurize_one(RawRecord("t.csv:2", "row2", "molecule", "smiles", smiles))
        assert min_distance(rec["pos"]) > 0.7, smiles
        from rdkit import Chem

        frags = Chem.GetMolFrags(Chem.AddHs(Chem.MolFromSmiles(smiles)))
        owner = np.zeros(len(rec["z"]), int)
        for k, atoms in enumerate(frags):
            owner[list(atoms)] = k
        src, dst = rec["nbr_index"]
        assert np.all(owner[src] == owner[dst]), "no 3D edge joins two fragments"
        pos = rec["pos"]
        for k in range(1, len(frags)):
            between = np.linalg.norm(pos[owner == k][:, None] - pos[owner < k][None], axis=-1).min()
            assert between >= cutoff, (smiles, between)
    one = featurize_one(RawRecord("t.csv:2", "row2", "molecule", "smiles", a))
    again = featurize_one(RawRecord("t.csv:2", "row2", "molecule", "smiles", a))
    np.testing.assert_array_equal(one["pos"], again["pos"])


def test_absurd_coordinates_and_extra_atom_lines_are_rejected():
    from pipeline.featurize import RecordError

    text = _qm9_text()
    with pytest.raises(RecordError, match="coordinate is 1e\\+300 A from the origin"):
        featurize_one(xyz_raw(_with_atom(text, 2, "1e300 0.0 0.0")))
    lines = text.splitlines()
    n = int(lines[0])
    lines[0] = str(n - 1)  # the last atom line would be dropped silently
    with pytest.raises(RecordError, match=rf"{n - 1} atoms declared, but line {n + 2} is another atom line"):
        featurize_one(xyz_raw("\n".join(lines) + "\n"))
    texts = mp_cif_texts(2)
    rid = sorted(texts)[0]
    with pytest.raises(RecordError, match=r"a coordinate is 1e\+50 A"):
        featurize_one(RawRecord("x.cif", rid, "crystal", "cif", _tiny_cell(texts[rid], 1e50)))


# ------------------------------------------------------------------------------ 8. labels
def test_infinite_labels_are_rejected_not_stored_as_missing(tmp_path):
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    texts = mp_cif_texts(5)
    for rid, text in texts.items():
        (cifs / f"{rid}.cif").write_text(text)
    rows = list(csv.reader(open(DATASETS / "mp" / "labels.csv")))
    header, body = rows[0], rows[1:]
    victim = sorted(texts)[2]
    col = header.index("band_gap_eV")
    for row in body:
        if row[0] == victim:
            row[col] = "inf"
    with open(cifs / "labels.csv", "w", newline="") as fh:
        csv.writer(fh).writerows([header] + body)
    s = preprocess([str(cifs)], tmp_path / "out", load_config(), workers=0)
    assert s.records == 4
    (reject,) = rejects(tmp_path / "out")
    assert reject["id"] == victim and "band_gap_eV' is infinite" in reject["reason"]
    assert np.isfinite(json.loads((tmp_path / "out" / "stats.json").read_text())["targets"]["band_gap_eV"]["mean"])


def test_a_csv_row_with_a_decimal_comma_is_rejected_not_shifted(tmp_path):
    rows = (DATASETS / "qm8" / "qm8_sample.csv").read_text().splitlines()
    fields = rows[4].split(",")
    fields[2] = fields[2].replace(".", ",", 1)  # 0.21 -> 0,21: one more field, every later column shifted
    bad = tmp_path / "qm8.csv"
    bad.write_text("\n".join(rows[:4] + [",".join(fields)] + rows[5:9]) + "\n")
    s = preprocess([str(bad)], tmp_path / "out", load_config(None, ["preprocess.molecule.embed_smiles=false"]),
                   workers=0)
    assert s.records == 7
    (reject,) = rejects(tmp_path / "out")
    assert reject["id"] == "row5" and "row 5 has 14 fields but the header has 13" in reject["reason"]
    # a labels CSV of CIFs: the same row error rejects the structure it labels
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    texts = mp_cif_texts(3)
    for rid, text in texts.items():
        (cifs / f"{rid}.cif").write_text(text)
    lines = (DATASETS / "mp" / "labels.csv").read_text().splitlines()
    victim = sorted(texts)[1]
    lines = [line.replace(".", ",", 1) if line.startswith(victim + ",") else line for line in lines]
    (cifs / "labels.csv").write_text("\n".join(lines) + "\n")
    s = preprocess([str(cifs)], tmp_path / "cif_out", load_config(), workers=0)
    assert s.records == 2 and rejects(tmp_path / "cif_out")[0]["id"] == victim


def test_a_damaged_qm9_property_line_is_rejected_not_unlabelled(tmp_path):
    src = tmp_path / "xyz"
    src.mkdir()
    files = qm9_files(6)
    for f in files:
        shutil.copy(f, src)
    victim = src / files[2].name
    victim.write_bytes(victim.read_bytes().replace(b"gdb", b"gdc", 1))  # one stray byte
    s = preprocess([str(src)], tmp_path / "out", load_config(), workers=0)
    assert s.records == 5
    (reject,) = rejects(tmp_path / "out")
    assert reject["file"].endswith(files[2].name) and "damaged QM9 property line" in reject["reason"]
    # predict needs no labels: the structure itself is still read
    from pipeline.inputs import featurized_inputs

    out = list(featurized_inputs([str(victim)], load_config().preprocess.model_dump(mode="json")))
    assert len(out) == 1 and "_error" not in out[0]


# ------------------------------------------------------------------ 9. whole-file read errors
def _qm8_rows(n: int = 9) -> list[str]:
    return (DATASETS / "qm8" / "qm8_sample.csv").read_text().splitlines()[:n]


NO_EMBED = ["preprocess.molecule.embed_smiles=false"]


def test_read_errors_reject_the_record_or_the_file_and_the_other_inputs_go_on(tmp_path):
    good = str(DATASETS / "qm9" / "qm9_mini.sdf")
    rows = _qm8_rows()
    cases = {}
    # a CSV with a non-UTF-8 byte in one row, and one with a field over the csv module's size limit
    p = tmp_path / "latin1.csv"
    p.write_bytes("\n".join(rows[:3]).encode() + b"\n" + rows[3].encode().replace(b",", b"\xe9,", 1) + b"\n"
                  + "\n".join(rows[4:]).encode() + b"\n")
    cases[p] = (7, ["row 4 is not UTF-8"])
    p = tmp_path / "huge.csv"
    fields = rows[3].split(",")
    fields[0] = "C" * 200_000
    p.write_text("\n".join(rows[:3] + [",".join(fields)] + rows[4:]) + "\n")
    cases[p] = (7, ["could not be parsed (field larger than field limit"])
    # an SDF with a non-UTF-8 byte in one record
    sdf = (DATASETS / "qm9" / "qm9_mini.sdf").read_bytes()
    p = tmp_path / "bad.sdf"
    p.write_bytes(sdf.replace(b"gdb_3\n", b"gdb_3\xff\n", 1))
    cases[p] = (20, ["SDF record 3 is not UTF-8"])
    # JSON Lines with a damaged line and a line nested too deep; a JSON list that is not UTF-8
    with gzip.open(DATASETS / "mp" / "structures.json.gz", "rt") as fh:
        items = json.load(fh)[:6]
    lines = [json.dumps(i) for i in items]
    lines[2] = lines[2][: len(lines[2]) // 2]
    lines[4] = "[" * 100_000 + "]" * 100_000
    p = tmp_path / "s.jsonl"
    p.write_text("\n".join(lines) + "\n")
    cases[p] = (4, ["line 3 is not valid JSON", "line 5 is not valid JSON"])
    p = tmp_path / "latin1.json"
    p.write_bytes(json.dumps(items).encode().replace(b'"', b'"\xe9', 1))
    cases[p] = (0, ["not valid JSON"])
    p = tmp_path / "deep.json"
    p.write_text("[" * 100_000 + "]" * 100_000)
    cases[p] = (0, ["not valid JSON"])
    for path, (n_good, reasons) in cases.items():
        out = tmp_path / ("out_" + path.name.replace(".", "_"))
        s = preprocess([str(path), good], out, load_config(None, NO_EMBED + ["preprocess.units.band_gap_eV=eV"]),
                       workers=0)
        assert s.records == n_good + 21, path.name  # the good SDF's 21 molecules are all there
        found = [r["reason"] for r in rejects(out)]
        assert len(found) == len(reasons), (path.name, found)
        for reason, text in zip(reasons, found):
            assert reason in text, (path.name, found)


def test_sdf_without_terminators_and_csv_with_a_bom_are_read_correctly(tmp_path):
    ref_sdf = tmp_path / "ref" / "mini.sdf"
    ref_sdf.parent.mkdir()
    shutil.copy(DATASETS / "qm9" / "qm9_mini.sdf", ref_sdf)
    shutil.copy(DATASETS / "qm9" / "qm9_mini.sdf.csv", tmp_path / "ref" / "mini.sdf.csv")
    bare = tmp_path / "bare" / "mini.sdf"
    bare.parent.mkdir()
    bare.write_text("".join(line for line in ref_sdf.read_text().splitlines(True) if not line.startswith("$$$$")))
    shutil.copy(DATASETS / "qm9" / "qm9_mini.sdf.csv", tmp_path / "bare" / "mini.sdf.csv")
    csv_ref = tmp_path / "ref" / "qm8.csv"
    csv_ref.write_text("\n".join(_qm8_rows()) + "\n")
    csv_bom = tmp_path / "bare" / "qm8.csv"
    csv_bom.write_bytes(b"\xef\xbb\xbf" + csv_ref.read_bytes())
    for name, a, b in (("sdf", ref_sdf, bare), ("csv", csv_ref, csv_bom)):
        preprocess([str(a)], tmp_path / f"{name}_a", load_config(), workers=0)
        preprocess([str(b)], tmp_path / f"{name}_b", load_config(), workers=0)
        ra, rb = ShardDataset(tmp_path / f"{name}_a"), ShardDataset(tmp_path / f"{name}_b")
        assert len(ra) == len(rb) == (21 if name == "sdf" else 8)
        assert ra.manifest["targets"] == rb.manifest["targets"]
        for i in range(len(ra)):
            x, y = ra[i], rb[i]
            assert x["_id"] == y["_id"]
            for key in ("z", "pos", "bond_index", "y"):
                np.testing.assert_array_equal(x[key], y[key])


# --------------------------------------------------------------------------- 10. predict
def test_predict_writes_one_row_per_structure_whatever_the_input(tmp_path):
    from finetune.predict import predict

    files = [str(f) for f in qm9_files(3)]
    sdf = (DATASETS / "qm9" / "qm9_mini.sdf").read_text().split("$$$$\n")
    bad_sdf = tmp_path / "mixed.sdf"
    bad_sdf.write_text("$$$$\n".join(sdf[:2] + ["not a molblock\n"] + sdf[2:4]) + "$$$$\n")  # 5 records, 1 bad
    rows = _qm8_rows(6)
    fields = rows[2].split(",")
    fields[0] = "C" * 200_000
    bad_csv = tmp_path / "mixed.csv"
    bad_csv.write_text("\n".join(rows[:2] + [",".join(fields)] + rows[3:]) + "\n")  # 5 rows, 1 bad
    inputs = files + [str(bad_sdf), str(bad_csv)]
    out = tmp_path / "p.csv"
    n = predict(LEGACY / "run_qm9_mpnn", inputs, out)
    got = list(csv.DictReader(open(out)))
    assert n == len(got) == 3 + 5 + 5
    errors = [r["error"] for r in got]
    assert sum(bool(e) for e in errors) == 2 and all(r["gap_Ha"] for r, e in zip(got, errors) if not e)
    # crystals: a degenerate cell and a JSON Lines file with a damaged line in the middle
    texts = mp_cif_texts(3)
    cifs = tmp_path / "cifs"
    cifs.mkdir()
    for rid, text in texts.items():
        (cifs / f"{rid}.cif").write_text(text)
    victim = sorted(texts)[0]
    (cifs / f"{victim}.cif").write_text(_tiny_cell(texts[victim], 0.05))
    with gzip.open(DATASETS / "mp" / "structures.json.gz", "rt") as fh:
        items = json.load(fh)[:4]
    lines = [json.dumps(i) for i in items]
    lines[1] = "[" * 100_000 + "]" * 100_000
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n".join(lines) + "\n")
    with deadline(240, "predict on a degenerate cell"):
        n = predict(LEGACY / "run_mp_schnet", [str(cifs), str(jsonl)], out)
    got = list(csv.DictReader(open(out)))
    assert n == len(got) == 3 + 4
    bad = {r["id"]: r["error"] for r in got if r["error"]}
    assert len(bad) == 2 and "volume per atom" in bad[victim]
    assert not list(tmp_path.glob("*.tmp"))


# ---------------------------------------------- 11. re-running finetune with other targets
def test_rerun_with_other_targets_is_refused_or_restarted(qm9_shards, tmp_path):
    from finetune import load_model
    from finetune.train import finetune

    run = tmp_path / "run"
    finetune(qm9_shards, run, load_config(None, TINY + ["train.epochs=1", "finetune.targets=[gap_Ha]"]))
    other = load_config(None, TINY + ["train.epochs=1", "finetune.targets=[homo_Ha]"])
    with pytest.raises(MolmatError, match=r"holds another run \(targets: was \[\"gap_Ha\"\], now \[\"homo_Ha\"\]\).*"
                                          r"--restart"):
        finetune(qm9_shards, run, other)
    assert [t.name for t in load_model(run).targets] == ["gap_Ha"]  # untouched
    finetune(qm9_shards, run, other, restart=True)
    assert [t.name for t in load_model(run).targets] == ["homo_Ha"]
    assert [t.name for t in load_model(run / "previous" / "best").targets] == ["gap_Ha"]
    # other data: the same targets from a re-made dataset
    remade = tmp_path / "remade"
    preprocess([str(DATASETS / "qm9" / "xyz")], remade, load_config(None, ["preprocess.shard_size=100"]), workers=0)
    with pytest.raises(MolmatError, match=r"holds another run \(data: was"):
        finetune(remade, run, other)
    r = run_cli("finetune", "--data", remade, "--out", run, *[a for s in TINY for a in ("--set", s)],
                "--set", "train.epochs=1", "--set", "finetune.targets=[homo_Ha]")
    assert_refused(r, str(run), "holds another run", "--restart")


# ------------------------------------------------------------------------ 12. the rest
def test_pretrain_checks_the_cutoff_of_every_data_directory(qm9_shards, tmp_path):
    from pretrain.train import pretrain

    small = tmp_path / "small"
    preprocess([str(DATASETS / "qm9" / "qm9_mini.sdf")], small, load_config(None, ["preprocess.molecule.cutoff=3"]),
               workers=0)
    cfg = load_config(None, TINY + ["train.epochs=1", "pretrain.encoder3d.cutoff=5"])
    with pytest.raises(MolmatError, match=str(small)):
        pretrain([qm9_shards, small], tmp_path / "enc", cfg)


def test_a_diverging_run_stops_with_an_error_and_keeps_last_pt(qm9_shards, tmp_path, monkeypatch):
    import torch

    import finetune.losses as ft  # property_losses, which training calls, calls task_losses

    real = ft.task_losses
    calls = {"n": 0}

    def nan_in_the_second_epoch(pred, target, mask, kind):
        calls["n"] += 1
        losses, count = real(pred, target, mask, kind)
        return (losses * float("nan") if calls["n"] > 5 else losses), count

    monkeypatch.setattr(ft, "task_losses", nan_in_the_second_epoch)
    run = tmp_path / "run"
    with pytest.raises(MolmatError, match=r"training diverged: the training loss is nan at epoch 1, step 5.*last\.pt"):
        _finetune(qm9_shards, run, "train.epochs=3", "train.batch_size=64")  # 4 steps per epoch
    state = torch.load(run / "last.pt", weights_only=True)
    assert state["state"]["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                               if v.is_floating_point())
    assert (run / "best" / "model.safetensors").exists()


def test_bad_split_fractions_workers_and_inspect_settings_are_errors(qm9_shards, tmp_path):
    with pytest.raises(MolmatError, match=r"split\.val \+ split\.test must be below 1"):
        load_config(None, ["split.val=0.6", "split.test=0.5"])
    r = run_cli("preprocess", DATASETS / "qm9" / "qm9_mini.sdf", "--out", tmp_path / "x", "--workers", "-1")
    assert r.returncode == 2 and "--workers: -1 is negative" in r.stderr and not (tmp_path / "x").exists()
    r = run_cli("inspect", qm9_shards, "--set", "preprocess.molecule.cutoff=4")
    assert r.returncode == 0 and "differs from the given config: molecule_cutoff: config 4.0 vs shards 5.0" in r.stdout
    r = run_cli("inspect", qm9_shards, "--set", "preprocess.nope=1")
    assert_refused(r, "unknown key 'preprocess.nope'")


def test_an_unknown_cif_element_is_named_not_hashed():
    from pipeline.featurize import RecordError

    text = mp_cif_texts()["mp-1986"].replace("Zn  Zn0", "Xx  Xx0")
    with pytest.raises(RecordError, match=r"^unknown element 'Xx' at atom 0$"):
        featurize_one(RawRecord("x.cif", "mp-1986", "crystal", "cif", text))


def test_epoch_loss_after_a_sigterm_resume_averages_the_whole_epoch(qm9_shards, tmp_path):
    from finetune.train import finetune

    cfg = load_config(None, TINY + ["train.epochs=2", "finetune.targets=[gap_Ha]", "train.batch_size=32"])
    finetune(qm9_shards, tmp_path / "whole", cfg)
    assert finetune(qm9_shards, tmp_path / "cut", cfg, callbacks=(stop_mid_epoch(1, 3),)).stopped_by == "signal"
    finetune(qm9_shards, tmp_path / "cut", cfg)
    whole = list(csv.DictReader(open(tmp_path / "whole" / "metrics.csv")))
    cut = list(csv.DictReader(open(tmp_path / "cut" / "metrics.csv")))
    assert [r["train_loss"] for r in cut] == [r["train_loss"] for r in whole]
    assert [r["train_loss_gap_Ha"] for r in cut] == [r["train_loss_gap_Ha"] for r in whole]


def test_a_full_disk_leaves_no_temporary_or_empty_files(run_and_encoder, qm9_shards, tmp_path, monkeypatch):
    import errno

    import torch

    from pipeline import checkpoint

    run, _ = run_and_encoder
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    before = (copy / "last.pt").read_bytes()

    def full(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(f))

    monkeypatch.setattr(torch, "save", full)
    model = torch.nn.Linear(2, 2)
    with pytest.raises(OSError):
        checkpoint.save_training_state(copy / "last.pt", model, torch.optim.AdamW(model.parameters()), {}, {}, {})
    assert not (copy / "last.pt.tmp").exists() and (copy / "last.pt").read_bytes() == before
    monkeypatch.undo()

    def small_files():  # the closest to a full disk a test can make: writes beyond 4 KiB fail (EFBIG)
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    def small_shards():  # the 54 KB progress.json fits, a 750 KB shard does not
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    out = tmp_path / "p.csv"
    r = run_cli("predict", run, *[str(f) for f in qm9_files(100)], "--out", out, preexec_fn=small_files)
    assert_refused(r, "File too large")
    assert not out.exists() and not list(tmp_path.glob("p.csv*"))
    r = run_cli("preprocess", DATASETS / "qm9" / "xyz", "--out", tmp_path / "s", "--workers", "0",
                preexec_fn=small_shards)
    assert_refused(r, "could not write the shard", "free space")
    assert not list((tmp_path / "s").glob("data.*"))


# ------------------------------------------------------------------ 13. environment errors
@pytest.fixture(scope="module")
def env_cases(run_and_encoder, qm9_shards, tmp_path_factory):
    run, enc = run_and_encoder
    root = tmp_path_factory.mktemp("env")
    (root / "a_file").write_text("x")
    (root / "a_dir").mkdir()
    truncated = root / "truncated_run"
    truncated.mkdir()
    data = (run / "last.pt").read_bytes()
    (truncated / "last.pt").write_bytes(data[: len(data) // 2])
    if (run / "run.json").exists():  # the same run: resuming it is what fails
        shutil.copy(run / "run.json", truncated / "run.json")
    sets = [a for s in TINY for a in ("--set", s)]
    ft = ["finetune", "--data", qm9_shards, *sets, "--set", "train.epochs=1", "--set", "finetune.targets=[gap_Ha]"]
    sdf = DATASETS / "qm9" / "qm9_mini.sdf"
    return {
        "preprocess --out is a file": (["preprocess", sdf, "--out", root / "a_file"], ["a_file", "File exists"]),
        "preprocess --out under a file": (["preprocess", sdf, "--out", root / "a_file" / "x"], ["Not a directory"]),
        "preprocess --out read-only": (["preprocess", sdf, "--out", "/proc/molmat/x"], ["/proc/molmat"]),
        "finetune --out is a file": (ft + ["--out", root / "a_file"], ["a_file"]),
        "pretrain --out is a file": (["pretrain", "--data", qm9_shards, *sets, "--out", root / "a_file"], ["a_file"]),
        "predict --out is a directory": (["predict", run, sdf, "--out", root / "a_dir"], ["a_dir", "is a directory"]),
        "embed --out in a read-only place": (["embed", enc, sdf, "--out", "/proc/molmat.npz"], ["/proc/molmat.npz"]),
        "evaluate --out is a file": (["evaluate", run, "--data", qm9_shards, "--out", root / "a_file"], ["a_file"]),
        "train.device=cuda without CUDA": (ft + ["--out", root / "cuda", "--set", "train.device=cuda"],
                                           ["train.device=cuda", "CUDA is not available"]),
        "train.device=gpu": (ft + ["--out", root / "gpu", "--set", "train.device=gpu"], ["train.device='gpu'"]),
        "a truncated last.pt": (ft + ["--out", truncated], ["last.pt: cannot resume", "--restart"]),
        # a fine-tuned run is a valid --init (transfer learning); shards are not a model
        "an encoder dir that is a shard dir": (ft + ["--out", root / "init", "--init", qm9_shards],
                                               ["not a molmat model directory"]),
        "a missing input": (["preprocess", root / "nothing.sdf", "--out", root / "y"], ["nothing.sdf"]),
    }


@pytest.mark.parametrize("case", [
    "preprocess --out is a file", "preprocess --out under a file", "preprocess --out read-only",
    "finetune --out is a file", "pretrain --out is a file", "predict --out is a directory",
    "embed --out in a read-only place", "evaluate --out is a file", "train.device=cuda without CUDA",
    "train.device=gpu", "a truncated last.pt", "an encoder dir that is a shard dir", "a missing input"])
def test_environment_errors_are_one_line(env_cases, case):
    if case == "train.device=cuda without CUDA":
        import torch

        if torch.cuda.is_available():
            pytest.skip("CUDA is available here")
    args, needles = env_cases[case]
    assert_refused(run_cli(*args), *needles)
