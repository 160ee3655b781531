"""Issue 5 benchmark: molmat finetune training throughput, 1 process vs 2 DDP processes (CPU, gloo).

On a QM9 shard directory of the first ``--n`` molecules of ``qm9_20k.xyz.tar.bz2`` (archive
order, preprocessed by ``molmat preprocess`` with its seeded 80/10/10 split), with a fixed number
of epochs (``--epochs``) and the same global batch:

* ``1p x 1t``: ``molmat finetune`` with OMP_NUM_THREADS=1, batch 64;
* ``1p x 2t``: the same with OMP_NUM_THREADS=2;
* ``2p x 1t``: ``python -m torch.distributed.run --nproc_per_node=2 -m pipeline.cli finetune``
  with OMP_NUM_THREADS=1 and ``train.batch_size=32`` per process (global batch 64).

molmat runs through its command line (``python -m pipeline.cli``); every training run writes
``timing.json`` (the trainer's ``TimingCallback``), so besides ``metrics.csv`` (its cumulative ``seconds`` column, which includes validation)
we also get training-only time per epoch. Startup (imports, process-group set-up, normalisation
fit) and the first epoch (first-step warm-up) are excluded: throughput is measured over epochs
2..E. Repeats are interleaved (A B C A B C ...) and the median is reported.

Usage::

    .venv/bin/python bench/bench_ddp.py                 # writes bench/results/ddp.json and ddp.md
    .venv/bin/python bench/bench_ddp.py --repeats 1 --epochs 2 --results /tmp/ddp_smoke
"""
from __future__ import annotations

import argparse
import csv
import datetime as _dt
import json
import os
import shlex
import shutil
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_finetune as bf  # noqa: E402  (run_cmd, wait_quiet, machine, versions)

PY = bf.PY
QM9 = bf.DATA / "qm9" / "qm9_20k.xyz.tar.bz2"
TARGETS = ["homo_Ha", "lumo_Ha", "gap_Ha"]


def subset_dir(work: Path, n: int) -> Path:
    """The first ``n`` dsgdb9nsd_*.xyz members of the QM9 archive (archive order) in a directory."""
    from _subsets import subset_tar  # bench/ is the script's directory

    return subset_tar(QM9, work / "src" / f"qm9_first{n}", n, ".xyz")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (torchrun's master port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def read_metrics(run: Path) -> list[dict[str, float]]:
    """The rows of ``RUN/metrics.csv``, every value as a float."""
    with open(run / "metrics.csv", newline="") as fh:
        return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(fh)]


def one_run(cfg: str, d: Path, work: Path, epochs: int, rep: int, n_train: int) -> dict[str, Any]:
    """Run one configuration once; returns throughput numbers."""
    run = work / "runs" / f"{cfg}_rep{rep}"
    if run.exists():
        shutil.rmtree(run)
    nproc, threads = {"1p_x_1t": (1, 1), "1p_x_2t": (1, 2), "2p_x_1t": (2, 1)}[cfg]
    batch = 64 // nproc
    sets = [f"train.epochs={epochs}", f"train.batch_size={batch}", "finetune.targets=[" + ",".join(TARGETS) + "]",
            "train.patience=1000"]
    args = ["finetune", "--data", str(d), "--out", str(run)] + [a for s in sets for a in ("--set", s)]
    env = {"OMP_NUM_THREADS": str(threads)}
    if nproc == 1:
        cmd = [PY, *bf.TIMED.split()] + args
        equiv = shlex.join(["molmat"] + args)
    else:
        port = str(free_port())
        launch = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                  f"--master_port={port}"]
        cmd = [PY] + launch + [*bf.TIMED.split()] + args
        equiv = shlex.join(["python"] + launch + ["-m", "pipeline.cli"] + args)
    e = bf.run_cmd(cmd, work / "logs" / f"{cfg}_rep{rep}.log", f"{cfg} repeat {rep}", env=env, record_as=equiv)
    if e["rc"] != 0:
        return {"error": f"rc {e['rc']}, log {e['log']}", "cmd": e}
    rows = read_metrics(run)
    timings = [json.loads((run / "timing.json").read_text())]
    for r in range(1, nproc):
        timings.append(json.loads((run / f"timing.rank{r}.json").read_text()))
    # metrics.csv: cumulative seconds since fit() started, validation included; epochs 2..E
    csv_s = rows[-1]["seconds"] - rows[0]["seconds"]
    # graphs per epoch over all ranks, from the timing counters (DDP pads the last rank's share)
    g_epochs = [sum(t["epochs"][k]["graphs"] for t in timings) for k in range(epochs)]
    graphs_2_to_e = g_epochs[-1] - g_epochs[0]
    # training-only seconds for epochs 2..E (slowest rank; ranks run in lockstep under DDP)
    train_s = max(t["epochs"][-1]["train_s"] - t["epochs"][0]["train_s"] for t in timings)
    steps = rows[-1]["step"] - rows[0]["step"]
    eval_s = timings[0]["eval_s"]
    return {"nproc": nproc, "threads_per_proc": threads, "batch_per_proc": batch, "global_batch": batch * nproc,
            "epochs": epochs, "n_train": n_train, "steps_2_to_E": steps, "graphs_2_to_E": graphs_2_to_e,
            "csv_seconds_2_to_E": round(csv_s, 3), "graphs_per_s_csv": graphs_2_to_e / csv_s,
            "train_seconds_2_to_E": round(train_s, 3), "graphs_per_s_train_only": graphs_2_to_e / train_s,
            "ms_per_step_train_only": 1000 * train_s / steps, "eval_s_total_rank0": round(eval_s, 2),
            "evals": timings[0]["evals"], "first_step_s": timings[0]["first_step_s"],
            "csv_seconds": [r["seconds"] for r in rows], "best_val_mae_scaled": min(r["val_mae_scaled"] for r in rows),
            "cmd": e}


