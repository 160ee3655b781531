"""LMDB graph shards: the shard writer, the manifest, dataset facts and :class:`ShardDataset`.

Records are encoded by :mod:`pipeline.records` (layout, checksum; re-exported here). A shard is
one LMDB file ``data.NNNN.lmdb`` (``subdir=False``) with keys ``%010d`` (local record index) and
``__meta__`` (JSON: counts, records per kind and with coordinates, the input range it covers,
statistics, rejects, scaffolds). It is written as ``data.NNNN.lmdb.tmp`` and renamed when
complete, so a file with the final name is always whole.

The manifest says which record kinds a dataset holds (``kinds``) and whether its records have
coordinates (``coordinates``); :func:`dataset_kinds` and :func:`dataset_has_coordinates` read
these facts, also from manifests written before they were recorded.

Integrity: the manifest lists each shard's size (``bytes``) and sha256, and the dataset's
identity (``dataset_id``: a fingerprint of its inputs and settings); each shard's ``__meta__``
repeats the identity, its shard number and its input range. :func:`check_shard` compares the
size before LMDB maps the file (reading past the end of a truncated map is a SIGBUS, not an
exception; :func:`open_shard` also checks any file's own page count first), then the identity,
number and count, once per shard and process;
:class:`ShardDataset` runs it for every shard when it is created, so a damaged, swapped or
foreign shard is refused before training starts. :func:`verify` also checks every file's
sha256, every key and every record's crc32. Directories written before these fields were kept
still read: what is not recorded is not compared.
"""
from __future__ import annotations

import bisect
import hashlib
import json
import os
import struct
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
        try:
            self.env = lmdb.open(str(self.tmp), subdir=False, map_size=self._map_size, lock=False,
                                 sync=False, metasync=False, meminit=False, max_dbs=0)
        except lmdb.Error as exc:
            raise self._write_error(exc) from None
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

    def _write_error(self, exc: lmdb.Error) -> MolmatError:
        # LMDB reports a full disk or a file size limit as an I/O error of the commit
        return MolmatError(f"{self.tmp}: could not write the shard ({_first_line(exc)}); the disk may be full, the "
                           "file size limited or the directory read-only: free space or choose another --out, then "
                           "re-run the same command (finished shards are kept)")

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
            except lmdb.Error as exc:
                raise self._write_error(exc) from None

    def close(self, meta: dict[str, Any]) -> None:
        """Write the shard's metadata, sync, and rename the file to its final name."""
        self._pending.append((META_KEY, json.dumps(meta).encode()))
        self._flush()
        try:
            self.env.sync(True)
        except lmdb.Error as exc:
            raise self._write_error(exc) from None
        self.env.close()
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        """Close without publishing (the temporary file is removed)."""
        self.env.close()
        self.tmp.unlink(missing_ok=True)


def open_shard(path: Path) -> lmdb.Environment:
    """Read-only LMDB environment of a shard, shared by every reader in this process.

    LMDB allows one environment per file per process, so environments are cached by path (and
    the file's inode, size and mtime: a file replaced since is opened afresh). After a fork
    (DataLoader workers) the inherited handles are closed in the child, never used, and the
    shard is opened afresh, as LMDB requires. No lock, no readahead: safe and fast for random
    reads on shared filesystems. A file shorter than its pages is refused before it is mapped
    (:func:`check_lmdb_file`).

    Raises:
        CorruptRecordError: a truncated or non-LMDB file, or one LMDB cannot open.
    """
    pid = os.getpid()
    if _ENV_CACHE.get("pid") != pid:
        for env, _ in _ENV_CACHE.get("envs", {}).values():
            try:
                env.close()
            except lmdb.Error:
                pass
        _ENV_CACHE["pid"] = pid
        _ENV_CACHE["envs"] = {}
    key = str(Path(path).resolve())
    st = os.stat(key)
    stamp = (st.st_ino, st.st_size, st.st_mtime_ns)
    cached = _ENV_CACHE["envs"].get(key)
    if cached is not None and cached[1] != stamp and cached[1][0] == stamp[0]:
        # changed in place (same inode): LMDB allows one environment per file, and the old map may
        # now reach past the end of the file; readers still holding it get an error, not a SIGBUS
        cached[0].close()
    if cached is None or cached[1] != stamp:
        check_lmdb_file(Path(key))
        try:
            env = lmdb.open(key, subdir=False, readonly=True, lock=False, readahead=False, meminit=False,
                            max_readers=2048)
        except lmdb.Error as exc:
            raise CorruptRecordError(f"{key}: not a readable LMDB shard ({_first_line(exc)}); re-run "
                                     "preprocess") from None
        cached = _ENV_CACHE["envs"][key] = (env, stamp)
    return cached[0]


