#!/usr/bin/env python
"""What collating only the graph views a model reads saves a 3D-only crystal model's training step.

``pipeline.graphs.collate`` used to build both views of every batch. A crystal's 2D view (the
neighbour topology: edge vectors, coordination shells, one-hot edge features) is the costly one,
and the crystal default (PaiNN in the 3D slot, the 2D slot empty) never reads it. This script
takes the same training batches of an MP shard directory (the first ``--batches`` batches of the
default crystal batch size in the seed-0 epoch order) and times, in one process on one torch
thread, rounds that alternate the two ways:

* ``collate``: records -> :class:`pipeline.graphs.GraphBatch`, both views against ``views=("3d",)``;
* ``step``: collate, then forward, backward and AdamW step of the crystal default property model
  (``model.auto.crystal``: band gap and formation energy heads) on the batch.

It also checks that the model's outputs are the same from either batch (they must be bit for bit:
the 3D graph is built by the same code). Reading records from LMDB is left out (the same for
both). Each figure is the median over rounds.

Usage::

    .venv/bin/python bench/bench_collate.py --data /tmp/i11/mp --batches 60 --rounds 5

Writes ``bench/results/collate_views/collate_views.{json,md}``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="MP shard directory (molmat preprocess of ../shared/data/mp)")
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "collate_views"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    from finetune.losses import property_losses
    from pipeline.config import load_config
    from pipeline.graphs import collate
    from pipeline.loader import EpochSampler
    from pipeline.models.property import PropertyModel, target_specs
    from pipeline.shards import ShardDataset, load_manifest
    from pipeline.splits import load_split

    cfg = load_config(None, [])
    model_cfg = cfg.model.resolve(["crystal"])
    batch_size = cfg.train.by_kind.crystal.batch_size
    manifest = load_manifest(args.data)
    names = ["band_gap_eV", "formation_energy_per_atom_eV"]
    columns = [[t["name"] for t in manifest["targets"]].index(n) for n in names]
    train = ShardDataset(args.data, load_split(args.data)["train"])
    order = EpochSampler(len(train), 0).order()[: args.batches * batch_size]
    records = []
    for i in order:
        r = train[i]
        r["y"] = r["y"][columns]
        records.append(r)
    batches = [records[i:i + batch_size] for i in range(0, len(records), batch_size)]

    torch.manual_seed(0)
    specs = target_specs(manifest["targets"], names, None, None, {})
    model = PropertyModel(model_cfg, specs)
    model.fit_normalization([collate(b) for b in batches[:4]])
    views = tuple(model.views())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)

    model.eval()
    with torch.no_grad():
        same = all(torch.equal(model(collate(b)), model(collate(b, views))) for b in batches[:8])
    model.train()

    def time_collate(v: tuple[str, ...]) -> float:
        t = time.perf_counter()
        for b in batches:
            collate(b, v)
        return time.perf_counter() - t

    def time_step(v: tuple[str, ...]) -> float:
        t = time.perf_counter()
        for b in batches:
            batch = collate(b, v)
            losses, count = property_losses(model, model, batch, "l1")
            opt.zero_grad(set_to_none=True)
            (losses * (count > 0)).sum().backward()
            opt.step()
        return time.perf_counter() - t

    both = ("2d", "3d")
    timings: dict[str, list[float]] = {"collate_both": [], "collate_3d": [], "step_both": [], "step_3d": []}
    time_step(views)  # warm-up: allocator, first-call overheads
    for _ in range(args.rounds):
        timings["collate_both"].append(time_collate(both))
        timings["collate_3d"].append(time_collate(views))
        timings["step_both"].append(time_step(both))
        timings["step_3d"].append(time_step(views))
    graphs = sum(len(b) for b in batches)
    med = {k: statistics.median(v) for k, v in timings.items()}
    res: dict[str, Any] = {
        "command": "bench/bench_collate.py " + " ".join(argv or sys.argv[1:]),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "cores": os.cpu_count(), "loadavg": os.getloadavg(),
        "torch_threads": torch.get_num_threads(), "model": model_cfg.model_dump(mode="json")["encoder3d"],
        "model_views": list(views), "batch_size": batch_size, "batches": len(batches), "graphs": graphs,
        "atoms_per_graph": sum(len(r["z"]) for r in records) / graphs, "same_outputs": same,
        "seconds": timings, "median_s": med,
        "ms_per_batch": {k: 1000 * v / len(batches) for k, v in med.items()},
        "graphs_per_s": {"step_both": graphs / med["step_both"], "step_3d": graphs / med["step_3d"]},
        "step_speedup": med["step_both"] / med["step_3d"], "collate_speedup": med["collate_both"] / med["collate_3d"],
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "collate_views.json").write_text(json.dumps(res, indent=1))
    ms = res["ms_per_batch"]
    lines = [
        "# Collating only the views a model reads: crystal default training step", "",
        f"`{res['command']}`, started {res['started']}; {res['cores']} cores, load average "
        f"{res['loadavg'][0]:.1f}, {res['torch_threads']} torch thread. {len(batches)} training batches of "
        f"{batch_size} MP crystals ({res['atoms_per_graph']:.1f} atoms per crystal on average), the crystal default "
        f"model (`model.auto.crystal`, views {list(views)}), medians of {args.rounds} alternating rounds. "
        f"Model outputs from either batch identical: **{same}**.", "",
        "| | both views (before) | 3D only (now) | speed-up |", "|---|---:|---:|---:|",
        f"| collate, ms per batch | {ms['collate_both']:.1f} | {ms['collate_3d']:.1f} | "
        f"**{res['collate_speedup']:.2f}x** |",
        f"| collate + forward + backward + AdamW, ms per batch | {ms['step_both']:.1f} | {ms['step_3d']:.1f} | "
        f"**{res['step_speedup']:.2f}x** |",
        f"| training graphs/s (LMDB reading excluded) | {res['graphs_per_s']['step_both']:.0f} | "
        f"{res['graphs_per_s']['step_3d']:.0f} | |", "",
    ]
    (out / "collate_views.md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
