"""LMDB graph shards: the shard writer, the manifest, dataset facts and :class:`ShardDataset`.

Records are encoded by :mod:`pipeline.records` (layout, checksum; re-exported here). A shard is
one LMDB file ``data.NNNN.lmdb`` (``subdir=False``) with keys ``%010d`` (local record index) and
``__meta__`` (JSON: counts, records per kind and with coordinates, the input range it covers,
statistics, rejects, scaffolds). It is written as ``data.NNNN.lmdb.tmp`` and renamed when
complete, so a file with the final name is always whole.

The manifest says which record kinds a dataset holds (``kinds``) and whether its records have
coordinates (``coordinates``); :func:`dataset_kinds` and :func:`dataset_has_coordinates` read
these facts, also from manifests written before they were recorded.
"""
from __future__ import annotations

import bisect
import json
import os
from pathlib import Path
from typing import Any, Iterator, Sequence

import lmdb
import numpy as np

from pipeline import FORMAT_VERSION, MolmatError
from pipeline.elements import element_symbol
# the codec lives with the record contract; re-exported so `from pipeline.shards import ...` works
from pipeline.records import MAGIC, CorruptRecordError, decode_record, encode_record  # noqa: F401
from pipeline.records import INDEX

META_KEY = b"__meta__"
MANIFEST = "manifest.json"
STATS = "stats.json"
REJECTS = "rejects.jsonl"
SPLIT = "split.json"


def record_key(index: int) -> bytes:
    """LMDB key of the record at a shard-local index."""
    return b"%010d" % index


def shard_name(number: int) -> str:
    """File name of shard ``number``."""
    return f"data.{number:04d}.lmdb"


# ---------------------------------------------------------------------------------------- stats
class RunningStats:
    """Mergeable per-target and per-graph statistics (counts, means, variances, element counts)."""

    def __init__(self, n_targets: int) -> None:
        self.count = np.zeros(n_targets, np.int64)
        self.mean = np.zeros(n_targets, np.float64)
        self.m2 = np.zeros(n_targets, np.float64)
        self.elements = np.zeros(256, np.int64)
        self.graphs = 0
        self.sizes: dict[str, list[float]] = {k: [0.0, 0.0, float("inf"), 0.0] for k in ("atoms", "bonds", "neighbors")}

    def add(self, y: np.ndarray, z: np.ndarray, n_bonds: int, n_neighbors: int) -> None:
        """Account one record (Welford update per target; NaN labels are skipped)."""
        ok = np.isfinite(y)
        self.count += ok
        delta = np.where(ok, y - self.mean, 0.0)
        self.mean += np.where(ok, delta / np.maximum(self.count, 1), 0.0)
        self.m2 += np.where(ok, delta * (np.where(ok, y, 0.0) - self.mean), 0.0)
        self.elements += np.bincount(z, minlength=256)[:256]
        self.graphs += 1
        for key, value in (("atoms", len(z)), ("bonds", n_bonds), ("neighbors", n_neighbors)):
            s = self.sizes[key]
            s[0] += value
            s[1] += value * value
            s[2] = min(s[2], value)
            s[3] = max(s[3], value)

    def to_json(self) -> dict[str, Any]:
        """Plain-data form (merged later with :meth:`merge_json`)."""
        return {"count": self.count.tolist(), "mean": self.mean.tolist(), "m2": self.m2.tolist(),
                "elements": {str(z): int(c) for z, c in enumerate(self.elements) if c},
                "graphs": self.graphs, "sizes": self.sizes}

    @staticmethod
    def merge_json(parts: Sequence[dict[str, Any]], n_targets: int) -> "RunningStats":
        """Combine shard statistics (Chan et al. parallel variance)."""
        total = RunningStats(n_targets)
        for p in parts:
            nb = np.asarray(p["count"], np.int64)
            mb = np.asarray(p["mean"], np.float64)
            m2b = np.asarray(p["m2"], np.float64)
            n = total.count + nb
            delta = mb - total.mean
            safe = np.maximum(n, 1)
            total.mean = total.mean + delta * nb / safe
            total.m2 = total.m2 + m2b + delta ** 2 * total.count * nb / safe
            total.count = n
            for z, c in p["elements"].items():
                total.elements[int(z)] += c
            total.graphs += p["graphs"]
            for key, s in p["sizes"].items():
                t = total.sizes[key]
                t[0] += s[0]
                t[1] += s[1]
                t[2] = min(t[2], s[2])
                t[3] = max(t[3], s[3])
        return total

    def summary(self, targets: list[dict[str, str]]) -> dict[str, Any]:
        """The content of ``stats.json``."""
        out: dict[str, Any] = {"graphs": self.graphs, "targets": {}, "elements": {}, "per_graph": {}}
        for i, t in enumerate(targets):
            n = int(self.count[i])
            std = float(np.sqrt(self.m2[i] / (n - 1))) if n > 1 else float("nan")
            out["targets"][t["name"]] = {"unit": t["unit"], "count": n,
                                         "mean": float(self.mean[i]) if n else float("nan"), "std": std}
        for z in np.flatnonzero(self.elements):
            out["elements"][element_symbol(int(z))] = int(self.elements[z])
        for key, (s, s2, lo, hi) in self.sizes.items():
            n = max(self.graphs, 1)
            mean = s / n
            out["per_graph"][key] = {"mean": mean, "std": float(np.sqrt(max(s2 / n - mean * mean, 0.0))),
                                     "min": lo if self.graphs else 0, "max": hi, "total": s}
        return out