def check_lmdb_file(path: Path) -> None:
    """Refuse an LMDB file that is shorter than the pages it says it holds.

    LMDB maps a file and trusts it: a truncated file is read past its end, which is a SIGBUS
    (the process dies), not an error. Its two meta pages (at offset 0 and one page in) say the
    page size and the last page in use; the newer valid one must fit in the file. Reads the
    first two pages' headers only.

    Raises:
        CorruptRecordError: naming the file, the bytes it needs and the bytes it has.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        first = fh.read(_META_END)
        metas = []
        if len(first) == _META_END:
            (page,) = struct.unpack_from("=I", first, _META_PSIZE)  # the free DB's md_pad holds the page size
            metas.append(first)
            if 512 <= page <= 1 << 16:
                fh.seek(page)
                metas.append(fh.read(_META_END))
    best = None
    for raw in metas:
        if len(raw) == _META_END and struct.unpack_from("=I", raw, _META_MAGIC)[0] == _LMDB_MAGIC:
            (page,) = struct.unpack_from("=I", raw, _META_PSIZE)
            last, txnid = struct.unpack_from("=QQ", raw, _META_LAST_PG)
            if best is None or txnid > best[2]:
                best = (page, last, txnid)
    if best is None:
        raise CorruptRecordError(f"{path}: not an LMDB file (no valid meta page); the shard is corrupt or truncated, "
                                 "re-run preprocess")
    needed = (best[1] + 1) * best[0]
    if size < needed:
        raise CorruptRecordError(f"{path}: truncated ({size} bytes, its pages need {needed}); re-run preprocess")


# MDB_meta inside a meta page (liblmdb 0.9, 64-bit): 16-byte page header, then magic, version,
# address, mapsize, the free and main MDB_db records (48 bytes each), last page, txn id.
_LMDB_MAGIC = 0xBEEFC0DE
_META_MAGIC = 16
_META_PSIZE = 40
_META_LAST_PG = 136
_META_END = 152


def close_shards() -> None:
    """Close every cached shard environment of this process (e.g. before rewriting files)."""
    for env, _ in _ENV_CACHE.get("envs", {}).values():
        env.close()
    _ENV_CACHE["envs"] = {}


_ENV_CACHE: dict[str, Any] = {}


def read_shard_meta(path: Path) -> dict[str, Any]:
    """The ``__meta__`` entry of a shard (map the file only after its size was checked).

    Raises:
        CorruptRecordError: no readable ``__meta__`` entry, or an LMDB error, naming the file.
    """
    try:
        with open_shard(path).begin() as txn:
            raw = txn.get(META_KEY)
    except lmdb.Error as exc:
        raise CorruptRecordError(f"{path}: not a readable LMDB shard ({_first_line(exc)}); re-run preprocess") from None
    if raw is None:
        raise CorruptRecordError(f"{path}: shard has no __meta__ entry; it is incomplete or corrupt")
    try:
        meta = json.loads(raw)
    except ValueError:
        raise CorruptRecordError(f"{path}: its __meta__ entry is not valid JSON; the shard is corrupt, re-run "
                                 "preprocess") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("count"), int):
        raise CorruptRecordError(f"{path}: its __meta__ entry has no record count; the shard is corrupt, re-run "
                                 "preprocess")
    return meta


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_shard_size(path: Path, entry: dict[str, Any], manifest_path: Path) -> None:
    """Refuse a shard file that is missing or not the size the manifest recorded.

    Must run before LMDB maps the file: a truncated map is read past its end as a SIGBUS.

    Raises:
        MolmatError: naming the file, both sizes and what to do.
    """
    try:
        size = os.stat(path).st_size
    except FileNotFoundError:
        raise MolmatError(f"{path}: shard listed in {manifest_path} is missing; re-run preprocess") from None
    expected = entry.get("bytes")
    if expected is not None and size != expected:
        what = "truncated" if size < expected else "larger than written"
        raise MolmatError(f"{path}: {size} bytes but {manifest_path} records {expected} ({what}, or another file "
                          "under this name); re-run preprocess")


def check_shard_meta(path: Path, meta: dict[str, Any], entry: dict[str, Any], manifest: dict[str, Any],
                     manifest_path: Path) -> None:
    """Refuse a shard whose ``__meta__`` does not say what the manifest says of it.

    Compared: the dataset identity (``dataset_id``, when the manifest has one), the shard number,
    the record count and the input range. Catches swapped or renamed shard files, a shard of
    another dataset or featurisation, and edited counts.

    Raises:
        MolmatError: naming the file, what differs and what to do.
    """
    ident = manifest.get("dataset_id")
    if ident is not None and meta.get("dataset") != ident:
        raise MolmatError(f"{path}: belongs to another dataset (other inputs or preprocessing settings) than "
                          f"{manifest_path}; re-run preprocess into a new directory")
    for key, label in (("shard", "is shard"), ("count", "holds"), ("input_range", "covers inputs")):
        if key in meta and key in entry and meta[key] != entry[key]:
            raise MolmatError(f"{path}: {label} {meta[key]} but {manifest_path} says {entry[key]} (swapped, renamed or "
                              "edited files); re-run preprocess")


# shard files (path, size, mtime, manifest entry) found sound in this process; not their metadata,
# which holds a scaffold per record
_CHECKED: set[tuple[Any, ...]] = set()


def check_shard(root: Path, entry: dict[str, Any], manifest: dict[str, Any]) -> None:
    """Size, then identity, number and count of one shard against its manifest.

    Done once per shard file (and its size and mtime) and process; later calls are a set lookup.

    Raises:
        MolmatError: the shard is missing, truncated, unreadable, or not the one the manifest lists.
    """
    path = root / entry["path"]
    manifest_path = root / MANIFEST
    check_shard_size(path, entry, manifest_path)
    st = os.stat(path)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, manifest.get("dataset_id"),
           json.dumps(entry, sort_keys=True))
    if key not in _CHECKED:
        check_shard_meta(path, read_shard_meta(path), entry, manifest, manifest_path)
        _CHECKED.add(key)


# ------------------------------------------------------------------------------------- manifest
def load_manifest(root: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a shard directory, with a clear error when it is not one.

    Checks that it is JSON with a shard list whose counts add up to its record total.

    Raises:
        MolmatError: missing, unreadable or inconsistent manifest, naming the file.
    """
    path = Path(root) / MANIFEST
    if not path.exists():
        hint = " (preprocessing did not finish; re-run the same command to resume)" if Path(root).exists() else ""
        raise MolmatError(f"{root}: not a molmat shard directory, {MANIFEST} is missing{hint}")
    try:
        manifest = json.loads(path.read_bytes())
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise MolmatError(f"{path}: not valid JSON ({_first_line(exc)}); the directory is damaged, re-run "
                          "preprocess") from None
    if not isinstance(manifest, dict):
        raise MolmatError(f"{path}: not a molmat manifest (a JSON object is expected); re-run preprocess")
    if manifest.get("format_version") != FORMAT_VERSION:
        raise MolmatError(f"{root}: shard format version {manifest.get('format_version')} but this molmat reads "
                          f"version {FORMAT_VERSION}; re-run preprocess")
    shards, targets = manifest.get("shards"), manifest.get("targets")
    if (not isinstance(shards, list) or not isinstance(targets, list)
            or not all(isinstance(e, dict) and isinstance(e.get("path"), str) and isinstance(e.get("count"), int)
                       and e["count"] >= 0 for e in shards)):
        raise MolmatError(f"{path}: damaged manifest (its shard or target list is missing or malformed); re-run "
                          "preprocess")
    total = sum(e["count"] for e in shards)
    if manifest.get("records") != total:
        raise MolmatError(f"{path}: says {manifest.get('records')} records but its shards hold {total}; the manifest "
                          "was edited or damaged, re-run preprocess")
    return manifest


