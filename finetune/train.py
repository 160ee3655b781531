"""``molmat finetune``: train property heads (and the encoder) on a shard directory."""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from pipeline import MolmatError
from pipeline.config import Config, write_resolved
from pipeline.graphs import GraphBatch
from pipeline.shards import ShardDataset, load_manifest
from pipeline.distributed import gather_objects
from pipeline.splits import load_split
from pipeline.training import Trainer, TrainResult, make_loader, pick_device, seed_everything
from finetune.io import check_compatible, save_model
from finetune.model import PropertyModel, target_specs

log = logging.getLogger("molmat.finetune")


def masked_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor,
                kind: str = "mse") -> torch.Tensor:
    """Weighted mean over targets of the per-target mean loss over labelled entries.

    Args:
        pred, target: (B, T) normalised values. mask: (B, T) bool, True where labelled.
        weight: (T,) loss weight per target. kind: ``mse``, ``l1`` or ``huber``.
    Targets without any label in the batch contribute nothing.
    """
    diff = pred - target
    if kind == "mse":
        per = diff ** 2
    elif kind == "l1":
        per = diff.abs()
    else:
        per = torch.nn.functional.huber_loss(pred, target, reduction="none", delta=1.0)
    per = torch.where(mask, per, torch.zeros_like(per))
    count = mask.sum(0)
    per_target = per.sum(0) / count.clamp_min(1)
    w = weight * (count > 0)
    return (per_target * w).sum() / w.sum().clamp_min(1e-12)


@torch.no_grad()
def predict_loader(model: PropertyModel, loader: DataLoader, device: torch.device) -> dict[str, Any]:
    """Physical-unit predictions, labels and mask over a loader: arrays (n, T) plus ids."""
    model.eval()
    preds, ys, masks, ids, index = [], [], [], [], []
    for batch in loader:
        batch = batch.to(device)
        preds.append(model.predict(batch).cpu().numpy())
        ys.append(batch.y.double().cpu().numpy())
        masks.append(batch.mask.cpu().numpy())
        ids += batch.ids
        index += batch.index
    t = len(model.targets)
    cat = lambda xs: np.concatenate(xs) if xs else np.zeros((0, t))  # noqa: E731
    return {"pred": cat(preds), "y": cat(ys), "mask": cat(masks).astype(bool), "ids": ids, "index": index}


def regression_metrics(pred: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """MAE, RMSE, R^2 and count of paired values."""
    if len(y) == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "r2": float("nan"), "count": 0}
    err = pred - y
    ss_tot = float(((y - y.mean()) ** 2).sum())
    return {"mae": float(np.abs(err).mean()), "rmse": float(np.sqrt((err ** 2).mean())),
            "r2": float(1 - (err ** 2).sum() / ss_tot) if ss_tot > 0 else float("nan"), "count": int(len(y))}


def make_eval_fn(device: torch.device) -> Any:
    """Validation: per-target MAE in physical units and their mean scaled by each target's std."""
    def evaluate(model: torch.nn.Module, loader: DataLoader) -> dict[str, float]:
        inner = model.module if hasattr(model, "module") else model
        # each rank predicts its share of the validation batches; all ranks score the union
        parts = gather_objects(predict_loader(inner, loader, device))
        out = {k: np.concatenate([p[k] for p in parts]) for k in ("pred", "y", "mask")}
        metrics: dict[str, float] = {}
        scaled = []
        for j, spec in enumerate(inner.targets):
            m = out["mask"][:, j]
            if spec.transform == "log10":
                m = m & (out["y"][:, j] > 0)
                mae = float(np.abs(np.log10(out["pred"][m, j]) - np.log10(out["y"][m, j])).mean()) if m.any() else float("nan")
                metrics[f"val_mae_log10_{spec.name}"] = mae
                scale = float(inner.std[j])
            else:
                mae = float(np.abs(out["pred"][m, j] - out["y"][m, j]).mean()) if m.any() else float("nan")
                metrics[f"val_mae_{spec.name}"] = mae
                scale = float(np.std(out["y"][m, j])) if m.sum() > 1 else 1.0
            if np.isfinite(mae):
                scaled.append(mae / max(scale, 1e-12))
        metrics["val_mae_scaled"] = float(np.mean(scaled)) if scaled else float("inf")
        return metrics
    return evaluate


