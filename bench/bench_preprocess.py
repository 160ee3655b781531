"""Preprocessing and shard-reading benchmark for molmat (real QM9 and Materials Project data).

Run it from the repository root (it takes a few minutes on a 2-core machine)::

    .venv/bin/python bench/bench_preprocess.py            # defaults: --qm9-n 20000 --mp-m 3000
    .venv/bin/python bench/bench_preprocess.py --quick    # small sizes, for a smoke test

It writes ``bench/results/preprocess.json`` (every number, the command, date, machine and
package versions) and ``bench/results/preprocess.md`` (the same as a table). Raw cProfile dumps
and the scratch shard directories go to a temporary directory that is removed at the end
(``--keep`` keeps it and prints where it is).

What it measures (all with the Python API ``pipeline.preprocess.preprocess``, 2 worker processes,
no extra conformers; data from ``/work/shared/data``, read-only):

1. QM9 end-to-end preprocessing throughput (read + featurise + encode + write LMDB shards +
   manifest/stats/split), in input molecules per second, two ways:
   a. ``qm9_20k.xyz.tar.bz2`` passed *directly* (the archive is streamed and decompressed inside
      the timed run); with ``--qm9-n`` smaller than the archive, a tar.bz2 of its first N members
      is written before timing and passed instead;
   b. a directory holding the first ``--qm9-dir-n`` (2000) ``.xyz`` members, extracted before
      timing.
   Target: >= 1000 molecules/s. Baselines from the same run: the reader alone (main process,
   no featurisation) and featurise+encode in one process without I/O; the ratio
   ``rate / (workers x single-process rate)`` is the parallel efficiency.
2. Materials Project CIF throughput: the first ``--mp-m`` (3000) CIFs of ``mp/cifs.tar.gz`` in
   archive order, extracted with a matching ``labels.csv`` (rows of those ids) into a directory
   before timing; cutoff 8 A, 12 neighbours. Target: >= 150 crystals/s. Baseline: single-process
   featurise+encode rate.
3. Reading the QM9 shards of 1a in ONE process (no DataLoader workers): ``ShardDataset[i]`` +
   ``pipeline.graphs.collate`` in batches of 128, records/s; also raw LMDB get only, decode only
   (``ShardDataset[i]``) and collate only (records decoded beforehand). One warm-up batch is
   excluded. Target: >= 10,000 records/s end to end.
4. Peak memory of preprocessing 20,000 vs 2,000 QM9 molecules (both as tar.bz2, 2 workers), each
   in a fresh ``python -c`` subprocess, with psutil polling the process tree every 0.1 s: peak
   of the main process, of the largest worker, and of the whole tree (sum of RSS; sum of PSS,
   which counts pages shared after fork once). ``getrusage`` maxrss of the subprocess and its
   reaped children is reported too. Target: tree-RSS ratio 20k/2k <= 1.5. This stage runs first,
   while the benchmark process is still small (``ru_maxrss`` is inherited across fork+exec).

Each timed throughput is repeated ``--repeats`` times (default 3). The machine may be shared, so
before each timed run the benchmark waits (up to ``--quiet-max-wait`` s) until other processes use
fewer than ``--quiet-threshold`` cores, records the CPU other processes used during the run, and
judges the fastest repeat (``--judge best``, the least disturbed one; ``--judge median`` for the
median); every repeat's rate is kept in the results.
When a target fails (or with ``--profile``), the failing stage is profiled with cProfile and the
top functions by own time and by cumulative time, with their share of the profiled time, are
written into the results: the featurisation profile runs with ``workers=0`` (all work in one
process) and, for QM9, the main process of a 2-worker run is profiled as well (reader/writer
side).
"""
from __future__ import annotations

import argparse
import cProfile
import csv
import datetime as _dt
import importlib.metadata
import io
import json
import os
import platform
import pstats
import resource
import shlex
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

if TYPE_CHECKING:
    from pipeline.config import Config

DATA = Path("/work/shared/data")
QM9_TAR = DATA / "qm9" / "qm9_20k.xyz.tar.bz2"
MP_TAR = DATA / "mp" / "cifs.tar.gz"
MP_LABELS = DATA / "mp" / "labels.csv"
RESULTS = ROOT / "bench" / "results"
PATH_PREFIXES = sorted({p.rstrip("/") + "/" for p in (*sys.path[1:], str(ROOT)) if p and p.startswith("/")}, key=len, reverse=True)

TARGETS = {
    "qm9_tar_rate": (">=", 1000.0, "molecules/s"),
    "qm9_dir_rate": (">=", 1000.0, "molecules/s"),
    "mp_rate": (">=", 150.0, "crystals/s"),
    "read_rate": (">=", 10000.0, "records/s"),
    "rss_ratio": ("<=", 1.5, "x"),
}


# ------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Print ``msg`` with a time stamp, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def judge(key: str, value: float) -> str:
    """``PASS`` or ``FAIL``: ``value`` against the target ``TARGETS[key]``."""
    op, limit, _ = TARGETS[key]
    ok = value >= limit if op == ">=" else value <= limit
    return "PASS" if ok else "FAIL"


