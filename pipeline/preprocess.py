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
"""
from __future__ import annotations

import collections
import hashlib
import json
import logging
import multiprocessing as mp
import os
import signal
import sys
import time
from dataclasses import dataclass
from itertools import chain
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from pipeline import FORMAT_VERSION, MolmatError, __version__
from pipeline import records as R
from pipeline.config import Config, PreprocessConfig, write_resolved
from pipeline.featurize import RecordError, featurization_spec, featurize
from pipeline.readers import RawRecord, SourceReader, format_kind, open_source
from pipeline.shards import (MANIFEST, REJECTS, STATS, RunningStats, ShardWriter, close_shards, dataset_facts,
                             dataset_has_coordinates, encode_record, read_shard_meta, shard_facts, shard_name,
                             write_json_atomic)

log = logging.getLogger("molmat.preprocess")
PROGRESS = "progress.json"


@dataclass
class PreprocessSummary:
    """What a preprocessing run made."""

    out: Path
    records: int
    rejected: int
    shards: int
    targets: list[dict[str, str]]
    seconds: float


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


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


def _process_chunk(chunk: list[tuple[int, RawRecord]]) -> list[tuple[int, Any]]:
    """Featurise and encode a chunk; each item becomes (index, result dict) or (index, reject dict).

    A reject dict carries ``unexpected: True`` when the exception was not a :class:`RecordError`
    (a bug in molmat or a library rather than bad input), so the run can fail at its end.
    """
    out: list[tuple[int, Any]] = []
    targets, cfg = _WORKER["targets"], _WORKER["cfg"]
    for index, raw in chunk:
        try:
            arrays = featurize(raw, targets, cfg)
            result = {"record": encode_record(arrays), "y": arrays[R.Y], "z": arrays[R.Z],
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


def _check_resume(out: Path, fingerprint: dict[str, Any]) -> None:
    """Refuse to mix shards of a different run in one directory; name what differs."""
    path = out / PROGRESS
    if not path.exists():
        if any(out.glob("data.*.lmdb")):
            raise MolmatError(f"{out}: holds shards but no {PROGRESS}; choose an empty --out directory")
        return
    old = json.loads(path.read_text())
    if old != fingerprint:
        diff = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        raise MolmatError(f"{out}: holds shards of a different preprocessing run (differs in: {', '.join(diff)}); "
                          "use a new --out directory or delete this one")


def _bounded_results(pool: Any, chunks: Iterator[list[tuple[int, RawRecord]]], in_flight: int) -> Iterator[list[tuple[int, Any]]]:
    """Ordered results of ``_process_chunk`` with at most ``in_flight`` chunks queued.

    ``Pool.imap`` would read the whole input iterator ahead; this keeps memory flat.
    """
    if pool is None:
        for chunk in chunks:
            yield _process_chunk(chunk)
        return
    pending: collections.deque = collections.deque()
    for chunk in chunks:
        pending.append(pool.apply_async(_process_chunk, (chunk,)))
        if len(pending) >= in_flight:
            yield pending.popleft().get()
    while pending:
        yield pending.popleft().get()


def preprocess(sources: list[str], out: str | Path, config: Config, fmt: str | None = None,
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
    readers = [open_source(s, fmt, labels) for s in sources]
    target_specs = _resolve_targets(readers, targets or cfg.targets, cfg.units)
    target_names = [t["name"] for t in target_specs]
    inputs = []
    for r in readers:
        for f in r.files:
            inputs.append({"path": str(Path(f).resolve()), "format": r.fmt, "sha256": sha256_file(Path(f))})
    fingerprint = _fingerprint(inputs, cfg, target_specs, (part, parts))
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
    done = {int(p.name.split(".")[1]) for p in out.glob("data.*.lmdb")}
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
    with_coordinates = 0

    def finish_shard() -> None:
        meta = {"format_version": FORMAT_VERSION, "shard": current, "count": writer.count,
                "input_range": [current * size, current * size + writer.count + len(rejects)],
                **shard_facts(kinds, with_coordinates),
                "stats": stats.to_json(), "rejects": rejects, "scaffolds": scaffolds}
        writer.close(meta)

    ctx = mp.get_context("fork") if sys.platform.startswith("linux") else mp.get_context("spawn")
    pool = ctx.Pool(n_workers, initializer=_init_worker, initargs=(target_names, cfg.model_dump_json(), True)) if n_workers > 0 else None
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
            pool.terminate()
        raise
    finally:
        progress.close()
        if pool is not None:
            pool.join()

    n_seen = counter["seen"]
    n_shards = (n_seen + size - 1) // size
    return _finalise(out, config, fingerprint, target_specs, n_seen, n_shards, part, parts, time.time() - t0)


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
              n_seen: int, n_shards: int, part: int, parts: int, seconds: float) -> PreprocessSummary:
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
        shard_entries.append({"path": path.name, "shard": k, "count": meta["count"],
                              "input_range": meta["input_range"], "rejected": len(meta["rejects"]),
                              "bytes": path.stat().st_size})
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
        "inputs": fingerprint["inputs"], "preprocess": fingerprint["preprocess"],
        "featurization": fingerprint["featurization"], "targets": targets,
        "records": sum(e["count"] for e in shard_entries), "rejected": n_rejected, "inputs_seen": n_seen,
        **_manifest_facts(metas, fingerprint["inputs"], fingerprint["preprocess"]),
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
    t0 = time.time()
    out = Path(out)
    manifests = []
    for d in part_dirs:
        path = Path(d) / MANIFEST
        if not path.exists():
            raise MolmatError(f"{d}: no {MANIFEST}; that part has not finished")
        manifests.append((Path(d), json.loads(path.read_text())))
    ref_dir, ref = manifests[0]
    for d, m in manifests[1:]:
        for key in ("inputs", "preprocess", "featurization", "targets", "shard_size", "parts"):
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
                    **_manifest_facts(metas, ref["inputs"], ref["preprocess"]))
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

