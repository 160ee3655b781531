"""The ``preprocess`` stage: raw inputs to a shard directory, in parallel, resumable.

Records are numbered in input order (sources in the order given, each in its own
deterministic order); record ``i`` belongs to shard ``i // shard_size``. Worker processes
featurise chunks of records; the main process writes shards in order, one at a time, so output
is identical for any number of workers. A shard whose file exists is complete and skipped on a
rerun; a leftover ``.tmp`` shard from a killed run is discarded and redone. ``--part I --parts
N`` processes shards ``k`` with ``k % N == I``, and :func:`merge` joins such parts without
copying records. ``manifest.json`` is written last: its presence means the directory is whole.

A record that cannot be used goes to ``rejects.jsonl`` and the run goes on. A run in which every
record was rejected, or in which an unexpected exception (a bug, not bad data) rejected records,
still writes everything, then fails with a :class:`MolmatError` saying so.

A worker process that dies (killed, or by the kernel's out-of-memory killer) does not hang the
run: the records it was working on are featurised again, one at a time, in fresh workers, and a
record whose worker dies again is rejected with that reason. One run at a time writes into an
output directory: :class:`DirectoryLock` (a lock file with the holder's pid and host, released
by the kernel when the holder dies) makes a second run refuse.
"""
from __future__ import annotations

import collections
import errno
import fcntl
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import socket
import sys
import time
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline import FORMAT_VERSION, MolmatError, __version__
from pipeline import records as R
from pipeline.config import Config, PreprocessConfig, write_resolved
from pipeline.featurize import RecordError, featurization_spec, featurize
from pipeline.readers import DENSITY_PAYLOAD, RawRecord, SourceReader, format_kind, open_input
from pipeline.shards import (MANIFEST, REJECTS, STATS, RunningStats, ShardWriter, check_shard_size, close_shards,
                             dataset_facts, dataset_has_coordinates, encode_record, read_shard_meta, sha256_of,
                             shard_facts, shard_name, write_json_atomic)

log = logging.getLogger("molmat.preprocess")
PROGRESS = "progress.json"
LOCK = ".molmat.lock"
#: Reject reason of a record whose worker process died twice (the second time featurising it alone).
WORKER_DIED = ("the worker process died while featurising this record, also when retried alone (killed, or out of "
               "memory)")


@dataclass
class PreprocessSummary:
    """What a preprocessing run made."""

    out: Path
    records: int
    rejected: int
    shards: int
    targets: list[dict[str, str]]
    seconds: float


def _resolve_targets(readers: list[SourceReader], wanted: list[str] | None, units: dict[str, str]) -> list[dict[str, str]]:
    """Targets to store (name, unit), checking requested names exist and units agree."""
    declared: dict[str, str] = {}
    for r in readers:
        for name, unit in r.targets:
            if name in declared and declared[name] != unit and name not in units:
                raise MolmatError(f"target '{name}' is in {declared[name]} in one source and {unit} in {r.path}; "
                                  f"declare it with --set preprocess.units.{name}=UNIT")
            declared.setdefault(name, unit)
    names = list(wanted) if wanted else list(declared)
    missing = [n for n in names if n not in declared]
    if missing:
        raise MolmatError(f"target(s) {', '.join(missing)} not provided by the input(s); available: {', '.join(declared)}")
    return [{"name": n, "unit": units.get(n, declared[n])} for n in names]


# -------------------------------------------------------------------------------------- workers
_WORKER: dict[str, Any] = {}


def _init_worker(targets: list[str], cfg_json: str, in_pool: bool = False) -> None:
    if in_pool:
        # A forked worker inherits the parent's Python signal handlers (a trainer's SIGTERM flag,
        # for one); Pool.terminate relies on SIGTERM killing workers, so restore the default.
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is handled by the main process
    _WORKER["targets"] = targets
    _WORKER["cfg"] = PreprocessConfig.model_validate_json(cfg_json)


