#!/usr/bin/env python3
"""Electron-density model: held-out accuracy, electron counts, speed against PySCF (issue 12).

One run, on this machine, measures for a trained density model (``--run``: a run or model
directory, or a shipped model's name such as ``qm9-density``) and the density shards it was
trained on (``--shards``: their ``split.json`` test split is held out):

1. ``eval``: ``molmat evaluate RUN --data SHARDS --split test`` on every test molecule (full
   grids, the model's default ``density.grid_stride``): NMAE pooled over every grid point and
   averaged over molecules (min, median, max), the promolecule alone (the baseline the network
   corrects), and electron counts: the prediction's Riemann sum against the label grid's own
   (|N_pred - N_true| / N_true) and against sum Z. Then, in Python
   (:func:`finetune.density.predict_on_grid`), the first ``--direct-subset`` test molecules at
   grid stride 1 (every point through the network), 2 and 3: NMAE, its change against stride 1,
   and seconds per molecule; what the interpolation of the default stride costs and gains.
2. ``baseline``: two ``molmat finetune`` runs at the same wall-clock budget
   (``--baseline-minutes``, one torch thread each, ``--jobs`` side by side), with
   ``density.baseline=promolecule`` and ``none``, each evaluated on the test split.
3. ``pyscf``: the first ``--pyscf-molecules`` test molecules written as xyz files and labelled
   afresh by ``molmat density-labels`` (PySCF, the project's default settings; one molecule per
   command and one worker process with ``--threads`` threads, and again with one thread for the
   per-core comparison), the whole command timed and the SCF and grid
   seconds read from its ``labels.jsonl``; then ``molmat predict RUN --grid-like CUBE`` on that
   cube at the model's default stride and at stride 1 (``--threads`` threads), and at the
   default stride on one thread; speed-ups of the whole commands and of the compute alone (SCF
   + grid against the model's own "model evaluation" seconds), the grid size, and the NMAE of
   each prediction against the fresh PySCF cube.
4. ``reference``: the real reference densities of ``/work/shared/data/density``: the two PBE
   valence grids ``qm9_pbe_grid_00000{1,2}`` (CH4, NH3; 8 valence electrons: the model predicts
   total densities with the core, so the NMAE there is dominated by the 1s electrons) and the
   Psi4 NH3 cube (total density, another code and basis): NMAE, electron counts and the
   promolecule's NMAE, at the default stride and at stride 1.

Usage::

    nice -n 19 .venv/bin/python bench/bench_density.py --run RUN --shards SHARDS            # full run
    nice -n 19 .venv/bin/python bench/bench_density.py --run RUN --shards SHARDS --baseline-minutes 0.2 \\
        --direct-subset 1 --pyscf-molecules 1 --eval-limit 2 --work /tmp/db --results /tmp/db/res    # smoke
    .venv/bin/python bench/bench_density.py --report-only              # rewrite density.md from density.json

Every expensive output lives under ``--work`` and is reused when complete (a killed benchmark
resumes; a training run killed mid-way resumes from its ``last.pt``); every command is recorded.
A step left out with ``--skip`` keeps its section from an earlier ``density.json`` of the same
model and shards. Writes ``density.json`` and ``density.md`` into ``--results``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
MOLMAT = str(ROOT / ".venv" / "bin" / "molmat")
PYTHON = str(ROOT / ".venv" / "bin" / "python")
REF_DIR = Path("/work/shared/data/density")
#: The reference densities of REF_DIR: name -> (path relative to REF_DIR, what the README says it holds).
REFERENCES = {
    "qm9_pbe_grid_000001": ("qm9_pbe_grid_000001", "CH4, PBE valence density (8 e), uniform grid"),
    "qm9_pbe_grid_000002": ("qm9_pbe_grid_000002", "NH3, PBE valence density (8 e), uniform grid"),
    "nh3_psi4_density": ("nh3_psi4_density.cube", "NH3, Psi4 total density (10 e), Gaussian cube"),
}
STEPS = ("eval", "baseline", "pyscf", "reference")
#: Targets the report sets the measurements against (the issue's goals and a literature value).
NMAE_TARGET = 1.0
DEEPDFT_NMAE = 0.3
DEEPDFT_MOLECULES = "124k"
ELECTRON_TARGET = 1.0
SPEEDUP_TARGET = 20.0
PREDICT_RE = re.compile(r"model evaluation ([0-9.]+) s, ([0-9,]+|inf) probes/s")


def log(msg: str) -> None:
    """Time-stamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def _f(v: Any, spec: str = ".3f") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def _median(values: list[float]) -> float:
    values = sorted(v for v in values if v is not None and math.isfinite(v))
    if not values:
        return math.nan
    n = len(values)
    return values[n // 2] if n % 2 else 0.5 * (values[n // 2 - 1] + values[n // 2])


def _safe(rid: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in rid) or "structure"


# ------------------------------------------------------------------------------ commands
class Runner:
    """Runs commands (recording each), with a thread count, output appended to a log file."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.commands: list[dict[str, Any]] = []

    def record(self, step: str, cmd: list[str], env: dict[str, str], reused: bool, note: str = "") -> str:
        """Record a command as it would be typed (``molmat ...``, ``python bench/...``)."""
        prefix = " ".join(f"{k}={v}" for k, v in env.items())
        text = (prefix + " " if prefix else "") + shlex.join(_shown(cmd))
        self.commands.append({"step": step, "command": text, "reused": reused, **({"note": note} if note else {})})
        return text

    def describe(self, step: str, text: str, reused: bool) -> None:
        """Record work done in the benchmark's own process (a Python call, not a command)."""
        self.commands.append({"step": step, "command": text, "reused": reused, "note": "in the benchmark's process"})

    def call(self, step: str, cmd: list[str], logf: Path, threads: int | None = None,
             env: dict[str, str] | None = None) -> dict[str, Any]:
        """Run ``cmd`` (molmat or python), appending its output to ``logf``.

        Returns ``rc``, ``wall_s`` (whole command, start-up included), ``cpu_s`` (user + system of
        the process and its reaped children), ``output`` (what it printed).
        """
        extra = dict(env or {})
        if threads is not None:
            extra.setdefault("OMP_NUM_THREADS", str(threads))
        text = self.record(step, cmd, extra, reused=False)
        logf.parent.mkdir(parents=True, exist_ok=True)
        with open(logf, "a") as fh:
            fh.write(f"\n$ {text}\n")
            fh.flush()
            start = fh.tell()
            t0 = time.perf_counter()
            proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, **extra}, cwd=ROOT)
            _, status, usage = os.wait4(proc.pid, 0)
            wall = time.perf_counter() - t0
            proc.returncode = os.waitstatus_to_exitcode(status)
        with open(logf) as fh:
            fh.seek(start)
            output = fh.read()
        return {"rc": proc.returncode, "wall_s": wall, "cpu_s": usage.ru_utime + usage.ru_stime, "output": output}


def model_stamp(run: str) -> str:
    """The model directory and the newest mtime of its files: cached results are reused only for the same model."""
    from pipeline.checkpoint import resolve_model_dir

    d = resolve_model_dir(run).resolve()
    return f"{d}@{max((p.stat().st_mtime for p in d.iterdir() if p.is_file()), default=0.0)}"


def _shown(cmd: list[str]) -> list[str]:
    """A command as typed in the repository root: ``molmat ...``, ``python bench/bench_density.py ...``."""
    if cmd and cmd[0] == MOLMAT:
        return ["molmat", *cmd[1:]]
    if cmd and cmd[0] == PYTHON:
        return ["python", *[os.path.relpath(c, ROOT) if c == os.path.abspath(__file__) else c for c in cmd[1:]]]
    return list(cmd)


# --------------------------------------------------------------------------- data helpers
def record_metas(shards: Path, indices: list[int] | None = None) -> dict[int, dict[str, str]]:
    """The string metadata (id, smiles, source, ...) of records, read from their headers only."""
    import struct

    from pipeline.shards import ShardDataset

    ds = ShardDataset(shards)
    out = {}
    for i in (range(ds.total) if indices is None else indices):
        buf = ds.raw(int(i))
        (hlen,) = struct.unpack_from("<I", buf, 4)
        out[int(i)] = json.loads(bytes(buf[8:8 + hlen]))["meta"]
    return out


