#!/usr/bin/env python3
"""Training-step speed with glibc's default malloc settings against ``pipeline.allocator.keep_freed_memory``.

The allocator setting is per process, so each measurement is a fresh child process (this script
with ``--child``): the same random batches of a shard directory (seeded), a width-64 encoder
(``bench_schnet.build``: PaiNN, SchNet, MPNN), forward + loss + backward + AdamW step on one torch
thread, one warm-up pass over the batches, then the graphs/s of the next passes (median). Default
and tuned children alternate, round after round, so both see the same machine.

    .venv/bin/python bench/bench_allocator.py --data SHARDS --cutoff 8 [--data SHARDS --cutoff 5 ...]

Writes ``allocator.json`` and ``allocator.md`` into ``--out`` (default bench/results).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENCODERS = ("painn", "schnet", "mpnn")


def child(kind: str, data: str, cutoff: float, batches: int, passes: int, tuned: bool, seed: int) -> dict[str, Any]:
    """One process's measurement: graphs/s (wall, CPU) per pass and the peak resident memory."""
    import resource

    from pipeline.allocator import keep_freed_memory

    applied = keep_freed_memory() if tuned else False
    import torch

    from bench.bench_schnet import build, random_batches, train_pass

    torch.set_num_threads(1)
    graphs, _ = random_batches(data, batches, 64, seed)
    torch.manual_seed(0)
    net = build(kind, cutoff)
    opt = torch.optim.AdamW(net.parameters(), lr=1e-4)
    train_pass(net, opt, graphs)
    rates = [train_pass(net, opt, graphs) for _ in range(passes)]
    return {"kind": kind, "tuned": tuned, "applied": applied, "wall": statistics.median(r[0] for r in rates),
            "cpu": statistics.median(r[1] for r in rates), "passes": rates,
            "max_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "load": os.getloadavg()[0]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", default=[], help="shard directory (repeatable, with --cutoff)")
    p.add_argument("--cutoff", action="append", type=float, default=[], help="3D cutoff for the --data before it")
    p.add_argument("--batches", type=int, default=10, help="batches of 64 per pass")
    p.add_argument("--passes", type=int, default=3, help="timed passes per child (median)")
    p.add_argument("--rounds", type=int, default=3, help="default/tuned pairs of children per encoder and data")
    p.add_argument("--encoders", default=",".join(ENCODERS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=str(ROOT / "bench" / "results"))
    p.add_argument("--child", nargs=4, metavar=("KIND", "DATA", "CUTOFF", "TUNED"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        kind, data, cutoff, tuned = args.child
        print(json.dumps(child(kind, data, float(cutoff), args.batches, args.passes, tuned == "1", args.seed)))
        return 0
    if not args.data or len(args.data) != len(args.cutoff):
        p.error("give each --data its --cutoff")
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    rows = []
    for data, cutoff in zip(args.data, args.cutoff):
        for kind in args.encoders.split(","):
            runs: dict[str, list[dict[str, Any]]] = {"default": [], "tuned": []}
            for _ in range(args.rounds):
                for name, flag in (("default", "0"), ("tuned", "1")):
                    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", kind, data, str(cutoff), flag,
                           "--batches", str(args.batches), "--passes", str(args.passes), "--seed", str(args.seed)]
                    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
                    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=ROOT)
                    runs[name].append(json.loads(out.stdout.strip().splitlines()[-1]))
            row = {"data": data, "cutoff": cutoff, "encoder": kind, "runs": runs}
            for name in runs:
                row[name] = {m: statistics.median(r[m] for r in runs[name]) for m in ("wall", "cpu", "max_rss_mb")}
            row["applied"] = all(r["applied"] for r in runs["tuned"])
            row["ratio_wall"] = row["tuned"]["wall"] / row["default"]["wall"]
            row["ratio_cpu"] = row["tuned"]["cpu"] / row["default"]["cpu"]
            rows.append(row)
            print(f"{data} {kind}: default {row['default']['wall']:.0f}, tuned {row['tuned']['wall']:.0f} graphs/s "
                  f"({row['ratio_wall']:.2f}x)", flush=True)
    import torch

    res = {"benchmark": "allocator", "started": started, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
           "command": ".venv/bin/python bench/bench_allocator.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": {"nproc": os.cpu_count(), "platform": platform.platform(), "libc": platform.libc_ver(),
                       "torch": torch.__version__, "python": platform.python_version()},
           "rows": rows}
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "allocator.json").write_text(json.dumps(res, indent=1))
    lines = ["# Training step with glibc's default malloc settings vs `pipeline.allocator.keep_freed_memory`", "",
             f"`{res['command']}` on {started} (finished {res['finished']}); {res['machine']['nproc']} cores, "
             f"{res['machine']['platform']}, glibc {res['machine']['libc'][1]}, torch {res['machine']['torch']}, "
             f"1 thread. Width-64 encoders, {args.batches} random batches of 64 per pass, forward + loss + backward + "
             f"AdamW step; each child process warms up one pass and reports the median of {args.passes}; "
             f"{args.rounds} default/tuned pairs of children alternate per row (median over children). "
             "Wall-clock graphs/s, CPU-time graphs/s beside it (less sensitive to other processes), peak RSS.", "",
             "| data (cutoff) | encoder | default graphs/s (wall, CPU) | tuned graphs/s (wall, CPU) | ratio (wall, CPU) "
             "| peak RSS default / tuned (MB) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['data']} ({r['cutoff']:g} A) | {r['encoder']} | {r['default']['wall']:.0f}, "
                     f"{r['default']['cpu']:.0f} | {r['tuned']['wall']:.0f}, {r['tuned']['cpu']:.0f} | "
                     f"{r['ratio_wall']:.2f}x, {r['ratio_cpu']:.2f}x | {r['default']['max_rss_mb']:.0f} / "
                     f"{r['tuned']['max_rss_mb']:.0f} |")
    (out_dir / "allocator.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out_dir / 'allocator.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