def _density_arrays(raw: RawRecord, cfg: PreprocessConfig) -> dict[str, Any]:
    """A density file (``raw.data`` is its path) read and made a density record.

    Raises:
        RecordError: the file cannot be read or is not a density (the reader's message names the
            file and why), or its atoms cannot be featurised.
    """
    from pipeline.density_data import density_record, read_density

    try:
        grid = read_density(raw.data)
    except MolmatError as exc:
        raise RecordError(str(exc)) from None
    return density_record(grid, raw.rid, raw.source, cfg)


def _density_facts(metas: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"density": {"content", "records", "contents"}}`` for the manifest when shards hold density
    records (``content``: ``total``, ``valence``, ``unknown``, or ``mixed``), else ``{}``."""
    counts: collections.Counter = collections.Counter()
    for m in metas:
        counts.update(m.get("density") or {})
    if not counts:
        return {}
    content = next(iter(counts)) if len(counts) == 1 else "mixed"
    return {"density": {"content": content, "records": int(sum(counts.values())),
                        "contents": {k: int(v) for k, v in sorted(counts.items())}}}


def _process_chunk(chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, Any]]:
    """Featurise and encode a chunk; each item becomes (index, result dict) or (index, reject dict).

    A reject dict carries ``unexpected: True`` when the exception was not a :class:`RecordError`
    (a bug in molmat or a library rather than bad input), so the run can fail at its end.
    """
    out: list[tuple[int, Any]] = []
    targets, cfg = _WORKER["targets"], _WORKER["cfg"]
    for index, raw in chunk:
        try:
            arrays = _density_arrays(raw, cfg) if raw.fmt == DENSITY_PAYLOAD else featurize(raw, targets, cfg)
            result = {"record": encode_record(arrays), "y": arrays[R.Y], "z": arrays[R.Z], "density": arrays.get(R.DENSITY),
                      "bonds": int(arrays[R.BOND_INDEX].shape[1]) if R.BOND_INDEX in arrays else 0,
                      "neighbors": int(arrays[R.NBR_INDEX].shape[1]) if R.NBR_INDEX in arrays else 0,
                      "scaffold": arrays.get(R.SCAFFOLD) or arrays.get(R.FORMULA) or raw.rid,
                      "kind": arrays[R.KIND], "coordinates": R.POS in arrays}
            out.append((index, result))
        except RecordError as exc:
            out.append((index, {"reject": str(exc)}))
        except Exception as exc:  # one malformed record must not end a 100k-record run
            first = str(exc).splitlines()[0] if str(exc) else ""
            out.append((index, {"reject": f"unexpected error ({type(exc).__name__}: {first})", "unexpected": True}))
        if "reject" in out[-1][1]:
            out[-1][1].update(file=raw.source, id=raw.rid)
    return out


# --------------------------------------------------------------------------------------- driver
class _Progress:
    """A tqdm bar on a terminal, a log line every ``every`` seconds otherwise."""

    def __init__(self, total: int | None, every: float = 10.0) -> None:
        self.bar = None
        self.done = 0
        self.rejected = 0
        self.t0 = self.last = time.time()
        self.every = every
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit="rec", desc="preprocess", dynamic_ncols=True)

    def update(self, n: int, rejected: int) -> None:
        """Count ``n`` more records, ``rejected`` of them rejected; redraw or log when due."""
        self.done += n
        self.rejected += rejected
        if self.bar is not None:
            self.bar.update(n)
            self.bar.set_postfix(rejected=self.rejected, refresh=False)
        elif time.time() - self.last >= self.every:
            self.last = time.time()
            rate = self.done / max(self.last - self.t0, 1e-9)
            log.info("preprocess: %d records (%.0f/s), %d rejected", self.done, rate, self.rejected)

    def close(self) -> None:
        """Remove the progress bar (no-op when logging)."""
        if self.bar is not None:
            self.bar.close()


def _fingerprint(inputs: list[dict[str, Any]], cfg: PreprocessConfig, targets: list[dict[str, str]],
                 parts: tuple[int, int]) -> dict[str, Any]:
    relevant = cfg.model_dump(mode="json")
    relevant.pop("workers", None)  # any number of workers gives the same shards
    relevant.pop("chunk_size", None)
    return {"format_version": FORMAT_VERSION, "inputs": inputs, "preprocess": relevant, "targets": targets,
            "featurization": featurization_spec(cfg), "parts": list(parts)}


def dataset_identity(fingerprint: dict[str, Any], shard_size: int) -> str:
    """The identity of a dataset: a sha256 over what decides its records and their numbering.

    Input contents (sha256 and format, not paths, so moving the inputs keeps it), preprocessing
    settings, featurisation, targets, format version and shard size; not ``--part``, so the
    parts of one dataset share it. Stored in the manifest (``dataset_id``) and in every shard's
    ``__meta__`` (``dataset``), where readers compare the two.
    """
    ident = {"format_version": fingerprint["format_version"],
             "inputs": [[i["sha256"], i["format"]] for i in fingerprint["inputs"]],
             "preprocess": fingerprint["preprocess"], "featurization": fingerprint["featurization"],
             "targets": fingerprint["targets"], "shard_size": shard_size}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def _check_resume(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix shards of a different run in one directory; name what differs."""
    path = out / PROGRESS
    if not path.exists():
        if any(out.glob("data.*.lmdb")):
            raise MolmatError(f"{out}: holds shards but no {PROGRESS}; choose an empty --out directory")
        return
    try:
        old = json.loads(path.read_bytes())
    except ValueError:
        raise MolmatError(f"{path}: damaged ({PROGRESS} is not valid JSON); delete {out} or use a new --out "
                          "directory") from None
    if old != fingerprint:
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        raise MolmatError(f"{out}: holds shards of a different preprocessing run (differs in: {', '.join(diff)}); "
                          "use a new --out directory or delete this one")