def model_facts(run: str, shards: Path) -> dict[str, Any]:
    """What the model is, what it was trained on, and whether the test split of ``shards`` is held out."""
    from pipeline.checkpoint import read_model_config, resolve_model_dir
    from pipeline.splits import load_split

    model_dir, cfg = read_model_config(run)
    from pipeline.config import DensityConfig

    dcfg = DensityConfig.model_validate(cfg.get("density") or {})   # the defaults for settings it predates
    facts: dict[str, Any] = {"run": run, "model_dir": str(model_dir.resolve()), "format": cfg.get("format"),
                             "model": cfg.get("model"), "baseline": (cfg.get("model") or {}).get("baseline"),
                             "content": cfg.get("content"), "trained_on": cfg.get("trained_on"),
                             "grid_stride": dcfg.grid_stride, "direct_radius": dcfg.direct_radius}
    run_dir = resolve_model_dir(run).parent if resolve_model_dir(run).name == "best" else None
    if run_dir is not None and (run_dir / "result.json").exists():
        facts["training"] = json.loads((run_dir / "result.json").read_text())
        if (run_dir / "timing.json").exists():
            t = json.loads((run_dir / "timing.json").read_text())
            facts["training"].update({k: t.get(k) for k in ("graphs_per_s", "torch_threads", "world_size")})
    split = load_split(shards)
    test = list(split["test"])
    metas = record_metas(shards)
    facts["shards"] = {"path": str(shards), "records": len(metas), "train": len(split["train"]),
                       "val": len(split["val"]), "test": len(test), "split_method": split.get("method"),
                       "split_seed": split.get("seed")}
    from pipeline.checkpoint import data_identity

    trained_on = Path(cfg["trained_on"]) if cfg.get("trained_on") else None
    # the same shards by path, or by content (a shipped model names its data in words, with its identity)
    same = (trained_on is not None and trained_on.resolve() == shards.resolve()) or \
        (cfg.get("data") is not None and cfg["data"] == data_identity(shards))
    held: dict[str, Any] = {"same_shards": same}
    seen_ids: set[str] = set()
    seen_smiles: set[str] = set()
    if same:
        seen = list(split["train"]) + list(split["val"])
        held["train_records"] = len(split["train"])
    elif trained_on is not None and (trained_on / "split.json").exists():
        other = load_split(trained_on)
        seen = list(other["train"]) + list(other["val"])
        held["train_records"] = len(other["train"])
        other_metas = record_metas(trained_on, seen)
        seen_ids = {m.get("id", "") for m in other_metas.values()}
        seen_smiles = {m.get("smiles", "") for m in other_metas.values()}
    else:
        seen = []
        held["note"] = f"the model's training shards ({trained_on}) are not here: cannot check the test split is unseen"
    if same:
        seen_ids = {metas[i].get("id", "") for i in seen}
        seen_smiles = {metas[i].get("smiles", "") for i in seen}
    test_ids = [metas[i].get("id", "") for i in test]
    held["test_ids_seen_in_training"] = sorted(set(test_ids) & seen_ids) if seen_ids else []
    held["test_held_out"] = bool(seen_ids) and not held["test_ids_seen_in_training"]
    facts["held_out"] = held
    facts["_seen_smiles"] = sorted(seen_smiles)
    return facts


# ------------------------------------------------------------------------------ 1. evaluate
def eval_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """Headline numbers of a density ``metrics.json``."""
    s = metrics["structures"]
    o = metrics["overall"]
    nmae = [x["nmae_percent"] for x in s]
    pro = [x["promolecule_nmae_percent"] for x in s if x.get("promolecule_nmae_percent") is not None]
    vs_true = [100 * abs(x["electrons_pred"] - x["electrons_true"]) / x["electrons_true"] for x in s]
    signed_true = [100 * (x["electrons_pred"] - x["electrons_true"]) / x["electrons_true"] for x in s]
    exp = [x for x in s if x.get("electrons_expected")]
    vs_z = [100 * abs(x["electrons_pred"] - x["electrons_expected"]) / x["electrons_expected"] for x in exp]
    label_vs_z = [100 * (x["electrons_true"] - x["electrons_expected"]) / x["electrons_expected"] for x in exp]
    pro_vs_true = [100 * abs(x["electrons_promolecule"] - x["electrons_true"]) / x["electrons_true"] for x in s
                   if x.get("electrons_promolecule") is not None]
    return {
        "records": metrics["records"], "points": o.get("points"), "content": metrics.get("content"),
        "baseline": metrics.get("baseline"), "grid_stride": metrics.get("grid_stride"),
        "direct_radius": metrics.get("direct_radius"), "seconds": metrics.get("seconds"),
        "points_per_second": metrics.get("points_per_second"),
        "seconds_per_molecule": metrics["seconds"] / max(metrics["records"], 1) if metrics.get("seconds") else None,
        "nmae_percent": o["nmae_percent"], "nmae_mean_percent": o["nmae_mean_percent"],
        "nmae_min_percent": min(nmae), "nmae_median_percent": _median(nmae), "nmae_max_percent": max(nmae),
        "worst_id": s[nmae.index(max(nmae))]["id"], "best_id": s[nmae.index(min(nmae))]["id"],
        "mae": o.get("mae"), "rmse": o.get("rmse"),
        "promolecule_nmae_percent": o.get("promolecule_nmae_percent"),
        "promolecule_nmae_mean_percent": _mean(pro) if pro else None,
        "electrons_abs_error_mean": o.get("electrons_abs_error_mean"),
        "electrons_rel_error_mean_percent": _mean(vs_true), "electrons_rel_error_max_percent": max(vs_true),
        "electrons_signed_error_mean_percent": _mean(signed_true),
        "electrons_within_1pct": sum(v <= ELECTRON_TARGET for v in vs_true),
        "electrons_vs_sum_z_mean_percent": _mean(vs_z) if vs_z else None,
        "electrons_vs_sum_z_max_percent": max(vs_z) if vs_z else None,
        "label_grid_vs_sum_z_mean_percent": _mean(label_vs_z) if label_vs_z else None,
        "label_grid_vs_sum_z_min_percent": min(label_vs_z) if label_vs_z else None,
        "label_grid_vs_sum_z_max_percent": max(label_vs_z) if label_vs_z else None,
        "promolecule_electrons_rel_error_mean_percent": _mean(pro_vs_true) if pro_vs_true else None,
    }


def in_process_model(run: str, threads: int, cache_file: Path) -> tuple[Any, Any, str, dict[str, Any]]:
    """For a step run in this process: torch on ``threads`` threads, the model (CPU) with its density
    settings and :func:`model_stamp`, and the step's cache of finished results (a dict, empty if new)."""
    import torch

    from finetune.density import density_settings
    from pipeline.checkpoint import DENSITY_MODEL, load_model_dir

    torch.set_num_threads(threads)
    model = load_model_dir(run, [DENSITY_MODEL], "cpu")
    cache = json.loads(cache_file.read_text()) if cache_file.exists() else {}
    return model, density_settings(model), model_stamp(run), cache


def run_evaluation(runner: Runner, step: str, run: str, shards: Path, out: Path, threads: int, limit: int | None,
                   logf: Path) -> dict[str, Any]:
    """``molmat evaluate`` on the test split (or its first ``limit`` molecules), reused when complete."""
    stamp = {"model": model_stamp(run), "shards": str(shards.resolve()), "split": "test", "limit": limit}
    stamp_file, metrics_file = out / "bench_stamp.json", out / "metrics.json"
    cmd = [MOLMAT, "evaluate", run, "--data", str(shards), "--split", "test", "--out", str(out),
           "--set", f"train.threads={threads}"] + (["--limit", str(limit)] if limit is not None else [])
    if metrics_file.exists() and stamp_file.exists() and json.loads(stamp_file.read_text()) == stamp:
        runner.record(step, cmd, {"OMP_NUM_THREADS": str(threads)}, reused=True)
        call = None
    else:
        stamp_file.unlink(missing_ok=True)
        log(f"{step}: evaluating {run} on the test split of {shards}" + (f" (first {limit})" if limit else ""))
        load = _loadavg()
        call = runner.call(step, cmd, logf, threads)
        if call["rc"] != 0 or not metrics_file.exists():
            return {"error": f"evaluate failed (exit {call['rc']}), log {logf}"}
        stamp_file.write_text(json.dumps(stamp))
        (out / "bench_call.json").write_text(json.dumps({"wall_s": call["wall_s"], "cpu_s": call["cpu_s"],
                                                         "loadavg_start": load, "threads": threads}))
    metrics = json.loads(metrics_file.read_text())
    summary = eval_summary(metrics)
    call_info = json.loads((out / "bench_call.json").read_text()) if (out / "bench_call.json").exists() else {}
    return {"summary": summary, "metrics": str(metrics_file), "limit": limit, "threads": threads,
            "command_wall_s": call_info.get("wall_s"), "loadavg_start": call_info.get("loadavg_start"),
            "structures": [{k: x.get(k) for k in ("id", "atoms", "points", "nmae_percent", "promolecule_nmae_percent",
                                                  "electrons_true", "electrons_pred", "electrons_expected",
                                                  "electrons_promolecule")} for x in metrics["structures"]]}