def main(argv: list[str] | None = None) -> int:
    """Preprocess the subset, run each configuration ``--repeats`` times; write ddp.json and ddp.md."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=4000, help="QM9 molecules in the subset")
    p.add_argument("--epochs", type=int, default=3, help="epochs per run (throughput over epochs 2..E)")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--work", default="/tmp/molmat_bench_ddp")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--quiet-wait", type=float, default=30.0,
                   help="before each run wait at most this long for other processes to go quiet (s)")
    args = p.parse_args(argv)
    bf.QUIET_WAIT_S = args.quiet_wait
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is excluded)")
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    res: dict[str, Any] = {"date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
                           "command": shlex.join([".venv/bin/python", "bench/bench_ddp.py"] + (argv or sys.argv[1:])),
                           "machine": bf.machine(), "versions": bf.versions(), "runs": {}, "commands": bf.COMMANDS}
    res["versions"].pop("dgllife", None)
    src = subset_dir(work, args.n)
    d = work / "shards" / f"qm9_{args.n}"
    e = bf.run_cmd([bf.MOLMAT, "preprocess", str(src), "--out", str(d), "--targets", ",".join(TARGETS)],
                   work / "logs" / "preprocess.log", "preprocess subset", quiet=False)
    if e["rc"] != 0:
        raise SystemExit(f"preprocess failed; see {e['log']}")
    sizes = bf.split_sizes(d)
    res["data"] = {"dir": str(d), "source": (src / ".complete").read_text().strip(), "split": sizes}
    configs = ["1p_x_1t", "1p_x_2t", "2p_x_1t"]
    for rep in range(args.repeats):
        for cfg in configs:
            bf.log(f"{cfg} repeat {rep}")
            r = one_run(cfg, d, work, args.epochs, rep, sizes["train"])
            res["runs"].setdefault(cfg, []).append(r)
            if "error" in r:
                bf.log(f"  {r['error']}")
            else:
                bf.log(f"  {r['graphs_per_s_csv']:.0f} graphs/s (metrics.csv), {r['graphs_per_s_train_only']:.0f} "
                       f"graphs/s (training only), other cores {r['cmd']['other_processes_cores']}")
    summary = {}
    for cfg, runs in res["runs"].items():
        ok = [r for r in runs if "error" not in r]
        if ok:
            summary[cfg] = {k: statistics.median(r[k] for r in ok) for k in
                            ("graphs_per_s_csv", "graphs_per_s_train_only", "ms_per_step_train_only")}
    res["summary"] = summary
    if "2p_x_1t" in summary:
        for base in ("1p_x_1t", "1p_x_2t"):
            if base in summary:
                for k in ("graphs_per_s_csv", "graphs_per_s_train_only"):
                    summary["2p_x_1t"][f"speedup_vs_{base}_{k}"] = summary["2p_x_1t"][k] / summary[base][k]
    res["finished"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    results.mkdir(parents=True, exist_ok=True)
    (results / "ddp.json").write_text(json.dumps(res, indent=1, default=str))
    write_md(res, results / "ddp.md", args)
    bf.log(f"wrote {results / 'ddp.json'} and {results / 'ddp.md'}")
    return 0


def write_md(res: dict[str, Any], path: Path, args: argparse.Namespace) -> None:
    """Write the results ``res`` as the Markdown report ``path``."""
    m = res["machine"]
    s = res["summary"]
    L = ["# molmat DDP throughput on CPU (issue 5)", ""]
    L.append(f"- date: {res['date']} (finished {res['finished']})")
    L.append(f"- machine: nproc={m['nproc']}, CPU: {m['cpu']}, memory {m['memory_gib']} GiB; no GPU; gloo backend")
    L.append("- versions: " + ", ".join(f"{k} {v}" for k, v in res["versions"].items()))
    sp = res["data"]["split"]
    L.append(f"- data: {res['data']['source']}, preprocessed by molmat (seeded random split, train/val/test "
             f"{sp['train']}/{sp['val']}/{sp['test']}); targets {', '.join(TARGETS)}; default MPNN (d=64, T=3, set2set)")
    L.append(f"- {args.epochs} epochs per run, global batch 64 (2 processes: 32 each), {args.repeats} interleaved repeats, "
             "median reported; throughput over epochs 2..E (startup and the first epoch excluded)")
    L.append("- **caveat: this machine has only 2 CPU cores, shared with another developer.** Two processes with one "
             "thread each use the same 2 cores that one process with 2 intra-op threads uses, so DDP can at best "
             "match '1 process x 2 threads' here, never scale; it also adds an all-reduce of the gradients and a "
             "budget/signal all-reduce per step. 'other cores' = CPU used by other processes during the run. This "
             "measures overhead, not the multi-GPU/multi-node scaling the feature is for.")
    L.append("")
    L.append("| configuration | graphs/s (metrics.csv, incl. validation) | graphs/s (training steps only) | ms/step | "
             "speed-up of 2p (csv / train-only) |")
    L.append("|---|---:|---:|---:|---|")
    label = {"1p_x_1t": "1 process x 1 thread (OMP_NUM_THREADS=1), batch 64",
             "1p_x_2t": "1 process x 2 threads (OMP_NUM_THREADS=2), batch 64",
             "2p_x_1t": "2 processes x 1 thread (torchrun, OMP_NUM_THREADS=1), batch 32 each"}
    for cfg, v in s.items():
        sp_txt = ""
        if cfg == "2p_x_1t":
            sp_txt = "; ".join(f"vs {b}: {v.get(f'speedup_vs_{b}_graphs_per_s_csv', float('nan')):.2f}x / "
                               f"{v.get(f'speedup_vs_{b}_graphs_per_s_train_only', float('nan')):.2f}x"
                               for b in ("1p_x_1t", "1p_x_2t"))
        L.append(f"| {label[cfg]} | {v['graphs_per_s_csv']:.0f} | {v['graphs_per_s_train_only']:.0f} | "
                 f"{v['ms_per_step_train_only']:.1f} | {sp_txt} |")
    L.append("")
    L.append("Per run:")
    L.append("")
    L.append("| run | graphs/s csv | graphs/s train-only | steps (epochs 2..E) | validation s (rank 0, all epochs) | "
             "best val_mae_scaled | other cores | waited for quiet s |")
    L.append("|---|---:|---:|---:|---:|---:|---:|---:|")
    for cfg, runs in res["runs"].items():
        for i, r in enumerate(runs):
            if "error" in r:
                L.append(f"| {cfg} #{i} | error: {r['error']} | | | | | | |")
                continue
            L.append(f"| {cfg} #{i} | {r['graphs_per_s_csv']:.0f} | {r['graphs_per_s_train_only']:.0f} | "
                     f"{r['steps_2_to_E']:.0f} | {r['eval_s_total_rank0']} | {r['best_val_mae_scaled']:.4g} | "
                     f"{r['cmd']['other_processes_cores']} | {r['cmd']['waited_for_quiet_s']} |")
    L.append("")
    L.append("'metrics.csv' throughput = graphs in epochs 2..E / (seconds[E] - seconds[1]) from the `seconds` column "
             "(cumulative, includes each epoch's validation). 'training steps only' subtracts validation and "
             "checkpoint writing (counters from each run's timing.json). Under DDP every rank validates the whole "
             "validation set (the val loader is not sharded), so validation does not get faster with more processes.")
    L.append("")
    L.append("## Commands (cwd /work/main)")
    L.append("")
    L.append(f"Whole benchmark: `{res['command']}`. `python -m pipeline.cli ARGS` = `molmat ARGS`; "
             "the plain form is given after '='.")
    L.append("")
    for c in res["commands"]:
        cmd = c["command"].replace(str(ROOT) + "/", "")
        eq = f" (= `{c['equivalent']}`)" if c.get("equivalent") else ""
        L.append(f"- {c['what']}: `{cmd}`{eq}; {c['wall_s']} s")
    path.write_text("\n".join(L) + "\n")


if __name__ == "__main__":
    sys.exit(main())