class DirectoryLock:
    """An exclusive lock on an output directory for the length of a ``with`` block.

    The lock file ``DIR/.molmat.lock`` holds the holder's pid, host and command; the lock itself
    is a ``flock`` on it, which the kernel releases when the holder dies (kill -9, OOM), so a
    stale lock file is taken over without guessing. On a filesystem without ``flock`` the pid in
    the file decides: a lock of a process that no longer runs on this host is taken over. The
    file is removed on release.

    Args:
        directory: the directory to lock (must exist).
        what: the operation, for messages ("preprocess").
    Raises:
        MolmatError: on entering, when another live process holds the lock; names it.
    """

    def __init__(self, directory: Path, what: str) -> None:
        self.path = Path(directory) / LOCK
        self.what = what
        self.fd: int | None = None

    def _holder(self) -> dict[str, Any]:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) else {}
        except (OSError, ValueError):
            return {}

    def _refuse(self, holder: dict[str, Any]) -> MolmatError:
        who = (f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, since {holder.get('since', '?')}"
               if holder else "another process")
        return MolmatError(f"{self.path.parent}: another molmat run is writing into this directory ({who}); wait for "
                           f"it to finish or use another --out (lock file {self.path})")

    def __enter__(self) -> "DirectoryLock":
        host = socket.gethostname()
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    os.close(fd)
                    raise self._refuse(self._holder()) from None
                # no flock on this filesystem: the pid in the file decides (on another host it cannot
                # be checked, so the lock counts as held)
                holder = self._holder()
                if holder and (holder.get("host") != host or _pid_alive(holder.get("pid"))):
                    os.close(fd)
                    raise self._refuse(holder) from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        info = {"pid": os.getpid(), "host": host, "since": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "what": self.what,
                "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.write(fd, (json.dumps(info) + "\n").encode())
        self.fd = fd
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # before closing: no one may lock a file that is going away
            os.close(self.fd)
            self.fd = None


def _pid_alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class _Workers:
    """Featurisation worker processes; a dead worker (kill -9, OOM killer) is noticed, not waited for.

    ``multiprocessing.Pool`` replaces a dead worker but never finishes its task, so a run waits
    forever; :class:`ProcessPoolExecutor` fails every pending task with ``BrokenProcessPool``
    instead, and :meth:`restart` starts fresh workers.

    Args:
        n: worker processes.
        initargs: arguments of :func:`_init_worker`.
    """

    def __init__(self, n: int, initargs: tuple[Any, ...]) -> None:
        self.n, self.initargs = n, initargs
        self.ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context("spawn")
        self.restarts = 0
        self.pool = self._start()

    def _start(self) -> ProcessPoolExecutor:
        return ProcessPoolExecutor(self.n, mp_context=self.ctx, initializer=_init_worker, initargs=self.initargs)

    def submit(self, chunk: list[tuple[int, RawRecord]]) -> Future:
        """Featurise a chunk in a worker; the future's result is :func:`_process_chunk`'s.

        A pool that broke before the chunk was queued (a worker died while others were pending)
        gives a future failed with ``BrokenProcessPool``, not an exception here, so callers handle
        it like a chunk that was in flight when the worker died.
        """
        try:
            return self.pool.submit(_process_chunk, chunk)
        except BrokenProcessPool as exc:
            failed: Future = Future()
            failed.set_exception(exc)
            return failed

    def restart(self) -> None:
        """Stop every worker of a broken pool and start fresh ones."""
        self.kill()
        self.restarts += 1
        self.pool = self._start()

    def kill(self) -> None:
        """Terminate the workers now (their tasks are lost) and wait for them to exit."""
        procs = list((getattr(self.pool, "_processes", None) or {}).values())
        for p in procs:
            if p.is_alive():
                p.terminate()  # workers take SIGTERM's default action (see _init_worker)
        self.pool.shutdown(wait=False, cancel_futures=True)
        for p in procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join()

    def close(self) -> None:
        """Let the workers finish and exit."""
        self.pool.shutdown(wait=True)


def _records_one_by_one(workers: _Workers, chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, Any]]:
    """Featurise each record of a chunk alone in a worker; a record whose worker dies is rejected."""
    out: list[tuple[int, Any]] = []
    for index, raw in chunk:
        try:
            out.extend(workers.submit([(index, raw)]).result())
        except BrokenProcessPool:
            log.warning("%s [%s]: the worker died featurising it alone; rejected", raw.source, raw.rid)
            workers.restart()
            out.append((index, {"reject": WORKER_DIED, "file": raw.source, "id": raw.rid}))
    return out