def direct_subset(runner: Runner, run: str, shards: Path, k: int, threads: int, work: Path,
                  eval_structures: list[dict[str, Any]] | None) -> dict[str, Any]:
    """The first ``k`` test molecules at grid strides 1, 2 and 3 (in this process, ``threads`` threads)."""
    import numpy as np

    from finetune.density import predict_on_grid
    from pipeline import records as R
    from pipeline.cube import BOHR_ANGSTROM
    from pipeline.shards import ShardDataset
    from pipeline.splits import load_split

    cache_file = work / "direct_subset.json"
    model, settings, stamp, cache = in_process_model(run, threads, cache_file)
    strides = sorted({1, 2, 3, settings.grid_stride})
    test = list(load_split(shards)["test"])[:k]
    ds = ShardDataset(shards, test)
    computed = 0
    by_id = {s["id"]: s for s in (eval_structures or [])}
    rows = []
    for i in range(len(ds)):
        rec = ds[i]
        rid = str(rec[R.ID])
        true = np.asarray(rec[R.GRID_VALUES], dtype=np.float64)
        voxel = abs(float(np.linalg.det(np.asarray(rec[R.GRID_AXES], dtype=np.float64)))) / BOHR_ANGSTROM ** 3
        for stride in strides:
            key = f"{rid}|{stride}|{threads}|{settings.direct_radius}|{settings.direct_radius_hydrogen}|{stamp}"
            if key not in cache:
                load = _loadavg()
                t0 = time.perf_counter()
                pred, info = predict_on_grid(model, rec, rec[R.GRID_ORIGIN], rec[R.GRID_AXES], rec[R.GRID_SHAPE],
                                             stride, settings.direct_radius, "cpu", settings.direct_radius_hydrogen,
                                             settings.max_coarse_step)
                seconds = time.perf_counter() - t0
                cache[key] = {"id": rid, "atoms": int(len(rec[R.Z])), "points": int(len(true)), "stride": stride,
                              "seconds": seconds, "abs_sum": float(np.abs(pred - true).sum()),
                              "true_sum": float(true.sum()), "nmae_percent": 100 * float(np.abs(pred - true).sum()
                                                                                       / true.sum()),
                              "electrons_pred": float(pred.sum() * voxel), "electrons_true": float(true.sum() * voxel),
                              "network_points": int(info["network_points"]), "loadavg_1min": load[0]}
                cache_file.write_text(json.dumps(cache, indent=1))
                computed += 1
                log(f"eval: {rid} stride {stride}: NMAE {cache[key]['nmae_percent']:.3f}% in {seconds:.1f} s")
            row = dict(cache[key])
            row["nmae_in_evaluate"] = by_id.get(rid, {}).get("nmae_percent")
            rows.append(row)
    runner.describe("eval", f"finetune.density.predict_on_grid(model, record, origin, axes, shape, stride, "
                    f"direct_radius={settings.direct_radius}) on the first {k} test records of {shards}, stride in "
                    f"{strides}, torch threads {threads}", reused=computed == 0)
    per_stride = {}
    for stride in strides:
        sel = [r for r in rows if r["stride"] == stride]
        ref = {r["id"]: r for r in rows if r["stride"] == 1}
        diffs = [r["nmae_percent"] - ref[r["id"]]["nmae_percent"] for r in sel]
        t1 = sum(ref[r["id"]]["seconds"] for r in sel)
        ts = sum(r["seconds"] for r in sel)
        per_stride[str(stride)] = {
            "molecules": len(sel), "nmae_percent": 100 * sum(r["abs_sum"] for r in sel) / sum(r["true_sum"] for r in sel),
            "nmae_mean_percent": _mean([r["nmae_percent"] for r in sel]),
            "diff_vs_stride1_mean_percent": _mean(diffs), "diff_vs_stride1_max_abs_percent": max(abs(d) for d in diffs),
            "seconds_per_molecule": ts / len(sel), "speedup_vs_stride1": t1 / ts if ts > 0 else math.nan,
            "network_fraction": sum(r["network_points"] for r in sel) / sum(r["points"] for r in sel),
            "electrons_rel_error_mean_percent": _mean([100 * abs(r["electrons_pred"] - r["electrons_true"])
                                                       / r["electrons_true"] for r in sel])}
        per_stride[str(stride)]["nmae_pooled_diff_vs_stride1_percent"] = \
            per_stride[str(stride)]["nmae_percent"] - 100 * sum(ref[r["id"]]["abs_sum"] for r in sel) / \
            sum(ref[r["id"]]["true_sum"] for r in sel)
    return {"molecules": k, "threads": threads, "default_stride": settings.grid_stride,
            "direct_radius": settings.direct_radius, "strides": per_stride, "rows": rows}


# ------------------------------------------------------------------------------ 2. baseline
def _trained(run: Path) -> bool:
    path = run / "result.json"
    return path.exists() and json.loads(path.read_text()).get("stopped_by") != "signal"


def baseline_job(runner: Runner, job: dict[str, Any]) -> dict[str, Any]:
    """Train one model at the budget (reusing a finished run, resuming a killed one) and evaluate it."""
    run, shards, work = Path(job["run"]), Path(job["shards"]), Path(job["work"])
    logf = work / "logs" / f"{run.name}.log"
    out: dict[str, Any] = {"run_dir": str(run), "baseline": job["baseline"]}
    sets = [f"density.baseline={job['baseline']}", f"train.max_minutes={job['minutes']}", "train.epochs=1000",
            "train.patience=null", "train.threads=1", *job["sets"]]
    cmd = [MOLMAT, "finetune", "--data", str(shards), "--out", str(run)] + [a for s in sets for a in ("--set", s)]
    if not _trained(run):
        log(f"baseline: training {run.name} ({job['minutes']} min)")
        call = runner.call("baseline", cmd, logf, 1)
        if call["rc"] != 0 or not _trained(run):
            return {**out, "error": f"finetune failed (exit {call['rc']}), log {logf}"}
    else:
        runner.record("baseline", cmd, {"OMP_NUM_THREADS": "1"}, reused=True)
    result = json.loads((run / "result.json").read_text())
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    budget = None
    if (run / "config.resolved.yaml").exists():
        import yaml

        budget = ((yaml.safe_load((run / "config.resolved.yaml").read_text()) or {}).get("train") or {}).get("max_minutes")
    out.update(best_val_nmae_percent=result.get("best_metric"), best_epoch=result.get("best_epoch"),
               epochs=result.get("epochs_run"), steps=result.get("steps"), stopped_by=result.get("stopped_by"),
               train_seconds=result.get("seconds"), graphs_per_s=timing.get("graphs_per_s"),
               graphs=timing.get("graphs"), max_minutes_as_run=budget)
    ev = run_evaluation(runner, "baseline", str(run), shards, run / "eval_test", 1, job["limit"], logf)
    if "error" in ev:
        return {**out, "error": ev["error"]}
    out["test"] = ev["summary"]
    log(f"baseline: {run.name}: test NMAE {ev['summary']['nmae_percent']:.3f}%")
    return out


