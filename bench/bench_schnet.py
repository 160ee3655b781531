#!/usr/bin/env python3
"""Encoder training-step speed on real structures: SchNet now against SchNet as of e99ab7b, PaiNN
now against PaiNN as of 29fd1f2, PaiNN with ``train.compile`` (its blocks compiled by
:mod:`pipeline.compiled`) against plain PaiNN now, and the MPNN on the same batches.

Every encoder sees the same pre-collated batches, drawn at random (seeded) from a shard directory
(the first records of an archive are not typical: MP's first thousand crystals have half the atoms
of a random one); each step is forward + loss + backward + AdamW step on one torch thread. The
baselines are ``bench/_schnet_e99ab7b.py`` and ``bench/_painn_29fd1f2.py``, frozen copies from
before each encoder's speed work, measured in the same run, interleaved, with the same weights, so
the ratios hold on a loaded machine and the largest embedding difference shows the outputs are
unchanged.

    .venv/bin/python bench/bench_schnet.py --data SHARDS --cutoff 8 [--data SHARDS --cutoff 5 ...]

Writes ``schnet_speed.json`` and ``schnet_speed.md`` into ``--out`` (default
bench/results/schnet_speed).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

ENCODERS = ("schnet_e99ab7b", "schnet", "painn_29fd1f2", "painn", "painn_compiled", "mpnn")
#: Each encoder measured against its baseline (a frozen copy, or the plain model for the compiled
#: one): the baseline, and the suffix of its result keys.
BASELINES = {"schnet": ("schnet_e99ab7b", ""), "painn": ("painn_29fd1f2", "_painn"),
             "painn_compiled": ("painn", "_compiled")}


def build(kind: str, cutoff: float) -> Any:
    """A width-64 encoder of each kind (3 interactions / message-passing steps)."""
    from pipeline.config import MPNNConfig, PaiNNConfig, SchNetConfig
    from pipeline.models import MPNN, PaiNN, SchNet

    if kind == "schnet_e99ab7b":
        from bench._schnet_e99ab7b import SchNet as Reference

        return Reference(SchNetConfig(hidden=64, interactions=3, n_rbf=50, cutoff=cutoff))
    if kind == "schnet":
        return SchNet(SchNetConfig(hidden=64, interactions=3, n_rbf=50, cutoff=cutoff))
    if kind == "painn_29fd1f2":
        from bench._painn_29fd1f2 import PaiNN as PaiNNReference

        return PaiNNReference(PaiNNConfig(hidden=64, interactions=3, n_rbf=20, cutoff=cutoff))
    if kind == "painn":
        return PaiNN(PaiNNConfig(hidden=64, interactions=3, n_rbf=20, cutoff=cutoff))
    if kind == "painn_compiled":
        from pipeline.compiled import compile_blocks

        net = PaiNN(PaiNNConfig(hidden=64, interactions=3, n_rbf=20, cutoff=cutoff))
        compile_blocks(net)
        return net
    return MPNN(MPNNConfig(hidden=64, steps=3))


def random_batches(data: str, batches: int, batch_size: int, seed: int) -> tuple[list[Any], float]:
    """``batches`` collated batches of records drawn at random (seeded) from a shard directory,
    without targets, and the collate rate (graphs/s)."""
    from pipeline.graphs import collate
    from pipeline.shards import ShardDataset

    total = len(ShardDataset(data))
    n = min(total, batches * batch_size)
    ds = ShardDataset(data, sorted(random.Random(seed).sample(range(total), n)))
    recs = [dict(ds[i], y=ds[i]["y"][:0]) for i in range(n)]
    t = time.perf_counter()
    graphs = [collate(recs[i:i + batch_size]) for i in range(0, n, batch_size)]
    return graphs, n / (time.perf_counter() - t)


def train_pass(net: Any, opt: Any, graphs: list[Any]) -> tuple[float, float]:
    """One pass of forward + loss + backward + optimiser step over ``graphs``: graphs/s by wall
    clock and by this process's CPU time."""
    n = sum(b.num_graphs for b in graphs)
    wall, cpu = time.perf_counter(), time.process_time()
    for b in graphs:
        loss = net(b)[0].pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)