def _bounded_results(workers: _Workers | None, chunks: Iterator[list[tuple[int, RawRecord]]], in_flight: int
                     ) -> Iterator[list[tuple[int, Any]]]:
    """Ordered results of ``_process_chunk`` with at most ``in_flight`` chunks queued.

    ``Pool.imap`` would read the whole input iterator ahead; this keeps memory flat. When a
    worker dies, every unfinished chunk fails: the oldest is redone record by record in fresh
    workers (:func:`_records_one_by_one`; which record killed the worker is unknown), the others
    are queued again. Results stay in input order, so the shards do not depend on deaths that
    featurising again survives.
    """
    if workers is None:
        for chunk in chunks:
            yield _process_chunk(chunk)
        return
    pending: collections.deque = collections.deque()

    def head() -> list[tuple[int, Any]]:
        chunk, fut = pending.popleft()
        try:
            return fut.result()
        except BrokenProcessPool:
            pass
        log.warning("a featurisation worker died (killed, or out of memory); redoing its records one by one")
        # chunks finished before the death keep their results; the rest are queued again
        rest = [(c, f) for c, f in pending]
        pending.clear()
        workers.restart()
        result = _records_one_by_one(workers, chunk)
        for c, f in rest:
            ok = f.done() and not f.cancelled() and f.exception() is None
            pending.append((c, f if ok else workers.submit(c)))
        return result

    for chunk in chunks:
        pending.append((chunk, workers.submit(chunk)))
        if len(pending) >= in_flight:
            yield head()
    while pending:
        yield head()