def load_stats(root: str | Path) -> dict[str, Any]:
    """Read ``stats.json`` of a shard directory.

    Raises:
        MolmatError: missing or unreadable, naming the file and what to do.
    """
    path = Path(root) / STATS
    try:
        stats = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise MolmatError(f"{path} is missing; re-run the preprocess command (finished shards are kept, the "
                          "summary files are rewritten)") from None
    except (ValueError, RecursionError) as exc:
        raise MolmatError(f"{path}: not valid JSON ({_first_line(exc)}); re-run the preprocess command") from None
    if not isinstance(stats, dict) or not all(isinstance(stats.get(k), dict)
                                              for k in ("targets", "elements", "per_graph")):
        raise MolmatError(f"{path}: damaged statistics file; re-run the preprocess command")
    return stats


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON via a temporary file and rename, so readers never see half a file.

    A failed write (a full disk) removes the temporary file and leaves any old file in place.
    """
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(data, indent=1, sort_keys=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


# -------------------------------------------------------------------------------------- dataset
class ShardDataset:
    """Random access to every record of a shard directory by global index.

    LMDB environments are opened lazily in the process that reads (each DataLoader worker opens
    its own) and re-opened when the process id changes, read-only, without lock or readahead.

    Every shard is checked when the dataset is made (:func:`check_shard`: size before mapping,
    then identity, number and count), so a damaged directory is refused with one line naming the
    file before any record is read.

    Args:
        root: shard directory (with manifest.json).
        indices: optional subset of global indices (e.g. a split); ``len`` and ``[i]`` follow it.
    Items are dicts of numpy arrays (``z``, ``pos``, ``atom_feat``, ``y``, ...) plus string
    metadata under ``_id``, ``_kind``, ``_source``, ``_smiles``...

    Raises:
        MolmatError: an unreadable manifest, a missing, truncated or foreign shard, or an index
            outside the dataset.
    """

    def __init__(self, root: str | Path, indices: Sequence[int] | None = None) -> None:
        self.root = Path(root)
        self.manifest = load_manifest(self.root)
        for entry in self.manifest["shards"]:
            check_shard(self.root, entry, self.manifest)
        self.shards = [self.root / s["path"] for s in self.manifest["shards"]]
        counts = [int(s["count"]) for s in self.manifest["shards"]]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
        self.total = int(self.offsets[-1])
        self.indices = None if indices is None else np.asarray(indices, dtype=np.int64)
        if self.indices is not None and self.indices.size and not (
                0 <= self.indices.min() and self.indices.max() < self.total):
            raise MolmatError(f"{self.root}: record indices outside 0..{self.total - 1} were asked for (a split file "
                              "made for other shards?)")
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
            # checked when the dataset was made; the size again here, in this process, before mapping
            check_shard_size(path, self.manifest["shards"][shard], self.root / MANIFEST)
            try:
                env = self._envs[shard] = open_shard(path)
            except lmdb.Error as exc:
                raise CorruptRecordError(f"{path}: not a readable LMDB shard ({_first_line(exc)}); re-run "
                                         "preprocess") from None
        return env

    def _raw_at(self, shard: int, local: int) -> bytes:
        try:
            with self._env(shard).begin(buffers=False) as txn:
                buf = txn.get(record_key(local))
        except lmdb.Error as exc:  # a damaged B-tree page: MDB_CORRUPTED, MDB_PAGE_NOTFOUND, ...
            raise CorruptRecordError(f"{self.shards[shard]}: key {record_key(local).decode()}: LMDB error "
                                     f"({_first_line(exc)}); the shard is corrupt, re-run preprocess") from None
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
    """Check a shard directory completely: files, identities, keys, and every record's checksum.

    For each shard: its size against the manifest (a shard of another size is not opened: LMDB
    would read past its end), its ``__meta__`` against the manifest (:func:`check_shard_meta`),
    that its keys are exactly ``0..count-1`` and ``__meta__``, every record's crc32, and the
    file's sha256 (reported when nothing more precise, such as a record's key, explains a
    mismatch).

    Returns:
        (records checked, list of problems, one line each; empty when the directory is sound).
    Raises:
        MolmatError: the manifest itself is missing or unreadable.
    """
    root = Path(root)
    manifest = load_manifest(root)
    manifest_path = root / MANIFEST
    problems: list[str] = []
    checked = 0
    for entry in manifest["shards"]:
        path = root / entry["path"]
        found = len(problems)
        try:
            check_shard_size(path, entry, manifest_path)
            sha_differs = entry.get("sha256") is not None and sha256_of(path) != entry["sha256"]
            check_shard_meta(path, read_shard_meta(path), entry, manifest, manifest_path)
        except MolmatError as exc:
            problems.append(str(exc))
            continue
        expected = {record_key(i) for i in range(entry["count"])}
        try:
            with open_shard(path).begin() as txn:
                seen = 0
                for key, value in txn.cursor():
                    if key == META_KEY:
                        continue
                    if key not in expected:
                        problems.append(f"{path}: unexpected key {key.decode(errors='replace')[:40]!r} (renamed or "
                                        "added); the shard is corrupt, re-run preprocess")
                        continue
                    expected.discard(key)
                    seen += 1
                    try:
                        decode_record(value, where=f"{path}: key {key.decode(errors='replace')}")
                        checked += 1
                    except CorruptRecordError as exc:
                        problems.append(str(exc))
        except lmdb.Error as exc:
            problems.append(f"{path}: LMDB error ({_first_line(exc)}); the shard is corrupt, re-run preprocess")
            continue
        if expected:
            problems.append(f"{path}: {len(expected)} record key(s) missing (first {min(expected).decode()}); manifest "
                            f"says {entry['count']} records")
        if sha_differs and len(problems) == found:
            problems.append(f"{path}: sha256 differs from the one in {manifest_path} (the file was changed or "
                            "replaced); re-run preprocess")
    return checked, problems