def machine_info() -> dict[str, Any]:
    """CPU count and model, memory, Python, platform and package versions of this machine."""
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        nproc = subprocess.run(["nproc"], capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        nproc = str(len(os.sched_getaffinity(0)))
    mem = None
    try:
        import psutil

        mem = round(psutil.virtual_memory().total / 2**30, 1)
    except Exception:
        pass
    versions = {}
    for dist in ("torch", "dgl", "rdkit", "pymatgen", "numpy", "lmdb", "psutil"):
        try:
            versions[dist] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            versions[dist] = "not installed"
    return {"nproc": int(nproc), "cpu_model": model, "memory_GiB": mem, "python": platform.python_version(),
            "platform": platform.platform(), "versions": versions}


def _busy_cpu_s() -> float:
    """System-wide busy CPU seconds (all processes) since boot."""
    import psutil

    t = psutil.cpu_times()
    return t.user + t.nice + t.system + t.irq + t.softirq


def _own_cpu_s() -> float:
    """CPU seconds of this process and its reaped children."""
    a, b = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return a.ru_utime + a.ru_stime + b.ru_utime + b.ru_stime


class Contention:
    """Measures CPU used by *other* processes on the machine while a block runs (in cores)."""

    def __enter__(self) -> "Contention":
        self.busy0, self.own0, self.t0 = _busy_cpu_s(), _own_cpu_s(), time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        wall = max(time.perf_counter() - self.t0, 1e-9)
        foreign = (_busy_cpu_s() - self.busy0) - (_own_cpu_s() - self.own0)
        self.foreign_cores = max(foreign, 0.0) / wall


QUIET = {"threshold": 0.3, "max_wait": 60.0, "waited_s": 0.0, "timeouts": 0}


def wait_for_quiet() -> None:
    """Wait (up to QUIET['max_wait'] s) until other processes use < QUIET['threshold'] cores for 1 s.

    The machine may be shared (tests, installs); a timed run that competes with them for 2 cores
    would measure them, not molmat. Waits and timeouts are recorded in the results.
    """
    if QUIET["max_wait"] <= 0:
        return
    t0 = time.perf_counter()
    while True:
        b0, o0 = _busy_cpu_s(), _own_cpu_s()
        time.sleep(1.0)
        if (_busy_cpu_s() - b0) - (_own_cpu_s() - o0) < QUIET["threshold"]:
            break
        if time.perf_counter() - t0 > QUIET["max_wait"]:
            QUIET["timeouts"] += 1
            log(f"machine still busy after {QUIET['max_wait']:.0f} s; measuring anyway")
            break
    QUIET["waited_s"] += time.perf_counter() - t0


def code_fingerprint() -> dict[str, Any]:
    """sha256 (first 12 hex) of each pipeline/*.py file: the code is edited often, so record which version ran."""
    import hashlib

    out = {}
    for f in sorted((ROOT / "pipeline").rglob("*.py")):
        out[str(f.relative_to(ROOT))] = hashlib.sha256(f.read_bytes()).hexdigest()[:12]
    return out


def extract_first(archive: Path, n: int, suffix: str, dest: Path) -> list[str]:
    """Extract the first ``n`` members ending in ``suffix`` (archive order) into ``dest``; return stems."""
    dest.mkdir(parents=True, exist_ok=True)
    stems: list[str] = []
    with tarfile.open(archive, mode="r|*") as tar:
        for member in tar:
            if len(stems) >= n:
                break
            if not member.isfile() or not member.name.endswith(suffix):
                continue
            fh = tar.extractfile(member)
            if fh is None:
                continue
            base = member.name.rsplit("/", 1)[-1]
            (dest / base).write_bytes(fh.read())
            stems.append(base[: -len(suffix)])
    return stems


def truncated_tar(archive: Path, n: int, suffix: str, dest: Path) -> int:
    """Write a tar.bz2 of the first ``n`` ``suffix`` members of ``archive``; return how many."""
    count = 0
    with tarfile.open(archive, mode="r|*") as src, tarfile.open(dest, mode="w:bz2") as out:
        for member in src:
            if count >= n:
                break
            if not member.isfile() or not member.name.endswith(suffix):
                continue
            fh = src.extractfile(member)
            data = fh.read() if fh is not None else b""
            info = tarfile.TarInfo(member.name)
            info.size = len(data)
            info.mtime = member.mtime
            info.mode = member.mode
            out.addfile(info, io.BytesIO(data))
            count += 1
    return count


def write_matching_labels(stems: list[str], dest: Path) -> int:
    """Copy the header and the rows of ``stems`` (in labels.csv order) from the MP labels CSV."""
    wanted = set(stems)
    kept = 0
    with open(MP_LABELS, newline="") as fin, open(dest, "w", newline="") as fout:
        reader = csv.reader(fin)
        writer = csv.writer(fout)
        writer.writerow(next(reader))
        for row in reader:
            if row and row[0] in wanted:
                writer.writerow(row)
                kept += 1
    return kept


def make_config(extra: list[str], workers: int) -> Config:
    """molmat's config with ``workers`` preprocess workers, no extra conformers, plus ``extra`` overrides."""
    from pipeline.config import load_config

    return load_config(None, [f"preprocess.workers={workers}", "preprocess.molecule.conformers=0", *extra])


MP_OVERRIDES = ["preprocess.crystal.cutoff=8.0", "preprocess.crystal.max_neighbors=12"]


def run_preprocess(src: Path, out: Path, overrides: list[str], workers: int, labels: Path | None = None,
                   profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """One timed ``preprocess`` call into a fresh ``out``; wall time and CPU of main and workers."""
    from pipeline.preprocess import preprocess

    if out.exists():
        shutil.rmtree(out)
    cfg = make_config(overrides, workers)
    wait_for_quiet()
    cont = Contention().__enter__()
    self0 = resource.getrusage(resource.RUSAGE_SELF)
    kids0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    if profiler is not None:
        profiler.enable()
    try:
        summary = preprocess([str(src)], out, cfg, labels=str(labels) if labels else None, workers=workers)
    finally:
        if profiler is not None:
            profiler.disable()
    wall = time.perf_counter() - t0
    cont.__exit__(None, None, None)
    self1 = resource.getrusage(resource.RUSAGE_SELF)
    kids1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    main_cpu = (self1.ru_utime - self0.ru_utime) + (self1.ru_stime - self0.ru_stime)
    kids_cpu = (kids1.ru_utime - kids0.ru_utime) + (kids1.ru_stime - kids0.ru_stime)
    inputs = summary.records + summary.rejected
    return {"wall_s": wall, "inputs": inputs, "records": summary.records, "rejected": summary.rejected,
            "shards": summary.shards, "rate": inputs / wall, "main_cpu_s": main_cpu, "workers_cpu_s": kids_cpu,
            "cpu_utilisation": (main_cpu + kids_cpu) / wall, "foreign_cpu_cores": round(cont.foreign_cores, 3)}


JUDGE = {"mode": "best"}


def pick_run(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """The run that is judged (fastest with --judge best, median otherwise), plus every run's rate.

    Other processes on a shared machine can only slow a run down, so the fastest of N repeats is
    the least disturbed estimate; the median and every rate are kept next to it.
    """
    order = sorted(runs, key=lambda r: r["rate"])
    chosen = dict(order[-1] if JUDGE["mode"] == "best" else order[(len(order) - 1) // 2])
    chosen["best_rate"] = order[-1]["rate"]
    chosen["median_rate"] = statistics.median(r["rate"] for r in runs)
    chosen["rate"] = chosen["best_rate"] if JUDGE["mode"] == "best" else chosen["median_rate"]
    chosen["all_rates"] = [round(r["rate"], 1) for r in runs]
    chosen["all_foreign_cpu_cores"] = [r["foreign_cpu_cores"] for r in runs]
    return chosen


def reader_rate(src: Path, n: int, labels: Path | None = None, repeats: int = 1) -> dict[str, Any]:
    """Main-process reader alone: iterate RawRecords (decompression, tar parsing, text decoding)."""
    from pipeline.readers import open_source

    reader = open_source(src, "auto", labels)
    runs = []
    for _ in range(max(repeats, 1)):
        wait_for_quiet()
        with Contention() as cont:
            t0 = time.perf_counter()
            count = 0
            for _ in reader.records():
                count += 1
                if count >= n:
                    break
            wall = time.perf_counter() - t0
        runs.append({"records": count, "wall_s": wall, "rate": count / wall, "foreign_cpu_cores": round(cont.foreign_cores, 3)})
    return pick_run(runs)


def featurise_rate(src: Path, n: int, overrides: list[str], labels: Path | None = None,
                   profiler: cProfile.Profile | None = None, repeats: int = 1) -> dict[str, Any]:
    """featurize + encode_record in this process, records pre-read into memory (no I/O)."""
    from pipeline.featurize import featurize, _rdkit
    from pipeline.readers import open_source
    from pipeline.shards import encode_record

    cfg = make_config(overrides, 0).preprocess
    reader = open_source(src, "auto", labels)
    names = [t for t, _ in reader.targets]
    raws = []
    for raw in reader.records():
        raws.append(raw)
        if len(raws) >= n:
            break
    _rdkit()
    if raws:  # warm-up (imports pymatgen on the first crystal)
        try:
            encode_record(featurize(raws[0], names, cfg))
        except Exception:
            pass
    runs = []
    for _ in range(max(repeats, 1)):
        rejected = 0
        wait_for_quiet()
        with Contention() as cont:
            t0 = time.perf_counter()
            if profiler is not None:
                profiler.enable()
            for raw in raws:
                try:
                    encode_record(featurize(raw, names, cfg))
                except Exception:
                    rejected += 1
            if profiler is not None:
                profiler.disable()
            wall = time.perf_counter() - t0
        runs.append({"records": len(raws), "rejected": rejected, "wall_s": wall, "rate": len(raws) / wall,
                     "foreign_cpu_cores": round(cont.foreign_cores, 3)})
    return pick_run(runs)


def profile_rows(profiler: cProfile.Profile, top: int = 15) -> dict[str, Any]:
    """Top functions by own time and by cumulative time, with their share of the profiled time."""
    stats = pstats.Stats(profiler)
    total = stats.total_tt or 1e-12
    rows = []
    for (filename, line, func), (cc, nc, tt, ct, _callers) in stats.stats.items():
        short = filename
        for prefix in PATH_PREFIXES:
            if short.startswith(prefix):
                short = short[len(prefix):]
                break
        name = f"{short}:{line}({func})" if line else f"{func}"
        rows.append({"function": name, "calls": nc, "tottime_s": round(tt, 3), "cumtime_s": round(ct, 3),
                     "tottime_share": round(tt / total, 4), "cumtime_share": round(ct / total, 4)})
    by_tot = sorted(rows, key=lambda r: -r["tottime_s"])[:top]
    by_cum = sorted(rows, key=lambda r: -r["cumtime_s"])[:top]
    return {"total_s": round(total, 3), "by_tottime": by_tot, "by_cumtime": by_cum}


# ------------------------------------------------------------------------------------ stage 3
def read_benchmark(shard_dir: Path, batch_size: int, repeats: int,
                   profiler: cProfile.Profile | None = None) -> dict[str, Any]:
    """Stage 3: records/s of LMDB get, decode, collate and decode + collate over ``shard_dir``."""
    import numpy as np  # noqa: F401

    from pipeline.graphs import collate
    from pipeline.shards import ShardDataset

    ds = ShardDataset(shard_dir)
    n = len(ds)
    batches = [range(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]
    collate([ds[i] for i in batches[0]])  # warm-up: dgl/torch first-call costs, LMDB open

    def timed(fn: Callable[[], Any]) -> dict[str, Any]:
        """``fn`` timed ``repeats`` times, each after a quiet wait; the judged run (:func:`pick_run`)."""
        runs = []
        for _ in range(repeats):
            wait_for_quiet()
            with Contention() as cont:
                t0 = time.perf_counter()
                fn()
                wall = time.perf_counter() - t0
            runs.append({"wall_s": wall, "rate": n / wall, "foreign_cpu_cores": round(cont.foreign_cores, 3)})
        return pick_run(runs)

    def raw_only() -> None:
        """LMDB get of every record, no decoding."""
        for i in range(n):
            ds.raw(i)

    def decode_only() -> None:
        """Decode every record (``ShardDataset[i]``), no collation."""
        for i in range(n):
            ds[i]

    decoded = [ds[i] for i in range(n)]

    def collate_only() -> None:
        """Collate the records decoded beforehand, batch by batch."""
        for b in batches:
            collate(decoded[b.start:b.stop])

    def end_to_end() -> None:
        """Decode and collate every batch."""
        for b in batches:
            collate([ds[i] for i in b])

    out = {"records": n, "batch_size": batch_size, "batches": len(batches)}
    for name, fn in (("raw_lmdb_get", raw_only), ("decode_only", decode_only), ("collate_only", collate_only),
                     ("end_to_end", end_to_end)):
        out[name] = timed(fn)
    if profiler is not None:
        profiler.enable()
        end_to_end()
        profiler.disable()
    return out


# ------------------------------------------------------------------------------------ stage 4
RSS_CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, sys.argv[1])
t_import = time.perf_counter()
from pipeline.config import load_config
from pipeline.preprocess import preprocess
t_import = time.perf_counter() - t_import
heavy = [m for m in ("torch", "dgl", "rdkit", "pymatgen") if m in sys.modules]
rss_after_import = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
workers = int(sys.argv[4])
cfg = load_config(None, [f"preprocess.workers={workers}", "preprocess.molecule.conformers=0"])
t0 = time.perf_counter()
s = preprocess([sys.argv[2]], sys.argv[3], cfg, workers=workers)
wall = time.perf_counter() - t0
print("RESULT " + json.dumps({"records": s.records, "rejected": s.rejected, "wall_s": wall,
      "import_s": t_import, "heavy_modules_at_import": heavy, "maxrss_after_import_MiB": rss_after_import,
      "self_maxrss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
      "children_maxrss_MiB": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
"""


def rss_run(src: Path, out: Path, workers: int, interval: float = 0.1) -> dict[str, Any]:
    """Preprocess ``src`` in a fresh subprocess while polling the RSS/PSS of its process tree."""
    import psutil

    if out.exists():
        shutil.rmtree(out)
    wait_for_quiet()
    proc = subprocess.Popen([sys.executable, "-c", RSS_CHILD, str(ROOT), str(src), str(out), str(workers)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=str(ROOT))
    peak = {"main_rss": 0, "worker_rss": 0, "tree_rss": 0, "tree_pss": 0, "processes": 0}
    samples = 0
    stop = threading.Event()

    def poll() -> None:
        """Sample the subprocess tree's RSS/PSS into ``peak`` every ``interval`` s until ``stop`` is set."""
        nonlocal samples
        try:
            root = psutil.Process(proc.pid)
        except psutil.NoSuchProcess:
            return
        while not stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.NoSuchProcess:
                break
            rss_sum = pss_sum = 0
            for p in procs:
                try:
                    info = p.memory_full_info()
                except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
                    continue
                rss_sum += info.rss
                pss_sum += getattr(info, "pss", info.rss)
                if p.pid == root.pid:
                    peak["main_rss"] = max(peak["main_rss"], info.rss)
                else:
                    peak["worker_rss"] = max(peak["worker_rss"], info.rss)
            peak["tree_rss"] = max(peak["tree_rss"], rss_sum)
            peak["tree_pss"] = max(peak["tree_pss"], pss_sum)
            peak["processes"] = max(peak["processes"], len(procs))
            samples += 1
            stop.wait(interval)

    thread = threading.Thread(target=poll, daemon=True)
    thread.start()
    stdout, stderr = proc.communicate()
    stop.set()
    thread.join()
    if proc.returncode != 0:
        raise RuntimeError(f"RSS subprocess failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    mib = 2.0**20
    result.update({f"peak_{k}_MiB": round(v / mib, 1) for k, v in peak.items() if k != "processes"})
    result["max_processes"] = peak["processes"]
    result["samples"] = samples
    return result


# ------------------------------------------------------------------------------------- report
def fmt(x: float, nd: int = 0) -> str:
    """``x`` with thousands separators and ``nd`` decimals."""
    return f"{x:,.{nd}f}"


def write_markdown(res: dict[str, Any], path: Path) -> None:
    """Write the results ``res`` as the Markdown report ``path``."""
    m = res["machine"]
    lines = [
        "# molmat preprocessing benchmark",
        "",
        f"- command: `{res['command']}` (cwd `{res['cwd']}`)",
        f"- date: {res['date']}",
        f"- machine: nproc={m['nproc']}, CPU: {m['cpu_model']}, memory {m['memory_GiB']} GiB, "
        f"Python {m['python']}, {m['platform']}",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in m["versions"].items()),
        f"- settings: workers={res['settings']['workers']}, repeats={res['settings']['repeats']} "
        f"({'fastest' if res['settings']['judge'] == 'best' else 'median'} repeat judged; all repeats listed), "
        f"conformers=0, QM9 N={res['settings']['qm9_n']} (tar) / {res['settings']['qm9_dir_n']} (dir), "
        f"MP M={res['settings']['mp_m']}, crystal cutoff 8 A / 12 neighbours, batch {res['settings']['batch_size']}",
        f"- machine load: load average {', '.join(f'{x:.2f}' for x in res['load_average_start'])} at start, "
        f"{', '.join(f'{x:.2f}' for x in res['load_average_end'])} at end; before each timed run the benchmark waited until "
        f"other processes used < {res['quiet_wait']['threshold']} cores (waited {res['quiet_wait']['waited_s']:.0f} s in all, "
        f"{res['quiet_wait']['timeouts']} timeouts of {res['quiet_wait']['max_wait']:.0f} s); 'other processes' below is the "
        "CPU other processes used during each timed run, in cores",
        "",
        "## Targets",
        "",
        "| # | metric | value | target | result | notes |",
        "|---|---|---:|---|---|---|",
    ]
    for row in res["summary"]:
        lines.append(f"| {row['stage']} | {row['metric']} | {row['value']} | {row['target']} | **{row['result']}** | {row['notes']} |")
    lines += ["", "## Baselines and diagnostics (same run)", "", "| metric | value | notes |", "|---|---:|---|"]
    for row in res["diagnostics"]:
        lines.append(f"| {row['metric']} | {row['value']} | {row['notes']} |")
    if res.get("profiles"):
        lines += ["", "## Profiles", ""]
        for name, prof in res["profiles"].items():
            lines += [f"### {name}", "", prof.get("what", ""), "",
                      f"Total profiled time {prof['total_s']} s. Top functions by own time:", "",
                      "| function | calls | own s | own share | cum s | cum share |", "|---|---:|---:|---:|---:|---:|"]
            for r in prof["by_tottime"]:
                lines.append(f"| `{r['function']}` | {r['calls']} | {r['tottime_s']} | {r['tottime_share']:.1%} | "
                             f"{r['cumtime_s']} | {r['cumtime_share']:.1%} |")
            lines += ["", "Top functions by cumulative time:", "",
                      "| function | calls | cum s | cum share | own s |", "|---|---:|---:|---:|---:|"]
            for r in prof["by_cumtime"]:
                lines.append(f"| `{r['function']}` | {r['calls']} | {r['cumtime_s']} | {r['cumtime_share']:.1%} | {r['tottime_s']} |")
            lines.append("")
    lines += ["", f"Repeat with: `{res['command']}`", ""]
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Run all stages, write preprocess.json and preprocess.md; returns 0 if every target passes, else 1."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--qm9-n", type=int, default=20000, help="QM9 molecules for the tar.bz2 run and the big RSS run")
    ap.add_argument("--qm9-dir-n", type=int, default=2000, help="QM9 molecules extracted to a directory (and small RSS run)")
    ap.add_argument("--mp-m", type=int, default=3000, help="MP CIFs extracted to a directory")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--judge", choices=("best", "median"), default="best",
                    help="which of the repeats is compared with the target (best = fastest, least disturbed)")
    ap.add_argument("--baseline-n", type=int, default=1000, help="records for the single-process featurise baselines")
    ap.add_argument("--profile", action="store_true", help="profile every stage, not only failing ones")
    ap.add_argument("--no-profile", action="store_true", help="never profile")
    ap.add_argument("--quick", action="store_true", help="small sizes (2000/500/300, 1 repeat) for a smoke test")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where preprocess.json/.md are written")
    ap.add_argument("--keep", action="store_true", help="keep the scratch directory")
    ap.add_argument("--quiet-threshold", type=float, default=0.3,
                    help="before each timed run, wait until other processes use fewer cores than this")
    ap.add_argument("--quiet-max-wait", type=float, default=60.0, help="longest wait for a quiet machine (s); 0 = never wait")
    args = ap.parse_args(argv)
    JUDGE["mode"] = args.judge
    QUIET.update(threshold=args.quiet_threshold, max_wait=args.quiet_max_wait)
    if args.quick:
        args.qm9_n, args.qm9_dir_n, args.mp_m, args.repeats, args.baseline_n = 2000, 500, 300, 1, 300

    command = shlex.join([os.path.relpath(sys.executable, os.getcwd()) if sys.executable.startswith(os.getcwd())
                          else sys.executable, *sys.argv])
    res: dict[str, Any] = {
        "command": command, "cwd": os.getcwd(),
        "date": _dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": machine_info(), "load_average_start": list(os.getloadavg()), "code": code_fingerprint(),
        "settings": {"qm9_n": args.qm9_n, "qm9_dir_n": args.qm9_dir_n, "mp_m": args.mp_m, "workers": args.workers,
                     "batch_size": args.batch_size, "repeats": args.repeats, "judge": args.judge, "baseline_n": args.baseline_n},
    }
    scratch = Path(tempfile.mkdtemp(prefix="molmat_bench_"))
    log(f"scratch directory {scratch}")
    summary: list[dict[str, Any]] = []
    diag: list[dict[str, Any]] = []
    profiles: dict[str, Any] = {}
    W = args.workers
    want_profile = (lambda key, value: not args.no_profile and (args.profile or judge(key, value) == "FAIL"))

    def target_text(key: str) -> str:
        """The target of ``key`` as text, e.g. ``>= 1,000 molecules/s``."""
        op, limit, unit = TARGETS[key]
        return f"{op} {fmt(limit, 1 if unit == 'x' else 0)} {unit}"

    try:
        # ---------------------------------------------------------------- setup (untimed)
        log("setup: counting QM9 archive members / preparing inputs (untimed)")
        qm9_total = reader_rate(QM9_TAR, 10**9)  # counts members; re-timed below as the reader-alone baseline
        if args.qm9_n >= qm9_total["records"]:
            qm9_src = QM9_TAR
            qm9_n = qm9_total["records"]
            qm9_src_note = f"original {QM9_TAR.name} passed directly"
        else:
            qm9_src = scratch / f"qm9_first{args.qm9_n}.xyz.tar.bz2"
            qm9_n = truncated_tar(QM9_TAR, args.qm9_n, ".xyz", qm9_src)
            qm9_src_note = f"tar.bz2 of the first {qm9_n} members of {QM9_TAR.name}, written before timing, passed directly"
        qm9_dir = scratch / "qm9_dir"
        dir_n = len(extract_first(QM9_TAR, args.qm9_dir_n, ".xyz", qm9_dir))
        qm9_small_tar = scratch / f"qm9_first{args.qm9_dir_n}.xyz.tar.bz2"
        truncated_tar(QM9_TAR, args.qm9_dir_n, ".xyz", qm9_small_tar)
        mp_dir = scratch / "mp_dir"
        mp_stems = extract_first(MP_TAR, args.mp_m, ".cif", mp_dir)
        mp_labels = mp_dir / "labels.csv"
        n_labels = write_matching_labels(mp_stems, mp_labels)
        mp_prof_dir = scratch / "mp_prof_dir"
        prof_m = min(300, len(mp_stems))
        mp_prof_dir.mkdir()
        for stem in mp_stems[:prof_m]:
            shutil.copy(mp_dir / f"{stem}.cif", mp_prof_dir / f"{stem}.cif")
        write_matching_labels(mp_stems[:prof_m], mp_prof_dir / "labels.csv")
        log(f"inputs: QM9 {qm9_n} ({qm9_src.name}), QM9 dir {dir_n}, MP dir {len(mp_stems)} CIFs ({n_labels} label rows)")

        # ---------------------------------------------------------------- stage 4: memory (run first, while this process is small:
        # ru_maxrss survives fork+exec, so a big parent would inflate the subprocess's getrusage)
        log(f"peak memory: {qm9_n} vs {args.qm9_dir_n} molecules in fresh subprocesses")
        big = rss_run(qm9_src, scratch / "rss_big", W)
        small = rss_run(qm9_small_tar, scratch / "rss_small", W)
        res["rss"] = {"big": dict(big, source=qm9_src.name, n=qm9_n),
                      "small": dict(small, source=qm9_small_tar.name, n=args.qm9_dir_n)}
        # ---------------------------------------------------------------- stage 1: QM9
        runs = []
        for k in range(args.repeats):
            r = run_preprocess(qm9_src, scratch / "qm9_tar_shards", [], W)
            log(f"QM9 tar run {k + 1}: {r['inputs']} in {r['wall_s']:.2f} s = {r['rate']:.0f}/s "
                f"(main CPU {r['main_cpu_s']:.1f} s, workers CPU {r['workers_cpu_s']:.1f} s)")
            runs.append(r)
        qm9_tar = pick_run(runs)
        runs = []
        for k in range(args.repeats):
            r = run_preprocess(qm9_dir, scratch / "qm9_dir_shards", [], W)
            log(f"QM9 dir run {k + 1}: {r['inputs']} in {r['wall_s']:.2f} s = {r['rate']:.0f}/s")
            runs.append(r)
        qm9_d = pick_run(runs)
        qm9_total = reader_rate(QM9_TAR, 10**9, repeats=args.repeats)
        qm9_read_dir = reader_rate(qm9_dir, dir_n, repeats=args.repeats)
        qm9_feat = featurise_rate(qm9_dir, args.baseline_n, [], repeats=args.repeats)
        log(f"QM9 baselines: reader tar {qm9_total['rate']:.0f}/s, reader dir {qm9_read_dir['rate']:.0f}/s, "
            f"featurise 1 process {qm9_feat['rate']:.0f}/s")
        res["qm9"] = {"tar": dict(qm9_tar, source=qm9_src_note), "dir": dict(qm9_d, source=f"directory of the first {dir_n} members, extracted before timing"),
                      "reader_only_tar": qm9_total, "reader_only_dir": qm9_read_dir, "featurise_single_process": qm9_feat}
        for key, run, label in (("qm9_tar_rate", qm9_tar, f"QM9 {qm9_n} from tar.bz2 (end to end)"),
                                ("qm9_dir_rate", qm9_d, f"QM9 {dir_n} from directory (end to end)")):
            eff = run["rate"] / (W * qm9_feat["rate"])
            summary.append({"stage": "1", "metric": label, "key": key, "value": f"{fmt(run['rate'])} mol/s",
                            "raw": run["rate"], "target": target_text(key), "result": judge(key, run["rate"]),
                            "notes": f"runs {run['all_rates']} (other processes: {run['all_foreign_cpu_cores']} cores); {run['records']} written, {run['rejected']} rejected; "
                                     f"{eff:.0%} of {W} x single-process featurise rate; CPU use {run['cpu_utilisation']:.2f} cores "
                                     f"(main {run['main_cpu_s']:.1f} s, workers {run['workers_cpu_s']:.1f} s, wall {run['wall_s']:.1f} s)"})
        diag += [
            {"metric": "QM9 reader alone, tar.bz2 (main process)", "value": f"{fmt(qm9_total['rate'])} mol/s",
             "notes": f"{qm9_total['records']} records in {qm9_total['wall_s']:.2f} s: bz2 + tar parsing, no featurisation"},
            {"metric": "QM9 reader alone, directory", "value": f"{fmt(qm9_read_dir['rate'])} mol/s",
             "notes": f"{qm9_read_dir['records']} files in {qm9_read_dir['wall_s']:.2f} s"},
            {"metric": "QM9 featurise+encode, 1 process, no I/O", "value": f"{fmt(qm9_feat['rate'])} mol/s",
             "notes": f"{qm9_feat['records']} records; ideal with {W} workers = {fmt(W * qm9_feat['rate'])} mol/s"},
        ]

        # ---------------------------------------------------------------- stage 2: MP
        runs = []
        for k in range(args.repeats):
            r = run_preprocess(mp_dir, scratch / "mp_shards", MP_OVERRIDES, W, labels=mp_labels)
            log(f"MP run {k + 1}: {r['inputs']} in {r['wall_s']:.2f} s = {r['rate']:.0f}/s")
            runs.append(r)
        mp_run = pick_run(runs)
        mp_feat = featurise_rate(mp_dir, min(args.baseline_n // 2, len(mp_stems)), MP_OVERRIDES, labels=mp_labels,
                                 repeats=args.repeats)
        log(f"MP baseline: featurise 1 process {mp_feat['rate']:.0f}/s")
        res["mp"] = {"dir": dict(mp_run, source=f"first {len(mp_stems)} CIFs of {MP_TAR.name} (archive order) + matching labels.csv"),
                     "featurise_single_process": mp_feat}
        eff = mp_run["rate"] / (W * mp_feat["rate"])
        summary.append({"stage": "2", "metric": f"MP {len(mp_stems)} CIFs from directory (end to end)", "key": "mp_rate",
                        "value": f"{fmt(mp_run['rate'], 1)} crystals/s", "raw": mp_run["rate"], "target": target_text("mp_rate"),
                        "result": judge("mp_rate", mp_run["rate"]),
                        "notes": f"runs {mp_run['all_rates']} (other processes: {mp_run['all_foreign_cpu_cores']} cores); {mp_run['records']} written, {mp_run['rejected']} rejected; "
                                 f"{eff:.0%} of {W} x single-process rate; CPU use {mp_run['cpu_utilisation']:.2f} cores"})
        diag.append({"metric": "MP featurise+encode, 1 process, no I/O", "value": f"{fmt(mp_feat['rate'], 1)} crystals/s",
                     "notes": f"{mp_feat['records']} CIFs; ideal with {W} workers = {fmt(W * mp_feat['rate'], 1)}/s"})

        # ---------------------------------------------------------------- profiles of 1/2 (before dgl/torch load)
        if want_profile("qm9_tar_rate", qm9_tar["rate"]) or want_profile("qm9_dir_rate", qm9_d["rate"]):
            log("profiling QM9 featurisation (workers=0) and the main process of a 2-worker run")
            prof = cProfile.Profile()
            featurise_rate(qm9_dir, args.baseline_n, [], profiler=prof)
            profiles["qm9_featurise_one_process"] = dict(profile_rows(prof), what=(
                f"featurize + encode_record of {args.baseline_n} QM9 records in one process (what each worker does)."))
            prof = cProfile.Profile()
            run_preprocess(qm9_src, scratch / "qm9_prof_shards", [], W, profiler=prof)
            profiles["qm9_tar_main_process"] = dict(profile_rows(prof), what=(
                f"main process of preprocess(workers={W}) on {qm9_src.name}: reading, dispatch, waiting "
                "(`acquire`/`wait`), writing shards. Worker time is not in this profile."))
        if want_profile("mp_rate", mp_run["rate"]):
            log("profiling MP featurisation (workers=0)")
            prof = cProfile.Profile()
            featurise_rate(mp_prof_dir, prof_m, MP_OVERRIDES, labels=mp_prof_dir / "labels.csv", profiler=prof)
            profiles["mp_featurise_one_process"] = dict(profile_rows(prof), what=(
                f"featurize + encode_record of {prof_m} MP CIFs in one process (what each worker does)."))

        # ---------------------------------------------------------------- stage 3: reading
        log("reading shards into batched DGL graphs (one process)")
        rb = read_benchmark(scratch / "qm9_tar_shards", args.batch_size, args.repeats)
        res["read"] = rb
        e2e = rb["end_to_end"]["rate"]
        summary.append({"stage": "3", "metric": f"shards -> DGL batches of {args.batch_size}, 1 process", "key": "read_rate",
                        "value": f"{fmt(e2e)} rec/s", "raw": e2e, "target": target_text("read_rate"),
                        "result": judge("read_rate", e2e),
                        "notes": f"{rb['records']} records, {rb['batches']} batches; runs {rb['end_to_end']['all_rates']} (other processes: {rb['end_to_end']['all_foreign_cpu_cores']} cores); decode-only {fmt(rb['decode_only']['rate'])}/s, "
                                 f"collate-only {fmt(rb['collate_only']['rate'])}/s"})
        for name, note in (("raw_lmdb_get", "ShardDataset.raw: LMDB get only"),
                           ("decode_only", "ShardDataset[i]: LMDB get + crc32 + header JSON + numpy views"),
                           ("collate_only", "pipeline.graphs.collate on records decoded beforehand"),
                           ("end_to_end", "decode + collate")):
            t_per = 1e6 / rb[name]["rate"]
            diag.append({"metric": f"read: {name}", "value": f"{fmt(rb[name]['rate'])} rec/s",
                         "notes": f"{note}; {t_per:.1f} us/record ({rb[name]['wall_s']:.2f} s for {rb['records']})"})
        log(f"read: raw {rb['raw_lmdb_get']['rate']:.0f}/s, decode {rb['decode_only']['rate']:.0f}/s, "
            f"collate {rb['collate_only']['rate']:.0f}/s, end-to-end {e2e:.0f}/s")
        if want_profile("read_rate", e2e):
            log("profiling shard reading + collate")
            prof = cProfile.Profile()
            read_benchmark(scratch / "qm9_tar_shards", args.batch_size, 1, profiler=prof)
            profiles["read_end_to_end"] = dict(profile_rows(prof), what=(
                f"one pass of ShardDataset[i] + collate in batches of {args.batch_size} over {rb['records']} records."))

        ratios = {k: big[f"peak_{k}_MiB"] / max(small[f"peak_{k}_MiB"], 1e-9)
                  for k in ("tree_rss", "tree_pss", "main_rss", "worker_rss")}
        ratios["getrusage_self"] = big["self_maxrss_MiB"] / small["self_maxrss_MiB"]
        ratios["getrusage_children"] = big["children_maxrss_MiB"] / small["children_maxrss_MiB"]
        res["rss"]["ratios"] = {k: round(v, 3) for k, v in ratios.items()}
        log(f"peak tree RSS {big['peak_tree_rss_MiB']} MiB vs {small['peak_tree_rss_MiB']} MiB (ratio {ratios['tree_rss']:.2f})")
        summary.append({"stage": "4", "metric": f"peak tree RSS, {qm9_n} vs {args.qm9_dir_n} molecules", "key": "rss_ratio",
                        "value": f"{ratios['tree_rss']:.2f}x", "raw": ratios["tree_rss"], "target": target_text("rss_ratio"),
                        "result": judge("rss_ratio", ratios["tree_rss"]),
                        "notes": f"{big['peak_tree_rss_MiB']} vs {small['peak_tree_rss_MiB']} MiB (main + {W} workers, summed); "
                                 f"PSS {big['peak_tree_pss_MiB']} vs {small['peak_tree_pss_MiB']} MiB ({ratios['tree_pss']:.2f}x); "
                                 f"main {big['peak_main_rss_MiB']} vs {small['peak_main_rss_MiB']} MiB ({ratios['main_rss']:.2f}x); "
                                 f"largest worker {big['peak_worker_rss_MiB']} vs {small['peak_worker_rss_MiB']} MiB ({ratios['worker_rss']:.2f}x)"})
        for label, r in (("big", big), ("small", small)):
            diag.append({"metric": f"memory run, {r['records'] + r['rejected']} molecules",
                         "value": f"{r['peak_tree_rss_MiB']} MiB",
                         "notes": f"tree RSS peak; getrusage maxrss self {r['self_maxrss_MiB']:.1f} MiB, children "
                                  f"{r['children_maxrss_MiB']:.1f} MiB; {r['samples']} samples, wall {r['wall_s']:.1f} s "
                                  f"(includes polling overhead); importing pipeline.preprocess took {r['import_s']:.2f} s, "
                                  f"loaded {', '.join(r['heavy_modules_at_import']) or 'no heavy modules'}, "
                                  f"maxrss after import {r['maxrss_after_import_MiB']:.0f} MiB"})
    finally:
        if args.keep:
            log(f"kept scratch directory {scratch}")
        else:
            shutil.rmtree(scratch, ignore_errors=True)

    res["load_average_end"] = list(os.getloadavg())
    res["quiet_wait"] = dict(QUIET)
    res["summary"] = summary
    res["diagnostics"] = diag
    res["profiles"] = profiles
    res["all_pass"] = all(r["result"] == "PASS" for r in summary)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "preprocess.json").write_text(json.dumps(res, indent=1) + "\n")
    write_markdown(res, args.out / "preprocess.md")
    print()
    for row in summary:
        print(f"{row['result']:4}  {row['metric']}: {row['value']} (target {row['target']})")
    log(f"wrote {args.out / 'preprocess.json'} and {args.out / 'preprocess.md'}")
    return 0 if res["all_pass"] else 1


if __name__ == "__main__":
    sys.exit(main())