def measure(data: str, cutoff: float, batches: int, repeats: int, batch_size: int, seed: int) -> dict[str, Any]:
    """Graphs/s of every encoder (wall and CPU time) on ``batches`` random batches of one shard directory."""
    import torch

    import pipeline  # noqa: F401

    torch.set_num_threads(1)
    graphs, collate_rate = random_batches(data, batches, batch_size, seed)
    n = sum(b.num_graphs for b in graphs)
    nets = {}
    for kind in ENCODERS:
        torch.manual_seed(0)
        nets[kind] = build(kind, cutoff)
    diffs = {}
    for kind, (frozen, suffix) in BASELINES.items():
        nets[kind].load_state_dict(nets[frozen].state_dict())
        with torch.no_grad():
            diffs[f"max_abs_embedding_diff{suffix}"] = max(
                float((nets[kind](b)[0] - nets[frozen](b)[0]).abs().max()) for b in graphs)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in nets.items()}

    def run(kind: str) -> tuple[float, float]:
        return train_pass(nets[kind], opts[kind], graphs)

    for kind in nets:  # warm-up (for the compiled model: its compilation)
        run(kind)
    out: dict[str, Any] = {"data": data, "cutoff": cutoff, "graphs": n, "batch_size": batch_size, "seed": seed,
                           "edges_per_batch": statistics.mean(b.g3d.num_edges() for b in graphs),
                           "atoms_per_batch": statistics.mean(b.g3d.num_nodes() for b in graphs),
                           "collate_graphs_per_s": collate_rate, **diffs, "repeats": {k: [] for k in nets}}
    for _ in range(repeats):
        for kind in nets:
            w, c = run(kind)
            out["repeats"][kind].append({"wall": w, "cpu": c, "load": os.getloadavg()[0]})
    for kind in nets:
        out[kind] = {m: statistics.median(r[m] for r in out["repeats"][kind]) for m in ("wall", "cpu")}
    for kind, (frozen, suffix) in BASELINES.items():
        for m in ("wall", "cpu"):
            out[f"ratio{suffix}_{m}"] = out[kind][m] / out[frozen][m]
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every ``--data`` directory and write the JSON and Markdown results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, help="shard directory (repeatable)")
    p.add_argument("--cutoff", action="append", type=float, required=True,
                   help="3D encoder cutoff for the --data of the same position (Angstrom)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "schnet_speed"))
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if len(args.cutoff) != len(args.data):
        p.error("give one --cutoff per --data")
    import torch

    res = {"command": " ".join([".venv/bin/python", "bench/bench_schnet.py"] + (argv or sys.argv[1:])),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {"nproc": os.cpu_count(),
           "platform": platform.platform(), "loadavg_start": os.getloadavg()}, "torch": torch.__version__,
           "results": [measure(d, c, args.batches, args.repeats, args.batch_size, args.seed)
                       for d, c in zip(args.data, args.cutoff)]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schnet_speed.json").write_text(json.dumps(res, indent=1))
    lines = ["# Encoder training step: SchNet now vs SchNet at e99ab7b, PaiNN now vs PaiNN at 29fd1f2, PaiNN "
             "compiled (train.compile) vs PaiNN now, MPNN", "",
             f"`{res['command']}` on {res['date']}; {res['machine']['nproc']} cores, load average at start "
             f"{res['machine']['loadavg_start'][0]:.1f}; torch {res['torch']}, 1 thread. Width 64, 3 interactions "
             "(SchNet: 50 Gaussians; PaiNN: 20 sine functions; MPNN: 3 steps, set2set); random batches of 64 "
             "(seeded); forward + loss + backward + AdamW step; median of interleaved repeats. CPU time is "
             "reported beside wall time: it is less sensitive to other processes on a shared machine.", "",
             "| data (cutoff) | atoms / edges per batch | SchNet e99ab7b graphs/s (wall, CPU) | SchNet now "
             "(wall, CPU) | ratio (wall, CPU) | max abs embedding diff | PaiNN 29fd1f2 (wall, CPU) | PaiNN now "
             "(wall, CPU) | ratio (wall, CPU) | max abs embedding diff | PaiNN compiled (wall, CPU) | ratio to PaiNN now "
             "(wall, CPU) | max abs embedding diff | MPNN (wall, CPU) | collate graphs/s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        pair = lambda k: f"{r[k]['wall']:.0f}, {r[k]['cpu']:.0f}"  # noqa: E731
        lines.append(f"| {r['data']} ({r['cutoff']:g} A) | {r['atoms_per_batch']:.0f} / {r['edges_per_batch']:.0f} | "
                     f"{pair('schnet_e99ab7b')} | {pair('schnet')} | {r['ratio_wall']:.2f}x, {r['ratio_cpu']:.2f}x | "
                     f"{r['max_abs_embedding_diff']:.1e} | {pair('painn_29fd1f2')} | {pair('painn')} | "
                     f"{r['ratio_painn_wall']:.2f}x, {r['ratio_painn_cpu']:.2f}x | "
                     f"{r['max_abs_embedding_diff_painn']:.1e} | {pair('painn_compiled')} | "
                     f"{r['ratio_compiled_wall']:.2f}x, {r['ratio_compiled_cpu']:.2f}x | "
                     f"{r['max_abs_embedding_diff_compiled']:.1e} | {pair('mpnn')} | "
                     f"{r['collate_graphs_per_s']:.0f} |")
    (out / "schnet_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