# --------------------------------------------------------------------------------- 3. PySCF
def _write_xyz(path: Path, rec: dict[str, Any], comment: str) -> None:
    from pipeline.elements import element_symbol

    lines = [str(len(rec["z"])), comment]
    for z, p in zip(rec["z"].tolist(), rec["pos"].tolist()):
        lines.append(f"{element_symbol(int(z))} {p[0]!r} {p[1]!r} {p[2]!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def _last_label(out: Path) -> dict[str, Any] | None:
    path = out / "labels.jsonl"
    if not path.exists():
        return None
    lines = [ln for ln in path.read_text().splitlines() if ln.strip()]
    return json.loads(lines[-1]) if lines else None


def _nmae(pred: Any, true: Any) -> float:
    import numpy as np

    pred = np.asarray(pred, dtype=np.float64).reshape(-1)
    true = np.asarray(true, dtype=np.float64).reshape(-1)
    return 100.0 * float(np.abs(pred - true).sum() / np.abs(true).sum())


def pyscf_molecule(runner: Runner, run: str, shards: Path, rec: dict[str, Any], threads: int, work: Path,
                   predict_variants: list[tuple[str, int | None, int]]) -> dict[str, Any]:
    """density-labels on one test molecule, then molmat predict on its fresh cube (each variant)."""
    import numpy as np

    from pipeline.cube import read_cube, voxel_volume_bohr3

    rid = _safe(str(rec["_id"]))
    xyz = work / "pyscf_in" / f"{rid}.xyz"
    out = work / "pyscf" / rid
    logf = work / "logs" / f"pyscf_{rid}.log"
    _write_xyz(xyz, rec, f"{rec['_id']} from {shards} (test split, index {rec['_index']}), Angstrom")
    def label(out: Path, t: int) -> tuple[dict[str, Any], dict[str, Any]] | dict[str, Any]:
        """density-labels of the molecule on ``t`` threads (one worker process), timed, reused if done."""
        cmd = [MOLMAT, "density-labels", str(xyz), "--out", str(out), "--workers", "1", "--threads", str(t)]
        timing_file = out / "bench_timing.json"
        entry = _last_label(out)
        timing = json.loads(timing_file.read_text()) if timing_file.exists() else {}
        # reused only when made by this very command (an older one ran density-labels' own thread layout)
        if timing.get("cmd") == _shown(cmd) and entry and (out / entry["cube"]).exists():
            runner.record("pyscf", cmd, {"OMP_NUM_THREADS": str(t)}, reused=True)
            return timing, entry
        if out.exists():
            shutil.rmtree(out)   # a half-done labelling of ours: its time would not be the whole command's
        log(f"pyscf: density-labels {rid} ({t} thread(s))")
        load = _loadavg()
        call = runner.call("pyscf", cmd, logf, t)
        entry = _last_label(out)
        if call["rc"] != 0 or not entry or not (out / entry["cube"]).exists():
            failures = (out / "failures.jsonl").read_text() if (out / "failures.jsonl").exists() else ""
            return {"id": rid, "error": f"density-labels failed (exit {call['rc']}) {failures.strip()[:300]}; log {logf}"}
        timing = {"wall_s": call["wall_s"], "cpu_s": call["cpu_s"], "loadavg_start": load, "threads_env": t,
                  "cmd": _shown(cmd)}
        timing_file.write_text(json.dumps(timing))
        return timing, entry

    # the same cores as the model's default variant, and one thread (the per-core comparison)
    done = label(out, threads)
    if isinstance(done, dict):
        return done
    timing, entry = done
    one = label(work / "pyscf_t1" / rid, 1) if threads != 1 else done
    if isinstance(one, dict):
        return one
    cube_path = out / entry["cube"]
    fresh = read_cube(cube_path)
    ref_values = np.asarray(fresh.values, dtype=np.float64).reshape(-1)
    voxel = voxel_volume_bohr3(fresh)
    row: dict[str, Any] = {
        "id": rid, "atoms": int(len(rec["z"])), "sum_z": int(np.asarray(rec["z"]).sum()), "smiles": rec.get("_smiles"),
        "shape": entry.get("shape"), "points": int(ref_values.size), "cube": str(cube_path),
        "pyscf_wall_s": timing["wall_s"], "pyscf_cpu_s": timing["cpu_s"], "pyscf_loadavg_start": timing["loadavg_start"],
        "scf_s": entry.get("scf_seconds"), "grid_s": entry.get("grid_seconds"), "scf_cycles": entry.get("scf_cycles"),
        "pyscf_threads": threads, "pyscf_t1_wall_s": one[0]["wall_s"], "scf_t1_s": one[1].get("scf_seconds"),
        "grid_t1_s": one[1].get("grid_seconds"),
        "level": entry.get("level"), "electrons_pyscf_uniform": entry.get("electrons_uniform_grid"),
        "electrons_pyscf_dft_grid": entry.get("electrons_dft_grid"), "pyscf": entry.get("pyscf")}
    # the fresh cube against the shard's own label grid (same molecule, same settings if the shards used the defaults)
    label = np.asarray(rec["grid_values"], dtype=np.float64)
    if tuple(int(n) for n in rec["grid_shape"]) == tuple(int(n) for n in fresh.shape) and \
            np.allclose(np.asarray(rec["grid_origin"]), fresh.origin, atol=1e-4):
        row["nmae_fresh_vs_shard_label_percent"] = _nmae(ref_values, label)
    row["predict"] = {}
    for name, stride, t in predict_variants:
        pred_path = work / "pred" / f"{rid}_{name}.cube"
        tfile = pred_path.with_suffix(".json")
        pcmd = [MOLMAT, "predict", run, "--grid-like", str(cube_path), "--out", str(pred_path),
                "--set", f"train.threads={t}"] + (["--grid-stride", str(stride)] if stride is not None else [])
        done = json.loads(tfile.read_text()) if tfile.exists() and pred_path.exists() else {}
        if done.get("cube_mtime") == cube_path.stat().st_mtime and done.get("model") == model_stamp(run):
            runner.record("pyscf", pcmd, {"OMP_NUM_THREADS": str(t)}, reused=True)
            p = json.loads(tfile.read_text())
        else:
            pred_path.unlink(missing_ok=True)
            log(f"pyscf: predict {rid} ({name})")
            load = _loadavg()
            call = runner.call("pyscf", pcmd, work / "logs" / f"predict_{rid}.log", t)
            m = PREDICT_RE.search(call["output"])
            if call["rc"] != 0 or not pred_path.exists() or not m:
                row["predict"][name] = {"error": f"predict failed (exit {call['rc']}): {call['output'][-300:]}"}
                continue
            p = {"wall_s": call["wall_s"], "cpu_s": call["cpu_s"], "model_s": float(m.group(1)),
                 "probes_per_s": float(m.group(2).replace(",", "")) if m.group(2) != "inf" else math.inf,
                 "loadavg_start": load, "threads": t, "stride": stride, "cube_mtime": cube_path.stat().st_mtime,
                 "model": model_stamp(run)}
            tfile.write_text(json.dumps(p))
        pred = read_cube(pred_path)
        pv = np.asarray(pred.values, dtype=np.float64).reshape(-1)
        p = {**p, "nmae_vs_pyscf_percent": _nmae(pv, ref_values), "electrons_pred": float(pv.sum() * voxel)}
        # against PySCF on as many threads as the model had
        same = "" if t == threads else "_t1"
        p["speedup_wall"] = row[f"pyscf{same}_wall_s"] / p["wall_s"]
        p["speedup_compute"] = (row[f"scf{same}_s"] + row[f"grid{same}_s"]) / p["model_s"] if p["model_s"] > 0 \
            else math.inf
        p["speedup_scf_only"] = row[f"scf{same}_s"] / p["model_s"] if p["model_s"] > 0 else math.inf
        row["predict"][name] = p
    row["electrons_pyscf_cube"] = float(ref_values.sum() * voxel)
    return row


def pyscf_picks(test: list[int], n: int) -> list[int]:
    """``n`` test records spread evenly over the test split (the middle of each of ``n`` equal parts).

    QM9 numbers its molecules roughly by size, so the first test records are the smallest
    molecules, the ones PySCF is fastest on; an even spread covers the sizes of the split.
    """
    n = min(n, len(test))
    return [test[int((i + 0.5) * len(test) / n)] for i in range(n)]


def pyscf_step(runner: Runner, run: str, shards: Path, n: int, threads: int, work: Path,
               default_stride: int) -> dict[str, Any]:
    from pipeline.shards import ShardDataset
    from pipeline.splits import load_split

    test = pyscf_picks(list(load_split(shards)["test"]), n)
    ds = ShardDataset(shards, test)
    variants: list[tuple[str, int | None, int]] = [(f"default_t{threads}", None, threads),
                                                   (f"stride1_t{threads}", 1, threads)]
    if threads != 1:
        variants.append(("default_t1", None, 1))
    rows = [pyscf_molecule(runner, run, shards, ds[i], threads, work, variants) for i in range(len(ds))]
    ok = [r for r in rows if "error" not in r]
    summary: dict[str, Any] = {}
    for name, stride, t in variants:
        sel = [r for r in ok if "error" not in r["predict"].get(name, {"error": 1})]
        if not sel:
            continue
        same = "" if t == threads else "_t1"
        pw = sum(r[f"pyscf{same}_wall_s"] for r in sel)
        pc = sum(r[f"scf{same}_s"] + r[f"grid{same}_s"] for r in sel)
        ps = sum(r[f"scf{same}_s"] for r in sel)
        mw = sum(r["predict"][name]["wall_s"] for r in sel)
        mm = sum(r["predict"][name]["model_s"] for r in sel)
        summary[name] = {
            "stride": stride if stride is not None else default_stride, "threads": t, "molecules": len(sel),
            "pyscf_wall_s_mean": pw / len(sel), "pyscf_compute_s_mean": pc / len(sel), "scf_s_mean": ps / len(sel),
            "predict_wall_s_mean": mw / len(sel), "model_s_mean": mm / len(sel),
            "speedup_wall": pw / mw, "speedup_compute": pc / mm if mm > 0 else math.inf,
            "speedup_scf_only": ps / mm if mm > 0 else math.inf,
            "speedup_wall_min": min(r["predict"][name]["speedup_wall"] for r in sel),
            "speedup_wall_max": max(r["predict"][name]["speedup_wall"] for r in sel),
            "speedup_compute_min": min(r["predict"][name]["speedup_compute"] for r in sel),
            "speedup_compute_max": max(r["predict"][name]["speedup_compute"] for r in sel),
            "nmae_vs_pyscf_percent_mean": _mean([r["predict"][name]["nmae_vs_pyscf_percent"] for r in sel]),
            "probes_per_s_mean": _mean([r["predict"][name]["probes_per_s"] for r in sel])}
    return {"molecules": len(test), "threads": threads, "variants": [v[0] for v in variants], "rows": rows,
            "summary": summary, "default_variant": variants[0][0]}


# ----------------------------------------------------------------------------- 4. reference
def reference_step(runner: Runner, run: str, threads: int, work: Path, seen_smiles: set[str]) -> dict[str, Any]:
    """The model on the real reference densities of REF_DIR (in this process)."""
    import numpy as np

    from finetune.density import baseline_at, predict_on_grid
    from pipeline.config import PreprocessConfig
    from pipeline.cube import BOHR_ANGSTROM, voxel_volume_bohr3
    from pipeline.density_data import density_record, electron_count, grid_positions, read_density

    cache_file = work / "reference.json"
    model, settings, stamp, cache = in_process_model(run, threads, cache_file)
    pre = json.loads(json.dumps(model.meta.get("preprocess", {}) or {}))
    pre.setdefault("molecule", {})["conformers"] = 0
    cfg = PreprocessConfig.model_validate({k: v for k, v in pre.items() if k in PreprocessConfig.model_fields})
    strides = [settings.grid_stride] + ([1] if settings.grid_stride != 1 else [])
    rows = []
    for name, (rel, what) in REFERENCES.items():
        path = REF_DIR / rel
        computed = 0
        if not path.exists():
            rows.append({"name": name, "path": str(path), "error": "missing"})
            continue
        grid = read_density(path)
        rec = density_record(grid, name, str(path), cfg)
        true = np.asarray(grid.values, dtype=np.float64).reshape(-1)
        voxel = voxel_volume_bohr3(grid)
        row: dict[str, Any] = {
            "name": name, "what": what, "path": str(path), "content": grid.content, "smiles": rec.get("_smiles"),
            "atoms": int(len(grid.z)), "sum_z": int(grid.z.sum()), "shape": [int(n) for n in grid.shape],
            "points": int(true.size), "spacing_bohr": [float(np.linalg.norm(a)) / BOHR_ANGSTROM for a in grid.axes],
            "electrons_reference": electron_count(grid),
            "in_training_set": (rec.get("_smiles") in seen_smiles) if seen_smiles else None, "strides": {}}
        for stride in strides:
            key = f"{name}|{stride}|{threads}|{settings.direct_radius}|{settings.direct_radius_hydrogen}|{stamp}"
            if key not in cache:
                load = _loadavg()
                t0 = time.perf_counter()
                pred, info = predict_on_grid(model, rec, grid.origin, grid.axes, grid.shape, stride,
                                             settings.direct_radius, "cpu", settings.direct_radius_hydrogen,
                                             settings.max_coarse_step)
                seconds = time.perf_counter() - t0
                cache[key] = {"nmae_percent": _nmae(pred, true), "electrons_pred": float(pred.sum() * voxel),
                              "seconds": seconds, "network_points": int(info["network_points"]), "loadavg_1min": load[0]}
                cache_file.write_text(json.dumps(cache, indent=1))
                computed += 1
                log(f"reference: {name} stride {stride}: NMAE {cache[key]['nmae_percent']:.2f}%")
            row["strides"][str(stride)] = cache[key]
        if model.promolecule is not None:
            key = f"{name}|promolecule|{stamp}"
            if key not in cache:
                base = baseline_at(model, rec, grid_positions(rec, np.arange(true.size)), "cpu")
                cache[key] = {"nmae_percent": _nmae(base, true), "electrons": float(base.sum() * voxel)}
                cache_file.write_text(json.dumps(cache, indent=1))
            row["promolecule"] = cache[key]
        runner.describe("reference", f"finetune.density.predict_on_grid(model, density_record(read_density({str(path)!r})), "
                        f"grid of the file, stride in {strides}, direct_radius={settings.direct_radius}), torch threads "
                        f"{threads}; baseline_at for the promolecule", reused=computed == 0)
        rows.append(row)
    return {"threads": threads, "default_stride": settings.grid_stride, "rows": rows}


# ---------------------------------------------------------------------------------- machine
def machine_facts() -> dict[str, Any]:
    """nproc, CPU, memory, versions, git commit (and whether the tree has changes)."""
    from importlib import metadata

    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"

    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    mem = next((int(ln.split()[1]) / 2 ** 20 for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), math.nan) if Path("/proc/meminfo").exists() else math.nan

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=False).stdout.strip()
        except OSError:
            return ""

    dirty = [ln for ln in git("status", "--porcelain", "--untracked-files=no").splitlines() if ln.strip()]
    return {"nproc": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "cpu": cpu, "memory_GiB": round(mem, 1), "platform": platform.platform(), "python": platform.python_version(),
            "torch": version("torch"), "dgl": version("dgl"), "pyscf": version("pyscf"), "numpy": version("numpy"),
            "molmat": version("molmat"), "git_commit": git("rev-parse", "HEAD"), "git_modified_files": len(dirty),
            "nice": os.nice(0), "loadavg_start": _loadavg()}


