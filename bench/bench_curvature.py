#!/usr/bin/env python3
"""Per-task loss curvature against the multi-task gap, and the learning-rate scaling rule (issue 13).

Curvature-informed multi-task learning (New et al. 2022) predicts that the tasks a shared model
serves worst are those whose losses are sharpest. For each dataset given:

* ``--mp``: band_gap_eV, formation_energy_per_atom_eV; ``--elastic``: K_VRH_GPa, G_VRH_GPa (both
  learned as log10); ``--qm8``: the CC2 excitation energies and oscillator strengths of the
  shards' manifest (``E1-CC2``, ``E2-CC2``, ``f1-CC2``, ``f2-CC2``);
* one single-task model per target and one multi-task model on all of them, each at the same
  wall-clock budget (``--minutes``, one torch thread), per seed, scored by test MAE (``molmat
  evaluate``; log10 MAE for moduli), with the data kind's default model (``model.auto``);
* ``molmat curvature`` on every multi-task model (``best/``, val split, ``--curvature-records``
  structures, all parameters, float64): per-task top Hessian eigenvalue and trace;
* with ``--weighted``, a multi-task run with ``finetune.curvature_weighting`` on;
* the multi-task gap per task, ``MAE_multi / MAE_single - 1``, its Spearman rank correlation with
  the curvature (per dataset and pooled over every task), and the cost of one HVP in gradients.

With ``--sweep``, a learning-rate sweep on the MPNN (``--sweep-data``, multi-task): every batch
size of ``--sweep-batches`` x every rate of ``--sweep-lrs`` for ``--sweep-epochs`` epochs, scored
by the best validation MAE/spread; the best rate per batch size (interpolated in log lr) is set
against the square-root rule (AdamW; Malladi et al. 2022) and the linear rule from the smallest
batch, the fitted exponent of best lr ~ B^a is reported (0.5 sqrt, 1 linear), and the rule is run
as configured (``train.lr_scaling=sqrt|linear``, ``train.reference_batch_size``) at every batch
size from the smallest batch's best rate.

    nice -n 19 .venv/bin/python bench/bench_curvature.py --mp MP_SHARDS --elastic ELASTIC_SHARDS \\
        --qm8 QM8_SHARDS --minutes 15 --seeds 0,1 --jobs 2 --weighted --sweep            # full run
    .venv/bin/python bench/bench_curvature.py --mp M --qm8 Q --minutes 0.05 --seeds 0 --jobs 1 \\
        --curvature-records 32 --sweep --sweep-batches 16,32 --sweep-lrs 1e-3,3e-3 --sweep-epochs 1 \\
        --set model.heads.hidden=8 --curvature-set curvature.lanczos_iters=5 --work /tmp/cb --results /tmp/cb/res  # smoke

Every run lives under ``--work`` and is reused when complete (a killed benchmark resumes; a run
killed mid-training resumes from its ``last.pt``). Every command is recorded. Writes
``curvature.json`` and ``curvature.md`` into ``--results``.
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
MOLMAT = str(ROOT / ".venv" / "bin" / "molmat")

FIXED_TARGETS = {"mp": ["band_gap_eV", "formation_energy_per_atom_eV"], "elastic": ["K_VRH_GPa", "G_VRH_GPa"]}
#: QM8 targets taken from the manifest: CC2 excitation energies and oscillator strengths of the two lowest states.
QM8_TARGET = re.compile(r"^(E|f)[12]-CC2$")
LOG10 = {"K_VRH_GPa", "G_VRH_GPa"}
MPNN = ["model.encoder2d.name=mpnn", "model.encoder3d=null"]


def log(msg: str) -> None:
    """Time-stamped progress line."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def dataset_targets(name: str, shards: Path) -> list[str]:
    """The targets benchmarked on a dataset (QM8: the CC2 columns the manifest holds)."""
    if name in FIXED_TARGETS:
        return FIXED_TARGETS[name]
    names = [t["name"] for t in json.loads((shards / "manifest.json").read_text())["targets"]]
    found = sorted((n for n in names if QM8_TARGET.match(n)), key=lambda n: (n[0], n))
    if not found:
        raise SystemExit(f"{shards}: no CC2 targets (E1-CC2, ...) in the manifest; it holds {', '.join(names)}")
    return found