def finetune(data: str | Path, out: str | Path, config: Config, init: str | None = None,
             rank: int = 0, world_size: int = 1, device: torch.device | None = None) -> TrainResult:
    """Fine-tune a property model on the train split of a shard directory.

    Writes ``RUN/best/`` (deployable model), ``RUN/last.pt`` (resume state), ``RUN/metrics.csv``,
    ``RUN/config.resolved.yaml`` and ``RUN/result.json``. Re-running the same command resumes.
    """
    out = Path(out)
    fcfg, tcfg = config.finetune, config.train
    manifest = load_manifest(data)
    split = load_split(data)
    if not split["val"]:
        # Early stopping and the choice of the best model need held-out data; monitoring the
        # train split instead would report a training error as if it were a validation error.
        raise MolmatError(f"{data}/split.json has an empty val split; fine-tuning needs one. Re-run preprocess "
                          "with --set split.val=0.1 (the shards are kept, only split.json is rewritten)")
    specs = target_specs(manifest["targets"], fcfg.targets, fcfg.log10_targets, fcfg.extensive_targets, fcfg.loss_weights)
    init = init or fcfg.init
    if init:
        # A pretrained encoder brings its architecture: the fine-tuning model must match it.
        from pretrain import read_encoder_config

        enc_model = read_encoder_config(init)["model"]
        config = config.model_copy(deep=True)
        config.model.mpnn = type(config.model.mpnn).model_validate(enc_model["mpnn"])
        config.model.schnet = type(config.model.schnet).model_validate(enc_model["schnet"])
        if rank == 0:
            log.info("fine-tuning from %s: encoder architecture taken from it", init)
    seed_everything(tcfg.seed)
    device = device or pick_device(tcfg.device)
    train_idx = split["train"]
    if fcfg.max_train is not None and fcfg.max_train < len(train_idx):
        pick = np.random.default_rng(split["seed"]).permutation(len(train_idx))[: fcfg.max_train]
        train_idx = sorted(train_idx[i] for i in pick)
    train_set = ShardDataset(data, train_idx)
    val_set = ShardDataset(data, split["val"])
    if len(train_set) == 0:
        raise MolmatError(f"{data}: the train split is empty")
    # Targets are selected by column; the model sees only its own targets.
    columns = [[t["name"] for t in manifest["targets"]].index(s.name) for s in specs]
    train_set = _Columns(train_set, columns)
    val_set = _Columns(val_set, columns)
    model = PropertyModel(config.model.encoder, config.model.mpnn, config.model.schnet, specs,
                          fcfg.head_hidden, fcfg.head_layers, fcfg.dropout)
    if model.encoder3d is not None:
        feat = manifest["featurization"]
        # Molecule and crystal graphs can sit in one directory: the smaller cutoff binds.
        model.encoder3d.check_cutoff(min(feat["molecule_cutoff"], feat["crystal_cutoff"]) if _has_molecules(manifest)
                                     else feat["crystal_cutoff"], str(data))
    if init:
        from pretrain import load_encoder_into

        loaded = load_encoder_into(model, init, manifest)
        if rank == 0:
            log.info("initialised %s from %s", ", ".join(loaded), init)
    model.fit_normalization(make_loader(train_set, 256, None, tcfg.num_workers))
    model.to(device)
    groups = _param_groups(model, fcfg.freeze_encoder, fcfg.encoder_lr, tcfg.lr)
    meta = {"model": config.model.model_dump(mode="json"), "finetune": fcfg.model_dump(mode="json"),
            "featurization": manifest["featurization"], "preprocess": manifest["preprocess"],
            "elements": sorted(json.loads((Path(data) / "stats.json").read_text())["elements"]),
            "trained_on": str(Path(data).resolve()), "split": {k: split[k] for k in ("method", "seed")},
            "init": str(init) if init else None,
            "kinds": sorted({"molecule" if i["format"] in MOLECULE_FORMATS else "crystal" for i in manifest["inputs"]})}
    if rank == 0:
        write_resolved(config, out)

    def loss_fn(m: torch.nn.Module, batch: GraphBatch) -> tuple[torch.Tensor, dict[str, float]]:
        inner = m.module if hasattr(m, "module") else m
        target, mask = inner.normalize(batch.y, batch.mask, batch)
        return masked_loss(m(batch), target, mask, inner.loss_weight, fcfg.loss), {}

    trainer = Trainer(model, loss_fn, make_eval_fn(device), "val_mae_scaled",
                      lambda: save_model(trainer.model, out / "best", meta), train_set, val_set, tcfg, out,
                      param_groups=groups, rank=rank, world_size=world_size, device=device)
    result = trainer.fit()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result


#: Input formats that hold molecules; the others hold crystals.
MOLECULE_FORMATS = ("qm9_xyz", "sdf", "smiles_csv")


def _has_molecules(manifest: dict[str, Any]) -> bool:
    """Whether a dataset's inputs include molecule formats."""
    return any(i["format"] in MOLECULE_FORMATS for i in manifest["inputs"])


class _Columns:
    """A dataset view that keeps only some target columns of ``y``."""

    def __init__(self, base: ShardDataset, columns: list[int]) -> None:
        self.base, self.columns = base, np.asarray(columns, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        rec = self.base[i]
        rec["y"] = rec["y"][self.columns]
        return rec


def _param_groups(model: PropertyModel, freeze: bool, encoder_lr: float | None, lr: float) -> list[dict[str, Any]]:
    """Optimizer groups: heads at ``lr``; encoders frozen, at ``encoder_lr``, or at ``lr``."""
    enc_params = [p for e in model.encoders() for p in e.parameters()]
    enc_ids = {id(p) for p in enc_params}
    head_params = [p for p in model.parameters() if id(p) not in enc_ids]
    if freeze:
        for p in enc_params:
            p.requires_grad_(False)
        return [{"params": head_params, "lr": lr}]
    return [{"params": head_params, "lr": lr}, {"params": enc_params, "lr": encoder_lr or lr}]