# ----------------------------------------------------------------------------------- report
def write_report(res: dict[str, Any], results: Path) -> None:
    """density.md: headline numbers first, then every measurement."""
    m = res["machine"]
    model = res.get("model", {})
    ev = res.get("eval", {})
    es = ev.get("summary") or {}
    py = res.get("pyscf") or {}
    base = res.get("baseline") or {}
    held = model.get("held_out", {})
    lines = ["# Electron-density model: held-out accuracy, electron count, speed against PySCF (issue 12)", "",
             f"Model `{model.get('run')}` ({_describe_model(model)}), trained on `{model.get('trained_on')}`"
             + (f" ({held['train_records']} training molecules)" if held.get("train_records") else "")
             + f"; test split of `{res['shards']}`. Run `{res['command']}`, {res['started']} to "
             f"{res.get('finished', '(running)')}.", "", "## Headline", ""]
    if es:
        met = "meets" if es["nmae_percent"] <= NMAE_TARGET else "misses"
        lines.append(f"- **Held-out NMAE {es['nmae_percent']:.3f}%** pooled over every grid point of "
                     f"{es['records']} test molecules (mean over molecules {es['nmae_mean_percent']:.3f}%, median "
                     f"{es['nmae_median_percent']:.3f}%, range {es['nmae_min_percent']:.3f}-{es['nmae_max_percent']:.3f}%)"
                     f": {met} the {NMAE_TARGET:g}% target; DeepDFT reports ~{DEEPDFT_NMAE:g}% on QM9 after "
                     f"{DEEPDFT_MOLECULES} training molecules (literature, not measured here). The promolecule "
                     f"alone: {_f(es.get('promolecule_nmae_percent'))}%."
                     + ("" if ev.get("limit") is None else f" (only the first {ev['limit']} test molecules: "
                        "--eval-limit)"))
        within = es["electrons_within_1pct"]
        lines.append(f"- **Electron count**: |N_pred - N_label| / N_label = {es['electrons_rel_error_mean_percent']:.3f}% "
                     f"on average, {es['electrons_rel_error_max_percent']:.3f}% at worst; {within} of {es['records']} "
                     f"molecules within {ELECTRON_TARGET:g}% "
                     + ("(all: yes)." if within == es["records"] else "(not all).")
                     + (f" Against sum Z: {es['electrons_vs_sum_z_mean_percent']:.2f}% mean, "
                        f"{es['electrons_vs_sum_z_max_percent']:.2f}% max (the label grids' own Riemann sums are "
                        f"{_f(es['label_grid_vs_sum_z_min_percent'], '+.2f')}% to "
                        f"{_f(es['label_grid_vs_sum_z_max_percent'], '+.2f')}% off sum Z, mean "
                        f"{_f(es['label_grid_vs_sum_z_mean_percent'], '+.2f')}%)."
                        if es.get("electrons_vs_sum_z_mean_percent") is not None else ""))
    if not held.get("test_held_out", False) and held:
        seen = set(held.get("test_ids_seen_in_training") or [])
        unseen = [x["nmae_percent"] for x in ev.get("structures", []) if x["id"] not in seen]
        lines.append(f"- **Caution**: the test split is not shown to be held out: "
                     + (f"{len(seen)} test molecules were in the model's training or validation split "
                        f"({', '.join(sorted(seen)[:10])}" + ("..." if len(seen) > 10 else "") + ")"
                        if seen else held.get("note", "unknown training data"))
                     + (f". The {len(unseen)} evaluated test molecules it never saw: mean NMAE {_mean(unseen):.3f}%"
                        if seen and unseen else "") + ".")
    ps = (py.get("summary") or {}).get(py.get("default_variant", ""), {})
    if ps:
        t = ps["threads"]
        meets = "meets" if ps["speedup_wall"] >= SPEEDUP_TARGET else "misses"
        lines.append(f"- **Speed against PySCF** ({ps['molecules']} test molecules, PBE/def2-SVP, same grid): whole "
                     f"commands {ps['speedup_wall']:.1f}x (density-labels {ps['pyscf_wall_s_mean']:.1f} s vs predict "
                     f"{ps['predict_wall_s_mean']:.1f} s per molecule, both with start-up and imports), compute only "
                     f"{ps['speedup_compute']:.1f}x (SCF + grid {ps['pyscf_compute_s_mean']:.1f} s vs model "
                     f"{ps['model_s_mean']:.2f} s); model at stride {ps['stride']} and density-labels (one worker) "
                     f"both on {t} thread(s): {meets} the {SPEEDUP_TARGET:g}x target on "
                     f"whole commands, {'meets' if ps['speedup_compute'] >= SPEEDUP_TARGET else 'misses'} it on "
                     "compute.")
        p1 = (py.get("summary") or {}).get("default_t1")
        if p1:
            lines.append(f"  Per core (both on one thread: SCF + grid {p1['pyscf_compute_s_mean']:.1f} s, model "
                         f"{p1['model_s_mean']:.2f} s): compute {p1['speedup_compute']:.1f}x, whole commands "
                         f"{p1['speedup_wall']:.1f}x. NMAE against the fresh PySCF cubes: "
                         f"{ps['nmae_vs_pyscf_percent_mean']:.3f}% (mean).")
    if base.get("runs"):
        r = base["runs"]
        pro, none = r.get("promolecule", {}).get("test"), r.get("none", {}).get("test")
        if pro and none:
            lines.append(f"- **Promolecule baseline at equal budget** ({base['minutes']:g} min, one thread each): "
                         f"test NMAE {pro['nmae_percent']:.3f}% with it, {none['nmae_percent']:.3f}% without; electron "
                         f"count error {pro['electrons_rel_error_mean_percent']:.3f}% vs "
                         f"{none['electrons_rel_error_mean_percent']:.3f}%.")
    lines += ["", "## Machine", "",
              f"- nproc {m['nproc']} (usable {m.get('affinity')}), {m['cpu']}, {m['memory_GiB']} GiB, {m['platform']}; "
              f"no GPU used; niceness {m.get('nice')}",
              f"- load average at start {', '.join(map(str, m['loadavg_start']))}, at end "
              f"{', '.join(map(str, m.get('loadavg_end', [])))} (other work shares these cores: timings are of "
              "this machine as it was)",
              f"- python {m['python']}, torch {m['torch']}, dgl {m['dgl']}, pyscf {m['pyscf']}, numpy {m['numpy']}, "
              f"molmat {m['molmat']}; git {m['git_commit'][:12]}"
              + (f" with {m['git_modified_files']} modified tracked files" if m.get("git_modified_files") else ""),
              f"- command: `{res['command']}`", ""]
    if model.get("training"):
        t = model["training"]
        lines += [f"Model training: {t.get('epochs_run')} epochs, {t.get('steps')} steps in {_f(t.get('seconds'), '.0f')} s "
                  f"(stopped by {t.get('stopped_by')}), best validation NMAE {_f(t.get('best_metric'))}% (probes), "
                  f"{_f(t.get('graphs_per_s'), '.2f')} molecules/s on {t.get('torch_threads')} thread(s).", ""]
    if ev.get("error"):
        lines += ["## 1. Held-out accuracy", "", f"Failed: {ev['error']}", ""]
    elif es:
        lines += ["## 1. Held-out accuracy (test split, full grids)", "",
                  f"`molmat evaluate` on {es['records']} test molecules ({es['points']:,} grid points; labels: "
                  f"{es['content']} densities), grid stride {es['grid_stride']} (direct within "
                  f"{es['direct_radius']} A of atoms), {ev['threads']} thread(s): {_f(es['seconds'], '.0f')} s, "
                  f"{_f(es['seconds_per_molecule'], '.1f')} s per molecule, {_f(es['points_per_second'], ',.0f')} "
                  f"points/s.", "",
                  "| | model | promolecule alone |", "|---|---:|---:|",
                  f"| NMAE pooled (%) | {es['nmae_percent']:.3f} | {_f(es.get('promolecule_nmae_percent'))} |",
                  f"| NMAE mean over molecules (%) | {es['nmae_mean_percent']:.3f} | "
                  f"{_f(es.get('promolecule_nmae_mean_percent'))} |",
                  f"| NMAE min / median / max (%) | {es['nmae_min_percent']:.3f} / {es['nmae_median_percent']:.3f} / "
                  f"{es['nmae_max_percent']:.3f} ({es['worst_id']} worst) | |",
                  f"| MAE per point (e/bohr^3) | {_f(es['mae'], '.3e')} | |",
                  f"| electrons vs label grid, mean / max (%) | {es['electrons_rel_error_mean_percent']:.3f} / "
                  f"{es['electrons_rel_error_max_percent']:.3f} (signed mean "
                  f"{es['electrons_signed_error_mean_percent']:+.3f}) | "
                  f"{_f(es.get('promolecule_electrons_rel_error_mean_percent'))} (mean) |",
                  f"| electrons vs sum Z, mean / max (%) | {_f(es.get('electrons_vs_sum_z_mean_percent'))} / "
                  f"{_f(es.get('electrons_vs_sum_z_max_percent'))} | |",
                  f"| label grid vs sum Z, mean (min, max) (%) | {_f(es.get('label_grid_vs_sum_z_mean_percent'), '+.3f')} "
                  f"({_f(es.get('label_grid_vs_sum_z_min_percent'), '+.3f')}, "
                  f"{_f(es.get('label_grid_vs_sum_z_max_percent'), '+.3f')}) | |", "",
                  "NMAE = 100 sum|rho_pred - rho_label| / sum rho_label over a molecule's grid points (pooled: over "
                  "every point of every molecule). Electron counts are Riemann sums on the 0.25 bohr label grid, "
                  "which itself misses or over-counts the nuclear cusps by a few per cent (last row); the prediction "
                  "is compared with the label grid's sum, which is what it was trained to reproduce.", ""]
    ds = res.get("direct_subset") or {}
    if ds.get("strides"):
        lines += [f"### Grid stride: interpolation against every point through the network (first {ds['molecules']} "
                  f"test molecules, {ds['threads']} thread(s), direct radius {ds['direct_radius']} A)", "",
                  "| stride | NMAE pooled (%) | NMAE mean (%) | change vs stride 1 (pooled, points of %) | "
                  "largest change, one molecule | s per molecule | speed-up vs stride 1 | network points |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for s, st in sorted(ds["strides"].items(), key=lambda kv: int(kv[0])):
            lines.append(f"| {s}{' (default)' if int(s) == ds['default_stride'] else ''} | {st['nmae_percent']:.4f} | "
                         f"{st['nmae_mean_percent']:.4f} | {st['nmae_pooled_diff_vs_stride1_percent']:+.4f} | "
                         f"{st['diff_vs_stride1_max_abs_percent']:.4f} | {st['seconds_per_molecule']:.1f} | "
                         f"{st['speedup_vs_stride1']:.2f}x | {100 * st['network_fraction']:.0f}% |")
        lines += ["", "| molecule | atoms | points | " + " | ".join(f"NMAE s{s} (%)" for s in sorted(ds["strides"], key=int))
                  + " | " + " | ".join(f"s/mol s{s}" for s in sorted(ds["strides"], key=int)) + " | NMAE in evaluate (%) |",
                  "|---|---:|---:|" + "---:|" * (2 * len(ds["strides"]) + 1)]
        for rid in dict.fromkeys(r["id"] for r in ds["rows"]):
            sel = {str(r["stride"]): r for r in ds["rows"] if r["id"] == rid}
            first = next(iter(sel.values()))
            lines.append(f"| {rid} | {first['atoms']} | {first['points']:,} | "
                         + " | ".join(f"{sel[s]['nmae_percent']:.4f}" for s in sorted(ds["strides"], key=int)) + " | "
                         + " | ".join(f"{sel[s]['seconds']:.1f}" for s in sorted(ds["strides"], key=int))
                         + f" | {_f(first.get('nmae_in_evaluate'), '.4f')} |")
        lines.append("")
    if base:
        lines += [f"## 2. Promolecule baseline or none, equal budget ({base['minutes']:g} min each, one torch thread, "
                  f"{base['jobs']} side by side)", ""]
        if base.get("runs"):
            lines += ["| baseline | epochs | steps | molecules/s | best val NMAE (%) | test NMAE pooled (%) | mean (%) | "
                      "electrons vs label, mean / max (%) | electrons vs sum Z, mean (%) | promolecule alone (%) |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, r in base["runs"].items():
                if "error" in r:
                    lines.append(f"| {name} | failed: {r['error']} |")
                    continue
                t = r["test"]
                lines.append(f"| {name} | {r['epochs']} | {r['steps']} | {_f(r['graphs_per_s'], '.2f')} | "
                             f"{_f(r['best_val_nmae_percent'])} | {t['nmae_percent']:.3f} | {t['nmae_mean_percent']:.3f} | "
                             f"{t['electrons_rel_error_mean_percent']:.3f} / {t['electrons_rel_error_max_percent']:.3f} | "
                             f"{_f(t.get('electrons_vs_sum_z_mean_percent'))} | {_f(t.get('promolecule_nmae_percent'))} |")
            budgets = {r.get("max_minutes_as_run") for r in base["runs"].values() if "error" not in r}
            if budgets and budgets != {base["minutes"]}:
                lines.append(f"\nNote: the runs reused from `--work` were trained with train.max_minutes "
                             f"{sorted(b for b in budgets if b is not None)}, not {base['minutes']:g}.")
            lines += ["", "Test split evaluated with `molmat evaluate` (model's default stride)"
                      + (f", first {base.get('eval_limit')} molecules only" if base.get("eval_limit") else "") + ".", ""]
    if py:
        lines += [f"## 3. Speed against PySCF ({py['molecules']} test molecules spread evenly over the test split)", "",
                  "Each molecule: its atoms (from the shard record, Angstrom) as an xyz file; `molmat density-labels "
                  f"--workers 1 --threads {py['threads']}` (the project's default settings, one worker process with "
                  f"{py['threads']} thread(s)) and again with `--threads 1`; then `molmat predict RUN --grid-like` on "
                  "the fresh cube, each variant compared with PySCF on as many threads as it had. Whole-command "
                  "times include process start-up and imports (PySCF: "
                  "also the worker's spawn); compute times are the SCF and grid seconds density-labels records in "
                  "labels.jsonl, and the 'model evaluation' seconds predict prints (encoding, probe graph, network, "
                  "interpolation; not loading the model or writing the cube).", ""]
        if py.get("summary"):
            lines += ["| predict variant | stride | threads | PySCF command s | SCF + grid s | predict command s | "
                      "model s | probes/s | speed-up, commands | speed-up, compute (range) | speed-up, SCF only | "
                      "NMAE vs PySCF (%) |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
            for name, s in py["summary"].items():
                lines.append(f"| {name} | {s['stride']} | {s['threads']} | {s['pyscf_wall_s_mean']:.1f} | "
                             f"{s['pyscf_compute_s_mean']:.1f} | {s['predict_wall_s_mean']:.1f} | {s['model_s_mean']:.2f} | "
                             f"{s['probes_per_s_mean']:,.0f} | {s['speedup_wall']:.2f}x | {s['speedup_compute']:.2f}x "
                             f"({s['speedup_compute_min']:.2f}-{s['speedup_compute_max']:.2f}) | "
                             f"{s['speedup_scf_only']:.2f}x | {s['nmae_vs_pyscf_percent_mean']:.3f} |")
            lines += ["", "Means over the molecules; speed-ups are ratios of summed times.", ""]
        lines += ["| molecule | atoms | grid | load at start | PySCF command s (CPU s) | SCF s (cycles) | grid s | "
                  + " | ".join(f"{v}: command s / model s / NMAE %" for v in py.get("variants", []))
                  + " | N PySCF cube | N predicted | fresh cube vs shard label NMAE (%) |",
                  "|---|---:|---|---:|---:|---:|---:|" + "---|" * len(py.get("variants", [])) + "---:|---:|---:|"]
        for r in py.get("rows", []):
            if "error" in r:
                lines.append(f"| {r['id']} | failed: {r['error']} |")
                continue
            cells = []
            for v in py["variants"]:
                p = r["predict"].get(v, {})
                cells.append("failed" if "error" in p else
                             f"{p['wall_s']:.1f} / {p['model_s']:.2f} / {p['nmae_vs_pyscf_percent']:.3f}")
            first = r["predict"].get(py["variants"][0], {})
            lines.append(f"| {r['id']} ({r['smiles']}) | {r['atoms']} | {'x'.join(map(str, r['shape'] or []))} "
                         f"({r['points']:,}) | {_f((r.get('pyscf_loadavg_start') or [None])[0], '.2f')} | "
                         f"{r['pyscf_wall_s']:.1f} ({r['pyscf_cpu_s']:.1f}) | {r['scf_s']:.2f} "
                         f"({r['scf_cycles']}) | {r['grid_s']:.2f} | " + " | ".join(cells)
                         + f" | {r['electrons_pyscf_cube']:.3f} | {_f(first.get('electrons_pred'))} | "
                         f"{_f(r.get('nmae_fresh_vs_shard_label_percent'), '.4f')} |")
        lines.append("")
    ref = res.get("reference") or {}
    if ref.get("rows"):
        lines += [f"## 4. Real reference densities (`{REF_DIR}`)", "",
                  "The model predicts total densities, core electrons included. The two `qm9_pbe_grid` folders hold "
                  "PBE valence densities (8 electrons: the 1s electrons of C and N are not in them), so their NMAE "
                  "counts the core the model adds, and says little about the valence; it is reported against the "
                  "valence grid as it is. The Psi4 NH3 cube is a total density from another code and basis.", "",
                  "| reference | content | atoms in training set? | grid (spacing, bohr) | N reference | "
                  + " | ".join(f"stride {s}: NMAE % / N pred / s" for s in
                               ([str(ref['default_stride'])] + (["1"] if ref["default_stride"] != 1 else [])))
                  + " | promolecule: NMAE % / N |",
                  "|---|---|---|---|---:|" + "---|" * (2 if ref["default_stride"] != 1 else 1) + "---|"]
        for r in ref["rows"]:
            if "error" in r:
                lines.append(f"| {r['name']} | {r['error']} |")
                continue
            cells = [f"{st['nmae_percent']:.2f} / {st['electrons_pred']:.3f} / {st['seconds']:.1f}"
                     for _, st in r["strides"].items()]
            pro = r.get("promolecule")
            seen = {True: f"yes ({r['smiles']})", False: f"no ({r['smiles']})", None: "unknown"}[r["in_training_set"]]
            lines.append(f"| {r['name']}: {r['what']} | {r['content']} | {seen} | {'x'.join(map(str, r['shape']))} "
                         f"({'/'.join(f'{s:.3f}' for s in r['spacing_bohr'])}) | {r['electrons_reference']:.3f} | "
                         + " | ".join(cells) + " | " + (f"{pro['nmae_percent']:.2f} / {pro['electrons']:.3f}" if pro
                                                         else "-") + " |")
        lines.append("")
    errors = [f"- {k}: {v}" for k, v in res.get("errors", {}).items()]
    if errors:
        lines += ["## Failed steps", "", *errors, ""]
    if res.get("kept_from_earlier"):
        lines += ["Sections kept from an earlier invocation (left out with --skip this time): "
                  + ", ".join(f"{k} (collected {v})" for k, v in res["kept_from_earlier"].items()), ""]
    lines += ["## Commands", ""] + [f"- {c['step']}: `{c['command']}`" + ("  # reused" if c.get("reused") else "")
                                    + (f"  ({c['note']})" if c.get("note") else "") for c in res.get("commands", [])]
    (results / "density.md").write_text("\n".join(lines) + "\n")


def _describe_model(model: dict[str, Any]) -> str:
    mdl = model.get("model") or {}
    enc = mdl.get("encoder") or {}
    return (f"{enc.get('name', '?')} {enc.get('hidden', '')}, {mdl.get('probe_layers', '?')} probe layers, "
            f"baseline {mdl.get('baseline', '?')}, default grid stride {model.get('grid_stride')}")


# -------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--run", help="density model: run or model directory, or a shipped model's name (qm9-density)")
    p.add_argument("--shards", help="the density shards the model was trained on (their split.json test split)")
    p.add_argument("--work", default="/tmp/molmat_density_bench")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--baseline-minutes", type=float, default=10.0, help="training budget of each baseline run; 0 skips")
    p.add_argument("--baseline-set", action="append", default=[], help="extra finetune override for both baseline runs")
    p.add_argument("--jobs", type=int, default=2, help="baseline runs side by side (one torch thread each)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="threads of evaluate, predict, density-labels' OMP_NUM_THREADS and the in-process parts")
    p.add_argument("--direct-subset", type=int, default=5, help="test molecules evaluated at strides 1, 2, 3")
    p.add_argument("--pyscf-molecules", type=int, default=3, help="test molecules labelled afresh with PySCF")
    p.add_argument("--eval-limit", type=int, help="evaluate only the first K test molecules (default: all; "
                   "for trying the script out)")
    p.add_argument("--skip", action="append", default=[], choices=STEPS, help="leave a step out (repeatable)")
    p.add_argument("--report-only", action="store_true", help="rewrite density.md from density.json")
    args = p.parse_args(argv)
    results = Path(args.results)
    if args.report_only:
        res = json.loads((results / "density.json").read_text())
        write_report(res, results)
        log(f"wrote {results / 'density.md'}")
        return 0
    if not args.run or not args.shards:
        p.error("--run and --shards are needed (except with --report-only)")
    work, shards = Path(args.work), Path(args.shards)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    runner = Runner(work)
    command = "nice -n 19 .venv/bin/python bench/bench_density.py " + shlex.join(argv)
    res: dict[str, Any] = {"benchmark": "density", "command": command.strip(), "started": _now(),
                           "machine": machine_facts(), "run": args.run, "shards": str(shards),
                           "args": vars(args), "commands": runner.commands, "errors": {}}
    previous: dict[str, Any] = {}
    if (results / "density.json").exists():
        try:
            prev = json.loads((results / "density.json").read_text())
            if prev.get("run") == args.run and prev.get("shards") == str(shards):
                previous = prev
        except ValueError:
            pass

    def save() -> None:
        (results / "density.json").write_text(json.dumps(res, indent=1, default=str))
        write_report(res, results)

    log(f"model {args.run}, shards {shards}; work {work}")
    facts = model_facts(args.run, shards)
    seen_smiles = set(facts.pop("_seen_smiles"))
    res["model"] = facts
    if facts["held_out"].get("test_ids_seen_in_training"):
        log(f"warning: {len(facts['held_out']['test_ids_seen_in_training'])} test molecules of {shards} were in the "
            f"model's training/validation split ({facts['trained_on']})")
    save()
    kept: dict[str, str] = {}
    res["measured"] = {}
    for step, keys in (("eval", ("eval", "direct_subset")), ("baseline", ("baseline",)), ("pyscf", ("pyscf",)),
                       ("reference", ("reference",))):
        if step in args.skip or (step == "baseline" and args.baseline_minutes <= 0):
            for k in keys:
                if previous.get(k):
                    res[k] = previous[k]
                    kept[k] = (previous.get("measured") or {}).get(k) or previous.get("started")
                    res["measured"][k] = kept[k]
            if any(k in kept for k in keys):
                runner.commands.extend(c for c in previous.get("commands", []) if c.get("step") == step)
                if previous.get("errors", {}).get(step):
                    res["errors"][step] = previous["errors"][step]
            continue
        for k in keys:
            res["measured"][k] = res["started"]
        try:
            if step == "eval":
                ev = run_evaluation(runner, "eval", args.run, shards, work / "eval_test", args.threads, args.eval_limit,
                                    work / "logs" / "eval.log")
                res["eval"] = ev
                save()
                if "error" not in ev:
                    s = ev["summary"]
                    log(f"eval: test NMAE {s['nmae_percent']:.3f}% (mean {s['nmae_mean_percent']:.3f}%), electrons "
                        f"{s['electrons_rel_error_mean_percent']:.3f}% off the label grid")
                if args.direct_subset > 0:
                    res["direct_subset"] = direct_subset(runner, args.run, shards, args.direct_subset, args.threads,
                                                         work, ev.get("structures"))
            elif step == "baseline":
                jobs = [{"run": str(work / f"base_{b}"), "shards": str(shards), "baseline": b, "work": str(work),
                         "minutes": args.baseline_minutes, "sets": args.baseline_set, "limit": args.eval_limit}
                        for b in ("promolecule", "none")]
                runs: dict[str, Any] = {}
                with cf.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
                    futures = {pool.submit(baseline_job, runner, j): j["baseline"] for j in jobs}
                    for fut in cf.as_completed(futures):
                        try:
                            runs[futures[fut]] = fut.result()
                        except Exception as exc:  # one failed run must not lose the other's result
                            runs[futures[fut]] = {"error": f"{type(exc).__name__}: {exc}"}
                res["baseline"] = {"minutes": args.baseline_minutes, "jobs": args.jobs, "eval_limit": args.eval_limit,
                                   "runs": {b: runs[b] for b in ("promolecule", "none") if b in runs}}
            elif step == "pyscf":
                if args.pyscf_molecules > 0:
                    res["pyscf"] = pyscf_step(runner, args.run, shards, args.pyscf_molecules, args.threads, work,
                                              facts["grid_stride"])
            elif step == "reference":
                res["reference"] = reference_step(runner, args.run, args.threads, work, seen_smiles)
        except Exception as exc:  # a failed step is reported; the others still run
            import traceback

            traceback.print_exc()
            res["errors"][step] = f"{type(exc).__name__}: {exc}"
        res["machine"][f"loadavg_after_{step}"] = _loadavg()
        save()
        log(f"{step}: done")
    if kept:
        res["kept_from_earlier"] = kept
    res["machine"]["loadavg_end"] = _loadavg()
    res["finished"] = _now()
    save()
    log(f"wrote {results / 'density.json'} and {results / 'density.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
