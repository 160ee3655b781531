"""Seeded mutation fuzzing of the shipped real inputs, one format at a time.

Each mutated record (a byte flipped, deleted or made non-UTF-8, a line dropped, doubled or
swapped, the text cut short, a number replaced by nan, inf, 1e300, ...) sits beside good
records of the same file or directory. Preprocessing must never raise, never reject a record
with an unexpected error (a bug), give a reason for every reject, keep every good record exactly
as a run without the mutated ones makes it, and store only valid records (finite coordinates
and labels, no overlapping atoms, elements in the table, edges within the graph). Prediction's
reading must yield for every input without raising. The sample is small and seeded, so a
failure reproduces.
"""
from __future__ import annotations

import gzip
import json
import random
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from helpers import DATASETS, mp_cif_texts, qm9_files
from pipeline.config import load_config
from pipeline.preprocess import preprocess
from pipeline.shards import ShardDataset

SEED = 14
MUTANTS = 40           # mutated records per format
SPECIAL = [b"nan", b"inf", b"-inf", b"1e300", b"-1e300", b"0", b"-0", b"1e-300", b"99999999999999999999999", b"",
           b"NaN", b"1,5", b"0x10", b"--1"]
NUMBER = re.compile(rb"-?\d+\.\d+(?:[eE][-+]?\d+)?|-?\d+")


def mutate(data: bytes, rng: random.Random, keep_lines: bool = False, keep_quotes: bool = False) -> bytes:
    """One random mutation of ``data``.

    ``keep_lines`` adds no line break or SDF separator (for records that share a file with
    others: JSON Lines, SDF blocks, CSV rows); ``keep_quotes`` keeps the number of ``"`` (a CSV
    row: an open quote would take the following rows into its field, as CSV means it to).
    """
    lines = data.split(b"\n")
    ops = ["flip", "delete", "non_utf8", "number", "truncate", "drop_line", "double_line", "swap_lines"]
    op = rng.choice(ops)
    if op == "flip" and data:
        i = rng.randrange(len(data))
        out = data[:i] + bytes([data[i] ^ (1 << rng.randrange(8))]) + data[i + 1:]
    elif op == "delete" and data:
        i = rng.randrange(len(data))
        out = data[:i] + data[i + 1:]
    elif op == "non_utf8":
        i = rng.randrange(len(data) + 1)
        out = data[:i] + rng.choice([b"\xff", b"\xe9", b"\xc3\x28", b"\x80"]) + data[i:]
    elif op == "number" and NUMBER.search(data):
        found = list(NUMBER.finditer(data))
        m = rng.choice(found)
        out = data[:m.start()] + rng.choice(SPECIAL) + data[m.end():]
    elif op == "truncate" and data:
        out = data[: rng.randrange(len(data))]
    elif op == "drop_line" and len(lines) > 1:
        i = rng.randrange(len(lines))
        out = b"\n".join(lines[:i] + lines[i + 1:])
    elif op == "double_line" and lines:
        i = rng.randrange(len(lines))
        out = b"\n".join(lines[:i + 1] + lines[i:])
    elif op == "swap_lines" and len(lines) > 1:
        i, j = rng.sample(range(len(lines)), 2)
        lines[i], lines[j] = lines[j], lines[i]
        out = b"\n".join(lines)
    else:
        out = data + b"\x00"
    if keep_lines and (out.count(b"\n") > data.count(b"\n") or out.count(b"\r") > data.count(b"\r")
                       or out.count(b"$$$$") > data.count(b"$$$$")):
        return mutate(data, rng, keep_lines, keep_quotes)
    if keep_quotes and out.count(b'"') != data.count(b'"'):
        return mutate(data, rng, keep_lines, keep_quotes)
    return out


def assert_valid(rec: dict, min_distance: float) -> None:
    """What any stored record must be, whatever input it came from."""
    z = rec["z"]
    assert z.size and z.min() >= 1 and z.max() <= 94
    assert not np.isinf(rec["y"]).any()
    n = z.size
    for key in ("nbr_index", "bond_index"):
        if key in rec and rec[key].size:
            assert rec[key].min() >= 0 and rec[key].max() < n
    if "pos" in rec:
        pos = rec["pos"]
        assert np.isfinite(pos).all() and np.abs(pos).max() <= 1e5
        if "cell" in rec:
            src, dst = rec["nbr_index"]
            if src.size:
                vec = pos[src] + rec["nbr_image"] @ rec["cell"] - pos[dst]
                assert np.linalg.norm(vec, axis=1).min() >= min_distance
            assert np.isfinite(rec["cell"]).all()
        elif n > 1:
            d = np.linalg.norm(pos[:, None] - pos[None], axis=-1)
            d[np.diag_indices(n)] = np.inf
            assert d.min() >= min_distance