# ---------------------------------------------------------------------------------- dataset facts
#: Values of the manifest's ``coordinates``: every record, some, or no record has coordinates.
COORDINATES = ("all", "some", "none")


def shard_facts(kind_counts: dict[str, int], with_coordinates: int) -> dict[str, Any]:
    """The per-shard counts stored in a shard's ``__meta__``.

    Args:
        kind_counts: records per kind (``{"crystal": 25}``).
        with_coordinates: records that carry ``pos``.
    """
    return {"kinds": {k: int(v) for k, v in sorted(kind_counts.items())}, "with_coordinates": int(with_coordinates)}


def dataset_facts(metas: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Manifest facts from shard metadata: ``{"kinds": sorted kinds present, "coordinates": ...}``.

    ``coordinates`` is ``"all"`` when every record has coordinates, ``"none"`` when none has
    (or there are no records), ``"some"`` otherwise. Returns None when a shard was written
    before these counts were kept (a run resumed across versions); callers then fall back to
    the input formats.
    """
    if any("kinds" not in m or "with_coordinates" not in m for m in metas):
        return None
    counts: dict[str, int] = {}
    for m in metas:
        for kind, n in m["kinds"].items():
            counts[kind] = counts.get(kind, 0) + int(n)
    total = sum(counts.values())
    with_xyz = sum(int(m["with_coordinates"]) for m in metas)
    coordinates = "none" if with_xyz == 0 else "all" if with_xyz == total else "some"
    return {"kinds": sorted(k for k, n in counts.items() if n), "coordinates": coordinates}


def dataset_kinds(manifest: dict[str, Any]) -> list[str]:
    """Record kinds present in a dataset (sorted, e.g. ``["crystal", "molecule"]``).

    Read from the manifest's ``kinds``; for manifests written before it was recorded, the kinds
    of the input formats (:data:`pipeline.readers.FORMATS`).
    """
    if "kinds" in manifest:
        return list(manifest["kinds"])
    from pipeline.readers import format_kind

    return sorted({format_kind(i["format"]) for i in manifest.get("inputs", [])})


def dataset_has_coordinates(manifest: dict[str, Any]) -> str:
    """Whether a dataset's records have coordinates: ``"all"``, ``"some"`` or ``"none"``.

    Read from the manifest's ``coordinates``; for manifests written before it was recorded,
    every input has coordinates except SMILES CSVs preprocessed with
    ``preprocess.molecule.embed_smiles=false``.
    """
    if "coordinates" in manifest:
        return str(manifest["coordinates"])
    embed = manifest.get("preprocess", {}).get("molecule", {}).get("embed_smiles", True)
    has = {not (i["format"] == "smiles_csv" and not embed) for i in manifest.get("inputs", [])}
    return "all" if has == {True} else "some" if has == {True, False} else "none"


# --------------------------------------------------------------------------------------- writer
class ShardWriter:
    """Writes one shard under a temporary name with batched commits; :meth:`close` publishes it.

    Args:
        path: final shard path (``.../data.0003.lmdb``).
        commit_every: records per write transaction.
    """

    def __init__(self, path: Path, commit_every: int = 512) -> None:
        self.path = path
        self.tmp = path.with_name(path.name + ".tmp")
        if self.tmp.exists():
            self.tmp.unlink()
        self._map_size = 1 << 30
        self.env = lmdb.open(str(self.tmp), subdir=False, map_size=self._map_size, lock=False,
                             sync=False, metasync=False, meminit=False, max_dbs=0)
        self.count = 0
        self._pending: list[tuple[bytes, bytes]] = []
        self.commit_every = commit_every

    def add(self, record: bytes) -> int:
        """Append one encoded record; returns its shard-local index."""
        index = self.count
        self._pending.append((record_key(index), record))
        self.count += 1
        if len(self._pending) >= self.commit_every:
            self._flush()
        return index

    def _flush(self) -> None:
        while self._pending:
            try:
                with self.env.begin(write=True) as txn:
                    for k, v in self._pending:
                        txn.put(k, v)
                self._pending = []
            except lmdb.MapFullError:
                # Grow the map instead of reserving a huge one up front: some clusters cap virtual memory.
                self._map_size *= 2
                self.env.set_mapsize(self._map_size)

    def close(self, meta: dict[str, Any]) -> None:
        """Write the shard's metadata, sync, and rename the file to its final name."""
        self._pending.append((META_KEY, json.dumps(meta).encode()))
        self._flush()
        self.env.sync(True)
        self.env.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close without publishing (the temporary file is removed)."""
        self.env.close()
        self.tmp.unlink(missing_ok=True)


def open_shard(path: Path) -> lmdb.Environment:
    """Read-only LMDB environment of a shard, shared by every reader in this process.

    LMDB allows one environment per file per process, so environments are cached by path. After
    a fork (DataLoader workers) the inherited handles are closed in the child, never used, and
    the shard is opened afresh, as LMDB requires. No lock, no readahead: safe and fast for random
    reads on shared filesystems.
    """
    pid = os.getpid()
    if _ENV_CACHE.get("pid") != pid:
        for env in _ENV_CACHE.get("envs", {}).values():
            try:
                env.close()
            except lmdb.Error:
                pass
        _ENV_CACHE["pid"] = pid
        _ENV_CACHE["envs"] = {}
    key = str(Path(path).resolve())
    env = _ENV_CACHE["envs"].get(key)
    if env is None:
        env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                        max_readers=2048)
        _ENV_CACHE["envs"][key] = env
    return env


def close_shards() -> None:
    """Close every cached shard environment of this process (e.g. before rewriting files)."""
    for env in _ENV_CACHE.get("envs", {}).values():
        env.close()
    _ENV_CACHE["envs"] = {}


_ENV_CACHE: dict[str, Any] = {}


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The ``__meta__`` entry of a shard."""
    with open_shard(path).begin() as txn:
        raw = txn.get(META_KEY)
    if raw is None:
        raise CorruptRecordError(f"{path}: shard has no __meta__ entry; it is incomplete or corrupt")
    return json.loads(raw)


# ------------------------------------------------------------------------------------- manifest
def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard directory, with a clear error when it is not one."""
    path = Path(root) / MANIFEST
    if not path.exists():
        hint = " (preprocessing did not finish; re-run the same command to resume)" if Path(root).exists() else ""
        raise MolmatError(f"{root}: not a molmat shard directory, {MANIFEST} is missing{hint}")
    manifest = json.loads(path.read_text())
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MolmatError(f"{root}: shard format version {manifest.get('format_version')} but this molmat reads "
                          f"version {FORMAT_VERSION}; re-run preprocess")
    return manifest


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- dataset
class ShardDataset:
    """Random access to every record of a shard directory by global index.

    LMDB environments are opened lazily in the process that reads (each DataLoader worker opens
    its own) and re-opened when the process id changes, read-only, without lock or readahead.

    Args:
        root: shard directory (with manifest.json).
        indices: optional subset of global indices (e.g. a split); ``len`` and ``[i]`` follow it.
    Items are dicts of numpy arrays (``z``, ``pos``, ``atom_feat``, ``y``, ...) plus string
    metadata under ``_id``, ``_kind``, ``_source``, ``_smiles``...
    """

    def __init__(self, root: str | Path, indices: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        self.shards = [self.root / s["path"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        self.targets = [t["name"] for t in self.manifest["targets"]]
        # bisect on a list is ~10x faster than on a numpy array, and this runs once per record
        self._offsets = [int(o) for o in self.offsets]
        self._envs: dict[int, lmdb.Environment] = {}
        self._pid = os.getpid()

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_envs"] = {}  # LMDB handles never cross a process boundary
        return state

    def __len__(self) -> int:
        return self.total if self.indices is None else len(self.indices)

    def locate(self, index: int) -> tuple[int, int]:
        """(shard number, local index) of a global index."""
        if not 0 <= index < self.total:
            raise IndexError(f"record {index} out of range 0..{self.total - 1}")
        shard = bisect.bisect_right(self._offsets, index) - 1
        return shard, index - self._offsets[shard]

    def _env(self, shard: int) -> lmdb.Environment:
        # Looked up once per shard and process: a stat and a path resolve per record cost a
        # third of the read time.
        if self._pid != os.getpid():
            self._envs = {}
            self._pid = os.getpid()
        env = self._envs.get(shard)
        if env is None:
            path = self.shards[shard]
            if not path.exists():
                raise MolmatError(f"{path}: shard listed in {self.root / MANIFEST} is missing")
            env = self._envs[shard] = open_shard(path)
        return env

    def _raw_at(self, shard: int, local: int) -> bytes:
        with self._env(shard).begin(buffers=False) as txn:
            buf = txn.get(record_key(local))
        if buf is None:
            raise CorruptRecordError(f"{self.shards[shard]}: key {record_key(local).decode()} is missing")
        return buf

    def raw(self, index: int) -> bytes:
        """Encoded bytes of the record at a global index."""
        return self._raw_at(*self.locate(index))

    def get(self, index: int) -> dict[str, Any]:
        """Decoded record at a global index (ignores ``indices``)."""
        shard, local = self.locate(index)
        buf = self._raw_at(shard, local)
        try:
            return decode_record(buf)
        except CorruptRecordError:
            # decode again to raise with the location: formatting it for every record costs ~5 us
            return decode_record(buf, where=f"{self.shards[shard]}: key {record_key(local).decode()}")

    def __getitem__(self, i: int) -> dict[str, Any]:
        index = int(self.indices[i]) if self.indices is not None else int(i)
        rec = self.get(index)
        rec[INDEX] = index
        return rec

    def __iter__(self) -> Iterator[dict[str, Any]]:
        for i in range(len(self)):
            yield self[i]


def verify(root: str | Path) -> tuple[int, list[str]]:
    """Re-read every record of every shard and check every checksum and count.

    Returns:
        (records checked, list of problems; empty when the directory is sound).
    """
    manifest = load_manifest(root)
    problems: list[str] = []
    checked = 0
    for entry in manifest["shards"]:
        path = Path(root) / entry["path"]
        if not path.exists():
            problems.append(f"{path}: missing")
            continue
        try:
            with open_shard(path).begin() as txn:
                seen = 0
                for key, value in txn.cursor():
                    if key == META_KEY:
                        continue
                    seen += 1
                    try:
                        decode_record(value, where=f"{path}: key {key.decode(errors='replace')}")
                        checked += 1
                    except CorruptRecordError as exc:
                        problems.append(str(exc))
                if seen != entry["count"]:
                    problems.append(f"{path}: {seen} records, manifest says {entry['count']}")
        except lmdb.Error as exc:
            problems.append(f"{path}: LMDB error ({exc})")
    return checked, problems
