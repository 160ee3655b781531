"""Deterministic, seeded train/val/test splits saved as ``split.json`` next to the shards.

``random`` shuffles record indices with the seed. ``scaffold`` groups molecules by Bemis-Murcko
scaffold (crystals by reduced formula) so that no group crosses splits: groups larger than half
the test size go to train first, the rest are shuffled with the seed (the balanced scaffold
split of Chemprop), then train, val and test are filled in that order.
"""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from pipeline import MolmatError
from pipeline.config import SplitConfig
from pipeline.shards import SPLIT, load_manifest, write_json_atomic


def random_split(n: int, val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Shuffle ``range(n)`` with ``seed`` and cut it into train/val/test index lists."""
    perm = np.random.default_rng(seed).permutation(n)
    n_test = int(round(test * n))
    n_val = int(round(val * n))
    return {"train": sorted(perm[n_test + n_val:].tolist()), "val": sorted(perm[n_test:n_test + n_val].tolist()),
            "test": sorted(perm[:n_test].tolist())}


def scaffold_split(scaffolds: list[str], val: float, test: float, seed: int) -> dict[str, list[int]]:
    """Balanced scaffold split: whole scaffold groups go to one split each."""
    n = len(scaffolds)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, s in enumerate(scaffolds):
        groups[s].append(i)  # acyclic molecules share the empty scaffold, as in Chemprop
    n_val, n_test = int(round(val * n)), int(round(test * n))
    big = [g for g in groups.values() if len(g) > n_test / 2]
    small = [g for g in groups.values() if len(g) <= n_test / 2]
    rng = np.random.default_rng(seed)
    big.sort(key=len, reverse=True)
    small = [small[i] for i in rng.permutation(len(small))]
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    n_train = n - n_val - n_test
    for g in big + small:
        if len(out["train"]) + len(g) <= n_train:
            out["train"].extend(g)
        elif len(out["val"]) + len(g) <= n_val:
            out["val"].extend(g)
        else:
            out["test"].extend(g)
    return {k: sorted(v) for k, v in out.items()}


def write_split(root: str | Path, cfg: SplitConfig, scaffolds: list[str]) -> Path:
    """Compute the configured split for the records of ``root`` and write ``split.json``."""
    n = len(scaffolds)
    if cfg.method == "scaffold":
        parts = scaffold_split(scaffolds, cfg.val, cfg.test, cfg.seed)
    else:
        parts = random_split(n, cfg.val, cfg.test, cfg.seed)
    data = {"method": cfg.method, "seed": cfg.seed, "val_fraction": cfg.val, "test_fraction": cfg.test,
            "records": n, **parts}
    path = Path(root) / SPLIT
    write_json_atomic(path, data)
    return path


def load_split(root: str | Path, path: str | Path | None = None) -> dict[str, Any]:
    """Read a split file (``split.json`` beside the shards by default) and check it fits the shards.

    Raises:
        MolmatError: the file is missing, or it was made for a different number of records (the
            shards were re-made or merged after the split), or it holds an index out of range.
    """
    p = Path(path) if path else Path(root) / SPLIT
    if not p.exists():
        raise MolmatError(f"{p}: split file missing; re-run preprocess or pass a split file")
    split = json.loads(p.read_text())
    records = load_manifest(root)["records"]
    if split.get("records") != records:
        raise MolmatError(f"{p} covers {split.get('records')} records but the shards in {root} hold {records}; "
                          "re-run preprocess (only split.json is rewritten)")
    for part in ("train", "val", "test"):
        idx = split.get(part, [])
        if idx and not (0 <= min(idx) and max(idx) < records):
            raise MolmatError(f"{p}: the {part} split holds indices outside 0..{records - 1}")
    return split
