#!/usr/bin/env python3
"""SchNet training-step speed: paired filters (the default) against one filter per directed edge.

Both variants share the same weights and the same pre-collated batches of real structures; each
step is forward + loss + backward + AdamW step on one torch thread. The baseline is the same module
with ``per_edge_filters = True`` (the textbook layout), measured in the same run, interleaved,
so the ratio holds on a loaded machine. Also reported: collate throughput (records -> GraphBatch)
and the largest difference between the two variants' embeddings.

    .venv/bin/python bench/bench_schnet.py --data SHARDS [--data SHARDS ...] [--out bench/results/schnet_speed]

Writes ``schnet_speed.json`` and ``schnet_speed.md`` into ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def measure(data: str, batches: int, repeats: int, batch_size: int) -> dict[str, Any]:
    """Graphs/s of both variants (wall and CPU time) on ``batches`` batches of one shard directory."""
    import torch

    import pipeline  # noqa: F401
    from pipeline.config import SchNetConfig
    from pipeline.graphs import collate
    from pipeline.models.schnet import SchNet
    from pipeline.shards import ShardDataset

    torch.set_num_threads(1)
    ds = ShardDataset(data)
    n = min(len(ds), batches * batch_size)
    recs = [dict(ds[i], y=ds[i]["y"][:0]) for i in range(n)]
    t = time.perf_counter()
    graphs = [collate(recs[i:i + batch_size]) for i in range(0, n, batch_size)]
    collate_rate = n / (time.perf_counter() - t)
    cfg = SchNetConfig(hidden=64, interactions=3, n_rbf=50, cutoff=5.0)
    torch.manual_seed(0)
    nets = {"paired": SchNet(cfg), "per_edge": SchNet(cfg)}
    nets["per_edge"].load_state_dict(nets["paired"].state_dict())
    nets["per_edge"].per_edge_filters = True
    with torch.no_grad():
        diff = max(float((nets["paired"](b)[0] - nets["per_edge"](b)[0]).abs().max()) for b in graphs)
    opts = {k: torch.optim.AdamW(m.parameters(), lr=1e-4) for k, m in nets.items()}

    def run(kind: str) -> tuple[float, float]:
        net, opt = nets[kind], opts[kind]
        wall, cpu = time.perf_counter(), time.process_time()
        for b in graphs:
            loss = net(b)[0].pow(2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return n / (time.perf_counter() - wall), n / (time.process_time() - cpu)

    for kind in nets:  # warm-up
        run(kind)
    out: dict[str, Any] = {"data": data, "graphs": n, "batch_size": batch_size,
                           "edges_per_batch": statistics.mean(b.g3d.num_edges() for b in graphs),
                           "atoms_per_batch": statistics.mean(b.g3d.num_nodes() for b in graphs),
                           "collate_graphs_per_s": collate_rate, "max_abs_embedding_diff": diff, "repeats": {}}
    for kind in nets:
        out["repeats"][kind] = []
    for _ in range(repeats):
        for kind in nets:
            w, c = run(kind)
            out["repeats"][kind].append({"wall": w, "cpu": c, "load": os.getloadavg()[0]})
    for kind in nets:
        out[kind] = {m: statistics.median(r[m] for r in out["repeats"][kind]) for m in ("wall", "cpu")}
    out["ratio_wall"] = out["paired"]["wall"] / out["per_edge"]["wall"]
    out["ratio_cpu"] = out["paired"]["cpu"] / out["per_edge"]["cpu"]
    return out


def main(argv: list[str] | None = None) -> int:
    """Measure every ``--data`` directory and write the JSON and Markdown results."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", action="append", required=True, help="shard directory (repeatable)")
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "schnet_speed"))
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    import torch

    res = {"command": " ".join([".venv/bin/python", "bench/bench_schnet.py"] + (argv or sys.argv[1:])),
           "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": {"nproc": os.cpu_count(),
           "platform": platform.platform(), "loadavg_start": os.getloadavg()}, "torch": torch.__version__,
           "results": [measure(d, args.batches, args.repeats, args.batch_size) for d in args.data]}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "schnet_speed.json").write_text(json.dumps(res, indent=1))
    lines = ["# SchNet training step: paired filters vs one filter per edge", "",
             f"`{res['command']}` on {res['date']}; {res['machine']['nproc']} cores, load average at start "
             f"{res['machine']['loadavg_start'][0]:.1f}; torch {res['torch']}, 1 thread. Width 64, 3 interactions, "
             "50 Gaussians, cutoff 5 A; forward + loss + backward + AdamW step; median of interleaved repeats. "
             "CPU time is reported beside wall time because the machine is shared: it is less sensitive to "
             "other processes.", "",
             "| data | atoms / edges per batch | per-edge graphs/s (wall, CPU) | paired graphs/s (wall, CPU) | "
             "ratio (wall, CPU) | max abs embedding diff | collate graphs/s |", "|---|---|---|---|---|---|---|"]
    for r in res["results"]:
        lines.append(f"| {r['data']} | {r['atoms_per_batch']:.0f} / {r['edges_per_batch']:.0f} | "
                     f"{r['per_edge']['wall']:.0f}, {r['per_edge']['cpu']:.0f} | {r['paired']['wall']:.0f}, "
                     f"{r['paired']['cpu']:.0f} | {r['ratio_wall']:.2f}x, {r['ratio_cpu']:.2f}x | "
                     f"{r['max_abs_embedding_diff']:.1e} | {r['collate_graphs_per_s']:.0f} |")
    (out / "schnet_speed.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