def preprocess(sources: list[str], out: str | Path, config: Config, fmt: str | None = None,
               labels: str | None = None, targets: list[str] | None = None, workers: int | None = None,
               part: int = 0, parts: int = 1) -> PreprocessSummary:
    """Turn raw inputs into a shard directory, holding the directory's lock (:class:`DirectoryLock`).

    Arguments, return value and errors as :func:`_preprocess`; also raises :class:`MolmatError`
    when another run is writing into ``out``.
    """
    if not 0 <= part < parts:
        raise MolmatError(f"--part {part} must be in 0..{parts - 1} for --parts {parts}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "preprocess"):
        return _preprocess(sources, out, config, fmt, labels, targets, workers, part, parts)


def _preprocess(sources: list[str], out: str | Path, config: Config, fmt: str | None = None,
                labels: str | None = None, targets: list[str] | None = None, workers: int | None = None,
                part: int = 0, parts: int = 1) -> PreprocessSummary:
    """Turn raw inputs into a shard directory.

    Args:
        sources: input files/directories/archives (one format per call, or 'auto' for each).
        out: output shard directory (created; resumed if it holds an unfinished identical run).
        config: resolved configuration (``preprocess`` and ``split`` sections are used).
        fmt: format name overriding ``config.preprocess.format``.
        labels: labels CSV for CIF/SDF inputs.
        targets: label names to keep (default: config, then everything the sources declare).
        workers: featurisation processes (default from config; 0 runs in this process).
        part, parts: process only shards ``k`` with ``k % parts == part`` (Slurm array jobs).
    Returns:
        A :class:`PreprocessSummary`.
    Raises:
        MolmatError: unreadable inputs, unknown targets, or an ``out`` of a different run.
    """
    t0 = time.time()
    cfg = config.preprocess
    if not 0 <= part < parts:
        raise MolmatError(f"--part {part} must be in 0..{parts - 1} for --parts {parts}")
    out = Path(out)
    fmt = fmt or cfg.format
    # an input whose content cannot be read becomes a rejected record; the other inputs go on
    readers = [open_input(s, fmt, labels) for s in sources]
    target_specs = _resolve_targets(readers, targets or cfg.targets, cfg.units)
    target_names = [t["name"] for t in target_specs]
    inputs = []
    for r in readers:
        for f in r.files:
            inputs.append({"path": str(Path(f).resolve()), "format": r.fmt, "sha256": sha256_of(Path(f))})
    fingerprint = _fingerprint(inputs, cfg, target_specs, (part, parts))
    dataset_id = dataset_identity(fingerprint, cfg.shard_size)
    out.mkdir(parents=True, exist_ok=True)
    close_shards()  # shard files in `out` may be replaced below; drop any cached read handles
    _check_resume(out, fingerprint)
    write_json_atomic(out / PROGRESS, fingerprint)
    for stale in out.glob("data.*.lmdb.tmp"):
        stale.unlink()
    (out / MANIFEST).unlink(missing_ok=True)
    write_resolved(config, out)

    size = cfg.shard_size
    mine = lambda shard: shard % parts == part  # noqa: E731
    done = _finished_shards(out, dataset_id)
    if done:
        log.info("resuming: %d finished shard(s) in %s are kept", len(done), out)

    counter = {"seen": 0}

    def records() -> Iterator[tuple[int, RawRecord]]:
        for i, raw in enumerate(chain.from_iterable(r.records() for r in readers)):
            counter["seen"] = i + 1
            if mine(i // size) and (i // size) not in done:
                yield i, raw

    def chunks() -> Iterator[list[tuple[int, RawRecord]]]:
        chunk: list[tuple[int, RawRecord]] = []
        for item in records():
            if chunk and (len(chunk) >= cfg.chunk_size or item[0] // size != chunk[0][0] // size):
                yield chunk
                chunk = []
            chunk.append(item)
        if chunk:
            yield chunk

    n_workers = cfg.workers if workers is None else workers
    total_hint = sum(len(r.files) for r in readers if r.fmt in ("qm9_xyz", "cif") and r.path.is_dir()) or None
    progress = _Progress(total_hint)
    writer: ShardWriter | None = None
    current = -1
    stats = RunningStats(len(target_names))
    rejects: list[dict[str, Any]] = []
    scaffolds: list[str] = []
    kinds: collections.Counter = collections.Counter()
    densities: collections.Counter = collections.Counter()   # density records per content
    with_coordinates = 0

    def finish_shard() -> None:
        meta = {"format_version": FORMAT_VERSION, "dataset": dataset_id, "shard": current, "count": writer.count,
                "input_range": [current * size, current * size + writer.count + len(rejects)],
                **shard_facts(kinds, with_coordinates), **({"density": dict(densities)} if densities else {}),
                "stats": stats.to_json(), "rejects": rejects, "scaffolds": scaffolds}
        writer.close(meta)

    pool = _Workers(n_workers, (target_names, cfg.model_dump_json(), True)) if n_workers > 0 else None
    if pool is None:
        _init_worker(target_names, cfg.model_dump_json())
    try:
        for results in _bounded_results(pool, chunks(), in_flight=max(2, 3 * n_workers)):
            shard = results[0][0] // size
            if shard != current:
                if writer is not None:
                    finish_shard()
                writer = ShardWriter(out / shard_name(shard))
                current, stats, rejects, scaffolds = shard, RunningStats(len(target_names)), [], []
                kinds, with_coordinates = collections.Counter(), 0
                densities = collections.Counter()
            n_rej = 0
            for index, res in results:
                if "reject" in res:
                    rejects.append({"index": index, "file": res["file"], "id": res["id"], "reason": res["reject"],
                                    **({"unexpected": True} if res.get("unexpected") else {})})
                    n_rej += 1
                    continue
                writer.add(res["record"])
                stats.add(res["y"], res["z"], res["bonds"], res["neighbors"])
                scaffolds.append(res["scaffold"])
                kinds[res["kind"]] += 1
                if res.get("density"):
                    densities[res["density"]] += 1
                with_coordinates += bool(res["coordinates"])
            progress.update(len(results), n_rej)
        if writer is not None:
            finish_shard()
            writer = None
        if pool is not None:
            pool.close()
    except BaseException:
        if writer is not None:
            writer.abort()
        if pool is not None:
            pool.kill()
        raise
    finally:
        progress.close()

    n_seen = counter["seen"]
    n_shards = (n_seen + size - 1) // size
    return _finalise(out, config, fingerprint, target_specs, n_seen, n_shards, part, parts, time.time() - t0,
                     dataset_id)


def _finished_shards(out: Path, dataset_id: str) -> set[int]:
    """Numbers of the shards a previous run of this dataset finished in ``out``.

    A shard file that is not whole, or not of this dataset (left by a run of an older version,
    or damaged since), is removed and made again instead of failing every re-run.
    """
    done = set()
    for path in sorted(out.glob("data.*.lmdb")):
        try:
            number = int(path.name.split(".")[1])
            meta = read_shard_meta(path)
            ok = meta.get("dataset") == dataset_id and meta.get("shard") == number
        except (ValueError, MolmatError):
            ok = False
        if ok:
            done.add(number)
        else:
            close_shards()
            log.warning("%s: not a finished shard of this run; it is made again", path)
            path.unlink()
    return done


def _manifest_facts(metas: list[dict[str, Any]], inputs: list[dict[str, Any]], preprocess_cfg: dict[str, Any]
                    ) -> dict[str, Any]:
    """``kinds`` and ``coordinates`` of the manifest, from the shards' counts.

    Shards finished by an older version of molmat (a resumed run) have no counts; the facts
    then follow from the input formats.
    """
    facts = dataset_facts(metas)
    if facts is None:
        guess = {"inputs": inputs, "preprocess": preprocess_cfg}
        facts = {"kinds": sorted({format_kind(i["format"]) for i in inputs}),
                 "coordinates": dataset_has_coordinates(guess)}
    return facts


def _check_failures(out: Path, metas: list[dict[str, Any]], records: int) -> None:
    """Fail a finished run whose records were all rejected, or rejected by unexpected errors.

    Everything (shards, manifest, rejects.jsonl) is written before this runs, so nothing is lost
    and the rejects can be read; the error names the count and the first case.
    """
    rejects = [r for m in metas for r in m["rejects"]]
    unexpected = [r for r in rejects if r.get("unexpected")]

    def first(r: dict[str, Any]) -> str:
        return f"(first: {r['file']} [{r['id']}]: {r['reason']}); all are listed in {out / REJECTS}"

    if unexpected:
        raise MolmatError(f"{len(unexpected)} record(s) were rejected by an unexpected error, which is a bug in molmat "
                          f"or a library rather than bad input {first(unexpected[0])}; the shards and manifest were "
                          f"written ({records} records), but do not use them before this is fixed")
    if rejects and records == 0:
        raise MolmatError(f"every record ({len(rejects)}) was rejected, none was written {first(rejects[0])}; "
                          "check the input format and the preprocess settings")


def _finalise(out: Path, config: Config, fingerprint: dict[str, Any], targets: list[dict[str, str]],
              n_seen: int, n_shards: int, part: int, parts: int, seconds: float, dataset_id: str) -> PreprocessSummary:
    """Collect shard metadata into manifest.json, stats.json, rejects.jsonl and (unsplit) split.json.

    Raises:
        MolmatError: after writing everything, when every record was rejected or some record
            was rejected by an unexpected error (see :func:`_check_failures`).
    """
    shard_entries = []
    metas = []
    for k in range(n_shards):
        if k % parts != part:
            continue
        path = out / shard_name(k)
        if not path.exists():
            raise MolmatError(f"{path}: expected shard is missing after preprocessing")
        meta = read_shard_meta(path)
        metas.append(meta)
        # size and sha256 let readers refuse a truncated or replaced file before mapping it
        shard_entries.append({"path": path.name, "shard": k, "count": meta["count"],
                              "input_range": meta["input_range"], "rejected": len(meta["rejects"]),
                              "bytes": path.stat().st_size, "sha256": sha256_of(path)})
    stats = RunningStats.merge_json([m["stats"] for m in metas], len(targets))
    with open(out / (REJECTS + ".tmp"), "w") as fh:
        for m in metas:
            for r in m["rejects"]:
                fh.write(json.dumps(r) + "\n")
    os.replace(out / (REJECTS + ".tmp"), out / REJECTS)
    write_json_atomic(out / STATS, stats.summary(targets))
    n_rejected = sum(e["rejected"] for e in shard_entries)
    manifest = {
        "format_version": FORMAT_VERSION, "code_version": __version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "dataset_id": dataset_id, "inputs": fingerprint["inputs"], "preprocess": fingerprint["preprocess"],
        "featurization": fingerprint["featurization"], "targets": targets,
        "records": sum(e["count"] for e in shard_entries), "rejected": n_rejected, "inputs_seen": n_seen,
        **_manifest_facts(metas, fingerprint["inputs"], fingerprint["preprocess"]), **_density_facts(metas),
        "shard_size": config.preprocess.shard_size, "part": part, "parts": parts, "shards": shard_entries,
    }
    if parts == 1:
        from pipeline.splits import write_split

        write_split(out, config.split, scaffolds=[s for m in metas for s in m["scaffolds"]])
    write_json_atomic(out / MANIFEST, manifest)
    _check_failures(out, metas, manifest["records"])
    return PreprocessSummary(out, manifest["records"], n_rejected, len(shard_entries), targets, seconds)


def merge(part_dirs: list[str | Path], out: str | Path, config: Config) -> PreprocessSummary:
    """Join the manifests and stats of ``--part`` directories into one dataset, without copying.

    The new manifest points at the parts' shard files by relative path. Parts must come from the
    same inputs and preprocessing config, and together hold every shard.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    with DirectoryLock(out, "preprocess --merge"):
        return _merge(part_dirs, out, config)


def _merge(part_dirs: list[str | Path], out: Path, config: Config) -> PreprocessSummary:
    """:func:`merge`, with the lock on ``out`` held."""
    from pipeline.shards import load_manifest

    t0 = time.time()
    manifests = []
    for d in part_dirs:
        if not (Path(d) / MANIFEST).exists():
            raise MolmatError(f"{d}: no {MANIFEST}; that part has not finished")
        manifests.append((Path(d), load_manifest(d)))
    ref_dir, ref = manifests[0]
    for d, m in manifests[1:]:
        for key in ("inputs", "preprocess", "featurization", "targets", "shard_size", "parts", "dataset_id"):
            if m.get(key) != ref.get(key):
                raise MolmatError(f"cannot merge {d} with {ref_dir}: they differ in '{key}' (made with different inputs or config)")
    parts_found = sorted(m["part"] for _, m in manifests)
    if parts_found != list(range(ref["parts"])):
        raise MolmatError(f"merge needs parts 0..{ref['parts'] - 1} exactly once each; got {parts_found}")
    out.mkdir(parents=True, exist_ok=True)
    entries, metas = [], []
    for d, m in manifests:
        for e in m["shards"]:
            e = dict(e, path=os.path.relpath(Path(d).resolve() / e["path"], out.resolve()))
            entries.append(e)
            check_shard_size(out / e["path"], e, Path(d) / MANIFEST)
            metas.append(read_shard_meta(out / e["path"]))
    order = sorted(range(len(entries)), key=lambda i: entries[i]["shard"])
    entries = [entries[i] for i in order]
    metas = [metas[i] for i in order]
    expected = (ref["inputs_seen"] + ref["shard_size"] - 1) // ref["shard_size"]
    if [e["shard"] for e in entries] != list(range(expected)):
        raise MolmatError(f"merged parts hold shards {[e['shard'] for e in entries]}, expected 0..{expected - 1}")
    stats = RunningStats.merge_json([m["stats"] for m in metas], len(ref["targets"]))
    with open(out / (REJECTS + ".tmp"), "w") as fh:
        for m in metas:
            for r in m["rejects"]:
                fh.write(json.dumps(r) + "\n")
    os.replace(out / (REJECTS + ".tmp"), out / REJECTS)
    write_json_atomic(out / STATS, stats.summary(ref["targets"]))
    from pipeline.splits import write_split

    write_split(out, config.split, scaffolds=[s for m in metas for s in m["scaffolds"]])
    manifest = dict(ref, part=0, parts=1, shards=entries, records=sum(e["count"] for e in entries),
                    rejected=sum(e["rejected"] for e in entries), merged_from=[str(d) for d, _ in manifests],
                    **_manifest_facts(metas, ref["inputs"], ref["preprocess"]), **_density_facts(metas))
    write_resolved(config, out)
    write_json_atomic(out / MANIFEST, manifest)
    return PreprocessSummary(out, manifest["records"], manifest["rejected"], len(entries), ref["targets"], time.time() - t0)


def summarize_rejects(out: str | Path, limit: int = 5) -> list[str]:
    """The first ``limit`` reject lines, formatted as 'file [id]: reason'."""
    path = Path(out) / REJECTS
    lines = []
    if path.exists():
        with open(path) as fh:
            for line in fh:
                r = json.loads(line)
                lines.append(f"{r['file']} [{r['id']}]: {r['reason']}")
                if len(lines) >= limit:
                    break
    return lines

