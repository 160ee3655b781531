#!/usr/bin/env python
"""SchNet fine-tuning throughput end to end: this checkout against an earlier commit, in one run.

``bench/bench_schnet.py`` times the encoder's training step alone against a frozen copy of the old
model. Users see the whole loop: reading shards, collating, the 3D graph, the step, validation. This
script runs ``molmat finetune`` with SchNet (same width, interactions, Gaussians and cutoff) from a
git worktree of the baseline commit and from this checkout, side by side (one torch thread each,
started together, so both see the same machine), on the data of the fine-tuning benchmark
(``bench/bench_finetune.py``: the first 10,000 CIFs of the MP archive, and QM9's 20k archive),
each version preprocessing with its own code. Throughput is graphs in training steps per second of
the whole fit, validation included (the older version writes no finer timing; see
:func:`throughput`). Test MAE after the budget is reported too (more steps, lower error).

Usage::

    .venv/bin/python bench/bench_schnet_e2e.py --baseline e99ab7b --minutes 4 --work /tmp/molmat_schnet_e2e

Writes ``bench/results/schnet_speed/schnet_e2e.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data"
PY = str(ROOT / ".venv" / "bin" / "python")
sys.path.insert(0, str(Path(__file__).resolve().parent))

#: dataset -> (input maker, targets, cutoff in Angstrom). Cutoffs of the fine-tuning benchmark (crystals) and
#: of bench_schnet.py (molecules).
DATASETS = {
    "mp": (["band_gap_eV", "formation_energy_per_atom_eV"], 8.0),
    "qm9": (["homo_Ha", "lumo_Ha", "gap_Ha"], 5.0),
}


def log(msg: str) -> None:
    """Print ``msg`` with a time stamp, flushed."""
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def source(name: str, work: Path) -> str:
    """The raw input of a dataset (the MP subset is made once, shared by both versions)."""
    if name == "qm9":
        return str(DATA / "qm9" / "qm9_20k.xyz.tar.bz2")
    from _subsets import subset_tar

    return str(subset_tar(DATA / "mp" / "cifs.tar.gz", work / "src" / "mp_first10000", 10000, ".cif",
                          DATA / "mp" / "labels.csv"))


def schnet_sets(tree: Path, cutoff: float) -> list[str]:
    """SchNet overrides in the config language of ``tree`` (the encoder-slot keys came with 464e46a)."""
    text = (tree / "pipeline" / "config.py").read_text()
    if "encoder3d" in text:
        return ["model.encoder2d=null", f"model.encoder3d={{name: schnet, hidden: 64, interactions: 3, n_rbf: 50, "
                f"cutoff: {cutoff}}}"]
    return ["model.encoder=schnet", "model.schnet.hidden=64", "model.schnet.interactions=3", "model.schnet.n_rbf=50",
            f"model.schnet.cutoff={cutoff}"]


def start(tree: Path, args: list[str], logf: Path) -> subprocess.Popen:
    """``python -m pipeline.cli ARGS`` with ``tree``'s code (cwd and PYTHONPATH), one thread."""
    env = dict(os.environ, PYTHONPATH=str(tree), OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", DGLBACKEND="pytorch")
    logf.parent.mkdir(parents=True, exist_ok=True)
    fh = open(logf, "w")
    return subprocess.Popen([PY, "-m", "pipeline.cli", *args], cwd=tree, env=env, stdout=fh, stderr=subprocess.STDOUT)


def run_pair(jobs: dict[str, tuple[Path, list[str]]], logs: Path, tag: str) -> dict[str, int]:
    """Start every version's command together and wait for all; exit codes by version."""
    procs = {v: start(tree, a, logs / f"{tag}_{v}.log") for v, (tree, a) in jobs.items()}
    return {v: p.wait() for v, p in procs.items()}


def throughput(run: Path) -> dict[str, Any]:
    """Graphs per second of a finished run over the whole fit (validation and checkpoints included: the
    one measure both versions record), and over the training loop alone where timing.json exists.

    Older versions wrote no timing.json; their graph count is steps x batch size, exact here because the
    training splits hold a multiple of 64 records (8,000 and 16,000; the loader keeps the last batch).
    """
    result = json.loads((run / "result.json").read_text())
    out: dict[str, Any] = {"steps": result["steps"], "fit_s": result["seconds"], "epochs": result["epochs_run"]}
    if (run / "timing.json").exists():
        t = json.loads((run / "timing.json").read_text())
        out["graphs"] = t["graphs"]
        out["loop_graphs_per_s"] = t["graphs"] / (t["fit_s"] - t.get("eval_s", 0.0) - t.get("save_s", 0.0))
    else:
        import yaml

        batch = yaml.safe_load((run / "config.resolved.yaml").read_text())["train"]["batch_size"]
        out["graphs"] = result["steps"] * batch
    out["graphs_per_s"] = out["graphs"] / out["fit_s"]
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--baseline", default="e99ab7b", help="commit of the 'before' version")
    p.add_argument("--minutes", type=float, default=4.0)
    p.add_argument("--datasets", default="mp,qm9")
    p.add_argument("--work", default="/tmp/molmat_schnet_e2e")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "schnet_speed"))
    args = p.parse_args(argv)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old = work / f"tree_{args.baseline}"
    if not old.exists():
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old), args.baseline], check=True)
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=True).stdout.strip()
    dirty = bool(subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True).stdout.strip())
    trees = {"before": old, "now": ROOT}
    res: dict[str, Any] = {"command": "bench/bench_schnet_e2e.py " + " ".join(argv or sys.argv[1:]),
                           "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "baseline": args.baseline,
                           "now": head + (" (uncommitted changes)" if dirty else ""), "minutes": args.minutes,
                           "cores": os.cpu_count(), "loadavg_start": os.getloadavg(), "datasets": {}}
    for name in args.datasets.split(","):
        targets, cutoff = DATASETS[name]
        src = source(name, work)
        shards = {v: work / v / "shards" / name for v in trees}
        need = {v: (t, ["preprocess", src, "--out", str(shards[v]), "--targets", ",".join(targets)])
                for v, t in trees.items() if not (shards[v] / "split.json").exists()}
        if need:
            log(f"{name}: preprocessing with {', '.join(need)}")
            rcs = run_pair(need, work / "logs", f"preprocess_{name}")
            if any(rcs.values()):
                raise SystemExit(f"preprocess {name} failed: {rcs}; logs in {work / 'logs'}")
        runs = {v: work / v / "runs" / name for v in trees}
        done = all((runs[v] / "result.json").exists() and (runs[v] / "eval_test" / "metrics.json").exists()
                   for v in trees)
        jobs = {}
        for v, t in trees.items():
            sets = [f"train.max_minutes={args.minutes}", "train.epochs=1000", "train.threads=1", "train.seed=0",
                    "finetune.targets=[" + ",".join(targets) + "]", *schnet_sets(t, cutoff)]
            jobs[v] = (t, ["finetune", "--data", str(shards[v]), "--out", str(runs[v]),
                           *[a for s in sets for a in ("--set", s)]])
            if runs[v].exists() and not done:
                shutil.rmtree(runs[v])
        load = os.getloadavg()
        if done:
            log(f"{name}: both runs finished earlier; reusing them")
        else:
            log(f"{name}: fine-tuning SchNet ({args.minutes} min) with both versions side by side")
            rcs = run_pair(jobs, work / "logs", f"finetune_{name}")
            if any(rcs.values()):
                raise SystemExit(f"finetune {name} failed: {rcs}; logs in {work / 'logs'}")
            ev = {v: (t, ["evaluate", str(runs[v]), "--data", str(shards[v]), "--split", "test"])
                  for v, t in trees.items()}
            run_pair(ev, work / "logs", f"evaluate_{name}")
        row: dict[str, Any] = {"cutoff": cutoff, "targets": targets, "loadavg_at_start": load, "source": src}
        for v in trees:
            row[v] = throughput(runs[v])
            metrics = runs[v] / "eval_test" / "metrics.json"
            if metrics.exists():
                m = json.loads(metrics.read_text())
                row[v]["test_mae"] = {t: (m.get("targets", {}).get(t) or {}).get("mae") for t in targets}
            row[v]["command"] = "molmat " + " ".join(jobs[v][1])
        row["ratio"] = row["now"]["graphs_per_s"] / row["before"]["graphs_per_s"]
        res["datasets"][name] = row
        log(f"{name}: {row['before']['graphs_per_s']:.0f} -> {row['now']['graphs_per_s']:.0f} graphs/s "
            f"({row['ratio']:.2f}x)")
    res["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schnet_e2e.json").write_text(json.dumps(res, indent=1))
    lines = [f"# SchNet fine-tuning throughput, end to end: {args.baseline} against {res['now']}", "",
             f"`{res['command']}`, started {res['started']}; {res['cores']} cores, load average at start "
             f"{res['loadavg_start'][0]:.1f}. Both versions ran side by side (one torch thread each, started "
             f"together), each preprocessing the same input with its own code, then `molmat finetune` with SchNet "
             f"(64 wide, 3 interactions, 50 Gaussians, the cutoff below) for {args.minutes:g} minutes, seed 0. "
             "graphs/s = graphs in training steps / seconds of the whole fit, validation and checkpoints included "
             "(the older version records no finer timing); 'now, loop' leaves validation and checkpoint writing "
             "out, as the fine-tuning benchmark does.", "",
             "| data (cutoff) | before graphs/s | now graphs/s | ratio | now, loop graphs/s | before steps | now steps | "
             "test MAE before | test MAE now |", "|---|---:|---:|---:|---:|---:|---:|---|---|"]
    for name, row in res["datasets"].items():
        def mae(v: str) -> str:
            return ", ".join(f"{t} {x:.4g}" for t, x in (row[v].get("test_mae") or {}).items() if x is not None)
        lines.append(f"| {name} ({row['cutoff']:g} A) | {row['before']['graphs_per_s']:.0f} | "
                     f"{row['now']['graphs_per_s']:.0f} | **{row['ratio']:.2f}x** | "
                     f"{row['now'].get('loop_graphs_per_s', float('nan')):.0f} | {row['before']['steps']} | "
                     f"{row['now']['steps']} | {mae('before')} | {mae('now')} |")
    lines += ["", "Commands (each with `OMP_NUM_THREADS=1`, `PYTHONPATH` and working directory = its tree):", ""]
    for name, row in res["datasets"].items():
        for v in ("before", "now"):
            lines.append(f"- {name} {v}: `{row[v]['command']}`")
    (out / "schnet_e2e.md").write_text("\n".join(lines) + "\n")
    log(f"wrote {out / 'schnet_e2e.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
