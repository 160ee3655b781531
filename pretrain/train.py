"""``molmat pretrain``: 3D Infomax pretraining on one or more shard directories."""
from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import ConcatDataset, DataLoader

from pipeline import FORMAT_VERSION, MolmatError, __version__
from pipeline.config import Config, write_resolved
from pipeline.distributed import all_reduce_sums
from pipeline.shards import ShardDataset, load_manifest
from pipeline.splits import load_split
from pipeline.training import Trainer, TrainResult, pick_device, seed_everything
from pretrain.infomax import (CONTRASTIVE_METRICS, InfomaxModel, PretrainBatch, contrastive_metrics, make_collate,
                             nt_xent)

log = logging.getLogger("molmat.pretrain")
ENCODER_FORMAT = "molmat-encoder"
_FEATURE_KEYS = ("featurization_version", "atom_columns", "bond_columns", "max_z")


def _check_same_features(manifests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    ref_dir, ref = manifests[0]
    for d, m in manifests[1:]:
        diff = [k for k in _FEATURE_KEYS if m["featurization"].get(k) != ref["featurization"].get(k)]
        if diff:
            raise MolmatError(f"{d} and {ref_dir} were featurised differently ({', '.join(diff)}); preprocess them alike")
    return ref["featurization"]


def make_eval_fn(temperature: float, device: torch.device) -> Any:
    """Validation loss and contrastive metrics over a loader of :class:`PretrainBatch`."""
    @torch.no_grad()
    def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
        # the plain module: a DDP forward may communicate, and ranks hold different batch counts
        model = model.module if hasattr(model, "module") else model
        model.eval()
        keys = ["val_loss"] + [f"val_{k}" for k in CONTRASTIVE_METRICS]
        sums: dict[str, float] = {}
        for k in keys:  # per-metric weights: uniformity is undefined (nan) on a batch of one
            sums[k], sums["_n_" + k] = 0.0, 0.0
        for batch in loader:
            batch = batch.to(device)
            z2, z3 = model(batch)
            metrics = {"val_loss": float(nt_xent(z2, z3, batch.owner, temperature)),
                       **{f"val_{k}": v for k, v in contrastive_metrics(z2, z3, batch.owner).items()}}
            b = batch.graphs.num_graphs
            for k in keys:
                if math.isfinite(metrics[k]):
                    sums[k] += metrics[k] * b
                    sums["_n_" + k] += b
        sums = all_reduce_sums(sums, device)
        return {k: sums[k] / sums["_n_" + k] if sums["_n_" + k] else float("nan") for k in keys}
    return evaluate


def save_encoder(model: InfomaxModel, path: Path, meta: dict[str, Any]) -> None:
    """Write ``config.json`` and ``encoder.pt`` (2D and 3D encoders and projection heads)."""
    model = model.module if hasattr(model, "module") else model
    path.mkdir(parents=True, exist_ok=True)
    tmp = path / "encoder.pt.tmp"
    torch.save(model.state_dict(), tmp)
    os.replace(tmp, path / "encoder.pt")
    tmp = path / "config.json.tmp"
    tmp.write_text(json.dumps({"format": ENCODER_FORMAT, "format_version": FORMAT_VERSION,
                               "code_version": __version__, **meta}, indent=1))
    os.replace(tmp, path / "config.json")


def pretrain(data: list[str | Path], out: str | Path, config: Config, rank: int = 0, world_size: int = 1,
             device: torch.device | None = None) -> TrainResult:
    """Contrastive 2D-3D pretraining; writes the encoder directory ``out`` (``config.json``,
    ``encoder.pt``, ``metrics.csv``, ``last.pt``). Re-running the same command resumes."""
    out = Path(out)
    pcfg, tcfg = config.pretrain, config.train
    manifests = [(str(d), load_manifest(d)) for d in data]
    featurization = _check_same_features(manifests)
    seed_everything(tcfg.seed)
    device = device or pick_device(tcfg.device)
    train_parts, val_parts = [], []
    for d, _ in manifests:
        split = load_split(d)
        train_parts.append(ShardDataset(d, split["train"]))
        if split["val"]:
            val_parts.append(ShardDataset(d, split["val"]))
    if not val_parts:
        raise MolmatError(f"no val split in {', '.join(map(str, data))}; pretraining monitors contrastive accuracy "
                          "on it. Re-run preprocess with --set split.val=0.1 (only split.json is rewritten)")
    train_set, val_set = ConcatDataset(train_parts), ConcatDataset(val_parts)
    model = InfomaxModel(config.model.mpnn, config.model.schnet, pcfg.proj_hidden, pcfg.proj_dim)
    mol_cutoff = min(featurization["molecule_cutoff"], featurization["crystal_cutoff"])
    kinds = {i["format"] for _, m in manifests for i in m["inputs"]}
    has_crystals = bool(kinds & {"cif", "pymatgen_json"})
    has_molecules = bool(kinds - {"cif", "pymatgen_json"})
    model.encoder3d.check_cutoff(mol_cutoff if has_molecules else featurization["crystal_cutoff"], ", ".join(map(str, data)))
    model.to(device)
    collate_fn = make_collate(featurization["molecule_cutoff"], pcfg.use_conformers)
    meta = {"model": config.model.model_dump(mode="json"), "pretrain": pcfg.model_dump(mode="json"),
            "featurization": featurization, "preprocess": manifests[0][1]["preprocess"],
            "data": [str(Path(d).resolve()) for d, _ in manifests], "molecules": has_molecules, "crystals": has_crystals}
    if rank == 0:
        write_resolved(config, out)

    def loss_fn(m: torch.nn.Module, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        z2, z3 = m(batch)
        return nt_xent(z2, z3, batch.owner, pcfg.temperature), {}

    trainer = Trainer(model, loss_fn, make_eval_fn(pcfg.temperature, device), "val_loss",
                      lambda: save_encoder(trainer.model, out, meta), train_set, val_set, tcfg, out,
                      rank=rank, world_size=world_size, device=device, collate_fn=collate_fn)
    result = trainer.fit()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result
