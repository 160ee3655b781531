"""``molmat pretrain``: 3D Infomax pretraining on one or more shard directories."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import ConcatDataset, DataLoader

from pipeline import MolmatError
from pipeline.checkpoint import ENCODER, data_identity, prepare_run_dir, save_model_dir
from pipeline.config import AUTO, Config, write_resolved
from pipeline.distributed import all_reduce_sums
from pipeline.featurize import featurization_differences, neighbour_cutoff
from pipeline.models import check_encoder_cutoff
from pipeline.models.contrastive import ContrastiveModel
from pipeline.shards import ShardDataset, dataset_has_coordinates, dataset_kinds, load_manifest
from pipeline.splits import load_split
from pipeline.training import Callback, Trainer, TrainResult, pick_device, seed_everything
from pretrain.infomax import CONTRASTIVE_METRICS, PretrainBatch, contrastive_metrics, make_collate, nt_xent

log = logging.getLogger("molmat.pretrain")


def _common_featurization(manifests: list[tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """The featurisation all directories share for the graphs pretraining reads (2D and 3D)."""
    ref_dir, ref = manifests[0]
    for d, m in manifests[1:]:
        kinds = sorted(set(dataset_kinds(m)) | set(dataset_kinds(ref)))
        diff = featurization_differences(ref["featurization"], m["featurization"], ["2d", "3d"], kinds)
        if diff:
            raise MolmatError(f"{d} and {ref_dir} were featurised differently ({'; '.join(diff)}); preprocess them alike")
    return ref["featurization"]


class ContrastiveTask:
    """The pretraining :class:`pipeline.training.Task`: NT-Xent loss, contrastive metrics, the encoder directory.

    Args:
        temperature: NT-Xent temperature.
        collate_fn: records -> :class:`PretrainBatch`.
        device: where validation runs.
        out: the encoder directory.
        meta: the rest of its ``config.json``.
    """

    monitor = "val_loss"

    def __init__(self, temperature: float, collate_fn: Any, device: torch.device, out: Path, meta: dict[str, Any]) -> None:
        self.temperature, self._collate, self.device, self.out, self.meta = temperature, collate_fn, device, out, meta

    def collate(self, records: list[dict[str, Any]]) -> PretrainBatch:
        """Records -> 2D graphs plus their 3D views."""
        return self._collate(records)

    def loss(self, model: nn.Module, batch: PretrainBatch) -> tuple[torch.Tensor, dict[str, float]]:
        """Symmetric NT-Xent of a batch."""
        z2, z3 = model(batch.graphs, batch.views)
        return nt_xent(z2, z3, batch.owner, self.temperature), {}

    @torch.no_grad()
    def evaluate(self, model: nn.Module, loader: DataLoader) -> dict[str, float]:
        """Validation loss and contrastive metrics, weighted by structures, reduced over ranks."""
        keys = ["val_loss"] + [f"val_{k}" for k in CONTRASTIVE_METRICS]
        sums: dict[str, float] = {}
        for k in keys:  # per-metric weights: uniformity is undefined (nan) on a batch of one
            sums[k], sums["_n_" + k] = 0.0, 0.0
        for batch in loader:
            batch = batch.to(self.device)
            z2, z3 = model(batch.graphs, batch.views)
            metrics = {"val_loss": float(nt_xent(z2, z3, batch.owner, self.temperature)),
                       **{f"val_{k}": v for k, v in contrastive_metrics(z2, z3, batch.owner).items()}}
            b = batch.graphs.num_graphs
            for k in keys:
                if math.isfinite(metrics[k]):
                    sums[k] += metrics[k] * b
                    sums["_n_" + k] += b
        sums = all_reduce_sums(sums, self.device)
        return {k: sums[k] / sums["_n_" + k] if sums["_n_" + k] else float("nan") for k in keys}

    def save_best(self, model: nn.Module) -> None:
        """Write the encoder directory (``config.json`` + ``model.safetensors``)."""
        save_model_dir(self.out, model, ENCODER, self.meta)


def pretrain(data: list[str | Path], out: str | Path, config: Config, rank: int = 0, world_size: int = 1,
             device: torch.device | None = None, callbacks: tuple[Callback, ...] = (),
             restart: bool = False) -> TrainResult:
    """Contrastive 2D-3D pretraining of ``model.encoder2d`` against ``pretrain.encoder3d``.

    Writes the encoder directory ``out`` (``config.json``, ``model.safetensors``, ``metrics.csv``,
    ``last.pt``, ``run.json``). Re-running the same command resumes; re-running into ``out`` with
    other data or encoders is refused with what differs, unless ``restart`` (``--restart``), which
    moves the old state to ``out/previous/`` and starts afresh.
    """
    out = Path(out)
    pcfg, tcfg = config.pretrain, config.train
    manifests = [(str(d), load_manifest(d)) for d in data]
    featurization = _common_featurization(manifests)
    kinds = sorted({k for _, m in manifests for k in dataset_kinds(m)})
    # the molecule entry whatever the data: a contrastive batch is also the negatives, and pretraining
    # was measured with 64 (train.by_kind's crystal entry was measured on property fine-tuning)
    tcfg = tcfg.resolve(["molecule"])
    config = config.model_copy(update={"train": tcfg})
    encoder2d = config.model.encoder2d
    if encoder2d == AUTO:
        # pretraining always aligns a 2D encoder: an auto slot that the data's kind leaves empty
        # (crystals default to a 3D-only property model) takes the molecule default
        encoder2d = config.model.resolve(kinds).encoder2d or config.model.auto.molecule.encoder2d
    if encoder2d is None:
        raise MolmatError("pretraining trains model.encoder2d, which is null; set it (e.g. --set model.encoder2d.name=mpnn)")
    for d, m in manifests:
        if dataset_has_coordinates(m) != "all":
            raise MolmatError(f"{d}: not every record has 3D coordinates; pretraining needs a 3D view of each "
                              "(SMILES preprocessed with preprocess.molecule.embed_smiles=false?)")
    # every directory's stored neighbour graph must reach as far as the 3D encoder looks
    for d, m in manifests:
        check_encoder_cutoff(pcfg.encoder3d, neighbour_cutoff(m["featurization"], dataset_kinds(m)), d)
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
    identity = {"data": [data_identity(d) for d, _ in manifests],
                "model": {"encoder2d": encoder2d.model_dump(mode="json"),
                          "encoder3d": pcfg.encoder3d.model_dump(mode="json")},
                "pretrain": pcfg.model_dump(mode="json")}
    prepare_run_dir(out, identity, restart, rank, world_size)
    model = ContrastiveModel(encoder2d, pcfg.encoder3d, pcfg.proj_hidden, pcfg.proj_dim)
    model.to(device)
    collate_fn = make_collate(featurization["molecule_cutoff"], pcfg.use_conformers)
    meta = {"model": {"encoder2d": encoder2d.model_dump(mode="json"),
                      "encoder3d": pcfg.encoder3d.model_dump(mode="json")},
            "pretrain": pcfg.model_dump(mode="json"), "featurization": featurization,
            "preprocess": manifests[0][1]["preprocess"], "data": [str(Path(d).resolve()) for d, _ in manifests],
            "kinds": kinds}
    if rank == 0:
        write_resolved(config, out)
    task = ContrastiveTask(pcfg.temperature, collate_fn, device, out, meta)
    trainer = Trainer(model, task, train_set, val_set, tcfg, out, rank=rank, world_size=world_size, device=device,
                      callbacks=callbacks)
    result = trainer.fit()
    if rank == 0:
        (out / "result.json").write_text(json.dumps(result.__dict__, indent=1))
    return result