def check_run(good_only: Path, mixed: Path, sources: list[str], good_sources: list[str], overrides=()) -> None:
    """Preprocess good records alone and beside mutants; compare; check rejects and stored records."""
    cfg = load_config(None, list(overrides))
    ref = preprocess(good_sources, good_only, cfg, workers=0)
    run = preprocess(sources, mixed, cfg, workers=0)  # must not raise: one good input is enough
    rejects = [json.loads(x) for x in (mixed / "rejects.jsonl").read_text().splitlines()]
    assert not [r for r in rejects if r.get("unexpected")], rejects
    assert all(r["reason"] and r["file"] for r in rejects)
    a, b = ShardDataset(good_only), ShardDataset(mixed)
    assert run.records == len(b) and run.records + run.rejected >= ref.records
    got = {}
    for i in range(len(b)):
        rec = b[i]
        assert_valid(rec, 0.5)  # preprocess.min_distance's default
        got.setdefault((rec["_source"].rsplit("/", 1)[-1], rec["_id"]), rec)
    for i in range(len(a)):  # never a lost good record, and never a changed one
        rec = a[i]
        key = (rec["_source"].rsplit("/", 1)[-1], rec["_id"])
        assert key in got, f"good record {key} was lost"
        for name in ("z", "pos", "y", "atom_feat", "bond_index", "nbr_index", "nbr_image", "cell"):
            if name in rec:
                np.testing.assert_array_equal(got[key][name], rec[name], err_msg=f"{key} {name}")
    from pipeline.inputs import featurized_inputs

    for item in featurized_inputs(sources, cfg.preprocess.model_dump(mode="json")):  # never raises
        assert "_error" in item or item["z"].size


@pytest.fixture()
def rng() -> random.Random:
    return random.Random(SEED)


def test_fuzz_qm9_xyz(tmp_path, rng):
    files = qm9_files(6 + MUTANTS)
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    good.mkdir()
    mixed.mkdir()
    for f in files[:6]:
        shutil.copy(f, good)
        shutil.copy(f, mixed)
    for k, f in enumerate(files[6:]):
        (mixed / f"dsgdb9nsd_9{k:05d}.xyz").write_bytes(mutate(f.read_bytes(), rng))
    check_run(tmp_path / "a", tmp_path / "b", [str(mixed)], [str(good)])


def test_fuzz_sdf(tmp_path, rng):
    text = (DATASETS / "qm9" / "qm9_mini.sdf").read_bytes()
    blocks = [b + b"$$$$\n" for b in text.split(b"$$$$\n") if b.strip()]
    mutants = []
    for k in range(MUTANTS):  # titled apart from the good records they are made from
        body = rng.choice(blocks)[:-5].split(b"\n", 1)[1]
        mutants.append(mutate(b"mutant%d\n" % k + body, rng, keep_lines=True).rstrip(b"\n") + b"\n$$$$\n")
    good = tmp_path / "good" / "mol.sdf"
    good.parent.mkdir()
    good.write_bytes(b"".join(blocks[:10]))
    mixed = tmp_path / "mixed" / "mol.sdf"
    mixed.parent.mkdir()
    interleaved = []
    for i, block in enumerate(blocks[:10]):  # good and mutated records alternate in one file
        interleaved.append(block)
        interleaved.extend(mutants[i::10])
    mixed.write_bytes(b"".join(interleaved))
    check_run(tmp_path / "a", tmp_path / "b", [str(mixed)], [str(good)])


def test_fuzz_smiles_csv(tmp_path, rng):
    rows = (DATASETS / "qm8" / "qm8_sample.csv").read_bytes().split(b"\n")
    header, body = rows[0], [r for r in rows[1:] if r]
    good = tmp_path / "good" / "qm8.csv"
    good.parent.mkdir()
    good.write_bytes(b"\n".join([header] + body[:8]) + b"\n")
    mixed = tmp_path / "mixed" / "qm8.csv"
    mixed.parent.mkdir()
    mutants = [mutate(rng.choice(body), rng, keep_lines=True, keep_quotes=True) for _ in range(MUTANTS)]
    # mutated rows after the good ones: row ids (row numbers) of the good rows stay the same
    mixed.write_bytes(b"\n".join([header] + body[:8] + mutants) + b"\n")
    check_run(tmp_path / "a", tmp_path / "b", [str(mixed)], [str(good)])


def test_fuzz_cif(tmp_path, rng):
    texts = mp_cif_texts(6 + MUTANTS)
    ids = sorted(texts)
    good, mixed = tmp_path / "good", tmp_path / "mixed"
    good.mkdir()
    mixed.mkdir()
    for rid in ids[:6]:
        (good / f"{rid}.cif").write_text(texts[rid])
        (mixed / f"{rid}.cif").write_text(texts[rid])
    for rid in ids[6:]:
        (mixed / f"{rid}.cif").write_bytes(mutate(texts[rid].encode(), rng))
    labels = DATASETS / "mp" / "labels.csv"
    shutil.copy(labels, good / "labels.csv")
    shutil.copy(labels, mixed / "labels.csv")
    check_run(tmp_path / "a", tmp_path / "b", [str(mixed)], [str(good)])


def test_fuzz_pymatgen_json_lines(tmp_path, rng):
    with gzip.open(DATASETS / "mp" / "structures.json.gz", "rt") as fh:
        items = json.load(fh)
    lines = [json.dumps(i).encode() for i in items[:8 + MUTANTS]]
    good = tmp_path / "good" / "s.jsonl"
    good.parent.mkdir()
    good.write_bytes(b"\n".join(lines[:8]) + b"\n")
    mixed = tmp_path / "mixed" / "s.jsonl"
    mixed.parent.mkdir()
    mutants = [mutate(line, rng, keep_lines=True) for line in lines[8:]]
    mixed.write_bytes(b"\n".join(lines[:8] + mutants) + b"\n")
    check_run(tmp_path / "a", tmp_path / "b", [str(mixed)], [str(good)])