def _sets(items: list[str]) -> list[str]:
    return [a for s in items for a in ("--set", s)]


def _call(cmd: list[str], logf: Path, commands: list[str]) -> int:
    """Run a molmat command (one thread), appending its output to ``logf``; record it."""
    commands.append(shlex.join(["molmat", *cmd]))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    logf.parent.mkdir(parents=True, exist_ok=True)
    with open(logf, "a") as fh:
        fh.write(f"\n$ {commands[-1]}\n")
        fh.flush()
        return subprocess.call([MOLMAT, *cmd], stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _trained(run: Path) -> bool:
    path = run / "result.json"
    return path.exists() and json.loads(path.read_text()).get("stopped_by") != "signal"


def train_and_score(job: dict[str, Any]) -> dict[str, Any]:
    """Fine-tune one model (resuming or reusing its run), evaluate it, and optionally run curvature on it.

    ``job``: ``run`` (directory), ``shards``, ``sets`` (finetune overrides), ``evaluate`` (bool),
    ``curvature`` (list of overrides, or None), ``work``.
    """
    run, shards, work = Path(job["run"]), job["shards"], Path(job["work"])
    logf = work / "logs" / f"{run.name}.log"
    commands: list[str] = []
    out: dict[str, Any] = {"run_dir": str(run), "commands": commands}
    ft = ["finetune", "--data", shards, "--out", str(run)] + _sets(job["sets"])
    if not _trained(run):
        log(f"start {run.name}")
        if _call(ft, logf, commands) != 0 or not _trained(run):
            return {**out, "error": f"finetune failed, log {logf}"}
    else:
        commands.append(shlex.join(["molmat", *ft]) + "  # reused")
    result = json.loads((run / "result.json").read_text())
    timing = json.loads((run / "timing.json").read_text()) if (run / "timing.json").exists() else {}
    out.update(best_val=result["best_metric"], epochs=result["epochs_run"], stopped_by=result["stopped_by"],
               graphs_per_s=timing.get("graphs_per_s"))
    if job.get("evaluate"):
        ev = ["evaluate", str(run), "--data", shards, "--split", "test"]
        metrics_file = run / "eval_test" / "metrics.json"
        fresh = metrics_file.exists() and metrics_file.stat().st_mtime >= (run / "result.json").stat().st_mtime
        if not fresh and _call(ev, logf, commands) != 0:
            return {**out, "error": f"evaluate failed, log {logf}"}
        if fresh:
            commands.append(shlex.join(["molmat", *ev]) + "  # reused")
        metrics = json.loads(metrics_file.read_text())["targets"]
        out["test"] = {t: {"mae": m["log10"]["mae"] if t in LOG10 else m["mae"], "count": m["count"]}
                       for t, m in metrics.items()}
    if job.get("curvature") is not None:
        cdir = run / "curvature_val"
        cv = ["curvature", str(run), "--data", shards, "--split", "val", "--out", str(cdir)] + _sets(job["curvature"])
        cfile = cdir / "curvature.json"
        done = cfile.exists() and json.loads(cfile.read_text()).get("complete") and \
            cfile.stat().st_mtime >= (run / "result.json").stat().st_mtime
        if not done and _call(cv, logf, commands) != 0:
            return {**out, "error": f"curvature failed, log {logf}"}
        if done:
            commands.append(shlex.join(["molmat", *cv]) + "  # reused")
        c = json.loads(cfile.read_text())
        out["curvature"] = {"tasks": {t: {"top": e["eigenvalues"][0], "top_k": e["eigenvalues"], "trace": e["trace"],
                                          "trace_se": e["trace_se"], "negative_mass": e["negative_mass_significant"],
                                          "r_top": e["r_top"], "method": e["method"], "seconds": e["seconds"],
                                          "residual": e["residuals"][0]} for t, e in c["tasks"].items()},
                            "cost": c["cost"], "n_params": c["n_params"], "records": c["records"],
                            "device": c["device"], "seconds": c["seconds"], "dir": str(cdir)}
    log(f"done {run.name}")
    return out


def _safe_job(job: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    try:
        return job["key"], train_and_score(job)
    except Exception as exc:  # one failed run must not lose the others' results
        return job["key"], {"error": f"{type(exc).__name__}: {exc}"}


# ------------------------------------------------------------------------------------ analysis
def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation (average ranks for ties); nan below 2 pairs or for a constant input."""
    import numpy as np

    if len(x) < 2:
        return math.nan

    def ranks(v: list[float]) -> np.ndarray:
        v = np.asarray(v, dtype=np.float64)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=np.float64)
        for value in np.unique(v):  # ties share their mean rank
            r[v == value] = r[v == value].mean()
        return r

    a, b = ranks(x), ranks(y)
    if a.std() == 0 or b.std() == 0:
        return math.nan
    return float(np.corrcoef(a, b)[0, 1])


def _mean(values: list[float]) -> float:
    values = [v for v in values if v is not None and math.isfinite(v)]
    return sum(values) / len(values) if values else math.nan


def gap_table(res: dict[str, Any], dataset: str) -> list[dict[str, Any]]:
    """Per target of a dataset: single and multi-task test MAE (mean over seeds), gap, curvature."""
    runs = res["runs"]
    rows = []
    for t in res["datasets"][dataset]["targets"]:
        single = [r["test"][t]["mae"] for k, r in runs.items() if k.startswith(f"{dataset}|single:{t}|") and "test" in r]
        multi = [r["test"][t]["mae"] for k, r in runs.items() if k.startswith(f"{dataset}|multi|") and "test" in r]
        weighted = [r["test"][t]["mae"] for k, r in runs.items() if k.startswith(f"{dataset}|weighted|") and "test" in r]
        curv = [r["curvature"]["tasks"][t] for k, r in runs.items()
                if k.startswith(f"{dataset}|multi|") and t in r.get("curvature", {}).get("tasks", {})]
        s, m, w = _mean(single), _mean(multi), _mean(weighted)
        rows.append({"target": t, "single": s, "multi": m, "weighted": w, "seeds": len(multi),
                     "gap": m / s - 1 if s and math.isfinite(s) and math.isfinite(m) else math.nan,
                     "weighted_gap": w / s - 1 if s and math.isfinite(s) and math.isfinite(w) else math.nan,
                     "top": _mean([c["top"] for c in curv]), "trace": _mean([c["trace"] for c in curv]),
                     "negative_mass": _mean([c["negative_mass"] for c in curv])})
    return rows


def best_lr(lrs: list[float], scores: list[float]) -> tuple[float, float]:
    """(grid best lr, best lr from a parabola in log lr through the grid minimum and its neighbours)."""
    import numpy as np

    pairs = sorted((lr, s) for lr, s in zip(lrs, scores) if s is not None and math.isfinite(s))
    if not pairs:
        return math.nan, math.nan
    x = np.log([p[0] for p in pairs])
    y = np.array([p[1] for p in pairs])
    i = int(np.argmin(y))
    grid = float(np.exp(x[i]))
    if i == 0 or i == len(x) - 1:
        return grid, grid  # on the edge of the grid: no bracket to interpolate in
    a, b, _ = np.polyfit(x[i - 1:i + 2], y[i - 1:i + 2], 2)
    return grid, float(np.exp(-b / (2 * a))) if a > 0 else grid


def sweep_summary(res: dict[str, Any]) -> dict[str, Any]:
    """Best lr per batch size, the rules' predictions from the smallest batch, the fitted exponent."""
    import numpy as np

    sw = res.get("sweep")
    if not sw:
        return {}
    batches, lrs = sw["batches"], sw["lrs"]
    table = {b: {lr: res["runs"].get(f"sweep|B{b}|lr{lr:g}", {}).get("best_val") for lr in lrs} for b in batches}
    best = {b: best_lr(lrs, [table[b][lr] for lr in lrs]) for b in batches}
    ref = batches[0]
    ref_lr = best[ref][1]
    rows = []
    for b in batches:
        rule = {name: res["runs"].get(f"sweep|B{b}|rule_{name}", {}).get("best_val") for name in ("sqrt", "linear")}
        grid_best = min((v for v in table[b].values() if v is not None and math.isfinite(v)), default=math.nan)
        rows.append({"batch": b, "best_lr_grid": best[b][0], "best_lr_fit": best[b][1],
                     "sqrt_prediction": ref_lr * math.sqrt(b / ref), "linear_prediction": ref_lr * b / ref,
                     "best_val_grid": grid_best, "val_sqrt_rule": rule["sqrt"], "val_linear_rule": rule["linear"]})
    ok = [(b, best[b][1]) for b in batches if math.isfinite(best[b][1])]
    exponent = float(np.polyfit(np.log([o[0] for o in ok]), np.log([o[1] for o in ok]), 1)[0]) if len(ok) >= 2 else math.nan
    return {"table": {str(b): {f"{lr:g}": v for lr, v in t.items()} for b, t in table.items()}, "rows": rows,
            "exponent": exponent, "reference_batch": ref, "reference_lr": ref_lr}


def _f(v: Any, spec: str = ".4g") -> str:
    return "-" if v is None or (isinstance(v, float) and not math.isfinite(v)) else format(v, spec)


def _budget(res: dict[str, Any]) -> str:
    epochs = res.get("epochs") or {}
    fixed = ", ".join(f"{d} {n} epochs" for d, n in epochs.items())
    timed = [d for d in res["datasets"] if d not in epochs]
    return "; ".join(([fixed + f" (cap {res['minutes']} min)"] if fixed else [])
                     + ([f"{', '.join(timed)} {res['minutes']} min"] if timed else []))


def write_report(res: dict[str, Any], results: Path) -> None:
    """curvature.md from the collected runs (rewritten after every finished job)."""
    lines = ["# Per-task loss curvature and the multi-task gap (issue 13)", "",
             f"`{res['command']}`; started {res['started']}; {res['machine']['nproc']} cores, {res['jobs']} runs side "
             f"by side (1 torch thread each); budget {_budget(res)} per model; seeds {res['seeds']}. Test MAE "
             "(log10 for moduli), mean over seeds. Gap = MAE(multi-task) / MAE(single-task) - 1 (positive: the "
             "shared model is worse). Curvature of the multi-task model (`best/`) on "
             f"{res['curvature_records']} val structures, all parameters, mean over seeds: top Hessian "
             "eigenvalue and Hutchinson trace of each target's training loss (normalised units).", ""]
    pooled_top, pooled_trace, pooled_gap = [], [], []
    res["analysis"] = {}
    for dataset in res["datasets"]:
        rows = gap_table(res, dataset)
        have = [r for r in rows if math.isfinite(r["gap"]) and math.isfinite(r["top"])]
        rho_top = spearman([r["top"] for r in have], [r["gap"] for r in have])
        rho_trace = spearman([r["trace"] for r in have], [r["gap"] for r in have])
        pooled_top += [r["top"] for r in have]
        pooled_trace += [r["trace"] for r in have]
        pooled_gap += [r["gap"] for r in have]
        res["analysis"][dataset] = {"rows": rows, "spearman_top_gap": rho_top, "spearman_trace_gap": rho_trace}
        weighted = any(math.isfinite(r["weighted"]) for r in rows)
        lines += [f"## {dataset}", "", "| target | single MAE | multi MAE | gap | top eigenvalue | trace | negative mass |"
                  + (" weighted MAE | weighted gap |" if weighted else ""),
                  "|---|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if weighted else "")]
        for r in sorted(rows, key=lambda r: -r["top"] if math.isfinite(r["top"]) else 0):
            line = (f"| {r['target']} | {_f(r['single'])} | {_f(r['multi'])} | {_f(100 * r['gap'], '+.1f')}% | "
                    f"{_f(r['top'])} | {_f(r['trace'])} | {_f(r['negative_mass'], '.3f')} |")
            if weighted:
                line += f" {_f(r['weighted'])} | {_f(100 * r['weighted_gap'], '+.1f')}% |"
            lines.append(line)
        lines += ["", f"Spearman rank correlation with the gap ({len(have)} targets): top eigenvalue "
                  f"{_f(rho_top, '+.2f')}, trace {_f(rho_trace, '+.2f')}" + (" (two targets: +-1 says only which is "
                                                                               "larger)" if len(have) == 2 else ""), ""]
    rho_top = spearman(pooled_top, pooled_gap)
    rho_trace = spearman(pooled_trace, pooled_gap)
    res["analysis"]["pooled"] = {"n": len(pooled_gap), "spearman_top_gap": rho_top, "spearman_trace_gap": rho_trace}
    lines += ["## Does curvature rank the gap?", "",
              f"Pooled over every target of every dataset ({len(pooled_gap)}; losses are in normalised units, so "
              f"curvatures are comparable across datasets): Spearman(top eigenvalue, gap) {_f(rho_top, '+.2f')}, "
              f"Spearman(trace, gap) {_f(rho_trace, '+.2f')}.", ""]
    costs = [(k, r["curvature"]) for k, r in res["runs"].items() if "curvature" in r]
    if costs:
        lines += ["## Cost", "", "| run | parameters | records | device | HVP / gradient (double backprop) | "
                  "HVP / gradient (finite differences) | method | seconds per task |", "|---|---:|---:|---|---:|---:|---|---:|"]
        for k, c in costs:
            methods = sorted({t["method"] for t in c["tasks"].values()})
            lines.append(f"| {k.replace('|', ' ')} | {c['n_params']:,} | {c['records']} | {c['device']} | {_f(c['cost']['ratio_autograd'], '.2f')} | "
                         f"{_f(c['cost']['ratio_fd'], '.2f')} | {', '.join(methods)} | "
                         f"{_f(_mean([t['seconds'] for t in c['tasks'].values()]), '.1f')} |")
        lines.append("")
    sw = sweep_summary(res)
    if sw:
        res["analysis"]["sweep"] = sw
        s = res["sweep"]
        lines += [f"## Learning rate against batch size ({s['dataset']}, MPNN, multi-task, {s['epochs']} epochs)", "",
                  "Best validation MAE/spread per run:", "",
                  "| batch | " + " | ".join(f"lr {lr:g}" for lr in s["lrs"]) + " |", "|---:|" + "---:|" * len(s["lrs"])]
        for b in s["batches"]:
            lines.append(f"| {b} | " + " | ".join(_f(sw["table"][str(b)][f"{lr:g}"]) for lr in s["lrs"]) + " |")
        lines += ["", f"Best lr per batch (parabola in log lr through the grid minimum), against the rules from batch "
                  f"{sw['reference_batch']}'s best {_f(sw['reference_lr'], '.3g')}; and the rules run as configured "
                  "(`train.lr_scaling`, `train.reference_batch_size`):", "",
                  "| batch | best lr (grid) | best lr (fit) | sqrt rule | linear rule | best val (grid) | val, sqrt rule "
                  "| val, linear rule |", "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for r in sw["rows"]:
            lines.append(f"| {r['batch']} | {_f(r['best_lr_grid'], '.3g')} | {_f(r['best_lr_fit'], '.3g')} | "
                         f"{_f(r['sqrt_prediction'], '.3g')} | {_f(r['linear_prediction'], '.3g')} | "
                         f"{_f(r['best_val_grid'])} | {_f(r['val_sqrt_rule'])} | {_f(r['val_linear_rule'])} |")
        lines += ["", f"Fitted exponent a of best lr ~ batch^a: {_f(sw['exponent'], '.2f')} (square-root rule 0.5, "
                  "linear rule 1).", ""]
    errors = [f"- {k}: {r['error']}" for k, r in res["runs"].items() if "error" in r]
    if errors:
        lines += ["## Failed runs", "", *errors, ""]
    lines += ["## Commands", ""] + [f"- {k}: `{c}`" for k, r in res["runs"].items() for c in r.get("commands", [])]
    (results / "curvature.md").write_text("\n".join(lines) + "\n")


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> int:
    """Plan (or reuse) every run, run them in parallel, write the report."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mp", help="MP shards (band gap, formation energy)")
    p.add_argument("--elastic", help="mp_elastic shards (K_VRH_GPa, G_VRH_GPa)")
    p.add_argument("--qm8", help="QM8 shards (CC2 targets)")
    p.add_argument("--minutes", type=float, default=15.0, help="training budget per model")
    p.add_argument("--epochs", default="", help="equal-data budget instead of equal time: DATASET=EPOCHS,... "
                   "(e.g. mp=3,elastic=40,qm8=20); a dataset named here trains that many epochs (--minutes is "
                   "then only a cap), so runs side by side with other work see the same data")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--jobs", type=int, default=2, help="runs side by side, one torch thread each")
    p.add_argument("--curvature-records", type=int, default=1000, help="val structures the curvature is measured on")
    p.add_argument("--weighted", action="store_true", help="also a curvature-weighted multi-task run per dataset/seed")
    p.add_argument("--weight-every", type=int, default=2, help="epochs between curvature re-weightings")
    p.add_argument("--sweep", action="store_true", help="learning-rate x batch-size sweep on the MPNN")
    p.add_argument("--sweep-data", choices=["mp", "elastic", "qm8"], help="dataset of the sweep (default: qm8, else mp)")
    p.add_argument("--sweep-batches", default="32,64,128,256")
    p.add_argument("--sweep-lrs", default="1e-4,3e-4,1e-3,3e-3,1e-2")
    p.add_argument("--sweep-epochs", type=int, default=20, help="epochs per sweep run (equal data for every batch size)")
    p.add_argument("--sweep-minutes", type=float, default=10.0, help="cap per sweep run")
    p.add_argument("--set", dest="sets", action="append", default=[], help="extra finetune override for every run")
    p.add_argument("--curvature-set", action="append", default=[], help="extra `molmat curvature` override")
    p.add_argument("--work", default="/tmp/molmat_curvature_bench")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = p.parse_args(argv)
    given = {k: Path(v) for k, v in (("mp", args.mp), ("elastic", args.elastic), ("qm8", args.qm8)) if v}
    if not given:
        p.error("give at least one of --mp, --elastic, --qm8")
    seeds = [int(s) for s in args.seeds.split(",")]
    work = Path(args.work)
    results = Path(args.results)
    results.mkdir(parents=True, exist_ok=True)
    targets = {d: dataset_targets(d, s) for d, s in given.items()}
    n_batches = max(1, math.ceil(args.curvature_records / 128))
    curv_sets = [f"curvature.batches={n_batches}", f"curvature.batch_size={math.ceil(args.curvature_records / n_batches)}",
                 "train.threads=1", *args.curvature_set]
    common = [f"train.max_minutes={args.minutes}", "train.epochs=1000", "train.threads=1", *args.sets]
    jobs: list[dict[str, Any]] = []
    epochs = {k: int(v) for k, v in (item.split("=") for item in args.epochs.split(",") if item)}
    for d, shards in given.items():
        for seed in seeds:
            base = [*common, f"train.seed={seed}"] + ([f"train.epochs={epochs[d]}", "train.patience=null"]
                                                     if d in epochs else [])
            for t in targets[d]:
                jobs.append({"key": f"{d}|single:{t}|s{seed}", "run": str(work / "runs" / f"{d}_single_{t}_s{seed}"),
                             "shards": str(shards), "sets": base + [f"finetune.targets=[{t}]"], "evaluate": True})
            all_targets = "finetune.targets=[" + ",".join(targets[d]) + "]"
            jobs.append({"key": f"{d}|multi|s{seed}", "run": str(work / "runs" / f"{d}_multi_s{seed}"), "shards": str(shards),
                         "sets": base + [all_targets], "evaluate": True, "curvature": curv_sets})
            if args.weighted:
                jobs.append({"key": f"{d}|weighted|s{seed}", "run": str(work / "runs" / f"{d}_weighted_s{seed}"),
                             "shards": str(shards), "evaluate": True,
                             "sets": base + [all_targets, "finetune.curvature_weighting.enabled=true",
                                             f"finetune.curvature_weighting.every={args.weight_every}"]})
    sweep: dict[str, Any] | None = None
    if args.sweep:
        sd = args.sweep_data or ("qm8" if "qm8" in given else "mp" if "mp" in given else next(iter(given)))
        if sd not in given:
            p.error(f"--sweep-data {sd} needs --{sd}")
        batches = [int(b) for b in args.sweep_batches.split(",")]
        lrs = [float(x) for x in args.sweep_lrs.split(",")]
        sweep = {"dataset": sd, "batches": batches, "lrs": lrs, "epochs": args.sweep_epochs}
        sweep_base = [f"train.epochs={args.sweep_epochs}", f"train.max_minutes={args.sweep_minutes}", "train.threads=1",
                      "train.seed=0", "train.patience=null", "finetune.targets=[" + ",".join(targets[sd]) + "]", *MPNN,
                      *args.sets]
        for b in batches:
            for lr in lrs:
                jobs.append({"key": f"sweep|B{b}|lr{lr:g}", "run": str(work / "runs" / f"sweep_{sd}_B{b}_lr{lr:g}"),
                             "shards": str(given[sd]), "sets": sweep_base + [f"train.batch_size={b}", f"train.lr={lr}"]})
    res: dict[str, Any] = {"command": shlex.join([".venv/bin/python", "bench/bench_curvature.py", *(argv or sys.argv[1:])]),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "minutes": args.minutes, "seeds": seeds,
                           "epochs": epochs,
                           "jobs": args.jobs, "curvature_records": args.curvature_records,
                           "datasets": {d: {"shards": str(s), "targets": targets[d]} for d, s in given.items()},
                           "sweep": sweep, "machine": {"nproc": os.cpu_count(), "platform": platform.platform()},
                           "runs": {}}

    def collect(pool: cf.Executor, batch: list[dict[str, Any]]) -> None:
        for job in batch:
            job["work"] = str(work)
        for key, out in pool.map(_safe_job, batch):
            res["runs"][key] = out
            (results / "curvature.json").write_text(json.dumps(res, indent=1, default=str))
            write_report(res, results)
            log(f"{key}: " + (out["error"] if "error" in out else
                              json.dumps({k: out[k] for k in ("best_val", "epochs") if k in out})))

    with cf.ThreadPoolExecutor(max_workers=args.jobs) as pool:  # each job waits on molmat subprocesses
        collect(pool, jobs)
        if sweep:
            # the rules as configured, from the smallest batch's best rate (known only now)
            summary = sweep_summary(res)
            ref_lr = summary.get("reference_lr", math.nan)
            ref = sweep["batches"][0]
            rule_jobs = []
            if math.isfinite(ref_lr):
                for b in sweep["batches"][1:]:
                    for rule in ("sqrt", "linear"):
                        rule_jobs.append({"key": f"sweep|B{b}|rule_{rule}",
                                          "run": str(work / "runs" / f"sweep_{sweep['dataset']}_B{b}_{rule}_from{ref_lr:.3g}"),
                                          "shards": str(given[sweep["dataset"]]),
                                          "sets": sweep_base + [f"train.batch_size={b}", f"train.lr={ref_lr:.6g}",
                                                                f"train.lr_scaling={rule}",
                                                                f"train.reference_batch_size={ref}"]})
            collect(pool, rule_jobs)
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    write_report(res, results)
    (results / "curvature.json").write_text(json.dumps(res, indent=1, default=str))
    log(f"wrote {results / 'curvature.json'} and {results / 'curvature.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
